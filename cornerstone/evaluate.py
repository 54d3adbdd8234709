"""Evaluate a pruned model against its base with lm-eval's standard path, side by side.

:func:`compare` is the Python API behind ``cornerstone eval``. Each model is evaluated from its
folder by lm-eval's own ``hf`` model (what ``lm_eval --model hf --model_args pretrained=DIR`` runs),
on the same documents, and measured for parameters, size on disk and forward throughput on this
machine, measured one after the other in one run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field

from . import harness
from .errors import TaskError
from .estimators import macro_stderr, paired_differences, paired_stderr
from .files import write_with_markdown
from .loading import LoadedModel, check_weights_format, dequantised_folder, remote_code_trusted, resolve
from .players import text_config, unique_parameters
from .report import OUTPUT_FOLDER
from .settings import EvalSettings


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
    mean_stderr: float | None = None  # of the unweighted task mean, tasks independent
    per_doc: dict[str, list[float] | None] = Field({}, description="Each task's per-document values of its metric "
                                                   "(document-index order; None where the score is not their mean).")


class Retention(BaseModel):
    """One model's scores relative to the base: per task and of the mean."""

    retention: dict[str, float]
    mean_retention: float
    above_chance_kept: dict[str, float | None]
    mean_above_chance_kept: float | None
    above_chance_kept_stderr: dict[str, float | None] = {}
    mean_above_chance_kept_stderr: float | None = None

    @classmethod
    def of(cls, base: ModelSummary, other: ModelSummary, chance: dict[str, float]) -> "Retention":
        mean_chance = sum(chance.values()) / len(chance)
        kept = {name: above_chance_kept(base.scores[name], other.scores[name], chance[name], base.stderr.get(name))
                for name in chance}
        mean_kept = above_chance_kept(base.mean_score, other.mean_score, mean_chance, base.mean_stderr)
        return cls(retention={name: other.scores[name] / base.scores[name] if base.scores[name] else 0.0 for name in chance},
                   mean_retention=other.mean_score / base.mean_score if base.mean_score else 0.0,
                   above_chance_kept=kept, mean_above_chance_kept=mean_kept,
                   above_chance_kept_stderr={name: above_chance_kept_stderr(base, other, {name: chance[name]}, kept[name])
                                             for name in chance},
                   mean_above_chance_kept_stderr=above_chance_kept_stderr(base, other, chance, mean_kept))


class Comparison(BaseModel):
    """Base and pruned model (and, after ``cornerstone heal``, the healed one) on the same tasks:
    scores, retention (model / base) and speed-up. ``documents`` says which documents were used and
    how they relate to the ones the plan was scored on (:func:`scored_documents`)."""

    created: str
    tasks: list[dict[str, Any]]
    settings: dict[str, Any]
    documents: dict[str, Any] = {}
    base: ModelSummary
    pruned: ModelSummary
    retention: dict[str, float]
    mean_retention: float
    above_chance_kept: dict[str, float | None]
    mean_above_chance_kept: float | None
    above_chance_kept_stderr: dict[str, float | None] = {}
    mean_above_chance_kept_stderr: float | None = None
    speedup: float
    versions: dict[str, str]
    healed: ModelSummary | None = None
    healed_retention: Retention | None = None
    costs: list[dict[str, Any]] | None = Field(None, description="A plan made to cost targets (plan --policy fit): "
                                               "each target checked on base and pruned measured side by side here.")

    def to_markdown(self) -> str:
        healed = self.healed is not None and self.healed_retention is not None
        extra = " healed | healed retention | healed above chance kept |" if healed else ""
        rows = ["| task | metric | docs | chance | base | pruned | retention | above chance kept |" + extra,
                "|---|---|---|---|---|---|---|---|" + ("---|---|---|" if healed else "")]
        for task in self.tasks:
            name = task["name"]
            row = (f"| {name} | {task['metric']} | {task['num_docs']} | {task['chance']:.3f} | "
                   f"{_with_error(self.base, name)} | {_with_error(self.pruned, name)} | {self.retention[name]:.1%} | "
                   f"{_share(self.above_chance_kept[name], self.above_chance_kept_stderr.get(name))} |")
            if healed:
                row += (f" {_with_error(self.healed, name)} | {self.healed_retention.retention[name]:.1%} | "
                        f"{_share(self.healed_retention.above_chance_kept[name], self.healed_retention.above_chance_kept_stderr.get(name))} |")
            rows.append(row)
        mean = (f"| **mean** | | | | {_mean_with_error(self.base)} | {_mean_with_error(self.pruned)} | "
                f"**{self.mean_retention:.1%}** | **{_share(self.mean_above_chance_kept, self.mean_above_chance_kept_stderr)}** |")
        if healed:
            mean += (f" {_mean_with_error(self.healed)} | **{self.healed_retention.mean_retention:.1%}** | "
                     f"**{_share(self.healed_retention.mean_above_chance_kept, self.healed_retention.mean_above_chance_kept_stderr)}** |")
        rows.append(mean)
        size = ["", "| | base | pruned | ratio |", "|---|---|---|---|",
                f"| parameters | {self.base.parameters:,} | {self.pruned.parameters:,} | "
                f"{self.pruned.parameters / self.base.parameters:.1%} |",
                f"| size on disk | {self.base.bytes_on_disk / 2**20:,.1f} MiB | {self.pruned.bytes_on_disk / 2**20:,.1f} MiB | "
                f"{self.pruned.bytes_on_disk / max(1, self.base.bytes_on_disk):.1%} |",
                f"| tokens/s (forward, {self.settings['throughput']}) | {self.base.tokens_per_second:,.0f} | "
                f"{self.pruned.tokens_per_second:,.0f} | {self.speedup:.2f}x |"]
        if self.costs:
            from .costs import format_cost as _cost

            size += ["", "| target (measured here, side by side) | base | pruned | limit | met |", "|---|---|---|---|---|"]
            size += [f"| {c['target']} | {_cost(c['measure'], c['base'])} | {_cost(c['measure'], c['pruned'])} | "
                     f"{_cost(c['measure'], c['limit'])} | {'yes' if c['met'] else '**no**'} |" for c in self.costs]
        healed_title = f" and {self.healed.spec}" if self.healed is not None else ""
        head = [f"# {self.pruned.spec}{healed_title} vs {self.base.spec}", "",
                f"lm-eval {self.versions.get('lm_eval')} (`--model hf`), {self.settings['dtype']}, "
                f"device {self.settings['device']}"
                + (f" ({self.settings['machine']['cpu']}{', AMX' if self.settings['machine'].get('amx') else ', no AMX'})"
                   if self.settings.get("machine") and self.settings["device"] == "cpu" else "")
                + f", {self.created}.", ""]
        if self.documents.get("summary"):
            head += [f"Documents: {self.documents['summary']}", ""]
        return "\n".join(head + rows + size) + "\n"


def _share(value: float | None, stderr: float | None = None) -> str:
    if value is None:
        return "n/a (base within 2 s.e. of chance)"
    return f"{value:.1%}" + (f" ± {stderr:.1%}" if stderr is not None else "")


def above_chance_kept(base: float, pruned: float, chance: float, base_stderr: float | None = None) -> float | None:
    """(pruned - chance) / (base - chance): the share of the base model's above-chance score that is left.

    None where the base is not above chance, or (given its standard error) not by more than 2 s.e.:
    dividing by a margin inside the noise gives ratios like -240% that say nothing."""
    margin = base - chance
    if margin <= 0 or (base_stderr is not None and margin <= 2 * base_stderr):
        return None
    return (pruned - chance) / margin


def above_chance_kept_stderr(base: ModelSummary, other: ModelSummary, chance: Mapping[str, float],
                             kept: float | None) -> float | None:
    """Paired standard error of ``kept = (P - C) / (B - C)`` over the tasks in ``chance`` (P, B: the two models'
    macro-mean scores on the same documents, C: the mean chance level), by the delta method:

        kept_hat - kept ~ ((P_hat - P) - kept (B_hat - B)) / (B - C)
        SE(kept) ~ SE( (1/T) sum_t mean_d (p_td - kept b_td) ) / (B - C)

    with the standard error of that macro mean of per-document values taken as :func:`paired_stderr` does.
    Pairing matters: a document both models answer alike adds nothing, so the error is of the pruning, not of
    the task's sample (unpaired errors, which add the two scores' variances, overstate it). None where ``kept``
    is None or a task has no per-document values (:func:`~cornerstone.harness.evaluate_pretrained`)."""
    tasks = list(chance)
    if kept is None or any(base.per_doc.get(t) is None or other.per_doc.get(t) is None for t in tasks):
        return None
    margin = sum(base.scores[t] for t in tasks) / len(tasks) - sum(chance.values()) / len(tasks)
    error = paired_stderr(paired_differences({t: other.per_doc[t] for t in tasks},  # type: ignore[misc]
                                             {t: base.per_doc[t] for t in tasks}, weight=kept))  # type: ignore[misc]
    return error / margin if error is not None and margin > 0 else None


def _mean_with_error(summary: ModelSummary) -> str:
    return f"{summary.mean_score:.4f}" + (f" ± {summary.mean_stderr:.4f}" if summary.mean_stderr is not None else "")


def _with_error(summary: ModelSummary, task: str) -> str:
    error = summary.stderr.get(task)
    return f"{summary.scores[task]:.4f}" + (f" ± {error:.4f}" if error is not None else "")


def lm_eval_location(spec: str, *, trust_remote_code: bool = False, allow_pickle: bool = False) -> tuple[str, bool, int]:
    """What to hand lm-eval as ``pretrained=`` for a model spec, whether it may run its remote code
    (:func:`~cornerstone.loading.remote_code_trusted`), and its weights' size on disk. GGUF models
    are evaluated from their dequantised safetensors cache. A hub id is looked up here (its config),
    so a misspelt or unreachable model fails before lm-eval starts, as it does in ``score``."""
    source, location = resolve(spec)
    if source in ("alias", "gguf"):
        folder: Path | None = dequantised_folder(Path(location))[0]
    elif source == "folder":
        folder = Path(location)
    else:
        folder = None
    if folder is None:
        _check_hub_model(str(location))
        return str(location), False, 0
    check_weights_format(folder, allow_pickle)
    size = sum(p.stat().st_size for pattern in ("*.safetensors", "*.bin") for p in folder.glob(pattern))
    return str(folder), remote_code_trusted(folder, trust_remote_code), size


def _check_hub_model(repo_id: str) -> None:
    from transformers.utils.hub import cached_file

    from .errors import ModelNotFoundError

    try:
        cached_file(repo_id, "config.json")
    except (OSError, ValueError) as exc:
        offline = " (offline)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise ModelNotFoundError(f"cannot load '{repo_id}' from the hub{offline}: {str(exc).splitlines()[0]}",
                                 hint="Give an alias (`cornerstone models`), a folder, a .gguf file or a hub id.") from None


def scored_documents(pruned: str | Path, report: str | Path | None = None
                     ) -> tuple[dict[str, harness.DocumentRecord], str] | None:
    """The documents the plan behind ``pruned`` was chosen on, and where that record came from.

    ``report`` (a score report) names them explicitly. Otherwise the plan that ``cornerstone
    export`` (and ``heal``) keep in the model folder says: its ``report.documents``, or, for a plan
    written before documents were recorded, the report it names. None when nothing records them.
    """
    from .errors import PlanError
    from .exported import PLAN_FILE
    from .planner import Plan
    from .scores import ScoreReport

    if report is not None:
        return ScoreReport.load(report).documents(), f"report {report}"
    plan_file = Path(pruned) / PLAN_FILE
    if not plan_file.is_file():
        return None
    plan = Plan.load(plan_file)
    recorded = plan.report.get("documents")
    if recorded:
        try:
            return ({name: harness.DocumentRecord.model_validate(entry) for name, entry in dict(recorded).items()},
                    f"the plan in {pruned}")
        except (ValueError, TypeError) as exc:
            raise PlanError(f"the plan '{plan_file}' has a malformed document record: {str(exc).splitlines()[0]}",
                            hint="Re-export the model from a fresh plan, or pass --report.") from None
    if plan.report.get("path") and Path(plan.report["path"]).is_file():
        return ScoreReport.load(plan.report["path"]).documents(), f"report {plan.report['path']}"
    return None


def tokens_per_second(models: Sequence[torch.nn.Module], *, batch: int = 4, length: int = 256,
                      repeats: int = 9) -> list[float]:
    """Forward-pass throughput (prefill, no cache) of each model on the same fixed token ids: ``batch x length``
    tokens over the median time of ``repeats`` forwards.

    The models take turns at every forward (:func:`~cornerstone.costs.take_turns`), so a slow spell of a
    shared machine lands on all of them alike. Only the last position's logits are computed, as a
    serving engine's prefill does: the logits of every position of a 262k-token vocabulary (Gemma 3) are a
    gigabyte per batch, whose writing dominated the time and swung the measured ratio of two models by
    +-15% between three runs on one idle CPU.
    """
    import statistics

    from .costs import last_logits_only, take_turns
    from .exported import probe_ids

    last = [last_logits_only(model) for model in models]
    ids = [probe_ids(text_config(model.config).vocab_size, batch=batch, length=length).to(model.device)
           for model in models]

    def step(index: int) -> float:
        started = time.perf_counter()
        models[index](ids[index], use_cache=False, **last[index])
        return time.perf_counter() - started

    with torch.no_grad():
        times = take_turns(len(models), repeats, step)
    return [batch * length / statistics.median(seconds) for seconds in times]


def _summaries(located: Sequence[tuple[str | LoadedModel, str, bool, int]], specs: Sequence[harness.TaskSpec], *,
               include_paths: Sequence[str | Path], batch_size: int, device: str, dtype: str
               ) -> tuple[list[ModelSummary], list[torch.nn.Module]]:
    """Evaluate and time each model of ``located``: (model, :func:`lm_eval_location`'s three answers). Each is
    loaded once, by lm-eval from its saved files (what a user's plain lm-eval run sees), and that same
    loaded model is timed."""
    found = []
    for model, pretrained, remote, size in located:
        lm = harness.load_lm(pretrained, batch_size=batch_size, device=device, dtype=dtype, trust_remote_code=remote)
        scores = harness.evaluate_pretrained(lm, specs, include_paths=include_paths)
        found.append((model, pretrained, remote, size, scores, lm))
    speeds = tokens_per_second([lm.model for *_, lm in found])
    return [ModelSummary(spec=given if isinstance(given, str) else given.spec, pretrained=pretrained, parameters=unique_parameters(lm.model), bytes_on_disk=size,
                         tokens_per_second=speed, scores={k: v["score"] for k, v in scores.items()},  # type: ignore[misc]
                         stderr={k: v["stderr"] for k, v in scores.items()},
                         per_doc={k: v["per_doc"] for k, v in scores.items()},  # type: ignore[misc]
                         mean_score=sum(v["score"] for v in scores.values()) / len(scores),  # type: ignore[misc]
                         mean_stderr=macro_stderr([v["stderr"] for v in scores.values()]))  # type: ignore[misc]
            for (given, pretrained, _, size, scores, lm), speed in zip(found, speeds)], [lm.model for *_, lm in found]


def evaluate_models(
    base: str | LoadedModel,
    pruned: str | LoadedModel,
    tasks: Sequence[str] | None = None,
    settings: EvalSettings | None = None,
    *,
    healed: str | LoadedModel | None = None,
    report: str | Path | None = None,
    device: str | None = None,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    **options: Any,
) -> Comparison:
    """Evaluate ``base`` and ``pruned`` (and ``healed``, a ``cornerstone heal`` output) on the same
    documents of ``tasks`` and put them side by side.

    ``settings`` (:class:`~cornerstone.settings.EvalSettings`) are those of ``cornerstone eval`` and a
    recipe's ``eval:``; ``tasks`` (names) and ``options`` set its fields by name (``include_paths``,
    ``limit`` and ``seed`` are those of ``settings.tasks``). Each model is a spec (alias, folder, .gguf
    or hub id) or an already loaded model (:func:`~cornerstone.loading.load_model`), which names its
    files: lm-eval loads each model once from its saved files, as a user's plain lm-eval run would,
    and that loaded model is the one timed.

    ``retention_t = score_pruned(t) / score_base(t)``; ``mean_retention`` is the ratio of the mean
    scores. ``above_chance_kept_t = (pruned - chance) / (base - chance)`` is the share of the base
    model's above-chance score that is left (None where the base is not above chance by 2 s.e.): a task a small
    model answers near chance can show high retention while the pruned model knows nothing. Its standard error
    (``above_chance_kept_stderr``, and of the mean) pairs the two models document by document
    (:func:`above_chance_kept_stderr`). ``speedup`` is the ratio of forward tokens/s (batch 4 x 256 tokens, prefill), the two
    models taking turns in this run (:func:`tokens_per_second`).

    Documents: a plan is judged on documents it was not chosen on. Where the scored documents are
    recorded (``report``, or the plan in ``pruned``: :func:`scored_documents`), every task they cover
    is evaluated on the rest of its split (all of it, or a ``limit`` draw with ``seed``); a task all
    of whose documents were scored is refused. ``allow_overlap`` evaluates on the whole split instead,
    and the comparison says so.
    """
    from .loading import resolve_device
    from .provenance import machine, package_versions
    from .options import with_options

    nested = {"include_paths": "tasks", "limit": "tasks", "seed": "tasks", "names": "tasks"}
    settings = with_options(settings, EvalSettings, {**options, **({"names": list(tasks)} if tasks is not None else {})},
                            nested, function="evaluate")
    selection = settings.tasks
    device = resolve_device(device)
    # every model resolved before lm-eval, which would try the network for a misspelt one
    located = [(model, *lm_eval_location(model.spec if isinstance(model, LoadedModel) else model,
                                         trust_remote_code=trust_remote_code, allow_pickle=allow_pickle))
               for model in [base, pruned, *([healed] if healed else [])]]
    found = scored_documents(pruned.location if isinstance(pruned, LoadedModel) else pruned, report)
    scored, source = found if found is not None else ({}, None)
    specs = selection.load(exclude=None if settings.allow_overlap else {name: r.doc_indices for name, r in scored.items()})
    documents = _document_summary(specs, scored, source, settings.allow_overlap)
    summaries, models = _summaries(located, specs, include_paths=selection.include_paths, batch_size=settings.batch_size,
                           device=device, dtype=dtype)
    base_summary, pruned_summary = summaries[:2]
    chance = {spec.name: spec.chance for spec in specs}
    pruned_retention = Retention.of(base_summary, pruned_summary, chance)
    return Comparison(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        tasks=[{**spec.describe(), "doc_indices": spec.doc_indices, "content_sha256": spec.content_hash}
               for spec in specs],
        documents=documents,
        settings={"tasks": list(selection.names), "include_paths": list(selection.include_paths), "limit": selection.limit,
                  "seed": selection.seed, "batch_size": settings.batch_size, "device": device, "dtype": dtype,
                  "throughput": "batch 4 x 256 tokens, last logits", "torch_threads": torch.get_num_threads(), "machine": machine()},
        base=base_summary,
        pruned=pruned_summary,
        **pruned_retention.model_dump(),
        speedup=pruned_summary.tokens_per_second / base_summary.tokens_per_second,
        versions=package_versions(),
        healed=summaries[2] if healed else None,
        healed_retention=Retention.of(base_summary, summaries[2], chance) if healed else None,
        costs=_cost_targets(pruned.location if isinstance(pruned, LoadedModel) else pruned, models[0], models[1]),
    )


def _cost_targets(pruned: str | Path, base_model: torch.nn.Module, pruned_model: torch.nn.Module
                  ) -> list[dict[str, Any]] | None:
    """The targets of a plan made to costs (``fit``), each checked on the two models as lm-eval loaded them,
    measured side by side at the profile's first shapes; None for any other plan."""
    from .costs import ProfileSettings, measure_side_by_side, parse_target
    from .exported import PLAN_FILE
    from .planner import Plan

    plan_file = Path(pruned) / PLAN_FILE
    if not plan_file.is_file():
        return None
    plan = Plan.load(plan_file)
    if not plan.fit or not plan.planner.targets:
        return None
    shapes = plan.fit.get("shapes") or {}
    settings = ProfileSettings(prefill_lengths=shapes.get("prefill_lengths") or [256],
                               decode_shapes=shapes.get("decode_shapes") or ["512x1"])
    base, slim = measure_side_by_side([base_model, pruned_model], settings)
    return [parse_target(text).check(base, slim) for text in plan.planner.targets]


def _document_summary(specs: Sequence[harness.TaskSpec], scored: dict[str, harness.DocumentRecord], source: str | None,
                      allow_overlap: bool) -> dict[str, Any]:
    """Which documents were evaluated and how many of them the plan was scored on (0 unless allowed)."""
    for spec in specs:
        if spec.name in scored and scored[spec.name].total_docs != spec.total_docs:
            raise TaskError(f"task '{spec.name}' has {spec.total_docs} documents, the scoring record {scored[spec.name].total_docs}",
                            hint="The task's data changed since scoring, so its documents cannot be told apart; re-score.")
    overlap = {spec.name: len(set(spec.doc_indices) & set(scored[spec.name].doc_indices))
               for spec in specs if spec.name in scored}
    per_task = "; ".join(f"{spec.name}: {harness.selection_text(spec)}" for spec in specs)
    if source is None:
        summary = f"no record of the scored documents was found, so overlap was not checked. {per_task}."
    elif allow_overlap:
        summary = (f"overlap allowed: {sum(overlap.values())} of the evaluated documents were also scored "
                   f"({source}). {per_task}.")
    else:
        summary = f"disjoint from the documents the plan was scored on ({source}). {per_task}."
    return {"scored_source": source, "overlap_allowed": allow_overlap, "overlap": overlap, "summary": summary}


def save(comparison: Comparison, path: str | Path) -> tuple[Path, Path]:
    """Write the comparison as JSON and, beside it, Markdown; return both paths."""
    return write_with_markdown(comparison, path)


def default_eval_path(pruned: str, folder: str | Path = OUTPUT_FOLDER) -> Path:
    return Path(folder) / f"eval-{Path(pruned.rstrip('/')).name}.json"
