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

from distill_forget.distill.networks import PromptEncoder
from distill_forget.world import concepts


def concept_states(tokenizer, text_encoder, domain: str) -> dict[str, torch.Tensor]:
    """Per concept of `domain` ('object' | 'style'): its prompts' token states, (rows, width)."""
    encode = PromptEncoder(tokenizer, text_encoder)
    names, partners = (concepts.OBJECTS, concepts.STYLES) if domain == "object" else (concepts.STYLES, concepts.OBJECTS)
    states = {}
    for name in names:
        pairs = [(name, p) if domain == "object" else (p, name) for p in partners]
        hidden = encode([concepts.eval_prompt(obj, style) for obj, style in pairs]).text
        states[name] = hidden.reshape(-1, hidden.shape[-1]).double().cpu()
    return states


def edit_residuals(states: dict[str, torch.Tensor], concept: str, targets: list[str]) -> list[float]:
    """Per target: the share of the concept-to-target gap left by the best linear edit that keeps the other concepts.

    The edit W minimises |x W^T - y|^2 + |kept W^T - kept|^2 (every row weighs the same); the
    targets share the left-hand side, so one least-squares solve serves them all.
    """
    x = states[concept]
    kept = torch.cat([s for name, s in states.items() if name != concept])
    right = torch.cat([torch.cat([states[t], kept]) for t in targets], dim=1)
    w_t = torch.linalg.lstsq(torch.cat([x, kept]), right, driver="gelsd").solution
    edited = (x @ w_t).split(x.shape[1], dim=1)
    return [float((e - states[t]).norm() / (x - states[t]).norm()) for e, t in zip(edited, targets)]


def edit_residual(states: dict[str, torch.Tensor], concept: str, target: str) -> float:
    """Share of the concept-to-target gap left by the best linear edit that keeps the other concepts."""
    return edit_residuals(states, concept, [target])[0]


def mean_edit_residuals(tokenizer, text_encoder, domain: str) -> dict[str, float]:
    """Per concept: its edit residual averaged over every other concept of its domain as target."""
    states = concept_states(tokenizer, text_encoder, domain)
    means = {}
    for name in states:
        residuals = edit_residuals(states, name, [t for t in states if t != name])
        means[name] = sum(residuals) / len(residuals)
    return means
