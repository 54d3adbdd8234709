"""Score with many processes: every rank holds a model replica and computes a share of each batch of coalitions.

Scoring is embarrassingly parallel across coalitions. The estimators here are deterministic
given their seed and the values they have seen, so every rank runs the same estimator in lockstep
and only the evaluations are split. For each batch of masks the estimator asks for, rank 0 decides
which values are still unknown (not in memory and not in the shared on-disk store) and broadcasts
that list. Rank r computes the masks at positions r, r + world, ... and appends each value to the
store as soon as it has it, so a killed job loses at most one evaluation per rank. Then
``all_gather_object`` gives every rank every new value, and all ranks continue with the same state.
Rank 0 alone reports and prints.

The process group is torch.distributed's, started by ``torchrun`` / ``python -m
torch.distributed.run`` or by ``accelerate launch --multi_gpu`` (both set RANK, WORLD_SIZE and MASTER_ADDR;
``accelerate launch --cpu`` without MPI starts one process):
gloo on CPUs, NCCL on GPUs (rank r takes ``cuda:LOCAL_RANK``). ``cornerstone score --num-processes N``
runs ``torch.distributed.run`` for you on one machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Ranks:
    """This process's place in a multi-process job."""

    rank: int
    world: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0

    def owns(self, index: int) -> bool:
        """Whether the ``index``-th unknown coalition of a batch is this rank's to compute (round robin)."""
        return index % self.world == self.rank

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        import torch.distributed as dist

        holder = [value if self.main else None]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, value)
        return gathered


def from_environment() -> Ranks | None:
    """The ranks of a job started by torchrun or ``accelerate launch`` (WORLD_SIZE > 1), else None.

    Starts torch.distributed's process group on first use: NCCL when this rank has a GPU, else gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        gpu = torch.cuda.is_available()
        if gpu:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if gpu else "gloo")
    return Ranks(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank)


def rank_device(ranks: Ranks | None, device: str | None) -> str | None:
    """The device of this rank: ``cuda:LOCAL_RANK`` when the job runs on GPUs, else what was asked."""
    import torch

    if ranks is not None and (device is None or device == "cuda") and torch.cuda.is_available():
        return f"cuda:{ranks.local_rank}"
    return device


def launch_command(num_processes: int, argv: Sequence[str]) -> list[str]:
    """The torch.distributed.run command that runs ``cornerstone ARGV`` in ``num_processes`` processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={num_processes}",
            "-m", "cornerstone", *argv]


def launch(num_processes: int, argv: Sequence[str]) -> int:
    """Run ``cornerstone ARGV`` in ``num_processes`` processes on this machine; return the job's exit code.

    Each process gets an equal share of the CPU threads (unless OMP_NUM_THREADS is set), so N
    processes on C cores do not oversubscribe them.
    """
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_processes)))
    return subprocess.call(launch_command(num_processes, argv), env=env)
