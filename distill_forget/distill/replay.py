"""Generative replay: teacher latents z0 for the step's prompt groups.

Two sources with one interface, `batch(group, n) -> (prompt indices, z0)`, so the training
module does not care which it gets (config `replay.mode`):

- `ReplayBank` (bank): `bank_size` teacher samples per group, generated once at the start of
  the request and reused at every optimizer step with fresh noise and timesteps. Teacher
  sampling is most of the published method's cost; the bank pays it once.
- `PerStepReplay` (per_step): the published protocol, fresh teacher samples for every
  micro-batch; kept so the two can be compared.
"""

import torch
from diffusers import DDIMScheduler

from distill_forget.distill.networks import Denoiser


class TeacherSampler:
    """DDIM sampling with the teacher: no classifier-free guidance, batched, no gradients."""

    def __init__(self, teacher: Denoiser, scheduler_config, steps: int, chunk: int):
        self.teacher, self.steps, self.chunk = teacher, steps, chunk
        self.scheduler = DDIMScheduler.from_config(scheduler_config)
        self.evaluations = 0  # the share of the teacher's evaluations spent on sampling

    @torch.no_grad()
    def sample(self, text_embeds: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One z0 per row of `text_embeds`; the starting noise comes from `generator` (CPU)."""
        device = text_embeds.device
        shape = (text_embeds.shape[0], *self.teacher.latent_shape)
        latents = torch.randn(shape, generator=generator).to(device) * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(self.steps, device=device)
        out = []
        for start in range(0, shape[0], self.chunk):
            x = latents[start : start + self.chunk]
            embeds = text_embeds[start : start + self.chunk]
            for t in self.scheduler.timesteps:
                eps = self.teacher(self.scheduler.scale_model_input(x, t), t.expand(x.shape[0]), embeds)
                x = self.scheduler.step(eps, t, x, eta=0.0).prev_sample
            self.evaluations += x.shape[0] * len(self.scheduler.timesteps)
            out.append(x.float())
        return torch.cat(out)


class ReplayBank:
    """`size` teacher latents per prompt group, sampled once and reused every optimizer step."""

    def __init__(self, sampler: TeacherSampler, embeds: dict[str, torch.Tensor], size: int, seed: int):
        self.sampler, self.embeds, self.size = sampler, embeds, size
        self.generator = torch.Generator().manual_seed(seed)
        self.prompt_index: dict[str, torch.Tensor] = {}
        self.latents: dict[str, torch.Tensor] = {}

    def prepare(self) -> None:
        for group, embeds in self.embeds.items():
            # Every prompt of the group gets a turn before any gets a second one.
            order = torch.randperm(len(embeds), generator=self.generator)
            index = order.repeat(-(-self.size // len(embeds)))[: self.size].to(embeds.device)
            self.prompt_index[group] = index
            self.latents[group] = self.sampler.sample(embeds[index], self.generator)

    def batch(self, group: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        pick = torch.randint(0, self.size, (n,), generator=self.generator).to(self.latents[group].device)
        return self.prompt_index[group][pick], self.latents[group][pick]


class PerStepReplay:
    """The published protocol: fresh teacher samples for every micro-batch."""

    def __init__(self, sampler: TeacherSampler, embeds: dict[str, torch.Tensor], seed: int):
        self.sampler, self.embeds = sampler, embeds
        self.generator = torch.Generator().manual_seed(seed)

    def prepare(self) -> None:
        pass

    def batch(self, group: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        embeds = self.embeds[group]
        index = torch.randint(0, len(embeds), (n,), generator=self.generator).to(embeds.device)
        return index, self.sampler.sample(embeds[index], self.generator)


def make_replay(replay_cfg, sampler: TeacherSampler, embeds: dict[str, torch.Tensor], seed: int):
    """The replay source named by `replay.mode` (bank | per_step)."""
    if replay_cfg.mode == "bank":
        return ReplayBank(sampler, embeds, replay_cfg.bank_size, seed)
    if replay_cfg.mode == "per_step":
        return PerStepReplay(sampler, embeds, seed)
    raise ValueError(f"replay.mode must be 'bank' or 'per_step' (got {replay_cfg.mode!r})")
