"""Size a scoring run before it starts: memory on the device and time, from one measured evaluation.

:func:`estimate_run` is called by :func:`cornerstone.scores.score` once the model is loaded and the
full model has been evaluated (every method needs v(N) first, so measuring it costs nothing):

    memory  = weights + prefix cache + one batch of activations
            = P * bytes(dtype)  +  cache_bytes  +  B * T * (V + 4 H) * 4
    time    = evaluations * seconds(v(N)) / processes

with P parameters, B the rows of the largest batch (the batch size, or the number of requests when
there are fewer), T the longest request in tokens, V the vocabulary and H the hidden size (the
float32 logits of a batch dominate the activations). ``evaluations`` is the
method's upper bound (ablation: n + 1; Shapley: its budget plus the n + 1 single removals; a
proxy: 1), and the first evaluation includes the one-off tokenisation, so the time errs long.
A run whose memory exceeds what the device has free is refused unless forced.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel

from .errors import ConfigError
from .players import text_config, unique_parameters


class RunEstimate(BaseModel):
    """What a scoring run will need (see the module docstring for the formulas)."""

    parameters: int
    weight_bytes: int
    cache_bytes: int
    activation_bytes: int
    memory_bytes: int
    available_bytes: int | None
    evaluations: int
    processes: int
    seconds_per_evaluation: float
    seconds: float
    # False when v(N) came from the value store: its time is an earlier run's, on that run's machine and load
    timed_now: bool = True

    def describe(self) -> str:
        free = f" of {self.available_bytes / 2**30:.1f} GiB free" if self.available_bytes is not None else ""
        return (f"estimate: {self.evaluations} evaluations x {self.seconds_per_evaluation:.1f} s"
                f"{f' / {self.processes} processes' if self.processes > 1 else ''} = {_duration(self.seconds)}"
                f"{'' if self.timed_now else ' (timed by the earlier run that stored v(N))'}; "
                f"memory {self.memory_bytes / 2**30:.2f} GiB{free} (weights {self.weight_bytes / 2**30:.2f}, "
                f"cache {self.cache_bytes / 2**30:.2f}, activations {self.activation_bytes / 2**30:.2f})")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def available_memory(device: torch.device) -> int | None:
    """Free bytes on ``device`` now: the GPU's free memory, or the machine's available RAM on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        import psutil
    except ImportError:  # pragma: no cover - accelerate depends on psutil
        return None
    return int(psutil.virtual_memory().available)


def estimate_run(model: torch.nn.Module, *, evaluations: int, seconds_per_evaluation: float, batch_size: int,
                 longest_request: int, cache_bytes: int, processes: int = 1, timed_now: bool = True,
                 requests: int | None = None) -> RunEstimate:
    """The memory and time of a run on ``model`` (already loaded, so its weights are counted but not
    asked of the free memory again). ``requests``: how many sequences one evaluation scores; no batch
    holds more, whatever ``batch_size`` allows."""
    config = text_config(model.config)
    parameters = unique_parameters(model)
    first = next(model.parameters())
    weight_bytes = parameters * first.element_size()
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    rows = min(batch_size, requests) if requests else batch_size
    activation_bytes = rows * longest_request * (vocab + 4 * hidden) * 4
    return RunEstimate(
        parameters=parameters, weight_bytes=weight_bytes, cache_bytes=cache_bytes, activation_bytes=activation_bytes,
        memory_bytes=weight_bytes + cache_bytes + activation_bytes, available_bytes=available_memory(first.device),
        evaluations=evaluations, processes=processes, seconds_per_evaluation=seconds_per_evaluation,
        seconds=evaluations * seconds_per_evaluation / max(1, processes), timed_now=timed_now)


def check_fits(estimate: RunEstimate, *, force: bool = False) -> None:
    """Refuse a run whose cache and activations do not fit in the free memory (the weights are loaded already)."""
    needed = estimate.cache_bytes + estimate.activation_bytes
    if force or estimate.available_bytes is None or needed <= estimate.available_bytes:
        return
    raise ConfigError(f"the run needs {needed / 2**30:.1f} GiB more than the weights but {estimate.available_bytes / 2**30:.1f} "
                      "GiB are free", hint="Lower --batch-size, use more processes or devices, or pass --force.")
