"""Benchmark: what a greedy block plan costs, full greedy against lazy greedy and a fixed shortlist (issue 22).

    python bench/greedy_cost.py [--model smollm2-135m] [--task cs_real_piqa] [--docs 100] [--drop 8]
                                [--objective probability] [--dtype bfloat16]

One block report is made on the task (single-block ablation, the report every search starts from),
then three searches to ``--drop`` blocks run side by side on the same documents, each with a fresh
value function (no value shared between them, and no on-disk store). With ``--reuse-report`` each
search starts from a copy of the report's value store instead, as ``cornerstone plan`` after
``cornerstone score`` does: the report's single-block values are greedy's first step, so that step
costs nothing, and the evaluations counted are the ones the search computes:

- ``full``: greedy re-measuring every remaining candidate at every step (SLEB's search);
- ``lazy``: greedy with ``lazy`` (planner.py: candidates best bound first, ``--chunk`` at a time; a step
  stops once the best measured reaches every unmeasured candidate's bound);
- ``shortlist``: greedy re-measuring only the ``--shortlist`` candidates that hurt least at the
  previous step.

It prints each search's evaluations, seconds and removal order, the step where each first differs
from full greedy's order, and the ratio of evaluations to full greedy's. Machine and threads are
printed with the numbers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from cornerstone import harness
from cornerstone.estimators import Ablation
from cornerstone.loading import load_model
from cornerstone.planner import Planner, make_plan
from cornerstone.provenance import machine
from cornerstone.scores import score
from cornerstone.value import ValueFunction


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="cs_real_piqa")
    parser.add_argument("--docs", type=int, default=100)
    parser.add_argument("--drop", type=int, default=8)
    parser.add_argument("--objective", default="probability", choices=list(harness.OBJECTIVES))
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--chunk", type=int, default=4, help="lazy: candidates measured at a time")
    parser.add_argument("--shortlist", type=int, default=3)
    parser.add_argument("--reuse-report", action="store_true", help="Each search reads the block report's values "
                        "from a copy of its value store (the first step is then free for all three).")
    parser.add_argument("--json", dest="json_out", default=None, help="Also write the numbers to this file.")
    args = parser.parse_args()

    loaded = load_model(args.model, dtype=args.dtype, device="cpu")
    specs = harness.load_tasks([args.task], limit=args.docs, seed=0, objective=args.objective)
    print(f"{args.model} ({args.dtype}), {args.task}: {len(specs[0].doc_indices)} docs, objective {args.objective}; "
          f"{machine()}, {torch.get_num_threads()} threads", flush=True)
    started = time.perf_counter()
    stores = Path(tempfile.mkdtemp(prefix="greedy-cost-"))
    report_store = stores / "report" if args.reuse_report else None
    report = score(loaded, specs, estimator=Ablation(granularity="block"), store=report_store or False)
    print(f"block report: {time.perf_counter() - started:.0f} s", flush=True)

    searches = {
        "full": Planner(policy="greedy", drop=args.drop),
        "lazy": Planner(policy="greedy", drop=args.drop, lazy=True, shortlist=args.chunk),
        "shortlist": Planner(policy="greedy", drop=args.drop, shortlist=args.shortlist),
    }
    results = {}
    for name, planner in searches.items():
        store = shutil.copytree(report_store, stores / name) if report_store else None
        value = ValueFunction(loaded, specs, store=store)
        started = time.perf_counter()
        plan = make_plan(report, planner, loaded=loaded, value=value)
        results[name] = {"evaluations": value.evaluations, "reused": value.reused, "seconds": time.perf_counter() - started,
                         "order": [step.name for step in plan.search],
                         "scores": [round(step.score_after, 5) for step in plan.search]}
        print(f"  {name:<10} {value.evaluations:4d} evaluations ({value.reused} read from the store), "
              f"{results[name]['seconds']:7.1f} s, "
              f"order {results[name]['order']}", flush=True)
    reference = results["full"]
    for name, result in results.items():
        if name == "full":
            continue
        differs = next((k + 1 for k, (a, b) in enumerate(zip(result["order"], reference["order"])) if a != b), None)
        result["evaluation_ratio"] = result["evaluations"] / reference["evaluations"]
        result["first_difference"] = differs
        same = "same order as full greedy" if differs is None else f"order differs from step {differs}"
        print(f"{name}: {result['evaluation_ratio']:.2f}x full greedy's evaluations, "
              f"{result['seconds'] / reference['seconds']:.2f}x its time; {same}; final score "
              f"{result['scores'][-1]} vs {reference['scores'][-1]}")
    shutil.rmtree(stores, ignore_errors=True)
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as handle:
            json.dump({"args": vars(args), "machine": machine(), "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
