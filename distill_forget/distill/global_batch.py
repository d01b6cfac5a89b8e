"""The randomness of a micro-batch, drawn for the global batch and sliced per rank.

`step.batch` is the global batch: with N processes each takes batch / N samples. Every rank
draws the whole batch's random choices (which bank latents, which noise, which timesteps)
from the same seeded CPU generator, in the same order, and keeps its own slice. The ranks
together then see exactly the samples of the single-process run with the same seed, so the
gradient DDP averages over ranks is the single-process gradient: the number of processes
changes the speed, not the result.
"""

import torch


class GlobalBatch:
    def __init__(self, seed: int, rank: int = 0, world: int = 1):
        self.generator = torch.Generator().manual_seed(seed)
        self.rank, self.world = rank, world

    def local_size(self, global_size: int, what: str = "step.batch") -> int:
        """This rank's share of `global_size` samples; the global batch must split evenly."""
        if global_size % self.world:
            raise ValueError(
                f"{what}={global_size} is the global batch and must split evenly over the {self.world} processes"
            )
        return global_size // self.world

    def _mine(self, drawn: torch.Tensor, device) -> torch.Tensor:
        n = drawn.shape[0] // self.world
        return drawn[self.rank * n : (self.rank + 1) * n].to(device)

    def randint(self, high: int, n: int, device=None) -> torch.Tensor:
        """This rank's `n` of `n * world` integers drawn uniformly from [0, high)."""
        return self._mine(torch.randint(0, high, (n * self.world,), generator=self.generator), device)

    def randn(self, n: int, shape, device=None) -> torch.Tensor:
        """This rank's `n` of `n * world` standard normal samples of `shape`."""
        return self._mine(torch.randn((n * self.world, *shape), generator=self.generator), device)

    def share(self, total: int) -> range:
        """This rank's rows of `total` rows of work split in near-equal contiguous shares."""
        per = -(-total // self.world)
        return range(min(self.rank * per, total), min((self.rank + 1) * per, total))

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
