"""The losses of a distillation step (METHODS.md), one class each; the weights live in the config.

Every distillation loss is `mean || eps(S, x_t, t, c_S) - sg eps(T, x_t, t, c_T) ||^2` on a
teacher latent `z0` noised to `x_t`; they differ in the prompts and the timestep range. The
outputs are matched directly, so the losses hold for any `prediction_type`.
"""

import torch
import torch.nn.functional as F
from torch import nn

from distill_forget.distill.global_batch import GlobalBatch
from distill_forget.distill.networks import Denoiser


def distill_loss(student: Denoiser, teacher: Denoiser, x_t, t, student_embeds, teacher_embeds) -> torch.Tensor:
    """The one formula: mean squared difference of student and stop-gradient teacher outputs."""
    with torch.no_grad():
        target = teacher(x_t, t, teacher_embeds)
    return F.mse_loss(student(x_t, t, student_embeds).float(), target.float())


def noised(noise_scheduler, z0: torch.Tensor, t_high: int, draw: GlobalBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """`add_noise(z0, n, t)` with fresh noise n and t ~ U{0, ..., t_high - 1}, this rank's share of the global batch's."""
    t = draw.randint(t_high, z0.shape[0], z0.device)
    noise = draw.randn(z0.shape[0], z0.shape[1:], z0.device).to(z0.dtype)
    return noise_scheduler.add_noise(z0, noise, t), t


class ForgetMapping(nn.Module):
    """L_forget: on latents where the teacher draws the concept, steer as it does toward the target.

    `eps(S, x_t, t, p_f)` is pulled to `sg eps(T, x_t, t, p_m)`, `p_m` the forget prompt `p_f`
    with the concept replaced; `t ~ U[0, t_max]` (published: t_max 600-700 of 1000).
    """

    latents, reference = "forget", "mapped"  # the replay group of z0; the teacher's prompt group

    def __init__(self, noise_scheduler, t_max: int, draw: GlobalBatch):
        super().__init__()
        last = noise_scheduler.config.num_train_timesteps - 1
        if not 0 <= t_max <= last:
            raise ValueError(f"t_max={t_max}: the forget mapping's timesteps must lie in [0, {last}]")
        self.noise_scheduler, self.t_max, self.draw = noise_scheduler, t_max, draw

    def forward(self, student, teacher, z0, forget_embeds, mapped_embeds) -> torch.Tensor:
        x_t, t = noised(self.noise_scheduler, z0, self.t_max + 1, self.draw)
        return distill_loss(student, teacher, x_t, t, forget_embeds, mapped_embeds)


class RetainReplay(nn.Module):
    """L_retain: the student copies the teacher on teacher latents of prompts that must survive."""

    def __init__(self, noise_scheduler, draw: GlobalBatch):
        super().__init__()
        self.noise_scheduler, self.draw = noise_scheduler, draw

    def forward(self, student, teacher, z0, embeds) -> torch.Tensor:
        x_t, t = noised(self.noise_scheduler, z0, self.noise_scheduler.config.num_train_timesteps, self.draw)
        return distill_loss(student, teacher, x_t, t, embeds, embeds)


class NeighborPreservation(RetainReplay):
    """L_neighbor: retain replay on the concepts closest to the forgotten one, the first damaged.

    Same formula as RetainReplay; a class of its own so it has its own weight and log name.
    """


class ForgottenReplay(RetainReplay):
    """L_forgotten: retain replay on prompts of concepts forgotten by earlier requests.

    The teacher already maps them away, so copying it keeps them forgotten explicitly
    instead of relying on them never drifting back.
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


class ESD(nn.Module):
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

    def forward(self, student, teacher, z0, forget_embeds, empty_embeds) -> torch.Tensor:
        x_t, t = noised(self.noise_scheduler, z0, self.noise_scheduler.config.num_train_timesteps, self.draw)
        with torch.no_grad():
            unconditional = teacher(x_t, t, empty_embeds).float()
            conditional = teacher(x_t, t, forget_embeds).float()
            target = unconditional - self.eta * (conditional - unconditional)
        return F.mse_loss(student(x_t, t, forget_embeds).float(), target)


class ConceptAblation(nn.Module):
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

    def forward(self, student, teacher, z0, forget_embeds, anchor_embeds) -> torch.Tensor:
        x_t, t = noised(self.noise_scheduler, z0, self.noise_scheduler.config.num_train_timesteps, self.draw)
        return distill_loss(student, teacher, x_t, t, forget_embeds, anchor_embeds)


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
