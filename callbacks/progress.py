"""Progress as plain lines: readable in SLURM log files, where a live progress bar is noise."""

import time

from lightning.pytorch.callbacks import Callback


class PlainProgress(Callback):
    """Every `every` optimizer steps: `[name] step 40/200 loss/forget=0.0123 ... (2.1 steps/s, eta 1.3 min)`."""

    def __init__(self, name: str, every: int = 10):
        self.name, self.every = name, every
        self.started = None

    def on_train_start(self, trainer, pl_module):
        self.started, self.first_step = time.time(), trainer.global_step
        self.shown = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step, total = trainer.global_step, trainer.max_steps
        # with gradient accumulation several micro-batches end at one optimizer step: one line each step
        if not trainer.is_global_zero or step == self.shown or (step % self.every and step != total):
            return
        self.shown = step
        rate = (step - self.first_step) / max(time.time() - self.started, 1e-9)
        losses = " ".join(f"{k}={float(v):.4f}" for k, v in trainer.callback_metrics.items() if k.startswith("loss/"))
        eta = (total - step) / max(rate, 1e-9) / 60
        print(f"[{self.name}] step {step}/{total} {losses} ({rate:.2f} steps/s, eta {eta:.1f} min)", flush=True)
