"""Benchmark: how faithful are the one-pass proxies to the measured ground truth, and what do their cuts keep?

    python bench/proxy_fidelity.py --model smollm2-135m \\
        --truth reports/pruning/smollm2-135m-drop8-real-scores.json \\
        --truth reports/proxies/smollm2-135m-real-shapley-kernel-block-bf16.json

For one model, side by side in one run:
  1. scores the model with each proxy (avss, bi, angular at block granularity; cosine per sublayer),
     the calibration text being the same documents the ground-truth reports were scored on;
  2. ranks every method against the ground-truth reports (ablation sweep, Shapley values) with
     ``cornerstone.compare``: Spearman, Kendall, bottom-25% overlap, cornerstones;
  3. for every method, drops its bottom ``--share`` of blocks (no protections, so each ranking is
     judged alone), exports the slim checkpoint with the exporter and evaluates base and every
     distinct cut once with lm-eval on held-out documents (``--eval-seed``), printing retention.

Writes the proxy reports, ``PREFIX-compare.{json,md}`` and ``PREFIX-retention.{json,md}`` in reports/proxies/.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import time
from pathlib import Path

from cornerstone import harness
from cornerstone import report as report_module
from cornerstone.calibration import Calibration
from cornerstone.compare import compare_reports, save as save_comparison
from cornerstone.estimators import macro_stderr
from cornerstone.evaluate import above_chance_kept, lm_eval_location
from cornerstone.export import export
from cornerstone.files import atomic_write
from cornerstone.loading import load_model
from cornerstone.planner import Planner, make_plan
from cornerstone.proxies import make_proxy
from cornerstone.scores import ScoreReport, score
from cornerstone.store import default_store_root

PROXIES = ("avss", "bi", "angular", "cosine")


def _error(stderr: float | None) -> str:
    return "" if stderr is None else f" ± {stderr:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--truth", action="append", required=True, help="Ground-truth score reports (ablation, Shapley).")
    parser.add_argument("--share", type=float, default=0.25, help="Share of blocks each method drops.")
    parser.add_argument("--eval-limit", type=int, default=100)
    parser.add_argument("--eval-seed", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16, help="lm-eval batch size.")
    parser.add_argument("--eval-dtype", default="float32", choices=("float32", "bfloat16"),
                        help="dtype of the lm-eval runs (base and every cut alike).")
    parser.add_argument("--prefix", default=None, help="Report file prefix. Default: reports/proxies/proxy-fidelity-MODEL.")
    args = parser.parse_args()
    prefix = Path(args.prefix or f"reports/proxies/proxy-fidelity-{args.model}")
    truths = [ScoreReport.load(path) for path in args.truth]
    settings = truths[0].settings

    started = time.perf_counter()
    loaded = load_model(args.model)
    scored = truths[0].documents()  # the proxies read the ground truth's documents; retention is judged on others
    specs = harness.load_tasks(settings["tasks"], documents=scored)
    reports: dict[str, Path] = {}
    for method in PROXIES:
        began = time.perf_counter()
        proxy = make_proxy(method, calibration=Calibration(source="tasks", seed=settings["seed"] or 0))
        result = score(loaded, specs, estimator=proxy, limit=settings["limit"], seed=settings["seed"],
                       store=default_store_root())
        reports[method], _ = report_module.save(result, prefix.with_name(f"{prefix.name}-{method}.json"))
        calibration = result.diagnostics["calibration"]
        print(f"{method:8s} {time.perf_counter() - began:6.1f} s (calibration pass {calibration['seconds']:.1f} s, "
              f"{calibration['texts']} texts, {calibration['tokens']} tokens); cornerstones: {', '.join(result.cornerstones)}")

    comparison = compare_reports([*args.truth, *reports.values()])
    save_comparison(comparison, prefix.with_name(f"{prefix.name}-compare.json"))
    print(comparison.to_markdown())

    # each method's bottom share of blocks, judged alone: no first/last/cornerstone protection
    blocks = int(loaded.model.config.num_hidden_layers)
    drop = max(1, math.ceil(args.share * blocks))
    planner = Planner(drop=drop, granularity="block", keep_first=0, keep_last=0, protect_cornerstones=False)
    cuts: dict[tuple[str, ...], list[str]] = {}
    plans = {}
    for label, path in zip(comparison.labels, [*args.truth, *reports.values()]):
        plans[label] = make_plan(path, planner, loaded=loaded)
        cuts.setdefault(tuple(plans[label].player_names), []).append(label)

    eval_specs = harness.load_tasks(settings["tasks"], limit=args.eval_limit, seed=args.eval_seed,
                                    exclude={name: record.doc_indices for name, record in scored.items()})

    def evaluate(pretrained: str, remote: bool = False) -> tuple[dict[str, float], float | None]:
        lm = harness.load_lm(pretrained, batch_size=args.batch_size, dtype=args.eval_dtype, trust_remote_code=remote)
        found = harness.evaluate_pretrained(lm, eval_specs)
        return ({name: value["score"] for name, value in found.items()},  # type: ignore[misc]
                macro_stderr([value["stderr"] for value in found.values()]))  # type: ignore[misc]

    base_folder, remote, _ = lm_eval_location(args.model)
    base, base_error = evaluate(base_folder, remote)
    chance = sum(spec.chance for spec in eval_specs) / len(eval_specs)
    base_mean = sum(base.values()) / len(base)
    rows = []
    for cut, labels in cuts.items():
        plan = plans[labels[0]]
        folder = Path("exports") / f"{prefix.name}-{labels[0]}"
        exported = export(loaded, plan, folder, overwrite=True)
        pruned, error = evaluate(str(exported.path))
        mean = sum(pruned.values()) / len(pruned)
        rows.append({"methods": labels, "dropped": list(cut), "parameters_removed": plan.parameters.removed_fraction,
                     "scores": pruned, "mean_score": mean, "mean_stderr": error, "retention": mean / base_mean,
                     "above_chance_kept": above_chance_kept(base_mean, mean, chance)})
        shutil.rmtree(folder, ignore_errors=True)  # model files stay out of the repository
        print(f"{' = '.join(labels):40s} drop {', '.join(cut)}: mean {mean:.4f} (base {base_mean:.4f}), "
              f"retention {mean / base_mean:.1%}")
    result = {"model": args.model, "truth": args.truth, "proxy_reports": {m: str(p) for m, p in reports.items()},
              "drop": drop, "blocks": blocks, "eval": {"tasks": settings["tasks"], "limit": args.eval_limit,
                                                         "seed": args.eval_seed, "chance": chance, "dtype": args.eval_dtype,
                                                         "documents": {spec.name: spec.doc_indices for spec in eval_specs},
                                                         "disjoint_from_scored": True},
              "base": {"scores": base, "mean_score": base_mean, "mean_stderr": base_error}, "cuts": rows,
              "cpu": platform.processor() or platform.machine(),
              "seconds": time.perf_counter() - started}
    atomic_write(prefix.with_name(f"{prefix.name}-retention.json"), json.dumps(result, indent=2).encode())
    lines = [f"# {args.model}: retention when each method's bottom {drop} of {blocks} blocks are dropped", "",
             f"lm-eval ({args.eval_dtype}) on up to {args.eval_limit} documents per task (seed {args.eval_seed}) of "
             f"{', '.join(spec.name for spec in eval_specs)}, drawn from the documents the ground truth was not scored on; "
             f"base mean {base_mean:.4f}{_error(base_error)}, chance {chance:.4f}. No block protected.", "",
             "| methods | dropped | parameters removed | mean score | retention | above chance kept |", "|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: -r["mean_score"]):
        kept = row["above_chance_kept"]
        lines.append(f"| {', '.join(row['methods'])} | {' '.join(row['dropped'])} | {row['parameters_removed']:.1%} | "
                     f"{row['mean_score']:.4f}{_error(row['mean_stderr'])} | {row['retention']:.1%} | "
                     f"{'n/a' if kept is None else f'{kept:.1%}'} |")
    atomic_write(prefix.with_name(f"{prefix.name}-retention.md"), ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
