"""Lightning callbacks: the side work of a training run (progress, logging, checkpoints on signal)."""

from callbacks.progress import PlainProgress
from callbacks.step_checkpoint import StepCheckpoint
from callbacks.wandb_report import WandbReport

__all__ = ["PlainProgress", "StepCheckpoint", "WandbReport"]
