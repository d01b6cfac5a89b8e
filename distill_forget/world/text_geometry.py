"""How far apart a text encoder keeps the world's concepts: can one be edited alone?

Cross-attention reads a prompt only through the text encoder's token states, and every
cross-attention edit (a trained `to_k` / `to_v`, a closed-form edit, a forget mapping) is
linear in them. So the best any such edit can do is the least-squares map that sends one
concept's states to a target's while leaving the other concepts of its domain unchanged.

`edit_residual` is what that map leaves undone, as a share of the way from the concept to
its target (0: the concept can be moved alone; 1: not at all without moving the others).
The states are those of the evaluation prompt over every partner of the other domain.
"""

import torch

from distill_forget.distill.networks import token_ids
from distill_forget.world import concepts


@torch.no_grad()
def concept_states(tokenizer, text_encoder, domain: str) -> dict[str, torch.Tensor]:
    """Per concept of `domain` ('object' | 'style'): its prompts' token states, (rows, width)."""
    names, partners = (concepts.OBJECTS, concepts.STYLES) if domain == "object" else (concepts.STYLES, concepts.OBJECTS)
    states = {}
    for name in names:
        pairs = [(name, p) if domain == "object" else (p, name) for p in partners]
        prompts = [concepts.eval_prompt(obj, style) for obj, style in pairs]
        hidden = text_encoder(token_ids(tokenizer, prompts, text_encoder.device))[0]
        states[name] = hidden.reshape(-1, hidden.shape[-1]).double().cpu()
    return states


def edit_residual(states: dict[str, torch.Tensor], concept: str, target: str) -> float:
    """Share of the concept-to-target gap left by the best linear edit that keeps the other concepts."""
    x, y = states[concept], states[target]
    kept = torch.cat([s for name, s in states.items() if name != concept])
    # W minimises |x W^T - y|^2 + |kept W^T - kept|^2 (every row weighs the same)
    w_t = torch.linalg.lstsq(torch.cat([x, kept]), torch.cat([y, kept]), driver="gelsd").solution
    edited = x @ w_t
    return float((edited - y).norm() / (x - y).norm())


def mean_edit_residuals(tokenizer, text_encoder, domain: str) -> dict[str, float]:
    """Per concept: its edit residual averaged over every other concept of its domain as target."""
    states = concept_states(tokenizer, text_encoder, domain)
    return {
        name: sum(edit_residual(states, name, target) for target in states if target != name) / (len(states) - 1)
        for name in states
    }
