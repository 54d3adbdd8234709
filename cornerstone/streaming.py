"""Export a block plan from a safetensors folder without building the model (out of core).

A plan that removes whole blocks is, on disk, a renaming of tensors plus a config edit.
:func:`stream_export` reads the source's ``model.safetensors`` (or the shards its
``model.safetensors.index.json`` names) one tensor at a time, drops the removed blocks' tensors,
writes each kept block's tensors under its new index (``<prefix>.N.<rest>``, N counted over the kept
blocks in order) and every other tensor under its own name (tied embeddings stay as the source
stores them), and edits the config by the rules of :data:`LAYER_FIELDS`. The folder it writes is the
one :func:`cornerstone.export.export` writes for the same plan (same tensors, same config; the tests
compare them), with the same plan file, manifest and model card, so ``eval`` and ``heal`` read it
like any export.

**Memory.** Each tensor is read through its own ``safetensors.safe_open`` (so the source's mapping
lives only while that tensor is copied out) and written straight into an output shard whose header
was laid out beforehand from the source headers: no shard is ever assembled in memory. The peak is
about two copies of the largest tensor (the tensor and its mapped file pages, or its ``dtype``
conversion), whatever the model's size; the tests measure it. ``verify="full"`` loads both models
and so needs memory for both; ``verify="layers"`` keeps at most ``layer_memory`` of weights in memory
and reads the rest layer by layer from disk as the forward pass reaches them (accelerate's offload).

**Config.** The text config (``text_config`` of a multimodal model such as Gemma 3) is edited as
JSON, every other key kept as it is; the rule for each field that describes layers is data in
:data:`LAYER_FIELDS`. A per-layer pattern the source does not write out but transformers derives
from the layer index (``layer_types`` of older Gemma 2/3 configs, from ``sliding_window_pattern``) is
written out, sliced, since the derived one would shift. A list that looks per layer (one entry per
layer, or a non-empty list whose name says ``layer``) without a rule is refused, not guessed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from .errors import ConfigError, ExportError, ModelLoadError, PlanError, UnsupportedArchitectureError
from .exported import (EXPORT_MANIFEST, NOT_PER_LAYER, PLAN_FILE, ExportResult, load_exported, max_logit_difference,
                       model_card, probe_ids, tolerance)
from .files import check_output, staged_directory
from .loading import check_weights_format, fingerprint_folder, read_config
from .planner import Plan
from .players import ARCHITECTURES, removed_blocks

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

Rule = Literal["count", "per_layer", "indices", "threshold", "pattern"]


@dataclass(frozen=True)
class LayerField:
    """How one config field that describes layers changes when blocks go (``keep``: the kept old indices).

    - ``count``: the number of layers; becomes ``len(keep)``.
    - ``per_layer``: one entry per layer; keeps the kept layers' entries.
    - ``indices``: a list of layer indices; the kept ones renumbered, the removed ones dropped.
    - ``threshold``: the layers below it are of one kind; becomes the number of kept layers below it
      (a prefix stays a prefix, so this is always expressible).
    - ``pattern``: a step from which a layer's kind is derived by its index (``kind``); checked after the
      other edits, and where the kept layers' kinds would shift, rewritten by ``rewrite`` or refused.
    """

    rule: Rule
    why: str
    kind: Callable[[dict[str, Any], int], bool] | None = None
    rewrite: Callable[[dict[str, Any], list[bool]], None] | None = None


def _qwen_sparse(config: dict[str, Any], layer: int) -> bool:
    # transformers' Qwen2MoeDecoderLayer / Qwen3MoeDecoderLayer
    return (layer not in (config.get("mlp_only_layers") or []) and (config.get("num_experts") or 0) > 0
            and (layer + 1) % config["decoder_sparse_step"] == 0)


def _qwen_sparse_as_list(config: dict[str, Any], sparse: list[bool]) -> None:
    # every layer sparse by the step, the dense ones named: mlp_only_layers expresses any pattern
    config["decoder_sparse_step"] = 1
    config["mlp_only_layers"] = [index for index, is_sparse in enumerate(sparse) if not is_sparse]


def _deepseek_sparse(config: dict[str, Any], layer: int) -> bool:
    return (bool(config.get("n_routed_experts")) and layer >= (config.get("first_k_dense_replace") or 0)
            and layer % config["moe_layer_freq"] == 0)


LAYER_FIELDS: dict[str, LayerField] = {
    "num_hidden_layers": LayerField("count", "the number of decoder blocks"),
    "layer_types": LayerField("per_layer", "each layer's attention kind (sliding / full)"),
    "no_rope_layers": LayerField("per_layer", "SmolLM3, Llama 4: one 0/1 flag per layer (1 = RoPE), despite the name"),
    "mlp_only_layers": LayerField("indices", "Qwen MoE: the indices of the layers with a dense MLP"),
    "max_window_layers": LayerField("threshold", "Qwen 2/3: the layers below it use full attention"),
    "first_k_dense_replace": LayerField("threshold", "DeepSeek: the layers below it are dense"),
    "decoder_sparse_step": LayerField("pattern", "Qwen MoE: layer i is sparse when (i + 1) % step == 0",
                                      _qwen_sparse, _qwen_sparse_as_list),
    "moe_layer_freq": LayerField("pattern", "DeepSeek: layer i is sparse when i % freq == 0", _deepseek_sparse),
}

# Where decoder blocks live in a checkpoint: the module paths of players.ARCHITECTURES, plus the names
# multimodal checkpoints store them under (transformers renames them to its module paths on load).
CHECKPOINT_LAYERS: dict[str, tuple[str, ...]] = {"gemma3": ("language_model.model.layers",)}
# Other towers of a multimodal model: their own numbered layers stay as they are.
OTHER_TOWERS = ("vision_tower.", "model.vision_tower.", "multi_modal_projector.", "model.multi_modal_projector.",
                "audio_tower.", "model.audio_tower.")
# A tensor name with a numbered layer in it, wherever it is.
_NUMBERED = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.[0-9]+\.")
# Files copied as they are (the tokenizer's and the generation settings); weights and config are written.
COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
                "chat_template.json", "preprocessor_config.json", "processor_config.json")
# safetensors dtype names (the header's "dtype")
_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}
_FLOATS = {"F64", "F32", "F16", "BF16"}
_ITEM_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}
_HINT_IN_MEMORY = "Use the in-memory export (cornerstone export without streaming), which builds the model."


class StreamExportResult(ExportResult):
    """What :func:`stream_export` wrote (the fields of :class:`~cornerstone.exported.ExportResult`, and more)."""

    source: str
    dtype: str
    tensors_kept: int
    tensors_removed: int
    config_edits: dict[str, Any]
    verified: Literal["full", "layers"] | None


@dataclass(frozen=True)
class _Tensor:
    source_file: Path
    name: str
    out_name: str
    dtype: str  # as written
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * _ITEM_SIZES[self.dtype]


def _weight_map(folder: Path) -> dict[str, Path]:
    """Every tensor name of the source and the file that holds it."""
    check_weights_format(folder)  # pickled weights only: refused before anything reads them
    index = folder / INDEX_FILE
    hint = "Re-download the model, or save it again with save_pretrained."
    if index.is_file():
        try:
            mapping = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
                raise TypeError
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise ModelLoadError(f"'{index}' is not a safetensors index (a JSON object with a weight_map of file names)",
                                 hint=hint) from None
        files = {}
        for name, file in mapping.items():
            if Path(file).name != file or not file.endswith(".safetensors"):
                raise ModelLoadError(f"'{index}' names '{file}' for {name}, not a .safetensors file in the folder",
                                     hint=hint)
            files[name] = folder / file
        for file in sorted(set(files.values())):
            if not file.is_file():
                raise ModelLoadError(f"'{index}' names the shard '{file.name}', which is not in the folder", hint=hint)
        return files
    single = folder / SINGLE_FILE
    if not single.is_file():
        raise ModelLoadError(f"'{folder}' has neither {SINGLE_FILE} nor {INDEX_FILE}", hint=hint)
    return {name: single for name in _read(single, lambda f: list(f.keys()))}


def _read(file: Path, what: Callable[[Any], Any]) -> Any:
    """``what(handle)`` on ``file`` opened with ``safe_open``; the mapping is closed on return."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            return what(handle)
    except Exception as exc:  # safetensors' own SafetensorError, OSError, and torch's errors for a bad buffer
        raise ModelLoadError(f"cannot read '{file}': {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                             hint="The file is corrupt or truncated; re-download the model.") from None


def _layer_prefix(model_type: str, names: Collection[str]) -> str:
    """The checkpoint prefix of the decoder blocks (``model.layers``), from the architecture tables."""
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        raise UnsupportedArchitectureError(f"architecture '{model_type}' is not supported",
                                           hint="Supported: " + ", ".join(sorted(ARCHITECTURES)) + ".")
    for prefix in arch.layers + CHECKPOINT_LAYERS.get(model_type, ()):
        if any(name.startswith(prefix + ".") for name in names):
            return prefix
    raise UnsupportedArchitectureError(
        f"no decoder block tensors under {' or '.join(arch.layers)} in the checkpoint of this '{model_type}' model",
        hint="The checkpoint's names differ from cornerstone's table (CHECKPOINT_LAYERS in cornerstone/streaming.py).")


def _block_of(name: str, prefix: str) -> int | None:
    if not name.startswith(prefix + "."):
        return None
    index = name[len(prefix) + 1:].split(".", 1)[0]
    return int(index) if index.isascii() and index.isdigit() else -1


def _text_part(config: dict[str, Any]) -> dict[str, Any]:
    """The decoder's part of a config.json: its ``text_config`` in a multimodal model, else itself."""
    text = config.get("text_config")
    return text if isinstance(text, dict) else config


def edit_config(config: dict[str, Any], keep: list[int], derived: dict[str, list[Any]] | None = None,
                where: str = "config.json", streamed: bool = True) -> dict[str, Any]:
    """Edit the text part of ``config`` (in place) for a model that keeps only the blocks ``keep`` (old
    indices, in order), by :data:`LAYER_FIELDS`; ``derived`` holds per-layer lists transformers derives but
    the file does not write (they are written out, sliced). Returns the edits made, ``{field: [old, new]}``.
    ``streamed``: the caller is the streamed export (its refusals then point to the in-memory one, which
    :func:`cornerstone.export.drop_blocks` is, using the same rules)."""
    text = _text_part(config)
    count = text.get("num_hidden_layers")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ModelLoadError(f"'{where}' has no num_hidden_layers (a positive integer)",
                             hint="Restore the model's config.json.")
    renumber = {old: new for new, old in enumerate(keep)}
    before = json.loads(json.dumps(text))
    for key, values in (derived or {}).items():
        if key not in text and len(values) == count:
            text[key] = list(values)
    for key, value in list(text.items()):
        rule = LAYER_FIELDS.get(key)
        if rule is None:
            looks = isinstance(value, list) and (len(value) == count or ("layer" in key and value))
            if looks and key not in NOT_PER_LAYER and not key.endswith(("token_id", "token_ids")):
                raise ExportError(f"'{where}' field {key} ({len(value)} entries, {count} layers) may describe layers, "
                                  "and cornerstone has no rule for it", hint="Add its rule to LAYER_FIELDS in "
                                  "cornerstone/streaming.py" + (", or use the in-memory export, which builds the "
                                  "model." if streamed else "; please report the model's config.json."))
            continue
        if value is None or rule.rule == "pattern":
            continue
        bad = ExportError(f"'{where}' field {key} is {value!r}, not what its rule ({rule.rule}: {rule.why}) expects",
                          hint="Restore the model's config.json" + (", or use the in-memory export." if streamed else "."))
        if rule.rule == "count":
            text[key] = len(keep)
        elif rule.rule == "per_layer":
            if not isinstance(value, list) or len(value) != count:
                raise bad
            text[key] = [value[i] for i in keep]
        elif rule.rule == "indices":
            if not isinstance(value, list) or not all(isinstance(i, int) and 0 <= i < count for i in value):
                raise bad
            text[key] = [renumber[i] for i in value if i in renumber]
        elif rule.rule == "threshold":
            if not isinstance(value, int) or isinstance(value, bool):
                raise bad
            # a threshold at or past the layer count covers every layer before and after: left as it is
            text[key] = value if value >= count else sum(i < value for i in keep)
    for key, rule in LAYER_FIELDS.items():
        if rule.rule != "pattern" or not isinstance(text.get(key), int) or text[key] < 1:
            continue
        kinds = [rule.kind(before, i) for i in keep]
        if [rule.kind(text, new) for new in range(len(keep))] != kinds:
            if rule.rewrite is None:
                raise ExportError(f"removing these blocks shifts the layer pattern that '{where}' field {key}="
                                  f"{text[key]} derives from the layer index ({rule.why}), and no config field can "
                                  "express the kept layers' kinds", hint="Plan with other blocks kept.")
            rule.rewrite(text, kinds)
    return {key: [before.get(key), text.get(key)] for key in sorted(set(before) | set(text))
            if before.get(key) != text.get(key)}


def _derived_lists(folder: Path) -> dict[str, list[Any]]:
    """Per-layer lists transformers derives for ``folder``'s config (``layer_types`` from a sliding-window
    pattern), read from the config object without any weights."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as exc:  # transformers raises ValueError, KeyError, OSError... for a config it cannot read
        raise ModelLoadError(f"transformers cannot read '{folder / 'config.json'}': {str(exc).splitlines()[0]}",
                             hint="Restore the model's config.json, or upgrade transformers.") from None
    text = config.get_text_config(decoder=True)
    return {key: list(getattr(text, key)) for key, rule in LAYER_FIELDS.items()
            if rule.rule == "per_layer" and isinstance(getattr(text, key, None), (list, tuple))}


def _check_plan(plan: Plan, count: int, folder: Path, fingerprint: str, allow_other_model: bool) -> list[int]:
    """The blocks ``plan`` removes from a model of ``count`` blocks; refuses sublayer cuts, blocks past the
    end, removing everything, and (unless ``allow_other_model``) a plan made for another model than the one
    whose fingerprint is ``fingerprint``."""
    blocks = removed_blocks(plan.removed)
    partial = sorted({r.name for r in plan.removed if r.layer not in blocks})
    if partial:
        raise PlanError(f"the plan removes sublayers ({', '.join(partial[:3])}) that leave their block in place, "
                        "and a streamed export only drops whole blocks", hint=_HINT_IN_MEMORY)
    if not blocks <= set(range(count)):
        raise PlanError(f"blocks {sorted(blocks - set(range(count)))} do not exist: '{folder}' has L0..L{count - 1}",
                        hint="Use a plan made for this model.")
    if len(blocks) == count:
        raise PlanError(f"a plan cannot remove every block ({count} of {count})", hint="Lower --drop.")
    if not allow_other_model:
        made_for = (plan.model.get("fingerprint") or "").strip()
        if made_for != fingerprint:
            raise PlanError(f"the plan was made for {plan.model.get('spec') or made_for or 'an unnamed model'}, "
                            f"not for '{folder}'", hint="Export the model the plan was made for (or pass "
                            "--allow-other-model to apply it anyway).")
    return sorted(blocks)


def _layout(tensors: list[_Tensor], max_bytes: int) -> list[list[_Tensor]]:
    """Tensors in shards of at most ``max_bytes`` each (a larger tensor gets a shard of its own), in order."""
    shards: list[list[_Tensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def _write_shard(path: Path, tensors: list[_Tensor], convert: torch.dtype | None) -> None:
    """A safetensors file holding ``tensors``: the header first (sizes are known), then each tensor's bytes as
    it is read, so that one tensor at a time is in memory."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for tensor in tensors:
        header[tensor.out_name] = {"dtype": tensor.dtype, "shape": list(tensor.shape),
                                   "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for tensor in tensors:
            data = _read(tensor.source_file, lambda f, name=tensor.name: f.get_tensor(name))
            if convert is not None and tensor.dtype == _DTYPE_NAMES.get(convert):
                data = data.to(convert)
            data = data.contiguous()
            if data.numel() * data.element_size() != tensor.nbytes:
                raise ModelLoadError(f"'{tensor.source_file}' holds {tensor.name} with another size than its header says",
                                     hint="The file is corrupt; re-download the model.")
            out.write(data.reshape(-1).view(torch.uint8).numpy().data)
            del data


def _probe_memory(out_bytes: int) -> Literal["full", "layers"]:
    """``full`` when both models (source and output, about twice ``out_bytes``) fit in the memory available now."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return "full" if 3 * out_bytes < int(line.split()[1]) * 1024 else "layers"
    except (OSError, ValueError, IndexError):
        pass
    return "layers"


def _verify(folder: Path, staging: Path, plan: Plan, dtype: torch.dtype, mode: Literal["full", "layers"],
            layer_memory: int) -> float:
    """max |logits(source with the plan's players masked) - logits(written model)| on a probe; ``layers``
    keeps at most ``layer_memory`` bytes of each model's weights in memory and reads the rest from disk."""
    from .players import parse_players
    from .quiet import no_progress_bars

    if mode == "full":
        with no_progress_bars():
            source, written = load_exported(folder, dtype=dtype), load_exported(staging, dtype=dtype)
        return max_logit_difference(source, parse_players(source, plan.player_names), written)
    import tempfile

    from transformers import AutoModelForCausalLM

    from .masking import without
    from .players import text_config

    results = []
    with tempfile.TemporaryDirectory(prefix="cornerstone-offload-") as offload:
        for index, path in enumerate((folder, staging)):
            with no_progress_bars():
                model = AutoModelForCausalLM.from_pretrained(
                    path, dtype=dtype, device_map="auto", max_memory={"cpu": layer_memory},
                    offload_folder=str(Path(offload) / str(index))).eval()
            ids = probe_ids(text_config(model.config).vocab_size, batch=1, length=16)
            players = parse_players(model, plan.player_names) if index == 0 else []
            with torch.no_grad(), without(model, players):
                results.append(model(ids).logits.float())
            del model
    return float((results[0] - results[1]).abs().max())


def stream_export(folder: str | Path, plan: Plan | str | Path, out: str | Path, *, overwrite: bool = False,
                  dtype: torch.dtype | str | None = None, max_shard_size: str | int = "2GB",
                  verify: bool | Literal["full", "layers"] = True, allow_other_model: bool = False,
                  layer_memory: int = 1 << 30) -> StreamExportResult:
    """Write ``folder``'s model without the blocks ``plan`` removes to ``out``, never building the model.

    ``folder`` is a transformers folder with safetensors weights (pickled ones are refused); ``plan`` a block
    plan (or a sublayer plan whose players fill whole blocks) made for it (its fingerprint is checked
    unless ``allow_other_model``), or the plan file's path. The output keeps the source's dtype unless
    ``dtype`` names another (floating tensors are converted, one at a time), in shards of at most
    ``max_shard_size``; the rules for tensors, config and memory are in the module docstring.

    ``verify``: ``"full"`` loads the source with the plan's players masked and the written model, and
    compares their logits on a probe; ``"layers"`` does the same with at most ``layer_memory`` bytes of
    weights in memory (the rest read from disk layer by layer); ``True`` picks ``full`` when both models
    fit in the memory available, else ``layers``; ``False`` checks nothing. A difference above the
    in-memory export's tolerance is an :class:`ExportError`. ``out`` appears complete, checked, or not
    at all, and only a folder cornerstone wrote is replaced (``overwrite``); ``folder`` is never written.
    """
    from transformers.utils.hub import convert_file_size_to_int

    started = time.perf_counter()
    folder, out = Path(folder), Path(out)
    if isinstance(plan, (str, Path)):
        plan = Plan.load(plan)
    if isinstance(dtype, str):
        from .loading import resolve_dtype

        dtype = resolve_dtype(dtype)
    if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ConfigError(f"dtype {dtype} is not one an export is written in", hint="Use float32, bfloat16 or float16.")
    try:
        max_bytes = convert_file_size_to_int(max_shard_size)
    except (ValueError, TypeError):
        raise ConfigError(f"max_shard_size '{max_shard_size}' is not a size", hint="Write it like 2GB or 500MB.") from None
    if verify not in (True, False, "full", "layers"):
        raise ConfigError(f"verify is {verify!r}", hint="Use true, false, 'full' or 'layers'.")
    check_output(out, overwrite=overwrite, marker=EXPORT_MANIFEST, protected=[folder])  # before any work
    config = read_config(folder)
    if config.get("auto_map"):
        raise ExportError(f"'{folder / 'config.json'}' maps to the folder's own modeling code (auto_map), which a "
                          "streamed export does not rewrite", hint=_HINT_IN_MEMORY)
    model_type = str(_text_part(config).get("model_type") or config.get("model_type"))
    files = _weight_map(folder)
    prefix = _layer_prefix(str(config.get("model_type")), files)
    count = _text_part(config).get("num_hidden_layers")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ModelLoadError(f"'{folder / 'config.json'}' has no num_hidden_layers (a positive integer)",
                             hint="Restore the model's config.json.")
    fingerprint = fingerprint_folder(folder)  # sha256 of every file, read in chunks (and cached)
    removed = _check_plan(plan, count, folder, fingerprint, allow_other_model)
    keep = [index for index in range(count) if index not in removed]
    renumber = {old: new for new, old in enumerate(keep)}
    held = {_block_of(name, prefix) for name in files} - {None}
    if held != set(range(count)):
        raise ModelLoadError(f"'{folder / 'config.json'}' says num_hidden_layers={count} but the weights hold blocks "
                             f"{sorted(held)[:4]}{'...' if len(held) > 4 else ''} under {prefix}",
                             hint="Restore the config.json that came with these weights.")
    edited = json.loads(json.dumps(config))
    edits = edit_config(edited, keep, _derived_lists(folder), where=str(folder / "config.json"))
    if dtype is not None:
        for part in {id(edited): edited, id(_text_part(edited)): _text_part(edited)}.values():
            for key in ("dtype", "torch_dtype"):
                if key in part:
                    part[key] = str(dtype).removeprefix("torch.")

    # what to write, from the headers alone (no tensor is read yet)
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    kept: list[_Tensor] = []
    dropped = total = 0
    for file in sorted(by_file):
        shapes = _read(file, lambda f, names=by_file[file]: {n: (f.get_slice(n).get_dtype(), tuple(f.get_slice(n).get_shape()))
                                                              for n in names})
        for name in sorted(by_file[file]):
            block = _block_of(name, prefix)
            if block is None and _NUMBERED.search(name) and not name.startswith(OTHER_TOWERS):
                raise ExportError(f"the tensor {name} in '{file}' looks like part of a numbered layer but lies "
                                  f"outside the decoder blocks ({prefix}.N)", hint=_HINT_IN_MEMORY)
            stored, shape = shapes[name]
            if stored not in _ITEM_SIZES:
                raise ExportError(f"the tensor {name} in '{file}' has dtype {stored}, which cornerstone does not copy",
                                  hint=_HINT_IN_MEMORY)
            total += _Tensor(file, name, name, stored, shape).nbytes // _ITEM_SIZES[stored]
            if block in removed:
                dropped += 1
                continue
            written = _DTYPE_NAMES[dtype] if dtype is not None and stored in _FLOATS else stored
            out_name = name if block is None else f"{prefix}.{renumber[block]}.{name.split('.', prefix.count('.') + 2)[-1]}"
            kept.append(_Tensor(file, name, out_name, written, shape))
    parameters = sum(t.nbytes // _ITEM_SIZES[t.dtype] for t in kept)
    if parameters != plan.parameters.remaining:
        raise ExportError(f"the exported model has {parameters:,} parameters but the plan predicts "
                          f"{plan.parameters.remaining:,}",
                          hint="The plan was made from a report of a different model; re-plan from this model's report.")
    kept.sort(key=lambda t: t.out_name)
    shards = _layout(kept, max_bytes)

    out_dtype = dtype or {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(
        next((t.dtype for t in kept if t.dtype in _FLOATS), "F32"), torch.float32)
    with staged_directory(out, if_exists="replace" if overwrite else "error", marker=EXPORT_MANIFEST,
                          protected=[folder]) as staging:
        names = ([SINGLE_FILE] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        for name, shard in zip(names, shards):
            _write_shard(staging / name, shard, dtype)
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(t.nbytes for t in kept)},
                     "weight_map": {t.out_name: name for name, shard in zip(names, shards) for t in shard}}
            (staging / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (staging / "config.json").write_text(json.dumps(edited, indent=2, sort_keys=True) + "\n")
        for name in COPIED_FILES:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, staging / name)
        plan.save(staging / PLAN_FILE)
        mode = _probe_memory(sum(t.nbytes for t in kept)) if verify is True else verify or None
        difference = None
        if mode:
            difference = _verify(folder, staging, plan, out_dtype, mode, layer_memory)
            if not difference <= tolerance(out_dtype):
                raise ExportError(f"the exported model's logits differ from the masked original by {difference:.3g}",
                                  hint="Nothing was written. Please report this with the plan and the model.")
        result = StreamExportResult(
            path=str(out), format="stock", parameters=parameters, planned_parameters=plan.parameters.remaining,
            bytes_on_disk=sum((staging / name).stat().st_size for name in names),
            files=sorted(p.name for p in staging.iterdir()) + ["README.md", EXPORT_MANIFEST],
            max_abs_logit_diff=difference, seconds=0.0, source=str(folder), dtype=str(out_dtype).removeprefix("torch."),
            tensors_kept=len(kept), tensors_removed=dropped, config_edits=edits, verified=mode)
        base = _Base(folder, model_type, count, total, fingerprint)
        result.seconds = time.perf_counter() - started
        (staging / "README.md").write_text(model_card(base, plan, result))  # type: ignore[arg-type]
        (staging / EXPORT_MANIFEST).write_text(json.dumps(
            {**result.model_dump(), "base_model": base.describe(), "players_removed": plan.player_names}, indent=2))
    return result


@dataclass
class _Base:
    """What the model card and manifest say about the source (a :class:`~cornerstone.loading.LoadedModel`
    describes a built model; this one was never built)."""

    folder: Path
    model_type: str
    num_hidden_layers: int
    parameters: int
    fingerprint: str
    source: str = "folder"

    @property
    def spec(self) -> str:
        return str(self.folder)

    def describe(self) -> dict[str, Any]:
        return {"spec": self.spec, "source": "folder", "location": str(os.path.abspath(self.folder)),
                "fingerprint": self.fingerprint, "model_type": self.model_type,
                "num_hidden_layers": self.num_hidden_layers, "parameters": self.parameters}
