"""Model merging of independent unlearning runs (METHODS.md): one model that forgot them all.

Each run j unlearned one concept from the base model theta_0; its task vector is
`tau_j = theta_j - theta_0`. The merged model is `theta_0 + tau`, with `tau`:

    task_arithmetic   scale * sum_j tau_j
    uniform           mean_j tau_j  (the average of the models)
    ties              scale * TIES(tau_1..tau_J): trim each tau_j to its `top_k` share of
                      largest magnitudes (over all its entries), elect a sign per entry (the
                      sign of the sum of the trimmed vectors), average the trimmed entries
                      that agree with it
"""

from pathlib import Path

import torch
from safetensors.torch import load_file

from distill_forget.pipelines import unet_weight_files

MERGE_METHODS = ("none", "ties", "task_arithmetic", "uniform")

State = dict[str, torch.Tensor]


def trim(tau: State, top_k: float) -> State:
    """tau with all but its `top_k` share of largest-magnitude entries (over every tensor) set to 0."""
    if not 0.0 < top_k <= 1.0:
        raise ValueError(f"merge.top_k must be in (0, 1] (got {top_k})")
    magnitudes = torch.cat([t.abs().flatten().float() for t in tau.values()])
    k = max(1, round(top_k * magnitudes.numel()))
    threshold = magnitudes.topk(k).values[-1]
    return {name: torch.where(t.abs() >= threshold, t, torch.zeros_like(t)) for name, t in tau.items()}


def ties(taus: list[State], top_k: float) -> State:
    trimmed = [trim(tau, top_k) for tau in taus]
    merged = {}
    for name in taus[0]:
        stacked = torch.stack([t[name].float() for t in trimmed])
        sign = torch.sign(stacked.sum(0))
        agree = (torch.sign(stacked) == sign) & (stacked != 0)
        count = agree.sum(0).clamp(min=1)
        merged[name] = (torch.where(agree, stacked, torch.zeros_like(stacked)).sum(0) / count).to(taus[0][name].dtype)
    return merged


def merge_states(base: State, models: list[State], method: str, scale: float = 1.0, top_k: float = 0.2) -> State:
    """The merged weights `theta_0 + tau` of `models`, each fine-tuned from `base`."""
    if method not in MERGE_METHODS[1:]:
        raise ValueError(f"merge.method must be one of {MERGE_METHODS[1:]} (got {method!r})")
    if not models:
        raise ValueError("merging needs at least one model")
    taus = [{name: m[name] - base[name] for name in base} for m in models]
    if method == "task_arithmetic":
        tau = {name: scale * sum(t[name] for t in taus) for name in base}
    elif method == "uniform":
        tau = {name: sum(t[name] for t in taus) / len(taus) for name in base}
    else:
        tau = {name: scale * t for name, t in ties(taus, top_k).items()}
    return {name: base[name] + tau[name] for name in base}


def unet_state(folder) -> State:
    """A pipeline folder's UNet weights, read from its safetensors file(s)."""
    state = {}
    for file in unet_weight_files(Path(folder)):
        state.update(load_file(file))
    return state
