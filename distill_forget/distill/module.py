"""The Lightning module of a step: the student UNet learns from the frozen teacher.

Only the student UNet is registered (trained, checkpointed, moved by Lightning). The teacher
and the text encoder sit in plain attributes (`Denoiser`, `PromptEncoder`), so they are in
neither the optimizer nor any checkpoint; the module moves them to its device itself.
"""

import time

import lightning as L
import torch
from diffusers import DDPMScheduler

from distill_forget.distill.networks import Denoiser, PromptEncoder
from distill_forget.distill.objectives import (
    ForgetMapping,
    ForgottenReplay,
    NeighborPreservation,
    ParameterAnchor,
    RetainReplay,
)
from distill_forget.distill.prompts import PromptGroups
from distill_forget.distill.replay import TeacherSampler, make_replay

TRAINABLE = {
    "full": lambda name: True,
    "cross_attention": lambda name: ".attn2." in name,
    "cross_attention_kv": lambda name: ".attn2.to_k." in name or ".attn2.to_v." in name,
}


def select_trainable(unet: torch.nn.Module, mode: str) -> list[str]:
    """Leave only the parameter group `mode` trainable; returns the names of its parameters."""
    if mode not in TRAINABLE:
        raise ValueError(f"trainable must be one of {list(TRAINABLE)} (got {mode!r})")
    chosen = []
    for name, param in unet.named_parameters():
        param.requires_grad_(TRAINABLE[mode](name))
        if param.requires_grad:
            chosen.append(name)
    if not chosen:
        raise ValueError(f"trainable={mode!r} selects no parameter of this UNet")
    return chosen


class DistillForgetModule(L.LightningModule):
    def __init__(
        self, student_unet, teacher: Denoiser, encoder: PromptEncoder, groups: PromptGroups, cfg, scheduler_config
    ):
        super().__init__()
        self.unet = student_unet
        self.trainable_names = select_trainable(self.unet, cfg.trainable)
        self.student = Denoiser(self.unet)
        self.teacher = teacher
        self.teacher.unet.requires_grad_(False).eval()
        self.encoder = encoder
        self.groups, self.cfg, self.scheduler_config = groups, cfg, scheduler_config
        noise_scheduler = DDPMScheduler.from_config(scheduler_config)
        # The losses hold no weights of their own; a zero lambda skips a loss and its network calls.
        self.objectives = torch.nn.ModuleDict(
            {
                "forget": ForgetMapping(noise_scheduler, cfg.t_max),
                "retain": RetainReplay(noise_scheduler),
                "neighbor": NeighborPreservation(noise_scheduler),
                "forgotten": ForgottenReplay(noise_scheduler),
                "reg": ParameterAnchor(),
            }
        )
        self.weights = {
            "forget": cfg.lambda_f,
            "retain": cfg.lambda_r,
            "neighbor": cfg.lambda_n,
            "forgotten": cfg.lambda_forgotten,
            "reg": cfg.lambda_reg,
        }
        self.embeds: dict[str, torch.Tensor] = {}
        self.sampler, self.replay, self.replay_seconds = None, None, 0.0
        self.last_losses: dict[str, float] = {}

    def setup(self, stage: str = "fit") -> None:
        # Every prompt of the step is encoded once here, never per batch.
        if not self.embeds:
            groups = self.groups.as_dict()
            self.embeds = {name: self.encoder(prompts).cpu() for name, prompts in groups.items() if prompts}

    def on_fit_start(self) -> None:
        self.teacher.unet.to(self.device)
        self.embeds = {name: e.to(self.device) for name, e in self.embeds.items()}
        cfg = self.cfg
        batch = cfg.replay.sampling_batch
        self.sampler = TeacherSampler(self.teacher, self.scheduler_config, cfg.sampling_steps, batch)
        sampled = {name: e for name, e in self.embeds.items() if name != "mapped"}
        self.replay = make_replay(cfg.replay, self.sampler, sampled, cfg.seed)
        started = time.time()
        if cfg.replay.mode == "bank":
            print(
                f"[step] sampling the replay bank: {cfg.replay.bank_size} teacher latents x {len(sampled)} groups "
                f"({', '.join(sampled)}), {cfg.sampling_steps} DDIM steps",
                flush=True,
            )
        self.replay.prepare()
        self.replay_seconds = time.time() - started

    def losses(self) -> dict[str, torch.Tensor]:
        """Each weighted objective on one micro-batch from the replay source."""
        batch, losses = self.cfg.batch, {}
        if self.weights["forget"]:
            index, z0 = self.replay.batch("forget", batch)
            losses["forget"] = self.objectives["forget"](
                self.student, self.teacher, z0, self.embeds["forget"][index], self.embeds["mapped"][index]
            )
        for group in ("retain", "neighbor", "forgotten"):
            if self.weights[group] and group in self.embeds:
                index, z0 = self.replay.batch(group, batch)
                losses[group] = self.objectives[group](self.student, self.teacher, z0, self.embeds[group][index])
        if self.weights["reg"]:
            losses["reg"] = self.objectives["reg"](self.unet, self.teacher.unet)
        return losses

    def training_step(self, batch, batch_idx):
        losses = self.losses()
        total = sum(self.weights[name] * loss for name, loss in losses.items())
        for name, loss in losses.items():
            self.log(f"loss/{name}", loss, prog_bar=name != "reg")
        self.log("loss/total", total)
        self.last_losses = {name: float(loss) for name, loss in {**losses, "total": total}.items()}
        return total

    def configure_optimizers(self):
        params = [p for p in self.unet.parameters() if p.requires_grad]
        adamw = self.cfg.adamw
        optimizer = torch.optim.AdamW(
            params, lr=self.cfg.lr, betas=tuple(adamw.betas), weight_decay=adamw.weight_decay, eps=adamw.eps
        )
        warmup = max(1, self.cfg.warmup)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
