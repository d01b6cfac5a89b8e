"""Lightning checkpoints of one request's training, for resuming a killed or requeued run."""

from lightning.pytorch.callbacks import ModelCheckpoint


class StepCheckpoint(ModelCheckpoint):
    """`last.ckpt` in `dirpath` every `every` optimizer steps, except after the final one.

    When the fit ends, the student's pipeline folder is saved at once and is the step's durable
    output; a checkpoint there (student and AdamW states: ~10 GB for SD v1.5's UNet, ~31 GB for
    SDXL's) would be written only to be deleted. A run killed between the two resumes from the
    checkpoint before.
    """

    def __init__(self, dirpath, every: int):
        super().__init__(
            dirpath=dirpath, every_n_train_steps=every, save_last=True, save_top_k=0, save_on_train_epoch_end=False
        )

    def on_train_batch_end(self, trainer, *args, **kwargs) -> None:
        if trainer.global_step < trainer.max_steps:
            super().on_train_batch_end(trainer, *args, **kwargs)

    def on_train_end(self, trainer, pl_module) -> None:
        pass  # ModelCheckpoint would save `last.ckpt` here when no step saved one
