"""The losses of a distillation step (METHODS.md), one class each; the weights live in the config.

Every distillation loss is `mean || eps(S, x_t, t, c_S) - sg eps(T, x_t, t, c_T) ||^2` on a
teacher latent `z0` noised to `x_t`; they differ in the prompts and the timestep range. The
outputs are matched directly, so the losses hold for any `prediction_type`.
"""

import torch
import torch.nn.functional as F
from torch import nn

from distill_forget.distill.networks import Denoiser


def distill_loss(student: Denoiser, teacher: Denoiser, x_t, t, student_embeds, teacher_embeds) -> torch.Tensor:
    """The one formula: mean squared difference of student and stop-gradient teacher outputs."""
    with torch.no_grad():
        target = teacher(x_t, t, teacher_embeds)
    return F.mse_loss(student(x_t, t, student_embeds).float(), target.float())


def noised(noise_scheduler, z0: torch.Tensor, t_high: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`add_noise(z0, n, t)` with fresh noise n and t ~ U{0, ..., t_high - 1}."""
    t = torch.randint(0, t_high, (z0.shape[0],), device=z0.device)
    return noise_scheduler.add_noise(z0, torch.randn_like(z0), t), t


class ForgetMapping(nn.Module):
    """L_forget: on latents where the teacher draws the concept, steer as it does toward the target.

    `eps(S, x_t, t, p_f)` is pulled to `sg eps(T, x_t, t, p_m)`, `p_m` the forget prompt `p_f`
    with the concept replaced; `t ~ U[0, t_max]` (published: t_max 600-700 of 1000).
    """

    def __init__(self, noise_scheduler, t_max: int):
        super().__init__()
        self.noise_scheduler, self.t_max = noise_scheduler, t_max

    def forward(self, student, teacher, z0, forget_embeds, mapped_embeds) -> torch.Tensor:
        x_t, t = noised(self.noise_scheduler, z0, self.t_max + 1)
        return distill_loss(student, teacher, x_t, t, forget_embeds, mapped_embeds)


class RetainReplay(nn.Module):
    """L_retain: the student copies the teacher on teacher latents of prompts that must survive."""

    def __init__(self, noise_scheduler):
        super().__init__()
        self.noise_scheduler = noise_scheduler

    def forward(self, student, teacher, z0, embeds) -> torch.Tensor:
        x_t, t = noised(self.noise_scheduler, z0, self.noise_scheduler.config.num_train_timesteps)
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


class ParameterAnchor(nn.Module):
    """L_reg = sum over trainable parameters of (theta - theta_prev)^2 (a sum, not a mean).

    `theta_prev` is read from the reference network (the teacher is exactly M_{i-1}), so no
    copy of the weights is kept.
    """

    def forward(self, student: nn.Module, reference: nn.Module) -> torch.Tensor:
        previous = dict(reference.named_parameters())
        trainable = [(name, p) for name, p in student.named_parameters() if p.requires_grad]
        terms = [(p.float() - previous[name].float()).pow(2).sum() for name, p in trainable]
        if not terms:
            raise ValueError("ParameterAnchor: the student has no trainable parameters")
        return torch.stack(terms).sum()
