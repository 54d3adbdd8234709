"""Training-free repair: a linear map, fitted in closed form, stands in for each removed span of blocks.

ReplaceMe (Shopkhoev et al. 2025, https://arxiv.org/abs/2505.02819): when blocks ``i..j`` go, the
block before them (``i-1``) should hand block ``j+1`` what block ``j`` would have. Its output is
``h = Y + M``, the residual stream ``Y`` plus ``M``, what its FFN's output projection adds; a map
``T`` (hidden x hidden) on ``M`` is fitted so that ``M T + Y`` is as close as it can be to ``L``, the
output of block ``j`` in the unpruned model, and then folded into that projection's weights, so the
repaired, pruned checkpoint is still the stock architecture (see :func:`repair`).

A plan with several separate spans is repaired span by span, each fitted with the spans before it
already dropped and repaired (``order: sequential``: the fit also absorbs what those earlier cuts
changed), or all on the unpruned model in one pass (``order: independent``, cheaper).
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field

from . import harness
from .calibration import Calibration, calibration_texts, hidden_states, tokenize_texts
from .errors import ConfigError, PlanError, UnsupportedArchitectureError
from .estimation import Progress
from .loading import LoadedModel
from .masking import without
from .players import architecture, decoder_layers, model_type, parse_players, removed_blocks, text_config


class RemovesPlayers(Protocol):
    """What repair reads of a plan (:class:`cornerstone.planner.Plan`): the ids of the players it removes."""

    @property
    def player_names(self) -> list[str]: ...


class LinearRepair(BaseModel):
    """How a removed span of blocks is replaced by a linear map folded into the block before it (ReplaceMe,
    Shopkhoev et al. 2025, arXiv 2505.02819, its least-squares variant).

    For a span ``i..j``, on every real (non-padding) token of the ``calibration`` text: ``M`` is what the FFN
    output projection of block ``i-1`` adds to the residual stream, ``Y = h_{i-1} - M`` the rest of that block's
    output, and ``L`` the output of block ``j`` in the unpruned model. The map is

        T = argmin ||M T + Y - L||^2 + lam ||T - I||^2 = (M^T M + lam I)^{-1} (M^T (L - Y) + lam I),

    with ``lam = ridge * trace(M^T M) / hidden``, so ``ridge`` means the same at every depth and scale. The
    ridge pulls ``T`` toward the identity, which is plain dropping (ReplaceMe's ridge pulls toward 0, which
    would erase block ``i-1``'s FFN as ``lam`` grows); at the default 1e-6 the two differ by far less than the
    fit's own error. ``M^T M`` and ``M^T (L - Y)`` are summed batch by batch in ``accumulate`` precision, so
    memory is hidden x hidden whatever the number of tokens; ``T`` is solved in float64.

    ``order``: ``sequential`` fits the spans front to back, each on the model with the earlier spans
    already dropped and repaired (two forward passes per batch and span after the first); ``independent``
    fits every span on the unpruned model in one pass (they then ignore each other's cuts).
    """

    model_config = ConfigDict(extra="forbid")

    calibration: Calibration = Field(default_factory=lambda: Calibration(source="bundled"))
    ridge: float = Field(1e-6, ge=0.0, allow_inf_nan=False)
    accumulate: Literal["float64", "float32"] = "float64"
    order: Literal["sequential", "independent"] = "sequential"


class SpanRepair(BaseModel):
    """One repaired span: which blocks went, where the map was folded, and how well it fits the calibration text.

    ``error_before`` / ``error_after``: ``||M T + Y - L|| / ||L - Y||`` over the calibration tokens with ``T = I``
    (plain dropping) and with the fitted ``T``; 0 means the span is reproduced exactly."""

    model_config = ConfigDict(extra="forbid")

    blocks: list[int]
    layer: int = Field(description="The block whose FFN output projection holds the map (the one before the span).")
    module: str = Field(description="Dotted path of that projection.")
    tokens: int
    error_before: float
    error_after: float


class RepairResult(BaseModel):
    """What :func:`repair` changed: one entry per span, in forward order."""

    model_config = ConfigDict(extra="forbid")

    spans: list[SpanRepair]
    texts: int
    seconds: float
    settings: LinearRepair


def spans(blocks: Collection[int]) -> list[tuple[int, int]]:
    """The maximal runs of consecutive block indices, ``(first, last)`` each, in order: ``{2, 3, 7}`` -> ``[(2, 3), (7, 7)]``."""
    runs: list[tuple[int, int]] = []
    for index in sorted(set(blocks)):
        if runs and runs[-1][1] == index - 1:
            runs[-1] = (runs[-1][0], index)
        else:
            runs.append((index, index))
    return runs


def output_projection(model: torch.nn.Module, layer: int) -> tuple[str, torch.nn.Module]:
    """The dotted path and module of block ``layer``'s FFN output projection: the last linear layer inside the FFN
    (found through the architecture table's FFN path) that writes the hidden size. Whether the block adds its output
    to the residual stream unchanged is checked on data by :func:`repair`, not assumed."""
    spec = architecture(model)
    kind = model_type(model)
    if spec.moe:
        raise UnsupportedArchitectureError(
            f"linear repair cannot fold into '{kind}': a mixture-of-experts FFN has no single output projection",
            hint="Export without repair, or repair a dense model.")
    path, layers = decoder_layers(model)
    block = layers[layer]
    hidden = text_config(model.config).hidden_size
    for name in spec.mlp:
        if hasattr(block, name):
            found = [(sub, module) for sub, module in block.get_submodule(name).named_modules()
                     if _out_features(module) == hidden]
            if found:
                return f"{path}.{layer}.{name}.{found[-1][0]}", found[-1][1]
    raise UnsupportedArchitectureError(f"block L{layer} of '{kind}' has no linear FFN output projection of width {hidden}",
                                       hint="Export without repair; this FFN's layout is not one cornerstone can fold into.")


def _out_features(module: torch.nn.Module) -> int | None:
    if isinstance(module, torch.nn.Linear):
        return module.out_features
    if type(module).__name__ == "Conv1D":  # GPT-2's transposed linear: y = x W + b, W is (in, out)
        return module.weight.shape[1]
    return None


def fold(projection: torch.nn.Module, transform: torch.Tensor) -> None:
    """Make ``projection``'s output ``y`` become ``y @ transform`` (weight and bias), in place.

    ``nn.Linear`` computes ``x W^T + b``, so ``(x W^T + b) T = x (T^T W)^T + b T``: ``W <- T^T W``, ``b <- b T``;
    GPT-2's ``Conv1D`` computes ``x W + b``: ``W <- W T``."""
    weight = projection.weight
    t = transform.to(torch.float64)
    with torch.no_grad():
        if isinstance(projection, torch.nn.Linear):
            new = t.T.to(weight.device) @ weight.double()
        else:
            new = weight.double() @ t.to(weight.device)
        weight.copy_(new.to(weight.dtype))
        if projection.bias is not None:
            projection.bias.copy_((projection.bias.double() @ t.to(weight.device)).to(projection.bias.dtype))


class _Stop(Exception):
    """Raised by a hook once the last block a pass needs has run: the rest of the model is not computed."""


@contextmanager
def _hooked(module: torch.nn.Module, hook: Any) -> Iterator[None]:
    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _mapped(projection: torch.nn.Module, transform: torch.Tensor) -> Any:
    """A hook that applies ``transform`` to ``projection``'s output: the fold, before it is made."""
    t = transform.to(projection.weight.device, projection.weight.dtype)
    return _hooked(projection, lambda _m, _a, output: output @ t)


def _run(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> None:
    decoder = getattr(model, "base_model", model)
    try:
        decoder(input_ids=ids, attention_mask=mask, use_cache=False)
    except _Stop:
        pass


def _batches(sequences: list[list[int]], batch_size: int, device: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded batches of ``sequences`` (sorted by length, so padding is short): ids and the real-token mask."""
    ordered = sorted(sequences, key=len)
    for start in range(0, len(ordered), batch_size):
        batch = ordered[start:start + batch_size]
        ids = torch.zeros((len(batch), max(len(s) for s in batch)), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, sequence in enumerate(batch):
            ids[row, :len(sequence)] = torch.tensor(sequence)
            mask[row, :len(sequence)] = 1
        yield ids.to(device), mask.to(device)


class _NormalEquations:
    """Running sums for one span: ``A = M^T M``, ``B = M^T R``, ``R = L - Y``, and ``||R||^2``, ``||M - R||^2``."""

    def __init__(self, hidden: int, dtype: torch.dtype, device: Any) -> None:
        self.a = torch.zeros((hidden, hidden), dtype=dtype, device=device)
        self.b = torch.zeros((hidden, hidden), dtype=dtype, device=device)
        self.target = 0.0  # ||R||^2
        self.dropped = 0.0  # ||M - R||^2 = ||h - L||^2: the error of plain dropping
        self.tokens = 0

    def add(self, h: torch.Tensor, m: torch.Tensor, out: torch.Tensor, real: torch.Tensor) -> None:
        dtype = self.a.dtype
        m, h, out = m[real].to(dtype), h[real].to(dtype), out[real].to(dtype)  # (tokens, hidden): padding left out
        r = out - (h - m)
        self.a += m.T @ m
        self.b += m.T @ r
        self.target += float(r.double().pow(2).sum())
        self.dropped += float((h - out).double().pow(2).sum())
        self.tokens += m.shape[0]

    def solve(self, ridge: float) -> tuple[torch.Tensor, float, float]:
        """``T`` and the relative errors of ``T = I`` and of ``T`` (see :class:`LinearRepair`)."""
        a, b = self.a.double(), self.b.double()
        eye = torch.eye(a.shape[0], dtype=torch.float64, device=a.device)
        lam = ridge * float(torch.trace(a)) / a.shape[0]
        t = torch.linalg.solve(a + lam * eye, b + lam * eye)
        # ||M T - R||^2 = tr(T^T A T) - 2 tr(T^T B) + ||R||^2: the fit's error from the sums alone
        residual = float((t * (a @ t)).sum() - 2 * (t * b).sum()) + self.target
        scale = max(self.target, 1e-300)
        return t, (self.dropped / scale) ** 0.5, (max(residual, 0.0) / scale) ** 0.5


def _check_fold_point(model: torch.nn.Module, layer: int, projection: torch.nn.Module, path: str,
                      ids: torch.Tensor, mask: torch.Tensor) -> None:
    """Refuse unless block ``layer`` adds ``projection``'s output to the residual stream unchanged (doubling that
    output must add it once more to the block's output). Not so where a norm follows the FFN (Gemma 2/3's
    ``post_feedforward_layernorm``, OLMo 2): there no map on the projection's output is a map on the residual."""
    _, layers = decoder_layers(model)
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Any:
        def hook(_m: Any, _a: Any, output: Any) -> None:
            seen[name] = hidden_states(output).float()
            if name.startswith("h"):
                raise _Stop
        return hook

    with torch.no_grad(), _hooked(projection, keep("m")), _hooked(layers[layer], keep("h")):
        _run(model, ids, mask)
    with torch.no_grad(), _hooked(projection, lambda _m, _a, output: 2 * output), _hooked(layers[layer], keep("h2")):
        _run(model, ids, mask)
    real = mask.bool()
    expected, actual = (seen["h"] + seen["m"])[real], seen["h2"][real]
    scale = float(expected.abs().max()) + float(seen["m"][real].abs().max())
    tolerance = 1e-4 if projection.weight.dtype == torch.float32 else 3e-2
    if not float((actual - expected).abs().max()) <= tolerance * scale:
        raise UnsupportedArchitectureError(
            f"linear repair cannot fold into '{model_type(model)}': block L{layer} does not add the output of {path} "
            "to the residual stream unchanged (a norm or gate follows its FFN), so no map on it is a map on the residual",
            hint="Export without repair; linear repair supports pre-norm FFNs (Llama, Qwen, Mistral, Phi-3, GPT-2, GPT-NeoX).")


def blocks_of(model: torch.nn.Module, blocks_removed: RemovesPlayers | Collection[int]) -> list[int]:
    """The block indices ``blocks_removed`` names (a plan's whole-block removals, or the indices themselves),
    checked: a plan that cuts a sublayer alone, an empty set, a block out of range, or a span starting at
    block 0 (no block before it to fold into) is refused with a :class:`PlanError`."""
    _, layers = decoder_layers(model)
    if hasattr(blocks_removed, "player_names"):  # a plan
        players = parse_players(model, blocks_removed.player_names)
        blocks = removed_blocks(players)
        halves = [p.name for p in players if p.layer not in blocks]
        if halves:
            raise PlanError(f"linear repair replaces whole blocks, but the plan also removes sublayers alone "
                            f"({', '.join(halves[:4])}{', ...' if len(halves) > 4 else ''})",
                            hint="Plan with --granularity block for a repaired export, or export this plan without repair.")
    else:
        if any(isinstance(b, bool) or not isinstance(b, int) for b in blocks_removed):
            raise PlanError(f"blocks to repair must be block indices (integers), got {sorted(map(repr, blocks_removed))}",
                            hint="Pass a plan, or a set of block numbers such as {20, 21, 22, 23}.")
        blocks = set(blocks_removed)
    if not blocks:
        raise PlanError("linear repair has nothing to do: no block is removed", hint="Pass a plan that removes whole blocks.")
    outside = sorted(b for b in blocks if not 0 <= b < len(layers))
    if outside:
        raise PlanError(f"blocks {outside} do not exist: the model has L0..L{len(layers) - 1}",
                        hint="Pass block numbers of this model.")
    if len(blocks) == len(layers):
        raise PlanError("a plan cannot drop every block", hint="Keep at least one block.")
    if 0 in blocks:
        first = spans(blocks)[0]
        raise PlanError(f"linear repair folds a span's map into the block before it, and the span L{first[0]}..L{first[1]} "
                        "starts at block 0",
                        hint="Keep L0 (--keep-first 1, the planner's default), or export this plan without repair.")
    return sorted(blocks)


def repair(
    model: LoadedModel | torch.nn.Module,
    blocks_removed: RemovesPlayers | Collection[int],
    settings: LinearRepair | None = None,
    *,
    tokenizer: Any = None,
    tasks: Sequence[harness.TaskSpec] = (),
    progress: Progress | None = None,
) -> RepairResult:
    """Fit a linear map for every maximal span of ``blocks_removed`` and fold it into the FFN output projection of
    the block before the span, changing ``model``'s weights in place (see :class:`LinearRepair` for the fit).

    The blocks themselves stay: the caller removes them afterwards, masked
    (:func:`~cornerstone.masking.without`) or cut (:func:`~cornerstone.export.drop_blocks`, ``export``), and only
    the model with them removed is the repaired one. ``tokenizer`` is needed when ``model`` is a plain
    transformers model; ``tasks`` when the calibration source is ``tasks``.
    """
    settings = settings or LinearRepair()
    loaded = model if isinstance(model, LoadedModel) else None
    module: torch.nn.Module = loaded.model if loaded else model  # type: ignore[assignment]
    tokenizer = tokenizer if tokenizer is not None else (loaded.tokenizer if loaded else None)
    if tokenizer is None:
        raise ConfigError("linear repair needs a tokenizer to read its calibration text",
                          hint="Pass a LoadedModel, or tokenizer= with a plain transformers model.")
    blocks = blocks_of(module, blocks_removed)
    runs = spans(blocks)
    projections = [output_projection(module, first - 1) for first, _ in runs]
    started = time.perf_counter()
    texts = calibration_texts(settings.calibration, tasks)
    sequences = tokenize_texts(tokenizer, texts, settings.calibration.max_length)
    if not sequences:
        raise ConfigError("no calibration text is at least 2 tokens long",
                          hint="Give longer calibration text (calibration.source).")
    device = next(module.parameters()).device
    batch_size = settings.calibration.batch_size
    ids, mask = next(_batches(sequences[:2], 2, device))
    for (first, _), (path, projection) in zip(runs, projections):
        _check_fold_point(module, first - 1, projection, path, ids, mask)

    dtype = torch.float64 if settings.accumulate == "float64" else torch.float32
    hidden = text_config(module.config).hidden_size
    groups = [list(range(len(runs)))] if settings.order == "independent" else [[k] for k in range(len(runs))]
    transforms: list[torch.Tensor] = []
    results: list[SpanRepair] = []
    total = len(groups) * -(-len(sequences) // batch_size)
    done = 0
    for group in groups:
        sums = [_NormalEquations(hidden, dtype, device) for _ in group]
        fitted = list(zip(runs[:len(transforms)], projections, transforms))  # spans already repaired (sequential)
        for ids, mask in _batches(sequences, batch_size, device):
            _accumulate(module, [runs[k] for k in group], [projections[k][1] for k in group], fitted, sums, ids, mask)
            done += 1
            if progress:
                progress(done, total, f"linear repair: calibration ({len(sequences)} texts)")
        for k, acc in zip(group, sums):
            t, before, after = acc.solve(settings.ridge)
            transforms.append(t)
            first, last = runs[k]
            results.append(SpanRepair(blocks=list(range(first, last + 1)), layer=first - 1, module=projections[k][0],
                                      tokens=acc.tokens, error_before=before, error_after=after))
    for (_, projection), t in zip(projections, transforms):
        fold(projection, t)
    return RepairResult(spans=results, texts=len(sequences), seconds=time.perf_counter() - started, settings=settings)


@contextmanager
def repaired(model: LoadedModel | torch.nn.Module, blocks_removed: RemovesPlayers | Collection[int],
             settings: LinearRepair | None = None, **options: Any) -> Iterator[RepairResult]:
    """:func:`repair` for the length of a ``with`` block: the folded projections get their weights back on exit,
    so a caller's model (``export`` of an in-memory model) is left as it was given. Copies only the
    projections that receive a map (one hidden x intermediate matrix per span), never the model."""
    module: torch.nn.Module = model.model if isinstance(model, LoadedModel) else model
    projections = [output_projection(module, first - 1)[1] for first, _ in spans(blocks_of(module, blocks_removed))]
    saved = [{name: tensor.detach().clone() for name, tensor in p.named_parameters(recurse=False)} for p in projections]
    try:
        yield repair(model, blocks_removed, settings, **options)
    finally:
        with torch.no_grad():
            for projection, originals in zip(projections, saved):
                for name, tensor in projection.named_parameters(recurse=False):
                    tensor.copy_(originals[name])


def _accumulate(model: torch.nn.Module, runs: list[tuple[int, int]], projections: list[torch.nn.Module],
                fitted: list[tuple[tuple[int, int], tuple[str, torch.nn.Module], torch.Tensor]],
                sums: list[_NormalEquations], ids: torch.Tensor, mask: torch.Tensor) -> None:
    """Add one batch to ``sums``: ``L`` from the unpruned model, ``h`` and ``M`` from the model with the ``fitted``
    spans dropped and their maps applied (the same pass when there are none)."""
    _, layers = decoder_layers(model)
    seen: dict[tuple[str, int], torch.Tensor] = {}
    stop_at = max(last for _, last in runs)

    def keep(key: tuple[str, int], stop: bool = False) -> Any:
        def hook(_m: Any, _a: Any, output: Any) -> None:
            seen[key] = hidden_states(output)
            if stop:
                raise _Stop
        return hook

    with torch.no_grad():
        with ExitStack() as stack:
            for first, last in runs:
                stack.enter_context(_hooked(layers[last], keep(("L", first), stop=last == stop_at)))
                if not fitted:
                    stack.enter_context(_hooked(layers[first - 1], keep(("h", first))))
            for (first, _), projection in zip(runs, projections):
                if not fitted:
                    stack.enter_context(_hooked(projection, keep(("M", first))))
            _run(model, ids, mask)
        if fitted:
            (first, _), projection = runs[0], projections[0]  # sequential: one span at a time
            dropped = [f"L{b}" for (a, z), _, _ in fitted for b in range(a, z + 1)]
            with ExitStack() as stack:
                stack.enter_context(without(model, parse_players(model, dropped)))
                for _, (_, done), t in fitted:
                    stack.enter_context(_mapped(done, t))
                stack.enter_context(_hooked(projection, keep(("M", first))))
                stack.enter_context(_hooked(layers[first - 1], keep(("h", first), stop=True)))
                _run(model, ids, mask)
    real = mask.bool()
    for (first, _), acc in zip(runs, sums):
        acc.add(hidden_states(seen[("h", first)]), seen[("M", first)], seen[("L", first)], real)
