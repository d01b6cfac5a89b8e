"""A step's teacher and student side by side, read at latents the teacher samples for given prompts
(classifier-free guided, as the evaluation samples) noised to chosen timesteps: the common setup
of the commands that look inside a step's change (prediction_drift, forget_transfer)."""

import torch

from distill_forget.distill.networks import Denoiser, prompt_encoder
from distill_forget.distill.replay import TeacherSampler
from distill_forget.pipelines import load_pipeline
from distill_forget.world.model import training_scheduler

SAMPLING_BATCH = 64  # prompts per teacher call while sampling


class StepProbe:
    def __init__(self, teacher_dir, student_dir, sampling_steps: int, guidance: float):
        teacher_pipe, student_pipe = load_pipeline(teacher_dir), load_pipeline(student_dir)
        self.teacher_pipe, self.student_pipe = teacher_pipe, student_pipe  # for what else reads their weights
        self.encode = prompt_encoder(teacher_pipe)
        self.teacher, self.student = Denoiser(teacher_pipe.unet), Denoiser(student_pipe.unet)
        self.sampler = TeacherSampler(
            self.teacher, teacher_pipe.scheduler.config, sampling_steps, SAMPLING_BATCH, guidance, self.encode([""])
        )
        self.noise_scheduler = training_scheduler()

    def sample(self, condition: torch.Tensor, seed: int) -> torch.Tensor:
        """The teacher's final latents for each prompt's text states."""
        return self.sampler.sample(condition, torch.Generator().manual_seed(seed))

    def noised(self, z0: torch.Tensor, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, the batch of t): z0 noised to timestep t, the noise drawn from seed + 1 + t."""
        t_batch = torch.full((len(z0),), int(t))
        noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed + 1 + int(t)))
        return self.noise_scheduler.add_noise(z0, noise, t_batch), t_batch
