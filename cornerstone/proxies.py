"""One-pass importance proxies: AVSS, block influence, angular distance and sublayer cosine.

Ablation and Shapley values measure task scores with players removed, at one evaluation per
coalition. A proxy instead reads activations of the full model on a calibration text once
(:mod:`cornerstone.calibration`) and turns them into one number per player: :meth:`Proxy.measure`
needs only the model (and, for calibration text drawn from them, the tasks). As an
:class:`~cornerstone.estimation.Estimator`, ``cornerstone score --method avss|bi|angular|cosine``
writes the same report as the other methods: the value function is used once, for the full
model's score and chance (the report's baseline). Higher importance means more important, as for
every method, so the planner drops the lowest ones. How faithful each proxy is to ablation and
Shapley is what ``cornerstone compare`` measures.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .calibration import ActivationStats, Calibration, calibration_texts, record
from .errors import PlayerError
from .estimation import Estimate, PlayerEstimate, Progress, configure
from .players import Player

if TYPE_CHECKING:
    from .harness import TaskSpec
    from .loading import LoadedModel
    from .value import ValueFunction


class Proxy(BaseModel):
    """What every proxy shares: the calibration pass and the report's baseline evaluation."""

    model_config = ConfigDict(extra="forbid")

    kinds: ClassVar[tuple[str, ...]] = ("block",)
    # what to use instead when asked for a granularity the proxy does not score (estimation.configure)
    granularity_hint: ClassVar[str | None] = None
    calibration: Calibration = Field(default_factory=Calibration)

    # the AVSS near-zero threshold is recorded in the pass; the other proxies leave the default
    def _near_zero(self) -> tuple[float, bool]:
        return 0.01, True

    def importances(self, stats: ActivationStats, players: Sequence[Player]) -> tuple[dict[str, float], dict[str, Any]]:
        raise NotImplementedError  # pragma: no cover - every proxy overrides it

    def planned_evaluations(self, players: int) -> int:
        return 1  # the full model only, for the report's baseline

    def measure(self, loaded: LoadedModel, players: Sequence[Player], tasks: Sequence[TaskSpec] = (),
                progress: Progress | None = None) -> tuple[dict[str, float], dict[str, Any]]:
        """Each player's importance from one calibration pass over ``loaded``, and the diagnostics.
        ``tasks`` are where the calibration source ``tasks`` draws its texts from."""
        wrong = sorted({p.kind for p in players} - set(self.kinds))
        if wrong:
            method = getattr(self, "method")
            raise PlayerError(f"{method} scores {' and '.join(self.kinds)} players, not {', '.join(wrong)}",
                              hint="Choose a --granularity the method supports (see `cornerstone score --help`).")
        texts = calibration_texts(self.calibration, tasks)
        if progress:
            progress(0, 1, "calibration pass")
        threshold, relative = self._near_zero()
        stats = record(loaded, texts, max_length=self.calibration.max_length,
                       batch_size=self.calibration.batch_size, near_zero=threshold, relative=relative, progress=progress)
        values, diagnostics = self.importances(stats, players)
        diagnostics["calibration"] = {"source": self.calibration.source, "texts": stats.texts, "tokens": stats.tokens,
                                      "seconds": stats.seconds}
        return values, diagnostics

    def estimate(self, value: ValueFunction, players: Sequence[Player], progress: Progress | None = None) -> Estimate:
        """:meth:`measure` on the value function's model and tasks, beside the full model's evaluation."""
        full = value.evaluate([])
        values, diagnostics = self.measure(value.loaded, players, value.tasks, progress)
        return Estimate(full, {p.name: PlayerEstimate(importance=values[p.name]) for p in players}, diagnostics)


class AVSS(Proxy):
    """Activation Variance-Sparsity Score, Song et al. 2024 (https://arxiv.org/abs/2411.02117).

    For each player i with activation ``a`` (a block's output; a sublayer's own output) on the
    calibration texts:

        var_i    = mean over texts of Var over hidden units of (mean over the text's tokens of a)
        sparse_i = share of entries of a with |a| < threshold * rms(token)   (or < threshold, absolute)
        AVSS_i   = (var_i / sum_j var_j) / (sparse_i + epsilon),   then normalised to sum to 1

    Pruning candidates are the players taken in increasing AVSS while their cumulative share stays
    within ``prune_share`` (the paper's ~25%); they are listed in the diagnostics. Two choices differ
    from the reference code, on purpose:

    - it accumulates shares in layer order and sorts afterwards, which selects the first layers
      rather than the least important ones; here the players are sorted first.
    - its sparsity counts exact (or absolutely tiny) zeros, which a residual stream almost never
      has, so the score divides by ~0. Here the threshold is relative to each token's RMS by
      default (``relative=True``: it means the same at every depth, though the residual stream grows),
      and ``epsilon`` bounds the division. With sparsity ~0 everywhere, AVSS ranks by variance alone.
    """

    method: Literal["avss"] = "avss"
    granularity: Literal["block", "sublayer"] = "block"
    kinds: ClassVar[tuple[str, ...]] = ("block", "attn", "mlp")
    threshold: float = Field(0.01, gt=0, description="Near-zero threshold (a share of the token's RMS when relative).")
    relative: bool = True
    epsilon: float = Field(1e-3, gt=0, description="Added to the sparsity before dividing.")
    prune_share: float = Field(0.25, gt=0, lt=1, description="Cumulative AVSS share of the pruning candidates.")

    def _near_zero(self) -> tuple[float, bool]:
        return self.threshold, self.relative

    def importances(self, stats: ActivationStats, players: Sequence[Player]) -> tuple[dict[str, float], dict[str, Any]]:
        variance = np.array([stats.sites[p.name].variance for p in players])
        sparsity = np.array([stats.sites[p.name].sparsity for p in players])
        normalised_variance = variance / variance.sum() if variance.sum() > 0 else np.full(len(players), 1 / len(players))
        raw = normalised_variance / (sparsity + self.epsilon)
        scores = raw / raw.sum()
        order = np.argsort(scores, kind="stable")
        candidates, cumulative = [], 0.0
        for index in order:
            if cumulative + scores[index] > self.prune_share:
                break
            cumulative += scores[index]
            candidates.append(players[index].name)
        return ({p.name: float(s) for p, s in zip(players, scores)},
                {"variance": dict(zip((p.name for p in players), variance.tolist())),
                 "sparsity": dict(zip((p.name for p in players), sparsity.tolist())),
                 "prune_candidates": candidates, "prune_candidates_share": cumulative})


class BlockInfluence(Proxy):
    """Block influence, ShortGPT (Men et al. 2024, https://arxiv.org/abs/2403.03853).

        BI_i = 1 - mean over tokens t of cos(x_{i,t}, y_{i,t})

    with ``x`` the block's input and ``y`` its output hidden state. An identity block has BI 0; a
    block that only rescales its input has BI 0 too. ShortGPT removes the lowest-BI blocks.
    """

    method: Literal["bi"] = "bi"
    granularity: Literal["block"] = "block"
    granularity_hint: ClassVar[str | None] = "For sublayers use --method cosine."

    def importances(self, stats: ActivationStats, players: Sequence[Player]) -> tuple[dict[str, float], dict[str, Any]]:
        return {p.name: 1.0 - stats.sites[p.name].mean_cosine for p in players}, {}


class AngularDistance(Proxy):
    """Angular distance between block inputs, Gromov et al. 2024 (https://arxiv.org/abs/2403.17887).

        d(l, n) = mean over texts of arccos(cos(x_l, x_{l+n})) / pi

    at each text's last token, with ``x_l`` block l's input (``x_L`` the last block's output). A
    block's importance is ``d(l, 1)``. The diagnostics keep ``d(l, n)`` for every span (``spans``,
    keyed by n) and the start of the least distant span of each length (``best_spans``); the planner's
    ``contiguous`` policy uses them to pick the span to drop, as the paper does.
    """

    method: Literal["angular"] = "angular"
    granularity: Literal["block"] = "block"
    granularity_hint: ClassVar[str | None] = "For sublayers use --method cosine."

    def importances(self, stats: ActivationStats, players: Sequence[Player]) -> tuple[dict[str, float], dict[str, Any]]:
        distance = stats.angular
        blocks = distance.shape[0] - 1
        spans = {str(n): [float(distance[start, start + n]) for start in range(blocks - n + 1)] for n in range(1, blocks + 1)}
        best = {n: {"start": int(np.argmin(values)), "distance": float(min(values))} for n, values in spans.items()}
        return ({p.name: float(distance[p.layer, p.layer + 1]) for p in players},
                {"spans": spans, "best_spans": best})


class SublayerCosine(Proxy):
    """Sublayer cosine importance, LLM-Drop (He et al. 2024, "What Matters in Transformers? Not All
    Attention Is Needed", https://arxiv.org/abs/2406.15786).

        importance = 1 - mean over tokens of cos(X, X + f(X))

    for an attention or FFN sublayer f with residual input X (the block's input for attention; the
    residual after attention for the FFN, or the block's input in parallel-residual blocks). A
    zeroed sublayer has importance 0.
    """

    method: Literal["cosine"] = "cosine"
    granularity: Literal["sublayer"] = "sublayer"
    granularity_hint: ClassVar[str | None] = "For blocks use --method bi (the same formula on whole blocks)."
    kinds: ClassVar[tuple[str, ...]] = ("attn", "mlp")

    def importances(self, stats: ActivationStats, players: Sequence[Player]) -> tuple[dict[str, float], dict[str, Any]]:
        return {p.name: 1.0 - stats.sites[p.name].mean_cosine for p in players}, {}


PROXIES: dict[str, type[Proxy]] = {"avss": AVSS, "bi": BlockInfluence, "angular": AngularDistance, "cosine": SublayerCosine}


def make_proxy(method: str, *, granularity: str | None = None, calibration: Calibration | None = None,
               **avss_options: Any) -> Proxy:
    """The proxy named ``method``; ``avss_options`` (threshold, relative, epsilon, prune_share) go to AVSS only."""
    return configure(PROXIES[method], granularity, calibration=calibration, **avss_options)
