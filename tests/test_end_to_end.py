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
    # v(N) and v(N minus L0.mlp) again through lm-eval's own loop (not the engine the sweep used), with the
    # FFN removed by the masking hooks: the report's numbers must be these
    from cornerstone.masking import without
    from cornerstone.players import parse_players

    specs = harness.load_tasks(["cs_capitals"], limit=30, seed=0)
    lm = harness.make_lm(smollm2.model, smollm2.tokenizer, batch_size=32)
    full = harness.run_tasks(lm, specs)["cs_capitals"].score
    with without(smollm2.model, parse_players(smollm2.model, ["L0.mlp"])):
        without_ffn = harness.run_tasks(lm, specs)["cs_capitals"].score
    assert result.base_score == pytest.approx(full, abs=1e-12)
    assert result.players["L0.mlp"].score_removed == pytest.approx(without_ffn, abs=1e-12)
    assert result.players["L0.mlp"].importance == pytest.approx(full - without_ffn, abs=1e-12)
    # Removing the first FFN alone takes SmolLM2 to chance, as the paper reports for Llama3-8B's L0.mlp
    assert "L0.mlp" in result.cornerstones
    assert without_ffn <= result.chance + 0.1
    # its share of the total positive importance, from the lm-eval numbers
    positive_total = sum(max(p.importance, 0.0) for p in result.players.values())
    assert result.players["L0.mlp"].share == pytest.approx((full - without_ffn) / positive_total)
    assert all(result.players[c].share > 0 for c in result.cornerstones)
    assert all(p.share == 0 for p in result.players.values() if p.importance <= 0)

    json_path, [png_path] = report.save(result, tmp_path / "smollm2.json")
    again = ScoreReport.load(json_path)
    assert again == result
    assert json.loads(json_path.read_text())["cornerstones"] == result.cornerstones
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_full_model_score_matches_lm_eval_directly(smollm2):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    [spec] = harness.load_tasks(["cs_arithmetic"], limit=30)
    ours = harness.run_tasks(harness.make_lm(smollm2.model, smollm2.tokenizer, batch_size=8), [spec])["cs_arithmetic"]
    direct = simple_evaluate(
        model=HFLM(pretrained=smollm2.model, tokenizer=smollm2.tokenizer, batch_size=8),
        tasks=["cs_arithmetic"], task_manager=harness.task_manager(include_defaults=False), limit=30, bootstrap_iters=0,
    )
    assert ours.score == pytest.approx(direct["results"]["cs_arithmetic"]["acc_norm,none"], abs=1e-12)


def test_real_benchmarks_read_shared_data_where_it_lies(shared_data):
    sizes = {"cs_real_arc_challenge": 1172, "cs_real_arc_easy": 2376, "cs_real_boolq": 3270, "cs_real_piqa": 1838}
    assert [s.name for s in harness.load_tasks(["cornerstone_real"], limit=2)] == sorted(sizes)
    sizes |= {"cs_real_copa": 100, "cs_real_hellaswag": 10042, "cs_real_lambada_openai": 5153, "cs_real_openbookqa": 500,
              "cs_real_sst2": 872, "cs_real_truthfulqa_mc1": 817, "cs_real_winogrande": 1267}
    assert harness.list_tasks(real=True) == sorted(sizes)
    specs = {s.name: s for s in harness.load_tasks(["cornerstone_real_all"], limit=50, seed=0)}
    assert {name: s.total_docs for name, s in specs.items()} == sizes
    assert sorted(s.name for s in harness.load_tasks(["cornerstone_paper"], limit=2)) == [
        "cs_real_arc_challenge", "cs_real_arc_easy", "cs_real_boolq", "cs_real_openbookqa", "cs_real_piqa", "cs_real_winogrande"]
    # labels come from true/false strings, a separate .lst file, a tsv column, a bz2 text and a JSON map
    for name, labels in {"cs_real_boolq": {0, 1}, "cs_real_piqa": {0, 1}, "cs_real_sst2": {0, 1},
                         "cs_real_hellaswag": {0, 1, 2, 3}, "cs_real_openbookqa": {0, 1, 2, 3}}.items():
        task = specs[name].task
        assert {task.doc_to_target(task.eval_docs[i]) for i in specs[name].doc_indices} == labels, name
    copa = specs["cs_real_copa"]
    assert {copa.task.eval_docs[i]["label"] for i in copa.doc_indices} == {0, 1}
    truthful = specs["cs_real_truthfulqa_mc1"].task.eval_docs[0]
    assert truthful["mc1_targets"]["labels"][0] == 1 and sum(truthful["mc1_targets"]["labels"]) == 1
    winogrande = specs["cs_real_winogrande"].task
    doc = winogrande.eval_docs[0]  # "Sarah was a much better surgeon than Maria so _ always got the easier cases."
    assert winogrande.doc_to_choice(doc) == ["Sarah was a much better surgeon than Maria so Sarah",
                                             "Sarah was a much better surgeon than Maria so Maria"]
    assert winogrande.doc_to_target(doc) == "always got the easier cases." and winogrande.doc_to_text(doc) == 1
    assert specs["cs_real_piqa"].chance == pytest.approx(0.5) and specs["cs_real_arc_easy"].metric == "acc_norm"
    assert specs["cs_real_lambada_openai"].chance == 0.0 and specs["cs_real_lambada_openai"].output_type == "loglikelihood"


FRESH_PROCESS = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, trust_remote_code=sys.argv[4] == "1")
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[2])).logits, sys.argv[3])
print(type(model).__name__, model.config.num_hidden_layers, sum(p.numel() for p in model.parameters()))
"""


@pytest.mark.parametrize("granularity, drop, layout", [("block", 8, "stock"), ("sublayer", 16, "decilm")])
def test_smollm2_export_reloads_in_a_fresh_process_with_the_masked_logits(smollm2, granularity, drop, layout, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    import torch

    from cornerstone.export import export
    from cornerstone.exported import probe_ids
    from cornerstone.masking import without
    from cornerstone.planner import Planner, make_plan
    from cornerstone.players import parse_players

    committed = Path(__file__).resolve().parents[1] / "reports" / "sweeps" / "smollm2-135m-ablation-sublayer.json"
    plan = make_plan(committed, Planner(granularity=granularity, drop=drop), loaded=smollm2)
    assert len(plan.removed) == drop and not {f"L{r.layer}" for r in plan.removed} & {"L0", "L29"}
    cornerstone_layers = {int(name[1:].split(".")[0]) for name in plan.report["cornerstones"]}
    assert cornerstone_layers and not {r.layer for r in plan.removed} & cornerstone_layers
    result = export(smollm2, plan, tmp_path / "slim")
    assert result.format == layout
    ids = probe_ids(smollm2.model.config.vocab_size)
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad(), without(smollm2.model, parse_players(smollm2.model, plan.player_names)):
        expected = smollm2.model(ids).logits
    run = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(tmp_path / "slim"), str(tmp_path / "ids.pt"),
                          str(tmp_path / "logits.pt"), "1" if layout == "decilm" else "0"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    name, layers, parameters = run.stdout.split()[-3:]
    assert name == ("LlamaForCausalLM" if layout == "stock" else "DeciLMForCausalLM")
    assert int(layers) == (30 - drop if layout == "stock" else 30)
    assert int(parameters) == plan.parameters.remaining
    assert (torch.load(tmp_path / "logits.pt") - expected).abs().max() <= 1e-5


def test_one_pass_proxies_on_smollm2_see_its_first_block_and_agree_with_each_other(smollm2, tmp_path):
    """Block influence and angular distance from one calibration pass over bundled task documents:
    SmolLM2's first block rewrites its input most (the block the ablation sweep finds indispensable),
    and the two proxies, which read different statistics, rank blocks alike."""
    from cornerstone.calibration import Calibration
    from cornerstone.compare import compare_reports
    from cornerstone.proxies import make_proxy

    calibration = Calibration(source="bundled", samples=24)
    specs = harness.load_tasks(["cs_capitals"], limit=10, seed=0)
    influence = score(smollm2, specs, estimator=make_proxy("bi", calibration=calibration))
    angular = score(smollm2, specs, estimator=make_proxy("angular", calibration=calibration))
    assert influence.evaluations == 1 and influence.diagnostics["calibration"]["texts"] == 24
    assert max(influence.players, key=lambda n: influence.players[n].importance) == "L0"
    assert "L0" in influence.cornerstones
    assert 0 < angular.players["L5"].importance < angular.players["L0"].importance < 1
    agreement = compare_reports([influence, angular]).pair("bi", "angular")
    assert agreement.spearman > 0.5
