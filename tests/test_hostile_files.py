"""Hostile files: reports and plans edited by hand or written by another tool.

Every file cornerstone reads is validated before use: a bad one is refused with one line naming the
file, the field and what was expected (reports exit 8, plans 11, recipes 2), and nothing on disk
changes. The property tests mutate a real report (scored on a tiny model) and the plan made from it
field by field: every mutation either loads as exactly what the file says and plans correctly, or is
a one-line error; never another exception, never a silently different plan.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cornerstone.errors import (ConfigError, CornerstoneError, EvaluationError, PlanError, PlayerError,
                                ReportError)
from cornerstone.planner import Plan, Planner, make_plan
from cornerstone.scores import ScoreReport

from .conftest import refused
from .tasks import toy_docs, write_task

# protection on, nothing kept by position: every player of the 3-block model is a candidate
PLANNER = Planner(granularity="sublayer", drop=2, keep_first=0, keep_last=0)


@pytest.fixture(scope="module")
def scored(tiny_llama_dir, tmp_path_factory) -> dict[str, Any]:
    """A real sublayer ablation report of the tiny Llama on a toy task, and the plan made from it."""
    from cornerstone.scores import score

    folder = write_task(tmp_path_factory.mktemp("hostile-tasks"), "toy_hostile", toy_docs(8))
    report = score(str(tiny_llama_dir), ["toy_hostile"], include_paths=[folder], limit=8, batch_size=8, store=None)
    root = tmp_path_factory.mktemp("hostile")
    (root / "report.json").write_text(report.to_json())
    plan = make_plan(root / "report.json", PLANNER)
    plan.save(root / "plan.yaml")
    return {"report": json.loads(report.to_json()), "plan": yaml.safe_load((root / "plan.yaml").read_text()),
            "made": plan, "model": tiny_llama_dir, "tasks": folder}


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data))  # NaN and Infinity as Python's json writes them
    return path


def players_of(data: dict) -> list[str]:
    return list(data["players"])


# -- 1. reports are validated before use --------------------------------------------------------------

def _report_edits(report: dict) -> list[tuple[str, Any, str]]:
    first, second = players_of(report)[:2]

    def nan_importance(d):
        d["players"][first]["importance"] = math.nan

    def swap_keys(d):
        d["players"][first], d["players"][second] = d["players"][second], d["players"][first]

    def past_the_model(d):
        d["players"]["L7.attn"] = {**d["players"][first], "layer": 7}

    def huge_parameters(d):
        d["players"][first]["parameters"] = 10**30

    def float_parameters(d):
        d["players"][first]["parameters"] = 1e30

    def negative_parameters(d):
        d["players"][first]["parameters"] = -5000

    def model_field_wrong_type(d):
        d["model"]["num_hidden_layers"] = "three"

    def model_parameters_zero(d):
        d["model"]["parameters"] = 0

    def non_ascii_digit(d):
        d["players"]["L\u0663.attn"] = {**d["players"].pop(first), "layer": 3}

    def cornerstone_flag(d):
        d["players"][first]["cornerstone"] = not d["players"][first]["cornerstone"]

    def block_in_sublayer_report(d):
        d["players"]["L1"] = {**d["players"].pop(first), "layer": 1, "kind": "block"}

    def base_score_out_of_range(d):
        d["base_score"] = 1.5

    def importance_edited(d):
        d["players"][first]["importance"] += 0.25

    def settings_wrong_type(d):
        d["settings"]["tasks"] = "toy_hostile"

    def machine_missing_cpu(d):
        del d["diagnostics"]["machine"]["cpu"]

    return [("NaN importance", nan_importance, "finite"),
            ("two player keys swapped", swap_keys, "its id names layer"),
            ("a player past the model's blocks", past_the_model, "past the model"),
            ("per-player parameters 10**30", huge_parameters, "more than the model"),
            ("per-player parameters 1e30 (a float)", float_parameters, "parameters: Input should be a valid integer"),
            ("per-player parameters -5000", negative_parameters, "greater than or equal to 0"),
            ("model.num_hidden_layers a string", model_field_wrong_type, "model.num_hidden_layers"),
            ("model.parameters 0", model_parameters_zero, "model.parameters"),
            ("a player id with a non-ASCII digit", non_ascii_digit, "not a player id"),
            ("a cornerstone flag without the list", cornerstone_flag, "cornerstones"),
            ("a block player in a sublayer report", block_in_sublayer_report, "kind"),
            ("base_score above 1", base_score_out_of_range, "base_score"),
            ("an ablation importance edited alone", importance_edited, "base_score - score_removed"),
            ("settings.tasks a string", settings_wrong_type, "settings.tasks"),
            ("diagnostics.machine without cpu", machine_missing_cpu, "diagnostics.machine.cpu")]


REPORT_EDIT_NAMES = [name for name, _, _ in _report_edits({"players": {"L0.attn": {}, "L0.mlp": {}}})]


@pytest.mark.parametrize("what", REPORT_EDIT_NAMES)
def test_an_edited_report_is_refused_by_report_plan_and_compare(what, scored, tmp_path):
    edit, words = next((edit, words) for name, edit, words in _report_edits(scored["report"]) if name == what)
    data = copy.deepcopy(scored["report"])
    edit(data)
    bad = write_json(tmp_path / "bad.json", data)
    good = write_json(tmp_path / "good.json", scored["report"])
    line = refused(tmp_path, ["report", str(bad)], ReportError.exit_code, words)
    assert str(bad) in line
    refused(tmp_path, ["plan", str(bad), "--drop", "1", "--granularity", "sublayer"], ReportError.exit_code, words)
    refused(tmp_path, ["compare", str(good), str(bad)], ReportError.exit_code, words)


def test_every_committed_report_and_plan_still_loads():
    root = Path(__file__).resolve().parents[1]
    reports = [path for path in root.glob("reports/**/*.json")
               if {"players", "rule"} <= set(json.loads(path.read_text()))]
    plans = list(root.glob("reports/**/*-plan.yaml")) + list(root.glob("exports/*/cornerstone-plan.yaml"))
    assert reports and plans
    for path in reports:
        ScoreReport.load(path)
    for path in plans:
        Plan.load(path)


@pytest.mark.parametrize("field, policy", [("parameters", "lowest"), ("spec", "greedy")])
def test_a_report_without_the_model_field_a_plan_needs_is_a_report_error(scored, tmp_path, field, policy):
    data = copy.deepcopy(scored["report"])
    del data["model"][field]
    bad = write_json(tmp_path / "bad.json", data)
    refused(tmp_path, ["plan", str(bad), "--drop", "1", "--granularity", "sublayer", "--policy", policy,
                       "--out", str(tmp_path / "plan.yaml")], ReportError.exit_code, f"model.{field}")


def test_a_player_id_with_a_non_ascii_digit_is_one_line(scored, tmp_path):
    for raw in ("L\u0663", "L05", "L\uff11.attn"):  # Arabic-Indic 3, a leading zero, a fullwidth 1
        refused(tmp_path, ["score", str(scored["model"]), "--tasks", "toy_hostile", "--include-path", str(scored["tasks"]),
                 "--players", raw, "--no-store", "--out", str(tmp_path / "r.json")], PlayerError.exit_code, "not a player id")


# -- 2. duplicate keys and YAML aliases ---------------------------------------------------------------

def test_a_duplicate_json_key_is_refused_not_silently_dropped(scored, tmp_path):
    text = json.dumps(scored["report"], indent=1)
    first = players_of(scored["report"])[0]
    entry = json.dumps(scored["report"]["players"][first])
    # the same player twice: json would keep the last copy silently
    doubled = text.replace('"players": {', f'"players": {{\n"{first}": {entry},', 1)
    (tmp_path / "dup.json").write_text(doubled)
    refused(tmp_path, ["plan", str(tmp_path / "dup.json"), "--drop", "1"], ReportError.exit_code, f"the key '{first}' appears twice")


BOMB = """model: &a [{a}]
""".format(a=", ".join(["x"] * 8))


def test_yaml_aliases_and_duplicate_keys_are_refused_in_plans_and_recipes(scored, tmp_path):
    plan_text = (Path(scored["made"].save(tmp_path / "plan.yaml"))).read_text()
    # an anchor inside the free-form model mapping, expanded nine levels deep by aliases
    levels = ["lol0: &l0 [" + ", ".join(["lol"] * 9) + "]"]
    levels += [f"lol{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
    bomb = plan_text.replace("model:\n", "model:\n  " + "\n  ".join(levels) + "\n", 1)
    (tmp_path / "bomb.yaml").write_text(bomb)
    out = tmp_path / "slim"
    refused(tmp_path, ["export", str(scored["model"]), str(tmp_path / "bomb.yaml"), "--out", str(out)], PlanError.exit_code, "aliases")
    assert not out.exists()
    (tmp_path / "dup.yaml").write_text(plan_text + "granularity: block\n")
    refused(tmp_path, ["export", str(scored["model"]), str(tmp_path / "dup.yaml"), "--out", str(out)], PlanError.exit_code, "found the key 'granularity' twice")
    (tmp_path / "recipe.yaml").write_text("name: &n quick\nmodel: *n\n")
    refused(tmp_path, ["run", str(tmp_path / "recipe.yaml")], ConfigError.exit_code, "aliases")
    (tmp_path / "recipe2.yaml").write_text("name: a\nname: b\n")
    refused(tmp_path, ["run", str(tmp_path / "recipe2.yaml")], ConfigError.exit_code, "twice")


# -- 3. plans are validated before use ----------------------------------------------------------------

def _plan_edits(plan: dict) -> list[tuple[str, Any, str]]:
    def listed_twice(d):
        d["removed"].append(copy.deepcopy(d["removed"][0]))
        d["planner"]["drop"] += 1

    def name_and_layer_disagree(d):
        d["removed"][0]["layer"] = (d["removed"][0]["layer"] + 1) % 3

    def parameters_removed(d):
        d["parameters"]["removed"] += 1

    def remaining_blocks(d):
        d["blocks"]["remaining"] -= 1

    def free_form_model(d):
        d["model"]["notes"] = {"anything": ["a"] * 3}

    def model_parameters_nan(d):
        d["model"]["parameters"] = math.nan

    def fraction(d):
        d["parameters"]["removed_fraction"] = 0.5

    def report_base_nan(d):
        d["report"]["base_score"] = math.nan

    def past_the_model(d):
        d["removed"][0].update(name="L5.attn", layer=5, kind="attn")

    return [("a player listed twice", listed_twice, f"lists {plan['removed'][0]['name']} twice"),
            ("name and layer disagree", name_and_layer_disagree, "its id names layer"),
            ("parameters.removed off by one", parameters_removed, "parameters.removed"),
            ("blocks.remaining wrong", remaining_blocks, "blocks.remaining"),
            ("a free-form key in model", free_form_model, "model.notes"),
            ("model.parameters NaN", model_parameters_nan, "model.parameters"),
            ("removed_fraction wrong", fraction, "removed_fraction"),
            ("report.base_score NaN", report_base_nan, "report.base_score"),
            ("a player past the model", past_the_model, "past the model")]


PLAN_EDIT_NAMES = [name for name, _, _ in _plan_edits({"removed": [{"name": "L0"}]})]


@pytest.mark.parametrize("what", PLAN_EDIT_NAMES)
def test_an_edited_plan_is_refused_by_export(what, scored, tmp_path):
    edit, words = next((edit, words) for name, edit, words in _plan_edits(scored["plan"]) if name == what)
    data = copy.deepcopy(scored["plan"])
    edit(data)
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    out = tmp_path / "slim"
    line = refused(tmp_path, ["export", str(scored["model"]), str(tmp_path / "plan.yaml"), "--out", str(out)], PlanError.exit_code, words)
    assert "plan.yaml" in line and not out.exists()


def test_a_plan_is_written_with_exactly_its_typed_model_fields(scored, tmp_path):
    written = yaml.safe_load(scored["made"].save(tmp_path / "plan.yaml").read_text())
    assert set(written["model"]) == {"spec", "fingerprint", "model_type", "architecture", "num_hidden_layers", "parameters"}
    assert Plan.load(tmp_path / "plan.yaml") == scored["made"]


# -- 4. planning and comparing never use a non-finite number ------------------------------------------

def test_plan_and_compare_refuse_non_finite_reports(scored, tmp_path):
    good = write_json(tmp_path / "good.json", scored["report"])
    for field, value in (("base_score", -math.inf), ("chance", math.nan)):
        data = copy.deepcopy(scored["report"])
        data[field] = value
        bad = write_json(tmp_path / f"bad-{field}.json", data)
        refused(tmp_path, ["plan", str(bad), "--drop", "1", "--granularity", "sublayer"], ReportError.exit_code, f"{field}: Input should be a finite number")
        refused(tmp_path, ["compare", str(good), str(bad)], ReportError.exit_code, "finite")
    # a report object edited in Python is not re-validated: compare refuses it rather than rank a NaN
    from cornerstone.compare import compare_reports

    edited = ScoreReport.load(good)
    edited.players[players_of(scored["report"])[0]].importance = math.nan
    with pytest.raises(ReportError, match="non-finite importance"):
        compare_reports([ScoreReport.load(good), edited])


# -- 5. score never writes a non-finite number ---------------------------------------------------------

def test_score_refuses_to_write_a_report_with_a_non_finite_number(tiny_llama_dir, tmp_path, monkeypatch):
    from cornerstone import estimators

    class BrokenAblation(estimators.Ablation):
        def estimate(self, value, players, progress=None):
            result = super().estimate(value, players, progress)
            result.players[players[0].name].importance = math.nan  # an estimator's arithmetic gone wrong
            return result

    monkeypatch.setattr(estimators, "make_estimator", lambda *args, **kwargs: BrokenAblation(granularity="block"))
    write_task(tmp_path / "tasks", "toy_nan_estimate", toy_docs(4))
    out = tmp_path / "out"
    out.mkdir()
    refused(tmp_path, ["score", str(tiny_llama_dir), "--tasks", "toy_nan_estimate", "--include-path", str(tmp_path / "tasks"),
             "--no-store", "--out", str(out / "r.json")], EvaluationError.exit_code, "non-finite")
    assert not any(out.iterdir())


# -- 6. report --plot on a report without players ------------------------------------------------------

def test_report_plot_without_players_is_one_line(scored, tmp_path):
    data = copy.deepcopy(scored["report"])
    data["players"], data["cornerstones"] = {}, []
    bad = write_json(tmp_path / "empty.json", data)
    refused(tmp_path, ["report", str(bad), "--plot", str(tmp_path / "empty.png")], ReportError.exit_code, "no players")
    assert not (tmp_path / "empty.png").exists()


# -- 7. property: every single-field mutation is a correct result or a one-line error -------------------

_DELETE = object()
_SWAP, _DUPLICATE, _SHIFT_LAYER = object(), object(), object()
VALUES = [_DELETE, math.nan, math.inf, -math.inf, -1, 1e30, "x", None, [], {}, 0, True]
STRUCTURAL = [_SWAP, _DUPLICATE, _SHIFT_LAYER]


def paths(data: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value in ``data`` (dict keys and list indices), the root excluded; of a list of
    document indices only the first (the others are alike, and would take most of the draws)."""
    found = []
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        if prefix and prefix[-1] == "doc_indices" and key != 0:
            continue
        found.append(prefix + (key,))
        found += paths(value, prefix + (key,))
    return found


def mutate(data: Any, path: tuple, value: Any) -> Any:
    data = copy.deepcopy(data)
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    if value is _DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return data


def structural(data: dict, kind: object, index: int, collection: str) -> tuple[Any, str | None]:
    """Swap two players' entries, repeat one, or move one to the next layer (as JSON text for a repeat)."""
    data = copy.deepcopy(data)
    if collection == "players":
        names = list(data["players"])
        first, second = names[index % len(names)], names[(index + 1) % len(names)]
        if kind is _SWAP:
            data["players"][first], data["players"][second] = data["players"][second], data["players"][first]
        elif kind is _SHIFT_LAYER:
            data["players"][first]["layer"] += 1
        else:
            text = json.dumps(data)
            entry = json.dumps(data["players"][first])
            return None, text.replace('"players": {', f'"players": {{"{first}": {entry}, ', 1)
        return data, None
    removed = data["removed"]
    entry = removed[index % len(removed)]
    if kind is _SWAP and len(removed) > 1:
        other = removed[(index + 1) % len(removed)]
        entry["name"], other["name"] = other["name"], entry["name"]
    elif kind is _SHIFT_LAYER:
        entry["layer"] += 1
    else:
        removed.append(copy.deepcopy(entry))
    return data, None


def one_line(exc: CornerstoneError) -> None:
    assert exc.message and "\n" not in exc.message, exc.message


def _same_up_to_creation(a: Plan, b: Plan) -> bool:
    def content(plan: Plan) -> dict:
        dumped = plan.model_dump(exclude={"created"})
        dumped["report"].pop("path", None)
        return dumped
    return content(a) == content(b)


def check_report(text: str, path: Path, baseline: dict, baseline_plan: Plan, mutated: Any) -> None:
    path.write_text(text)
    try:
        report = ScoreReport.load(path)
    except CornerstoneError as exc:
        one_line(exc)
        return
    # loaded: exactly what the file says, nothing dropped or coerced
    assert report.model_dump(mode="json", exclude_unset=True) == mutated
    try:
        plan = make_plan(path, PLANNER)
    except CornerstoneError as exc:
        one_line(exc)
        return
    if json.loads(report.to_json()) == json.loads(ScoreReport.model_validate(baseline).to_json()):
        assert _same_up_to_creation(plan, baseline_plan)
        return
    # a report that says something else, planned correctly from what it says
    for removal in plan.removed:
        player = report.players[removal.name]
        assert (removal.layer, removal.kind, removal.importance) == (player.layer, player.kind, player.importance)
    assert all(math.isfinite(value) for value in (plan.predicted_score or 0.0, plan.parameters.removed_fraction))


def draw_mutation(data: Any, baseline: dict, collection: str) -> tuple[tuple, Any, str | None]:
    """One mutation of ``baseline``: a value set at one path, or a structural change of ``collection``
    (:func:`structural`). Returns (where, the mutated data, its JSON text when only text can hold it)."""
    if data.draw(st.sampled_from(["value", "structural"])) == "value":
        where = data.draw(st.sampled_from(paths(baseline)))
        return where, mutate(baseline, where, data.draw(st.sampled_from(VALUES))), None
    mutated, text = structural(baseline, data.draw(st.sampled_from(STRUCTURAL)), data.draw(st.integers(0, 5)),
                               collection)
    return (collection,), mutated, text


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_report_mutations_load_as_written_and_plan_correctly_or_fail_in_one_line(data, scored, tmp_path):
    baseline = scored["report"]
    baseline_plan = make_plan(ScoreReport.model_validate(baseline), PLANNER)
    _, mutated, text = draw_mutation(data, baseline, "players")
    check_report(text if text is not None else json.dumps(mutated), tmp_path / "mutated.json", baseline,
                 baseline_plan, mutated)


# What a plan cuts: no mutation may load with any of it changed. Which model the plan is for (spec,
# fingerprint, ...) may be edited: `export` compares the fingerprint with the model it is given.
def applied(plan: Plan) -> tuple:
    return (plan.player_names, [(r.layer, r.kind, r.parameters) for r in plan.removed], plan.parameters,
            plan.blocks, plan.granularity, plan.model["parameters"])


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_plan_mutations_load_as_written_or_fail_in_one_line(data, scored, tmp_path):
    baseline = scored["plan"]
    where, mutated, _ = draw_mutation(data, baseline, "removed")
    path = tmp_path / "mutated.yaml"
    path.write_text(yaml.safe_dump(mutated, sort_keys=False))
    try:
        plan = Plan.load(path)
    except CornerstoneError as exc:
        one_line(exc)
        return
    assert plan.model_dump(mode="json", exclude_unset=True) == mutated
    assert applied(plan) == applied(scored["made"]), where
