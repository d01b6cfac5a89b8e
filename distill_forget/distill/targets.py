"""Locality: score distance, and the choice of mapping targets and neighbours (METHODS.md).

    d(a, b) = (1/K) sum_k || eps(T, x_k, t_k, a) - eps(T, x_k, t_k, b) ||^2

at K noisy latents `x_k = add_noise(z_k, n_k, t_k)` drawn once from a fixed seed and shared by
every pair, so distances are comparable. Recomputed at every request: the teacher changed.
"""

import numpy as np
import torch
import torch.nn.functional as F

from distill_forget.distill.networks import Condition, Denoiser, PromptEncoder
from distill_forget.distill.prompts import replace_concept
from distill_forget.world.model import training_scheduler

TARGET_MODES = ("fixed", "contextual", "score")
TARGET_SCOPES = ("request", "prompt")
NEIGHBOR_MODES = ("request", "score", "text")


class ScoreProbe:
    """The K noisy latents (x_k, t_k) at which score distances are measured."""

    def __init__(self, latent_shape, num_latents: int, seed: int, noise_scheduler, device="cpu"):
        generator = torch.Generator().manual_seed(seed)
        z = torch.randn((num_latents, *latent_shape), generator=generator)
        noise = torch.randn((num_latents, *latent_shape), generator=generator)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (num_latents,), generator=generator)
        self.x_t = noise_scheduler.add_noise(z, noise, t).to(device)
        self.t = t.to(device)

    @torch.no_grad()
    def outputs(self, denoiser: Denoiser, condition: Condition, chunk: int = 128) -> torch.Tensor:
        """(N, K, C, H, W): the network's output for each prompt at each probe latent."""
        k = len(self.t)
        per_call = max(1, chunk // k)  # prompts per network call
        out = []
        for start in range(0, len(condition), per_call):
            embeds = condition[start : start + per_call]
            n = len(embeds)
            x_t, t = self.x_t.repeat(n, 1, 1, 1), self.t.repeat(n)
            out.append(denoiser(x_t, t, embeds.repeat_interleave(k)).float().unflatten(0, (n, k)))
        return torch.cat(out)


def distance(outputs_a: torch.Tensor, outputs_b: torch.Tensor) -> torch.Tensor:
    """Squared norm of the output difference, averaged over the K probe latents: (N, K, ...) -> (N,)."""
    return (outputs_a - outputs_b).pow(2).flatten(2).sum(-1).mean(-1)


def score_distance(unet, condition_a: Condition, condition_b: Condition, num_latents=16, seed=0, noise_scheduler=None):
    """d(a, b) for one prompt's condition each (`encoder(prompts)[i]`) -> scalar, or N each -> (N,).

    `noise_scheduler` gives the forward process; by default Stable Diffusion's (MiniCanvas's).
    """
    denoiser = unet if isinstance(unet, Denoiser) else Denoiser(unet)
    noise_scheduler = noise_scheduler or training_scheduler()
    device = condition_a.device
    probe = ScoreProbe(denoiser.latent_shape, num_latents, seed, noise_scheduler, device)
    single = condition_a.text.dim() == 2  # one prompt: (tokens, width)
    a, b = (c[None] if single else c for c in (condition_a, condition_b))
    d = distance(probe.outputs(denoiser, a), probe.outputs(denoiser, b))
    return d[0] if single else d


class ScoreDistances:
    """d(prompt, other) for prompts, under one network and one probe.

    The network is frozen, so each sentence's probe outputs are computed once and kept: the
    forget prompts of different concepts share their candidate sentences ("a circle in pastel
    color style" is a candidate for every style), which the simultaneous setting plans together.
    """

    def __init__(self, denoiser: Denoiser, encoder: PromptEncoder, probe: ScoreProbe):
        self.denoiser, self.encoder, self.probe = denoiser, encoder, probe
        self.known: dict[str, torch.Tensor] = {}  # sentence -> (K, C, H, W) outputs

    def outputs(self, prompts: list[str]) -> torch.Tensor:
        new = list(dict.fromkeys(p for p in prompts if p not in self.known))
        if new:
            self.known.update(zip(new, self.probe.outputs(self.denoiser, self.encoder(new))))
        return torch.stack([self.known[p] for p in prompts])

    def __call__(self, prompt: str, others: list[str]) -> torch.Tensor:
        outputs = self.outputs([prompt, *others])
        return distance(outputs[1:], outputs[:1])


def choose_targets(
    mode: str,
    forget_prompts: list[str],
    concept: str,
    candidates: list[str],
    seed: int,
    distances: ScoreDistances | None = None,
    scope: str = "request",
):
    """The replacement of `concept` in each forget prompt, and a record of the choice.

    fixed: the first candidate everywhere; contextual: candidates spread evenly over the
    prompts in a seeded order; score: the candidate whose sentence is closest in score
    distance, the replacement that changes the teacher's score field least -- per prompt
    (scope `prompt`, as published) or one for the whole request, closest on average over
    its forget prompts (scope `request`: the concept is mapped the same way in every context).
    """
    if mode not in TARGET_MODES:
        raise ValueError(f"target.mode must be one of {TARGET_MODES} (got {mode!r})")
    if scope not in TARGET_SCOPES:
        raise ValueError(f"target.scope must be one of {TARGET_SCOPES} (got {scope!r})")
    if not candidates:
        raise ValueError(f"no target candidates for {concept!r}")
    record = {"mode": mode, "candidates": list(candidates)}
    if mode == "fixed":
        targets = [candidates[0]] * len(forget_prompts)
    elif mode == "contextual":
        order = np.random.default_rng(seed).permutation(len(forget_prompts))
        targets = [""] * len(forget_prompts)
        for rank, i in enumerate(order):
            targets[i] = candidates[rank % len(candidates)]
    else:
        record["scope"] = scope
        per_prompt = [distances(p, [replace_concept(p, concept, c) for c in candidates]) for p in forget_prompts]
        record["distances"] = [{c: round(float(v), 6) for c, v in zip(candidates, d)} for d in per_prompt]
        if scope == "prompt":
            targets = [candidates[int(d.argmin())] for d in per_prompt]
        else:
            targets = [candidates[int(sum(per_prompt).argmin())]] * len(forget_prompts)
    counts = {c: targets.count(c) for c in candidates}
    record["counts"] = {c: n for c, n in counts.items() if n}
    return targets, record


def main_target(counts: dict[str, int]) -> str | None:
    """The target most forget prompts are mapped onto (a plan's `targets.counts`); None without one (ESD)."""
    return max(counts, key=counts.get) if counts else None


def between_ratios(concept_text: str, candidate_text: str, neighbors: dict[str, str], distances) -> dict[str, float]:
    """{neighbour: max(d(concept, n), d(candidate, n)) / d(concept, candidate)} for `neighbors` (name -> prompt).

    Below 1 where the neighbour is closer to both than they are to each other: it lies between, and the
    smaller, the more. On sentences it was not trained on the mapping goes only part of the way, and
    images part of the way from the concept to such a target read as that neighbour (MiniCanvas: `dots`
    onto `mosaic` reads as `checkerboard`).
    """
    prompts = list(neighbors.values())
    apart = max(float(distances(concept_text, [candidate_text])[0]), 1e-12)
    ratios = torch.maximum(distances(concept_text, prompts), distances(candidate_text, prompts)) / apart
    return dict(zip(neighbors, ratios.tolist()))


def close_ratio(concept_text: str, target_text: str, neighbors: dict[str, str], distances) -> float:
    """min over `neighbors` (name -> prompt) of d(concept, n) / d(concept, target).

    Small where a protected neighbour lies far nearer the concept than the target does: the mapping moves
    the concept a long way, and what sits right beside it moves with it (MiniCanvas: `stripes` onto `flat
    color`, 0.15, loses `diagonal stripes`).
    """
    apart = max(float(distances(concept_text, [target_text])[0]), 1e-12)
    return float(distances(concept_text, list(neighbors.values())).min()) / apart


def neighbors_between(
    concept_text: str, candidates: dict[str, str], neighbors: dict[str, str], distances, margin: float
) -> dict[str, list[str]]:
    """{candidate: the neighbours whose `between_ratios` are under `margin`}, for candidates that have any.

    Names map to the prompts compared; `margin` <= 0 blocks nothing.
    """
    if margin <= 0 or not neighbors:
        return {}
    blocked = {}
    for candidate, prompt in candidates.items():
        inside = [n for n, r in between_ratios(concept_text, prompt, neighbors, distances).items() if r < margin]
        if inside:
            blocked[candidate] = inside
    return blocked


def choose_neighbors(
    mode: str,
    concept_text: str,
    pool: dict[str, str],
    top_k: int,
    listed: list[str],
    distances: ScoreDistances | None = None,
    encoder: PromptEncoder | None = None,
):
    """The concepts to protect most, and a record of the choice.

    request: exactly those the request lists. score / text: the request's list if it has one,
    else the `top_k` concepts of `pool` (name -> prompt) closest to `concept_text`, by score
    distance or by cosine similarity of pooled text embeddings (the cheaper signal; SDXL: those
    of its second text encoder, the only pooled embedding it has).
    """
    if mode not in NEIGHBOR_MODES:
        raise ValueError(f"neighbors.mode must be one of {NEIGHBOR_MODES} (got {mode!r})")
    if mode == "request" or listed or not pool:
        return list(listed), {"mode": mode, "chosen": list(listed), "source": "request"}
    names, prompts = list(pool), list(pool.values())
    if mode == "score":
        d = distances(concept_text, prompts)
        order = d.argsort().tolist()
        ranking = {"distance": {names[i]: round(float(d[i]), 6) for i in order}}
    else:
        pooled = encoder([concept_text, *prompts]).pooled.float()
        cosine = F.cosine_similarity(pooled[1:], pooled[:1])
        order = cosine.argsort(descending=True).tolist()
        ranking = {"cosine": {names[i]: round(float(cosine[i]), 6) for i in order}}
    chosen = [names[i] for i in order[:top_k]]
    return chosen, {"mode": mode, "chosen": chosen, "source": mode, **ranking}
