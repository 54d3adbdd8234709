"""Benchmark: a full single-sublayer sweep of SmolLM2-135M with the fast engine vs lm-eval's loop per mask.

    python bench/engine_sweep.py [--docs 100] [--task arc_easy] [--skip-plain]

Runs, side by side in one process on the same documents of a real task from ../shared/data:
  1. the plain loop: lm-eval's own evaluation for each of the 61 masks (float32, the reference);
  2. the engine in float32;
  3. the engine in bfloat16;
and prints wall times, the speed-up ratios, the largest per-mask score difference from the reference,
tokens/s, the fraction of this CPU's measured matmul peak, the cornerstones each finds, and the
Spearman rank correlation of bf16 importances with float32 ones. Then it times one engine evaluation
at several document counts and model depths, to show how the cost grows.
"""

from __future__ import annotations

import argparse
import time

import torch

from cornerstone import harness
from cornerstone.estimators import Ablation, spearman
from cornerstone.loading import load_model
from cornerstone.players import enumerate_players
from cornerstone.scores import CornerstoneRule
from cornerstone.value import ValueFunction

def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - started)


def sweep(model_spec: str, dtype: str, specs, engine: str):
    loaded = load_model(model_spec, dtype=dtype, device="cpu")
    started = time.perf_counter()
    value = ValueFunction(loaded, specs, batch_size=32, engine=engine)  # type: ignore[arg-type]
    result = Ablation().estimate(value, enumerate_players(loaded.model))
    full, estimates = result.full, result.players
    seconds = time.perf_counter() - started
    # throughput of one whole-model forward (no prefix to reuse): the first evaluation of the sweep
    tokens = value._engine.tokens if value._engine is not None else None
    return loaded, value, full, estimates, seconds, (tokens, full.seconds) if tokens else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=100)
    parser.add_argument("--task", default="arc_easy", choices=["arc_easy", "arc_challenge"])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--skip-plain", action="store_true", help="skip the slow lm-eval loop")
    parser.add_argument("--skip-growth", action="store_true", help="skip timing single evaluations at 25/50/100 docs")
    args = parser.parse_args()

    specs = harness.load_tasks([f"cs_real_{args.task}"], limit=args.docs, seed=0)
    rule = CornerstoneRule()
    print(f"task {args.task}: {len(specs[0].doc_indices)} docs (seed 0), chance {specs[0].chance:.3f}, "
          f"{torch.get_num_threads()} threads")
    peaks = {"float32": matmul_peak(torch.float32), "bfloat16": matmul_peak(torch.bfloat16)}
    print("matmul peak: " + ", ".join(f"{k} {v / 1e12:.3f} TFLOP/s" for k, v in peaks.items()))

    runs = {}
    per_doc: dict[str, dict] = {}
    plan = [("engine float32", "float32", "fast"), ("engine bfloat16", "bfloat16", "fast")]
    if not args.skip_plain:
        plan.insert(0, ("lm-eval loop float32", "float32", "lm-eval"))
    for label, dtype, engine in plan:
        loaded, value, full, estimates, seconds, tokens = sweep(args.model, dtype, specs, engine)
        runs[label] = (full, estimates, seconds)
        per_doc[label] = {key: evaluation.per_doc for key, evaluation in value._memo.items()}
        cornerstones = [n for n, e in estimates.items() if rule.is_cornerstone(e.score_removed, full.score, value.chance)]
        line = f"{label:<22} {seconds:8.1f} s  ({seconds / 61:.2f} s/mask)  full {full.score:.4f}  cornerstones {cornerstones}"
        if tokens:
            count, full_seconds = tokens
            flops = 2 * loaded.num_parameters * count
            line += (f"  full-model forward: {count / full_seconds:,.0f} tok/s (padded), "
                     f"{flops / full_seconds / peaks[dtype]:.0%} of {dtype} matmul peak")
        print(line, flush=True)

    reference_label = "lm-eval loop float32" if "lm-eval loop float32" in runs else "engine float32"
    ref_full, ref_est, ref_seconds = runs[reference_label]
    for label, (full, estimates, seconds) in runs.items():
        if label == reference_label:
            continue
        diffs = [abs(full.score - ref_full.score)] + [
            abs(estimates[n].score_removed - ref_est[n].score_removed) for n in ref_est
        ]
        rho = spearman([ref_est[n].importance for n in ref_est], [estimates[n].importance for n in ref_est])
        flips = sum(
            a != b
            for key, reference in per_doc[reference_label].items()
            for task, values in reference.items()
            for a, b in zip(values, per_doc[label][key][task])
        )
        compared = sum(len(values) for reference in per_doc[reference_label].values() for values in reference.values())
        print(f"{label} vs {reference_label}: speed-up {ref_seconds / seconds:.2f}x, max per-mask score difference "
              f"{max(diffs):.4f}, per-document results differing {flips}/{compared}, Spearman of importances {rho:.3f}")

    if args.skip_growth:
        return
    print("\ncost of one engine evaluation (float32, full model and one mask in the middle):")
    for docs in (25, 50, 100):
        subset = harness.load_tasks([f"cs_real_{args.task}"], limit=docs, seed=0)
        loaded = load_model(args.model, dtype="float32", device="cpu")
        value = ValueFunction(loaded, subset, batch_size=32)
        players = enumerate_players(loaded.model)
        value.evaluate([])
        started = time.perf_counter()
        value.evaluate([players[len(players) // 2]])
        middle = time.perf_counter() - started
        started = time.perf_counter()
        value.evaluate([players[0]])
        first = time.perf_counter() - started
        print(f"  {docs:4d} docs: mask at L0 {first:.2f} s, mask at L15 {middle:.2f} s (prefix reuse skips half the blocks)")


if __name__ == "__main__":
    main()
