"""The results report's pieces: per-task cornerstones, the per-task sweep figure, and the claims check
(bench/paper_claims.py) on constructed reports whose verdicts are known."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from cornerstone import report as report_module
from cornerstone.errors import ReportError
from cornerstone.scores import CornerstoneRule, PlayerScore, ScoreReport, TaskScore

REPO = Path(__file__).resolve().parents[1]
TASKS = {"cs_real_a": (0.5, 0.8), "cs_b": (0.25, 0.7)}  # name: (chance, full-model score)


def load_claims_module():
    spec = importlib.util.spec_from_file_location("paper_claims", REPO / "bench" / "paper_claims.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def sweep_report(method="ablation", shares=None) -> ScoreReport:
    """Four layers of sublayers on two tasks: L0.mlp takes both tasks to chance, L3.attn only cs_b."""
    players = {}
    for layer in range(4):
        for kind in ("attn", "mlp"):
            name = f"L{layer}.{kind}"
            removed = {task: base - 0.005 for task, (_, base) in TASKS.items()}
            if name == "L0.mlp":
                removed = {task: chance for task, (chance, _) in TASKS.items()}
            if name == "L3.attn":
                removed["cs_b"] = 0.26
            mean = sum(removed.values()) / 2
            players[name] = PlayerScore(layer=layer, kind=kind, importance=0.75 - mean, share=(shares or {}).get(name, 0.0),
                                        score_removed=mean, per_task_removed=removed, stderr=0.01)
    tasks = [TaskScore(name=t, metric="acc", num_docs=400, total_docs=1000, chance=c, base_score=b)
             for t, (c, b) in TASKS.items()]
    rule = CornerstoneRule()
    cornerstones = [n for n, p in players.items() if rule.is_cornerstone(p.score_removed, 0.75, 0.375)]
    for name in cornerstones:  # the flags and the list agree, as in every report `score` writes
        players[name].cornerstone = True
    return ScoreReport(created="2026-01-01T00:00:00+00:00", method=method, granularity="sublayer",
                       model={"spec": "toy", "fingerprint": "toy", "dtype": "bfloat16"},
                       tasks=tasks, settings={"tasks": list(TASKS), "limit": 400, "seed": 0}, base_score=0.75,
                       chance=0.375, players=players, cornerstones=cornerstones, rule=rule, evaluations=9,
                       timing={}, versions={})


def test_cornerstones_per_task_apply_the_rule_to_each_task_alone():
    report = sweep_report()
    assert report.task_cornerstones("cs_real_a") == ["L0.mlp"]
    assert report.task_cornerstones("cs_b") == ["L0.mlp", "L3.attn"]
    assert report.cornerstones == ["L0.mlp"]  # on the mean, L3.attn keeps most of the above-chance score
    with pytest.raises(ReportError, match="no task 'nope'"):
        report.task_cornerstones("nope")


def test_a_multi_task_sweep_is_also_plotted_per_task(tmp_path):
    path, plots = report_module.save(sweep_report(), tmp_path / "sweep.json")
    assert [p.name for p in plots] == ["sweep.png", "sweep-tasks.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)
    single = sweep_report()
    single.tasks = single.tasks[:1]
    _, plots = report_module.save(single, tmp_path / "one.json")
    assert [p.name for p in plots] == ["one.png"]


def test_claims_are_judged_from_the_reports(tmp_path):
    claims_module = load_claims_module()
    report_module.save(sweep_report(), tmp_path / "toy-ablation.json")
    shares = {"L0.mlp": 0.5, "L3.attn": 0.2, "L1.mlp": 0.1, "L2.attn": 0.05}
    report_module.save(sweep_report("shapley", shares), tmp_path / "toy-shapley.json")
    retention = {"drop": 1, "blocks": 4, "eval": {"limit": 10, "seed": 1, "chance": 0.375},
                 "base": {"mean_score": 0.75},
                 "cuts": [{"methods": ["avss"], "dropped": ["L0"], "mean_score": 0.4, "retention": 0.4 / 0.75,
                           "above_chance_kept": 0.025 / 0.375}]}
    (tmp_path / "toy-retention.json").write_text(json.dumps(retention))

    result = claims_module.check_claims("toy", tmp_path)
    verdicts = {(c["claim"], c["group"]): c["verdict"] for c in result["claims"]}
    assert verdicts == {
        (1, "real"): "confirmed", (2, "real"): "confirmed", (3, "real"): "confirmed",
        (1, "bundled"): "partly", (2, "bundled"): "confirmed", (3, "bundled"): "confirmed",
        (4, "shapley tasks"): "confirmed", (5, "retention tasks"): "not confirmed"}
    bundled = next(c for c in result["claims"] if c["claim"] == 1 and c["group"] == "bundled")
    assert bundled["cornerstones"] == ["L0.mlp", "L3.attn"] and bundled["early"] == ["L0.mlp"]
    top = next(c for c in result["claims"] if c["claim"] == 4)
    assert top["top4"] == ["L0.mlp", "L3.attn", "L1.mlp", "L2.attn"] and top["top4_share"] == pytest.approx(0.85)
    text = claims_module.to_markdown(result)
    assert "| 5 | Dropping the lowest 25% by AVSS keeps >90% of performance | retention tasks | **not confirmed** |" in text
