"""Apply a plan: cut the players from the model and write a checkpoint that loads everywhere.

:func:`export` is the Python API behind ``cornerstone export``. Two formats:

- **stock** (block plans, and sublayer plans that only remove whole blocks): the model's own
  architecture with fewer layers, in safetensors, loadable with plain
  ``AutoModelForCausalLM.from_pretrained(DIR)`` (no remote code) and so by lm-eval, vLLM and
  llama.cpp's converter. :func:`drop_blocks` rebuilds the layer list, renumbers every layer, slices
  every per-layer config list (``layer_types`` and the like) and sets ``num_hidden_layers``.
- **decilm** (sublayer plans of Llama-family models): the DeciLM / Nemotron-NAS layout, whose
  per-layer ``block_configs`` mark an attention or FFN as ``no_op``; vLLM and llama.cpp read it, and
  the folder carries cornerstone's modeling file for ``trust_remote_code=True`` in transformers
  (see :mod:`cornerstone.decilm`).
- **gemma3-pruned** (sublayer plans of Gemma 3 text models): the stock Gemma 3 config plus the layers
  without attention or FFN; no serving engine has such a format, so the folder carries cornerstone's
  modeling code and loads in transformers with ``trust_remote_code=True`` (see
  :mod:`cornerstone.gemma3_pruned`).

:func:`drop_sublayers` builds either, as the architecture's ``sublayer_layout`` says.

Both surgeries build the slim model on the meta device from its new config and move the kept
weights in with a strict ``load_state_dict``: a config that does not describe the weights fails
there, before anything is written. Every export is checked against the original model under the
plan's mask (same logits) before its folder appears; the folder is written beside the target
and renamed into place, so a failure never leaves a folder that looks complete.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections.abc import Collection
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from .errors import ExportError, PlanError
from .estimation import Progress
from .exported import (EXPORT_MANIFEST, PLAN_FILE, RECIPE_FILE, ExportResult, load_exported,
                       max_logit_difference, model_card, tolerance)
from .files import check_output, staged_directory
from .loading import LoadedModel, load_model, resolve
from .planner import Plan
from .quiet import no_progress_bars
from .repair import RepairResult
from .serving import compatibility
from .serving import notes as runtime_notes
from .settings import ExportSettings
from .players import (architecture, decoder_layers, model_type, owned_modules, parse_players, removed_blocks, text_config,
                      unique_parameters)



def _slim_from_state_dict(model_class: type, config: Any, state_dict: dict[str, torch.Tensor], source: Any,
                          source_name: Any = None) -> Any:
    """Build ``model_class(config)`` without allocating, then move ``state_dict`` in (strict: every name and shape must
    match). Buffers that are not saved (rotary ``inv_freq``) are taken from ``source``'s buffer of the same name
    (``source_name`` maps a slim name to the source's), so the slim model runs as it is, not only once reloaded."""
    with torch.device("meta"):
        slim = model_class(config)
    try:
        slim.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as exc:
        raise ExportError(f"the pruned {model_type(source)} config does not describe the kept weights: "
                          f"{str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else exc}",
                          hint="This architecture has a per-layer rule cornerstone cannot rewrite; "
                          "please report it with the model's config.json.") from None
    buffers = dict(source.named_buffers())
    for name, buffer in list(slim.named_buffers()):
        if buffer.is_meta:
            original = buffers.get(source_name(name) if source_name else name)
            if original is None or original.shape != buffer.shape:
                raise ExportError(f"the pruned {model_type(source)} model has a buffer {name} that the original lacks",
                                  hint="Please report this with the model's config.json.")
            owner, _, leaf = name.rpartition(".")
            slim.get_submodule(owner).register_buffer(leaf, original, persistent=False)
    # assign=True wraps each tensor in its own Parameter: tie the embeddings again as the config says
    slim.tie_weights()
    slim.generation_config = copy.deepcopy(source.generation_config)
    return slim.eval()


def drop_blocks(model: torch.nn.Module, layers: Collection[int]) -> torch.nn.Module:
    """A new model of the same class without the decoder blocks ``layers`` (weights are shared, not copied).

    Kept blocks are renumbered 0..k-1 in order; config lists with one entry per layer (``layer_types``,
    sliding-window and no-RoPE patterns, ...) keep the kept layers' entries; lists of layer indices
    (``mlp_only_layers``) are remapped; ``num_hidden_layers`` becomes k.
    """
    path, blocks = decoder_layers(model)
    count = len(blocks)
    dropped = set(layers)
    if not dropped <= set(range(count)):
        raise PlanError(f"blocks {sorted(dropped - set(range(count)))} do not exist: the model has L0..L{count - 1}")
    keep = [index for index in range(count) if index not in dropped]
    if not keep:
        raise PlanError("a plan cannot drop every block")
    from .streaming import edit_config

    renumber = {old: new for new, old in enumerate(keep)}
    config = copy.deepcopy(model.config)
    text = text_config(config)
    # the streamed export's rules, one table for both (thresholds such as max_window_layers count kept layers)
    fields = {key: list(value) if isinstance(value, tuple) else value for key, value in text.to_dict().items()}
    fields["num_hidden_layers"] = count  # GPT-2's n_layer and the like: transformers maps the name both ways
    for key, (_, value) in edit_config(fields, keep, where=f"the {model_type(model)} config", streamed=False).items():
        setattr(text, key, value)

    prefix = path + "."
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name.startswith(prefix):
            index, rest = name[len(prefix):].split(".", 1)
            if int(index) in dropped:
                continue
            name = f"{prefix}{renumber[int(index)]}.{rest}"
        state[name] = tensor

    def source_name(name: str) -> str:
        if not name.startswith(prefix):
            return name
        index, rest = name[len(prefix):].split(".", 1)
        return f"{prefix}{keep[int(index)]}.{rest}"

    return _slim_from_state_dict(type(model), config, state, model, source_name)


def drop_sublayers(model: torch.nn.Module, players: Collection[Any]) -> torch.nn.Module:
    """The model in its architecture's sublayer layout with the given attention/FFN sublayers (and blocks) removed:
    DeciLM / Nemotron-NAS (Llama family, ``no_op`` sublayers) or pruned Gemma 3 (:mod:`cornerstone.remote`).

    Each layer keeps its slot; a removed sublayer loses its weights and its own norms
    (:func:`~cornerstone.players.owned_modules`).
    """
    kind = model_type(model)
    layout = architecture(model).sublayer_layout
    if layout is None:
        raise ExportError(
            f"a sublayer plan for '{kind}' cannot be written as a checkpoint: cornerstone writes sublayer plans of "
            "Llama-family models (DeciLM/Nemotron-NAS block_configs, which serving engines read) and of Gemma 3 text "
            "models (with its own modeling code) only",
            hint="Plan with --granularity block: whole-block plans export as a stock checkpoint for every architecture.",
        )
    from .remote import package

    # a whole block among sublayers (a mixed plan) keeps its slot with both halves gone
    no_attention = [p.layer for p in players if p.kind in ("attn", "block")]
    no_ffn = [p.layer for p in players if p.kind in ("mlp", "block")]
    if layout == "decilm":
        from .decilm import DeciLMConfig, DeciLMForCausalLM

        config, cls = DeciLMConfig.from_llama(model.config, no_attention=no_attention, no_ffn=no_ffn), DeciLMForCausalLM
    else:
        from .gemma3_pruned import Gemma3PrunedForCausalLM, Gemma3PrunedTextConfig

        config = Gemma3PrunedTextConfig.from_gemma3(model.config, no_attention=no_attention, no_ffn=no_ffn)
        cls = Gemma3PrunedForCausalLM
    config.architectures = [cls.__name__]
    config.auto_map = dict(package(layout).AUTO_MAP)
    gone = tuple(f"{path}." for p in players for path in owned_modules(model, p))
    state = {name: tensor for name, tensor in model.state_dict().items() if not name.startswith(gone)}
    return _slim_from_state_dict(cls, config, state, model)


def check_model(plan: Plan, loaded: LoadedModel, named: str = "the plan") -> None:
    """Refuse (:class:`PlanError`) to apply ``plan`` to a model other than the one it was made for: its
    ``model.fingerprint`` must be the loaded model's. A plan without one (null or empty: edited, or
    written by another tool) cannot be checked and is refused too; ``--allow-other-model`` skips both."""
    fingerprint = plan.model.get("fingerprint")
    hint = ("Export the model the plan was made for (or pass --allow-other-model; a folder's plan made "
            "before fingerprints covered the whole weights no longer matches it).")
    if not (fingerprint or "").strip():
        raise PlanError(f"{named} names no model fingerprint (model.fingerprint is {fingerprint!r}), so it cannot be "
                        f"checked against {loaded.spec}",
                        hint="Plan again from this model's report, or pass --allow-other-model to apply it unchecked.")
    if fingerprint != loaded.fingerprint:
        raise PlanError(f"the plan was made for {plan.model.get('spec') or fingerprint}, not for {loaded.spec}", hint=hint)


def export(
    model: LoadedModel | str,
    plan: Plan | str | Path,
    out: str | Path | None = None,
    settings: ExportSettings | None = None,
    *,
    recipe: dict[str, Any] | None = None,
    progress: Progress | None = None,
    **options: Any,
) -> ExportResult:
    """Cut ``plan``'s players from ``model`` and write the slim checkpoint to ``out``.

    ``settings`` (:class:`~cornerstone.settings.ExportSettings`: ``out``, ``overwrite``,
    ``max_shard_size``, ``verify``, ``allow_other_model``) are those of ``cornerstone export`` and a
    recipe's ``export:``; ``out`` and ``options`` set its fields by name.

    The folder holds the safetensors weights (sharded above ``max_shard_size``), config, tokenizer,
    generation config, a model card (``README.md``), the plan (``cornerstone-plan.yaml``), the
    recipe when one is given (``cornerstone-recipe.yaml``) and ``cornerstone-export.json``. With
    ``verify`` the written folder is loaded back and its logits compared with the original model
    under the plan's mask (max abs difference <= 1e-5 in float32) before the folder is put in place.
    """
    from .options import with_options

    settings = with_options(settings, ExportSettings, {**options, **({"out": out} if out is not None else {})},
                            function="export")
    if settings.format == "gguf":
        return export_gguf(model, plan, settings)
    if settings.stream:
        return export_streamed(model, plan, settings)
    overwrite = settings.overwrite
    started = time.perf_counter()
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    named = "the plan" if isinstance(plan, Plan) else f"plan '{plan}'"
    plan = plan if isinstance(plan, Plan) else Plan.load(plan)
    if not settings.allow_other_model:
        check_model(plan, loaded, named)
    out = Path(settings.out)
    # the model being read, never written into nor replaced: its folder or GGUF file and the GGUF's cache
    sources = [loaded.location, *([loaded.extra["dequantised_cache"]] if "dequantised_cache" in loaded.extra else [])]
    check_output(out, overwrite=overwrite, marker=EXPORT_MANIFEST, protected=sources)  # before any work
    players = parse_players(loaded.model, plan.player_names)
    blocks = removed_blocks(players)
    with ExitStack() as repairing:
        repaired_by = None
        if settings.repair is not None:  # the weights of the folded projections come back once the folder is written
            from .repair import repaired

            repaired_by = repairing.enter_context(repaired(loaded, plan, settings.repair, progress=progress))
        return _write(loaded, plan, players, blocks, settings, sources, started, recipe, repaired_by)


def _write(loaded: LoadedModel, plan: Plan, players: list[Any], blocks: set[int], settings: ExportSettings,
           sources: list[Any], started: float, recipe: dict[str, Any] | None,
           repaired_by: RepairResult | None) -> ExportResult:
    """The folder of :func:`export`: cut, save, reload and compare, then put in place."""
    out, overwrite, max_shard_size = Path(settings.out), settings.overwrite, settings.max_shard_size
    if all(p.layer in blocks for p in players):
        slim, layout = drop_blocks(loaded.model, blocks), "stock"
    else:
        slim, layout = drop_sublayers(loaded.model, players), architecture(loaded.model).sublayer_layout
    runtimes = compatibility(slim.config, layout, loaded.tokenizer)
    parameters = unique_parameters(slim)
    if parameters != plan.parameters.remaining:
        raise ExportError(f"the exported model has {parameters:,} parameters but the plan predicts "
                          f"{plan.parameters.remaining:,}",
                          hint="The plan was made from a report of a different model; re-plan from this model's report.")
    with staged_directory(out, if_exists="replace" if overwrite else "error", marker=EXPORT_MANIFEST,
                          protected=sources) as staging:
        with no_progress_bars():
            slim.save_pretrained(staging, max_shard_size=max_shard_size)
            loaded.tokenizer.save_pretrained(staging)
        if layout != "stock":
            from .remote import package

            code = package(layout)
            for name in code.MODELING_FILES:
                shutil.copy2(code.source_dir() / name, staging / name)
        plan.save(staging / PLAN_FILE)
        if recipe is not None:
            import yaml

            (staging / RECIPE_FILE).write_text(yaml.safe_dump(recipe, sort_keys=False))
        difference = None
        if settings.verify:
            with no_progress_bars():
                reloaded = load_exported(staging, dtype=slim.dtype)
            difference = max_logit_difference(loaded.model, players, reloaded)
            del reloaded
            if not difference <= tolerance(slim.dtype):
                raise ExportError(f"the exported model's logits differ from the masked original by {difference:.3g}",
                                  hint="Nothing was written. Please report this with the plan and the model.")
        files = sorted(p.name for p in staging.iterdir())
        size = sum(p.stat().st_size for p in staging.glob("*.safetensors"))
        result = ExportResult(path=str(out), format=layout, parameters=parameters,
                              planned_parameters=plan.parameters.remaining, bytes_on_disk=size,
                              files=files + ["README.md", EXPORT_MANIFEST], max_abs_logit_diff=difference,
                              seconds=time.perf_counter() - started, notes=runtime_notes(runtimes),
                              runtimes=runtimes, repair=repaired_by)
        (staging / "README.md").write_text(model_card(loaded, plan, result))
        (staging / EXPORT_MANIFEST).write_text(json.dumps(
            {**result.model_dump(), "base_model": loaded.describe(), "players_removed": plan.player_names}, indent=2))
    return result


def export_streamed(model: LoadedModel | str, plan: Plan | str | Path, settings: ExportSettings) -> Any:
    """``stream``: a block plan written from a local safetensors folder tensor by tensor, the model never built
    (:func:`cornerstone.streaming.stream_export`). A loaded model is streamed from the folder it was loaded from."""
    from .streaming import stream_export

    kind, location = (model.source, model.location) if isinstance(model, LoadedModel) else resolve(model)
    if kind != "folder":
        shown = model if isinstance(model, str) else model.spec
        raise ExportError(f"--stream reads a local safetensors folder, and '{shown}' is a {kind} model",
                          hint="Download a hub model first (huggingface-cli download ID --local-dir DIR) and give DIR; "
                          "a GGUF file exports with --format gguf.")
    return stream_export(location, plan, settings.out, overwrite=settings.overwrite, dtype=settings.dtype,
                         max_shard_size=settings.max_shard_size, verify=settings.verify,
                         allow_other_model=settings.allow_other_model)


# what llama.cpp and the masked float model are compared on after a GGUF export (a short, ordinary sentence)
GGUF_PROBE = "The capital of France is Paris. The capital of Italy is Rome, and the capital of Spain is"


def export_gguf(model: LoadedModel | str, plan: Plan | str | Path, settings: ExportSettings) -> Any:
    """``format: gguf``: write the model's GGUF file without the plan's blocks, tensors copied as they are
    (:func:`cornerstone.gguf_export.prune_gguf`); a sublayer plan of a Llama file becomes llama.cpp's ``deci``
    architecture (:func:`cornerstone.gguf_export.prune_gguf_sublayers`). With ``verify``, the file is run in
    llama.cpp and its next-token log-probabilities checked against the masked float model before it is put in place."""
    from .gguf_export import prune_gguf_sublayers

    kind, location = (model.source, model.location) if isinstance(model, LoadedModel) else resolve(model)
    if kind not in ("alias", "gguf"):
        raise ExportError(f"--format gguf prunes a .gguf file, and '{model if isinstance(model, str) else model.spec}' "
                          f"is a {kind} model", hint="Give the .gguf file (or a bundled alias), or export safetensors.")
    return prune_gguf_sublayers(location, plan, settings.out, overwrite=settings.overwrite,
                                allow_other_model=settings.allow_other_model, portable=settings.portable,
                                probe=GGUF_PROBE if settings.verify else None)


