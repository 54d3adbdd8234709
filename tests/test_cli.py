"""The CLI through typer's runner: JSON output, saved reports, and one-line errors with distinct exit codes."""

import json
import random

import pytest
from typer.testing import CliRunner

from cornerstone.cli import app
from cornerstone.errors import ModelNotFoundError, OutputError, PlanError, ReportError, TaskError

from .tasks import toy_docs, write_task

runner = CliRunner()


@pytest.fixture(scope="module")
def toy_folder(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("cli-tasks"), "toy_cli", toy_docs(8))


@pytest.fixture(scope="module")
def scored(tiny_llama_dir, toy_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "tiny.json"
    result = runner.invoke(app, ["score", str(tiny_llama_dir), "--tasks", "toy_cli", "--include-path", str(toy_folder),
                                 "--limit", "6", "--batch-size", "4", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    return out, result


def test_score_json_report_keys_players_by_name(scored):
    out, result = scored
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert list(report["players"]) == [f"L{i}.{k}" for i in range(3) for k in ("attn", "mlp")]
    assert report["method"] == "ablation" and report["evaluations"] == 7
    assert report["tasks"][0]["num_docs"] == 6 and report["tasks"][0]["metric"] == "acc_norm"
    # the exact documents are recorded: the seeded draw of 6 of the 8, and what they hash to
    assert report["tasks"][0]["doc_indices"] == sorted(random.Random(0).sample(range(8), 6))
    assert len(report["tasks"][0]["content_sha256"]) == 64
    assert report["settings"]["limit"] == 6 and report["settings"]["seed"] == 0
    assert all(player["stderr"] is not None and player["effect"] in ("hurts", "helps", "none measurable")
               for player in report["players"].values())
    assert report["model"]["fingerprint"].startswith("folder-sha256:")
    assert {"torch", "transformers", "lm_eval"} <= set(report["versions"])
    assert json.loads(out.read_text()) == report
    assert out.with_suffix(".png").stat().st_size > 1000


def test_report_rerenders_a_saved_report(scored, tmp_path):
    out, _ = scored
    shown = runner.invoke(app, ["report", str(out), "--plot", str(tmp_path / "again.png")])
    assert shown.exit_code == 0, shown.output
    assert "cornerstone report" in shown.stdout and "L2.mlp" in shown.stdout
    assert (tmp_path / "again.png").exists()
    as_json = runner.invoke(app, ["report", str(out), "--json"])
    assert json.loads(as_json.stdout) == json.loads(out.read_text())


def test_block_granularity(tiny_llama_dir, toy_folder, tmp_path):
    result = runner.invoke(app, ["score", str(tiny_llama_dir), "--granularity", "block", "--tasks", "toy_cli",
                                 "--include-path", str(toy_folder), "--limit", "4", "--out", str(tmp_path / "b.json"), "--json"])
    assert result.exit_code == 0, result.output
    assert list(json.loads(result.stdout[result.stdout.index("{"):])["players"]) == ["L0", "L1", "L2"]


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["score", "/no/such/model"], ModelNotFoundError.exit_code, "error: path '/no/such/model' does not exist"),
        (["score", "{model}", "--tasks", "nope_task", "--include-path", "{tasks}"], TaskError.exit_code, "error: unknown task 'nope_task'"),
        (["score", "{model}", "--method", "magic"], 2, "error: unknown method 'magic'"),
        (["report", "{tasks}/toy_cli.jsonl"], ReportError.exit_code, "is not valid JSON"),
    ],
)
def test_errors_are_one_line_with_a_hint_and_an_exit_code(args, code, message, tiny_llama_dir, toy_folder):
    args = [a.format(model=tiny_llama_dir, tasks=toy_folder) for a in args]
    result = runner.invoke(app, args)
    assert result.exit_code == code, result.output
    assert message in result.stderr
    assert result.stderr.count("\n") == 2 and "hint: " in result.stderr
    assert "Traceback" not in result.output


def test_debug_shows_the_exception():
    result = runner.invoke(app, ["--debug", "score", "/no/such/model"])
    assert result.exit_code != 0 and isinstance(result.exception, ModelNotFoundError)


def test_models_and_players_listings(tiny_llama_dir):
    models = json.loads(runner.invoke(app, ["models", "--json"]).stdout)
    assert {m["alias"] for m in models} == {"smollm2-135m", "gemma3-270m"}
    players = json.loads(runner.invoke(app, ["players", str(tiny_llama_dir), "--json"]).stdout)
    assert players[0] == {"name": "L0.attn", "layer": 0, "kind": "attn", "module": "model.layers.0.self_attn"}


def test_shapley_from_the_cli_reports_values_intervals_and_the_efficiency_check(tiny_llama_dir, toy_folder, tmp_path):
    out = tmp_path / "shapley.json"
    arguments = ["score", str(tiny_llama_dir), "--method", "shapley", "--estimator", "kernel", "--budget", "40",
                 "--tasks", "toy_cli", "--include-path", str(toy_folder), "--out", str(out), "--no-store"]
    result = runner.invoke(app, arguments + ["--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert report["method"] == "shapley" and report["settings"]["estimator"]["estimator"] == "kernel"
    assert abs(report["diagnostics"]["efficiency_gap"]) < 1e-9 and report["diagnostics"]["store"] is None
    assert all(p["stderr"] is not None for p in report["players"].values())
    assert out.with_name("shapley-shares.png").stat().st_size > 1000
    shown = runner.invoke(app, ["report", str(out)])
    assert "top-4 share" in shown.stdout and "efficiency check" in shown.stdout


def test_unknown_shapley_estimator_is_a_one_line_error(tiny_llama_dir):
    result = runner.invoke(app, ["score", str(tiny_llama_dir), "--method", "shapley", "--estimator", "magic"])
    assert result.exit_code == 2 and "unknown Shapley estimator 'magic'" in result.output and "Traceback" not in result.output


def test_plan_export_eval_from_the_cli(scored, tiny_llama_dir, toy_folder, tmp_path):
    out, _ = scored
    plan_path = tmp_path / "plan.yaml"
    planned = runner.invoke(app, ["plan", str(out), "--drop", "1", "--keep-first", "0", "--keep-last", "0",
                                  "--out", str(plan_path), "--json"])
    assert planned.exit_code == 0, planned.output
    plan = json.loads(planned.stdout)
    assert plan["path"] == str(plan_path) and len(plan["removed"]) == 1 and plan["granularity"] == "block"
    shown = runner.invoke(app, ["plan", str(out), "--drop", "1", "--keep-first", "0", "--keep-last", "0",
                                "--out", str(tmp_path / "again.yaml")])
    assert plan["removed"][0]["name"] in shown.stdout and "estimated score (not measured)" in shown.stdout
    # a one-shot block cut from an ablation report carries the benchmark's caveat, in JSON and as a note line
    assert len(plan["notes"]) == 1 and "--method bi" in plan["notes"][0] and f"note: {plan['notes'][0]}" in shown.stdout
    assert plan["report"]["documents"]["toy_cli"]["doc_indices"] == json.loads(out.read_text())["tasks"][0]["doc_indices"]

    exported = runner.invoke(app, ["export", str(tiny_llama_dir), str(plan_path), "--out", str(tmp_path / "slim"), "--json"])
    assert exported.exit_code == 0, exported.output
    result = json.loads(exported.stdout)
    assert result["format"] == "stock" and result["parameters"] == plan["parameters"]["remaining"]
    again = runner.invoke(app, ["export", str(tiny_llama_dir), str(plan_path), "--out", str(tmp_path / "slim")])
    assert again.exit_code == OutputError.exit_code and "already exists" in again.stderr

    evaluated = runner.invoke(app, ["eval", str(tiny_llama_dir), str(tmp_path / "slim"), "--tasks", "toy_cli",
                                    "--include-path", str(toy_folder), "--out", str(tmp_path / "eval.json"), "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    comparison = json.loads(evaluated.stdout)
    assert comparison["pruned"]["parameters"] == result["parameters"] and set(comparison["retention"]) == {"toy_cli"}
    assert (tmp_path / "eval.md").read_text().startswith("# ")
    # judged on the 2 documents the plan was not chosen on, found through the plan saved in the export
    scored_on = set(plan["report"]["documents"]["toy_cli"]["doc_indices"])
    assert set(comparison["tasks"][0]["doc_indices"]) == set(range(8)) - scored_on
    assert comparison["documents"]["overlap"] == {"toy_cli": 0} and "disjoint" in comparison["documents"]["summary"]
    # each model's per-document answers, kept for the paired error of the share kept: one per evaluated document,
    # averaging to the score lm-eval reported
    for side in ("base", "pruned"):
        answers = comparison[side]["per_doc"]["toy_cli"]
        assert len(answers) == 2 and set(answers) <= {0.0, 1.0}
        assert sum(answers) / 2 == pytest.approx(comparison[side]["scores"]["toy_cli"])
    overlapping = runner.invoke(app, ["eval", str(tiny_llama_dir), str(tmp_path / "slim"), "--tasks", "toy_cli",
                                      "--include-path", str(toy_folder), "--out", str(tmp_path / "eval2.json"),
                                      "--allow-overlap", "--json"])
    assert json.loads(overlapping.stdout)["documents"]["overlap"] == {"toy_cli": 6}


def test_impossible_plans_and_foreign_plans_exit_with_their_codes(scored, tmp_path, tokenizer):
    out, _ = scored
    impossible = runner.invoke(app, ["plan", str(out), "--drop", "3", "--out", str(tmp_path / "p.yaml")])
    assert impossible.exit_code == PlanError.exit_code and "cannot drop 3 players" in impossible.stderr
    bad_drop = runner.invoke(app, ["plan", str(out), "--drop", "lots"])
    assert bad_drop.exit_code == 2 and "--drop" in bad_drop.stderr
    runner.invoke(app, ["plan", str(out), "--drop", "1", "--keep-first", "0", "--out", str(tmp_path / "p.yaml")])
    other = tmp_path / "other"
    from .conftest import tiny_model

    tiny_model("llama", seed=1).save_pretrained(other)
    tokenizer.save_pretrained(other)
    foreign = runner.invoke(app, ["export", str(other), str(tmp_path / "p.yaml"), "--out", str(tmp_path / "x")])
    assert foreign.exit_code == PlanError.exit_code and "plan was made for" in foreign.stderr
    assert not (tmp_path / "x").exists()
