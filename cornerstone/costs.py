"""What each player costs on a device, and what a target asks to save: the data behind ``plan --target``.

:func:`measure_profile` (``cornerstone profile MODEL``) measures, for every attention and MLP
sublayer of a loaded model, on the device it is loaded on:

* ``weight_bytes``: the bytes its weights take (shared weights counted once);
* ``kv_bytes_per_token``: an attention sublayer's KV-cache bytes per token, 2 (keys and values) x KV
  heads x head size x element size; a sliding-window layer holds at most its window
  (``kv_window``), so at context c it costs ``min(c, window) / c`` of that per token (the ``kv``
  measure is taken at the first decode shape's context);
* ``prefill_seconds`` at each prompt length and ``decode_seconds`` at each (context, batch): the time
  spent inside the sublayer during the model's own forward, timed by hooks around it (the device
  synchronised on a GPU), median over repeats. A decode step starts from a copy of one sequence's cache
  repeated along the batch (:func:`_filled_cache`). Timing inside the real forward, caches and masks
  included, needs no per-architecture call of a sublayer alone.

The time inside a sublayer is not all that its removal changes: its own norms, the residual add and
the module calls around it go too, and a hook's own time is inside it. So the profile also measures,
per kind and shape, the time ``removal_seconds`` that removing every attention (or every MLP)
sublayer but the first layer's saves (``removal_players``), cut as an export cuts it (the sublayer
not computed, its own norms passed through), taking turns with the whole model at every timed step (``rounds``); a
player's time cost is its hooked time scaled so that the removed players' costs add up to that
measured saving: ``cost_i = hooked_i * removal_k / sum_{j in removal_players_k} hooked_j``. A saving
no larger than its spread over the rounds (paired by round) is noise, not a measurement: there the
hooked times stand as shares of the forward they were timed in, ``removal_k = whole * sum_j hooked_j /
hooked_forward`` (so the players never add up to more than the whole model, however the machine's load
moved between the hooked run and the rounds), and the profile lists the shape in ``uncalibrated``. The first
layer's stays so that the calibrated model still fills a KV cache: on SmolLM2 (CPU, decode at 512)
removing the last attention sublayer alone saved 7 ms of 68, the causal mask over the context no
longer being built, a saving no real plan gets.

Per shape it also records the whole forward's median time (``totals``, timed without hooks): what is
left after the sublayers (embeddings, final norm, LM head, Python) is not removable, and a speed-up
is measured against the total. A block's cost is the sum of its two sublayers'. Savings add up
across players: the assumption the planner's solver (:mod:`cornerstone.solver`) rests on, checked
after export by measuring the pruned model itself (``evaluate``'s speed).

Targets (:func:`parse_target`): ``weights:70%`` (keep at most 70% of the weight bytes), ``weights:90MB``,
``kv:50%`` (of the KV cache per token), ``decode:1.3x`` / ``prefill:1.2x`` (a speed-up at the profile's
first decode / prefill shape), ``decode:4ms`` / ``prefill:30ms`` (absolute time per step). Each
becomes a need: what the removed players must save together.
"""

from __future__ import annotations

import copy
import inspect
import re
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import ConfigError, PlanError, ReportError
from .files import atomic_write, parse_json, read_validated

PROFILE_SCHEMA_VERSION = 2
T = TypeVar("T")


class PlayerCost(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    layer: int = Field(ge=0)
    kind: str
    weight_bytes: int = Field(ge=0)
    kv_bytes_per_token: int = Field(ge=0)
    kv_window: int | None = Field(None, ge=1)
    prefill_seconds: dict[str, float]
    decode_seconds: dict[str, float]


class CostProfile(BaseModel):
    """Per-sublayer costs of one model on one device (``cornerstone profile``'s JSON)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    schema_version: Literal[2] = PROFILE_SCHEMA_VERSION
    created: str
    model: dict[str, Any]
    device: str
    dtype: str
    machine: dict[str, Any]
    versions: dict[str, str]
    prefill_lengths: list[int]
    decode_shapes: list[str] = Field(description="CONTEXTxBATCH, e.g. 512x1")
    players: dict[str, PlayerCost]
    totals: dict[str, Any] = Field(description="weight_bytes, kv_bytes_per_token, prefill_seconds and decode_seconds "
                                   "of the whole model")
    removal_seconds: dict[Literal["attn", "mlp"], dict[str, dict[str, float]]] = Field(
        description="per kind: the prefill_seconds and decode_seconds per shape that removing removal_players of that "
        "kind saved, measured (the calibration of the players' hooked times)")
    removal_players: dict[Literal["attn", "mlp"], list[str]] = Field(
        description="per kind: the players removed together to measure removal_seconds (every one but the first layer's)")
    uncalibrated: list[str] = Field(default_factory=list, description="'KIND MEASURE SHAPE' whose measured saving was "
                                    "within its spread over the rounds: there removal_seconds is the hooked times' share of "
                                    "the forward they were timed in, times the whole model's")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        atomic_write(path, (self.model_dump_json(indent=2) + "\n").encode())
        return path

    @classmethod
    def load(cls, path: str | Path) -> CostProfile:
        profile = read_validated(cls, path, parse_json, "JSON", ReportError, "cost profile",
                                 hint="Make one with `cornerstone profile MODEL --out PROFILE.json`.")
        shaped = [("prefill_seconds", str(s)) for s in profile.prefill_lengths]
        shaped += [("decode_seconds", s) for s in profile.decode_shapes]
        for name, cost in profile.players.items():
            missing = [shape for key, shape in shaped if shape not in getattr(cost, key)]
            if missing or cost.kind not in ("attn", "mlp") or name != f"L{cost.layer}.{cost.kind}":
                raise ReportError(f"cost profile '{path}': player {name} is inconsistent (name, kind or shapes)",
                                  hint="Re-measure with `cornerstone profile`.")
        kinds = {cost.kind for cost in profile.players.values()}
        for kind in kinds:
            saved = profile.removal_seconds.get(kind, {})
            named = profile.removal_players.get(kind)
            if not named or any(profile.players.get(n, None) is None or profile.players[n].kind != kind for n in named):
                raise ReportError(f"cost profile '{path}': removal_players of {kind} is missing or names other players",
                                  hint="Re-measure with `cornerstone profile`.")
            if any(not 0 <= saved.get(key, {}).get(shape, -1) <= _seconds(profile.totals, key, shape)
                   for key, shape in shaped):
                raise ReportError(f"cost profile '{path}': removal_seconds of {kind} is missing a shape or is not "
                                  "between 0 and the whole model's time", hint="Re-measure with `cornerstone profile`.")
        return profile

    def cost(self, name: str, measure: str) -> float:
        """What removing player ``name`` (``L5``, ``L5.attn``) saves in ``measure`` (a :data:`MEASURES` key)."""
        members = [name] if "." in name else [f"{name}.attn", f"{name}.mlp"]
        if any(m not in self.players for m in members):
            raise PlanError(f"the cost profile has no costs for {name}", hint="Profile the model the report was made on.")
        return sum(_measure(self.players[m], measure, self) for m in members)

    def total(self, measure: str) -> float:
        return _measure(None, measure, self)


def _seconds(source: Mapping[str, Any], key: str, shape: str) -> float:
    times = source.get(key)
    return float(times[shape]) if isinstance(times, Mapping) and isinstance(times.get(shape), (int, float)) else -1.0


def _measure(cost: PlayerCost | None, measure: str, profile: CostProfile) -> float:
    source = cost.model_dump() if cost is not None else profile.totals
    if measure == "weights":
        return float(source["weight_bytes"])
    if measure == "kv":  # at the first decode shape's context: a sliding-window layer holds at most its window
        if cost is None:
            return sum(_measure(c, "kv", profile) for c in profile.players.values())
        context = _decode_shape(profile.decode_shapes[0])[0]
        return float(cost.kv_bytes_per_token) * (min(context, cost.kv_window) / context if cost.kv_window else 1.0)
    if measure in TIMED:
        key = f"{measure}_seconds"
        shape = str(profile.prefill_lengths[0]) if measure == "prefill" else profile.decode_shapes[0]
        if cost is None:
            return float(profile.totals[key][shape])
        # the hooked time, scaled so that the removed players' costs add up to what removing them measurably saved
        hooked = sum(getattr(profile.players[n], key)[shape] for n in profile.removal_players[cost.kind])
        saved = profile.removal_seconds[cost.kind][key][shape]
        return float(source[key][shape]) * (saved / hooked if hooked > 0 else 0.0)
    raise ConfigError(f"unknown cost '{measure}'", hint=f"Use one of: {', '.join(MEASURES)}.")


MEASURES = ("weights", "kv", "prefill", "decode")
TIMED = ("prefill", "decode")  # the measures that are timed (seconds), not counted (bytes)
_TARGET = re.compile(r"^\s*(weights|kv|prefill|decode)\s*:\s*(\d+(?:\.\d+)?)\s*(%|x|mb|gb|kb|ms|s)\s*$", re.I)
_UNITS = {"kb": 1e3, "mb": 1e6, "gb": 1e9, "ms": 1e-3, "s": 1.0}


@dataclass(frozen=True)
class Target:
    """One cost target: ``measure`` must end at most :meth:`limit` of the whole model's cost."""

    text: str
    measure: str
    number: float
    unit: str  # "%", "x", or a unit of bytes (kb, mb, gb) or seconds (ms, s)

    @property
    def timed(self) -> bool:
        return self.measure in TIMED

    def limit(self, whole: float) -> float:
        """The most the pruned model may cost, for a whole model that costs ``whole`` (same unit)."""
        if self.unit == "%":
            return whole * self.number / 100
        if self.unit == "x":
            return whole / self.number
        return self.number * _UNITS[self.unit]

    def need(self, profile: CostProfile, headroom: float = 0.0) -> float:
        """What the removed players must save together. A time target is planned to ``(1 - headroom)``
        of its limit, so that a plan still meets it when the measurement lands a few percent off the
        profile's prediction (run-to-run noise); bytes are counted, not timed, and take none."""
        whole = profile.total(self.measure)
        margin = headroom if self.timed else 0.0
        return whole - self.limit(whole) * (1 - margin)

    def check(self, base: Mapping[str, Any], pruned: Mapping[str, Any]) -> dict[str, Any]:
        """The target against two measured models (:func:`measure_speed`'s results, same shapes): the
        limit is taken from the measured base, so a speed-up is checked as a ratio on this device."""
        whole, cost = _measured(base, self.measure), _measured(pruned, self.measure)
        limit = self.limit(whole)
        return {"target": self.text, "measure": self.measure, "base": whole, "pruned": cost, "limit": limit,
                "met": cost <= limit * (1 + 1e-9)}


def _measured(measured: Mapping[str, Any], measure: str) -> float:
    if measure == "weights":
        return float(measured["weight_bytes"])
    if measure == "kv":
        return float(measured["kv_cache_bytes_per_token"])
    times = measured[f"{measure}_seconds"]
    return float(times[next(iter(times))])  # the first shape: the one targets refer to


def parse_target(text: str) -> Target:
    """``kv:50%``, ``weights:90MB``, ``decode:1.3x``, ``prefill:30ms``: see the module docstring."""
    match = _TARGET.match(text)
    if match is None:
        raise ConfigError(f"target '{text}' is not understood",
                          hint="Write e.g. --target kv:50% (share kept), weights:90MB, decode:1.3x (speed-up) or decode:4ms.")
    measure, number, unit = match.group(1).lower(), float(match.group(2)), match.group(3).lower()
    if unit == "%":
        if not 0 < number < 100:
            raise ConfigError(f"target '{text}': a share kept must lie between 0% and 100%")
    elif unit == "x":
        if measure not in TIMED or number <= 1:
            raise ConfigError(f"target '{text}': a speed-up applies to prefill or decode and must exceed 1x")
    elif (unit in ("ms", "s")) != (measure in TIMED):
        raise ConfigError(f"target '{text}': {measure} is measured in "
                          f"{'seconds (ms, s)' if measure in TIMED else 'bytes (KB, MB, GB)'}")
    elif measure == "kv":
        raise ConfigError(f"target '{text}': give the KV cache as a share kept (kv:50%)")
    return Target(text=text, measure=measure, number=number, unit=unit)


class ProfileSettings(BaseModel):
    """What ``cornerstone profile`` measures: the shapes timed and how often."""

    model_config = ConfigDict(extra="forbid")

    prefill_lengths: list[int] = Field([256], min_length=1, description="Prompt lengths timed (batch 1); the first "
                                       "is the one prefill targets refer to.")
    decode_shapes: list[str] = Field(["512x1"], min_length=1, description="CONTEXTxBATCH decode shapes timed (one new "
                                     "token after CONTEXT cached ones); the first is the one decode and kv targets "
                                     "refer to.")
    repeats: int = Field(5, ge=1, description="Timed runs per shape (after one warm-up); the median is kept.")
    rounds: int = Field(3, ge=1, description="Rounds of the calibration: the whole model and the model without each "
                        "kind of sublayer taking turns at every timed step, each keeping the median of its rounds.")
    seed: int = 0

    @field_validator("prefill_lengths")
    @classmethod
    def _lengths(cls, lengths: list[int]) -> list[int]:
        if any(length < 1 for length in lengths):
            raise ValueError("prompt lengths must be at least 1 token")
        return lengths

    @field_validator("decode_shapes")
    @classmethod
    def _shapes(cls, shapes: list[str]) -> list[str]:
        for shape in shapes:
            if re.fullmatch(r"[1-9]\d*x[1-9]\d*", shape.strip()) is None:
                raise ValueError(f"decode shape '{shape}' is not CONTEXTxBATCH (e.g. 512x1)")
        return [shape.strip() for shape in shapes]


def measure_profile(loaded: Any, settings: ProfileSettings | None = None, progress: Any = None) -> CostProfile:
    """Measure every sublayer's costs on the device ``loaded`` sits on (module docstring).

    ``progress(done, total, what)`` is called after each shape."""
    import torch

    from .players import enumerate_players, player_parameters, text_config
    from .provenance import machine, package_versions

    settings = settings or ProfileSettings()
    model = loaded.model
    config = text_config(model.config)
    players = enumerate_players(model)
    element = torch.finfo(model.dtype).bits // 8
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    (hooked_rounds,), per_player = _time_shapes([(model, nullcontext)], settings,
                                                {p.name: p.module_path for p in players}, progress)
    hooked_forward = hooked_rounds[0]
    # calibration: the whole model, then without every attention / every MLP sublayer, timed in turns (no hooks)
    kinds = sorted({p.kind for p in players})
    # (all of a kind but the first layer's: a model with no attention left fills no cache, and its decode step
    # then skips work, the causal mask over the context, that any real plan keeps)
    cut = {kind: [p for p in players if p.kind == kind][1:] for kind in kinds}
    variants = [(model, nullcontext)] + [(model, lambda kind=kind: _cut(model, cut[kind])) for kind in kinds]
    rounds = _time_shapes(variants, settings, rounds=settings.rounds)[0]
    whole = _medians(rounds[0])
    removal: dict[str, dict[str, dict[str, float]]] = {}
    unresolved = []
    for kind, without in zip(kinds, rounds[1:]):
        removal[kind] = {}
        for key in ("prefill_seconds", "decode_seconds"):
            removal[kind][key] = {}
            for shape in whole[key]:
                # paired by round: a saving no larger than its spread over the rounds is noise (a shared machine),
                # and then the hooked times stand uncalibrated, as their share of the forward they were timed in
                # (not as seconds: that run may have had the machine to itself, or not), and say so
                saved = [a[key][shape] - b[key][shape] for a, b in zip(rounds[0], without)]
                hooked = sum(per_player[p.name][key][shape] for p in cut[kind])
                if statistics.median(saved) <= max(saved) - min(saved) or statistics.median(saved) <= 0:
                    removal[kind][key][shape] = whole[key][shape] * hooked / hooked_forward[key][shape]
                    unresolved.append(f"{kind} {key.removesuffix('_seconds')} {shape}")
                else:
                    removal[kind][key][shape] = statistics.median(saved)
    calibrated = {kind: [p.name for p in cut[kind]] for kind in kinds}
    costs = {}
    for p in players:
        sliding = window if window and layer_types and layer_types[p.layer] == "sliding_attention" else None
        costs[p.name] = PlayerCost(
            layer=p.layer, kind=p.kind, weight_bytes=player_parameters(model, p) * element,
            kv_bytes_per_token=2 * kv_heads * head_dim * element if p.kind == "attn" else 0,
            kv_window=sliding if p.kind == "attn" else None,
            prefill_seconds=per_player[p.name]["prefill_seconds"], decode_seconds=per_player[p.name]["decode_seconds"])
    return CostProfile(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), model=loaded.describe(),
        device=str(model.device), dtype=str(model.dtype).removeprefix("torch."),
        machine={**machine(), **({"gpu": torch.cuda.get_device_name(model.device)} if model.device.type == "cuda" else {})},
        versions=package_versions(), prefill_lengths=list(settings.prefill_lengths),
        decode_shapes=list(settings.decode_shapes), players=costs,
        totals={**whole, "kv_bytes_per_token": sum(c.kv_bytes_per_token for c in costs.values())},
        removal_seconds=removal, removal_players=calibrated, uncalibrated=unresolved)


@contextmanager
def _cut(model: Any, players: Sequence[Any]) -> Iterator[None]:
    """``players`` cut as an export cuts them, for the duration: each not computed (masking's ``without``) and its
    own norms (:func:`~cornerstone.players.owned_modules`) passing their input on."""
    from .masking import without
    from .players import owned_modules

    norms = [model.get_submodule(path) for p in players for path in owned_modules(model, p)[1:]]
    with without(model, players), _passing(norms):
        yield


@contextmanager
def _passing(modules: Sequence[Any]) -> Iterator[None]:
    """Each module returns its (first) input for the duration: for timing only."""
    saved = [(m, m.__dict__.get("forward")) for m in modules]
    try:
        for module in modules:
            module.forward = lambda hidden, *_, **__: hidden
        yield
    finally:
        for module, original in saved:
            if original is None:
                del module.forward
            else:
                module.forward = original


def take_turns(count: int, repeats: int, step: Callable[[int], T]) -> list[list[T]]:
    """``step(i)`` (time variant i once) for every variant in turn, ``repeats`` times after one warm-up each:
    each variant's results, warm-up left out.

    Why turns at every step: on a shared machine the speed drifts over seconds. Timing the very same SmolLM2
    object twice (decode 512x1, prefill 128, 7 repeats x 3 rounds, AMD EPYC, 2 cores), back to back (every
    repeat of one, then every repeat of the other, round by round) put it up to 8% (decode) and 16% (prefill)
    away from itself over six trials, s.d. 0.05 and 0.08 of the ratio; taking turns at every step, at most 2.1%
    and 2.4%, s.d. 0.011 (bench/timing_turns.py: reports/speed/turns-amd-epyc.md)."""
    results: list[list[T]] = [[] for _ in range(count)]
    for repeat in range(repeats + 1):
        for index in range(count):
            value = step(index)
            if repeat:
                results[index].append(value)
    return results


def _medians(measured: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One run's rounds as one result: the median of its rounds' times per shape."""
    first = measured[0]
    return {**first, **{key: {shape: statistics.median(run[key][shape] for run in measured) for shape in first[key]}
                        for key in ("prefill_seconds", "decode_seconds")}}


def measure_speed(model: Any, settings: ProfileSettings | None = None) -> dict[str, Any]:
    """What a whole model costs on its device, timed as :func:`measure_profile` times it: ``weight_bytes``,
    ``prefill_seconds`` and ``decode_seconds`` per shape, and ``kv_cache_bytes_per_token``, read from the
    cache the first decode shape's context filled (so a pruned model's real cache, windows included)."""
    return _time_shapes([(model, nullcontext)], settings or ProfileSettings())[0][0][0]


def measure_side_by_side(models: Sequence[Any], settings: ProfileSettings, rounds: int = 3) -> list[dict[str, Any]]:
    """:func:`measure_speed` of each model, the models taking turns at every timed step (:func:`take_turns`) for
    ``rounds`` rounds of ``settings.repeats`` steps, each time the median over its rounds' medians."""
    return [_medians(measured) for measured in
            _time_shapes([(model, nullcontext) for model in models], settings, rounds=rounds)[0]]


def _time_shapes(variants: Sequence[tuple[Any, Callable[[], Any]]], settings: ProfileSettings,
                 modules: Mapping[str, str] | None = None, progress: Any = None, rounds: int = 1
                 ) -> tuple[list[list[dict[str, Any]]], dict[str, dict[str, dict[str, float]]]]:
    """Median times of each variant's whole forward per shape and round, and of each module in ``modules``
    (name -> path, in the first variant's model) inside it.

    A variant is a model and the context it runs in (``nullcontext``, or :func:`_cut`: the same model with
    sublayers cut). The variants take turns at every timed step (:func:`take_turns`), each round with its
    own warm-up. Per variant: one result per round, :func:`measure_speed`'s dict. A prefill computes only the
    last position's logits where the forward takes ``logits_to_keep``, as a serving engine's does."""
    import torch

    from .players import unique_parameters

    modules = modules or {}
    model = variants[0][0]
    cuda = model.device.type == "cuda"
    generator = torch.Generator().manual_seed(settings.seed)
    vocab = model.get_input_embeddings().weight.shape[0]
    shapes = [_decode_shape(s) for s in settings.decode_shapes]
    spent: dict[str, float] = {}
    started: dict[str, float] = {}

    def now() -> float:
        if cuda:
            torch.cuda.synchronize(model.device)
        return time.perf_counter()

    def before(name: str) -> Any:
        return lambda *_: started.__setitem__(name, now())

    def after(name: str) -> Any:
        return lambda *_: spent.__setitem__(name, spent.get(name, 0.0) + now() - started[name])

    handles = []
    for name, path in modules.items():
        module = model.get_submodule(path)
        handles += [module.register_forward_pre_hook(before(name)), module.register_forward_hook(after(name))]
    # per variant and key, one list of times per round; per module and key, every round's times
    totals: list[dict[str, list[list[float]]]] = [{} for _ in variants]
    inside: dict[str, dict[str, list[float]]] = {name: {} for name in modules}

    def timed(key: str, runs: Sequence[Any], prepares: Sequence[Any]) -> None:
        def step(index: int) -> tuple[float, dict[str, float]]:
            with variants[index][1]():
                state = prepares[index]()  # untimed: e.g. a fresh copy of the decode cache
                spent.clear()
                t0 = now()
                runs[index](state)
                return now() - t0, dict(spent)

        for _ in range(rounds):
            for index, steps in enumerate(take_turns(len(variants), settings.repeats, step)):
                totals[index].setdefault(key, []).append([elapsed for elapsed, _ in steps])
                if index == 0:
                    for name in modules:
                        inside[name].setdefault(key, []).extend(hooked.get(name, 0.0) for _, hooked in steps)

    steps = len(settings.prefill_lengths) + len(shapes)
    cache_bytes = [0.0] * len(variants)
    # each model's own forward (a pruned layout's modeling code may differ from the stock model's): transformers 5
    # renamed the cache argument (older releases take past_key_values), and not every forward takes logits_to_keep
    cache_arguments = ["cache" if "cache" in inspect.signature(m.forward).parameters else "past_key_values"
                       for m, _ in variants]
    lasts = [last_logits_only(m) for m, _ in variants]
    try:
        with torch.inference_mode():
            for length in settings.prefill_lengths:
                ids = torch.randint(0, vocab, (1, length), generator=generator).to(model.device)
                timed(f"prefill:{length}", [lambda _, m=m, last=last: m(input_ids=ids, use_cache=False, **last)
                                            for (m, _), last in zip(variants, lasts)], [lambda: None] * len(variants))
                if progress:
                    progress(len(totals[0]), steps, f"prefill {length}")
            for index, (text, (context, batch)) in enumerate(zip(settings.decode_shapes, shapes)):
                ids = torch.randint(0, vocab, (batch, context + 1), generator=generator).to(model.device)
                filled = []
                for number, (m, context_of) in enumerate(variants):
                    filled.append(_filled_cache(m, context_of, ids[:, :context], cache_arguments[number], lasts[number]))
                    if index == 0:
                        cache_bytes[number] = _tensor_bytes(filled[-1]) / (context * batch)
                # every timed step starts from the same CONTEXT cached tokens (a copy: a step appends to its cache)
                timed(f"decode:{text}", [lambda cache, m=m, argument=argument, last=last: m(
                    input_ids=ids[:, context:], use_cache=True, **{argument: cache}, **last)
                    for (m, _), argument, last in zip(variants, cache_arguments, lasts)],
                      [lambda cache=cache: copy.deepcopy(cache) for cache in filled])
                if progress:
                    progress(len(totals[0]), steps, f"decode {text}")
    finally:
        for handle in handles:
            handle.remove()

    def medians(runs: dict[str, list[float]]) -> dict[str, dict[str, float]]:
        return {"prefill_seconds": {str(s): statistics.median(runs[f"prefill:{s}"]) for s in settings.prefill_lengths},
                "decode_seconds": {s: statistics.median(runs[f"decode:{s}"]) for s in settings.decode_shapes}}

    weights = [unique_parameters(m) * (torch.finfo(m.dtype).bits // 8) for m, _ in variants]
    per_variant = [[{"weight_bytes": weights[number], "kv_cache_bytes_per_token": cache_bytes[number],
                     **medians({key: times[r] for key, times in totals[number].items()})} for r in range(rounds)]
                   for number in range(len(variants))]
    return per_variant, {name: medians(runs) for name, runs in inside.items()}


def _filled_cache(model: Any, context_of: Callable[[], Any], ids: Any, argument: str, last: dict[str, int]) -> Any:
    """The cache a decode step at ``ids``' shape (batch x context) starts from. One sequence is prefilled and its
    cache repeated along the batch where the cache can (``batch_repeat_interleave``): a decode step's work
    depends on the cache's shape, not on what it holds, and a batch's prefill costs batch times one sequence's
    (16 x 2048 tokens is most of a profile's time on a CPU). Otherwise the whole batch is prefilled."""
    with context_of():
        output = model(input_ids=ids[:1], use_cache=True, **last)
        cache = output.cache if argument == "cache" else output.past_key_values
        if ids.shape[0] == 1:
            return cache
        if callable(getattr(cache, "batch_repeat_interleave", None)):
            cache.batch_repeat_interleave(ids.shape[0])
            return cache
        output = model(input_ids=ids, use_cache=True, **last)
    return output.cache if argument == "cache" else output.past_key_values


def last_logits_only(model: Any) -> dict[str, int]:
    """``{"logits_to_keep": 1}`` where the model's forward takes it, else nothing: a forward then computes only the
    last position's logits, as a serving engine's prefill does (a 262k-token vocabulary's logits at every position
    are a gigabyte per batch)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _tensor_bytes(value: Any, seen: set[int] | None = None, depth: int = 4) -> int:
    """Bytes of every tensor reachable from a cache object within ``depth`` attribute or item steps (a
    cache's layers' keys and values), each counted once."""
    import torch

    seen = set() if seen is None else seen
    if depth < 0:
        return 0
    if isinstance(value, torch.Tensor):
        if id(value) in seen:
            return 0
        seen.add(id(value))
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v, seen, depth - 1) for v in value)
    if isinstance(value, dict):
        return sum(_tensor_bytes(v, seen, depth - 1) for v in value.values())
    if hasattr(value, "__dict__") and not isinstance(value, (type, torch.nn.Module)):
        return sum(_tensor_bytes(v, seen, depth - 1) for v in vars(value).values())
    return 0


def _decode_shape(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text.strip())
    if match is None or int(match.group(1)) < 1 or int(match.group(2)) < 1:
        raise ConfigError(f"decode shape '{text}' is not CONTEXTxBATCH", hint="Write e.g. 512x1 (context 512, batch 1).")
    return int(match.group(1)), int(match.group(2))


def needs(targets: Sequence[Target], profile: CostProfile, headroom: float = 0.0) -> dict[str, float]:
    """The saving each measure needs: the largest any target on it asks (:meth:`Target.need`)."""
    out: dict[str, float] = {}
    for target in targets:
        out[target.measure] = max(out.get(target.measure, 0.0), target.need(profile, headroom))
    return out


def savings(profile: CostProfile, names: Sequence[str], measures: Mapping[str, float] | Sequence[str]) -> dict[str, float]:
    """What removing ``names`` saves in each measure (savings added up)."""
    return {m: sum(profile.cost(n, m) for n in names) for m in measures}


def format_cost(measure: str, value: float) -> str:
    """A cost in its unit, as the CLI, the plan and eval print it: times in ms, weights in MiB, KV in KiB/token."""
    if measure in TIMED:
        return f"{value * 1e3:.2f} ms"
    return f"{value / 2**20:,.2f} MiB" if measure == "weights" else f"{value / 2**10:,.2f} KiB/token"
