"""Benchmark: one Shapley run in 1 process and in N processes on this machine, side by side (issue 22).

    python bench/processes.py [--model smollm2-135m] [--tasks cs_real_piqa] [--limit 50] [--budget 96]
                              [--processes 2] [--json FILE]

Runs ``cornerstone score --method shapley`` (block players, kernel estimator, fixed ``--seed``, no value
store, so nothing is read back) once per process count, in turns, through the CLI a user runs. With
several processes each rank computes whole branches of the mask trie (``schedule.shares``) on an equal
share of the CPU threads (``distributed.launch`` sets ``OMP_NUM_THREADS``). It prints each run's wall time,
the speed-up of N processes over 1, and whether the two reports hold the same values (they must: the
estimator is deterministic given its seed and the values it sees). Machine and threads are printed with
the numbers; nothing here is a timed test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cornerstone.provenance import machine


def run(args: argparse.Namespace, processes: int, out: Path) -> float:
    command = [sys.executable, "-m", "cornerstone", "score", args.model, "--method", "shapley", "--granularity", "block",
               "--tasks", args.tasks, "--limit", str(args.limit), "--budget", str(args.budget), "--seed", "0",
               "--dtype", args.dtype, "--no-store", "--force", "--num-processes", str(processes), "--out", str(out),
               "--json"]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default="cs_real_piqa")
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--budget", type=int, default=96)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--json", dest="json_out", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        reports = {n: Path(folder) / f"p{n}.json" for n in (1, args.processes)}
        seconds = {n: run(args, n, reports[n]) for n in (1, args.processes)}
        values = {n: {name: p["importance"] for name, p in json.loads(reports[n].read_text())["players"].items()}
                  for n in reports}
        evaluations = {n: json.loads(reports[n].read_text()).get("evaluations") for n in reports}
    same = all(abs(values[1][k] - values[args.processes][k]) <= 1e-9 for k in values[1])
    result = {"machine": machine(), "args": vars(args), "seconds": seconds,
              "speedup": seconds[1] / seconds[args.processes], "same_values": same, "evaluations": evaluations}
    print(f"{machine().get('cpu')} ({machine().get('torch_threads')} threads): 1 process {seconds[1]:.1f} s, "
          f"{args.processes} processes {seconds[args.processes]:.1f} s: {result['speedup']:.2f}x; same values: {same}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
