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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .files import parse_yaml
from .heal import Healing
from .planner import Planner
from .report import OUTPUT_FOLDER
from .settings import EvalSettings, ExportSettings, ScoreSettings, TaskSelection

__all__ = ["EvalStep", "ExportStep", "HealStep", "Recipe", "RunResult", "ScoreStep", "TaskSelection", "load_recipe",
           "run_recipe"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScoreStep(ScoreSettings):
    """``score:``: the score step's settings (:class:`~cornerstone.settings.ScoreSettings`), whose tasks are
    the recipe's ``tasks:``; ``report`` reuses a saved report instead of scoring again."""

    report: str | None = None


# The export and eval sections are those steps' settings as they stand.
ExportStep = ExportSettings
EvalStep = EvalSettings


class HealStep(Healing):
    """``heal:`` in a recipe: the healing settings (:class:`~cornerstone.heal.Healing`) and where the healed
    model goes. Training on a task the recipe evaluates on is refused."""

    out: str
    overwrite: bool = False


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
                         "committed results were written with `--reports reports/<question>/`).")

    @model_validator(mode="after")
    def _scored_tasks(self) -> "Recipe":
        """The scored tasks are the recipe's ``tasks:`` (or ``score.tasks:``, which must then agree): the
        score section is the whole of the score step's settings, as the CLI and the API take them."""
        if "tasks" in self.score.model_fields_set:
            if "tasks" in self.model_fields_set and self.tasks != self.score.tasks:
                raise ValueError("tasks: and score.tasks: name different tasks; give the scored tasks once")
            self.tasks = self.score.tasks
        else:
            self.score = ScoreStep.model_validate({**self.score.model_dump(exclude_unset=True),
                                                   "tasks": self.tasks.model_dump(exclude_unset=True)})
        return self

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
    except ConfigError as exc:  # a check across a section's fields (ScoreSettings), in the CLI's words
        raise ConfigError(f"recipe '{path}': {exc.message}", hint=exc.hint) from None


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
    from . import report as report_module
    from .evaluate import evaluate_models, save
    from .export import export
    from .loading import load_model
    from .planner import make_plan
    from .scores import ScoreReport, score

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
        report = score(loaded, settings=step, progress=progress, log=log)
        report_path, _ = report_module.save(report, reports / f"{recipe.name}-scores.json")
        log(f"score: {report.evaluations} evaluations, cornerstones {', '.join(report.cornerstones) or 'none'} -> {report_path}")
    plan = make_plan(report, recipe.plan, loaded=loaded, store=step.store_folder(), progress=progress)
    plan.report["path"] = str(report_path)
    plan_path = plan.save(reports / f"{recipe.name}-plan.yaml")
    log(f"plan: drop {', '.join(plan.player_names)} ({plan.parameters.removed_fraction:.1%} of parameters) -> {plan_path}")
    for note in plan.notes:
        log(f"plan: note: {note}")
    exported = export(loaded, plan, settings=recipe.export, recipe=recipe.model_dump(mode="json"))
    log(f"export: {exported.format} checkpoint, {exported.parameters:,} parameters, max logit difference "
        f"{exported.max_abs_logit_diff} -> {exported.path}")
    result = RunResult(report=str(report_path), plan=str(plan_path), export=exported.model_dump())
    if recipe.heal is not None:
        del loaded  # healing loads the pruned model (and a teacher) from disk: do not hold the base too
        from .heal import heal

        healed = heal(exported.path, recipe.heal.out, recipe.heal, include_paths=recipe.tasks.include_paths,
                      evaluation_tasks=recipe.eval.tasks.names if recipe.eval else (), overwrite=recipe.heal.overwrite,
                      device=recipe.device, progress=progress)
        log(f"heal: {healed.steps} steps, loss {healed.first_loss:.3f} -> {healed.last_loss:.3f} -> {healed.path}")
        result.heal = healed.model_dump(exclude={"history"})
    if recipe.eval is not None:
        # lm-eval reads every model from disk; the base model still loaded is timed as it is, not loaded again
        comparison = evaluate_models(recipe.model if recipe.heal else loaded, exported.path, settings=recipe.eval,
                             device=recipe.device, dtype=recipe.dtype, trust_remote_code=recipe.trust_remote_code,
                             allow_pickle=recipe.allow_pickle, healed=recipe.heal.out if recipe.heal else None)
        files = save(comparison, reports / f"{recipe.name}-eval.json")
        healed_text = (f", healed {comparison.healed_retention.mean_retention:.1%}"
                       if comparison.healed_retention is not None else "")
        log(f"eval: mean retention {comparison.mean_retention:.1%}{healed_text}, speed-up {comparison.speedup:.2f}x -> {files[0]}")
        result.evaluation = comparison.model_dump()
        result.evaluation_files = [str(f) for f in files]
    return result
