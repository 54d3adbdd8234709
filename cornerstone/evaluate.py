"""Evaluate a pruned model against its base with lm-eval's standard path, side by side.

:func:`compare` is the Python API behind ``cornerstone eval``. Each model is evaluated from its
folder by lm-eval's own ``hf`` model (what ``lm_eval --model hf --model_args pretrained=DIR`` runs),
on the same documents, and measured for parameters, size on disk and forward throughput on this
machine, measured one after the other in one run.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from . import harness
from .files import atomic_write
from .loading import check_weights_format, dequantised_folder, load_model, remote_code_trusted, resolve
from .players import text_config


class ModelSummary(BaseModel):
    """One model's side of a comparison."""

    spec: str
    pretrained: str
    parameters: int
    bytes_on_disk: int
    tokens_per_second: float
    scores: dict[str, float]
    stderr: dict[str, float | None]
    mean_score: float


class Retention(BaseModel):
    """One model's scores relative to the base: per task and of the mean."""

    retention: dict[str, float]
    mean_retention: float
    above_chance_kept: dict[str, float | None]
    mean_above_chance_kept: float | None

    @classmethod
    def of(cls, base: ModelSummary, other: ModelSummary, chance: dict[str, float]) -> "Retention":
        mean_chance = sum(chance.values()) / len(chance)
        return cls(retention={name: other.scores[name] / base.scores[name] if base.scores[name] else 0.0 for name in chance},
                   mean_retention=other.mean_score / base.mean_score if base.mean_score else 0.0,
                   above_chance_kept={name: above_chance_kept(base.scores[name], other.scores[name], chance[name])
                                      for name in chance},
                   mean_above_chance_kept=above_chance_kept(base.mean_score, other.mean_score, mean_chance))


class Comparison(BaseModel):
    """Base and pruned model (and, after ``cornerstone heal``, the healed one) on the same tasks:
    scores, retention (model / base) and speed-up."""

    created: str
    tasks: list[dict[str, Any]]
    settings: dict[str, Any]
    base: ModelSummary
    pruned: ModelSummary
    retention: dict[str, float]
    mean_retention: float
    above_chance_kept: dict[str, float | None]
    mean_above_chance_kept: float | None
    speedup: float
    versions: dict[str, str]
    healed: ModelSummary | None = None
    healed_retention: Retention | None = None

    def to_markdown(self) -> str:
        healed = self.healed is not None and self.healed_retention is not None
        extra = " healed | healed retention | healed above chance kept |" if healed else ""
        rows = ["| task | metric | docs | chance | base | pruned | retention | above chance kept |" + extra,
                "|---|---|---|---|---|---|---|---|" + ("---|---|---|" if healed else "")]
        for task in self.tasks:
            name = task["name"]
            row = (f"| {name} | {task['metric']} | {task['num_docs']} | {task['chance']:.3f} | "
                   f"{_with_error(self.base, name)} | {_with_error(self.pruned, name)} | {self.retention[name]:.1%} | "
                   f"{_share(self.above_chance_kept[name])} |")
            if healed:
                row += (f" {_with_error(self.healed, name)} | {self.healed_retention.retention[name]:.1%} | "
                        f"{_share(self.healed_retention.above_chance_kept[name])} |")
            rows.append(row)
        mean = (f"| **mean** | | | | {self.base.mean_score:.4f} | {self.pruned.mean_score:.4f} | "
                f"**{self.mean_retention:.1%}** | **{_share(self.mean_above_chance_kept)}** |")
        if healed:
            mean += (f" {self.healed.mean_score:.4f} | **{self.healed_retention.mean_retention:.1%}** | "
                     f"**{_share(self.healed_retention.mean_above_chance_kept)}** |")
        rows.append(mean)
        size = ["", "| | base | pruned | ratio |", "|---|---|---|---|",
                f"| parameters | {self.base.parameters:,} | {self.pruned.parameters:,} | "
                f"{self.pruned.parameters / self.base.parameters:.1%} |",
                f"| size on disk | {self.base.bytes_on_disk / 2**20:,.1f} MiB | {self.pruned.bytes_on_disk / 2**20:,.1f} MiB | "
                f"{self.pruned.bytes_on_disk / max(1, self.base.bytes_on_disk):.1%} |",
                f"| tokens/s (forward, {self.settings['throughput']}) | {self.base.tokens_per_second:,.0f} | "
                f"{self.pruned.tokens_per_second:,.0f} | {self.speedup:.2f}x |"]
        healed_title = f" and {self.healed.spec}" if self.healed is not None else ""
        head = [f"# {self.pruned.spec}{healed_title} vs {self.base.spec}", "",
                f"lm-eval {self.versions.get('lm_eval')} (`--model hf`), {self.settings['dtype']}, "
                f"device {self.settings['device']}, {self.created}.", ""]
        return "\n".join(head + rows + size) + "\n"


def _share(value: float | None) -> str:
    return "n/a (base at or below chance)" if value is None else f"{value:.1%}"


def above_chance_kept(base: float, pruned: float, chance: float) -> float | None:
    """(pruned - chance) / (base - chance): the share of the base model's above-chance score that is left."""
    return (pruned - chance) / (base - chance) if base > chance else None


def _with_error(summary: ModelSummary, task: str) -> str:
    error = summary.stderr.get(task)
    return f"{summary.scores[task]:.4f}" + (f" ± {error:.4f}" if error is not None else "")


def lm_eval_location(spec: str, *, trust_remote_code: bool = False, allow_pickle: bool = False) -> tuple[str, bool, int]:
    """What to hand lm-eval as ``pretrained=`` for a model spec, whether it may run its remote code
    (:func:`~cornerstone.loading.remote_code_trusted`), and its weights' size on disk. GGUF models
    are evaluated from their dequantised safetensors cache."""
    source, location = resolve(spec)
    if source in ("alias", "gguf"):
        folder: Path | None = dequantised_folder(Path(location))[0]
    elif source == "folder":
        folder = Path(location)
    else:
        folder = None
    if folder is None:
        return str(location), False, 0
    check_weights_format(folder, allow_pickle)
    size = sum(p.stat().st_size for pattern in ("*.safetensors", "*.bin") for p in folder.glob(pattern))
    return str(folder), remote_code_trusted(folder, trust_remote_code), size


def tokens_per_second(models: Sequence[torch.nn.Module], *, batch: int = 4, length: int = 256, rounds: int = 3,
                      min_seconds: float = 1.0) -> list[float]:
    """Forward-pass throughput (prefill, no cache) of each model on the same fixed token ids.

    The models take turns for ``rounds`` rounds and each keeps its best round, so a slow spell of a
    shared machine does not land on one model only.
    """
    from .export import probe_ids

    best = [0.0] * len(models)
    with torch.no_grad():
        for _ in range(rounds):
            for index, model in enumerate(models):
                ids = probe_ids(text_config(model.config).vocab_size, batch=batch, length=length).to(model.device)
                model(ids, use_cache=False)  # warm-up
                runs, started = 0, time.perf_counter()
                while runs < 1 or time.perf_counter() - started < min_seconds:
                    model(ids, use_cache=False)
                    runs += 1
                best[index] = max(best[index], runs * batch * length / (time.perf_counter() - started))
    return best


def _summaries(models: Sequence[str], specs: Sequence[harness.TaskSpec], *, include_paths: Sequence[str | Path],
               batch_size: int, device: str, dtype: str, trust_remote_code: bool, allow_pickle: bool) -> list[ModelSummary]:
    found = []
    for spec in models:
        pretrained, remote, size = lm_eval_location(spec, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
        scores = harness.evaluate_pretrained(pretrained, specs, include_paths=include_paths, batch_size=batch_size,
                                             device=device, dtype=dtype, trust_remote_code=remote)
        found.append((spec, pretrained, remote, size, scores))
    loaded = [load_model(spec, dtype=dtype, device=device, trust_remote_code=remote, allow_pickle=allow_pickle)
              for spec, _, remote, _, _ in found]
    speeds = tokens_per_second([model.model for model in loaded])
    return [ModelSummary(spec=spec, pretrained=pretrained, parameters=model.num_parameters, bytes_on_disk=size,
                         tokens_per_second=speed, scores={k: v["score"] for k, v in scores.items()},  # type: ignore[misc]
                         stderr={k: v["stderr"] for k, v in scores.items()},
                         mean_score=sum(v["score"] for v in scores.values()) / len(scores))  # type: ignore[misc]
            for (spec, pretrained, _, size, scores), model, speed in zip(found, loaded, speeds)]


def compare(
    base: str,
    pruned: str,
    tasks: Sequence[str] = (harness.BUNDLED_TASK_GROUP,),
    *,
    include_paths: Sequence[str | Path] = (),
    limit: int | None = None,
    seed: int | None = 0,
    batch_size: int = 16,
    device: str | None = None,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    healed: str | None = None,
) -> Comparison:
    """Evaluate ``base`` and ``pruned`` (and ``healed``, a ``cornerstone heal`` output) on the same
    documents of ``tasks`` and put them side by side.

    ``retention_t = score_pruned(t) / score_base(t)``; ``mean_retention`` is the ratio of the mean
    scores. ``above_chance_kept_t = (pruned - chance) / (base - chance)`` is the share of the base
    model's above-chance score that is left (None where the base is not above chance): a task a small
    model answers near chance can show high retention while the pruned model knows nothing. ``speedup`` is the ratio of forward tokens/s (batch 4 x 256 tokens, prefill), the two
    models taking turns in this run (:func:`tokens_per_second`).
    """
    from .loading import resolve_device
    from .scores import package_versions

    device = resolve_device(device)
    specs = harness.load_tasks(list(tasks), include_paths=include_paths, limit=limit, seed=seed)
    summaries = _summaries([base, pruned, *([healed] if healed else [])], specs, include_paths=include_paths,
                           batch_size=batch_size, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                           allow_pickle=allow_pickle)
    base_summary, pruned_summary = summaries[:2]
    chance = {spec.name: spec.chance for spec in specs}
    pruned_retention = Retention.of(base_summary, pruned_summary, chance)
    return Comparison(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        tasks=[spec.describe() for spec in specs],
        settings={"tasks": list(tasks), "include_paths": [str(p) for p in include_paths], "limit": limit, "seed": seed,
                  "batch_size": batch_size, "device": device, "dtype": dtype, "throughput": "batch 4 x 256 tokens",
                  "torch_threads": torch.get_num_threads()},
        base=base_summary,
        pruned=pruned_summary,
        **pruned_retention.model_dump(),
        speedup=pruned_summary.tokens_per_second / base_summary.tokens_per_second,
        versions=package_versions(),
        healed=summaries[2] if healed else None,
        healed_retention=Retention.of(base_summary, summaries[2], chance) if healed else None,
    )


def save(comparison: Comparison, path: str | Path) -> tuple[Path, Path]:
    """Write the comparison as JSON and, beside it, Markdown; return both paths."""
    path = Path(path)
    atomic_write(path, comparison.model_dump_json(indent=2).encode())
    markdown = path.with_suffix(".md")
    atomic_write(markdown, comparison.to_markdown().encode())
    return path, markdown


def default_eval_path(pruned: str, folder: str | Path = "reports") -> Path:
    return Path(folder) / f"eval-{Path(pruned.rstrip('/')).name}.json"
