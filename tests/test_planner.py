"""The planner: policies, protection, targets, and the greedy search against the value function it re-measures with."""

from __future__ import annotations

import math

import pytest

from cornerstone.errors import PlanError
from cornerstone.loading import load_model
from cornerstone.planner import Plan, Planner, make_plan
from cornerstone.scores import CornerstoneRule, PlayerScore, ScoreReport, TaskScore
from cornerstone.value import ValueFunction

from .tasks import toy_docs, write_task


def report_with(importances: dict[str, float], parameters: dict[str, int] | None = None, cornerstones=(),
                granularity="block", total=None) -> ScoreReport:
    """A score report holding the given importances (the planner's only input besides its options)."""
    parameters = parameters or {name: 100 for name in importances}
    players = {}
    for name, importance in importances.items():
        layer = int(name[1:].split(".")[0])
        kind = name.split(".")[1] if "." in name else "block"
        players[name] = PlayerScore(layer=layer, kind=kind, importance=importance, share=0.0, score_removed=0.7 - importance,
                                    cornerstone=name in cornerstones, parameters=parameters[name])
    layers = 1 + max(p.layer for p in players.values())
    return ScoreReport(
        created="2026-01-01T00:00:00+00:00", method="ablation", granularity=granularity,
        model={"spec": "toy", "fingerprint": "toy", "num_hidden_layers": layers,
               "parameters": total or sum(parameters.values()) + 1000},
        tasks=[TaskScore(name="t", metric="acc", num_docs=10, total_docs=10, chance=0.25, base_score=0.7)],
        settings={"tasks": ["t"]}, base_score=0.7, chance=0.25, players=players, cornerstones=list(cornerstones),
        rule=CornerstoneRule(), evaluations=layers + 1, timing={}, versions={},
    )


EIGHT = {"L0": 0.40, "L1": 0.02, "L2": 0.05, "L3": -0.01, "L4": 0.03, "L5": 0.00, "L6": 0.10, "L7": 0.30}


def test_lowest_drops_the_least_important_and_explains_each():
    plan = make_plan(report_with(EIGHT), Planner(drop=3))
    assert plan.player_names == ["L1", "L3", "L5"]
    assert [r.rank for r in plan.removed] == [3, 1, 2]
    assert all("rank" in r.reason and "not protected" in r.reason for r in plan.removed)
    assert plan.parameters.original == 1800 and plan.parameters.removed == 300 and plan.parameters.remaining == 1500
    assert plan.blocks == {"original": 8, "remaining": 5}
    assert plan.predicted_score == pytest.approx(0.7 - (0.02 - 0.01 + 0.0)) and not plan.predicted_measured
    assert plan.predicted_by.startswith("additive estimate") and "not measured" in plan.predicted_by
    assert {p.name: p.reason for p in plan.protected} == {"L0": "keep_first 1", "L7": "keep_last 1"}


def test_a_one_shot_block_cut_from_a_report_the_benchmark_found_weak_carries_its_caveat():
    from cornerstone.planner import ONE_SHOT_CAVEATS

    ablation = report_with(EIGHT)
    assert make_plan(ablation, Planner(drop=3)).notes == [ONE_SHOT_CAVEATS["ablation"]]
    assert make_plan(ablation, Planner(drop=3, policy="contiguous")).notes == [ONE_SHOT_CAVEATS["ablation"]]
    avss = ablation.model_copy(update={"method": "avss"})
    assert make_plan(avss, Planner(drop=3)).notes == [ONE_SHOT_CAVEATS["avss"]]
    # block influence was among the best: no note; nor at sublayer granularity, which the benchmark did not judge
    assert make_plan(ablation.model_copy(update={"method": "bi"}), Planner(drop=3)).notes == []
    sublayers = report_with({f"L{i}.{k}": v / 2 for i, v in enumerate(EIGHT.values()) for k in ("attn", "mlp")},
                            granularity="sublayer")
    assert make_plan(sublayers, Planner(drop=3, granularity="sublayer")).notes == []
    assert make_plan(sublayers, Planner(drop=3)).notes == [ONE_SHOT_CAVEATS["ablation"]]


def test_cornerstones_are_protected_unless_the_user_lets_them_go():
    report = report_with({**EIGHT, "L3": -0.5}, cornerstones=["L3"])
    assert "L3" not in make_plan(report, Planner(drop=2)).player_names
    assert any(p.name == "L3" and p.reason == "cornerstone" for p in make_plan(report, Planner(drop=2)).protected)
    assert "L3" in make_plan(report, Planner(drop=2, protect_cornerstones=False)).player_names


def test_keep_first_last_and_named_players():
    plan = make_plan(report_with(EIGHT), Planner(drop=2, keep_first=2, keep_last=3, keep=["L3"]))
    assert plan.player_names == ["L2", "L4"]
    with pytest.raises(PlanError, match="cannot drop 3 players: only 2"):
        make_plan(report_with(EIGHT), Planner(drop=3, keep_first=2, keep_last=3, keep=["L3"]))
    with pytest.raises(PlanError, match="L9"):
        make_plan(report_with(EIGHT), Planner(drop=1, keep=["L9"]))


def test_parameter_share_target_removes_at_least_that_share():
    sizes = {name: 100 * (i + 1) for i, name in enumerate(EIGHT)}
    report = report_with(EIGHT, sizes, total=10_000)
    plan = make_plan(report, Planner(drop="9%"))
    assert plan.parameters.removed >= 900
    assert plan.parameters.removed - plan.removed[-1].parameters < 900 or len(plan.removed) == 1
    assert plan.player_names == ["L3", "L5"]  # 400 + 600 parameters, the two least important


def test_contiguous_takes_the_span_with_the_lowest_summed_importance():
    plan = make_plan(report_with(EIGHT), Planner(policy="contiguous", drop=3))
    assert plan.player_names == ["L3", "L4", "L5"]  # -0.01 + 0.03 + 0.00 beats every other run of three
    blocked = report_with({**EIGHT, "L4": -0.9}, cornerstones=["L4"])
    assert make_plan(blocked, Planner(policy="contiguous", drop=3)).player_names == ["L1", "L2", "L3"]
    with pytest.raises(PlanError, match="consecutive"):
        make_plan(blocked, Planner(policy="contiguous", drop=4))


def test_block_plan_from_a_sublayer_report_sums_the_halves():
    halves = {}
    for layer, value in enumerate([0.5, 0.01, 0.2, 0.02]):
        halves[f"L{layer}.attn"] = value / 2
        halves[f"L{layer}.mlp"] = value / 2
    report = report_with(halves, cornerstones=["L2.mlp"], granularity="sublayer")
    plan = make_plan(report, Planner(drop=1, keep_first=0, keep_last=0))
    assert plan.player_names == ["L1"] and plan.removed[0].parameters == 200
    assert "sum of L1.attn + L1.mlp" in plan.removed[0].reason
    assert any(p.name == "L2" and p.reason == "cornerstone" for p in plan.protected)
    sublayers = make_plan(report, Planner(drop=3, granularity="sublayer", keep_first=0, keep_last=0))
    assert sublayers.player_names == ["L1.attn", "L1.mlp", "L3.attn"] and sublayers.blocks["remaining"] == 3
    with pytest.raises(PlanError, match="block report"):
        make_plan(report_with(EIGHT), Planner(drop=1, granularity="sublayer"))


def test_a_plan_never_removes_every_block_and_drop_is_validated():
    with pytest.raises(PlanError, match="every block"):
        make_plan(report_with({"L0": 0.1, "L1": 0.1}), Planner(drop=2, keep_first=0, keep_last=0))
    for bad in ("0", "150%", "lots", 0):
        with pytest.raises(ValueError):
            Planner(drop=bad)
    assert Planner(drop="25 %").drop == "25%" and Planner(drop="8").drop == 8


def test_plan_yaml_round_trips_and_bad_files_are_clear(tmp_path):
    plan = make_plan(report_with(EIGHT), Planner(drop=2))
    path = plan.save(tmp_path / "plan.yaml")
    assert path.read_text().startswith("# cornerstone plan: drop 2 blocks of toy")
    assert Plan.load(path) == plan
    (tmp_path / "bad.yaml").write_text("removed: 3\n")
    with pytest.raises(PlanError, match="not a cornerstone plan"):
        Plan.load(tmp_path / "bad.yaml")
    with pytest.raises(PlanError, match="does not exist"):
        Plan.load(tmp_path / "missing.yaml")


def test_greedy_removes_what_hurts_least_as_measured_step_by_step(tiny_llama_dir, tmp_path):
    folder = write_task(tmp_path / "tasks", "toy_greedy", toy_docs(10))
    from cornerstone import harness
    from cornerstone.players import parse_players
    from cornerstone.scores import score

    loaded = load_model(str(tiny_llama_dir), device="cpu")
    specs = harness.load_tasks(["toy_greedy"], include_paths=[folder])
    from cornerstone.estimators import Ablation

    report = score(loaded, specs, estimator=Ablation(granularity="sublayer"), include_paths=[folder])
    planner = Planner(policy="greedy", granularity="sublayer", drop=2, keep_first=0, keep_last=0)
    plan = make_plan(report, planner, loaded=loaded)
    value = ValueFunction(loaded, specs)
    steps = sorted(plan.removed, key=lambda r: r.step)
    assert [r.step for r in steps] == [1, 2]
    first, second = steps[0].name, steps[1].name
    singles = {name: value.evaluate(parse_players(loaded.model, [name])).score for name in report.players}
    assert steps[0].score_after == pytest.approx(max(singles.values()))
    assert singles[first] == pytest.approx(max(singles.values()))
    assert steps[1].score_after == pytest.approx(value.evaluate(parse_players(loaded.model, [first, second])).score)
    pairs = [value.evaluate(parse_players(loaded.model, [first, other])).score for other in report.players if other != first]
    assert steps[1].score_after == pytest.approx(max(pairs))
    assert plan.predicted_score == pytest.approx(steps[1].score_after)


def test_an_additive_estimate_is_labelled_and_kept_inside_the_metric_range():
    # negative importances add up past a perfect score: the estimate is clipped to 1 and says so
    helpful = {"L0": 0.4, "L1": -0.3, "L2": -0.35, "L3": 0.4}
    plan = make_plan(report_with(helpful), Planner(drop=2))
    assert plan.player_names == ["L1", "L2"] and plan.predicted_score == 1.0
    assert "clipped from 1.3500" in plan.predicted_by
    harmful = {"L0": 0.4, "L1": 0.5, "L2": 0.6, "L3": 0.4}
    assert make_plan(report_with(harmful), Planner(drop=2, keep_first=0, keep_last=0)).predicted_score == 0.0


def test_harmless_only_keeps_players_whose_removal_measurably_hurts():
    report = report_with(EIGHT)
    for name, player in report.players.items():  # within 1.96 x 0.011 of zero: L1, L3, L5
        player.stderr = 0.011
        player.effect = report.rule.effect(player.importance, player.stderr)
    assert {n for n, p in report.players.items() if p.effect == "hurts"} == {"L0", "L2", "L4", "L6", "L7"}
    plan = make_plan(report, Planner(drop=3, harmless_only=True))
    assert plan.player_names == ["L1", "L3", "L5"] and all(r.effect != "hurts" for r in plan.removed)
    assert any(p.name == "L2" and "measurably hurts" in p.reason for p in plan.protected)
    with pytest.raises(PlanError, match="only 3 players"):
        make_plan(report, Planner(drop=4, harmless_only=True))
    with pytest.raises(PlanError, match="no standard errors|has none"):
        make_plan(report_with(EIGHT), Planner(drop=1, harmless_only=True))


def test_greedy_measures_on_exactly_the_scored_documents(tiny_llama_dir, tmp_path):
    """An API caller scores on loaded tasks (here documents 1, 4, 6, 7 of 10, no limit or seed given to
    score()): the report records them, and greedy planning re-measures on those four and no others."""
    folder = write_task(tmp_path / "tasks", "toy_exact", toy_docs(10))
    from cornerstone import harness
    from cornerstone.estimators import Ablation
    from cornerstone.players import parse_players
    from cornerstone.scores import score

    loaded = load_model(str(tiny_llama_dir), device="cpu")
    specs = harness.load_tasks(["toy_exact"], include_paths=[folder], limit=4, seed=3)
    chosen = specs[0].doc_indices
    assert chosen == sorted(__import__("random").Random(3).sample(range(10), 4))
    report = score(loaded, specs, estimator=Ablation(granularity="block"), include_paths=[folder])
    assert report.tasks[0].doc_indices == chosen and report.settings["limit"] == 4 and report.settings["seed"] == 3

    plan = make_plan(report, Planner(policy="greedy", drop=1, keep_first=0, keep_last=0), loaded=loaded)
    on_scored = ValueFunction(loaded, specs)
    everything = ValueFunction(loaded, harness.load_tasks(["toy_exact"], include_paths=[folder]))
    removed = parse_players(loaded.model, plan.player_names)
    assert plan.predicted_measured
    assert plan.removed[0].score_after == pytest.approx(on_scored.evaluate(removed).score)
    # and the plan keeps the record that `eval` avoids
    assert plan.report["documents"]["toy_exact"]["doc_indices"] == chosen
    assert everything.tasks[0].doc_indices != chosen


def test_greedy_refuses_documents_that_changed_since_scoring(tiny_llama_dir, tmp_path):
    folder = write_task(tmp_path / "tasks", "toy_edit", toy_docs(6))
    from cornerstone import harness
    from cornerstone.errors import TaskError
    from cornerstone.estimators import Ablation
    from cornerstone.scores import score

    loaded = load_model(str(tiny_llama_dir), device="cpu")
    report = score(loaded, harness.load_tasks(["toy_edit"], include_paths=[folder]), estimator=Ablation(granularity="block"),
                   include_paths=[folder])
    edited = toy_docs(6)
    edited[2]["choices"][0] = "something else"
    write_task(tmp_path / "tasks", "toy_edit", edited)
    harness._cached_manager.cache_clear()
    with pytest.raises(TaskError, match="changed since they were recorded"):
        make_plan(report, Planner(policy="greedy", drop=1, keep_first=0, keep_last=0), loaded=loaded)


@pytest.fixture
def measured_game(tiny_llama_dir, tmp_path):
    """A tiny model's sublayer report and a fresh value function on the same documents."""
    folder = write_task(tmp_path / "tasks", "toy_search", toy_docs(12))
    from cornerstone import harness
    from cornerstone.estimators import Ablation
    from cornerstone.scores import score

    loaded = load_model(str(tiny_llama_dir), device="cpu")
    specs = harness.load_tasks(["toy_search"], include_paths=[folder])
    report = score(loaded, specs, estimator=Ablation(granularity="sublayer"), include_paths=[folder], store=False)
    return loaded, report, lambda: ValueFunction(loaded, specs)


def test_a_wide_beam_finds_the_best_set_that_brute_force_finds(measured_game):
    from itertools import combinations

    from cornerstone.players import parse_players

    loaded, report, fresh = measured_game
    value = fresh()
    best = max(value.evaluate(parse_players(loaded.model, list(pair))).score for pair in combinations(report.players, 2))
    wide = Planner(policy="beam", width=len(report.players), granularity="sublayer", drop=2, keep_first=0, keep_last=0)
    plan = make_plan(report, wide, loaded=loaded, value=fresh())
    assert plan.predicted_measured and plan.predicted_score == pytest.approx(best)
    assert value.evaluate(parse_players(loaded.model, plan.player_names)).score == pytest.approx(best)
    greedy = make_plan(report, wide.model_copy(update={"policy": "greedy"}), loaded=loaded, value=fresh())
    assert greedy.predicted_score <= plan.predicted_score  # width 1 is one of the paths the beam weighs
    narrow = make_plan(report, wide.model_copy(update={"width": 1}), loaded=loaded, value=fresh())
    assert narrow.player_names == greedy.player_names and narrow.predicted_score == greedy.predicted_score


def test_a_shortlist_measures_only_that_many_candidates_per_step(measured_game):
    loaded, report, fresh = measured_game
    planner = Planner(policy="greedy", granularity="sublayer", drop=3, keep_first=0, keep_last=0, shortlist=2)
    value = fresh()
    plan = make_plan(report, planner, loaded=loaded, value=value)
    assert value.evaluations <= 2 * 3  # instead of n + (n-1) + (n-2)
    first = min(plan.removed, key=lambda r: r.step).name
    lowest_two = sorted(report.players, key=lambda n: (report.players[n].importance, -report.players[n].layer))[:2]
    assert first in lowest_two  # step 1 tries the report's two least important players only
    everything = make_plan(report, planner.model_copy(update={"shortlist": len(report.players)}), loaded=loaded, value=fresh())
    greedy = make_plan(report, planner.model_copy(update={"shortlist": None}), loaded=loaded, value=fresh())
    assert everything.search == greedy.search


def test_one_search_records_the_whole_order_and_cuts_at_the_budget(measured_game, tmp_path):
    from cornerstone.players import parse_players

    loaded, report, fresh = measured_game
    planner = Planner(policy="greedy", granularity="sublayer", drop=1, search_until=3, keep_first=0, keep_last=0)
    plan = make_plan(report, planner, loaded=loaded, value=fresh())
    order = [step.name for step in plan.search]
    assert len(order) == 3 and plan.player_names == order[:1]
    check = fresh()
    for k, step in enumerate(plan.search, start=1):
        assert step.score_after == pytest.approx(check.evaluate(parse_players(loaded.model, order[:k])).score)
        assert step.parameters_removed == sum(report.players[name].parameters for name in order[:k])
    deeper = make_plan(report, planner.model_copy(update={"drop": 2}), loaded=loaded, value=fresh())
    assert sorted(deeper.player_names) == sorted(order[:2])  # greedy's order does not depend on where it stops
    assert Plan.load(plan.save(tmp_path / "p.yaml")) == plan
    edited = plan.model_dump(mode="json")
    edited["search"][0]["name"], edited["search"][1]["name"] = order[1], order[0]
    with pytest.raises(ValueError, match="search: the removal order"):
        Plan.model_validate(edited)
    with pytest.raises(PlanError, match="search_until 1 is less than drop 2"):
        make_plan(report, planner.model_copy(update={"drop": 2, "search_until": 1}), loaded=loaded, value=fresh())


class _CountingGame:
    """A value function with a known rule on a real model's players: each removed player p multiplies the
    score by (1 - w_p), and p and q removed together cost ``pair`` more. A removal never keeps a larger
    share of the score once more is removed, so the bounds lazy greedy rests on hold (with a negative
    ``pair``, the second of the pair keeps more than it did alone, and they do not)."""

    def __init__(self, loaded, weights: dict[str, float], pair: tuple[str, str, float]) -> None:
        self.loaded, self.weights, self.pair, self.evaluations = loaded, weights, pair, 0

    def evaluate_many(self, masks, on_done=None):
        from types import SimpleNamespace

        out = []
        for mask in masks:
            names = {p.name for p in mask}
            score = math.prod(1 - self.weights[n] for n in names)
            if {self.pair[0], self.pair[1]} <= names:
                score -= self.pair[2]
            self.evaluations += 1
            out.append(SimpleNamespace(score=score))
            if on_done is not None:
                on_done(out[-1])
        return out


@pytest.mark.parametrize("pair_cost", [0.05, -0.03])
def test_lazy_greedy_picks_what_greedy_picks_for_far_fewer_evaluations_when_removal_never_helps(measured_game, pair_cost):
    loaded, report, _ = measured_game
    names = sorted(report.players)
    weights = {n: 0.02 + 0.03 * ((7 * i) % len(names)) / len(names) for i, n in enumerate(names)}
    # the pair that interacts: the two cheapest, so greedy must see their interaction to order them
    cheap = sorted(names, key=weights.get)[:2]
    planner = Planner(policy="greedy", granularity="sublayer", drop=4, keep_first=0, keep_last=0)
    full_game = _CountingGame(loaded, weights, (*cheap, pair_cost))
    lazy_game = _CountingGame(loaded, weights, (*cheap, pair_cost))
    greedy = make_plan(report, planner, loaded=loaded, value=full_game)
    lazy = make_plan(report, planner.model_copy(update={"lazy": True, "shortlist": 1}), loaded=loaded, value=lazy_game)
    if pair_cost > 0:  # monotone: the bounds hold, so the same order, and a step costs a couple of evaluations
        assert [s.name for s in lazy.search] == [s.name for s in greedy.search]
        assert lazy_game.evaluations < full_game.evaluations
    else:  # a pair that helps breaks a bound: lazy still returns a measured plan of the asked size
        assert len(lazy.player_names) == 4 and lazy.predicted_measured
        assert lazy_game.evaluations < full_game.evaluations
