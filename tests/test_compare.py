"""Comparing importance methods: rank correlations, bottom-set overlap, mixed granularities, labels and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from cornerstone.cli import app
from cornerstone.compare import ReportComparison, compare_reports, save
from cornerstone.errors import ConfigError, ReportError
from cornerstone.correlation import kendall
from cornerstone.scores import CornerstoneRule, PlayerScore, ScoreReport, TaskScore

runner = CliRunner()


def report_with(importances: dict[str, float], *, method="ablation", estimator: str | None = None, cornerstones=(),
                granularity="block", fingerprint: str | None = "toy", spec="toy") -> ScoreReport:
    """A score report holding the given importances (built as in test_planner)."""
    players = {}
    for name, importance in importances.items():
        layer = int(name[1:].split(".")[0])
        kind = name.split(".")[1] if "." in name else "block"
        players[name] = PlayerScore(layer=layer, kind=kind, importance=importance, share=0.0, score_removed=0.7 - importance,
                                    cornerstone=name in cornerstones, parameters=100)
    model = {"spec": spec, "num_hidden_layers": 1 + max(p.layer for p in players.values())}
    if fingerprint is not None:
        model["fingerprint"] = fingerprint
    settings = {"tasks": ["t"], "estimator": {"method": method, "granularity": granularity}}
    if estimator is not None:
        settings["estimator"]["estimator"] = estimator
    return ScoreReport(
        created="2026-01-01T00:00:00+00:00", method=method, granularity=granularity, model=model,
        tasks=[TaskScore(name="t", metric="acc", num_docs=10, total_docs=10, chance=0.25, base_score=0.7)],
        settings=settings, base_score=0.7, chance=0.25, players=players, cornerstones=list(cornerstones),
        rule=CornerstoneRule(), evaluations=len(players) + 1, timing={}, versions={},
    )


EIGHT = {"L0": 0.40, "L1": 0.02, "L2": 0.05, "L3": -0.01, "L4": 0.03, "L5": 0.00, "L6": 0.10, "L7": 0.30}


def reference_spearman(a, b) -> float:
    """Spearman's rho from its definition, written apart from cornerstone's: the Pearson correlation of the
    average ranks (ties share the mean of the ranks they span); 0 when either side is constant."""
    def ranks(x):
        return [1 + sum(y < v for y in x) + (sum(y == v for y in x) - 1) / 2 for v in x]

    ra, rb = np.array(ranks(list(a))), np.array(ranks(list(b)))
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def reference_kendall(a, b) -> float:
    """Kendall's tau-b by counting every pair: (P - Q) / sqrt((P + Q + T_a)(P + Q + T_b))."""
    concordant = discordant = tied_a = tied_b = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            da, db = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
            if da == 0 and db == 0:
                continue
            if da == 0:
                tied_a += 1
            elif db == 0:
                tied_b += 1
            elif da == db:
                concordant += 1
            else:
                discordant += 1
    denominator = np.sqrt((concordant + discordant + tied_a) * (concordant + discordant + tied_b))
    return float((concordant - discordant) / denominator) if denominator else 0.0


def test_reference_correlations_on_hand_checked_cases():
    # the references themselves, on cases worked by hand (the same as the estimators' own tests)
    assert reference_kendall([1, 2, 3, 4], [1, 2, 4, 3]) == pytest.approx(4 / 6)
    assert reference_kendall([1, 2, 2], [1, 2, 3]) == pytest.approx(2 / np.sqrt(6))
    # ranks [1, 2.5, 2.5, 4] against [1, 2, 3, 4]: rho = 4.5 / sqrt(4.5 * 5)
    assert reference_spearman([1, 2, 2, 3], [10, 20, 30, 40]) == pytest.approx(4.5 / np.sqrt(4.5 * 5))


def written(tmp_path, name: str, report: ScoreReport):
    path = tmp_path / name
    path.write_text(report.to_json())
    return path


def test_kendall_on_hand_checked_cases():
    assert kendall([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert kendall([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # P = 5, Q = 1 (the swapped 3, 4), no ties: (5 - 1) / 6
    assert kendall([1, 2, 3, 4], [1, 2, 4, 3]) == pytest.approx(4 / 6)
    # P = 2 (pairs 0-1, 0-2), Q = 0, one pair (1-2) tied in a only: 2 / sqrt((2 + 0 + 1)(2 + 0 + 0))
    assert kendall([1, 2, 2], [1, 2, 3]) == pytest.approx(2 / np.sqrt(6))
    assert kendall([5, 5, 5], [1, 2, 3]) == 0.0
    with pytest.raises(ValueError):
        kendall([1, 2], [1, 2, 3])


def test_kendall_matches_scipy_tau_b_on_data_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for n in (5, 17, 40):
        for _ in range(20):
            a = rng.integers(0, 5, n).astype(float)  # few distinct values: many ties
            b = a + rng.integers(-2, 3, n)
            expected = stats.kendalltau(a, b, variant="b").statistic
            if np.isnan(expected):
                assert kendall(a, b) == 0.0
            else:
                assert kendall(a, b) == pytest.approx(expected, abs=1e-12)


def test_identical_rankings_agree_fully_and_reversed_ones_not_at_all(tmp_path):
    ablation = written(tmp_path, "ablation.json", report_with(EIGHT))
    doubled = written(tmp_path, "shapley.json", report_with({k: 2 * v + 1 for k, v in EIGHT.items()}, method="shapley",
                                                            estimator="kernel"))
    same = compare_reports([ablation, doubled])
    assert same.labels == ["ablation", "shapley-kernel"]
    assert same.granularity == "block" and same.players == list(EIGHT) and same.model == "toy"
    assert same.bottom == 0.25 and same.bottom_k == 2
    pair = same.pair("shapley-kernel", "ablation")
    assert pair.spearman == pytest.approx(1.0) and pair.kendall == pytest.approx(1.0) and pair.bottom_overlap == 1.0
    assert same.methods[0].bottom_set == ["L3", "L5"] and same.methods[0].path == str(ablation)
    assert same.notes == []

    reversed_ = report_with({k: -v for k, v in EIGHT.items()}, method="bi")
    opposite = compare_reports([report_with(EIGHT), reversed_], bottom=0.5)
    pair = opposite.pair("ablation", "bi")
    assert pair.spearman == pytest.approx(-1.0) and pair.kendall == pytest.approx(-1.0)
    assert opposite.bottom_k == 4 and pair.bottom_overlap == 0.0
    assert opposite.methods[1].bottom_set == ["L0", "L7", "L6", "L2"] and opposite.methods[1].path is None


def test_pairs_cover_every_unordered_pair_and_match_reference_correlations():
    rng = np.random.default_rng(1)
    # rounded to one decimal, so that ties occur and the tie handling is compared too
    reports = [report_with(dict(zip(EIGHT, np.round(rng.normal(size=8), 1))), method=m)
               for m in ("ablation", "bi", "angular", "cosine")]
    comparison = compare_reports(reports, bottom=0.3)
    assert comparison.bottom_k == 2  # round(0.3 * 8) = 2
    assert [(p.a, p.b) for p in comparison.pairs] == [("ablation", "bi"), ("ablation", "angular"), ("ablation", "cosine"),
                                                      ("bi", "angular"), ("bi", "cosine"), ("angular", "cosine")]
    by_label = dict(zip(comparison.labels, reports))
    for pair in comparison.pairs:
        # from the input reports, not from what the comparison says it compared
        a = [by_label[pair.a].players[n].importance for n in EIGHT]
        b = [by_label[pair.b].players[n].importance for n in EIGHT]
        assert pair.spearman == pytest.approx(reference_spearman(a, b), abs=1e-12)
        assert pair.kendall == pytest.approx(reference_kendall(a, b), abs=1e-12)
    markdown = comparison.to_markdown()
    assert "Spearman" in markdown and "Kendall" in markdown and "| **cosine** |" in markdown


def test_bottom_set_ties_go_to_the_later_layer():
    tied = {"L0": 0.5, "L1": 0.0, "L2": 0.0, "L3": 0.0, "L4": 0.2}
    comparison = compare_reports([report_with(tied), report_with(tied, method="bi")], bottom=0.4)
    assert comparison.methods[0].bottom_set == ["L3", "L2"]


def test_sublayer_report_against_block_report_compares_blocks_by_summing_halves(tmp_path):
    halves = {}
    for layer, (attn, mlp) in enumerate([(0.3, 0.2), (0.01, 0.02), (0.1, -0.05), (0.0, 0.04)]):
        halves[f"L{layer}.attn"], halves[f"L{layer}.mlp"] = attn, mlp
    sublayer = written(tmp_path, "sub.json", report_with(halves, granularity="sublayer", cornerstones=["L2.mlp"],
                                                         method="shapley", estimator="kernel"))
    block = written(tmp_path, "block.json", report_with({"L0": 0.6, "L1": 0.01, "L2": 0.07, "L3": 0.03}))
    comparison = compare_reports([sublayer, block])
    assert comparison.granularity == "block" and comparison.players == ["L0", "L1", "L2", "L3"]
    assert comparison.methods[0].importance == pytest.approx({"L0": 0.5, "L1": 0.03, "L2": 0.05, "L3": 0.04})
    assert comparison.methods[0].cornerstones == ["L2"]
    assert any("sum of its attn and mlp" in note for note in comparison.notes)
    # the summed blocks order L0 > L2 > L3 > L1, as the block report does
    assert comparison.pair("shapley-kernel", "ablation").spearman == pytest.approx(1.0)


def test_same_granularity_compares_the_common_players_and_notes_the_rest():
    fewer = {k: v for k, v in EIGHT.items() if k != "L7"}
    comparison = compare_reports([report_with(EIGHT), report_with(fewer, method="bi")])
    assert comparison.players == [f"L{i}" for i in range(7)]
    assert any("left out L7" in note for note in comparison.notes)
    with pytest.raises(ReportError, match="only 2 block player"):
        compare_reports([report_with(EIGHT), report_with({"L0": 0.1, "L1": 0.2})])


def test_reports_of_different_models_fewer_than_two_and_bad_bottom_are_refused(tmp_path):
    other = written(tmp_path, "other.json", report_with(EIGHT, fingerprint="other", spec="gemma3-270m"))
    with pytest.raises(ReportError, match="different models: toy and gemma3-270m") as caught:
        compare_reports([report_with(EIGHT), other])
    assert str(other) in caught.value.message
    # a report without a fingerprint (older or hand-made) is not held against the others
    assert compare_reports([report_with(EIGHT, fingerprint=None), report_with(EIGHT, fingerprint="x")]).pairs
    with pytest.raises(ReportError, match="at least two") as caught:
        compare_reports([report_with(EIGHT)])
    assert caught.value.hint
    with pytest.raises(ConfigError):
        compare_reports([report_with(EIGHT), report_with(EIGHT)], bottom=1.0)


def test_colliding_labels_get_the_file_stem_or_the_position(tmp_path):
    first = written(tmp_path, "run-a.json", report_with(EIGHT))
    second = written(tmp_path, "run-b.json", report_with(EIGHT))
    assert compare_reports([first, second, report_with(EIGHT, method="bi")]).labels == [
        "ablation (run-a)", "ablation (run-b)", "bi"]
    assert compare_reports([report_with(EIGHT), report_with(EIGHT)]).labels == ["ablation #1", "ablation #2"]
    (tmp_path / "x").mkdir()
    same_stem = written(tmp_path / "x", "run-a.json", report_with(EIGHT))
    assert len(set(compare_reports([first, same_stem]).labels)) == 2
    assert compare_reports([first, second], labels=["old", "new"]).labels == ["old", "new"]
    with pytest.raises(ConfigError):
        compare_reports([first, second], labels=["same", "same"])


def test_cornerstone_ranks_place_every_flagged_player_under_every_method():
    ablation = report_with(EIGHT, cornerstones=["L0"])
    proxy = report_with({**EIGHT, "L0": -0.5, "L3": 0.9}, method="bi", cornerstones=["L3"])
    comparison = compare_reports([ablation, proxy])
    assert comparison.cornerstone_ranks == {"L0": {"ablation": 1, "bi": 8}, "L3": {"ablation": 8, "bi": 1}}
    assert comparison.methods[0].cornerstones == ["L0"] and comparison.methods[1].cornerstones == ["L3"]
    assert "| L3 | 8 | 1 |" in comparison.to_markdown()


def test_save_writes_json_that_round_trips_and_markdown(tmp_path):
    comparison = compare_reports([report_with(EIGHT), report_with(EIGHT, method="bi")])
    json_path, markdown_path = save(comparison, tmp_path / "out" / "agreement.json")
    assert ReportComparison.model_validate_json(json_path.read_text()) == comparison
    assert markdown_path == tmp_path / "out" / "agreement.md"
    assert markdown_path.read_text() == comparison.to_markdown()


def test_cli_compare_prints_json_saves_both_files_and_maps_errors(tmp_path):
    a = written(tmp_path, "a.json", report_with(EIGHT, cornerstones=["L0"]))
    b = written(tmp_path, "b.json", report_with({k: -v for k, v in EIGHT.items()}, method="bi"))
    result = runner.invoke(app, ["compare", str(a), str(b), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert [m["label"] for m in payload["methods"]] == ["ablation", "bi"]
    assert payload["pairs"][0]["spearman"] == pytest.approx(-1.0)
    assert payload["cornerstone_ranks"] == {"L0": {"ablation": 1, "bi": 8}}

    out = tmp_path / "cmp" / "agreement.json"
    result = runner.invoke(app, ["compare", str(a), str(b), "--bottom", "0.5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "ablation" in result.stdout and "bi" in result.stdout
    assert json.loads(out.read_text())["bottom_k"] == 4 and out.with_suffix(".md").exists()

    missing = runner.invoke(app, ["compare", str(a), str(tmp_path / "missing.json")])
    assert missing.exit_code == 8 and "does not exist" in missing.output
    assert runner.invoke(app, ["compare", str(a)]).exit_code == 8
    assert runner.invoke(app, ["compare", str(a), str(b), "--bottom", "1.5"]).exit_code == 2


def test_bottom_sets_say_which_removals_do_not_measurably_hurt():
    with_errors = report_with(EIGHT)
    for player in with_errors.players.values():  # 0.011 s.e.: L1, L3, L5 are within 1.96 s.e. of zero or below
        player.stderr = 0.011
        player.effect = with_errors.rule.effect(player.importance, player.stderr)
    comparison = compare_reports([with_errors, report_with(EIGHT, method="bi")], bottom=0.5)
    measured, proxy = comparison.methods
    assert measured.bottom_set == ["L3", "L5", "L1", "L4"] and measured.bottom_harmless == ["L3", "L5", "L1"]
    assert proxy.bottom_harmless is None  # a proxy has no intervals
    assert "| 3 of 4 |" in comparison.to_markdown() and "| n/a |" in comparison.to_markdown()
