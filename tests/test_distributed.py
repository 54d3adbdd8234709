"""Multi-process scoring (torch.distributed, gloo on CPU): a 2-process job gives exactly the report of one
process, on a tiny model and on SmolLM2, for ablation and for a sampling Shapley estimator; a killed
2-process job resumes from the shared store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cornerstone.cli import _without_option
from cornerstone.distributed import Ranks, launch_command

from .conftest import stored_values
from .tasks import toy_docs, write_task

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def six_blocks(tmp_path_factory):
    """A tiny Llama with 6 blocks (12 sublayers) and a 12-document task."""
    from .conftest import save_six_block_llama

    folder = save_six_block_llama(tmp_path_factory.mktemp("six"), seed=1)
    return folder, write_task(folder / "tasks", "toy_split", toy_docs(12))


def _environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _score(model: str, out: Path, store: Path | None, extra: list[str], processes: int = 1) -> dict:
    command = [sys.executable, "-m", "cornerstone", "score", model, "--out", str(out), "--json", *extra,
               *(["--store", str(store)] if store else ["--no-store"]), "--num-processes", str(processes)]
    done = subprocess.run(command, capture_output=True, text=True, env=_environment(), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def _same_scores(a: dict, b: dict) -> None:
    assert a["base_score"] == b["base_score"] and a["cornerstones"] == b["cornerstones"]
    for name, player in a["players"].items():
        other = b["players"][name]
        assert (player["importance"], player["score_removed"], player["per_task_removed"]) == \
            (other["importance"], other["score_removed"], other["per_task_removed"]), name


@pytest.mark.parametrize("method", [["--method", "ablation"], ["--method", "shapley", "--estimator", "permutation",
                                                                  "--budget", "24", "--granularity", "block"]])
def test_two_processes_give_the_single_process_report(six_blocks, method, tmp_path):
    folder, tasks = six_blocks
    extra = ["--tasks", "toy_split", "--include-path", str(tasks), "--batch-size", "4", *method]
    single = _score(str(folder), tmp_path / "one.json", None, extra)
    store = tmp_path / "store"
    split = _score(str(folder), tmp_path / "two.json", store, extra, processes=2)
    _same_scores(single, split)
    assert split["settings"]["processes"] == 2 and single["settings"]["processes"] == 1
    assert split["evaluations"] == single["evaluations"]
    # every value was computed once, by one of the two ranks, and stored for the next run
    stored = [json.loads(line) for path in store.glob("*.jsonl") for line in path.read_text().splitlines()]
    assert len(stored) == len({tuple(r["removed"]) for r in stored}) == split["diagnostics"]["computed_evaluations"]
    again = _score(str(folder), tmp_path / "again.json", store, extra, processes=2)
    _same_scores(single, again)
    assert again["diagnostics"]["computed_evaluations"] == 0


def test_a_killed_two_process_job_resumes_from_the_shared_store(six_blocks, tmp_path):
    import psutil  # imported before the job starts: nothing slow between seeing the state and the kill

    folder, tasks = six_blocks
    extra = ["--tasks", "toy_split", "--include-path", str(tasks), "--batch-size", "4", "--method", "shapley",
             "--estimator", "exact", "--granularity", "block"]
    reference = _score(str(folder), tmp_path / "ref.json", None, extra)
    assert reference["evaluations"] == 2**6
    store = tmp_path / "store"
    command = [sys.executable, "-m", "cornerstone", "score", str(folder), "--out", str(tmp_path / "killed.json"),
               "--store", str(store), "--num-processes", "2", *extra]
    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_environment())
    launcher = psutil.Process(job.pid)
    try:
        # kill on a state, not a time: once both ranks are scoring (v(N) and at least two more values stored),
        # with some 60 of the 64 values still to come, so the job cannot have finished first
        deadline = time.monotonic() + 600
        while stored_values(store) < 3:
            assert job.poll() is None, f"the job ended (exit code {job.returncode}) before 3 values were stored"
            assert time.monotonic() < deadline, "no values stored after 600 s"
            time.sleep(0.005)
        ranks = launcher.children(recursive=True)  # torchrun starts each rank in a session of its own
        for process in [*ranks, launcher]:
            process.send_signal(signal.SIGKILL)
        psutil.wait_procs(ranks, timeout=10)
    finally:
        if job.poll() is None:
            job.kill()
        job.wait()
    killed_at = stored_values(store)
    assert 3 <= killed_at < reference["evaluations"], "the job finished before it could be killed"
    assert not (tmp_path / "killed.json").exists()
    resumed = _score(str(folder), tmp_path / "resumed.json", store, extra, processes=2)
    print(f"killed with {killed_at} of {reference['evaluations']} values stored; the resumed job computed "
          f"{resumed['diagnostics']['computed_evaluations']}")
    assert resumed["diagnostics"]["computed_evaluations"] == reference["evaluations"] - killed_at
    _same_scores(reference, resumed)


@pytest.mark.slow
def test_two_processes_on_smollm2_equal_one(smollm2, tmp_path):
    extra = ["--tasks", "cs_capitals,cs_antonyms", "--limit", "12", "--players", "L0.attn,L0.mlp,L1.attn,L14.mlp,L29.mlp",
             "--batch-size", "8"]
    single = _score("smollm2-135m", tmp_path / "one.json", None, extra)
    split = _score("smollm2-135m", tmp_path / "two.json", None, extra, processes=2)
    _same_scores(single, split)
    assert single["cornerstones"]  # the early sublayers are cornerstones here, so the comparison has teeth


def test_launch_command_and_argument_handling():
    command = launch_command(3, ["score", "m", "--json"])
    assert command[1:4] == ["-m", "torch.distributed.run", "--standalone"] and "--nproc-per-node=3" in command
    assert command[-4:] == ["cornerstone", "score", "m", "--json"]
    assert _without_option(["score", "--num-processes", "2", "--json"], "--num-processes") == ["score", "--json"]
    assert _without_option(["score", "--num-processes=2", "m"], "--num-processes") == ["score", "m"]
    assert not Ranks(rank=1, world=3, local_rank=1).main and Ranks(rank=0, world=3, local_rank=0).main


def test_a_model_placed_by_device_map_scores_like_one_in_memory(tmp_path):
    """Big-model placement (accelerate): with too little memory allowed, weights go to disk and each
    layer's hook brings them in; removal hooks and the engine's prefix reuse must still give the same report."""
    from cornerstone import harness
    from cornerstone.estimators import Ablation
    from cornerstone.loading import load_model
    from cornerstone.scores import score

    from .conftest import tiny_model, tiny_tokenizer

    folder = tmp_path / "model"
    model = tiny_model("llama")
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    tasks = write_task(tmp_path / "tasks", "toy_placed", toy_docs(8))
    specs = harness.load_tasks(["toy_placed"], include_paths=[tasks])
    in_memory = score(load_model(str(folder), device="cpu"), specs, estimator=Ablation(), store=None)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    placed = load_model(str(folder), device_map="auto", max_memory={"cpu": weights // 2})
    assert "disk" in placed.extra["device_map"].values() and placed.device == "cpu"
    offloaded = score(placed, specs, estimator=Ablation(), store=None)  # computed again, not read from the store
    assert offloaded.base_score == in_memory.base_score
    for name, player in in_memory.players.items():
        assert offloaded.players[name].per_task_removed == player.per_task_removed, name
    # one replica over all devices and several processes exclude each other
    from typer.testing import CliRunner

    from cornerstone.cli import app
    from cornerstone.errors import ConfigError

    refused = CliRunner().invoke(app, ["score", str(folder), "--device-map", "auto", "--num-processes", "2"])
    assert refused.exit_code == ConfigError.exit_code and "several processes" in refused.stderr
    bad = CliRunner().invoke(app, ["score", str(folder), "--device-map", "auto", "--max-memory", "0"])
    assert bad.exit_code == ConfigError.exit_code and "DEVICE=AMOUNT" in bad.stderr
