"""Linear repair (ReplaceMe): the closed-form fit recovers a known map, the folded weights do what the fit says,
repair + dropping stays closer to the unpruned model than dropping alone on text it never saw, a repaired export
reloads stock with the same logits, and what cannot be repaired is refused in one line with a hint."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from cornerstone import harness
from cornerstone.calibration import Calibration
from cornerstone.errors import ConfigError, PlanError, UnsupportedArchitectureError
from cornerstone.estimators import Ablation
from cornerstone.export import export
from cornerstone.exported import load_exported
from cornerstone.loading import load_model
from cornerstone.masking import without
from cornerstone.planner import Planner, make_plan
from cornerstone.players import decoder_layers, parse_players
from cornerstone.repair import LinearRepair, _NormalEquations, output_projection, repair, spans
from cornerstone.scores import score

from .conftest import save_six_block_llama, tiny_model
from .tasks import toy_docs, write_task

WORDS = ("the river city old stone bridge north winter market grew after war king built road small "
         "church music film played team season first record sold island ship coast").split()


def write_text(path: Path, paragraphs: int, seed: int) -> Path:
    """Seeded word salad, one paragraph per blank-line-separated block: calibration and held-out text of one
    distribution, never the same paragraphs (different seeds)."""
    draw = random.Random(seed)
    path.write_text("\n\n".join(" ".join(draw.choice(WORDS) for _ in range(40)) for _ in range(paragraphs)))
    return path


def settings_for(path: Path, **fields) -> LinearRepair:
    return LinearRepair(calibration=Calibration(source=str(path), samples=64, max_length=64, batch_size=8), **fields)


@pytest.fixture(scope="module")
def six_block(tmp_path_factory):
    return save_six_block_llama(tmp_path_factory.mktemp("six-block"), seed=3)


def test_spans_are_maximal_runs():
    assert spans({7, 2, 3, 9, 10, 11}) == [(2, 3), (7, 7), (9, 11)]


def test_the_fit_recovers_a_known_map_from_batches_with_padding():
    """L = Y + M T exactly: summed over batches, with padding rows holding garbage, the solve gives T back."""
    generator = torch.Generator().manual_seed(0)
    hidden = 16
    truth = torch.randn(hidden, hidden, generator=generator, dtype=torch.float64)
    sums = _NormalEquations(hidden, torch.float64, "cpu")
    for _ in range(3):
        m = torch.randn(2, 50, hidden, generator=generator, dtype=torch.float64)
        y = torch.randn(2, 50, hidden, generator=generator, dtype=torch.float64)
        out = y + m @ truth
        real = torch.ones(2, 50, dtype=torch.bool)
        real[1, 30:] = False
        out[1, 30:] = 1e6  # padding: must never enter the sums
        sums.add(y + m, m, out, real)
    t, before, after = sums.solve(ridge=0.0)
    assert sums.tokens == 3 * 80
    assert (t - truth).abs().max() < 1e-9
    assert after < 1e-6 and before > 0.5


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2", "gpt_neox"])
def test_folded_weights_give_the_error_the_fit_reports(model_type, tokenizer, tmp_path):
    """After repair, the model with the span masked hands the next block a state whose distance from the unpruned
    model's equals the reported error_after, measured by forward passes (nn.Linear and GPT-2's Conv1D folds)."""
    model = tiny_model(model_type)
    calibration = write_text(tmp_path / "calibration.txt", 64, seed=0)
    original = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    settings = settings_for(calibration)
    _, layers = decoder_layers(model)

    def states(ids, mask, masked: bool):
        seen = {}
        hooks = [layers[i].register_forward_hook(lambda _m, _a, out, i=i: seen.__setitem__(i, out[0] if isinstance(out, tuple) else out))
                 for i in (0, 1)]
        try:
            with torch.no_grad(), without(model, parse_players(model, ["L1"]) if masked else []):
                model(input_ids=ids, attention_mask=mask)
        finally:
            for hook in hooks:
                hook.remove()
        return seen

    from cornerstone.calibration import calibration_texts, tokenize_texts
    from cornerstone.repair import _batches

    sequences = tokenize_texts(tokenizer, calibration_texts(settings.calibration), 64)
    batches = list(_batches(sequences, 8, "cpu"))
    targets = [states(ids, mask, masked=False)[1] for ids, mask in batches]
    result = repair(model, {1}, settings, tokenizer=tokenizer)
    (span,) = result.spans
    assert span.blocks == [1] and span.layer == 0 and span.module == output_projection(model, 0)[0]
    assert span.tokens == sum(len(s) for s in sequences)
    changed = {name for name, tensor in model.state_dict().items() if not torch.equal(tensor, original[name])}
    assert changed and all(name.startswith(span.module + ".") for name in changed)
    error = sum(float((states(ids, mask, masked=True)[0] - target)[mask.bool()].double().pow(2).sum())
                for (ids, mask), target in zip(batches, targets))
    before_states = [states(ids, mask, masked=False) for ids, mask in batches]  # now repaired: only block 0 changed
    scale = sum(float((target - (s[0] - _mlp_out(model, ids, mask)))[mask.bool()].double().pow(2).sum())
                for (ids, mask), target, s in zip(batches, targets, before_states))
    assert scale > 0
    assert span.error_after < span.error_before
    assert abs((error / scale) ** 0.5 - span.error_after) < 1e-4


def _mlp_out(model, ids, mask):
    """The (repaired) output projection's output of block 0 on one batch."""
    _, projection = output_projection(model, 0)
    seen = []
    hook = projection.register_forward_hook(lambda _m, _a, out: seen.append(out))
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        hook.remove()
    return seen[0]


def next_token_kl(full, pruned_logits, ids, mask) -> float:
    """Mean KL(full || pruned) of the next-token distributions over real tokens."""
    real = mask.bool()
    p = torch.log_softmax(full.double(), -1)[real]
    q = torch.log_softmax(pruned_logits.double(), -1)[real]
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.parametrize("order", ["sequential", "independent"])
def test_repair_keeps_the_pruned_model_closer_to_the_full_one_on_held_out_text(six_block, order, tmp_path):
    """KL of the next-token distribution from the unpruned model, on text no calibration read: repaired + dropped
    below plainly dropped, for one span and for a plan of two separate spans."""
    loaded = load_model(str(six_block), device="cpu")
    model = loaded.model
    calibration = write_text(tmp_path / "calibration.txt", 64, seed=1)
    held_out = [p for p in write_text(tmp_path / "held_out.txt", 16, seed=2).read_text().split("\n\n")]
    encoded = loaded.tokenizer(held_out, return_tensors="pt", padding=True, truncation=True, max_length=64)
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    original = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    for blocks in ({2, 3}, {1, 4}):
        model.load_state_dict(original)
        players = parse_players(model, [f"L{b}" for b in sorted(blocks)])
        with torch.no_grad():
            full = model(input_ids=ids, attention_mask=mask).logits
            with without(model, players):
                dropped = model(input_ids=ids, attention_mask=mask).logits
        result = repair(loaded, blocks, settings_for(calibration, order=order))
        assert [s.blocks for s in result.spans] == [[b] for b in sorted(blocks)] if blocks == {1, 4} else [[2, 3]]
        with torch.no_grad(), without(model, players):
            repaired = model(input_ids=ids, attention_mask=mask).logits
        plain, fixed = next_token_kl(full, dropped, ids, mask), next_token_kl(full, repaired, ids, mask)
        assert plain > 0 and fixed < plain, (blocks, plain, fixed)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    folder = write_task(tmp_path_factory.mktemp("repair-tasks"), "toy_repair", toy_docs(6))
    return folder, harness.load_tasks(["toy_repair"], include_paths=[folder])


def planned(loaded, toy, granularity: str, keep: list[str], drop: int):
    folder, specs = toy
    report = score(loaded, specs, estimator=Ablation(granularity=granularity), include_paths=[folder])
    return make_plan(report, Planner(granularity=granularity, drop=drop, keep_first=0, keep_last=0, keep=keep))


def test_a_repaired_export_reloads_stock_with_the_repaired_logits(six_block, toy, tmp_path):
    loaded = load_model(str(six_block), device="cpu")
    plan = planned(loaded, toy, "block", keep=["L0", "L1", "L4", "L5"], drop=2)
    assert plan.player_names == ["L2", "L3"]
    players = parse_players(loaded.model, plan.player_names)
    ids = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(7))
    with torch.no_grad(), without(loaded.model, players):
        plain = loaded.model(ids).logits
    settings = settings_for(write_text(tmp_path / "calibration.txt", 64, seed=4))
    given = {name: tensor.clone() for name, tensor in loaded.model.state_dict().items()}
    result = export(loaded, plan, tmp_path / "slim", repair=settings)
    assert result.format == "stock" and result.max_abs_logit_diff <= 1e-5
    assert [span.blocks for span in result.repair.spans] == [[2, 3]] and result.repair.spans[0].layer == 1
    # the caller's model comes back as it was given: the export holds the repair, not the loaded model
    assert all(torch.equal(tensor, given[name]) for name, tensor in loaded.model.state_dict().items())
    reloaded = load_exported(tmp_path / "slim", dtype=torch.float32)
    assert type(reloaded) is type(loaded.model) and reloaded.config.num_hidden_layers == 4
    with torch.no_grad():
        exported = reloaded(ids).logits
    repair(loaded, plan, settings)  # the same fit on the loaded model, masked: what the export must equal
    with torch.no_grad(), without(loaded.model, players):
        repaired = loaded.model(ids).logits
    assert (exported - repaired).abs().max() <= 1e-5
    assert (repaired - plain).abs().max() > 1e-3  # the repair is in the checkpoint, not lost on the way
    manifest = json.loads((tmp_path / "slim" / "cornerstone-export.json").read_text())
    assert manifest["repair"]["spans"][0]["module"] == result.repair.spans[0].module
    assert "Repaired:" in (tmp_path / "slim" / "README.md").read_text()


def test_repair_is_refused_where_it_cannot_apply_and_nothing_is_written(six_block, toy, tmp_path):
    loaded = load_model(str(six_block), device="cpu")
    sublayer = planned(loaded, toy, "sublayer", keep=[f"L{i}.{k}" for i in range(6) for k in ("attn", "mlp")
                                                       if (i, k) not in ((2, "attn"), (2, "mlp"), (4, "mlp"))], drop=3)
    settings = settings_for(write_text(tmp_path / "calibration.txt", 8, seed=5))
    refused_cleanly(loaded.model, lambda: export(loaded, sublayer, tmp_path / "slim", repair=settings),
                    PlanError, "sublayers alone")
    assert not (tmp_path / "slim").exists()
    with pytest.raises(ConfigError, match="GGUF"):
        export(loaded, sublayer, tmp_path / "slim.gguf", repair=settings, format="gguf")


def refused_cleanly(model, call, error: type, *words: str) -> None:
    """``call()`` raises ``error`` with a one-line message holding ``words`` and a hint, leaving the weights as they were."""
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(error) as failure:
        call()
    message = str(failure.value)
    assert "\n" not in message and failure.value.hint and "\n" not in failure.value.hint
    for word in words:
        assert word in message, message
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())


def test_what_cannot_be_repaired_is_refused_in_one_line(six_block, toy, tokenizer, tmp_path):
    loaded = load_model(str(six_block), device="cpu")
    model = loaded.model
    settings = settings_for(write_text(tmp_path / "calibration.txt", 8, seed=5))
    refused_cleanly(model, lambda: repair(loaded, {0, 1}, settings), PlanError, "starts at block 0", "L0..L1")
    refused_cleanly(model, lambda: repair(loaded, set(), settings), PlanError, "no block is removed")
    refused_cleanly(model, lambda: repair(loaded, {3, 9}, settings), PlanError, "[9]", "L0..L5")
    refused_cleanly(model, lambda: repair(loaded, set(range(6)), settings), PlanError, "every block")
    refused_cleanly(model, lambda: repair(loaded, {"3"}, settings), PlanError, "integers")
    refused_cleanly(model, lambda: repair(model, {3}, settings), ConfigError, "tokenizer")
    missing = LinearRepair(calibration=Calibration(source=str(tmp_path / "none.txt")))
    refused_cleanly(model, lambda: repair(loaded, {3}, missing), ConfigError, "does not exist")
    sublayer = planned(loaded, toy, "sublayer", keep=[f"L{i}.{k}" for i in range(6) for k in ("attn", "mlp")
                                                       if (i, k) not in ((2, "attn"), (2, "mlp"), (4, "mlp"))], drop=3)
    assert sorted(sublayer.player_names) == ["L2.attn", "L2.mlp", "L4.mlp"]
    refused_cleanly(model, lambda: repair(loaded, sublayer, settings), PlanError, "sublayers alone", "L4.mlp")
    with pytest.raises(PlanError) as failure:
        repair(loaded, {0}, settings)
    assert "--keep-first" in failure.value.hint


@pytest.mark.parametrize("model_type, words", [("gemma3_text", "a norm or gate follows its FFN"),
                                               ("mixtral", "mixture-of-experts")])
def test_architectures_where_the_map_cannot_be_folded_are_refused(model_type, words, tokenizer, tmp_path):
    model = tiny_model(model_type)
    settings = settings_for(write_text(tmp_path / "calibration.txt", 8, seed=6))
    refused_cleanly(model, lambda: repair(model, {1}, settings, tokenizer=tokenizer), UnsupportedArchitectureError, words)


def test_settings_refuse_unknown_fields():
    with pytest.raises(ValueError, match="extra"):
        LinearRepair(ridge=1e-6, lamda=1.0)
    with pytest.raises(ValueError):
        LinearRepair(ridge=-1.0)


def test_export_cli_repairs_and_refuses_repair_for_gguf(six_block, toy, tmp_path):
    from typer.testing import CliRunner

    from cornerstone.cli import app

    from .conftest import refused

    loaded = load_model(str(six_block), device="cpu")
    plan_file = planned(loaded, toy, "block", keep=["L0", "L1", "L4", "L5"], drop=2).save(tmp_path / "plan.yaml")
    text = write_text(tmp_path / "calibration.txt", 16, seed=8)
    result = CliRunner().invoke(app, ["export", str(six_block), str(plan_file), "--out", str(tmp_path / "slim"),
                                      "--repair", "--repair-text", str(text), "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["repair"]["spans"][0]["blocks"] == [2, 3] and printed["repair"]["texts"] == 16
    assert printed["repair"]["spans"][0]["error_after"] < printed["repair"]["spans"][0]["error_before"]
    refused(tmp_path, ["export", six_block, plan_file, "--out", tmp_path / "slim.gguf", "--format", "gguf", "--repair"],
            2, "--repair", "GGUF")
