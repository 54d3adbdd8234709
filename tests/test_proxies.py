"""One-pass proxies on constructed cases with known answers, and their place in score -> plan -> export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cornerstone import harness
from cornerstone.calibration import ActivationStats, Calibration, SiteStats, calibration_texts, record
from cornerstone.cli import app
from cornerstone.errors import ConfigError, PlayerError
from cornerstone.estimators import make_estimator
from cornerstone.loading import LoadedModel, load_model
from cornerstone.masking import without
from cornerstone.planner import Planner, make_plan
from cornerstone.players import enumerate_players, parse_players
from cornerstone.proxies import AVSS, AngularDistance, BlockInfluence, SublayerCosine, make_proxy
from cornerstone.scores import CornerstoneRule, PlayerScore, ScoreReport, TaskScore, score

from .conftest import ARCHITECTURE_NAMES, tiny_model
from .tasks import toy_docs, write_task

TEXTS = ["Question: What is the capital of France? Answer: Paris",
         "What is 2 + 3? Answer: 5",
         "Answer: Paris, and the capital of France is Paris.",
         "Question: What is 2 + 2?",
         "Paris"]


def loaded_tiny(arch: str, tokenizer, seed: int = 0) -> LoadedModel:
    return LoadedModel(model=tiny_model(arch, seed=seed), tokenizer=tokenizer, spec=f"tiny-{arch}", source="folder",
                       location="memory", fingerprint=f"tiny-{arch}-{seed}", dtype="float32", device="cpu", load_seconds=0.0)


def one_minus_cos(stats: ActivationStats, site: str) -> float:
    return 1.0 - stats.sites[site].mean_cosine


def reference_block_distances(loaded: LoadedModel, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Block influence and angular distance computed apart from cornerstone.calibration: one text at a time
    (no padding, no batching), block inputs taken by hooks of this test, in float64.

    Returns ``bi[l] = 1 - mean over every token of cos(x_l, x_{l+1})`` and ``angular[i, j] = mean over texts
    of arccos(cos(x_i, x_j)) / pi`` at the text's last token, where ``x_l`` is block l's input and ``x_L``
    the last block's output (Men et al. 2024; Gromov et al. 2024)."""
    layers = loaded.model.model.layers
    n = len(layers)
    states: dict[int, torch.Tensor] = {}

    def keep_input(index):
        def hook(_module, args, kwargs):
            states[index] = (args[0] if args else kwargs["hidden_states"])[0].double()
        return hook

    def keep_output(_module, _args, output):
        states[n] = (output[0] if isinstance(output, tuple) else output)[0].double()

    handles = [layer.register_forward_pre_hook(keep_input(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles.append(layers[-1].register_forward_hook(keep_output))
    cosine_sums, tokens, angular = np.zeros(n), 0, np.zeros((n + 1, n + 1))
    try:
        for text in texts:
            ids = loaded.tokenizer(text, return_tensors="pt").input_ids
            with torch.no_grad():
                loaded.model(ids)
            x = [states[i] for i in range(n + 1)]  # each (tokens, hidden)
            for layer in range(n):
                cosine_sums[layer] += torch.nn.functional.cosine_similarity(x[layer], x[layer + 1], dim=-1).sum().item()
            tokens += ids.shape[1]
            last = torch.nn.functional.normalize(torch.stack([state[-1] for state in x]), dim=-1)
            angular += (torch.arccos((last @ last.T).clamp(-1.0, 1.0)) / torch.pi).numpy()
    finally:
        for handle in handles:
            handle.remove()
    return 1.0 - cosine_sums / tokens, angular / len(texts)


@pytest.mark.parametrize("arch", ARCHITECTURE_NAMES)
def test_removed_players_read_as_zero_importance_in_every_architecture(arch, tokenizer):
    """An identity block has block influence 0 and angular distance 0 to the next block; a zeroed
    sublayer has sublayer cosine 0. Every other player is measurably above 0."""
    loaded = loaded_tiny(arch, tokenizer)
    with without(loaded.model, parse_players(loaded.model, "L1,L0.mlp,L2.attn")):
        stats = record(loaded, TEXTS, batch_size=2)
    assert one_minus_cos(stats, "L1") == pytest.approx(0.0, abs=1e-6)
    assert stats.angular[1, 2] == pytest.approx(0.0, abs=1e-6)
    assert one_minus_cos(stats, "L0.mlp") == pytest.approx(0.0, abs=1e-6)
    assert one_minus_cos(stats, "L2.attn") == pytest.approx(0.0, abs=1e-6)
    assert one_minus_cos(stats, "L0") > 1e-4 and one_minus_cos(stats, "L2") > 1e-4
    assert one_minus_cos(stats, "L0.attn") > 1e-4 and one_minus_cos(stats, "L2.mlp") > 1e-4
    assert stats.angular[0, 1] > 1e-4
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in loaded.model.modules())


def _replace_block_output(model, index: int, transform):
    def hook(_module, args, kwargs, output):
        hidden_in = args[0] if args else kwargs["hidden_states"]
        new = transform(hidden_in)
        return (new,) + output[1:] if isinstance(output, tuple) else new

    return model.model.layers[index].register_forward_hook(hook, with_kwargs=True)


def test_rescaling_is_invisible_to_cosine_and_negation_is_maximal(tokenizer):
    loaded = loaded_tiny("llama", tokenizer)
    handle = _replace_block_output(loaded.model, 1, lambda h: 1000.0 * h)
    try:
        scaled = record(loaded, TEXTS, batch_size=2)
        scaled_absolute = record(loaded, TEXTS, batch_size=2, near_zero=0.05, relative=False)
        scaled_relative = record(loaded, TEXTS, batch_size=2, near_zero=0.05, relative=True)
    finally:
        handle.remove()
    assert one_minus_cos(scaled, "L1") == pytest.approx(0.0, abs=1e-6)
    assert scaled.angular[1, 2] == pytest.approx(0.0, abs=1e-6)
    # block output of L1 is 1000x its input, the output of L0: a relative threshold sees the same sparsity
    assert scaled_relative.sites["L1"].sparsity == pytest.approx(scaled_relative.sites["L0"].sparsity)
    assert scaled_absolute.sites["L1"].sparsity < scaled_absolute.sites["L0"].sparsity
    assert scaled.sites["L1"].variance == pytest.approx(1e6 * scaled.sites["L0"].variance, rel=1e-4)

    handle = _replace_block_output(loaded.model, 1, lambda h: -h)
    try:
        negated = record(loaded, TEXTS, batch_size=2)
    finally:
        handle.remove()
    assert one_minus_cos(negated, "L1") == pytest.approx(2.0, abs=1e-6)
    assert negated.angular[1, 2] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("arch,mlp_output", [("llama", "mlp"), ("gemma3_text", "post_feedforward_layernorm"),
                                             ("gpt_neox", "mlp"), ("qwen2_moe", "mlp")])
def test_ffn_share_of_the_block_update_matches_the_ffn_itself(arch, mlp_output, tokenizer):
    """The FFN's residual contribution is taken as block output - block input - attention output;
    check it against the FFN's own output (after its post-norm in Gemma 3; in parallel with attention in GPT-NeoX)."""
    loaded = loaded_tiny(arch, tokenizer)
    block = [m for m in loaded.model.modules() if isinstance(m, torch.nn.ModuleList)][0][1]
    seen = {}

    def keep(name):
        def hook(_module, args, kwargs, output):
            seen[name] = (args[0] if args else kwargs.get("hidden_states"), output[0] if isinstance(output, tuple) else output)
        return hook

    handles = [block.register_forward_hook(keep("block"), with_kwargs=True),
               block.get_submodule(mlp_output).register_forward_hook(keep("mlp"), with_kwargs=True)]
    try:
        stats = record(loaded, TEXTS[:1], batch_size=1)
    finally:
        for handle in handles:
            handle.remove()
    block_in, block_out = seen["block"]
    c_mlp = seen["mlp"][1]
    mlp_in = block_in if arch == "gpt_neox" else block_out - c_mlp
    expected = 1 - torch.nn.functional.cosine_similarity(mlp_in, mlp_in + c_mlp, dim=-1).mean().item()
    assert one_minus_cos(stats, "L1.mlp") == pytest.approx(expected, abs=1e-5)


def test_padding_and_batching_do_not_change_any_statistic(tokenizer):
    loaded = loaded_tiny("qwen2", tokenizer)
    alone = record(loaded, TEXTS, batch_size=1)
    padded = record(loaded, TEXTS, batch_size=5)
    assert alone.tokens == padded.tokens and alone.texts == padded.texts == len(TEXTS)
    for name, site in alone.sites.items():
        other = padded.sites[name]
        assert other.mean_cosine == pytest.approx(site.mean_cosine, abs=1e-5)
        assert other.variance == pytest.approx(site.variance, rel=1e-4)
        assert other.near_zero == site.near_zero and other.entries == site.entries
    np.testing.assert_allclose(padded.angular, alone.angular, atol=1e-5)


def constructed_stats(variance: list[float], sparsity: list[float]) -> ActivationStats:
    sites = {f"L{i}": SiteStats(variance_sum=v, texts=1, near_zero=int(round(s * 1000)), entries=1000)
             for i, (v, s) in enumerate(zip(variance, sparsity))}
    return ActivationStats(sites=sites, angular_sum=np.zeros((len(variance) + 1,) * 2), texts=1, tokens=1, seconds=0.0,
                           near_zero_threshold=0.01, relative_threshold=True)


def block_players(n: int):
    from cornerstone.players import Player

    return [Player(f"L{i}", i, "block", f"model.layers.{i}") for i in range(n)]


def test_avss_is_normalised_variance_over_sparsity_and_candidates_are_sorted_first():
    variance, sparsity = [4.0, 3.0, 2.0, 1.0], [0.1, 0.1, 0.2, 0.4]
    values, diagnostics = AVSS(epsilon=1e-3).importances(constructed_stats(variance, sparsity), block_players(4))
    # by hand: normalised variances .4 .3 .2 .1 over sparsities + epsilon .101 .101 .201 .401 give
    # 3.9604 2.9703 0.9950 0.2494 (sum 8.1751), normalised to
    expected = [0.484447, 0.363335, 0.121714, 0.030504]
    assert [values[f"L{i}"] for i in range(4)] == pytest.approx(expected, abs=2e-6)
    # shares are ~[.48, .36, .12, .03]: accumulating in layer order would select nothing (L0 alone is .48);
    # sorted first, L3 and L2 fit within 25%
    assert diagnostics["prune_candidates"] == ["L3", "L2"]
    assert diagnostics["prune_candidates_share"] == pytest.approx(0.152219, abs=2e-6)


def test_avss_epsilon_bounds_zero_sparsity_and_then_ranks_by_variance():
    stats = constructed_stats([1.0, 5.0, 2.0], [0.0, 0.0, 0.0])
    values, _ = AVSS(epsilon=1e-6).importances(stats, block_players(3))
    assert all(np.isfinite(list(values.values())))
    assert values["L1"] > values["L2"] > values["L0"]
    assert values["L1"] == pytest.approx(5 / 8)


def test_proxy_granularity_and_options_are_checked():
    assert isinstance(make_estimator("bi"), BlockInfluence)
    assert isinstance(make_estimator("cosine"), SublayerCosine)
    assert make_estimator("avss", granularity="sublayer").granularity == "sublayer"
    assert isinstance(make_proxy("angular"), AngularDistance)
    with pytest.raises(ConfigError, match="bi scores at block granularity"):
        make_proxy("bi", granularity="sublayer")
    with pytest.raises(ConfigError, match="cosine scores at sublayer granularity") as refused:
        make_proxy("cosine", granularity="block")
    assert "use --method bi" in refused.value.hint
    with pytest.raises(ConfigError, match="epsilon"):
        make_proxy("avss", epsilon=0.0)
    with pytest.raises(ConfigError, match="unknown method 'magic'") as refused:
        make_estimator("magic")
    assert "avss, bi, angular, cosine" in refused.value.hint


def test_calibration_sources(tmp_path):
    (tmp_path / "a.txt").write_text("first paragraph\nstill first\n\nsecond\n\n\n")
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    (tmp_path / "c.json").write_text('["x", {"text": "y"}]')
    assert calibration_texts(Calibration(source=str(tmp_path / "a.txt"))) == ["first paragraph\nstill first", "second"]
    assert calibration_texts(Calibration(source=str(tmp_path / "b.jsonl"))) == ["one", "two"]
    assert calibration_texts(Calibration(source=str(tmp_path / "c.json"))) == ["x", "y"]
    bundled = calibration_texts(Calibration(source="bundled", samples=10, seed=3))
    assert len(bundled) == 10 and bundled == calibration_texts(Calibration(source="bundled", samples=10, seed=3))
    assert all("\nAnswer: " in text for text in bundled)
    specs = harness.load_tasks(["cs_capitals"], limit=4, seed=0)
    assert calibration_texts(Calibration(source="tasks"), specs) == harness.document_texts(specs[0])
    with pytest.raises(ConfigError, match="does not exist"):
        calibration_texts(Calibration(source=str(tmp_path / "missing.txt")))
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(ConfigError, match="cannot read"):
        calibration_texts(Calibration(source=str(tmp_path / "bad.jsonl")))
    with pytest.raises(ConfigError, match="needs tasks"):
        calibration_texts(Calibration(source="tasks"))


@pytest.fixture(scope="module")
def toy_tasks(tmp_path_factory):
    folder = write_task(tmp_path_factory.mktemp("proxy-tasks"), "toy_proxy", toy_docs(8))
    return folder, harness.load_tasks(["toy_proxy"], include_paths=[folder])


@pytest.mark.parametrize("method", ["avss", "bi", "angular", "cosine"])
def test_score_writes_the_same_report_for_every_proxy(method, tiny_llama_dir, toy_tasks, tmp_path):
    from cornerstone import report as report_module

    folder, specs = toy_tasks
    loaded = load_model(str(tiny_llama_dir), device="cpu")
    estimator = make_estimator(method, proxy_options={"calibration": Calibration(samples=6)})
    result = score(loaded, specs, estimator=estimator, include_paths=[folder])
    kinds = {"cosine": {"attn", "mlp"}}.get(method, {"block"})
    assert {p.kind for p in result.players.values()} == kinds
    assert len(result.players) == (6 if method == "cosine" else 3)
    assert result.method == method and result.evaluations == 1 and not result.measures_scores
    assert result.diagnostics["calibration"]["texts"] == 6
    assert all(p.score_removed is None and p.parameters for p in result.players.values())
    if method in ("bi", "angular"):
        # the importances against the same distances measured apart from the calibration pass
        texts = calibration_texts(Calibration(samples=6), specs)
        influence, angular = reference_block_distances(loaded, texts)
        expected = influence if method == "bi" else [angular[i, i + 1] for i in range(3)]
        assert [result.players[f"L{i}"].importance for i in range(3)] == pytest.approx(expected, abs=1e-5)
    # the same ranking comes back from the JSON, and the plot is the importance chart
    path, plots = report_module.save(result, tmp_path / "r.json")
    assert ScoreReport.load(path).ranking() == result.ranking() and plots[0].exists()
    plan = make_plan(path, Planner(drop=1, granularity=result.granularity, keep_first=0, keep_last=0,
                                   protect_cornerstones=False))
    # the plan drops the player the proxy measured as least important (read from the players, not the ranking)
    assert plan.removed[0].name == min(result.players, key=lambda name: result.players[name].importance)
    assert plan.predicted_score is None and "not in task-score units" in plan.predicted_by


def test_proxy_players_must_match_the_method(tiny_llama_dir, toy_tasks):
    folder, specs = toy_tasks
    loaded = load_model(str(tiny_llama_dir), device="cpu")
    with pytest.raises(PlayerError, match="bi scores block players, not attn"):
        score(loaded, specs, estimator=BlockInfluence(), players=["L0.attn"])


def test_outlier_rule_marks_proxy_cornerstones():
    from cornerstone.estimation import PlayerEstimate

    estimates = {"L0": PlayerEstimate(importance=0.9), "L1": PlayerEstimate(importance=0.05),
                 "L2": PlayerEstimate(importance=0.04), "L3": PlayerEstimate(importance=0.15),
                 "L4": PlayerEstimate(importance=0.06)}
    kinds = dict.fromkeys(estimates, "block")
    assert CornerstoneRule().mark(estimates, kinds, 0.7, 0.25) == {"L0"}  # median 0.06: 0.15 < 0.18
    assert CornerstoneRule(outlier=2.0).mark(estimates, kinds, 0.7, 0.25) == {"L0", "L3"}


def angular_report(spans: dict[str, list[float]]) -> ScoreReport:
    players = {f"L{i}": PlayerScore(layer=i, kind="block", importance=d, share=0.0, parameters=100)
               for i, d in enumerate(spans["1"])}
    return ScoreReport(created="2026-01-01T00:00:00+00:00", method="angular", granularity="block",
                       model={"spec": "toy", "fingerprint": "toy", "num_hidden_layers": len(players), "parameters": 10_000},
                       tasks=[TaskScore(name="t", metric="acc", num_docs=1, total_docs=1, chance=0.25, base_score=0.7)],
                       settings={}, base_score=0.7, chance=0.25, players=players, cornerstones=[], rule=CornerstoneRule(),
                       evaluations=1, diagnostics={"spans": spans}, timing={}, versions={})


def test_contiguous_plan_from_an_angular_report_uses_the_measured_span_distance():
    # one-step distances favour the span L1-L2 (0.1 + 0.1), but the measured d(l, 2) says L3-L4 (0.05):
    # the paper's rule is the distance between the span's two ends
    spans = {"1": [0.5, 0.1, 0.1, 0.2, 0.2, 0.5], "2": [0.6, 0.3, 0.25, 0.05, 0.6]}
    plan = make_plan(angular_report(spans), Planner(policy="contiguous", drop=2, keep_first=1, keep_last=1))
    assert plan.player_names == ["L3", "L4"]
    assert "d = 0.0500" in plan.removed[0].reason


def test_angular_spans_are_distances_between_block_inputs(tokenizer, tiny_llama_dir, toy_tasks):
    folder, specs = toy_tasks
    loaded = load_model(str(tiny_llama_dir), device="cpu")
    result = score(loaded, specs, estimator=AngularDistance(calibration=Calibration(samples=4)))
    spans = result.diagnostics["spans"]
    _, angular = reference_block_distances(loaded, calibration_texts(Calibration(samples=4), specs))
    # d(l, n): the distance from block l's input to block l + n's input, measured apart from the calibration pass
    for n in (1, 2, 3):
        assert spans[str(n)] == pytest.approx([angular[start, start + n] for start in range(4 - n)], abs=1e-5), n
    best = result.diagnostics["best_spans"]["2"]
    assert best["start"] == int(np.argmin([angular[0, 2], angular[1, 3]]))
    assert best["distance"] == pytest.approx(min(angular[0, 2], angular[1, 3]), abs=1e-5)


def test_cli_scores_with_a_proxy_and_plans_from_it(tiny_llama_dir, toy_tasks, tmp_path):
    folder, _ = toy_tasks
    runner = CliRunner()
    out = tmp_path / "bi.json"
    result = runner.invoke(app, ["score", str(tiny_llama_dir), "--method", "bi", "--tasks", "toy_proxy", "--include-path",
                                 str(folder), "--calibration-samples", "5", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["method"] == "bi" and data["granularity"] == "block" and data["diagnostics"]["calibration"]["texts"] == 5
    shown = runner.invoke(app, ["report", str(out)])
    assert "one calibration pass over 5 texts" in shown.stdout and "median of its kind" in shown.stdout
    planned = runner.invoke(app, ["plan", str(out), "--drop", "1", "--keep-first", "0", "--keep-last", "0", "--no-protect",
                                  "--json"])
    assert planned.exit_code == 0, planned.output
    assert json.loads(planned.stdout)["predicted_score"] is None
    wrong = runner.invoke(app, ["score", str(tiny_llama_dir), "--method", "angular", "--granularity", "sublayer"])
    assert wrong.exit_code == 2 and "angular scores at block granularity" in wrong.output


def test_every_player_of_the_model_has_statistics(tokenizer):
    loaded = loaded_tiny("mixtral", tokenizer)
    stats = record(loaded, TEXTS[:2])
    names = {p.name for g in ("block", "sublayer") for p in enumerate_players(loaded.model, g)}
    assert set(stats.sites) == names
    assert stats.angular.shape == (4, 4) and np.allclose(np.diag(stats.angular), 0.0, atol=1e-6)
