"""The processes of a run: which rank this one is, and the few collectives the loop needs.

Processes are always created by an external launcher, `torchrun` or `srun` (see `launch/`),
never by Lightning: its own launcher would start each extra process by re-running the
whole script, i.e. the whole loop of requests. The loop opens the process group once, before
its first request (Lightning's strategies find it open and reuse it), so the work outside
`Trainer.fit` can be shared too: the evaluation after each request, the waits while rank 0
writes. Only rank 0 writes files; the other ranks wait at a barrier and read what it wrote.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment, TorchElasticEnvironment


def cluster_environment() -> ClusterEnvironment | None:
    """The external launcher this process runs under, in Lightning's order of priority; None alone."""
    for environment in (TorchElasticEnvironment, SLURMEnvironment):
        if environment.detect():
            return environment()
    return None


def processes_per_node() -> int:
    """How many processes the launcher started on each node (1 without a launcher)."""
    if TorchElasticEnvironment.detect():
        return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    if SLURMEnvironment.detect():
        return int(os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])  # "4(x2)" on some clusters
    return 1


def node_count() -> int:
    if TorchElasticEnvironment.detect():
        return int(os.environ["WORLD_SIZE"]) // processes_per_node()
    if SLURMEnvironment.detect():
        return int(os.environ.get("SLURM_NNODES", "1"))
    return 1


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls, accelerator: str = "auto") -> "Ranks":
        """This process's place in the run; opens the process group when there are several."""
        environment = cluster_environment()
        if environment is None or environment.world_size() == 1:
            return cls()
        ranks = cls(environment.global_rank(), environment.world_size(), environment.local_rank())
        if not dist.is_initialized():
            on_gpu = accelerator != "cpu" and torch.cuda.is_available()
            if on_gpu:
                torch.cuda.set_device(ranks.local_rank)
            os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = environment.main_address, str(environment.main_port)
            dist.init_process_group("nccl" if on_gpu else "gloo", rank=ranks.rank, world_size=ranks.world)
        return ranks

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def broadcast(self, value):
        """Rank 0's `value`, on every rank."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value) -> list | None:
        """Every rank's `value` in rank order on rank 0; None on the others."""
        if self.world == 1:
            return [value]
        out = [None] * self.world if self.is_main else None
        dist.gather_object(value, out, dst=0)
        return out


def current_ranks() -> Ranks:
    """The ranks of an open process group (inside or after `Trainer.fit`), or a single process."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return Ranks()
