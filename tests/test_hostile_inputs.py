"""Hostile inputs (issue 18, options, task data, model loading and healing): every bad input is one
``error:`` line and one ``hint:`` line with the exit code of docs/errors.md, and changes no file.

Each test keeps everything it uses (model copy, task data, outputs, the value store) in its own
folder and compares a snapshot of that folder (paths, sha256, modes) before and after the refused run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cornerstone.cli import app
from cornerstone.errors import (ConfigError, HealError, ModelLoadError, OutputError, PlayerError, TaskError)

from .conftest import ARCHITECTURE_NAMES, error_line, refused, snapshot, tiny_model, tiny_tokenizer
from .tasks import toy_docs, write_task

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def work(tmp_path, tiny_llama_dir, monkeypatch) -> Path:
    """A folder holding a copy of the tiny Llama (``model``) and good task data (``tasks``); the current
    folder and the value store are inside it too, so the snapshot sees every default output."""
    shutil.copytree(tiny_llama_dir, tmp_path / "model")
    write_task(tmp_path / "tasks", "toy_good", toy_docs(6))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def score_args(work: Path, *extra: str, tasks: str = "toy_good") -> list:
    return ["score", work / "model", "--tasks", tasks, "--include-path", work / "tasks", "--limit", "6",
            "--granularity", "block", "--out", work / "out" / "report.json", *extra]


# -- 1. a config.json that disagrees with the weights ---------------------------------------------


@pytest.mark.parametrize("layers", [4, 2])
def test_a_config_with_more_or_fewer_layers_than_the_weights_is_refused(work, layers):
    config_path = work / "model" / "config.json"
    config = json.loads(config_path.read_text())
    config["num_hidden_layers"] = layers
    config_path.write_text(json.dumps(config))
    refused(work, ["players", work / "model"], ModelLoadError.exit_code, f"num_hidden_layers={layers}",
            "the weights hold 3 layers")
    refused(work, score_args(work), ModelLoadError.exit_code, f"num_hidden_layers={layers}")


def test_a_weight_missing_or_left_over_is_refused(work):
    from safetensors.torch import load_file, save_file

    weights_path = work / "model" / "model.safetensors"
    weights = load_file(weights_path)
    del weights["model.norm.weight"]
    weights["model.extra.weight"] = weights["model.embed_tokens.weight"][:2].clone()
    save_file(weights, weights_path, metadata={"format": "pt"})
    refused(work, ["players", work / "model"], ModelLoadError.exit_code, "1 missing (e.g. model.norm.weight)",
            "1 unexpected (e.g. model.extra.weight)")


@pytest.mark.parametrize("architecture", ARCHITECTURE_NAMES)
def test_sound_checkpoints_of_every_architecture_still_load(architecture, tmp_path):
    """Tied heads, non-persistent buffers and MoE experts are not reported as missing: nothing sound is refused."""
    from cornerstone.loading import load_model

    tiny_model(architecture).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    assert load_model(str(tmp_path), device="cpu").describe()["num_hidden_layers"] == 3


# -- 2. task data: gold labels and fields -------------------------------------------------------------


def _with(doc: int, **changes) -> list[dict]:
    docs = toy_docs(6)
    docs[doc].update(changes)
    return docs


BAD_DOCUMENTS = [
    # (task, documents, document index, words in the message)
    ("toy_minus", _with(3, label=-1), 3, "gold label -1"),
    ("toy_string", [{**doc, "choices": ["Paris", "London"], "label": "0"} for doc in toy_docs(6)], 0, "gold label '0'"),
    ("toy_seven", _with(3, label=7), 3, "gold label 7"),
    ("toy_first", _with(0, label=7), 0, "gold label 7"),  # lm-eval itself fails here: "list index out of range"
    ("toy_fraction", _with(3, label=1.5), 0, "gold label 2.0"),  # one float turns the column into floats
    ("toy_missing", _with(3, label=None), 3, "gold label None"),
    ("toy_bool", [{**doc, "label": True} for doc in toy_docs(6)], 0, "gold label True"),
    ("toy_text", _with(3, label="x"), 3, "gold label 'x'"),
    ("toy_many", [{**doc, "label": [0, 5]} for doc in toy_docs(6)], 0, "gold label 5"),
    ("toy_nochoice", _with(2, choices=[]), 2, "gave [], not a non-empty list of texts"),
]


@pytest.mark.parametrize("task, docs, index, words", BAD_DOCUMENTS, ids=[row[0] for row in BAD_DOCUMENTS])
def test_every_bad_gold_label_is_the_same_task_error(work, task, docs, index, words):
    write_task(work / "tasks", task, docs)
    line = refused(work, score_args(work, tasks=task), TaskError.exit_code, f"task '{task}' document {index}:", words)
    assert "list index out of range" not in line


def test_a_template_field_that_is_missing_names_the_task_and_field(work):
    write_task(work / "tasks", "toy_field", toy_docs(6))
    yaml_path = work / "tasks" / "toy_field.yaml"
    yaml_path.write_text(yaml_path.read_text().replace("{{question}}", "{{question}} {{hint}}"))
    refused(work, score_args(work, tasks="toy_field"), TaskError.exit_code, "task 'toy_field' document 0: doc_to_text",
            "'hint' is undefined")


def test_labels_lm_eval_reads_correctly_still_load(work):
    from cornerstone import harness

    text_labels = [{**doc, "label": doc["choices"][doc["label"]]} for doc in toy_docs(6)]  # the answer's text
    write_task(work / "tasks", "toy_texts", text_labels)
    specs = harness.load_tasks(["toy_good", "toy_texts"], include_paths=[work / "tasks"])
    assert [spec.chance for spec in specs] == [0.375, 0.375]


# -- 3. options: devices, numbers, placement, paths that are not UTF-8 ---------------------------------


BAD_OPTIONS = [
    (["--device", "mps"], "--device 'mps' is not available here (available: cpu"),
    (["--device", "tpu"], "--device 'tpu' is not available here"),
    (["--device", "cuda:x"], "--device 'cuda:x' is not available here"),
    (["--method", "shapley", "--target-stderr", "nan"], "'--target-stderr': nan is not a finite number"),
    (["--method", "shapley", "--target-stderr", "-1"], "'--target-stderr': -1 is not more than 0"),
    (["--margin", "nan"], "'--margin': nan is not a finite number"),
    (["--margin", "1.5"], "'--margin': 1.5 is more than 1"),
    (["--outlier", "inf"], "'--outlier': inf is not a finite number"),
    (["--avss-share", "-0.1"], "'--avss-share': -0.1 is not at least 0"),
    (["--device-map", "everywhere"], "--device-map 'everywhere' is not a placement"),
    (["--device-map", "auto", "--max-memory", "0=lots"], "names no device of this machine"),
    (["--device-map", "auto", "--max-memory", "cpu=lots"], "'lots' is not an amount of memory"),
    (["--device-map", "auto", "--max-memory", "cpu=infGB"], "'infGB' is not an amount of memory"),
    (["--max-memory", "cpu=1GiB"], "--max-memory applies with --device-map"),
]


@pytest.mark.parametrize("extra, words", BAD_OPTIONS, ids=[" ".join(row[0]) for row in BAD_OPTIONS])
def test_bad_option_values_are_refused_where_they_are_parsed(work, extra, words):
    refused(work, score_args(work, *extra), ConfigError.exit_code, words)


@pytest.mark.parametrize("where", ["--store", "--include-path", "--out", "model"])
def test_paths_that_are_not_utf8_are_refused_before_any_work(work, where):
    bad = work / os.fsdecode(b"bad\xff")  # a real folder whose name is not UTF-8
    shutil.copytree(work / "model", bad)
    shutil.copytree(work / "tasks", bad / "tasks")
    args = score_args(work, "--store", work / "values")
    if where == "model":
        args[1] = bad
    else:
        args[args.index(where) + 1] = bad / "tasks" if where == "--include-path" else bad / "x"
    name = "argument" if where == "model" else where
    refused(work, args, ConfigError.exit_code, f"{name} '", "bad\\xff", "is not UTF-8 text")


def test_an_output_that_cannot_be_written_is_refused_before_the_run(work):
    (work / "a-file").write_text("not a folder")
    refused(work, [*score_args(work)[:-2], "--out", work / "a-file" / "r.json"], OutputError.exit_code,
            "a-file' is a file, not a folder")
    refused(work, [*score_args(work)[:-2], "--out", work / "tasks"], OutputError.exit_code, "is a folder")
    refused(work, [*score_args(work)[:-2], "--out", work / ("x" * 300 + ".json")], OutputError.exit_code,
            "longer than")


# -- 4. several processes -----------------------------------------------------------------------------


def _processes(work: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "cornerstone", *map(str, score_args(work, "--no-store", *extra)),
               "--num-processes", "2"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600, cwd=work)


@pytest.mark.parametrize("case", ["bad task data (checked before the ranks start)", "bad player (found by the ranks)"])
def test_a_failing_multi_process_job_prints_its_error_once_with_its_exit_code(work, case):
    write_task(work / "tasks", "toy_seven", _with(3, label=7))
    before = snapshot(work)
    if case.startswith("bad task"):
        done, code, words = _processes(work, "--tasks", "toy_seven"), TaskError.exit_code, "task 'toy_seven' document 3"
    else:
        done, code, words = _processes(work, "--players", "L9"), PlayerError.exit_code, "player 'L9' is out of range"
    assert done.returncode == code, done.stderr[-2000:]
    assert words in error_line(done.stderr)
    assert "ChildFailedError" not in done.stderr and "torch.distributed" not in done.stderr
    assert snapshot(work) == before


# -- 5. player ids with digits of other scripts ---------------------------------------------------------


@pytest.mark.parametrize("player", ["L\uff15", "L\u0663", "L\u0661.attn"])  # fullwidth 5, Arabic-Indic 3 and 1
def test_a_player_named_with_non_ascii_digits_is_a_player_error(work, player):
    refused(work, score_args(work, "--players", player), PlayerError.exit_code, f"'{player}' is not a player id")


# -- 6. healing ---------------------------------------------------------------------------------------------


@pytest.fixture
def slim(work) -> Path:
    """An export of the tiny Llama with one block dropped, and a training text, in the work folder."""
    from cornerstone.export import export
    from cornerstone.loading import load_model
    from cornerstone.planner import Planner, make_plan

    from .test_hardening import model_report

    loaded = load_model(str(work / "model"), device="cpu")
    plan = make_plan(model_report(loaded, {"L0": 0.3, "L1": 0.0, "L2": 0.2}), Planner(drop=1, keep_first=0, keep_last=0),
                     loaded=loaded)
    export(loaded, plan, work / "slim")
    (work / "corpus.txt").write_text("\n\n".join(["Question: What is the capital of France? Answer: Paris"] * 40))
    return work / "slim"


def heal_args(work: Path, *extra) -> list:
    return ["heal", work / "slim", "--data", work / "corpus.txt", "--out", work / "healed", "--steps", "2",
            "--sequence-length", "16", "--batch-size", "2", *extra]


@pytest.mark.parametrize("extra, words", [
    (["--method", "qlora"], "invalid healing option --method: Input should be 'lora' or 'full' (got 'qlora')"),
    (["--compute-dtype", "float16"], "option --compute-dtype: Input should be 'float32' or 'bfloat16'"),
    (["--alpha", "nan"], "'--alpha': nan is not a finite number"),
    (["--distill", "2"], "'--distill': 2 is more than 1"),
    (["--temperature", "0"], "'--temperature': 0 is not more than 0"),
])
def test_healing_option_errors_name_the_option_not_a_documentation_url(slim, work, extra, words):
    line = refused(work, heal_args(work, *extra), ConfigError.exit_code, words)
    assert "pydantic" not in line


def test_healing_an_export_whose_config_disagrees_with_its_weights_is_refused(slim, work):
    """heal reads an export folder a person may have edited: a block missing from the weights would be
    trained from random numbers."""
    config_path = slim / "config.json"
    config = json.loads(config_path.read_text())
    config["num_hidden_layers"] += 1
    config_path.write_text(json.dumps(config))
    refused(work, heal_args(work), ModelLoadError.exit_code, f"num_hidden_layers={config['num_hidden_layers']}",
            f"the weights hold {config['num_hidden_layers'] - 1} layers")


def test_healing_data_that_is_a_folder_says_so(slim, work):
    args = heal_args(work)
    args[args.index("--data") + 1] = work / "tasks"
    refused(work, args, ConfigError.exit_code, f"--data '{work / 'tasks'}' is a folder")
    args[args.index("--data") + 1] = work / "nothing.txt"
    refused(work, args, ConfigError.exit_code, "does not exist")


def test_a_teacher_with_another_vocabulary_is_refused_naming_both_sizes(slim, work):
    tiny_model("llama", vocab_size=320).save_pretrained(work / "teacher")
    tiny_tokenizer().save_pretrained(work / "teacher")
    refused(work, heal_args(work, "--distill", "0.5", "--teacher", work / "teacher"), HealError.exit_code,
            "a vocabulary of 320 tokens, the pruned model 300")


# -- 7. memory estimate --------------------------------------------------------------------------------


def test_a_batch_size_larger_than_the_requests_is_sized_by_the_requests(work, tiny_llama_dir):
    from cornerstone.loading import load_model
    from cornerstone.sizing import check_fits, estimate_run

    huge = 10**14
    model = load_model(str(tiny_llama_dir), device="cpu").model
    sizing = dict(evaluations=4, seconds_per_evaluation=0.0, batch_size=huge, longest_request=20, cache_bytes=0)
    with pytest.raises(ConfigError, match="GiB are free"):  # what a batch of 10^14 rows would need
        check_fits(estimate_run(model, **sizing))
    assert estimate_run(model, **sizing, requests=16).activation_bytes == 16 * 20 * (300 + 4 * 32) * 4
    result = runner.invoke(app, [str(arg) for arg in score_args(work, "--batch-size", str(huge), "--no-store")])
    assert result.exit_code == 0, result.output
    assert json.loads((work / "out" / "report.json").read_text())["players"]


# -- 8. NUL bytes -----------------------------------------------------------------------------------------


def test_nul_bytes_in_arguments_and_recipes_are_config_errors(work):
    refused(work, score_args(work, "--store", "va\0lues"), ConfigError.exit_code, "--store 'va\\0lues' contains a NUL byte")
    for field, value, code, words in (("model", "mod\\0el", ConfigError.exit_code, "contains a NUL byte"),
                                      ("include", "tas\\0ks", TaskError.exit_code, "contains a NUL byte")):
        recipe = work / f"nul-{field}.yaml"
        model = value if field == "model" else str(work / "model")
        include = value if field == "include" else str(work / "tasks")
        recipe.write_text(f'name: nul\nmodel: "{model}"\n'
                          f'tasks: {{names: [toy_good], limit: 2, include_paths: ["{include}"]}}\n'
                          "score: {method: ablation, granularity: block}\n"
                          "plan: {policy: lowest, granularity: block, drop: 1, keep_first: 0, keep_last: 0}\n"
                          f"export: {{out: {work / 'export'}}}\n")
        refused(work, ["run", recipe, "--reports", work / "reports"], code, words)


# -- 9. --drop ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("drop", ["abc", "0", "150%", "-3", "8.5"])
def test_drop_errors_say_what_drop_takes(work, drop):
    from .test_planner import report_with

    (work / "report.json").write_text(report_with({"L0": 0.3, "L1": 0.0, "L2": 0.2}).to_json())
    before = snapshot(work)
    result = runner.invoke(app, ["plan", str(work / "report.json"), "--drop", drop])
    assert result.exit_code == ConfigError.exit_code, result.output
    assert error_line(result.stderr).startswith("error: invalid planning option --drop: ")
    assert "--drop 8 (a number of players) or --drop 25% (a share of the parameters)" in result.stderr
    assert snapshot(work) == before


# -- 10. the edge: what the system refuses is one line too ----------------------------------------------


def test_paths_the_system_refuses_are_error_line(work):
    long = "/tmp/" + "x" * 300
    refused(work, ["tasks", "--include-path", long], TaskError.exit_code, "is not a folder")
    refused(work, [*score_args(work, "--method", "avss", "--no-store"), "--calibration", long + ".txt"],
            ConfigError.exit_code, "File name too long")
    (work / "texts").mkdir()
    refused(work, [*score_args(work, "--method", "avss", "--no-store"), "--calibration", work / "texts"],
            ConfigError.exit_code, "is a folder")
