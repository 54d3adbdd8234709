"""Hostile outputs: what cornerstone writes, and what it must never overwrite.

One test (or a few) per item of issue 18's groups 1 and 6 and the value store: `--overwrite` replaces only
an export cornerstone wrote (never a file, an unrelated folder or the model being read); the staging
folders of a killed run are removed by the next run; outputs get the umask's modes; a recipe name cannot
leave the reports folder; bad value-store lines are skipped with one warning and recomputed; a plan without
a model fingerprint is refused. Every refusal is one `error:` line, one `hint:` line and the exit code of
docs/errors.md, and a snapshot of the whole work folder (paths, sha256, modes, folders included) shows that nothing
outside the intended output changed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from cornerstone.cli import app
from cornerstone.errors import ConfigError, OutputError, PlanError
from cornerstone.exported import EXPORT_MANIFEST
from cornerstone.files import _host as host_name
from cornerstone.files import output_modes, remove_leftovers
from cornerstone.store import ValueStore

from .conftest import changed, refused, snapshot
from .tasks import toy_docs, write_task
from .test_hostile_files import VALUES, mutate, paths

runner = CliRunner()


def succeeded(args: list[str]) -> Any:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture
def work(tiny_llama_dir, tmp_path) -> dict[str, Path]:
    """A work folder holding a copy of the tiny model and a block plan made for it (from a report with
    the model's real parameter counts): every test may be asked to harm any of it."""
    from cornerstone.loading import load_model
    from cornerstone.planner import Planner, make_plan

    from .test_hardening import model_report

    model = Path(shutil.copytree(tiny_llama_dir, tmp_path / "model"))
    loaded = load_model(str(model), device="cpu")
    report = model_report(loaded, {"L0": 0.3, "L1": 0.0, "L2": 0.2})
    (tmp_path / "report.json").write_text(report.to_json())
    make_plan(report, Planner(drop=1, keep_first=0, keep_last=0), loaded=loaded).save(tmp_path / "plan.yaml")
    return {"root": tmp_path, "model": model, "plan": tmp_path / "plan.yaml", "report": tmp_path / "report.json"}


def export_args(work: dict[str, Path], out: Path | str, *extra: str) -> list[str]:
    return ["export", str(work["model"]), str(work["plan"]), "--out", str(out), *extra]


def staging_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if "-partial-" in p.name or "-old-" in p.name)


# -- 1. --overwrite replaces only an export cornerstone wrote ---------------------------------------------

def test_overwrite_replaces_an_earlier_export_and_leaves_nothing_beside_it(work):
    root, out = work["root"], work["root"] / "slim"
    succeeded(export_args(work, out))
    (out / "stale.txt").write_text("from the earlier export")  # must go with the folder it is in
    before = snapshot(root)
    succeeded(export_args(work, out, "--overwrite"))
    assert {path.split(os.sep)[0] for path in changed(before, snapshot(root))} == {"slim"}
    assert not (out / "stale.txt").exists() and (out / EXPORT_MANIFEST).is_file()
    assert staging_names(root) == []


def test_overwrite_of_the_current_folder_and_of_a_hidden_name_leaves_no_old_folders(work, monkeypatch):
    root = work["root"]
    hidden = root / ".hidden-export"
    succeeded(export_args(work, hidden))
    succeeded(export_args(work, hidden, "--overwrite"))
    assert (hidden / EXPORT_MANIFEST).is_file() and staging_names(root) == []
    # `--out .` from inside an earlier export: '.' has no name of its own, the folder's name is used
    monkeypatch.chdir(hidden)
    before = snapshot(root)
    succeeded(export_args(work, ".", "--overwrite"))
    monkeypatch.chdir(root)  # the old folder (the process's cwd) was removed once the new one was in place
    assert (hidden / EXPORT_MANIFEST).is_file() and staging_names(root) == [] and staging_names(hidden) == []
    assert {path.split(os.sep)[0] for path in changed(before, snapshot(root))} == {".hidden-export"}


def _plain_file(root: Path) -> Path:
    (root / "notes.txt").write_text("a user's file")
    return root / "notes.txt"


def _unrelated_folder(root: Path) -> Path:
    (root / "photos").mkdir()
    (root / "photos" / "cat.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root / "photos"


def _link_to_export(root: Path) -> Path:
    (root / "real-export").mkdir()
    (root / "real-export" / EXPORT_MANIFEST).write_text("{}")
    (root / "latest").symlink_to(root / "real-export")
    return root / "latest"


def _link_into_model(root: Path) -> Path:
    (root / "alias").symlink_to(root / "model")
    return root / "alias" / "slim"


@pytest.mark.parametrize("target, words", [
    (_plain_file, "is a file, not an output folder cornerstone wrote"),
    (_unrelated_folder, f"is not an output cornerstone wrote (it has no {EXPORT_MANIFEST})"),
    (_link_to_export, "is a symbolic link"),
    (lambda root: root / "model", "is the model being read"),
    (lambda root: root / "model" / "slim", "is inside the model being read"),
    (lambda root: root, "contains the model being read"),
    (_link_into_model, "is inside the model being read"),
    (lambda root: Path("/"), "cannot be an output folder"),
], ids=["plain-file", "unrelated-folder", "symlink", "source-model", "inside-source", "contains-source",
        "link-into-source", "root"])
def test_overwrite_refuses_what_cornerstone_did_not_write(work, target, words):
    out = target(work["root"])
    refused(work["root"], export_args(work, out, "--overwrite"), OutputError.exit_code, words)


def test_overwrite_of_an_unrelated_current_folder_is_refused(work, monkeypatch):
    monkeypatch.chdir(_unrelated_folder(work["root"]))
    refused(work["root"], export_args(work, ".", "--overwrite"), OutputError.exit_code, "'.' is not an output cornerstone wrote")


def test_the_model_folder_is_protected_without_overwrite_too(work):
    refused(work["root"], export_args(work, work["model"] / "slim"), OutputError.exit_code, "is inside the model being read")


def test_a_recipe_with_overwrite_true_runs_again_onto_its_own_export(tiny_llama_dir, tmp_path, monkeypatch):
    """The shipped recipes say `overwrite: true` (recipes/quickstart.yaml): running one twice must work,
    since its target is then the export it wrote the first time."""
    shipped = yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml").read_text())
    assert shipped["export"]["overwrite"] is True
    folder = write_task(tmp_path / "tasks", "toy_outputs", toy_docs(6))
    monkeypatch.chdir(tmp_path)
    recipe = {"name": "again", "model": str(tiny_llama_dir),
              "tasks": {"names": ["toy_outputs"], "include_paths": [str(folder)], "limit": 4},
              "score": {"method": "ablation", "granularity": "block", "batch_size": 4, "store": False},
              "plan": {"granularity": "block", "drop": 1, "keep_first": 0, "keep_last": 0},
              "export": {"out": "exports/again", "overwrite": True}, "reports": "reports"}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    succeeded(["run", "recipe.yaml"])
    first = json.loads((tmp_path / "exports" / "again" / EXPORT_MANIFEST).read_text())
    succeeded(["run", "recipe.yaml"])
    second = json.loads((tmp_path / "exports" / "again" / EXPORT_MANIFEST).read_text())
    assert first["players_removed"] == second["players_removed"] and staging_names(tmp_path / "exports") == []


def test_heal_overwrite_replaces_only_an_earlier_healed_folder(work):
    root, slim = work["root"], work["root"] / "slim"
    succeeded(export_args(work, slim))
    (root / "corpus.txt").write_text("\n\n".join(["Question: What is the capital of France? Answer: Paris"] * 8))
    heal = ["heal", str(slim), "--data", str(root / "corpus.txt"), "--steps", "2", "--sequence-length", "16",
            "--batch-size", "2", "--rank", "2", "--overwrite", "--out"]
    succeeded(heal + [str(root / "healed")])
    before = snapshot(root)
    succeeded(heal + [str(root / "healed")])  # an earlier healed folder: replaced
    assert {path.split(os.sep)[0] for path in changed(before, snapshot(root))} == {"healed"}
    assert staging_names(root) == []
    refused(root, heal + [str(slim)], OutputError.exit_code, "is the model being read")  # its own input
    refused(root, heal + [str(_unrelated_folder(root))], OutputError.exit_code, "it has no cornerstone-heal.json")
    # an export is cornerstone's, but not a healed folder: heal does not replace what export wrote
    succeeded(export_args(work, root / "other-export"))
    refused(root, heal + [str(root / "other-export")], OutputError.exit_code, "it has no cornerstone-heal.json")


# -- 2. a killed run's staging folders are removed by the next run ---------------------------------------

def _dead_pid() -> int:
    # the kernel hands out pids below pid_max: pid_max itself is never a live process (no timing involved)
    return int(Path("/proc/sys/kernel/pid_max").read_text())


def test_staging_folders_of_killed_runs_are_removed_by_the_next_run(work):
    root, out = work["root"], work["root"] / "slim"
    host = host_name()
    dead, live = _dead_pid(), os.getpid()
    leftovers = {f".slim-partial-{dead}@{host}-abcd1234": "dead", f".slim-old-{dead}@{host}-efgh5678": "dead",
                 f".slim-partial-{live}@{host}-ijkl9012": "live",  # a run still writing: not ours to remove
                 f".slim-partial-{dead}@other-host-mnop3456": "other host",  # its pid means nothing here
                 ".slim-partial-qrst7890": "no owner"}  # written before owners were named: unknown, kept
    for name in leftovers:
        (root / name).mkdir()
        (root / name / "model.safetensors").write_bytes(b"half a shard")
    succeeded(export_args(work, out))
    assert staging_names(root) == sorted(name for name, owner in leftovers.items() if owner != "dead")
    assert (out / EXPORT_MANIFEST).is_file()


def test_an_export_a_killed_run_had_moved_aside_is_put_back(work):
    """Killed between the two renames of a replacement: the target is gone and the old export sits in
    `.NAME-old-*`. The next run puts it back, so `--overwrite` replaces it and a plain run refuses."""
    root, out = work["root"], work["root"] / "slim"
    succeeded(export_args(work, out))
    aside = root / f".slim-old-{_dead_pid()}@{host_name()}-uvwx1234"
    aside.mkdir()
    os.replace(out, aside / "slim")
    kept = snapshot(aside / "slim")
    result = runner.invoke(app, export_args(work, out))
    assert result.exit_code == OutputError.exit_code and "already exists" in result.stderr.splitlines()[0]
    assert snapshot(out) == kept and staging_names(root) == []


# -- 3. outputs honour the umask ---------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o027, 0o002])
def test_exports_and_plans_get_the_modes_the_umask_gives(work, umask):
    previous = os.umask(umask)
    try:
        assert output_modes() == (0o777 & ~umask, 0o666 & ~umask)
        succeeded(export_args(work, work["root"] / "slim"))
        succeeded(["plan", str(work["report"]), "--drop", "1", "--keep-first", "0", "--keep-last", "0",
                   "--out", str(work["root"] / "plan2.yaml")])
    finally:
        os.umask(previous)
    folder, files = 0o777 & ~umask, 0o666 & ~umask
    slim = work["root"] / "slim"
    assert {path.name: oct(path.stat().st_mode & 0o777) for path in [slim, *slim.rglob("*")]} == \
        {path.name: oct(folder if path.is_dir() else files) for path in [slim, *slim.rglob("*")]}
    assert (work["root"] / "plan2.yaml").stat().st_mode & 0o777 == files


# -- 4. a recipe name cannot leave the reports folder ------------------------------------------------------

@pytest.mark.parametrize("name, words", [
    ("../escape", "must be a plain file name"), ("reports/../../x", "must be a plain file name"),
    ("/etc/cron.d/x", "must be a plain file name"), ("a\\b", "must be a plain file name"),
    ("..", "must be a plain file name"), (".", "must be a plain file name"), ("", "must be a plain file name"),
    ("   ", "must be a plain file name"), ("nul\x00byte", "must be a plain file name"),
    ("line\nbreak", "must be a plain file name"), ("x" * 300, "at most 200 bytes"),
    ("\ud800", "must be UTF-8 text"),
])
def test_a_recipe_name_that_is_not_a_plain_file_name_is_refused(work, name, words):
    recipe = {"name": name, "model": str(work["model"]), "plan": {"drop": 1}, "export": {"out": "exports/x"},
              "reports": str(work["root"] / "reports")}
    path = work["root"] / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))  # safe_dump escapes NUL, newlines and surrogates in double quotes
    line = refused(work["root"], ["run", str(path)], ConfigError.exit_code, words)
    assert "'name'" in line and "\x00" not in line


# -- 5. the value store: bad lines are skipped with one warning and recomputed -----------------------------

GAME = {"model": {"fingerprint": "f"}, "tasks": [{"name": "t", "doc_indices": [0, 1]}]}


def good(removed=("L0",), per_doc=(1.0, 0.0)) -> dict:
    score = sum(per_doc) / len(per_doc)
    return {"removed": list(removed), "score": score, "per_task": {"t": score}, "per_doc": {"t": list(per_doc)},
            "seconds": 0.5}


def edited(change) -> bytes:
    record = good()
    change(record)
    return json.dumps(record).encode()  # NaN and Infinity as Python's json writes them


def _set(key, value):
    return lambda record: record.__setitem__(key, value)


def _drop(key):
    return lambda record: record.pop(key)


BAD_LINES = {
    "not JSON": b'{"removed": ["L0"], "sco',
    "not UTF-8": b'{"removed": ["L0"], "score": 0.5, "\xff\xfe": 1}',
    "a JSON list": b"[1, 2, 3]",
    "a string score": edited(_set("score", "0.5")),
    "a boolean score": edited(_set("score", True)),
    "score NaN": edited(_set("score", math.nan)),
    "score Infinity": b'{"removed":["L0"],"score":Infinity,"per_task":{"t":0.5},"per_doc":{"t":[1.0,0.0]},"seconds":0.5}',
    "score 1e999": b'{"removed":["L0"],"score":1e999,"per_task":{"t":0.5},"per_doc":{"t":[1.0,0.0]},"seconds":0.5}',
    "per_task -Infinity": edited(_set("per_task", {"t": -math.inf})),
    "per_doc NaN": edited(_set("per_doc", {"t": [math.nan, 0.0]})),
    "no per_doc": edited(_drop("per_doc")),
    "no removed": edited(_drop("removed")),
    "no score": edited(_drop("score")),
    "no seconds": edited(_drop("seconds")),
    "removed not a list": edited(_set("removed", "L0")),
    "removed unsorted": edited(_set("removed", ["L1", "L0"])),
    "score not the mean of per_task": edited(_set("score", 0.9)),
    "per_doc of another task": edited(_set("per_doc", {"u": [1.0, 0.0]})),
    "a task the game does not have": edited(lambda r: (r.__setitem__("per_task", {"u": 0.5}),
                                                      r.__setitem__("per_doc", {"u": [1.0, 0.0]}))),
    "per_doc of the wrong length": edited(_set("per_doc", {"t": [1.0, 0.0, 1.0]})),
    "negative seconds": edited(_set("seconds", -1.0)),
    "a repeated key": b'{"removed":["L0"],"score":0.5,"score":0.5,"per_task":{"t":0.5},"per_doc":{"t":[1.0,0.0]},"seconds":0.5}',
    "a repeated key with a newline": b'{"removed":["L0"],"a\\nb":1,"a\\nb":2,"score":0.5}',
    "an empty object": b"{}",
    "null": b"null",
}


@pytest.mark.parametrize("line", BAD_LINES.values(), ids=BAD_LINES.keys())
def test_a_bad_store_line_is_skipped_with_one_warning(tmp_path, caplog, line):
    store = ValueStore(tmp_path, GAME)
    store.put(good(("L1",)))
    with store.path.open("ab") as handle:
        handle.write(line + b"\n" + line + b"\n")
    before = snapshot(tmp_path)
    with caplog.at_level(logging.WARNING, logger="cornerstone.store"):
        reread = ValueStore(tmp_path, GAME)
    assert reread.get(("L0",)) is None and reread.get(("L1",)) == good(("L1",)) and len(reread) == 1
    warnings = [r.getMessage() for r in caplog.records if r.name == "cornerstone.store"]
    assert len(warnings) == 1 and "skipped 2 lines" in warnings[0] and "line 2" in warnings[0], warnings
    assert "\n" not in warnings[0]
    reread.put(good())  # recomputed and stored again: the good line after the bad ones is the one used
    assert ValueStore(tmp_path, GAME).get(("L0",)) == good()
    assert changed(before, snapshot(tmp_path)) == {store.path.name}


def test_a_run_on_a_damaged_store_recomputes_the_values_and_writes_the_same_report(tiny_llama_dir, tmp_path, caplog):
    """A real store (the tiny model scored on a toy task) with every line damaged in another way: the
    next run warns once (a logging warning: stderr outside pytest, which captures it), recomputes every
    value and writes the report the first run wrote."""
    tasks = write_task(tmp_path / "tasks", "toy_store_bad", toy_docs(6))
    store = tmp_path / "values"
    base = ["score", str(tiny_llama_dir), "--tasks", "toy_store_bad", "--include-path", str(tasks), "--limit", "4",
            "--granularity", "block", "--batch-size", "4", "--store", str(store)]
    succeeded(base + ["--out", str(tmp_path / "first.json")])
    (lines_file,) = store.glob("*.jsonl")
    records = [json.loads(line) for line in lines_file.read_text().splitlines()]
    damages = [lambda r: r.__setitem__("score", "0.5"), lambda r: r.pop("per_doc"),
               lambda r: r.__setitem__("per_task", {name: math.nan for name in r["per_task"]}),
               lambda r: r["per_doc"][next(iter(r["per_doc"]))].append(math.inf)]
    assert len(records) == len(damages)
    damaged = []
    for record, damage in zip(records, damages):
        damage(record)
        damaged.append(json.dumps(record).encode())
    lines_file.write_bytes(b"\n".join(damaged + [b"\xff\xfe not utf-8"]) + b"\n")
    before = snapshot(tmp_path)
    with caplog.at_level(logging.WARNING, logger="cornerstone.store"):
        succeeded(base + ["--out", str(tmp_path / "second.json")])
    warnings = [r.getMessage() for r in caplog.records if r.name == "cornerstone.store"]
    assert len(warnings) == 1 and "skipped 5 lines" in warnings[0], warnings
    first, second = (json.loads((tmp_path / name).read_text()) for name in ("first.json", "second.json"))
    assert second["evaluations"] == first["evaluations"] == len(records)  # all computed again, none reused
    assert {n: p["importance"] for n, p in second["players"].items()} == \
        {n: p["importance"] for n, p in first["players"].items()}
    assert second["base_score"] == first["base_score"]
    assert {path.split(os.sep)[0] for path in changed(before, snapshot(tmp_path))} <= {"values", "second.json",
                                                                                      "second.md", "second.png"}


# -- 6. a plan without a fingerprint is refused unless --allow-other-model ---------------------------------

@pytest.mark.parametrize("fingerprint", [None, "", "   "], ids=["null", "empty", "blank"])
def test_a_plan_without_a_model_fingerprint_is_refused(work, fingerprint):
    data = yaml.safe_load(work["plan"].read_text())
    data["model"]["fingerprint"] = fingerprint
    work["plan"].write_text(yaml.safe_dump(data, sort_keys=False))
    out = work["root"] / "slim"
    line = refused(work["root"], export_args(work, out), PlanError.exit_code, "names no model fingerprint")
    assert str(work["plan"]) in line and not out.exists()
    succeeded(export_args(work, out, "--allow-other-model"))
    assert (out / EXPORT_MANIFEST).is_file()


def test_a_plan_for_another_model_exits_with_the_plan_code(work):
    data = yaml.safe_load(work["plan"].read_text())
    data["model"]["fingerprint"] = "folder-sha256:" + "0" * 64
    work["plan"].write_text(yaml.safe_dump(data, sort_keys=False))
    refused(work["root"], export_args(work, work["root"] / "slim"), PlanError.exit_code, "the plan was made for")


def test_remove_leftovers_never_touches_a_live_run(tmp_path):
    target = tmp_path / "out"
    mine = tmp_path / f".out-partial-{os.getpid()}@{host_name()}-zzzz0000"
    mine.mkdir()
    assert remove_leftovers(target) == [] and mine.is_dir()


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_store_record_mutations_are_used_as_written_or_skipped_with_one_warning(data, caplog):
    """Every single-field mutation of a valid record (the values the report and plan properties use) is
    either read back exactly as written, a record a value function can use, or skipped with one
    warning; never an exception, never a record with another meaning."""
    where = data.draw(st.sampled_from(paths(good())))
    mutated = mutate(good(), where, data.draw(st.sampled_from(VALUES)))
    caplog.clear()
    with tempfile.TemporaryDirectory() as folder, caplog.at_level(logging.WARNING, logger="cornerstone.store"):
        with ValueStore(folder, GAME).path.open("ab") as handle:
            handle.write(json.dumps(mutated).encode() + b"\n")  # NaN and Infinity as Python's json writes them
        reread = ValueStore(folder, GAME)
    warnings = [r.getMessage() for r in caplog.records if r.name == "cornerstone.store"]
    if len(reread) == 0:
        assert len(warnings) == 1 and "skipped 1 line" in warnings[0], warnings
        return
    assert warnings == [] and reread.get(tuple(mutated["removed"])) == mutated
    numbers = [mutated["score"], mutated["seconds"], *mutated["per_task"].values(), *mutated["per_doc"]["t"]]
    assert all(isinstance(n, (int, float)) and not isinstance(n, bool) and math.isfinite(n) for n in numbers)
    assert mutated["per_task"].keys() == {"t"} and len(mutated["per_doc"]["t"]) == 2
    assert math.isclose(mutated["score"], mutated["per_task"]["t"])
