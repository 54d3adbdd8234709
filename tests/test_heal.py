"""Healing: a tiny pruned model fine-tuned on a toy corpus learns (loss goes down), comes out as a stock
checkpoint with its layer count unchanged, resumes after a kill exactly, and refuses dishonest or
impossible settings."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cornerstone import harness
from cornerstone.cli import app
from cornerstone.errors import ConfigError, HealError
from cornerstone.estimators import Ablation
from cornerstone.export import export
from cornerstone.heal import Healing, batch_indices, checkpoint_dir, heal, pack
from cornerstone.loading import load_model
from cornerstone.planner import Planner, make_plan
from cornerstone.scores import score

from .conftest import tiny_model
from .tasks import toy_docs, write_task

CORPUS = "\n\n".join(["Question: What is the capital of France? Answer: Paris",
                      "What is 2 + 3? Answer: 5", "Question: What is the capital of Italy? Answer: Rome"] * 12)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, tokenizer) -> tuple[Path, Path]:
    """A tiny Llama (3 blocks) and its export with one block dropped."""
    root = tmp_path_factory.mktemp("heal")
    base = root / "base"
    tiny_model("llama").save_pretrained(base)
    tokenizer.save_pretrained(base)
    loaded = load_model(str(base), device="cpu")
    tasks = write_task(root / "tasks", "toy_heal", toy_docs(6))
    report = score(loaded, harness.load_tasks(["toy_heal"], include_paths=[tasks]),
                   estimator=Ablation(granularity="block"), include_paths=[tasks])
    plan = make_plan(report, Planner(granularity="block", drop=1, keep_first=0, keep_last=0))
    export(loaded, plan, root / "slim")
    (root / "corpus.txt").write_text(CORPUS)
    return base, root / "slim"


# a random tiny model's frozen head caps its logits near uniform, so the adapters reach the head too
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def settings(corpus: Path, **overrides) -> Healing:
    values = dict(data=str(corpus), steps=30, learning_rate=1e-2, warmup=2, sequence_length=16, batch_size=4, rank=4,
                  target_modules=TARGETS, checkpoint_every=5)
    return Healing(**{**values, **overrides})


def test_lora_heals_a_tiny_pruned_model_into_a_stock_checkpoint(pruned, tmp_path):
    from transformers import AutoModelForCausalLM

    base, slim = pruned
    result = heal(slim, tmp_path / "healed", settings(slim.parent / "corpus.txt"))
    assert result.last_loss < 0.8 * result.first_loss, [round(h["loss"], 2) for h in result.history]
    assert result.layers == 2 and result.trained_parameters < result.parameters / 4
    healed = AutoModelForCausalLM.from_pretrained(tmp_path / "healed")  # stock transformers, no remote code
    original = AutoModelForCausalLM.from_pretrained(slim)
    assert healed.config.num_hidden_layers == original.config.num_hidden_layers == 2
    assert type(healed) is type(original)
    healed_state, original_state = healed.state_dict(), original.state_dict()
    assert healed_state.keys() == original_state.keys()  # merged: no adapter weights left
    assert any(not torch.equal(healed_state[k], original_state[k]) for k in original_state)
    files = set(os.listdir(tmp_path / "healed"))
    assert {"model.safetensors", "config.json", "tokenizer.json", "cornerstone-plan.yaml", "cornerstone-heal.json"} <= files
    manifest = json.loads((tmp_path / "healed" / "cornerstone-heal.json").read_text())
    assert manifest["settings"]["method"] == "lora" and len(manifest["history"]) == 30
    assert not checkpoint_dir(tmp_path / "healed").exists()


def test_a_killed_healing_run_resumes_to_the_same_weights(pruned, tmp_path):
    base, slim = pruned
    healing = settings(slim.parent / "corpus.txt", steps=12, distill=0.5, teacher=str(base))
    straight = heal(slim, tmp_path / "straight", healing)
    assert {"ce", "kl"} <= set(straight.history[0])

    def kill_at_step_8(done: int, total: int, what: str) -> None:
        if done == 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        heal(slim, tmp_path / "resumed", healing, progress=kill_at_step_8)
    assert not (tmp_path / "resumed").exists()
    assert json.loads((checkpoint_dir(tmp_path / "resumed") / "state.json").read_text())["step"] == 5
    resumed = heal(slim, tmp_path / "resumed", healing)
    assert resumed.resumed_from_step == 5
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in straight.history], rel=1e-5)
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    with pytest.raises(HealError, match="other settings"):
        with pytest.raises(KeyboardInterrupt):
            heal(slim, tmp_path / "other", healing, progress=kill_at_step_8)
        heal(slim, tmp_path / "other", healing.model_copy(update={"seed": 1}))


DAMAGES = {
    "state.json cut short": ("state.json", lambda raw: raw[: len(raw) // 2]),
    "state.json edited past the last step": ("state.json", lambda raw: raw.replace(b'"step": 5', b'"step": 50')),
    "state.json with a step that is not a number": ("state.json", lambda raw: raw.replace(b'"step": 5', b'"step": "5"')),
    "trainable weights cut short": ("trainable.safetensors", lambda raw: raw[: len(raw) // 2]),
    "optimizer state cut short": ("optimizer.pt", lambda raw: raw[: len(raw) // 2]),
    "best weights cut short": ("best.safetensors", lambda raw: raw[: len(raw) // 2]),
    "best weights deleted": ("best.safetensors", lambda raw: None),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_checkpoint_is_refused_in_one_line_and_kept(pruned, tmp_path, damage):
    """A checkpoint cut by a full disk or edited by hand is refused before a step trains on it: the run would
    otherwise resume from half-loaded weights, or at a step it never reached, and write a model without a word."""
    base, slim = pruned
    healing = settings(slim.parent / "corpus.txt", steps=12, eval_every=2)  # best weights by the checkpoint

    def kill_at_step_6(done: int, total: int, what: str) -> None:
        if done == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        heal(slim, tmp_path / "healed", healing, progress=kill_at_step_6)
    name, edit = DAMAGES[damage]
    target = checkpoint_dir(tmp_path / "healed") / name
    damaged = edit(target.read_bytes())
    if damaged is None:
        target.unlink()
    else:
        target.write_bytes(damaged)
    with pytest.raises(HealError, match="damaged") as caught:
        heal(slim, tmp_path / "healed", healing)
    assert "\n" not in str(caught.value) and "Delete that folder" in caught.value.hint
    assert (target.read_bytes() if target.exists() else None) == damaged  # left as it was
    assert not (tmp_path / "healed").exists()  # nothing written


def test_full_fine_tuning_trains_every_weight(pruned, tmp_path):
    _, slim = pruned
    result = heal(slim, tmp_path / "full", settings(slim.parent / "corpus.txt", method="full", steps=6, learning_rate=1e-3))
    assert result.trained_parameters == result.parameters and result.last_loss < result.first_loss


def test_batches_are_a_function_of_seed_and_step_and_cover_every_window():
    seen = torch.cat([batch_indices(step, 10, 5, seed=3) for step in range(2)])
    assert sorted(seen.tolist()) == list(range(10))  # one epoch visits every window once
    assert torch.equal(batch_indices(7, 10, 5, seed=3), batch_indices(7, 10, 5, seed=3))
    assert not torch.equal(batch_indices(0, 10, 5, seed=3), batch_indices(0, 10, 5, seed=4))


def test_the_held_out_windows_are_a_seeded_share_capped_and_never_trained_on():
    from cornerstone.heal import split_windows

    windows = torch.arange(1000).view(1000, 1)
    train, held = split_windows(windows, 0.1, seed=3, limit=64)
    assert len(held) == 64 and len(train) == 936  # a tenth would be 100: a validation pass costs at most 64 windows
    assert set(train[:, 0].tolist()).isdisjoint(held[:, 0].tolist())
    assert sorted(train[:, 0].tolist() + held[:, 0].tolist()) == list(range(1000))
    assert torch.equal(split_windows(windows, 0.1, seed=3, limit=64)[1], held)
    assert not torch.equal(split_windows(windows, 0.1, seed=4, limit=64)[1], held)
    assert len(split_windows(windows[:50], 0.1, seed=3, limit=64)[1]) == 5  # below the cap: the share
    assert split_windows(windows, 0.0, seed=3, limit=64)[1] is None


def test_packing_opens_each_window_with_bos(tokenizer):
    windows = pack(tokenizer, ["What is 2 + 3? Answer: 5"] * 6, 8)
    assert windows.shape[1] == 8
    if tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id]:
        assert (windows[:, 0] == tokenizer.bos_token_id).all()
    with pytest.raises(ConfigError, match="fewer than one window"):
        pack(tokenizer, ["hi"], 64)


def test_healing_refuses_dishonest_or_impossible_settings(pruned, tmp_path):
    _, slim = pruned
    with pytest.raises(ConfigError, match="which the evaluation uses"):
        heal(slim, tmp_path / "x", Healing(data="cs_capitals,cs_antonyms"), evaluation_tasks=["cs_capitals"])
    with pytest.raises(ConfigError, match="cs_antonyms, cs_arithmetic"):  # tags are expanded on both sides
        heal(slim, tmp_path / "x", Healing(data="cs_antonyms,cs_arithmetic"), evaluation_tasks=["cornerstone_bundled"])
    anonymous = tmp_path / "anonymous"  # an export whose manifest does not name the model it was cut from
    import shutil

    shutil.copytree(slim, anonymous)
    (anonymous / "cornerstone-export.json").unlink()
    with pytest.raises(ConfigError, match="teacher"):
        heal(anonymous, tmp_path / "x", Healing(data=str(slim.parent / "corpus.txt"), distill=0.5))
    with pytest.raises(HealError, match="not an exported model folder"):
        heal(tmp_path, tmp_path / "x", Healing(data=str(slim.parent / "corpus.txt")))
    (tmp_path / "taken").mkdir()
    with pytest.raises(HealError, match="already exists"):
        heal(slim, tmp_path / "taken", Healing(data=str(slim.parent / "corpus.txt")))


def test_cli_heal_prints_json_and_maps_errors(pruned, tmp_path):
    _, slim = pruned
    runner = CliRunner()
    done = runner.invoke(app, ["heal", str(slim), "--data", str(slim.parent / "corpus.txt"), "--out", str(tmp_path / "h"),
                               "--steps", "4", "--sequence-length", "16", "--batch-size", "2", "--rank", "2", "--json"])
    assert done.exit_code == 0, done.output
    payload = json.loads(done.stdout)
    assert payload["steps"] == 4 and payload["layers"] == 2 and "history" not in payload
    refused = runner.invoke(app, ["heal", str(slim), "--data", "cs_capitals", "--out", str(tmp_path / "h2"),
                                  "--not-on", "cs_capitals,cs_antonyms"])
    assert refused.exit_code == ConfigError.exit_code and "which the evaluation uses" in refused.stderr
    bad = runner.invoke(app, ["heal", str(slim), "--data", "x.txt", "--out", str(tmp_path / "h3"), "--method", "magic"])
    assert bad.exit_code == ConfigError.exit_code and "invalid healing option" in bad.stderr


def test_the_final_check_scores_both_models_on_documents_never_trained_or_scored_on(pruned, tmp_path, monkeypatch):
    """The check's pruned score is lm-eval's own loop on the pruned folder, on documents of a task drawn away
    from what the plan scored; training never sees them."""
    base, slim = pruned
    healed = heal(slim, tmp_path / "h", settings(slim.parent / "corpus.txt", steps=6, check_tasks=["cs_capitals"],
                                                 check_limit=8, distill=0))
    check = healed.check
    assert check is not None and list(check.tasks) == ["cs_capitals"] and len(check.tasks["cs_capitals"]) == 8
    loaded = load_model(str(slim), device="cpu")
    specs = harness.load_tasks(["cs_capitals"], documents={"cs_capitals": harness.DocumentRecord(
        name="cs_capitals", doc_indices=check.tasks["cs_capitals"], total_docs=harness.load_tasks(["cs_capitals"])[0].total_docs)})
    lm = harness.make_lm(loaded.model, loaded.tokenizer, batch_size=4)
    assert check.pruned_score == pytest.approx(harness.run_tasks(lm, specs)["cs_capitals"].score)
    written = load_model(str(tmp_path / "h"), device="cpu")
    expected = check.healed_score if healed.kept == "healed" else check.pruned_score
    lm = harness.make_lm(written.model, written.tokenizer, batch_size=4)
    assert harness.run_tasks(lm, specs)["cs_capitals"].score == pytest.approx(expected)


@pytest.mark.parametrize("before, after, kept", [(0.6, 0.5, "pruned"), (0.5, 0.5, "pruned"), (0.5, 0.6, "healed")])
def test_healed_weights_are_written_only_when_the_check_scores_them_higher(pruned, tmp_path, monkeypatch,
                                                                             before, after, kept):
    from types import SimpleNamespace

    from cornerstone import heal as heal_module

    _, slim = pruned
    scores = __import__("itertools").cycle([before, after])
    monkeypatch.setattr(heal_module, "_check_score", lambda *a, **k: SimpleNamespace(
        score=next(scores), per_doc={"cs_capitals": [0.0, 1.0]}))
    result = heal(slim, tmp_path / "h", settings(slim.parent / "corpus.txt", steps=3, check_tasks=["cs_capitals"],
                                                 check_limit=2, distill=0))
    assert result.kept == kept and result.check.difference == pytest.approx(after - before)
    same = [(tmp_path / "h" / f.name).read_bytes() == f.read_bytes() for f in slim.glob("*.safetensors")]
    assert all(same) if kept == "pruned" else not any(same)
    assert "kept unchanged" in result.check.verdict if kept == "pruned" else "are kept" in result.check.verdict
    always = heal(slim, tmp_path / "a", settings(slim.parent / "corpus.txt", steps=3, check_tasks=["cs_capitals"],
                                                 check_limit=2, distill=0, keep="always")) if kept == "pruned" else None
    if always is not None:
        assert always.kept == "healed"


def test_training_stops_when_the_held_out_loss_stops_improving(pruned, tmp_path):
    _, slim = pruned
    # a learning rate far too high: the held-out loss rises after the first steps
    result = heal(slim, tmp_path / "h", settings(slim.parent / "corpus.txt", steps=30, learning_rate=3.0, warmup=0,
                                                 eval_every=1, patience=2, check=False, distill=0))
    validations = [(entry["step"], entry["validation"]) for entry in result.history if "validation" in entry]
    best_step, best = min(validations, key=lambda pair: (pair[1], pair[0]))
    assert result.stopped_early and result.steps < 30 and result.steps == best_step + 2
    assert result.best_step == best_step and result.best_validation_loss == pytest.approx(best)
    assert result.unchecked == "check: false"
