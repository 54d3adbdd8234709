"""Benchmark: how noisy is each objective? Accuracy (0/1 per document), the gold answer's probability and the
divergence from the full model's choices (exp(-KL), issue 20), on the same documents.

    python bench/objective_noise.py --model smollm2-135m

For every block of the model, its leave-one-out importance ``v(N) - v(N \\ {block})`` is measured under
every objective on the documents the committed block-ablation report was scored on (four real tasks,
40 documents each; :data:`REPORTS`). Per objective:

- ``snr``: the median over blocks of |importance| / its paired standard error (documents resampled);
- ``split-half``: the mean over ``--splits`` seeded random halvings of every task's documents of the
  Spearman correlation between the block rankings the two halves give, the reliability of a ranking
  made from half the documents (a noiseless objective gives 1);
- ``ties``: the share of block pairs whose importances are exactly equal (a step function ties often).

And across objectives: the Spearman correlation of each pair's full rankings. Writes
``reports/plan-quality/objective-noise-MODEL.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from cornerstone import harness
from cornerstone.correlation import spearman
from cornerstone.estimators import paired_stderr
from cornerstone.files import atomic_write
from cornerstone.loading import load_model
from cornerstone.players import enumerate_players
from cornerstone.provenance import machine
from cornerstone.scores import ScoreReport
from cornerstone.value import ValueFunction

REPORTS = {"smollm2-135m": "reports/pruning/smollm2-135m-drop8-real-scores.json",
           "gemma3-270m": "reports/pruning/gemma3-270m-drop5-real-scores.json"}
OBJECTIVES = harness.OBJECTIVES


def importances(base: dict[str, list[float]], removed: dict[str, list[float]], docs: dict[str, np.ndarray]) -> float:
    """The macro-mean importance over tasks on the documents ``docs`` (indices per task)."""
    return float(np.mean([np.mean(np.asarray(base[t])[docs[t]] - np.asarray(removed[t])[docs[t]]) for t in base]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", choices=sorted(REPORTS))
    parser.add_argument("--splits", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default="reports/plan-quality")
    args = parser.parse_args()
    started = time.perf_counter()
    report = ScoreReport.load(REPORTS[args.model])
    loaded = load_model(args.model, dtype="float32", device="cpu")
    blocks = enumerate_players(loaded.model, "block")
    rows: dict[str, dict] = {}
    measured: dict[str, dict[str, list[float]]] = {}
    for objective in OBJECTIVES:
        specs = harness.load_tasks(report.settings["tasks"], documents=report.documents(), objective=objective)
        value = ValueFunction(loaded, specs, batch_size=args.batch_size)
        full, *removed = value.evaluate_many([[]] + [[block] for block in blocks])
        counts = {t: len(full.per_doc[t]) for t in full.per_doc}
        every = {t: np.arange(n) for t, n in counts.items()}
        point = [importances(full.per_doc, r.per_doc, every) for r in removed]
        errors = [paired_stderr([np.asarray(full.per_doc[t]) - np.asarray(r.per_doc[t]) for t in full.per_doc])
                  for r in removed]
        rng = np.random.default_rng(0)
        halves = []
        for _ in range(args.splits):
            order = {t: rng.permutation(n) for t, n in counts.items()}
            first = {t: o[: len(o) // 2] for t, o in order.items()}
            second = {t: o[len(o) // 2:] for t, o in order.items()}
            a = [importances(full.per_doc, r.per_doc, first) for r in removed]
            b = [importances(full.per_doc, r.per_doc, second) for r in removed]
            halves.append(spearman(a, b))
        pairs = [(i, j) for i in range(len(point)) for j in range(i + 1, len(point))]
        measured[objective] = dict(zip([b.name for b in blocks], point))
        rows[objective] = {
            "base": full.score,
            "snr": float(np.median([abs(p) / e for p, e in zip(point, errors) if e])),
            "split_half": float(np.mean(halves)), "split_half_sd": float(np.std(halves, ddof=1)),
            "ties": sum(point[i] == point[j] for i, j in pairs) / len(pairs),
            "importance": measured[objective], "stderr": dict(zip([b.name for b in blocks], errors)),
            "metrics": {spec.name: spec.metric for spec in specs},
        }
        print(f"{objective}: base {full.score:.4f}, snr {rows[objective]['snr']:.2f}, "
              f"split-half {rows[objective]['split_half']:.3f}, ties {rows[objective]['ties']:.1%}", flush=True)
    names = [b.name for b in blocks]
    agreement = {f"{a} ~ {b}": spearman([measured[a][n] for n in names], [measured[b][n] for n in names])
                 for i, a in enumerate(OBJECTIVES) for b in OBJECTIVES[i + 1:]}
    document = {"model": args.model, "report": REPORTS[args.model], "documents": report.settings.get("limit"),
                "tasks": report.settings["tasks"], "objectives": rows, "spearman_between": agreement,
                "splits": args.splits, "machine": machine(), "seconds": time.perf_counter() - started}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / f"objective-noise-{args.model}.json", (json.dumps(document, indent=2) + "\n").encode())
    lines = [f"# Objective noise: {args.model}, leave-one-block-out on {', '.join(document['tasks'])}", "",
             f"The documents of `{document['report']}`. Machine: {document['machine']}.", "",
             "| objective | full-model score | median \\|importance\\| / s.e. | split-half Spearman (± sd) | tied pairs |",
             "|---|---|---|---|---|"]
    lines += [f"| {name} | {row['base']:.4f} | {row['snr']:.2f} | {row['split_half']:.3f} ± {row['split_half_sd']:.3f} | "
              f"{row['ties']:.1%} |" for name, row in rows.items()]
    lines += ["", "Spearman between the objectives' block rankings: "
              + ", ".join(f"{pair} {rho:.3f}" for pair, rho in agreement.items()) + ".", ""]
    atomic_write(out / f"objective-noise-{args.model}.md", "\n".join(lines).encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
