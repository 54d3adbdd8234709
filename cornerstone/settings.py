"""The settings of every step, one pydantic model per step, shared by the CLI, recipes and the Python API.

=======  ==================  ============================================  ============================
step     settings            Python API                                    CLI / recipe section
=======  ==================  ============================================  ============================
score    :class:`ScoreSettings`  :func:`cornerstone.score`                  ``cornerstone score`` / ``score:`` + ``tasks:``
plan     :class:`~cornerstone.planner.Planner`  :func:`cornerstone.plan`    ``cornerstone plan`` / ``plan:``
export   :class:`ExportSettings`  :func:`cornerstone.export`               ``cornerstone export`` / ``export:``
eval     :class:`EvalSettings`  :func:`cornerstone.evaluate`               ``cornerstone eval`` / ``eval:``
heal     :class:`~cornerstone.heal.Healing`  :func:`cornerstone.heal`       ``cornerstone heal`` / ``heal:``
=======  ==================  ============================================  ============================

Each model holds the step's one set of defaults; the CLI's options are built into it (and default to
its fields), a recipe's section *is* it (plus where the output goes), and the API functions take it
(or its fields as keyword arguments). Every model forbids unknown keys. The plan and heal models live
with their steps because plans and healed folders record them.

Seeds: each step has one seed, and every random stream of the step is derived from it.

- score, ``tasks.seed``: the document draw (:func:`cornerstone.harness.load_tasks` with ``limit``), the
  calibration draw of the one-pass proxies (``calibration.seed``, unless a recipe or caller sets it),
  the Shapley estimators' sampling RNG (``numpy.random.default_rng(seed)``) and the documents that
  ``until_resolved`` adds (:func:`cornerstone.sequential.score_until_resolved`).
- eval, ``tasks.seed``: the document draw among the documents the plan was not chosen on.
- heal, ``seed``: the LoRA initialisation, the batch order and the draw of ``samples`` training texts.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .calibration import Calibration
from .errors import ConfigError
from .repair import LinearRepair
from .rule import CornerstoneRule

if TYPE_CHECKING:
    from . import harness
    from .sequential import Sequential

__all__ = ["CalibrationText", "EvalSettings", "EvalTasks", "ExportSettings", "ScoreSettings", "TaskSelection"]

AVSS_OPTIONS = ("threshold", "relative", "epsilon", "prune_share")


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskSelection(_Settings):
    """lm-eval task names, groups or tags, and which of their documents to use: ``limit`` per task (a
    random draw with ``seed``), or every document with ``limit: null``."""

    names: list[str] = Field(default_factory=lambda: ["cornerstone_bundled"])
    include_paths: list[str] = Field(default_factory=list, description="Extra folders of lm-eval task YAMLs.")
    # 25 documents x 4 bundled tasks x 61 evaluations: the README's main job takes ~3 minutes on 2 CPU cores
    limit: int | None = Field(25, ge=1, description="Documents per task (seeded random); null for all.")
    seed: int = 0
    objective: Literal["accuracy", "probability", "divergence"] = Field(
        "accuracy", description="Each document's value: lm-eval's accuracy (0 or 1), the probability the model gives "
        "the gold answer (continuous, same chance level; see harness.gold_probability), or exp(-KL) of the model's "
        "choice distribution from the full model's (continuous, 1 for the full model, no gold label needed; see "
        "harness.divergence_value; on a text task, of every next-token distribution, harness.token_divergence_result).")

    @field_validator("include_paths", mode="before")
    @classmethod
    def _paths_as_text(cls, paths: Any) -> Any:
        return [str(path) if isinstance(path, Path) else path for path in paths] if isinstance(paths, (list, tuple)) else paths

    def load(self, **selection: Any) -> list[harness.TaskSpec]:
        """The tasks with their documents drawn (:func:`cornerstone.harness.load_tasks`); ``selection``
        passes ``exclude`` or ``documents`` on."""
        from . import harness

        return harness.load_tasks(self.names, include_paths=self.include_paths, limit=self.limit, seed=self.seed,
                                  objective=self.objective, **selection)


class EvalTasks(TaskSelection):
    """The evaluation's tasks: every document not scored by default (``limit: null``)."""

    limit: int | None = Field(None, ge=1, description="Documents per task (seeded random, from those not scored); "
                              "null for all.")
    # a pruned model is judged by what users read off lm-eval: its accuracy
    objective: Literal["accuracy"] = Field("accuracy", description="Evaluation reports lm-eval's accuracy.")


class CalibrationText(Calibration):
    """:class:`~cornerstone.calibration.Calibration` whose ``seed`` defaults to the score step's seed."""

    seed: int | None = Field(None, description="Seed of the draw of ``samples`` texts; null: the step's tasks.seed.")


class ScoreSettings(_Settings):
    """How to score: the method and its options, the tasks and documents, the cornerstone rule and the value store.

    ``granularity`` null means the method's own: sublayer for ablation, Shapley and cosine, block for
    bi, angular and avss. ``budget`` and ``target_stderr`` bound the sampling Shapley estimators
    (kernel, permutation), ``window`` the proximity one. ``store`` keeps every v(S) on disk so a
    killed run resumes: true is ``$CORNERSTONE_VALUES`` (default ``~/.cache/cornerstone/values``),
    a path is that folder, false keeps nothing. ``until_resolved`` (ablation only) doubles the
    documents per task, from ``tasks.limit`` up to that many, while a decision is within its
    interval; ``boundary`` adds the side of a plan's drop boundary to those decisions.
    """

    method: str = Field("ablation", description="ablation, shapley, or a one-pass proxy: avss, bi, angular, cosine.")
    estimator: str = Field("kernel", description="Shapley estimator: kernel, permutation, proximity or exact.")
    granularity: str | None = Field(None, description="block or sublayer; null: the method's own.")
    budget: int = Field(600, ge=4, description="Shapley sampling: most evaluations to spend.")
    target_stderr: float | None = Field(None, gt=0, description="Shapley sampling: stop once every standard error is below this.")
    window: int = Field(3, ge=1, description="Proximity estimator: longest run of consecutive players removed.")
    players: list[str] | None = Field(None, description="Score only these players (the rest stay present).")
    tasks: TaskSelection = Field(default_factory=TaskSelection)
    calibration: CalibrationText = Field(default_factory=CalibrationText, description="Proxies: the text of the one pass.")
    avss: dict[str, Any] = Field(default_factory=dict, description="AVSS options: threshold, relative, epsilon, prune_share.")
    batch_size: int = Field(32, ge=1, description="Sequences per forward pass.")
    engine: str = Field("fast", description="fast (reuses work across masks) or lm-eval (its own loop per mask).")
    margin: float = Field(0.2, ge=0.0, le=1.0, description="Cornerstone rule: removal leaves at most this share of "
                          "the above-chance score.")
    outlier: float = Field(3.0, gt=1.0, description="Proxies' cornerstone rule: importance at least this many times "
                           "the median of its kind.")
    store: bool | str = Field(True, description="Value store: true (the default folder), a folder, or false.")
    until_resolved: int | None = Field(None, ge=2, description="Ablation: most documents per task to grow to.")
    boundary: int | None = Field(None, ge=1, description="With until_resolved: players a plan will drop.")
    force: bool = Field(False, description="Run even when the estimate says the memory will not suffice.")

    # The checks below raise ConfigError, which pydantic passes through: the CLI prints it as it stands
    # (the message it always printed), recipes prefix their file name, API callers catch it.
    @field_validator("granularity")
    @classmethod
    def _check_granularity(cls, granularity: str | None) -> str | None:
        if granularity not in (None, "sublayer", "block"):
            raise ConfigError(f"unknown granularity '{granularity}'", hint="Use sublayer or block.")
        return granularity

    @field_validator("engine")
    @classmethod
    def _check_engine(cls, engine: str) -> str:
        if engine not in ("fast", "lm-eval"):
            raise ConfigError(f"unknown engine '{engine}'", hint="Use fast or lm-eval.")
        return engine

    @field_validator("avss")
    @classmethod
    def _check_avss(cls, options: dict[str, Any]) -> dict[str, Any]:
        """Only the AVSS options' names: their values are checked when the method is avss (``make_estimator``)."""
        unknown = sorted(set(options) - set(AVSS_OPTIONS))
        if unknown:
            raise ValueError(f"unknown AVSS option {', '.join(unknown)}; allowed: {', '.join(AVSS_OPTIONS)}")
        return options

    @field_validator("store", mode="before")
    @classmethod
    def _store_as_text(cls, store: Any) -> Any:
        """The API's ``store=None`` (no store) and ``store=Path(...)`` as the field holds them."""
        return False if store is None else str(store) if isinstance(store, Path) else store

    @model_validator(mode="after")
    def _consistent(self) -> ScoreSettings:
        self.make_estimator()  # an unknown method or estimator, or a granularity the method lacks
        if self.until_resolved is not None:
            if self.tasks.limit is None or self.method != "ablation":
                raise ConfigError("--until-resolved adds documents to a --limit draw for --method ablation",
                                  hint="Drop --all-docs, or score with --method ablation.")
        elif self.boundary is not None:
            raise ConfigError("--boundary only applies with --until-resolved",
                              hint="Add --until-resolved MAX_DOCS, or drop --boundary.")
        return self

    @property
    def seed(self) -> int:
        """The step's one seed (see the module docstring for the streams derived from it)."""
        return self.tasks.seed

    def make_estimator(self) -> Any:
        """The estimator these settings name, seeded with :attr:`seed`."""
        from .estimators import make_estimator

        calibration = Calibration(**{**self.calibration.model_dump(), "seed": self.calibration.seed
                                     if self.calibration.seed is not None else self.seed})
        return make_estimator(self.method, self.estimator, granularity=self.granularity, budget=self.budget,
                              target_stderr=self.target_stderr, window=self.window, seed=self.seed,
                              proxy_options=dict(calibration=calibration, **self.avss))

    def rule(self) -> CornerstoneRule:
        return CornerstoneRule(margin=self.margin, outlier=self.outlier)

    def store_folder(self) -> Path | None:
        from .store import default_store_root

        if self.store is False:
            return None
        return default_store_root() if self.store is True else Path(self.store)

    def sequential(self) -> Sequential | None:
        """The document-growing schedule of ``until_resolved``, or None."""
        from .sequential import Sequential

        if self.until_resolved is None:
            return None
        return Sequential(start=self.tasks.limit, max_docs=self.until_resolved, boundary=self.boundary, seed=self.seed)


class ExportSettings(_Settings):
    """Where and how to write the slim checkpoint."""

    out: str = Field(..., description="Folder to write (must not exist unless overwrite).")
    overwrite: bool = Field(False, description="Replace an earlier export at out (only a folder cornerstone wrote).")
    max_shard_size: str = Field("2GB", description="Largest safetensors shard.")
    verify: bool = Field(True, description="Reload the export and compare its logits with the masked original.")
    allow_other_model: bool = Field(False, description="Apply a plan made for another model.")
    format: Literal["safetensors", "gguf"] = Field("safetensors", description="safetensors (a stock, DeciLM or pruned Gemma 3 folder), or "
                                                  "gguf: prune a .gguf model's file directly into FILE.gguf (block plans).")
    portable: bool = Field(False, description="gguf: refuse a plan that only runtimes reading an explicit per-layer "
                           "pattern key would run as planned (Gemma 3 sliding/global layers).")
    stream: bool = Field(False, description="Export a block plan from a local safetensors folder tensor by tensor, never "
                         "building the model (memory: about two copies of the largest tensor; for models larger than "
                         "memory). Checked in full where both models fit, else layer by layer.")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="stream: the weights' dtype in the export (default: the source's, so a bf16 model stays "
        "bf16). The in-memory export writes the dtype the model was loaded in.")
    repair: LinearRepair | None = Field(None, description="Fit a linear map for each removed span of blocks on "
                                        "calibration text and fold it into the block before it (ReplaceMe); the export "
                                        "is then checked against the repaired, masked model. Block plans, safetensors.")

    @field_validator("out", mode="before")
    @classmethod
    def _out_as_text(cls, out: Any) -> Any:
        return str(out) if isinstance(out, Path) else out

    @model_validator(mode="after")
    def _repair_writes_safetensors(self) -> "ExportSettings":
        # a GGUF export copies the source's quantised bytes: a fitted map has nowhere to go without requantising
        if self.repair is not None and self.format == "gguf":
            raise ConfigError("--repair changes weights, and a GGUF export copies the source's quantised tensors as they are",
                              hint="Export safetensors with --repair, or GGUF without it.")
        return self

    @model_validator(mode="after")
    def _stream_copies_tensors(self) -> "ExportSettings":
        # streaming renames and copies the source's tensors: nothing is computed that a repair or a GGUF file needs
        if self.stream and (self.repair is not None or self.format == "gguf"):
            other = "--repair" if self.repair is not None else "--format gguf"
            raise ConfigError(f"--stream copies a safetensors folder's tensors as they are, and {other} cannot be streamed",
                              hint=f"Leave out --stream (the model is then built in memory), or {other}.")
        if self.dtype is not None and not self.stream:
            raise ConfigError("dtype is the streamed export's weight dtype; an in-memory export writes the loaded model's",
                              hint="Load the model in the dtype you want (cornerstone export --dtype), or add --stream.")
        return self


class EvalSettings(_Settings):
    """``eval``: judged on documents the plan was not chosen on, unless ``allow_overlap``."""

    tasks: EvalTasks = Field(default_factory=EvalTasks)
    batch_size: int = Field(16, ge=1, description="lm-eval batch size.")
    allow_overlap: bool = Field(False, description="Evaluate on the scored documents too.")
