"""End to end on the real SmolLM2-135M model and a bundled task: the main job of the README, smaller."""

import json

import pytest

from cornerstone import harness, report
from cornerstone.scores import ScoreReport, score

pytestmark = pytest.mark.slow


def test_bundled_tasks_are_registered():
    assert harness.list_tasks() == ["cs_antonyms", "cs_arithmetic", "cs_capitals", "cs_categories"]
    specs = harness.load_tasks(["cornerstone_bundled"])
    assert sorted(s.name for s in specs) == harness.list_tasks()
    assert sum(s.total_docs for s in specs) >= 400
    assert all(s.metric == "acc_norm" and s.chance == pytest.approx(0.25) for s in specs)


def test_sublayer_sweep_of_smollm2_finds_its_cornerstones(smollm2, tmp_path):
    result = score(smollm2, ["cs_capitals"], limit=30, seed=0, batch_size=32)
    assert list(result.players) == [f"L{i}.{k}" for i in range(30) for k in ("attn", "mlp")]
    assert result.evaluations == 61
    assert result.chance == pytest.approx(0.25)
    # the real model knows capitals well above chance; this is what makes cornerstones visible
    assert result.base_score > result.chance + 0.25
    for name, player in result.players.items():
        assert player.importance == pytest.approx(result.base_score - player.score_removed)
    # Removing the first FFN alone takes SmolLM2 to chance, as the paper reports for Llama3-8B's L0.mlp
    assert "L0.mlp" in result.cornerstones
    assert result.players["L0.mlp"].score_removed <= result.chance + 0.1
    assert all(result.players[c].share > 0 for c in result.cornerstones)
    assert sum(p.share for p in result.players.values()) == pytest.approx(1.0)

    json_path, [png_path] = report.save(result, tmp_path / "smollm2.json")
    again = ScoreReport.load(json_path)
    assert again == result
    assert json.loads(json_path.read_text())["cornerstones"] == result.cornerstones
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_full_model_score_matches_lm_eval_directly(smollm2):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    [spec] = harness.load_tasks(["cs_arithmetic"], limit=30)
    ours = harness.evaluate(harness.make_lm(smollm2.model, smollm2.tokenizer, batch_size=8), [spec])["cs_arithmetic"]
    direct = simple_evaluate(
        model=HFLM(pretrained=smollm2.model, tokenizer=smollm2.tokenizer, batch_size=8),
        tasks=["cs_arithmetic"], task_manager=harness.task_manager(include_defaults=False), limit=30, bootstrap_iters=0,
    )
    assert ours.score == pytest.approx(direct["results"]["cs_arithmetic"]["acc_norm,none"], abs=1e-12)
