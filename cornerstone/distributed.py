"""Score with many processes: every rank holds a model replica and computes a share of each batch of coalitions.

Scoring is embarrassingly parallel across coalitions. The estimators here are deterministic
given their seed and the values they have seen, so every rank runs the same estimator in lockstep
and only the evaluations are split. For each batch of masks the estimator asks for, rank 0 decides
which values are still unknown (not in memory and not in the shared on-disk store) and broadcasts
that list. Rank r computes the r-th of ``world`` consecutive runs of the trie walk
(:func:`cornerstone.schedule.shares`: whole branches, equal blocks computed) and appends each value to the
store as soon as it has it, so a killed job loses at most one evaluation per rank. Then
``all_gather_object`` gives every rank every new value, and all ranks continue with the same state.
Rank 0 alone reports and prints.

The process group is torch.distributed's, started by ``torchrun`` / ``python -m
torch.distributed.run`` or by ``accelerate launch --multi_gpu`` (both set RANK, WORLD_SIZE and MASTER_ADDR;
``accelerate launch --cpu`` without MPI starts one process):
gloo on CPUs, NCCL on GPUs (rank r takes ``cuda:LOCAL_RANK``). ``cornerstone score --num-processes N``
starts the N ranks itself on one machine (:func:`launch`), as ``torchrun --standalone`` would, so that a
failure is reported once, by the launcher, with the failing rank's own exit code.
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


ERROR_FILE = "CORNERSTONE_ERROR_FILE"


def launch_command(num_processes: int, argv: Sequence[str]) -> list[str]:
    """The torch.distributed.run command that runs ``cornerstone ARGV`` in ``num_processes`` processes (the
    equivalent of what :func:`launch` does, for running the job by hand or on several machines)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={num_processes}",
            "-m", "cornerstone", *argv]


def launch(num_processes: int, argv: Sequence[str]) -> int:
    """Run ``cornerstone ARGV`` in ``num_processes`` processes on this machine; return 0 or raise the error of
    the rank that failed first.

    This process holds the rendezvous store (a TCPStore on a port the system picks, so two jobs cannot race
    for one) and starts each rank with the variables torchrun sets. A rank that fails writes its error to
    the file named by ``$CORNERSTONE_ERROR_FILE`` instead of printing it; the launcher then stops the other
    ranks and raises that error, so it is printed once, with its own exit code (torchrun would print every
    rank's error and its own traceback, and exit 1). Each process gets an equal share of the CPU threads
    (unless OMP_NUM_THREADS is set), so N processes on C cores do not oversubscribe them.
    """
    import tempfile

    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, num_processes, is_master=True, wait_for_workers=False)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_processes)))
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port), WORLD_SIZE=str(num_processes),
               LOCAL_WORLD_SIZE=str(num_processes), GROUP_RANK="0", TORCHELASTIC_USE_AGENT_STORE="True")
    with tempfile.TemporaryDirectory(prefix="cornerstone-ranks-") as errors:
        ranks = [subprocess.Popen([sys.executable, "-m", "cornerstone", *argv],
                                  env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank),
                                       ERROR_FILE: os.path.join(errors, f"rank-{rank}.json")})
                 for rank in range(num_processes)]
        try:
            failed = _first_failure(ranks)
        finally:
            _stop(ranks)
        if failed is None:
            return 0
        raise _rank_error(failed, num_processes, ranks[failed].returncode, os.path.join(errors, f"rank-{failed}.json"))


def _first_failure(ranks: list[subprocess.Popen]) -> int | None:
    """Wait until every rank succeeded (None) or one failed (the lowest failed rank at that moment)."""
    import time

    while True:
        codes = [process.poll() for process in ranks]
        failed = [rank for rank, code in enumerate(codes) if code not in (None, 0)]
        if failed:
            return failed[0]
        if all(code == 0 for code in codes):
            return None
        time.sleep(0.05)


def _stop(ranks: list[subprocess.Popen]) -> None:
    """SIGTERM the ranks still running (they clean up as after Ctrl-C), SIGKILL any that do not stop in 30 s."""
    for process in ranks:
        if process.poll() is None:
            process.terminate()
    for process in ranks:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _rank_error(rank: int, world: int, code: int, path: str) -> Exception:
    """The error rank ``rank`` wrote to ``path``, as the exception it was; a rank that died without writing
    one (killed, out of memory) is described by its exit code."""
    import json

    from . import errors

    try:
        with open(path, encoding="utf-8") as handle:
            written = json.load(handle)
    except (OSError, ValueError):
        written = None
    if isinstance(written, dict) and written.get("interrupted"):
        return KeyboardInterrupt()
    if isinstance(written, dict) and isinstance(written.get("message"), str):
        kind = getattr(errors, str(written.get("type")), None)
        error = (kind if isinstance(kind, type) and issubclass(kind, errors.CornerstoneError) else errors.CornerstoneError)(
            written["message"], hint=written.get("hint") or "")
        error.exit_code = int(written.get("exit_code", code))
        return error
    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
    error = errors.CornerstoneError(f"process {rank} of {world} {how} without reporting an error",
                                    hint="Run with --num-processes 1 (or --debug) to see what failed; a killed "
                                         "process is often out of memory.")
    error.exit_code = 128 - code if code < 0 else code
    return error
