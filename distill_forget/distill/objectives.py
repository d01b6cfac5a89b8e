"""The losses of a distillation step (METHODS.md), one class each; the weights live in the config.

Every distillation loss compares `eps(S, x_t, t, c_S)` with stop-gradient teacher outputs
`eps(T, x_t, t, c_T)` on a teacher latent `z0` noised to `x_t`; they differ in the prompts, the
timestep range and how the outputs are compared. The outputs are matched directly, so the
losses hold for any `prediction_type`.

Each loss is split in two: `rows` draws the micro-batch's noisy latents and names the
conditions each network reads, `loss` scores the outputs. Calling a loss runs the networks on
its rows alone; the training module gathers the rows of every loss of a micro-batch and runs
one student call and one teacher call for all of them (`run_rows`).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distill_forget.distill.global_batch import GlobalBatch
from distill_forget.distill.networks import Condition, Denoiser


@dataclass
class Rows:
    """One loss's network inputs for a micro-batch, row for row."""

    x_t: torch.Tensor
    t: torch.Tensor
    student: Condition  # the condition the student reads
    teacher: list[Condition]  # one stop-gradient teacher prediction per condition


def noised(
    noise_scheduler, z0: torch.Tensor, t_high: int, draw: GlobalBatch, t_low: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """`add_noise(z0, n, t)` with fresh noise n and t ~ U{t_low, ..., t_high - 1}, this rank's share of
    the global batch's."""
    t = t_low + draw.randint(t_high - t_low, z0.shape[0], z0.device)
    noise = draw.randn(z0.shape[0], z0.shape[1:], z0.device).to(z0.dtype)
    return noise_scheduler.add_noise(z0, noise, t), t


def run_rows(student: Denoiser, teacher: Denoiser, rows: dict[str, Rows], taught_by: dict[str, Denoiser] | None = None):
    """Every loss's rows through one call per teacher (no gradients) and one student call.

    `taught_by`: the rows some other frozen network answers for (by loss name); the rest `teacher`.
    Returns {name: (student output, [teacher outputs])}, in float32.
    """

    def call(network: Denoiser, queries: list[tuple]) -> list[torch.Tensor]:
        """One network call on the concatenated (x_t, t, condition) queries; one output each."""
        x_t, t, condition = (torch.cat([q[0] for q in queries]), torch.cat([q[1] for q in queries]),
                             Condition.cat([q[2] for q in queries]))  # fmt: skip
        return list(network(x_t, t, condition).float().split([len(q[0]) for q in queries]))

    by_network: dict[Denoiser, list[str]] = {}
    for name in rows:
        by_network.setdefault((taught_by or {}).get(name, teacher), []).append(name)
    taught = {}
    with torch.no_grad():
        for network, names in by_network.items():
            outs = iter(call(network, [(rows[n].x_t, rows[n].t, c) for n in names for c in rows[n].teacher]))
            taught.update({n: [next(outs) for _ in rows[n].teacher] for n in names})
    learnt = call(student, [(r.x_t, r.t, r.student) for r in rows.values()])
    return {name: (out, taught[name]) for name, out in zip(rows, learnt)}


def per_sample(difference: torch.Tensor) -> torch.Tensor:
    """Mean squared value of each sample of a batch: (N, ...) -> (N,)."""
    return difference.pow(2).flatten(1).mean(1)


def per_sample_spatial_mean(difference: torch.Tensor) -> torch.Tensor:
    """Mean over channels of each channel's squared spatial mean: (N, C, H, W) -> (N,). The
    spatial mean is the one part of an error that is the same at every position; a sampler adds
    it up step after step into a colour cast."""
    return difference.flatten(2).mean(2).pow(2).mean(1)


def per_sample_with_mean(difference: torch.Tensor, mean_weight: float) -> torch.Tensor:
    """`per_sample`, plus `mean_weight` times `per_sample_spatial_mean`: (N, C, H, W) -> (N,)."""
    if not mean_weight:
        return per_sample(difference)
    return per_sample(difference) + mean_weight * per_sample_spatial_mean(difference)


LOSS_SCALES = ("mse", "relative")


def checked_scale(scale: str) -> str:
    if scale not in LOSS_SCALES:
        raise ValueError(f"loss_scale must be one of {LOSS_SCALES} (got {scale!r})")
    return scale


class DistillationLoss(nn.Module):
    """A loss of student outputs against stop-gradient teacher outputs at the same noisy latents."""

    def rows(self, z0: torch.Tensor, *conditions: Condition) -> Rows:
        raise NotImplementedError

    def loss(self, student_out: torch.Tensor, teacher_outs: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, student: Denoiser, teacher: Denoiser, z0: torch.Tensor, *conditions: Condition) -> torch.Tensor:
        """The loss on one micro-batch, the networks run on its rows alone."""
        student_out, teacher_outs = run_rows(student, teacher, {"loss": self.rows(z0, *conditions)})["loss"]
        return self.loss(student_out, teacher_outs)


class ForgetMapping(DistillationLoss):
    """L_forget: on latents where the teacher draws the concept, steer as it does toward the target.

    `eps(S, x_t, t, p_f)` is pulled to `sg eps(T, x_t, t, p_m)`, `p_m` the forget prompt `p_f`
    with the concept replaced; `t ~ U[t_min, t_max]` (published: t_min 0, t_max 600-700 of 1000).

    scale `mse`: the published mean squared difference. `relative`: each sample's squared
    difference divided by the teacher's own, `sg || eps(T, x_t, t, p_f) - eps(T, x_t, t, p_m) ||^2`,
    so the loss is the share of the way to the target still to go (1 for the teacher) and
    every timestep counts alike. Under `mse` the high-noise timesteps, where the teacher's two
    predictions differ least but where an object's shape is decided, weigh almost nothing.

    `overshoot` η > 0 (not published) aims past the target, away from the concept:
    `eps(T, p_m) + η (eps(T, p_m) - eps(T, p_f))`, since the mapping learnt on the training
    sentences carries to other sentences only part of the way (`python -m distill_forget.forget_transfer`).
    """

    latents, reference = "forget", "mapped"  # the replay group of z0; the teacher's prompt group

    def __init__(
        self, noise_scheduler, t_max: int, draw: GlobalBatch, scale: str = "mse", overshoot: float = 0.0, t_min: int = 0
    ):
        super().__init__()
        last = noise_scheduler.config.num_train_timesteps - 1
        if not 0 <= t_min <= t_max <= last:
            raise ValueError(f"t_min={t_min}, t_max={t_max}: the forget mapping's timesteps must satisfy "
                             f"0 <= t_min <= t_max <= {last}")
        self.noise_scheduler, self.t_min, self.t_max = noise_scheduler, t_min, t_max
        self.draw, self.scale, self.overshoot = draw, checked_scale(scale), overshoot

    def rows(self, z0, forget_embeds, mapped_embeds) -> Rows:
        x_t, t = noised(self.noise_scheduler, z0, self.t_max + 1, self.draw, self.t_min)
        teacher = [mapped_embeds] if self.scale == "mse" and not self.overshoot else [forget_embeds, mapped_embeds]
        return Rows(x_t, t, forget_embeds, teacher)

    def loss(self, student_out, teacher_outs) -> torch.Tensor:
        target = teacher_outs[-1]
        if self.overshoot:
            target = target + self.overshoot * (target - teacher_outs[0])
        if self.scale == "mse":
            return F.mse_loss(student_out, target)
        gap = per_sample(teacher_outs[0] - target).clamp_min(1e-12)
        return (per_sample(student_out - target) / gap).mean()


class RetainReplay(DistillationLoss):
    """L_retain: the student copies the teacher on teacher latents of prompts that must survive.

    scale `mse`: the published mean squared difference. `relative`: each sample's squared
    difference divided by the teacher's conditional signal there,
    `sg || eps(T, x_t, t, p_r) - eps(T, x_t, t, "") ||^2` — the part classifier-free guidance
    amplifies — so a change that guidance would magnify into a different shape costs as much
    at high noise as at low noise. (`rows` then needs the empty prompt's condition.)

    `mean_weight` w > 0 (not published) adds `w * mean_c (mean_hw (eps_S - eps_T))^2` to each
    sample's squared difference: the error's spatial mean per latent channel counts w times more
    (w = H x W: as much as if it were summed over the positions). A shift common to every
    prompt's prediction is cheap under the plain mean, and guided sampling multiplies it and adds
    it up over the steps into a colour cast of every image.
    """

    def __init__(self, noise_scheduler, draw: GlobalBatch, scale: str = "mse", mean_weight: float = 0.0):
        super().__init__()
        self.noise_scheduler, self.draw, self.scale = noise_scheduler, draw, checked_scale(scale)
        if mean_weight < 0:
            raise ValueError(f"replay.mean_weight must be >= 0 (got {mean_weight})")
        self.mean_weight = mean_weight

    def rows(self, z0, embeds, empty=None, teacher_embeds=None) -> Rows:
        """`teacher_embeds`: the teacher's prompts where they are not the student's (default: the same)."""
        x_t, t = noised(self.noise_scheduler, z0, self.noise_scheduler.config.num_train_timesteps, self.draw)
        teacher = embeds if teacher_embeds is None else teacher_embeds
        if self.scale == "mse":
            return Rows(x_t, t, embeds, [teacher])
        if empty is None:
            raise ValueError(f"{type(self).__name__} with scale 'relative' needs the empty prompt's condition")
        return Rows(x_t, t, embeds, [teacher, empty[[0] * len(x_t)]])

    def loss(self, student_out, teacher_outs) -> torch.Tensor:
        if self.scale == "mse":
            return per_sample_with_mean(student_out - teacher_outs[0], self.mean_weight).mean()
        conditional, unconditional = teacher_outs
        signal = per_sample(conditional - unconditional).clamp_min(1e-12)
        return (per_sample_with_mean(student_out - conditional, self.mean_weight) / signal).mean()


class NeighborPreservation(RetainReplay):
    """L_neighbor: retain replay on the concepts closest to the forgotten one, the first damaged.

    Same formula as RetainReplay; a class of its own so it has its own weight and log name.
    """


class SameLatentsReplay(RetainReplay):
    """Retain replay of other prompts at another loss's noisy latents and timesteps, one row each
    (a mean squared difference: these prompts have no conditional signal of their own to scale by)."""

    def __init__(self, noise_scheduler, draw: GlobalBatch, mean_weight: float = 0.0):
        super().__init__(noise_scheduler, draw, "mse", mean_weight)

    def on_rows(self, rows: Rows, condition: Condition) -> Rows:
        """`condition` (one row per row of `rows`) read at the same x_t and t as `rows`."""
        return Rows(rows.x_t, rows.t, condition, [condition])


class UnconditionalReplay(SameLatentsReplay):
    """L_unconditional: retain replay of the empty prompt, at the retain rows' noisy latents
    (the neighbour rows' when there is no retain replay).

    Classifier-free guidance, `eps_u + w (eps_c - eps_u)`, subtracts the empty prompt's output
    `(w - 1)` times from every prompt's: cross-attention training moves it too, and a drift
    there changes every guided image, retained or not.
    """


class TwinReplay(SameLatentsReplay):
    """L_twin: neighbour replay at the forget rows' own noisy latents and timesteps.

    The forget prompt `a ring in stripes style` is mapped away at latents of striped images;
    its twin `a ring in diagonal stripes style` read at those same latents must keep the
    teacher's output, so the student learns that the concept's word, not the picture, moves
    the prediction. Weighed with `lambda_n` (`neighbors.twins`); not in the published method.
    """


class ForgottenReplay(RetainReplay):
    """L_forgotten: retain replay on prompts of concepts forgotten by earlier requests.

    The teacher already maps them away, so copying it keeps them forgotten explicitly
    instead of relying on them never drifting back. Where an earlier concept was mapped onto
    the concept forgotten now (`target.follow`), the teacher reads its prompt with the new
    target in its place.
    """


def trainable_differences(student: nn.Module, reference: nn.Module, who: str) -> list[torch.Tensor]:
    """theta - theta_ref (float32) for every trainable parameter of the student."""
    ref = dict(reference.named_parameters())
    differences = [p.float() - ref[name].float() for name, p in student.named_parameters() if p.requires_grad]
    if not differences:
        raise ValueError(f"{who}: the student has no trainable parameters")
    return differences


class ParameterAnchor(nn.Module):
    """L_reg = sum over trainable parameters of (theta - theta_prev)^2 (a sum, not a mean).

    `theta_prev` is read from the reference network (the teacher is exactly M_{i-1}), so no
    copy of the weights is kept.
    """

    def forward(self, student: nn.Module, reference: nn.Module) -> torch.Tensor:
        return sum(d.pow(2).sum() for d in trainable_differences(student, reference, "ParameterAnchor"))


# ---------------------------------------------------------------- baseline forget objectives
# Alternatives to ForgetMapping (config `forget_objective`), called the same way:
# `objective(student, teacher, z0, forget_embeds, reference_embeds)`, z0 from the replay group
# `latents`, reference_embeds from the prompt group `reference`, row for row.


class ESD(DistillationLoss):
    """Erased Stable Diffusion, the teacher being ESD's frozen copy F:

    `target = eps(F, x_t, t, "") - eta (eps(F, x_t, t, c) - eps(F, x_t, t, ""))` (negative
    guidance away from the concept), `L = || eps(S, x_t, t, c) - sg target ||^2`. `x_t`: the
    teacher's own latents for the forget prompts noised to t ~ U[0, T), in place of ESD's
    partial sampling trajectories.
    """

    latents, reference = "forget", "empty"

    def __init__(self, noise_scheduler, eta: float, draw: GlobalBatch):
        super().__init__()
        self.noise_scheduler, self.eta, self.draw = noise_scheduler, eta, draw

    def rows(self, z0, forget_embeds, empty_embeds) -> Rows:
        x_t, t = noised(self.noise_scheduler, z0, self.noise_scheduler.config.num_train_timesteps, self.draw)
        return Rows(x_t, t, forget_embeds, [empty_embeds, forget_embeds])

    def loss(self, student_out, teacher_outs) -> torch.Tensor:
        unconditional, conditional = teacher_outs
        return F.mse_loss(student_out, unconditional - self.eta * (conditional - unconditional))


class ConceptAblation(DistillationLoss):
    """Model-based concept ablation: the concept's prompt predicts what its anchor prompt does.

    `L = || eps(S, x_t, t, p_f) - sg eps(T, x_t, t, p_a) ||^2` on the teacher's latents of the
    ANCHOR prompts `p_a` (the mapped prompts: the forget prompt with the concept replaced by
    its target), t ~ U[0, T). The frozen teacher gives the anchor's prediction, so it does not
    drift while the student trains.
    """

    latents, reference = "mapped", "mapped"

    def __init__(self, noise_scheduler, draw: GlobalBatch):
        super().__init__()
        self.noise_scheduler, self.draw = noise_scheduler, draw

    def rows(self, z0, forget_embeds, anchor_embeds) -> Rows:
        x_t, t = noised(self.noise_scheduler, z0, self.noise_scheduler.config.num_train_timesteps, self.draw)
        return Rows(x_t, t, forget_embeds, [anchor_embeds])

    def loss(self, student_out, teacher_outs) -> torch.Tensor:
        return F.mse_loss(student_out, teacher_outs[0])


# ---------------------------------------------------------------- add-on regularisers


class StartingPointPenalty(nn.Module):
    """L1-SP (p=1): `mean |theta - theta_ref|`; L2-SP (p=2): `mean (theta - theta_ref)^2`.

    A mean over every trainable element (ParameterAnchor is a sum); `theta_ref` is the previous
    model or the base model (config `regularizers.l1sp.reference` / `l2sp.reference`).
    """

    def __init__(self, p: int):
        super().__init__()
        if p not in (1, 2):
            raise ValueError(f"StartingPointPenalty: p must be 1 or 2 (got {p})")
        self.p = p

    def forward(self, student: nn.Module, reference: nn.Module) -> torch.Tensor:
        differences = trainable_differences(student, reference, "StartingPointPenalty")
        return sum(d.abs().pow(self.p).sum() for d in differences) / sum(d.numel() for d in differences)
