"""What an exported folder holds and how it is checked: the files cornerstone writes beside the weights,
the result of an export, the model card, and the reload-and-compare check.

Shared by the in-memory export (:mod:`cornerstone.export`), the streamed one (:mod:`cornerstone.streaming`)
and the steps that read an export (``eval``, ``heal``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel

from .loading import LoadedModel
from .masking import without
from .planner import Plan
from .players import text_config
from .repair import RepairResult
from .serving import RuntimeSupport

EXPORT_MANIFEST = "cornerstone-export.json"
PLAN_FILE = "cornerstone-plan.yaml"
RECIPE_FILE = "cornerstone-recipe.yaml"
# Config lists that can have one entry per layer by coincidence.
NOT_PER_LAYER = ("architectures",)


class ExportResult(BaseModel):
    """What :func:`cornerstone.export.export` wrote and what it checked."""

    path: str
    format: Literal["stock", "decilm", "gemma3-pruned"]
    parameters: int
    planned_parameters: int
    bytes_on_disk: int
    files: list[str]
    max_abs_logit_diff: float | None
    seconds: float
    notes: list[str] = []
    repair: RepairResult | None = None
    runtimes: list[RuntimeSupport] = []


def probe_ids(vocab_size: int, batch: int = 2, length: int = 48, seed: int = 0) -> torch.Tensor:
    """Fixed pseudo-random token ids for comparing two models' logits."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (batch, length), generator=generator)


def max_logit_difference(original: torch.nn.Module, players: list[Any], pruned: torch.nn.Module) -> float:
    """max |logits(original with ``players`` removed) - logits(pruned)| on :func:`probe_ids`."""
    ids = probe_ids(text_config(original.config).vocab_size).to(original.device)
    with torch.no_grad(), without(original, players):
        expected = original(ids).logits.float()
    with torch.no_grad():
        actual = pruned.to(original.device)(ids).logits.float()
    return float((expected - actual).abs().max())


def tolerance(dtype: torch.dtype) -> float:
    """The largest logit difference an export may show against the masked original: float32 is exact up to
    summation order; half precision rounds every weight and activation."""
    return 1e-5 if dtype == torch.float32 else 5e-2


def load_exported(folder: str | Path, dtype: torch.dtype | None = None) -> Any:
    """Load an exported folder the way a user would: stock transformers, and remote code only when the
    config maps to cornerstone's own modeling files, unchanged (its sublayer layouts). Weights and config
    must agree (:func:`~cornerstone.loading.check_weights_match`): ``heal`` reads folders a person may
    have edited, and transformers would fill a missing block with random numbers."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from .loading import check_weights_match, remote_code_trusted

    folder = Path(folder)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # check_weights_match says in one line what transformers' table would
    try:
        model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or "auto", output_loading_info=True,
                                                           trust_remote_code=remote_code_trusted(folder))
    finally:
        hf_logging.set_verbosity(verbosity)
    check_weights_match(folder, model, info)
    return model.eval()


def model_card(loaded: LoadedModel, plan: Plan, result: ExportResult) -> str:
    """The README.md of an exported folder: base model, what was cut and why, how to load it."""
    from .provenance import package_versions

    base = loaded.describe()
    hub_id = loaded.spec if loaded.source == "hub" else None
    lines = ["---", "library_name: transformers", "tags: [cornerstone, pruned, layer-pruning]"]
    if hub_id:
        lines.append(f"base_model: {hub_id}")
    lines += ["---", "", f"# {loaded.spec}, {plan.what} removed", "",
              f"Made with cornerstone {package_versions()['cornerstone']} from `{loaded.spec}` "
              f"({base['model_type']}, {base['num_hidden_layers']} layers, {base['parameters']:,} parameters; "
              f"fingerprint `{loaded.fingerprint}`).", "",
              "## What was cut", "",
              f"Scores: {plan.report.get('method')} at {plan.report.get('granularity')} granularity on "
              f"{', '.join(plan.report.get('tasks') or [])}; full-model score {plan.report.get('base_score', 0):.4f}, "
              f"chance {plan.report.get('chance', 0):.4f}; cornerstones: {', '.join(plan.report.get('cornerstones') or []) or 'none'}.",
              f"Plan: policy `{plan.planner.policy}`, "
              + (f"targets `{', '.join(plan.planner.targets)}`" if plan.planner.targets else f"drop `{plan.planner.drop}`")
              + f", keep_first {plan.planner.keep_first}, "
              f"keep_last {plan.planner.keep_last}, cornerstones protected: {plan.planner.protect_cornerstones}.", "",
              "| player | importance | rank | parameters | reason |", "|---|---|---|---|---|"]
    lines += [f"| {r.name} | {r.importance:+.4f} | {r.rank} | {r.parameters:,} | {r.reason} |" for r in plan.removed]
    lines += ["", f"Parameters: {result.parameters:,} of {plan.parameters.original:,} "
              f"({plan.parameters.removed_fraction:.1%} removed); blocks {plan.blocks['remaining']} of {plan.blocks['original']}.",
              f"{'Measured' if plan.predicted_measured else 'Estimated (not measured)'} score on the scored documents: "
              f"{plan.predicted_score:.4f} ({plan.predicted_by})." if plan.predicted_score is not None else "",
              *([f"Repaired: a linear map (ReplaceMe, least squares, ridge {result.repair.settings.ridge:g}) fitted on "
                 f"{result.repair.texts} calibration texts stands in for each removed span, folded into "
                 + "; ".join(f"`{s.module}` (L{s.blocks[0]}..L{s.blocks[-1]}: relative error {s.error_before:.3f} -> "
                             f"{s.error_after:.3f})" for s in result.repair.spans) + "."] if result.repair else []),
              f"Checked: logits equal the original model{' (repaired)' if result.repair else ''} with these players "
              f"removed (max abs difference {result.max_abs_logit_diff:.2g})." if result.max_abs_logit_diff is not None else "", "",
              "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", ""]
    if result.format == "stock":
        lines += ['model = AutoModelForCausalLM.from_pretrained("PATH")', "```", "",
                  "A stock checkpoint: `lm_eval --model hf --model_args pretrained=PATH`, vLLM and llama.cpp's "
                  "converter read it as they read the base model."]
    elif result.format == "gemma3-pruned":
        lines += ['model = AutoModelForCausalLM.from_pretrained("PATH", trust_remote_code=True)', "```", "",
                  "Gemma 3 with sublayers removed (`no_attention`, `no_ffn` in config.json): no serving engine has a "
                  "format for it, so transformers loads it with `trust_remote_code=True` and the bundled "
                  "`modeling_gemma3_pruned.py` (transformers 5, whose cache holds nothing for a removed attention; an older one is refused on load). "
                  "`lm_eval --model hf --model_args pretrained=PATH,trust_remote_code=True`."]
    else:
        lines += ['model = AutoModelForCausalLM.from_pretrained("PATH", trust_remote_code=True)', "```", "",
                  "DeciLM / Nemotron-NAS layout (`block_configs`, `no_op` sublayers), read by vLLM "
                  "(`DeciLMForCausalLM`) and llama.cpp's converter; transformers needs `trust_remote_code=True` "
                  "for the bundled `modeling_decilm.py`. `lm_eval --model hf --model_args pretrained=PATH,trust_remote_code=True`."]
    lines += [""] + [f"Note: {note}" for note in result.notes]
    lines += ["", "Files: `cornerstone-plan.yaml` (the plan), `cornerstone-recipe.yaml` (the recipe, when one was used), "
              "`cornerstone-export.json` (this export's numbers).", ""]
    return "\n".join(lines)
