"""Lightning callbacks: the side work of a training run (progress, logging, checkpoints on signal)."""

from callbacks.progress import PlainProgress

__all__ = ["PlainProgress"]
