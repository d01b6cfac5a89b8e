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
import torch.distributed as dist
from diffusers import DDIMScheduler

from distill_forget.distill.global_batch import GlobalBatch
from distill_forget.distill.networks import Condition, Denoiser


class TeacherSampler:
    """DDIM sampling with the teacher, batched, no gradients.

    `guidance` 1: the teacher's plain conditional trajectories (one evaluation per step). Above
    1: classifier-free guidance with the `empty` prompt's condition, the trajectories a deployed
    sampler follows, for twice the evaluations.
    """

    def __init__(self, teacher: Denoiser, scheduler_config, steps: int, chunk: int, guidance: float = 1.0, empty=None):
        if guidance != 1.0 and empty is None:
            raise ValueError("TeacherSampler: guidance other than 1 needs the empty prompt's condition")
        self.teacher, self.steps, self.chunk, self.guidance, self.empty = teacher, steps, chunk, guidance, empty
        self.scheduler = DDIMScheduler.from_config(scheduler_config)
        self.evaluations = 0  # the share of the teacher's evaluations spent on sampling

    def predict(self, x: torch.Tensor, t: torch.Tensor, condition: Condition) -> torch.Tensor:
        """The teacher's (guided) prediction for one DDIM step."""
        t = t.expand(x.shape[0])
        if self.guidance == 1.0:
            return self.teacher(x, t, condition)
        empty = self.empty.to(condition.device)[[0] * len(x)]
        unconditional, conditional = self.teacher(
            torch.cat([x, x]), torch.cat([t, t]), Condition.cat([empty, condition])
        ).chunk(2)
        return unconditional + self.guidance * (conditional - unconditional)

    def sample(self, condition: Condition, generator: torch.Generator) -> torch.Tensor:
        """One z0 per row of `condition`; the starting noise comes from `generator` (CPU)."""
        return self.denoise(condition, torch.randn((len(condition), *self.teacher.latent_shape), generator=generator))

    @torch.no_grad()
    def denoise(self, condition: Condition, noise: torch.Tensor) -> torch.Tensor:
        """One z0 per row of `condition`, from the given starting noise (one row each)."""
        device = condition.device
        latents = noise.to(device) * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(self.steps, device=device)
        out = []
        for start in range(0, len(latents), self.chunk):
            x = latents[start : start + self.chunk]
            embeds = condition[start : start + self.chunk]
            for t in self.scheduler.timesteps:
                eps = self.predict(self.scheduler.scale_model_input(x, t), t, embeds)
                x = self.scheduler.step(eps, t, x, eta=0.0).prev_sample
            self.evaluations += x.shape[0] * len(self.scheduler.timesteps) * (1 if self.guidance == 1.0 else 2)
            out.append(x.float())
        return torch.cat(out) if out else latents.float()  # a rank's share may be empty


class ReplayBank:
    """`size` teacher latents per prompt group, sampled once and reused every optimizer step.

    With several processes each samples its share of the bank and the shares are gathered, so
    every rank holds the same whole bank (the single-process one) for the cost of 1 / N of it.
    """

    def __init__(self, sampler: TeacherSampler, embeds: dict[str, Condition], size: int, seed: int, draw: GlobalBatch):
        self.sampler, self.embeds, self.size, self.draw = sampler, embeds, size, draw
        self.generator = torch.Generator().manual_seed(seed)  # the bank's own stream: the same bank after a resume
        self.prompt_index: dict[str, torch.Tensor] = {}
        self.latents: dict[str, torch.Tensor] = {}

    def prepare(self) -> None:
        mine = self.draw.share(self.size)
        rows = slice(mine.start, mine.stop)
        for group, embeds in self.embeds.items():
            # Every prompt of the group gets a turn before any gets a second one.
            order = torch.randperm(len(embeds), generator=self.generator)
            index = order.repeat(-(-self.size // len(embeds)))[: self.size].to(embeds.device)
            noise = torch.randn((self.size, *self.sampler.teacher.latent_shape), generator=self.generator)
            self.prompt_index[group] = index
            self.latents[group] = self._gather(self.sampler.denoise(embeds[index[rows]], noise[rows]))

    def _gather(self, share: torch.Tensor) -> torch.Tensor:
        """Every rank's share, in rank order (padded to one size for all_gather, then trimmed)."""
        if self.draw.world == 1:
            return share
        per = -(-self.size // self.draw.world)
        padded = torch.zeros((per, *share.shape[1:]), dtype=share.dtype, device=share.device)
        padded[: len(share)] = share
        shares = [torch.empty_like(padded) for _ in range(self.draw.world)]
        dist.all_gather(shares, padded)
        return torch.cat(shares)[: self.size]

    def batch(self, group: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        pick = self.draw.randint(self.size, n, self.latents[group].device)
        return self.prompt_index[group][pick], self.latents[group][pick]


class PerStepReplay:
    """The published protocol: fresh teacher samples for every micro-batch."""

    def __init__(self, sampler: TeacherSampler, embeds: dict[str, Condition], draw: GlobalBatch):
        self.sampler, self.embeds, self.draw = sampler, embeds, draw

    def prepare(self) -> None:
        pass

    def batch(self, group: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        embeds = self.embeds[group]
        index = self.draw.randint(len(embeds), n, embeds.device)
        return index, self.sampler.denoise(embeds[index], self.draw.randn(n, self.sampler.teacher.latent_shape))


def make_replay(replay_cfg, sampler: TeacherSampler, embeds: dict[str, Condition], seed: int, draw: GlobalBatch):
    """The replay source named by `replay.mode` (bank | per_step); `draw` picks every micro-batch."""
    if replay_cfg.mode == "bank":
        return ReplayBank(sampler, embeds, replay_cfg.bank_size, seed, draw)
    if replay_cfg.mode == "per_step":
        return PerStepReplay(sampler, embeds, draw)
    raise ValueError(f"replay.mode must be 'bank' or 'per_step' (got {replay_cfg.mode!r})")
