"""Recipes: one YAML file that runs the whole pipeline, score -> plan -> export -> (heal ->) eval.

:func:`run_recipe` is the Python API behind ``cornerstone run``. Recipes are validated strictly: a
misspelt or unknown key is an error that names it (every section forbids extra keys). The exact
recipe is saved next to the exported weights, with the plan, so a checkpoint says how it was made.
Paths in a recipe (``out``, ``report``, ``include_paths``) are relative to the directory you run from.

.. code-block:: yaml

    name: smollm2-135m-drop8
    model: smollm2-135m
    tasks: {names: [cornerstone_bundled], limit: 25, seed: 0}
    score: {method: ablation, granularity: block}
    plan: {policy: lowest, granularity: block, drop: 8}
    export: {out: exports/smollm2-135m-drop8}
    heal: {data: cs_capitals, out: exports/smollm2-135m-drop8-healed, steps: 100}   # optional
    eval: {tasks: {names: [cornerstone_real], limit: 200}}
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .calibration import Calibration
from .heal import Healing
from .errors import ConfigError
from .files import parse_yaml
from .planner import Planner
from .report import OUTPUT_FOLDER


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskSelection(_Section):
    """lm-eval task names, groups or tags, and which documents to use."""

    names: list[str] = Field(default_factory=lambda: ["cornerstone_bundled"])
    include_paths: list[str] = Field(default_factory=list)
    limit: int | None = Field(25, ge=1, description="Documents per task (seeded random); null for all.")
    seed: int = 0


class ScoreStep(_Section):
    """How to score; ``report`` reuses a saved report instead of scoring again."""

    method: Literal["ablation", "shapley", "avss", "bi", "angular", "cosine"] = "ablation"
    estimator: Literal["kernel", "permutation", "proximity", "exact"] = "kernel"
    granularity: Literal["block", "sublayer"] | None = Field(
        None, description="Default: block, or sublayer for cosine (the only granularity it scores).")
    calibration: Calibration = Field(default_factory=Calibration, description="Proxies: the text of the one pass.")
    avss: dict[str, Any] = Field(default_factory=dict, description="AVSS options: threshold, relative, epsilon, prune_share.")

    @field_validator("avss")
    @classmethod
    def _check_avss(cls, options: dict[str, Any]) -> dict[str, Any]:
        from .proxies import AVSS

        unknown = sorted(set(options) - {"threshold", "relative", "epsilon", "prune_share"})
        if unknown:
            raise ValueError(f"unknown AVSS option {', '.join(unknown)}; allowed: threshold, relative, epsilon, prune_share")
        AVSS(**options)
        return options
    budget: int = Field(600, ge=4)
    target_stderr: float | None = None
    window: int = Field(3, ge=1)
    engine: Literal["fast", "lm-eval"] = "fast"
    batch_size: int = Field(32, ge=1)
    margin: float = Field(0.2, ge=0.0, le=1.0)
    store: bool = True
    report: str | None = None


class ExportStep(_Section):
    out: str
    overwrite: bool = False
    max_shard_size: str = "2GB"
    verify: bool = True


class HealStep(Healing):
    """``heal:`` in a recipe: the healing settings (:class:`~cornerstone.heal.Healing`) and where the healed
    model goes. Training on a task the recipe evaluates on is refused."""

    out: str
    overwrite: bool = False


class EvalStep(_Section):
    """``eval:``: judged on documents the plan was not chosen on, unless ``allow_overlap``."""

    tasks: TaskSelection = Field(default_factory=TaskSelection)
    batch_size: int = Field(16, ge=1)
    allow_overlap: bool = False


class Recipe(_Section):
    """The whole pipeline in one document; every section forbids unknown keys."""

    name: str
    description: str = ""
    model: str = "smollm2-135m"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str | None = None
    revision: str | None = None
    trust_remote_code: bool = Field(False, description="Let the model folder run its own modeling code.")
    allow_pickle: bool = Field(False, description="Load pickled .bin weights.")
    tasks: TaskSelection = Field(default_factory=TaskSelection)
    score: ScoreStep = Field(default_factory=ScoreStep)
    plan: Planner
    export: ExportStep
    heal: HealStep | None = None
    eval: EvalStep | None = None
    reports: str = Field(OUTPUT_FOLDER, description="Folder for the score report, plan and evaluation (the "
                         "committed recipes name reports/, where their results are kept).")

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        """The name becomes file names in ``reports`` (``NAME-scores.json``, ...): it must be one plain file
        name, so a recipe cannot write outside that folder or make a name the file system refuses at the end of a run."""
        if (not name.strip() or name in (".", "..") or any(sep in name for sep in ("/", "\\"))
                or any(ord(char) < 32 or ord(char) == 127 for char in name)):
            raise ValueError(f"must be a plain file name (no '/', '\\', control characters, '.' or '..', not empty), "
                             f"got {name!r}")
        try:
            size = len(name.encode("utf-8"))
        except UnicodeEncodeError:  # a lone surrogate (YAML's "\\ud800"): no file system takes it
            raise ValueError(f"must be UTF-8 text, got {name!r}") from None
        if size > 200:
            raise ValueError(f"must be at most 200 bytes (it starts file names), got {size}")
        return name


def _describe(error: dict[str, Any], model: type[BaseModel]) -> tuple[str, str]:
    where = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        section: Any = model
        for part in error["loc"][:-1]:
            field = section.model_fields.get(str(part)) if isinstance(part, str) else None
            annotation = getattr(field, "annotation", None)
            candidates = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type) and issubclass(a, BaseModel)]
            section = candidates[0] if candidates else section
        return f"unknown key '{where}'", "Allowed there: " + ", ".join(section.model_fields) + "."
    return f"'{where}': {error['msg'].removeprefix('Value error, ')}", "See the example recipes in recipes/."


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe; an unknown or invalid key is a :class:`ConfigError` that names it."""
    path = Path(path)
    try:
        data = parse_yaml(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"recipe '{path}' does not exist", hint="See the example recipes in recipes/.") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"recipe '{path}' is not valid YAML: {exc}", hint="See the example recipes in recipes/.") from None
    except OSError as exc:
        raise ConfigError(f"cannot read recipe '{path}': {exc.strerror or exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe '{path}' is not a mapping of sections", hint="See the example recipes in recipes/.")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        message, hint = _describe(exc.errors()[0], Recipe)
        raise ConfigError(f"recipe '{path}': {message}", hint=hint) from None


class RunResult(BaseModel):
    """Where a recipe run put its results."""

    report: str
    plan: str
    export: dict[str, Any]
    heal: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None
    evaluation_files: list[str] = []


def run_recipe(recipe: Recipe, *, log: Callable[[str], None] = print,
               progress: Callable[[int, int, str], None] | None = None) -> RunResult:
    """Run every step of ``recipe`` in order; the model is loaded once and shared by scoring, planning and export."""
    from . import evaluate as evaluate_module
    from . import report as report_module
    from .estimators import make_estimator
    from .export import export
    from .harness import load_tasks
    from .loading import load_model
    from .planner import make_plan
    from .scores import CornerstoneRule, ScoreReport, score
    from .store import default_store_root

    reports = Path(recipe.reports)
    loaded = load_model(recipe.model, dtype=recipe.dtype, device=recipe.device, revision=recipe.revision,
                        trust_remote_code=recipe.trust_remote_code, allow_pickle=recipe.allow_pickle)
    log(f"loaded {recipe.model} in {loaded.load_seconds:.1f} s")
    step = recipe.score
    if step.report is not None:
        report = ScoreReport.load(step.report)
        report_path = Path(step.report)
        log(f"score: reusing {report_path}")
    else:
        estimator = make_estimator(step.method, step.estimator, budget=step.budget, target_stderr=step.target_stderr,
                                   granularity=step.granularity or ("sublayer" if step.method == "cosine" else "block"),
                                   window=step.window, seed=recipe.tasks.seed,
                                   proxy_options=dict(calibration=step.calibration, **step.avss))
        specs = load_tasks(recipe.tasks.names, include_paths=recipe.tasks.include_paths,
                           limit=recipe.tasks.limit, seed=recipe.tasks.seed)
        report = score(loaded, specs, estimator=estimator, include_paths=recipe.tasks.include_paths,
                       limit=recipe.tasks.limit, seed=recipe.tasks.seed, batch_size=step.batch_size, engine=step.engine,
                       store=default_store_root() if step.store else None, rule=CornerstoneRule(margin=step.margin),
                       progress=progress)
        report_path, _ = report_module.save(report, reports / f"{recipe.name}-scores.json")
        log(f"score: {report.evaluations} evaluations, cornerstones {', '.join(report.cornerstones) or 'none'} -> {report_path}")
    plan = make_plan(report, recipe.plan, loaded=loaded, store=default_store_root() if step.store else None,
                     progress=progress)
    plan.report["path"] = str(report_path)
    plan_path = plan.save(reports / f"{recipe.name}-plan.yaml")
    log(f"plan: drop {', '.join(plan.player_names)} ({plan.parameters.removed_fraction:.1%} of parameters) -> {plan_path}")
    exported = export(loaded, plan, recipe.export.out, recipe=recipe.model_dump(mode="json"),
                      overwrite=recipe.export.overwrite, max_shard_size=recipe.export.max_shard_size,
                      verify=recipe.export.verify)
    log(f"export: {exported.format} checkpoint, {exported.parameters:,} parameters, max logit difference "
        f"{exported.max_abs_logit_diff} -> {exported.path}")
    result = RunResult(report=str(report_path), plan=str(plan_path), export=exported.model_dump())
    del loaded  # healing and evaluation load the models from disk, as users of the checkpoints will
    if recipe.heal is not None:
        from .heal import heal

        healing = Healing(**recipe.heal.model_dump(exclude={"out", "overwrite"}))
        healed = heal(exported.path, recipe.heal.out, healing, include_paths=recipe.tasks.include_paths,
                      evaluation_tasks=recipe.eval.tasks.names if recipe.eval else (), overwrite=recipe.heal.overwrite,
                      device=recipe.device, progress=progress)
        log(f"heal: {healed.steps} steps, loss {healed.first_loss:.3f} -> {healed.last_loss:.3f} -> {healed.path}")
        result.heal = healed.model_dump(exclude={"history"})
    if recipe.eval is not None:
        tasks = recipe.eval.tasks
        comparison = evaluate_module.compare(recipe.model, exported.path, tasks.names, include_paths=tasks.include_paths,
                                             limit=tasks.limit, seed=tasks.seed, batch_size=recipe.eval.batch_size,
                                             device=recipe.device, dtype=recipe.dtype,
                                             trust_remote_code=recipe.trust_remote_code, allow_pickle=recipe.allow_pickle,
                                             healed=recipe.heal.out if recipe.heal else None,
                                             allow_overlap=recipe.eval.allow_overlap)
        files = evaluate_module.save(comparison, reports / f"{recipe.name}-eval.json")
        healed_text = (f", healed {comparison.healed_retention.mean_retention:.1%}"
                       if comparison.healed_retention is not None else "")
        log(f"eval: mean retention {comparison.mean_retention:.1%}{healed_text}, speed-up {comparison.speedup:.2f}x -> {files[0]}")
        result.evaluation = comparison.model_dump()
        result.evaluation_files = [str(f) for f in files]
    return result
