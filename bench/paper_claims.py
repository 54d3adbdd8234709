"""Check the seed papers' claims on one model, from the reports that ``recipes/paper/reproduce.sh`` writes.

    python bench/paper_claims.py smollm2-135m --folder reports/paper

Reads, from FOLDER, the sublayer ablation sweep ``MODEL-ablation.json``, the Shapley run
``MODEL-shapley.json`` and, from ``bench/proxy_fidelity.py``, ``MODEL-compare.json``,
``MODEL-retention.json`` and a float32 proxy report (its full-model scores are the reference for a
bf16 sweep). Writes
``MODEL-claims.md`` and ``MODEL-claims.json`` beside them. Every number is computed here from those
reports; nothing is typed in.

Scores are grouped: "real" is the mean over the ``cs_real_*`` tasks (../shared/data), "real,
informative" the mean over those where the full model is more than 2 standard errors above chance
(on the others no removal can show anything), "bundled" the mean over the bundled tasks. A group's
cornerstones apply the report's rule (removing the player
alone leaves at most ``margin`` of the above-chance score) to the group means. The standard error
of a task score is the binomial ``sqrt(p (1 - p) / n)``; of a group mean, ``sqrt(sum se_t^2) / k``.

The claims (Zhang, Dong & Kawaguchi 2024, arXiv:2406.14532; Song et al. 2024, arXiv:2411.02117):
  1. cornerstones are early layers;
  2. removing one cornerstone alone drops the model to chance;
  3. removing a non-cornerstone changes little;
  4. a few layers hold most of the Shapley mass;
  5. dropping the lowest 25% of layers by AVSS keeps more than 90% of performance.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cornerstone.files import atomic_write
from cornerstone.scores import ScoreReport

EARLY_SHARE = 0.25  # "early" = the first quarter of the layers
SIGNIFICANT = 2.0  # a change is measurable when it exceeds 2 standard errors of the full model's score
MASS_SHARE = 0.50  # "most of the Shapley mass"
AVSS_RETENTION = 0.90  # AVSS paper: >90% of performance kept


@dataclass
class Group:
    """Mean scores over a set of tasks: the full model, chance, and the score without each player."""

    name: str
    tasks: list[str]
    base: float
    chance: float
    stderr: float
    removed: dict[str, float]
    cornerstones: list[str] = field(default_factory=list)


def binomial_stderr(score: float, docs: int) -> float:
    return math.sqrt(max(score * (1 - score), 0.0) / max(docs, 1))


def group(report: ScoreReport, name: str, tasks: list[str]) -> Group:
    entries = [t for t in report.tasks if t.name in tasks]
    k = len(entries)
    base = sum(t.base_score for t in entries) / k
    chance = sum(t.chance for t in entries) / k
    stderr = math.sqrt(sum(binomial_stderr(t.base_score, t.num_docs) ** 2 for t in entries)) / k
    removed = {player: sum(p.per_task_removed[t.name] for t in entries) / k for player, p in report.players.items()}
    result = Group(name=name, tasks=[t.name for t in entries], base=base, chance=chance, stderr=stderr, removed=removed)
    result.cornerstones = [p for p, v in removed.items() if report.rule.is_cornerstone(v, base, chance)]
    return result


def kept(value: float, base: float, chance: float) -> float:
    """Share of the above-chance score kept: (v - c) / (v(N) - c)."""
    return (value - chance) / (base - chance) if base > chance else float("nan")


def verdict(holds: bool, partly: bool = False) -> str:
    return "confirmed" if holds else ("partly" if partly else "not confirmed")


NO_CORNERSTONE = "n/a: no cornerstone"


def check_claims(model: str, folder: Path) -> dict:
    sweep = ScoreReport.load(folder / f"{model}-ablation.json")
    shapley = ScoreReport.load(folder / f"{model}-shapley.json")
    layers = 1 + max(p.layer for p in sweep.players.values())
    early = math.ceil(EARLY_SHARE * layers)
    real = [t.name for t in sweep.tasks if t.name.startswith("cs_real_")]
    bundled = [t.name for t in sweep.tasks if not t.name.startswith("cs_real_")]
    per_task = []
    for task in sweep.tasks:
        se = binomial_stderr(task.base_score, task.num_docs)
        lowest = min(sweep.players, key=lambda p: sweep.players[p].per_task_removed[task.name])
        per_task.append({"task": task.name, "metric": task.metric, "docs": task.num_docs, "chance": task.chance,
                         "base": task.base_score, "stderr": se,
                         "informative": task.base_score - task.chance > SIGNIFICANT * se,
                         "cornerstones": sweep.task_cornerstones(task.name), "lowest": lowest,
                         "lowest_score": sweep.players[lowest].per_task_removed[task.name]})

    informative = [row["task"] for row in per_task if row["informative"] and row["task"] in real]
    groups = [group(sweep, "real", real)]
    if informative and informative != real:
        groups.append(group(sweep, "real, informative", informative))
    if bundled:
        groups.append(group(sweep, "bundled", bundled))

    claims = []
    for g in groups:
        others = [p for p in g.removed if p not in g.cornerstones]
        early_ones = [p for p in g.cornerstones if sweep.players[p].layer < early]
        claims.append({"claim": 1, "group": g.name, "cornerstones": g.cornerstones, "early": early_ones,
                       "early_layers": early,
                       "verdict": verdict(len(early_ones) == len(g.cornerstones), partly=bool(early_ones))
                       if g.cornerstones else NO_CORNERSTONE})
        at_chance = [p for p in g.cornerstones if g.removed[p] - g.chance <= SIGNIFICANT * g.stderr]
        claims.append({"claim": 2, "group": g.name,
                       "removed": {p: g.removed[p] for p in g.cornerstones},
                       "kept": {p: kept(g.removed[p], g.base, g.chance) for p in g.cornerstones},
                       "within_2se_of_chance": at_chance,
                       "verdict": verdict(len(at_chance) == len(g.cornerstones), partly=True)
                       if g.cornerstones else NO_CORNERSTONE})
        unchanged = [p for p in others if g.base - g.removed[p] <= SIGNIFICANT * g.stderr]
        worst = min(others, key=g.removed.get)
        claims.append({"claim": 3, "group": g.name, "non_cornerstones": len(others), "unchanged": len(unchanged),
                       "two_se": SIGNIFICANT * g.stderr,
                       "median_kept": statistics.median(kept(g.removed[p], g.base, g.chance) for p in others),
                       "worst": worst, "worst_kept": kept(g.removed[worst], g.base, g.chance),
                       "verdict": verdict(len(unchanged) >= 0.9 * len(others), partly=len(unchanged) >= 0.5 * len(others))})
    top = sorted(shapley.players, key=lambda p: shapley.players[p].share, reverse=True)[:4]
    top_share = shapley.top_share(4)
    uniform = 4 / len(shapley.players)
    claims.append({"claim": 4, "group": "shapley tasks", "top4": top, "top4_share": top_share, "uniform_top4": uniform,
                   "evaluations": shapley.evaluations,
                   "max_stderr": max((p.stderr or 0.0) for p in shapley.players.values()),
                   "verdict": verdict(top_share >= MASS_SHARE, partly=top_share >= 4 * uniform)})

    retention_path = folder / f"{model}-retention.json"
    retention = json.loads(retention_path.read_text()) if retention_path.exists() else None
    if retention:
        avss = next(row for row in retention["cuts"] if "avss" in row["methods"])
        claims.append({"claim": 5, "group": "retention tasks", "dropped": avss["dropped"], "retention": avss["retention"],
                       "above_chance_kept": avss["above_chance_kept"], "verdict": verdict(avss["retention"] > AVSS_RETENTION)})
    compare_path = folder / f"{model}-compare.json"
    agreement = json.loads(compare_path.read_text()) if compare_path.exists() else None
    # the proxies ran in float32 on the sweep's documents and evaluated the full model there
    fp32_paths = [folder / f"{model}-{proxy}.json" for proxy in ("bi", "angular", "avss", "cosine")]
    fp32 = next((report for report in (ScoreReport.load(p) for p in fp32_paths if p.exists())
                 if report.model.get("dtype") == "float32"), None)
    return {"model": model, "layers": layers, "sweep": str(folder / f"{model}-ablation.json"),
            "settings": {"sweep": {**{k: sweep.settings.get(k) for k in ("tasks", "limit", "seed")},
                                   "dtype": sweep.model.get("dtype")},
                         "shapley": {**{k: shapley.settings.get(k) for k in ("tasks", "limit", "seed")},
                                     "dtype": shapley.model.get("dtype")}},
            "groups": [asdict(g) for g in groups], "per_task": per_task, "claims": claims,
            "shapley": {"base": shapley.base_score, "chance": shapley.chance, "cornerstones": shapley.cornerstones,
                        "evaluations": shapley.evaluations},
            "fp32_check": {t.name: t.base_score for t in fp32.tasks} if fp32 else None,
            "bf16": {t.name: t.base_score for t in sweep.tasks},
            "agreement": agreement, "retention": retention}


CLAIM_TEXT = {
    1: "Cornerstones are early layers",
    2: "Removing one cornerstone alone drops the model to chance",
    3: "Removing a non-cornerstone changes little",
    4: "A few layers hold most of the Shapley mass",
    5: "Dropping the lowest 25% by AVSS keeps >90% of performance",
}


def _evidence(claim: dict) -> str:
    number = claim["claim"]
    if number == 1:
        found = ", ".join(claim["cornerstones"]) or "none"
        return f"cornerstones {found}; {len(claim['early'])} of {len(claim['cornerstones'])} in layers 0-{claim['early_layers'] - 1}"
    if number == 2:
        if not claim["removed"]:
            return "no cornerstone"
        parts = [f"{p}: {v:.3f} ({claim['kept'][p]:.0%} of above-chance kept)" for p, v in claim["removed"].items()]
        return "; ".join(parts) + f"; within 2 s.e. of chance: {', '.join(claim['within_2se_of_chance']) or 'none'}"
    if number == 3:
        return (f"{claim['unchanged']} of {claim['non_cornerstones']} within 2 s.e. ({claim['two_se']:.3f}) of the full model; median "
                f"{claim['median_kept']:.0%} of above-chance kept; worst {claim['worst']} ({claim['worst_kept']:.0%})")
    if number == 4:
        return (f"top-4 {', '.join(claim['top4'])} hold {claim['top4_share']:.0%} of the clipped mass (uniform: "
                f"{claim['uniform_top4']:.0%}); {claim['evaluations']} evaluations, largest s.e. {claim['max_stderr']:.3f}")
    kept_text = "n/a" if claim["above_chance_kept"] is None else f"{claim['above_chance_kept']:.0%}"
    return f"drops {' '.join(claim['dropped'])}: {claim['retention']:.1%} of the score kept ({kept_text} of above-chance)"


def to_markdown(result: dict) -> str:
    model, sweep = result["model"], result["settings"]["sweep"]
    lines = [f"# {model}: the papers' claims, checked", "",
             f"Sweep: single-sublayer ablation, {sweep['limit']} documents per task (seed {sweep['seed']}), "
             f"{sweep['dtype']}; {result['layers']} layers. Computed by `bench/paper_claims.py` from the reports "
             "beside this file.", "",
             "| # | claim | scores over | verdict | evidence |", "|---|---|---|---|---|"]
    for claim in result["claims"]:
        lines.append(f"| {claim['claim']} | {CLAIM_TEXT[claim['claim']]} | {claim['group']} | **{claim['verdict']}** | "
                     f"{_evidence(claim)} |")
    lines += ["", "## Groups", "", "| group | tasks | full model | chance | s.e. | cornerstones |", "|---|---|---|---|---|---|"]
    for g in result["groups"]:
        lines.append(f"| {g['name']} | {len(g['tasks'])} | {g['base']:.4f} | {g['chance']:.4f} | {g['stderr']:.4f} | "
                     f"{', '.join(g['cornerstones']) or 'none'} |")
    fp32 = result["fp32_check"] or {}
    lines += ["", "## Per task", "",
              "Informative: the full model is more than 2 standard errors above chance; on the others no player can "
              "be a cornerstone worth the name.", "",
              f"| task | metric | docs | chance | full model ({sweep['dtype']}) | float32 | informative | cornerstones | lowest single removal |",
              "|---|---|---|---|---|---|---|---|---|"]
    for row in result["per_task"]:
        reference = f"{fp32[row['task']]:.4f}" if row["task"] in fp32 else "-"
        lines.append(f"| {row['task']} | {row['metric']} | {row['docs']} | {row['chance']:.3f} | {row['base']:.4f} ± "
                     f"{row['stderr']:.3f} | {reference} | {'yes' if row['informative'] else 'no'} | "
                     f"{(', '.join(row['cornerstones']) or 'none') if row['informative'] else '(noise)'} | "
                     f"{row['lowest']} {row['lowest_score']:.3f} |")
    agreement = result["agreement"]
    if agreement:
        lines += ["", "## Agreement with the measured ranking (blocks)", "",
                  "| method | Spearman vs ablation | vs Shapley | bottom-25% overlap with ablation |", "|---|---|---|---|"]
        labels = [m["label"] for m in agreement["methods"]]
        truth = labels[:2]

        def pair(a: str, b: str) -> dict:
            return next(p for p in agreement["pairs"] if {p["a"], p["b"]} == {a, b})
        for label in labels[1:]:
            versus = [f"{pair(label, t)['spearman']:+.3f}" if label != t else "1" for t in truth]
            lines.append(f"| {label} | {versus[0]} | {versus[1]} | {pair(label, truth[0])['bottom_overlap']:.0%} |")
    retention = result["retention"]
    if retention:
        lines += ["", f"## Retention after dropping {retention['drop']} of {retention['blocks']} blocks", "",
                  f"lm-eval ({retention['eval'].get('dtype', 'float32')}), {retention['eval']['limit']} held-out documents "
                  f"per task (seed {retention['eval']['seed']}); full model {retention['base']['mean_score']:.4f}, "
                  f"chance {retention['eval']['chance']:.4f}.", "",
                  "| methods | dropped | mean score | retention | above chance kept |", "|---|---|---|---|---|"]
        for row in sorted(retention["cuts"], key=lambda r: -r["mean_score"]):
            kept_text = "n/a" if row["above_chance_kept"] is None else f"{row['above_chance_kept']:.1%}"
            lines.append(f"| {', '.join(row['methods'])} | {' '.join(row['dropped'])} | {row['mean_score']:.4f} | "
                         f"{row['retention']:.1%} | {kept_text} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--folder", type=Path, default=Path("reports/paper"))
    args = parser.parse_args()
    result = check_claims(args.model, args.folder)
    atomic_write(args.folder / f"{args.model}-claims.json", json.dumps(result, indent=2, default=str).encode())
    text = to_markdown(result)
    atomic_write(args.folder / f"{args.model}-claims.md", text.encode())
    print(text)


if __name__ == "__main__":
    main()
