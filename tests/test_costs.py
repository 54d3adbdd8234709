"""Cost profiles (`cornerstone profile`) and plans to a cost target (`plan --policy fit`)."""

from __future__ import annotations

import itertools
import json
import math
from contextlib import contextmanager, nullcontext

import pytest
import torch
from typer.testing import CliRunner

from cornerstone.cli import app
from cornerstone.costs import CostProfile, PlayerCost, ProfileSettings, measure_profile, parse_target
from cornerstone.errors import ConfigError, PlanError, ReportError
from cornerstone.loading import load_model
from cornerstone.planner import Planner, make_plan
from cornerstone.players import parse_players

from .architectures import random_model
from .conftest import TINY_CONFIGS
from .test_cli import scored, toy_folder  # noqa: F401 (fixtures)
from .test_planner import EIGHT, measured_game, report_with  # noqa: F401 (fixture)

runner = CliRunner()
SMALL = ProfileSettings(prefill_lengths=[12], decode_shapes=["16x2"], repeats=2)


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_dir):
    return load_model(str(tiny_llama_dir), dtype="float32", device="cpu")


def test_a_profile_holds_every_sublayers_weights_kv_cache_and_time(tiny_llama, tmp_path, clock):
    profile = measure_profile(tiny_llama, SMALL)
    config = tiny_llama.model.config
    head_dim = config.hidden_size // config.num_attention_heads
    assert sorted(profile.players) == sorted(f"L{i}.{k}" for i in range(config.num_hidden_layers) for k in ("attn", "mlp"))
    model = tiny_llama.model
    outside = {id(p): p for m in (model.model.embed_tokens, model.model.norm, model.lm_head) for p in m.parameters()}
    # every float32 weight is in exactly one sublayer, or outside the blocks (embeddings, final norm, head)
    assert sum(c.weight_bytes for c in profile.players.values()) + 4 * sum(p.numel() for p in outside.values()) \
        == profile.total("weights") == 4 * sum(p.numel() for p in model.parameters())
    for name, cost in profile.players.items():
        assert cost.weight_bytes > 0
        # a float32 key and value per KV head per token; an MLP keeps no cache
        assert cost.kv_bytes_per_token == (2 * config.num_key_value_heads * head_dim * 4 if cost.kind == "attn" else 0)
        assert cost.prefill_seconds["12"] > 0 and cost.decode_seconds["16x2"] > 0
    # the sublayers are part of the whole forward: their time and weights are less than its
    for measure in ("weights", "prefill", "decode"):
        assert sum(profile.cost(n, measure) for n in profile.players) < profile.total(measure)
    assert profile.total("kv") == sum(profile.cost(n, "kv") for n in profile.players)
    # the KV bytes the profile counts are the bytes the model's own cache holds per token
    assert profile.totals["kv_cache_bytes_per_token"] == profile.total("kv")
    assert CostProfile.load(profile.save(tmp_path / "p.json")) == profile


class Clock:
    """The profile's clock in the tests that check what it attributes time to: it moves a microsecond per
    reading (so every hooked module takes some time) and by what :func:`slow_down` adds, nothing else. The
    model computes for real; only the stopwatch is fixed, because on a shared two-core machine a second job
    spreads real timings by more than any delay a test can afford (the calibration then rightly calls the
    saving noise). Real timings are measured by bench/ and `cornerstone profile`, never asserted."""

    def __init__(self) -> None:
        self.now = 0.0
        self.rate = 1.0  # 2.0: everything takes twice as long (a busy spell of the machine)

    def perf_counter(self) -> float:
        self.now += 1e-6 * self.rate
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds * self.rate


@pytest.fixture
def clock(monkeypatch):
    import cornerstone.costs as costs

    fixed = Clock()
    monkeypatch.setattr(costs, "time", fixed)
    return fixed


def slow_down(module, monkeypatch, clock: Clock, seconds: float = 0.03) -> None:
    """Make ``module``'s forward take ``seconds`` more on ``clock`` before computing, for the rest of the test."""
    forward = module.forward

    def slow(*args, **kwargs):
        clock.sleep(seconds)
        return forward(*args, **kwargs)

    monkeypatch.setattr(module, "forward", slow)


def test_the_time_of_a_sublayer_is_measured_inside_it(tiny_llama, monkeypatch, clock):
    """A sublayer made slow (30 ms inside its forward) is the one the profile finds slow, by those 30 ms."""
    slow_down(tiny_llama.model.model.layers[1].mlp, monkeypatch, clock)
    profile = measure_profile(tiny_llama, SMALL)
    for measure in ("prefill", "decode"):
        costs = {name: profile.cost(name, measure) for name in profile.players}
        assert max(costs, key=costs.get) == "L1.mlp"
        assert costs["L1.mlp"] == pytest.approx(0.03, rel=1e-3)
        assert sum(costs.values()) - costs["L1.mlp"] < 1e-3
        assert profile.total(measure) == pytest.approx(0.03, rel=1e-3)


def test_models_compared_side_by_side_take_turns_at_every_step(tiny_llama, monkeypatch, clock):
    """On a machine that slows down steadily (each forward 2% of the first one's time slower than the one
    before), the same model timed twice side by side comes out within 5% of itself: the two take turns at every
    timed step, so the drift lands on both alike. Back to back, the second would run ten forwards later, about
    15% slower."""
    from cornerstone.costs import measure_side_by_side

    model = tiny_llama.model
    slow_down(model.model.embed_tokens, monkeypatch, clock)
    handle = model.model.embed_tokens.register_forward_pre_hook(lambda *_: setattr(clock, "rate", clock.rate + 0.02))
    try:
        first, second = measure_side_by_side(
            [model, model], ProfileSettings(prefill_lengths=[12], decode_shapes=["16x2"], repeats=9), rounds=1)
    finally:
        handle.remove()
    for key, shape in (("prefill_seconds", "12"), ("decode_seconds", "16x2")):
        # the first always runs just before the second, on a machine 2% slower by then: faster, but barely
        assert 0.95 < first[key][shape] / second[key][shape] < 1.0


def test_a_removal_saves_what_the_sublayers_own_norms_cost_too(tiny_llama, monkeypatch, clock):
    """The norm before an MLP runs outside the MLP's hooks, but an export cuts it with the MLP: the
    calibration (removing every MLP, timed) finds its time, and the MLPs' costs add up to it."""
    slow_down(tiny_llama.model.model.layers[1].post_attention_layernorm, monkeypatch, clock)
    profile = measure_profile(tiny_llama, SMALL)
    for measure, key, shape in (("prefill", "prefill_seconds", "12"), ("decode", "decode_seconds", "16x2")):
        hooked = sum(c.model_dump()[key][shape] for c in profile.players.values() if c.kind == "mlp")
        assert hooked < 1e-3  # the 30 ms are not inside any MLP
        assert "L1.mlp" in profile.removal_players["mlp"] and "L0.mlp" not in profile.removal_players["mlp"]
        mlps = sum(profile.cost(n, measure) for n in profile.removal_players["mlp"])
        assert mlps == pytest.approx(0.03, rel=1e-3) == profile.removal_seconds["mlp"][key][shape]
        # an attention sublayer's calibration does not take the MLP's norm with it
        attns = sum(profile.cost(n, measure) for n, c in profile.players.items() if c.kind == "attn")
        assert attns < 1e-3


def test_sliding_window_layers_hold_at_most_their_window(tmp_path):
    """Gemma 3: the decode cache is cropped back between timed steps, and a sliding layer's KV cost per
    token at the profiled context is its window's share of a global layer's."""
    from cornerstone.loading import LoadedModel

    config = {**TINY_CONFIGS["gemma3_text"], "num_hidden_layers": 4, "layer_types":
              ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]}
    model = random_model("gemma3_text", **config, vocab_size=300)
    loaded = LoadedModel(model=model, tokenizer=None, spec="tiny-gemma3", source="folder", location=str(tmp_path),
                         fingerprint="g", dtype="float32", device="cpu", load_seconds=0.0)
    profile = measure_profile(loaded, SMALL)
    sliding, full = profile.players["L0.attn"], profile.players["L1.attn"]
    assert sliding.kv_window == 4 and full.kv_window is None
    assert sliding.kv_bytes_per_token == full.kv_bytes_per_token
    assert profile.cost("L0.attn", "kv") == pytest.approx(profile.cost("L1.attn", "kv") * 4 / 16)
    # the model's own cache holds the full layers' tokens and at most a window of the sliding layers'
    full_only = 2 * full.kv_bytes_per_token
    assert full_only < profile.totals["kv_cache_bytes_per_token"] <= profile.total("kv")


def _decilm():
    from .conftest import tiny_model
    from .test_decilm import pruned

    return pruned(tiny_model("llama"), "L0.attn,L1.mlp")


BATCH_MODELS = {
    "llama": lambda: random_model("llama", **TINY_CONFIGS["llama"], vocab_size=300),
    "gemma3_text": lambda: random_model("gemma3_text", **TINY_CONFIGS["gemma3_text"], vocab_size=300,
                                        layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "decilm": _decilm,  # a sublayer export's own modeling code: a layer without attention holds no cache
}


@pytest.mark.parametrize("kind", sorted(BATCH_MODELS))
def test_a_batch_decode_starts_from_one_sequences_cache_repeated(kind):
    """The decode cache of a batch is one sequence's prefill repeated along the batch (a batch of 16 x 2048 tokens
    need not be prefilled to time a step over it): it holds what a prefill of the whole batch would, layer by layer
    (Gemma 3's sliding layers cropped to their window), and a decode step from it gives the same logits."""
    import inspect

    from cornerstone.costs import _filled_cache

    model = BATCH_MODELS[kind]()
    argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    batch = torch.randint(0, 200, (1, 11), generator=torch.Generator().manual_seed(0)).repeat(3, 1)
    with torch.inference_mode():
        repeated = _filled_cache(model, nullcontext, batch[:, :10], argument, {})
        output = model(input_ids=batch[:, :10], use_cache=True)
        prefilled = output.cache if argument == "cache" else output.past_key_values
        assert len(repeated.layers) == len(prefilled.layers) == 3
        held = 0
        for ours, theirs in zip(repeated.layers, prefilled.layers):
            if getattr(theirs, "keys", None) is None:
                assert getattr(ours, "keys", None) is None
                continue
            held += 1
            assert ours.keys.shape == theirs.keys.shape and ours.keys.shape[0] == 3
            torch.testing.assert_close(ours.keys, theirs.keys)
            torch.testing.assert_close(ours.values, theirs.values)
        assert held >= 2
        stepped = [model(input_ids=batch[:, 10:], use_cache=True, **{argument: cache}).logits
                   for cache in (repeated, prefilled)]
    torch.testing.assert_close(stepped[0], stepped[1])


def synthetic_profile(kv: dict[str, int], decode: dict[str, float], weights: dict[str, int] | None = None,
                      layers: int = 8) -> CostProfile:
    """A profile of the toy report's model with the given per-block costs (attention holds the KV cache and
    the decode time; the MLP the weights)."""
    weights = weights or {f"L{i}": 100 for i in range(layers)}
    players = {}
    for i in range(layers):
        block = f"L{i}"
        players[f"{block}.attn"] = PlayerCost(layer=i, kind="attn", weight_bytes=0, kv_bytes_per_token=kv.get(block, 0),
                                              prefill_seconds={"8": 0.0}, decode_seconds={"32x1": decode.get(block, 0.0)})
        players[f"{block}.mlp"] = PlayerCost(layer=i, kind="mlp", weight_bytes=weights[block], kv_bytes_per_token=0,
                                             prefill_seconds={"8": 0.0}, decode_seconds={"32x1": 0.0})
    return CostProfile(created="2026-01-01T00:00:00+00:00", model={"spec": "toy", "fingerprint": "toy",
                                                                   "num_hidden_layers": layers},
                       device="cpu", dtype="float32", machine={}, versions={}, prefill_lengths=[8], decode_shapes=["32x1"],
                       players=players, totals={"weight_bytes": sum(weights.values()) + 500,
                                                "kv_bytes_per_token": sum(kv.values()),
                                                "prefill_seconds": {"8": 1.0}, "decode_seconds": {"32x1": 1.0}},
                       # removing them saves what they take inside (calibration factor 1)
                       removal_seconds={kind: {"prefill_seconds": {"8": 0.0}, "decode_seconds": {
                           "32x1": sum(decode.values()) if kind == "attn" else 0.0}} for kind in ("attn", "mlp")},
                       removal_players={kind: [f"L{i}.{kind}" for i in range(layers)] for kind in ("attn", "mlp")})


def test_a_fit_plan_is_the_least_important_set_that_meets_every_target(tmp_path):
    kv = {f"L{i}": 10 for i in range(8)}
    kv["L3"] = 2  # the least important block holds little cache: it alone does not reach the KV target
    decode = {f"L{i}": 0.05 for i in range(8)}
    decode["L6"] = 0.3
    path = synthetic_profile(kv, decode).save(tmp_path / "profile.json")
    targets = ["kv:70%", "decode:1.25x"]
    plan = make_plan(report_with(EIGHT), Planner(policy="fit", targets=targets, profile=str(path)))
    profile = CostProfile.load(path)
    need = {t.measure: t.need(profile) for t in (parse_target(text) for text in targets)}
    allowed = [n for n in EIGHT if n not in ("L0", "L7")]  # first and last blocks are kept by default
    feasible = [set(s) for r in range(len(allowed) + 1) for s in itertools.combinations(allowed, r)
                if all(sum(profile.cost(n, m) for n in s) >= need[m] - 1e-12 for m in need)]
    best = min(feasible, key=lambda s: sum(EIGHT[n] for n in s))
    assert set(plan.player_names) == best
    for measure, cost in plan.fit["measures"].items():
        assert cost["whole"] - cost["saved"] <= cost["limit"] + 1e-9
    # meeting the targets costs something here: the lowest-importance blocks alone do not
    assert set(plan.player_names) != {"L3", "L5"}


def test_headroom_plans_time_targets_below_their_limit_and_leaves_bytes_alone(tmp_path):
    """decode:1.25x on a 1 s step allows 0.8 s; with 10% headroom the plan must reach 0.72 s, which the set
    that only just meets 0.8 s does not."""
    decode = {f"L{i}": 0.1 for i in range(8)}
    decode["L3"] = 0.2  # the least important block saves exactly the 0.2 s the bare target needs
    kv = {f"L{i}": 10 for i in range(8)}
    path = synthetic_profile(kv, decode).save(tmp_path / "profile.json")
    report = report_with(EIGHT)
    bare = make_plan(report, Planner(policy="fit", targets=["decode:1.25x"], profile=str(path)))
    assert bare.player_names == ["L3"]
    for headroom in (0.1, 0.3):
        wide = make_plan(report, Planner(policy="fit", targets=["decode:1.25x", "kv:80%"], profile=str(path),
                                         headroom=headroom))
        decode_fit, kv_fit = wide.fit["measures"]["decode"], wide.fit["measures"]["kv"]
        assert wide.fit["headroom"] == headroom
        assert decode_fit["limit"] == pytest.approx(0.8) and decode_fit["planned_limit"] == pytest.approx(0.8 * (1 - headroom))
        assert decode_fit["whole"] - decode_fit["saved"] <= decode_fit["planned_limit"] + 1e-9
        assert kv_fit["planned_limit"] == pytest.approx(kv_fit["limit"])  # bytes are counted, not timed
        allowed = [n for n in EIGHT if n not in ("L0", "L7")]
        feasible = [set(c) for r in range(len(allowed) + 1) for c in itertools.combinations(allowed, r)
                    if sum(decode[n] for n in c) >= 0.2 + 0.8 * headroom - 1e-12 and sum(kv[n] for n in c) >= 16]
        assert set(wide.player_names) == min(feasible, key=lambda c: sum(EIGHT[n] for n in c))
    with pytest.raises(ValueError, match="headroom widens prefill and decode targets"):
        Planner(policy="fit", targets=["kv:50%"], profile=str(path), headroom=0.05)


def test_fit_refuses_what_it_cannot_meet_and_profiles_of_other_models(tmp_path):
    path = synthetic_profile({f"L{i}": 10 for i in range(8)}, {}).save(tmp_path / "profile.json")
    with pytest.raises(PlanError, match="kv"):
        make_plan(report_with(EIGHT), Planner(policy="fit", targets=["kv:10%"], profile=str(path)))
    other = synthetic_profile({f"L{i}": 10 for i in range(6)}, {}, layers=6).save(tmp_path / "other.json")
    with pytest.raises(PlanError, match="another model"):
        make_plan(report_with(EIGHT), Planner(policy="fit", targets=["kv:50%"], profile=str(other)))
    with pytest.raises(ValueError, match="targets and a cost profile"):
        Planner(policy="fit", targets=["kv:50%"])
    with pytest.raises(ValueError, match="leave drop and search_until out"):
        Planner(policy="fit", drop=3, targets=["kv:50%"], profile=str(path))
    with pytest.raises(ValueError, match="policy fit"):
        Planner(drop=3, targets=["kv:50%"])


@pytest.mark.parametrize("text", ["kv:150%", "kv:0%", "decode:0.9x", "weights:1.3x", "kv:4MB", "decode:90MB",
                                  "weights:4ms", "speed:2x", "kv:50"])
def test_a_target_that_means_nothing_is_refused(text):
    with pytest.raises(ConfigError, match="target"):
        parse_target(text)


@pytest.mark.parametrize("edit", ["not json", "nan", "renamed", "negative", "extra", "missing shape", "older schema",
                                  "saving above whole", "no calibration",
                                  "calibrated on other players"])
def test_an_edited_profile_is_refused_in_one_line(edit, tmp_path):
    data = json.loads(synthetic_profile({"L1": 10}, {"L1": 0.1}).model_dump_json())
    if edit == "nan":
        data["players"]["L1.attn"]["decode_seconds"]["32x1"] = float("nan")
    elif edit == "renamed":
        data["players"]["L9.attn"] = data["players"].pop("L1.attn")
    elif edit == "negative":
        data["players"]["L1.attn"]["kv_bytes_per_token"] = -5
    elif edit == "extra":
        data["players"]["L1.attn"]["free_lunch"] = 1
    elif edit == "missing shape":
        data["players"]["L1.attn"]["decode_seconds"] = {}
    elif edit == "older schema":  # profiles before the calibration: their times under-count what a removal saves
        data["schema_version"] = 1
        del data["removal_seconds"]
    elif edit == "saving above whole":
        data["removal_seconds"]["attn"]["decode_seconds"]["32x1"] = 5.0
    elif edit == "no calibration":
        del data["removal_seconds"]["mlp"]
    elif edit == "calibrated on other players":
        data["removal_players"]["attn"] = ["L1.mlp"]
    path = tmp_path / "profile.json"
    path.write_text("{not json" if edit == "not json" else json.dumps(data).replace("NaN", "NaN"))
    with pytest.raises(ReportError) as error:
        CostProfile.load(path)
    assert "\n" not in str(error.value) and error.value.hint


def test_profile_and_fit_from_the_cli(tiny_llama_dir, tmp_path):
    out = tmp_path / "profile.json"
    result = runner.invoke(app, ["profile", str(tiny_llama_dir), "--out", str(out), "--prefill", "8",
                                 "--decode", "16x1", "--repeats", "1", "--json"])
    assert result.exit_code == 0, result.output
    measured = json.loads(result.stdout)
    assert measured["path"] == str(out) and CostProfile.load(out).decode_shapes == ["16x1"]
    report = report_with({"L0": 0.3, "L1": 0.01, "L2": 0.02})
    report.model.update(measured["model"])
    report_path = tmp_path / "report.json"
    report_path.write_text(report.model_dump_json())
    result = runner.invoke(app, ["plan", str(report_path), "--policy", "fit", "--target", "kv:60%",
                                 "--profile", str(out), "--keep-first", "0", "--keep-last", "0", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    # three blocks with equal caches: keeping at most 60% removes two, the two least important
    assert sorted(r["name"] for r in plan["removed"]) == ["L1", "L2"]
    for args, message in [(["--policy", "fit", "--target", "kv:60%"], "targets and a cost profile"),
                          (["--drop", "2", "--target", "kv:60%"], "policy fit"),
                          (["--policy", "fit", "--target", "kv:sixty", "--profile", str(out)], "not understood"),
                          (["--policy", "fit", "--target", "kv:60%", "--profile", str(out), "--headroom", "0.05"],
                           "--headroom"),
                          (["--policy", "fit", "--granularity", "mixed", "--target", "kv:60%", "--profile", str(out)],
                           "option --granularity: mixed granularity is planned by measuring")]:
        result = runner.invoke(app, ["plan", str(report_path), *args])
        assert result.exit_code != 0 and message in result.output, result.output
    result = runner.invoke(app, ["profile", str(tiny_llama_dir), "--decode", "16", "--out", str(tmp_path / "x.json")])
    assert result.exit_code != 0 and "CONTEXTxBATCH" in result.output


def test_a_fit_plan_is_exported_and_eval_measures_it_against_its_target(scored, tiny_llama_dir, toy_folder, tmp_path):
    """profile -> plan --policy fit -> export -> eval: eval measures base and pruned side by side and checks
    each target on what it measured (the KV bytes the pruned model's own cache holds)."""
    report_path, _ = scored
    profile = tmp_path / "profile.json"
    assert runner.invoke(app, ["profile", str(tiny_llama_dir), "--out", str(profile), "--prefill", "8",
                               "--decode", "16x1", "--repeats", "1"]).exit_code == 0
    plan_path = tmp_path / "plan.yaml"
    planned = runner.invoke(app, ["plan", str(report_path), "--policy", "fit", "--target", "kv:60%", "--profile",
                                  str(profile), "--keep-first", "0", "--keep-last", "0", "--out", str(plan_path)])
    assert planned.exit_code == 0, planned.output
    assert "kv:" in planned.stdout and "target at most" in planned.stdout
    assert runner.invoke(app, ["export", str(tiny_llama_dir), str(plan_path), "--out", str(tmp_path / "slim")]).exit_code == 0
    evaluated = runner.invoke(app, ["eval", str(tiny_llama_dir), str(tmp_path / "slim"), "--tasks", "toy_cli",
                                    "--include-path", str(toy_folder), "--out", str(tmp_path / "eval.json"), "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    (kv,) = json.loads(evaluated.stdout)["costs"]
    # two of three blocks removed: the pruned model's cache holds a third of the base's bytes per token
    assert kv["target"] == "kv:60%" and kv["met"] and kv["pruned"] == pytest.approx(kv["base"] / 3)
    assert "| kv:60% |" in (tmp_path / "eval.md").read_text()


def test_greedy_to_a_target_measures_what_removals_cost_together(measured_game, tmp_path):
    """policy greedy with a target: each step takes the least score lost per share of the need it covers,
    measured, so a pair of removals that is cheap apart and costly together is not taken (the report's
    importances, which the fit solver reads, cannot see that), and players that save nothing the
    target needs are never tried."""
    from itertools import combinations

    from .test_planner import _CountingGame

    loaded, report, _ = measured_game
    # each attention saves 0.2 s of a 1 s decode step, the MLPs nothing: decode:1.6x needs two attentions
    profile = synthetic_profile({}, {"L0": 0.2, "L1": 0.2, "L2": 0.2}, layers=3)
    path = profile.model_copy(update={"model": {"spec": "tiny", "num_hidden_layers": 3}}).save(tmp_path / "p.json")
    weights = {"L0.attn": 0.01, "L1.attn": 0.02, "L2.attn": 0.10, "L0.mlp": 0.0, "L1.mlp": 0.0, "L2.mlp": 0.0}
    game = _CountingGame(loaded, weights, ("L0.attn", "L1.attn", 0.2))  # the two cheapest hurt together
    planner = Planner(policy="greedy", granularity="sublayer", targets=["decode:1.6x"], profile=str(path),
                      keep_first=0, keep_last=0)
    plan = make_plan(report, planner, loaded=loaded, value=game)
    # the full model, 3 attentions at step 1, 2 at step 2: the MLPs, which save nothing, never measured
    assert game.evaluations == 1 + 3 + 2

    def score(names):
        return game.evaluate_many([parse_players(loaded.model, list(names))])[0].score

    attentions = ["L0.attn", "L1.attn", "L2.attn"]
    best = max(combinations(attentions, 2), key=score)
    assert sorted(plan.player_names) == sorted(best) == ["L0.attn", "L2.attn"]
    assert plan.fit["solver"] == "measured greedy" and plan.predicted_measured
    assert plan.fit["measures"]["decode"]["saved"] == pytest.approx(0.4)
    assert [s.score_after for s in plan.search] == pytest.approx([score(["L0.attn"]), score(["L0.attn", "L2.attn"])])
    with pytest.raises(ValueError, match="lazy"):
        Planner(**{**planner.model_dump(), "lazy": True})
    with pytest.raises(ValueError, match="fit .* or greedy"):
        Planner(policy="beam", targets=["decode:1.6x"], profile=str(path))


class _HalvesGame:
    """A value function on a real model's players whose rule is per layer, on which halves are gone: removing a
    layer's attention alone costs ``alone[l]`` of the score, removing its whole block ``whole[l]`` (a block
    named as one player and a block removed as its two halves are the same removal)."""

    def __init__(self, loaded, alone: dict[int, float], whole: dict[int, float]) -> None:
        self.loaded, self.alone, self.whole, self.evaluations = loaded, alone, whole, 0

    def evaluate_many(self, masks, on_done=None):
        from types import SimpleNamespace

        out = []
        for mask in masks:
            gone: dict[int, set[str]] = {}
            for p in mask:
                gone.setdefault(p.layer, set()).update({"attn", "mlp"} if p.kind == "block" else {p.kind})
            cost = {layer: self.whole[layer] if kinds == {"attn", "mlp"} else self.alone[layer] if kinds == {"attn"}
                    else 0.01 for layer, kinds in gone.items()}
            self.evaluations += 1
            out.append(SimpleNamespace(score=math.prod(1 - c for c in cost.values())))
            if on_done is not None:
                on_done(out[-1])
        return out


def test_a_mixed_plan_removes_a_whole_block_where_that_hurts_less_than_its_attention_alone(measured_game, tmp_path):
    """Half the KV cache takes two of three attentions. L2's attention alone costs 30% of the score but its whole
    block 3% (its MLP, left, reads a hidden state it never saw: what Gemma 3 measured, reports/fit). A sublayer
    greedy can only remove attentions (an MLP holds no cache); a mixed one weighs the blocks too and finds the
    best plan brute force finds; the plan exports as a checkpoint equal to the masked model."""
    from itertools import combinations

    from cornerstone.export import export
    from cornerstone.exported import load_exported
    from cornerstone.planner import Plan

    from .test_export import assert_reloaded_equals_masked

    loaded, report, _ = measured_game
    profile = synthetic_profile({"L0": 10, "L1": 10, "L2": 10}, {}, layers=3)
    path = profile.model_copy(update={"model": {"spec": "tiny", "num_hidden_layers": 3}}).save(tmp_path / "p.json")
    game = _HalvesGame(loaded, alone={0: 0.20, 1: 0.02, 2: 0.30}, whole={0: 0.25, 1: 0.15, 2: 0.03})
    planner = Planner(policy="greedy", granularity="sublayer", targets=["kv:50%"], profile=str(path),
                      keep_first=0, keep_last=0)
    sublayers = make_plan(report, planner, loaded=loaded, value=game)
    mixed = make_plan(report, planner.model_copy(update={"granularity": "mixed"}), loaded=loaded, value=game)

    def score(names):
        return game.evaluate_many([parse_players(loaded.model, list(names))])[0].score

    candidates = ["L0", "L1", "L2", "L0.attn", "L1.attn", "L2.attn"]
    feasible = [s for s in combinations(candidates, 2) if len({name.split(".")[0] for name in s}) == 2]
    assert sorted(mixed.player_names) == sorted(max(feasible, key=score)) == ["L1.attn", "L2"]
    assert sorted(sublayers.player_names) == ["L0.attn", "L1.attn"]
    assert mixed.predicted_score == pytest.approx(score(mixed.player_names))
    assert score(mixed.player_names) > score(sublayers.player_names)
    assert mixed.granularity == "mixed" and mixed.blocks["remaining"] == 2 and mixed.what == "1 block and 1 sublayer"
    assert mixed.fit["measures"]["kv"]["saved"] == pytest.approx(20)
    # a kept sublayer keeps its block too
    kept = make_plan(report, planner.model_copy(update={"granularity": "mixed", "keep": ["L2.attn"]}), loaded=loaded,
                     value=game)
    assert sorted(kept.player_names) == ["L0.attn", "L1.attn"]

    result = export(loaded, mixed, tmp_path / "slim")
    assert result.format == "decilm" and result.parameters == mixed.parameters.remaining
    assert_reloaded_equals_masked(loaded.model, mixed.player_names, load_exported(tmp_path / "slim", dtype=torch.float32))
    # an edited plan that removes a block and one of its own halves contradicts itself
    edited = mixed.model_dump()
    edited["removed"].append({**edited["removed"][-1], "name": "L2.mlp", "kind": "mlp"})
    with pytest.raises(ValueError, match="both L2.mlp and its whole block L2"):
        Plan.model_validate(edited)
    with pytest.raises(ValueError, match="measuring"):
        Planner(policy="fit", granularity="mixed", targets=["kv:50%"], profile=str(path))
    with pytest.raises(ValueError, match="number of players"):
        Planner(policy="greedy", granularity="mixed", drop=2)


@pytest.mark.parametrize("busy", [1.0, 2.0])
def test_a_saving_lost_in_the_timing_noise_leaves_the_hooked_times_and_says_so(tiny_llama, monkeypatch, clock, busy):
    """If cutting a kind saves nothing measurable (here: the cut model timed a millisecond slower than the
    whole), the profile does not scale that kind's costs to zero: it keeps the hooked times, as their share of
    the forward they were timed in, and lists the shapes as uncalibrated. A busy spell during the hooked run
    (``busy``: it took twice as long as the rounds) does not inflate them past the whole model's time."""
    import cornerstone.costs as costs

    time_shapes = costs._time_shapes
    cut = costs._cut

    def timed(variants, settings, modules=None, progress=None, rounds=1):
        clock.rate = busy if modules else 1.0  # only the hooked run names modules
        try:
            return time_shapes(variants, settings, modules, progress, rounds)
        finally:
            clock.rate = 1.0

    @contextmanager
    def slower(model, players):  # the model with the players cut, timed a millisecond slower than the whole
        with cut(model, players):
            head = model.lm_head.forward
            model.lm_head.forward = lambda *args, **kwargs: (clock.sleep(1e-3), head(*args, **kwargs))[1]
            try:
                yield
            finally:
                del model.lm_head.forward

    monkeypatch.setattr(costs, "_time_shapes", timed)
    monkeypatch.setattr(costs, "_cut", slower)
    slow_down(tiny_llama.model.model.embed_tokens, monkeypatch, clock)  # the whole forward outlasts its sublayers
    profile = measure_profile(tiny_llama, SMALL)
    assert sorted(profile.uncalibrated) == ["attn decode 16x2", "attn prefill 12", "mlp decode 16x2", "mlp prefill 12"]
    for measure, key, shape in (("prefill", "prefill_seconds", "12"), ("decode", "decode_seconds", "16x2")):
        for kind in ("attn", "mlp"):
            hooked = sum(profile.players[n].model_dump()[key][shape] for n in profile.removal_players[kind])
            costs_of_kind = sum(profile.cost(n, measure) for n in profile.removal_players[kind])
            assert costs_of_kind == pytest.approx(hooked / busy, rel=1e-3) and costs_of_kind > 0
        assert sum(profile.cost(n, measure) for n in profile.players) < profile.total(measure)
