"""The calibration pass of the one-pass proxies: read a text set once and keep per-layer statistics.

:func:`calibration_texts` picks the text (the scoring tasks' documents, the bundled tasks'
documents, or a user file); :func:`record` runs the model over it in batches and, with forward
hooks, reduces every block's activations to running sums as soon as the block has run. Memory is
bounded by one batch: no activation outlives its block, only sums and each block's last-token state
(for angular distances) are kept.

Each activation *site* has an input ``X``, an output ``Y`` and the output of the module itself
(what the site adds to the residual stream, ``Y - X``):

- block ``Lk``: ``X`` = the block's input, ``Y`` = its output; the AVSS activation is ``Y``, the layer's output.
- attention ``Lk.attn``: ``X`` = the block's input, ``Y = X + c_attn`` where ``c_attn`` is the output
  of the attention (or of its post-norm, :attr:`~cornerstone.players.Architecture.attn_residual`).
- FFN ``Lk.mlp``: ``X`` = the residual after attention (the block's input in parallel-residual
  blocks), ``Y = X + c_mlp``, with ``c_mlp`` = block output - block input - ``c_attn``. Taking the
  FFN's share as what is left of the block's update works for every architecture, MoE included,
  without hooking inside the FFN.

The AVSS activation of a sublayer is its own output ``c``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from . import harness
from .errors import ConfigError
from .estimation import Progress
from .loading import LoadedModel
from .players import architecture, decoder_layers, text_config
from .texts import read_texts


class Calibration(BaseModel):
    """The text a one-pass proxy reads, and how.

    ``source``: ``tasks`` (the documents of the tasks being scored, each as prompt + gold answer),
    ``bundled`` (every document of cornerstone's bundled tasks) or a path to a ``.txt`` file
    (paragraphs separated by blank lines), a ``.jsonl`` file (a ``text`` field per line) or a ``.json``
    list of strings. At most ``samples`` texts are drawn with ``seed``; each is cut to ``max_length`` tokens.
    """

    model_config = ConfigDict(extra="forbid")

    source: str = "tasks"
    samples: int = Field(128, ge=1)
    max_length: int = Field(256, ge=2)
    batch_size: int = Field(8, ge=1)
    seed: int = 0


def calibration_texts(calibration: Calibration, tasks: Sequence[harness.TaskSpec] = ()) -> list[str]:
    """The texts ``calibration`` names (:func:`cornerstone.texts.read_texts`)."""
    return read_texts(calibration.source, calibration.samples, calibration.seed, tasks)


@dataclass
class SiteStats:
    """Running sums over the calibration set for one activation site (see the module docstring)."""

    cosine_sum: float = 0.0  # sum over tokens of cos(X, Y)
    tokens: int = 0
    variance_sum: float = 0.0  # sum over texts of Var_units(mean over tokens of the AVSS activation)
    texts: int = 0
    near_zero: int = 0  # AVSS activation entries below the near-zero threshold
    entries: int = 0

    @property
    def mean_cosine(self) -> float:
        return self.cosine_sum / max(1, self.tokens)

    @property
    def variance(self) -> float:
        return self.variance_sum / max(1, self.texts)

    @property
    def sparsity(self) -> float:
        return self.near_zero / max(1, self.entries)


@dataclass
class ActivationStats:
    """What one calibration pass measured: sums per site (``L3``, ``L3.attn``, ``L3.mlp``) and the
    angular distance between every pair of block inputs at each text's last token.

    ``angular_sum[i, j]`` sums ``arccos(cos(x_i, x_j)) / pi`` over texts, where ``x_i`` is block i's
    input (``x_L``: the last block's output).
    """

    sites: dict[str, SiteStats]
    angular_sum: np.ndarray
    texts: int
    tokens: int
    seconds: float
    near_zero_threshold: float
    relative_threshold: bool
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def angular(self) -> np.ndarray:
        return self.angular_sum / max(1, self.texts)


def hidden_states(output: Any) -> torch.Tensor:
    """The hidden states a decoder block's forward hook sees (a block returns them alone or first in a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def tokenize_texts(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Each text's token ids, cut at ``max_length``; texts under 2 tokens are left out (nothing to predict)."""
    encoded = [tokenizer(text, truncation=True, max_length=max_length)["input_ids"] for text in texts]
    return [ids for ids in encoded if len(ids) >= 2]


class _Accumulator:
    """Reduces one batch's activations to :class:`SiteStats` sums, block by block."""

    def __init__(self, stats: ActivationStats, parallel: bool) -> None:
        self.stats = stats
        self.parallel = parallel
        self.mask: torch.Tensor | None = None  # (batch, tokens) bool: real tokens
        self.last: torch.Tensor | None = None  # (batch,) index of each text's last real token
        self.block_inputs: dict[int, torch.Tensor] = {}
        self.attn_outputs: dict[int, torch.Tensor] = {}
        self.last_states: list[torch.Tensor] = []

    def site(self, name: str, x: torch.Tensor, y: torch.Tensor, activation: torch.Tensor) -> None:
        s = self.stats.sites.setdefault(name, SiteStats())
        mask = self.mask
        assert mask is not None
        real_x, real_y, real_a = x[mask], y[mask], activation[mask]  # (tokens, hidden)
        s.cosine_sum += torch.nn.functional.cosine_similarity(real_x, real_y, dim=-1, eps=1e-12).sum().item()
        s.tokens += real_x.shape[0]
        weights = mask.to(activation.dtype).unsqueeze(-1)
        pooled = (activation * weights).sum(1) / weights.sum(1)  # mean over each text's tokens
        s.variance_sum += pooled.var(dim=-1, unbiased=False).sum().item()
        s.texts += pooled.shape[0]
        scale = real_a.pow(2).mean(-1, keepdim=True).sqrt() if self.stats.relative_threshold else 1.0
        s.near_zero += int((real_a.abs() < self.stats.near_zero_threshold * scale).sum().item())
        s.entries += real_a.numel()

    def block_done(self, index: int, output: torch.Tensor) -> None:
        h_in = self.block_inputs.pop(index).float()
        h_out = output.float()
        # a removed attention sublayer is not computed (masking.without), so a hook inside it never fires: its
        # contribution is zero
        attn = self.attn_outputs.pop(index, None)
        c_attn = attn.float() if attn is not None else torch.zeros_like(h_in)
        self.site(f"L{index}", h_in, h_out, h_out)
        after_attn = h_in + c_attn
        self.site(f"L{index}.attn", h_in, after_attn, c_attn)
        c_mlp = h_out - after_attn
        mlp_in = h_in if self.parallel else after_attn
        self.site(f"L{index}.mlp", mlp_in, mlp_in + c_mlp, c_mlp)
        rows = torch.arange(h_in.shape[0], device=h_in.device)
        self.last_states.append(h_in[rows, self.last])
        self._final = h_out[rows, self.last]

    def batch_done(self) -> None:
        # float64: arccos is steep near cos = 1, where float32 rounding alone reads as a distance of ~1e-4
        states = torch.stack(self.last_states + [self._final]).double()  # (blocks + 1, batch, hidden)
        unit = torch.nn.functional.normalize(states, dim=-1, eps=1e-12)
        cosines = torch.einsum("ibd,jbd->bij", unit, unit).clamp(-1.0, 1.0)
        self.stats.angular_sum += (torch.arccos(cosines) / torch.pi).sum(0).cpu().numpy()
        self.last_states = []


def record(
    loaded: LoadedModel,
    texts: Sequence[str],
    *,
    max_length: int = 256,
    batch_size: int = 8,
    near_zero: float = 0.01,
    relative: bool = True,
    progress: Progress | None = None,
) -> ActivationStats:
    """One forward pass per batch of ``texts``; every block's activations reduced to sums by hooks.

    Texts are tokenised with the model's tokenizer (special tokens as the tokenizer adds them), cut
    to ``max_length`` tokens, sorted by length and right-padded; padding never enters a sum. An
    AVSS activation entry is near zero when ``|a| < near_zero * rms(token)`` (``relative``, so the
    threshold means the same at every depth although the residual stream grows) or
    ``|a| < near_zero`` (absolute). Only the decoder runs: the language-model head is not needed.
    """
    model = loaded.model
    arch = architecture(model)
    _, layers = decoder_layers(model)
    parallel = bool(arch.parallel_residual and getattr(text_config(model.config), arch.parallel_residual, False))
    sequences = sorted(tokenize_texts(loaded.tokenizer, texts, max_length), key=len)
    if not sequences:
        raise ConfigError("no calibration text is at least 2 tokens long")
    n = len(layers)
    stats = ActivationStats(sites={}, angular_sum=np.zeros((n + 1, n + 1)), texts=0, tokens=0, seconds=0.0,
                            near_zero_threshold=near_zero, relative_threshold=relative,
                            settings={"max_length": max_length, "batch_size": batch_size})
    acc = _Accumulator(stats, parallel)
    handles = []
    for index, block in enumerate(layers):
        def keep_input(_module: Any, args: tuple, kwargs: dict, index: int = index) -> None:
            acc.block_inputs[index] = args[0] if args else kwargs["hidden_states"]

        def keep_attn(_module: Any, _args: Any, output: Any, index: int = index) -> None:
            acc.attn_outputs[index] = hidden_states(output)

        def reduce_block(_module: Any, _args: Any, output: Any, index: int = index) -> None:
            acc.block_done(index, hidden_states(output))

        attn_site = arch.attn_residual if arch.attn_residual and hasattr(block, arch.attn_residual) else arch.attn
        handles.append(block.register_forward_pre_hook(keep_input, with_kwargs=True))
        handles.append(block.get_submodule(attn_site).register_forward_hook(keep_attn))
        handles.append(block.register_forward_hook(reduce_block))
    decoder = getattr(model, "base_model", model)
    device = next(model.parameters()).device
    batches = [sequences[i:i + batch_size] for i in range(0, len(sequences), batch_size)]
    started = time.perf_counter()
    try:
        with torch.no_grad():
            for done, batch in enumerate(batches):
                longest = max(len(ids) for ids in batch)
                ids = torch.zeros((len(batch), longest), dtype=torch.long)
                mask = torch.zeros((len(batch), longest), dtype=torch.long)
                for row, sequence in enumerate(batch):
                    ids[row, :len(sequence)] = torch.tensor(sequence)
                    mask[row, :len(sequence)] = 1
                acc.mask = mask.bool().to(device)
                acc.last = (mask.sum(1) - 1).to(device)
                decoder(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                acc.batch_done()
                stats.texts += len(batch)
                stats.tokens += int(mask.sum())
                if progress:
                    progress(done + 1, len(batches), f"calibration pass ({stats.texts} texts)")
    finally:
        for handle in handles:
            handle.remove()
        acc.block_inputs.clear()
        acc.attn_outputs.clear()
    stats.seconds = time.perf_counter() - started
    return stats
