"""The on-disk value store: values survive the process, torn lines are ignored, runs share values,
and Shapley scoring of a real (tiny) model resumes from it."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from cornerstone import harness, provenance
from cornerstone.estimators import ExactShapley, PermutationShapley
from cornerstone.loading import load_model
from cornerstone.players import enumerate_players
from cornerstone.scores import score
from cornerstone.store import KEYED_LIBRARIES, ValueStore
from cornerstone.value import ValueFunction

from .tasks import toy_docs, write_task


@pytest.fixture(scope="module")
def toy_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("store-tasks")
    write_task(folder, "toy_store", toy_docs(40))
    return folder


def record(removed, score_value=0.5):
    return {"removed": list(removed), "score": score_value, "per_task": {"t": score_value},
            "per_doc": {"t": [score_value]}, "seconds": 0.1}


def test_records_survive_and_a_torn_last_line_is_ignored(tmp_path):
    game = {"model": {"fingerprint": "x", "dtype": "float32"}, "tasks": []}
    first = ValueStore(tmp_path, game)
    first.put(record(["L0.mlp"], 0.3))
    first.put(record([], 0.7))
    with first.path.open("ab") as handle:
        handle.write(b'{"removed": ["L1.attn"], "sco')  # killed mid-write
    second = ValueStore(tmp_path, game)
    assert len(second) == 2 and second.get(("L0.mlp",))["score"] == 0.3
    assert second.get(("L1.attn",)) is None
    second.put(record(["L1.attn"], 0.4))  # starts on its own line
    third = ValueStore(tmp_path, game)
    assert third.get(("L1.attn",))["score"] == 0.4 and len(third) == 3
    # another game never sees these values
    assert len(ValueStore(tmp_path, {**game, "tasks": [{"name": "other"}]})) == 0


def test_a_second_store_sees_what_another_appended(tmp_path):
    game = {"model": {"fingerprint": "y", "dtype": "float32"}, "tasks": []}
    reader, writer = ValueStore(tmp_path, game), ValueStore(tmp_path, game)
    writer.put(record(["L2"], 0.1))
    assert reader.get(("L2",))["score"] == 0.1


def test_values_are_computed_once_across_value_functions(tiny_llama_dir, toy_folder, tmp_path):
    loaded = load_model(str(tiny_llama_dir))
    specs = harness.load_tasks(["toy_store"], include_paths=[toy_folder])
    players = enumerate_players(loaded.model)
    first = ValueFunction(loaded, specs, store=tmp_path)
    computed = first.evaluate_many([[], [players[0]], [players[1], players[2]]])
    assert first.evaluations == 3
    second = ValueFunction(loaded, specs, store=tmp_path)
    again = second.evaluate_many([[players[2], players[1]], [], [players[3]]])
    assert (second.evaluations, second.reused) == (1, 2)
    assert again[0].per_doc == computed[2].per_doc and again[1].score == computed[0].score


def test_values_of_edited_task_data_are_not_reused(tiny_llama_dir, tmp_path):
    loaded = load_model(str(tiny_llama_dir))
    docs = toy_docs(12)
    folder = write_task(tmp_path / "tasks", "toy_edited", docs)
    before = ValueFunction(loaded, harness.load_tasks(["toy_edited"], include_paths=[folder]), store=tmp_path / "v")
    old = before.evaluate().per_doc["toy_edited"]
    # same task name, version and documents, but the labels fixed: a real case (string labels read as wrong)
    flipped = [{**doc, "label": (doc["label"] + 1) % len(doc["choices"])} for doc in docs]
    write_task(tmp_path / "tasks", "toy_edited", flipped)
    harness._cached_manager.cache_clear()
    after = ValueFunction(loaded, harness.load_tasks(["toy_edited"], include_paths=[folder]), store=tmp_path / "v")
    new = after.evaluate().per_doc["toy_edited"]
    assert (after.evaluations, after.reused) == (1, 0)
    assert after.game() != before.game() and new != old


def rewrite_weights_keeping_size_and_mtime(folder):
    """Change one weight of ``folder``'s safetensors file in place; its size and modification time stay
    what they were (as a tool that restores dates would leave them)."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    before = path.stat()
    tensors = load_file(path)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1.0
    time.sleep(0.05)  # past the file system's timestamp tick, as any real edit is
    save_file(tensors, path, metadata={"format": "pt"})
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def test_a_value_is_reused_only_when_every_field_of_its_key_is_unchanged(tiny_llama_dir, tmp_path, monkeypatch):
    """Change the weights, the dtype, the engine, the attention implementation and each keyed library's
    version in turn: each computes the value again; the unchanged setup reads it back."""
    monkeypatch.setenv("CORNERSTONE_CACHE", str(tmp_path / "cache"))
    model_dir = shutil.copytree(tiny_llama_dir, tmp_path / "model")
    specs = harness.load_tasks(["toy_key"], include_paths=[write_task(tmp_path / "tasks", "toy_key", toy_docs(4))])

    def run(loaded, **options):
        """(computed, reused) for v(N) of ``loaded`` with the shared store."""
        value = ValueFunction(loaded, specs, store=tmp_path / "values", **options)
        value.evaluate([])
        return value.evaluations, value.reused

    loaded = load_model(str(model_dir))
    assert run(loaded) == (1, 0)
    assert run(loaded) == (0, 1)
    assert run(load_model(str(model_dir))) == (0, 1)  # another load of the same files: the same key
    assert run(load_model(str(model_dir), dtype="bfloat16")) == (1, 0)
    assert run(loaded, engine="lm-eval") == (1, 0)  # log-softmax in the model's dtype, not float32
    assert loaded.model.config._attn_implementation == "sdpa"
    loaded.model.set_attn_implementation("eager")
    assert run(loaded) == (1, 0)
    loaded.model.set_attn_implementation("sdpa")
    versions = provenance.package_versions()
    for library in KEYED_LIBRARIES:
        with monkeypatch.context() as patch:
            patch.setattr(provenance, "package_versions", lambda library=library: {**versions, library: "0.0.0"})
            assert run(loaded) == (1, 0), library
    rewrite_weights_keeping_size_and_mtime(model_dir)
    edited = load_model(str(model_dir))
    assert edited.fingerprint != loaded.fingerprint
    assert run(edited) == (1, 0)
    assert run(loaded) == (0, 1)  # nothing of the first setup's key has changed


def test_exact_shapley_of_a_model_sums_to_the_full_minus_empty_and_matches_enumeration(tiny_llama_dir, toy_folder):
    loaded = load_model(str(tiny_llama_dir))
    specs = harness.load_tasks(["toy_store"], include_paths=[toy_folder])
    chosen = ["L0.attn", "L0.mlp", "L1.mlp", "L2"]
    report = score(loaded, specs, estimator=ExactShapley(), players=chosen)
    assert report.method == "shapley" and report.evaluations == 2**4
    # brute force from the definition, on values of lm-eval's own loop (not the engine the estimator used):
    # phi_i = sum over S in N \ {i} of |S|! (n - |S| - 1)! / n! * (v(S + i) - v(S)), v(S) = only S present
    import itertools
    import math

    from cornerstone.players import parse_players
    from cornerstone.value import ValueFunction

    reference = ValueFunction(loaded, specs, engine="lm-eval")
    players = parse_players(loaded.model, chosen)
    n = len(players)

    def v(present: frozenset[int]) -> float:
        return reference.evaluate([players[j] for j in range(n) if j not in present]).score

    for i, name in enumerate(chosen):
        others = [j for j in range(n) if j != i]
        phi = sum(math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n)
                  * (v(frozenset(s) | {i}) - v(frozenset(s)))
                  for k in range(n) for s in itertools.combinations(others, k))
        assert report.players[name].importance == pytest.approx(phi, abs=1e-9), name
    assert abs(report.diagnostics["efficiency_gap"]) < 1e-12
    # player L2 is a whole block; the others are sublayers: the game is still a game over 4 players
    assert set(report.players) == set(chosen) and report.players["L2"].kind == "block"
    assert all(p.score_removed is not None for p in report.players.values())


def _score_command(folder, toy_folder, out, store):
    return [sys.executable, "-m", "cornerstone", "score", str(folder), "--method", "shapley", "--budget", "120",
            "--tasks", "toy_store", "--include-path", str(toy_folder), "--out", str(out), "--store", str(store), "--json"]


def test_a_killed_shapley_run_resumes_and_gives_the_uninterrupted_report(tiny_llama_dir, toy_folder, tmp_path):
    from .conftest import stored_values
    from .test_hardening import _stop, _wait_for

    uninterrupted = subprocess.run(_score_command(tiny_llama_dir, toy_folder, tmp_path / "a.json", tmp_path / "a"),
                                   capture_output=True, text=True, timeout=600)
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    expected = json.loads(uninterrupted.stdout)
    store = tmp_path / "b"
    for kill_at in (3, 12):  # SIGKILL once the store holds this many values: twice, at different points
        process = subprocess.Popen(_score_command(tiny_llama_dir, toy_folder, tmp_path / "b.json", store),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_for(process, lambda: stored_values(store) >= kill_at, f"{kill_at} stored values")
            process.send_signal(signal.SIGKILL)
        finally:
            _stop(process)
    lines = stored_values(store)
    assert 0 < lines < expected["evaluations"], "the kills should land mid-run"
    resumed = subprocess.run(_score_command(tiny_llama_dir, toy_folder, tmp_path / "b.json", store),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    got = json.loads(resumed.stdout)
    assert got["diagnostics"]["reused_evaluations"] >= lines - 1  # at most the evaluation in flight is lost
    assert got["diagnostics"]["computed_evaluations"] == expected["evaluations"] - got["diagnostics"]["reused_evaluations"]
    assert {n: p["importance"] for n, p in got["players"].items()} == {n: p["importance"] for n, p in expected["players"].items()}
    assert got["cornerstones"] == expected["cornerstones"]


def test_permutation_shapley_on_a_model_agrees_with_exact_within_its_intervals(tiny_llama_dir, toy_folder):
    loaded = load_model(str(tiny_llama_dir))
    specs = harness.load_tasks(["toy_store"], include_paths=[toy_folder])
    chosen = ["L0.attn", "L0.mlp", "L1.attn", "L1.mlp", "L2.attn"]
    exact = score(loaded, specs, estimator=ExactShapley(), players=chosen)
    # 32 coalitions exist: the sampler sees them all and then draws permutations for free (up to its query cap)
    sampled = score(loaded, specs, estimator=PermutationShapley(budget=40, truncation=0.0, seed=1), players=chosen)
    assert sampled.diagnostics["samples"] > 20
    for name in chosen:
        error = abs(sampled.players[name].importance - exact.players[name].importance)
        assert error <= 4 * sampled.players[name].stderr + 1e-9
