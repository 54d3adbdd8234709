"""Prune a GGUF file directly: drop whole blocks, keep every other byte, check it in llama.cpp.

:func:`prune_gguf` is a block plan applied to a ``.gguf`` file without building the model. The
kept tensors' quantised bytes are copied as they are (same type, shape and data: no dequantise or
requantise); the removed blocks' ``blk.N.*`` tensors are dropped and the rest renumbered in order
(``blk.M`` becomes ``blk.<M less the removed blocks below M>``); ``{arch}.block_count`` is the new
count. Metadata follows one rule, decided per key:

- **sliced**: a key ``{arch}.<name>`` whose ``<name>`` is in :data:`PER_LAYER_KEYS` (the keys
  llama.cpp reads with ``get_key_or_arr`` into a per-layer array: head counts, KV head counts, FFN
  lengths, the sliding-window pattern) and whose value is an array of exactly ``block_count``
  entries. Such a key as a scalar applies to every layer and is kept as it is.
- **refused** (:class:`~cornerstone.errors.ExportError`): a key ``{arch}.<name>`` holding an array of
  ``block_count`` entries that is not in that list, since it may be per layer and a wrong guess
  either way is a different model; a per-layer key whose array has another length; a key in
  :data:`LAYER_INDEX_KEYS`, a scalar that names layers by their index (first dense layers, MTP
  layers at the end, an interleave step), which renumbering would silently move.
- **kept**: every other key, unchanged (type, value, order), whatever its length: the tokenizer's
  arrays are never per layer even when a vocabulary happens to have ``block_count`` entries.

The output also carries ``cornerstone.blocks_removed`` (the source's indices) and
``cornerstone.source_block_count``: llama.cpp ignores keys it does not know, and they mark the file
as one cornerstone wrote, the only kind ``overwrite=True`` replaces.

**Layer properties derived from the index.** Some architectures do not store which layers use a
sliding window; the runtime computes it from the layer index, so removing a block shifts it for
every later layer. :data:`ARCHITECTURES` lists what is supported and each one's rule, from
llama.cpp's sources (``src/llama-model.cpp``, ``load_hparams``; ``src/llama-hparams.cpp``):
``llama_hparams::set_swa_pattern(n)`` makes layer ``il`` sliding iff ``il % n < n - 1``;
``LLM_ARCH_GEMMA3`` calls ``set_swa_pattern(6)`` (every 6th layer global) and ``LLM_ARCH_GEMMA2``
``set_swa_pattern(2)``. The kind matters even for prompts shorter than the window: Gemma 3's sliding
layers also use another RoPE base (``rope_freq_base_train_swa = 10000``, global layers the file's
``rope.freq_base``). transformers' GGUF loader (``integrations/ggml.py``, ``gemma3``) maps no
pattern key: ``Gemma3TextConfig`` derives ``layer_types`` from ``sliding_window_pattern = 6`` the same way.

A plan that keeps every block's kind at its new index is written as is. One that does not needs the
kinds written out: llama.cpp reads ``{arch}.attention.sliding_window_pattern`` (one bool per layer,
true = sliding) over the derived pattern for ``gemma3``. The llama.cpp sources in the index that
call ``set_swa_pattern(6)`` read no such key, so this was measured on the runtime itself (xllamacpp
2026.10.11549, Gemma 3 270M Q4_K_M, 13-token probe): the file with the default pattern written
out gives the same log-probabilities as the original to every printed digit (-0.19112 for the top
token), a shifted pattern changes them (-0.24688), and an all-global array fails llama.cpp's
``GGML_ASSERT(hparams.is_swa_any())``: the key is read. So for ``gemma3`` the kept blocks' kinds are
written as that array and a note says that runtimes deriving the pattern from the index (older
llama.cpp builds, transformers' GGUF loader) run another model from it; ``portable=True`` refuses
such a plan instead. For ``gemma2`` nothing was measured, so a plan that shifts its pattern is refused.

**Sublayer plans** (an attention or FFN removed from a block that stays) have no form in a ``llama``
file; :func:`prune_gguf_sublayers` writes them as llama.cpp's ``deci`` architecture (per-layer head
counts and FFN widths; its rules and the two cases llama.cpp's deci code handles differently from the
masked model, with what is done about each, are in that function's docstring).

:func:`verify_in_llamacpp` runs a GGUF in llama.cpp (the optional ``xllamacpp`` package:
``pip install cornerstone[gguf]``) and :func:`check_against_masked` compares a pruned file with the
transformers model of the source GGUF under the plan's mask, against the same comparison before
pruning (the quantisation baseline).
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from .errors import (ConfigError, ExportError, ModelLoadError, ModelNotFoundError, OutputError, PlanError,
                     PlayerError, UnsupportedArchitectureError)
from .files import check_output, output_modes

if TYPE_CHECKING:
    from .planner import Plan

# Keys (after "{arch}.") that llama.cpp reads per layer when they are arrays (get_key_or_arr).
PER_LAYER_KEYS = ("attention.head_count", "attention.head_count_kv", "feed_forward_length",
                  "expert_feed_forward_length", "attention.sliding_window_pattern")
# Scalars (after "{arch}.") that name layers by index: renumbering would move what they point at.
LAYER_INDEX_KEYS = ("leading_dense_block_count", "nextn_predict_layers", "interleave_moe_layer_step",
                    "expert_layer_step", "full_attention_interval", "attention.shared_kv_layers",
                    "no_rope_layer_step", "dense_layer_step")
PATTERN_KEY = "attention.sliding_window_pattern"
MARKER_KEY = "cornerstone.blocks_removed"
SOURCE_BLOCKS_KEY = "cornerstone.source_block_count"
# a sublayer plan's removals, as player ids of the source (gguf cannot store an empty array, and a deci file
# may remove no whole block: this key then marks it as cornerstone's)
SUBLAYERS_KEY = "cornerstone.sublayers_removed"
INSTALL_HINT = "pip install cornerstone[gguf]"


@dataclass(frozen=True)
class GGUFArchitecture:
    """What cornerstone knows of one GGUF architecture: the period of the sliding-window pattern
    llama.cpp derives from the layer index (``set_swa_pattern(n)``), or None when nothing per layer is."""

    swa_period: int | None = None
    # whether llama.cpp reads {arch}.attention.sliding_window_pattern over the derived pattern (measured)
    reads_pattern_key: bool = False


ARCHITECTURES: dict[str, GGUFArchitecture] = {
    "llama": GGUFArchitecture(),  # also Mistral and SmolLM2; sliding windows, where any, apply to every layer
    "qwen2": GGUFArchitecture(),
    "qwen3": GGUFArchitecture(),
    "gemma": GGUFArchitecture(),
    "gemma2": GGUFArchitecture(swa_period=2),
    "gemma3": GGUFArchitecture(swa_period=6, reads_pattern_key=True),
}


class GGUFExportResult(BaseModel):
    """What :func:`prune_gguf` wrote and the numbers that check it."""

    path: str
    source: str
    architecture: str
    blocks_original: int
    blocks_removed: list[int]
    blocks_kept: int
    tensors_removed: int
    tensors_kept: int
    removed_tensor_bytes: int  # the removed tensors' data, each padded to the file's alignment
    source_bytes: int
    bytes_on_disk: int
    metadata_bytes_change: int  # data offset of the output less the source's: header, tensor infos, keys
    sliced_keys: list[str]
    notes: list[str] = []

    alignment: int
    size_accounted: bool  # see :func:`size_accounted`
    sublayers_removed: list[str] = []  # sublayer plans (:func:`prune_gguf_sublayers`): the half-blocks removed
    added_tensor_bytes: int = 0  # tensors written that the source has not (the null FFNs of a deci file), padded
    check: GGUFCheck | None = None  # llama.cpp against the masked model, when prune_gguf was given a probe


def size_accounted(source_bytes: int, removed_tensor_bytes: int, metadata_bytes_change: int, bytes_on_disk: int,
                   alignment: int, added_tensor_bytes: int = 0) -> bool:
    """Whether the output is the source less the removed tensors' padded bytes, plus the added ones and the
    header change, to the byte, but for the padding after the last tensor (gguf's writer pads it; a source
    file may not have)."""
    expected = source_bytes - removed_tensor_bytes + added_tensor_bytes + metadata_bytes_change
    return abs(bytes_on_disk - expected) < alignment


def _reader(source: Path) -> Any:
    """``gguf.GGUFReader`` of ``source``, or a one-line error: missing (3), not a GGUF (4)."""
    import gguf

    if not source.is_file():
        raise ModelNotFoundError(f"GGUF file '{source}' does not exist", hint="Give the path of a .gguf file.")
    try:
        return gguf.GGUFReader(source)
    except (ValueError, OSError, IndexError, KeyError, TypeError, AssertionError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelLoadError(f"'{source}' is not a readable GGUF file ({first})",
                             hint="Give a .gguf file from llama.cpp's converter; re-download a truncated one.") from None


def _scalar(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _blocks_of(plan: "Plan | Collection[int]") -> set[int]:
    """The blocks a plan removes; a plan that removes half of some block needs a sublayer format."""
    from .planner import Plan
    from .players import removed_blocks

    if not isinstance(plan, Plan):
        blocks = set(plan)
        if not all(isinstance(b, int) and not isinstance(b, bool) for b in blocks):
            raise PlanError(f"block indices must be integers, not {sorted(map(repr, blocks))[:3]}")
        return blocks
    blocks = removed_blocks(plan.removed)
    partial = sorted({r.name for r in plan.removed if r.layer not in blocks})
    if partial:
        raise ExportError(f"the plan removes sublayers ({', '.join(partial[:3])}) that leave their block in place; "
                          "a GGUF keeps or drops whole blocks",
                          hint="Plan with --granularity block, or export the sublayer plan with --format decilm.")
    return blocks


def _open(source: Path, plan: "Plan | Collection[Any] | str | Path",
          allow_other_model: bool) -> tuple[Any, "Plan | Collection[Any]", str, int]:
    """The reader of ``source``, the plan (loaded when given as a YAML path, checked to be the source's unless
    ``allow_other_model``), the file's architecture and block count; one-line errors for what is missing."""
    import gguf

    from .planner import Plan

    if isinstance(plan, (str, Path)):
        plan = Plan.load(plan)
    reader = _reader(source)
    if isinstance(plan, Plan) and not allow_other_model:
        check_plan_source(plan, source)
    arch = _scalar(reader, gguf.Keys.General.ARCHITECTURE)
    if not isinstance(arch, str):
        raise ModelLoadError(f"'{source}' names no general.architecture",
                             hint="Re-convert it with llama.cpp's converter.")
    count = _scalar(reader, f"{arch}.block_count")
    if not isinstance(count, int) or count < 1:
        raise ExportError(f"'{source}' has no {arch}.block_count, so it has no blocks to remove",
                          hint="Give the GGUF of a decoder model (one with blk.N.* tensors).")
    return reader, plan, arch, count


def _check_layers(layers: Collection[int], count: int, source: Path) -> None:
    if not set(layers) <= set(range(count)):
        missing = sorted(set(layers) - set(range(count)))
        raise PlanError(f"blocks {missing} do not exist: '{source}' has blk.0..blk.{count - 1}",
                        hint="Use a plan made for this model.")


def check_plan_source(plan: "Plan", source: Path) -> None:
    """Refuse (:class:`PlanError`) a plan made for another model than ``source``: its fingerprint must be
    ``gguf-sha256:<sha256 of source>``, the fingerprint :func:`~cornerstone.loading.load_model` gives a GGUF."""
    from .loading import content_sha256

    fingerprint = (plan.model.get("fingerprint") or "").strip()
    actual = f"gguf-sha256:{content_sha256(source)}"
    if fingerprint != actual:
        made_for = plan.model.get("spec") or fingerprint or "an unnamed model"
        raise PlanError(f"the plan was made for {made_for}, not for '{source}' ({actual[:24]}...)",
                        hint="Export the GGUF the plan was made for (or pass --allow-other-model to apply it anyway).")


def swa_shift(architecture: str, count: int, removed: Collection[int]) -> tuple[int, int] | None:
    """The first kept block whose sliding/global kind the runtime would change after ``removed`` go, as
    ``(old index, new index)``; None when every kept block keeps its kind (or the architecture has no pattern)."""
    period = ARCHITECTURES[architecture].swa_period
    if period is None:
        return None
    kept = [index for index in range(count) if index not in removed]
    for new, old in enumerate(kept):
        if (old % period < period - 1) != (new % period < period - 1):
            return old, new
    return None


def _metadata(reader: Any, arch: str, count: int, keep: list[int]) -> tuple[list[tuple[str, Any, Any, Any]], list[str]]:
    """Every key of ``reader`` as ``(key, value, type, sub_type)`` for the writer, with block_count and the
    per-layer arrays rewritten (the rule in the module docstring); and the names of the sliced keys."""
    import gguf

    prefix = f"{arch}."
    fields, sliced = [], []
    for field in reader.fields.values():
        # the writer adds the virtual GGUF.* fields and general.architecture itself
        if field.name.startswith("GGUF.") or field.name == gguf.Keys.General.ARCHITECTURE:
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        name = field.name[len(prefix):] if field.name.startswith(prefix) else None
        if name == "block_count":
            value = len(keep)
        elif name in LAYER_INDEX_KEYS:
            raise ExportError(f"'{field.name}' names layers by their index ({value!r}); removing blocks moves them",
                              hint="cornerstone cannot renumber this key; prune the transformers checkpoint instead.")
        elif name is not None and vtype == gguf.GGUFValueType.ARRAY:
            if name in PER_LAYER_KEYS:
                if len(value) != count:
                    raise ExportError(f"'{field.name}' has {len(value)} entries but {prefix}block_count is {count}",
                                      hint="The file contradicts itself; re-convert it with llama.cpp's converter.")
                value = [value[i] for i in keep]
                sliced.append(field.name)
            elif len(value) == count:
                raise ExportError(f"'{field.name}' has one entry per block ({count}) but is not a key cornerstone "
                                  "knows to be per layer", hint="Please report it with the file's `gguf-dump` output; "
                                  "slicing or keeping it could give another model.")
        fields.append((field.name, value, vtype, sub_type))
    return fields, sliced


def _tensor_block(name: str) -> int | None:
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) > 2 and parts[1].isdigit():
        return int(parts[1])
    return None


def _padded(size: int, alignment: int) -> int:
    return -(-size // alignment) * alignment


def _check_target(out: Path, source: Path, overwrite: bool) -> None:
    """The output rules of :func:`~cornerstone.files.check_output`, for a file: never the source itself,
    never an existing path unless ``overwrite``, and then only a regular file cornerstone wrote
    (a GGUF holding :data:`MARKER_KEY`): a user's file or the model itself is never replaced."""
    if not (overwrite and os.path.lexists(out)):
        check_output(out, overwrite=False, protected=[source])
        return
    hint = f"--overwrite replaces only a GGUF cornerstone wrote (one holding {MARKER_KEY}); choose another --out."
    if out.is_symlink() or not out.is_file():
        raise OutputError(f"'{out}' is not a file cornerstone wrote", hint=hint)
    if os.path.samefile(out, source):
        raise OutputError(f"--out '{out}' is the model being read ('{source}')",
                          hint="Write the pruned GGUF to a file of its own.")
    try:
        marked = not {MARKER_KEY, SUBLAYERS_KEY}.isdisjoint(_reader(out).fields)
    except (ModelLoadError, ModelNotFoundError):
        marked = False
    if not marked:
        raise OutputError(f"'{out}' is not a GGUF cornerstone wrote (it has no {MARKER_KEY})", hint=hint)


@contextlib.contextmanager
def _staged_file(target: Path) -> Iterator[Path]:
    """A hidden file beside ``target``, renamed onto it only when the block succeeds (removed otherwise);
    it gets the mode the umask gives, like every cornerstone output."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f".{target.name}-partial-{os.getpid()}-", dir=target.parent)
        os.close(handle)
    except OSError as exc:
        raise OutputError(f"cannot write beside '{target}': {exc.strerror or exc}") from exc
    staging = Path(name)
    try:
        yield staging
        os.chmod(staging, output_modes()[1])
        os.replace(staging, target)
    except BaseException as exc:
        staging.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write '{target}': {exc.strerror or exc}",
                              hint="Nothing was left behind; free space or choose another --out.") from exc
        raise


def _kept_blocks(count: int, removed: Collection[int]) -> list[int]:
    keep = [index for index in range(count) if index not in removed]
    if not keep:
        raise PlanError(f"a plan cannot remove every block ({count} of {count})", hint="Lower --drop.")
    return keep


def _split_tensors(reader: Any, source: Path, arch: str, keep: list[int],
                   dropped: Callable[[int | None, str], bool]) -> tuple[list[tuple[str, Any, Any, Any]], list[Any]]:
    """The source's tensors as ``(kept, removed)``: ``dropped(block, part)`` (block None outside ``blk.N.*``,
    part the name after ``blk.N.``) says which go; kept ones are renumbered to their block's index in
    ``keep`` and given as :func:`_write` takes them, data and type as stored."""
    count = _scalar(reader, f"{arch}.block_count")
    renumber = {old: new for new, old in enumerate(keep)}
    kept, removed = [], []
    for tensor in reader.tensors:
        block = _tensor_block(tensor.name)
        if block is not None and block >= count:
            raise ModelLoadError(f"'{source}' holds tensor {tensor.name} but {arch}.block_count is {count}",
                                 hint="The file contradicts itself; re-convert it.")
        part = "" if block is None else tensor.name.split(".", 2)[2]
        if dropped(block, part):
            removed.append(tensor)
            continue
        name = tensor.name if block is None else f"blk.{renumber[block]}.{part}"
        kept.append((name, tensor.data, tensor.tensor_type, reader.endianess))
    return kept, removed


def _write(out: Path, reader: Any, arch: str, fields: list[tuple[str, Any, Any, Any]],
           tensors: list[tuple[str, Any, Any, Any]],
           check: "Callable[[Path], GGUFCheck] | None") -> tuple[int, "GGUFCheck | None"]:
    """Write ``fields`` (``(key, value, type, sub_type)``) and ``tensors`` (``(name, data, GGML type,
    endianness)``: data as the reader gives it, quantised ones as raw bytes) to a staged file with the
    source's alignment, run ``check`` on it, and only then put it in place at ``out``.
    Returns the written file's data offset and the check; a failed check is an :class:`ExportError`."""
    import gguf

    with _staged_file(out) as staging:
        writer = gguf.GGUFWriter(staging, arch, endianess=reader.endianess)
        writer.data_alignment = _alignment(reader)
        for key, value, vtype, sub_type in fields:
            writer.add_key_value(key, value, vtype, sub_type=sub_type)
        for name, data, tensor_type, _ in tensors:
            # the raw bytes and the GGML type as stored: shape in elements comes from the type's block size
            writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes, tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, data, _, endianness in tensors:
            writer.write_tensor_data(data, tensor_endianess=endianness)
        writer.close()
        written = _reader(staging)
        data_offset = int(written.data_offset)
        del written
        result = None if check is None else check(staging)
        if result is not None and not result.passed:
            raise ExportError(f"llama.cpp's log-probabilities on the pruned file differ from the masked model by "
                              f"{result.pruned_gap:.3g} nats, beyond {result.bound:.3g} ({result.factor:g} x the unpruned "
                              f"gap {result.baseline_gap:.3g} + {result.slack:g})",
                              hint="Nothing was written. Please report this with the plan and the source GGUF.")
    return data_offset, result


def _alignment(reader: Any) -> int:
    import gguf

    return int(_scalar(reader, gguf.Keys.General.ALIGNMENT) or gguf.GGUF_DEFAULT_ALIGNMENT)


def _sizes(source: Path, out: Path, reader: Any, data_offset: int, removed: Sequence[Any],
           added: Sequence[Any] = ()) -> dict[str, int]:
    """The byte counts of :class:`GGUFExportResult` (tensor data padded to the alignment, as gguf stores it)."""
    alignment = _alignment(reader)
    sizes = dict(source_bytes=source.stat().st_size, bytes_on_disk=out.stat().st_size, alignment=alignment,
                 removed_tensor_bytes=sum(_padded(int(t.n_bytes), alignment) for t in removed),
                 metadata_bytes_change=data_offset - int(reader.data_offset))
    if added:
        sizes["added_tensor_bytes"] = sum(_padded(int(data.nbytes), alignment) for data in added)
    return sizes


def _explicit_pattern(reader: Any, arch: str, count: int, removed: Collection[int],
                      portable: bool) -> tuple[list[bool] | None, list[str]]:
    """The sliding-window pattern to write for the kept blocks when the runtime would derive another one
    from their new indices (module docstring), with the note that goes with it; (None, []) when none is needed.
    A pattern the runtime cannot be told, or one ``portable`` forbids, is an :class:`ExportError`."""
    shift = swa_shift(arch, count, removed)
    if shift is None or f"{arch}.{PATTERN_KEY}" in reader.fields:  # a stored pattern is sliced with the rest
        return None, []
    old, new = shift
    period = ARCHITECTURES[arch].swa_period
    kind = "sliding-window" if old % period < period - 1 else "global"
    problem = (f"{arch} derives sliding/global attention from the layer index (every {period}th global): removing "
               f"{sorted(removed)} moves {kind} block {old} to index {new}")
    keeps_kinds = (f"Remove blocks so that each kept block lands on an index of its kind (whole runs of {period}, "
                   "or blocks after the last global one)")
    if not ARCHITECTURES[arch].reads_pattern_key:
        raise ExportError(f"{problem}, and llama.cpp cannot be told so for {arch}", hint=keeps_kinds + ".")
    if portable:
        raise ExportError(f"{problem}; only runtimes that read {arch}.{PATTERN_KEY} would run it as planned",
                          hint=keeps_kinds + ", or drop the portable option to write the pattern.")
    pattern = [index % period < period - 1 for index in range(count) if index not in removed]
    return pattern, [f"{problem}: the kept blocks' kinds are written as {arch}.{PATTERN_KEY}, which llama.cpp "
                     "reads (measured with xllamacpp 2026.10); runtimes that derive the pattern from the index "
                     "(older llama.cpp, transformers' GGUF loader) run another model from this file."]


def prune_gguf(source: str | Path, plan: "Plan | Collection[int] | str | Path", out: str | Path, *,
               overwrite: bool = False, allow_other_model: bool = False, portable: bool = False,
               probe: str | None = None) -> GGUFExportResult:
    """Write ``source`` without the blocks ``plan`` removes to ``out`` (rules: module docstring).

    ``plan`` is a :class:`~cornerstone.planner.Plan` (or its YAML path), whose fingerprint must be the
    source's unless ``allow_other_model``, or a set of block indices. ``source`` is never written;
    ``out`` appears complete or not at all. ``portable`` refuses a plan whose layer pattern only
    runtimes reading an explicit pattern key would follow (module docstring). With a ``probe`` text the
    written file is checked in llama.cpp (:func:`check_against_masked`) before it is put in place; a
    failed check is an :class:`ExportError` and leaves nothing.
    """
    import gguf

    source, out = Path(source), Path(out)
    reader, plan, arch, count = _open(source, plan, allow_other_model)
    removed = _blocks_of(plan)
    if arch not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"GGUF architecture '{arch}' is not one cornerstone prunes",
            hint="Supported: " + ", ".join(sorted(ARCHITECTURES)) + "; others need their per-layer rules checked "
            "in llama.cpp first (a row in cornerstone/gguf_export.py).")
    _check_layers(removed, count, source)
    keep = _kept_blocks(count, removed)
    fields, sliced = _metadata(reader, arch, count, keep)
    pattern, notes = _explicit_pattern(reader, arch, count, removed, portable)
    _check_target(out, source, overwrite)
    kept, removed_tensors = _split_tensors(reader, source, arch, keep, lambda block, part: block in removed)
    extra = [(MARKER_KEY, sorted(removed), gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32),
             (SOURCE_BLOCKS_KEY, count, gguf.GGUFValueType.UINT32, None)]
    if pattern is not None:
        extra.insert(0, (f"{arch}.{PATTERN_KEY}", pattern, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.BOOL))
    data_offset, check = _write(out, reader, arch, fields + extra, kept, None if probe is None else
                                lambda staging: check_against_masked(source, staging, removed, probe))

    sizes = _sizes(source, out, reader, data_offset, removed_tensors)
    return GGUFExportResult(
        path=str(out), source=str(source), architecture=arch, blocks_original=count, blocks_removed=sorted(removed),
        blocks_kept=len(keep), tensors_removed=len(removed_tensors), tensors_kept=len(kept), sliced_keys=sliced,
        notes=notes, size_accounted=size_accounted(**sizes), check=check, **sizes)


# --- sublayer plans: llama.cpp's deci architecture -------------------------------------------------

# the deci (DeciLM / Nemotron-NAS) graph in llama.cpp: per layer, head_count 0 skips attention, and
# feed_forward_length 0 skips the *whole* layer (see prune_gguf_sublayers); a null FFN has this width
NULL_FFN_WIDTH = 1
# the source architectures whose GGUF becomes a deci file: deci's graph is Llama's (RMS norms, SiLU-gated
# FFN, normal RoPE) with per-layer head counts and FFN widths
DECI_SOURCES = ("llama",)
_PER_LAYER_HEADS = ("attention.head_count", "attention.head_count_kv")


@dataclass(frozen=True)
class _Removal:
    layer: int
    kind: str


def _removals(plan: "Plan | Collection[str]") -> list[Any]:
    """The plan's removals, each with ``.layer`` and ``.kind``: a plan's own, or parsed from player ids."""
    from .planner import Plan
    from .players import _PLAYER_ID

    if isinstance(plan, Plan):
        return list(plan.removed)
    removals = []
    for name in plan:
        match = _PLAYER_ID.match(name) if isinstance(name, str) else None
        if match is None:
            raise PlayerError(f"'{name}' is not a player id")
        removals.append(_Removal(int(match.group(1)), match.group(2) or "block"))
    return removals


def _null_ffn(block: int, width: int) -> list[tuple[str, Any]]:
    """An FFN of :data:`NULL_FFN_WIDTH` that adds exactly zero: gate, up and down are zero (silu(0) * 0 = 0,
    and a zero projection of it is zero); F32, so no quantisation block size applies. numpy shapes are
    ggml's reversed: ffn_gate/up are {width, 1}, ffn_down {1, width} in ggml terms."""
    import numpy as np

    return [(f"blk.{block}.ffn_norm.weight", np.ones(width, dtype=np.float32)),
            (f"blk.{block}.ffn_gate.weight", np.zeros((NULL_FFN_WIDTH, width), dtype=np.float32)),
            (f"blk.{block}.ffn_up.weight", np.zeros((NULL_FFN_WIDTH, width), dtype=np.float32)),
            (f"blk.{block}.ffn_down.weight", np.zeros((width, NULL_FFN_WIDTH), dtype=np.float32))]


def _deci_metadata(fields: list[tuple[str, Any, Any, Any]], sliced: list[str], source: Path, keep: list[int],
                   no_attention: set[int], no_ffn: set[int]) -> tuple[list[tuple[str, Any, Any, Any]], list[str]]:
    """``fields`` of a pruned llama file (blocks already dropped, arrays sliced) as deci's: every ``llama.*``
    key renamed, head counts and FFN widths written per layer (0 heads for a removed attention, the null
    FFN's width for a removed FFN), and the head size written out, since llama.cpp otherwise derives it
    from layer 0's head count, which may now be 0 (the converter's DeciModel writes it too)."""
    import gguf

    values = {key: value for key, value, _, _ in fields}
    if values.get("llama.expert_count"):
        raise ExportError(f"'{source}' is a mixture-of-experts llama file (llama.expert_count = "
                          f"{values['llama.expert_count']}); llama.cpp's deci graph has no experts",
                          hint="Plan at block granularity (--granularity block) to export this model as GGUF; a Gemma 3 "
                          "sublayer plan exports as safetensors (--format safetensors) for transformers.")
    per_layer: dict[str, list[int]] = {}
    for name in (*_PER_LAYER_HEADS, "feed_forward_length"):
        value = values.get(f"llama.{name}")
        if value is None:
            raise ExportError(f"'{source}' has no llama.{name}", hint="Re-convert it with llama.cpp's converter.")
        per_layer[name] = list(value) if isinstance(value, list) else [value] * len(keep)
    for new, old in enumerate(keep):
        if old in no_attention:
            for name in _PER_LAYER_HEADS:
                per_layer[name][new] = 0
        if old in no_ffn:
            per_layer["feed_forward_length"][new] = NULL_FFN_WIDTH
    heads = set(values["llama.attention.head_count"]) if isinstance(values["llama.attention.head_count"], list) \
        else {values["llama.attention.head_count"]}
    head_size = {}
    if "llama.attention.key_length" not in values or "llama.attention.value_length" not in values:
        if len(heads - {0}) != 1 or not isinstance(values.get("llama.embedding_length"), int):
            raise ExportError(f"'{source}' gives no llama.attention.key_length and its head counts {sorted(heads)} "
                              "do not determine one", hint="Re-convert it with llama.cpp's converter.")
        size = values["llama.embedding_length"] // max(heads)
        head_size = {"attention.key_length": size, "attention.value_length": size}
    out = []
    for key, value, vtype, sub_type in fields:
        if key.startswith("llama."):
            name = key[len("llama."):]
            key = f"deci.{name}"
            if name in per_layer:
                value, vtype, sub_type = per_layer.pop(name), gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32
        out.append((key, value, vtype, sub_type))
    out += [(f"deci.{name}", size, gguf.GGUFValueType.UINT32, None) for name, size in head_size.items()
            if f"llama.{name}" not in values]
    renamed = sorted({f"deci.{key[len('llama.'):]}" for key in sliced} |
                     {f"deci.{name}" for name in (*_PER_LAYER_HEADS, "feed_forward_length")})
    return out, renamed


def prune_gguf_sublayers(source: str | Path, plan: "Plan | Collection[str] | str | Path", out: str | Path, *,
                         overwrite: bool = False, allow_other_model: bool = False, portable: bool = False,
                         probe: str | None = None) -> GGUFExportResult:
    """Write ``source`` without the players ``plan`` removes, attention and FFN sublayers included, to ``out``.

    ``plan`` is a :class:`~cornerstone.planner.Plan` (or its YAML path; fingerprint as in :func:`prune_gguf`)
    or player ids (``L5.attn``, ``L5.mlp``, ``L5``). A plan that removes only whole blocks (a block, or
    both its halves) is a block plan and :func:`prune_gguf` writes it, architecture unchanged. Otherwise
    the source must be a ``llama`` file, and the output is llama.cpp's ``deci`` architecture (the
    DeciLM / Nemotron-NAS graph, ``src/models/deci.cpp``; its loader in ``src/llama-model.cpp``):

    - ``general.architecture`` is ``deci`` and every ``llama.*`` key is renamed ``deci.*``, values kept
      (deci reads the same keys: RMS epsilon, RoPE base and dimensions, context length);
    - emptied blocks are dropped and the rest renumbered, per-layer arrays sliced, as :func:`prune_gguf` does;
    - ``deci.attention.head_count`` and ``head_count_kv`` become per-layer arrays, 0 where attention is
      removed; that layer's ``attn_norm``/``attn_q``/``attn_k``/``attn_v``/``attn_output`` (and any attention
      bias) are dropped: llama.cpp's loader creates them only where ``head_count_kv > 0``, and its graph
      passes the residual stream through (``cur = inpL``);
    - ``deci.feed_forward_length`` becomes a per-layer array. A removed FFN is **not** written as 0:
      llama.cpp's deci graph ``continue``s past a layer whose width is 0 before adding the attention
      output to the residual stream, so that layer's attention would be dropped too (its loader then
      also drops the FFN tensors). Measured with xllamacpp 2026.10 on SmolLM2 (L12.mlp removed): the file
      with width 0 agrees with the model without the whole block L12 (gap 0.39 nats), not with the one
      without L12.mlp (2.6). So a removed FFN is written as a null FFN: width :data:`NULL_FFN_WIDTH`,
      zero F32 weights (:func:`_null_ffn`, 9 KiB for SmolLM2), which adds exactly 0; its quantised
      tensors are dropped.
    - every other tensor's quantised bytes are copied as they are; ``deci.attention.key_length`` and
      ``value_length`` are written when the source leaves them to be derived;
    - ``cornerstone.sublayers_removed`` lists the removed halves (source player ids),
      ``cornerstone.blocks_removed`` the emptied blocks (when any).

    Refused (:class:`ExportError`): a source of another architecture (deci is Llama's graph), a
    mixture-of-experts llama file (deci has no experts), and a plan whose first kept block loses its
    attention: llama.cpp's ``load_hparams`` reads the head size only ``if (hparams.n_head() > 0)``, which
    is layer 0's count, so such a file fails to load (measured: ``check_tensor_dims`` expects ``attn_q``
    of ``{n_embd, 0}``), whatever ``key_length`` says. ``portable`` is passed to :func:`prune_gguf` for
    block plans; a deci file runs in llama.cpp and what is built on it (Ollama, LM Studio), not in
    transformers' GGUF loader, which has no deci. With a ``probe``, the file is checked in llama.cpp
    against the source's float model with the same players masked (:func:`check_against_masked`).
    """
    import gguf

    from .players import removed_blocks

    source, out = Path(source), Path(out)
    reader, plan, arch, count = _open(source, plan, allow_other_model)
    removals = _removals(plan)
    blocks = removed_blocks(removals)
    halves = [r for r in removals if r.layer not in blocks]
    if not halves:
        return prune_gguf(source, blocks, out, overwrite=overwrite, portable=portable, probe=probe)
    if arch not in DECI_SOURCES:
        raise ExportError(f"the plan removes sublayers (L{halves[0].layer}.{halves[0].kind}, ...) and '{source}' is a "
                          f"{arch} file: only llama files have a GGUF form for that (llama.cpp's deci)",
                          hint="Plan at block granularity (--granularity block) to export this model as GGUF; a Gemma 3 "
                          "sublayer plan exports as safetensors (--format safetensors) for transformers.")
    _check_layers({r.layer for r in removals}, count, source)
    no_attention = {r.layer for r in halves if r.kind == "attn"}
    no_ffn = {r.layer for r in halves if r.kind == "mlp"}
    names = sorted({f"L{r.layer}.{r.kind}" for r in halves}, key=lambda name: [int(name[1:].split(".")[0]), name])
    keep = _kept_blocks(count, blocks)
    if keep[0] in no_attention:
        # load_hparams reads the head size (key_length) only `if (hparams.n_head() > 0)`, i.e. layer 0's count;
        # measured: check_tensor_dims then expects attn_q of {n_embd, 0} in the next layer and the file fails to load
        raise ExportError(f"the plan removes L{keep[0]}.attn, which would be the first layer of the GGUF: llama.cpp "
                          "takes the head size from its first layer's heads, so a deci file without attention there "
                          "does not load", hint=f"Plan with --keep L{keep[0]}.attn (or at block granularity).")
    fields, sliced = _metadata(reader, arch, count, keep)
    fields, sliced = _deci_metadata(fields, sliced, source, keep, no_attention, no_ffn)
    _check_target(out, source, overwrite)

    def dropped(block: int | None, part: str) -> bool:
        return block in blocks or (block in no_attention and part.startswith("attn_")) or \
            (block in no_ffn and part.startswith("ffn_"))

    kept, removed_tensors = _split_tensors(reader, source, arch, keep, dropped)
    renumber = {old: new for new, old in enumerate(keep)}
    width = _scalar(reader, "llama.embedding_length")
    if not isinstance(width, int):
        raise ExportError(f"'{source}' has no llama.embedding_length", hint="Re-convert it with llama.cpp's converter.")
    added = [item for block in sorted(no_ffn) for item in _null_ffn(renumber[block], width)]
    marks = [(SUBLAYERS_KEY, names, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING),
             (SOURCE_BLOCKS_KEY, count, gguf.GGUFValueType.UINT32, None)]
    if blocks:
        marks.insert(0, (MARKER_KEY, sorted(blocks), gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32))
    tensors = kept + [(name, data, gguf.GGMLQuantizationType.F32, None) for name, data in added]
    data_offset, check = _write(out, reader, "deci", fields + marks, tensors, None if probe is None else
                                lambda staging: check_against_masked(source, staging, blocks, probe, sublayers=names))
    notes = ["Written as llama.cpp's deci architecture (per-layer head counts and FFN widths): it runs in llama.cpp "
             "and runtimes built on it (Ollama, LM Studio); transformers' GGUF loader has no deci."]
    if no_ffn:
        notes.append(f"Blocks {sorted(renumber[b] for b in no_ffn)} (source {sorted(no_ffn)}) keep attention without "
                     f"their FFN: each carries a null FFN of width {NULL_FFN_WIDTH} (zero weights, adds exactly 0), "
                     "since llama.cpp's deci graph skips a layer of FFN width 0 whole, its attention included.")
    sizes = _sizes(source, out, reader, data_offset, removed_tensors, [data for _, data in added])
    return GGUFExportResult(
        path=str(out), source=str(source), architecture="deci", blocks_original=count, blocks_removed=sorted(blocks),
        blocks_kept=len(keep), tensors_removed=len(removed_tensors), tensors_kept=len(kept), sliced_keys=sliced,
        notes=notes, size_accounted=size_accounted(**sizes), check=check, sublayers_removed=names, **sizes)


# --- verification in llama.cpp -------------------------------------------------------------------

# The pruned gap may be this many times the baseline gap (plus ABSOLUTE_SLACK nats): see GGUFCheck.
GAP_FACTOR = 2.0
ABSOLUTE_SLACK = 0.05


class GGUFCheck(BaseModel):
    """llama.cpp against transformers on one probe, before and after pruning.

    A gap is the largest |log p_llama.cpp(t) - log p_transformers(t)| over every probe position and
    the ``top_k`` tokens llama.cpp ranks highest there. The baseline gap (source GGUF in llama.cpp vs
    its dequantised float model) is what quantised compute alone costs; the pruned gap (pruned GGUF vs
    the float model with the plan's blocks masked) must stay within ``factor`` x baseline + ``slack``.
    Why 2: the pruned file computes with a subset of the same quantised layers, so its error has the
    same sources, but removing blocks changes how the remaining error is amplified downstream (a
    less confident distribution moves more per nat of hidden-state error); a wrong cut is another
    model, whose gap (``control_gap``: pruned GGUF vs the unmasked float model) is many times larger.
    The slack covers a baseline so small that float summation order alone exceeds twice it.
    """

    source: str
    pruned: str
    blocks_removed: list[int]
    sublayers_removed: list[str] = []  # masked as well (player ids of the source, e.g. L5.attn)
    probe_tokens: int
    top_k: int
    baseline_gap: float
    pruned_gap: float
    control_gap: float
    factor: float
    slack: float
    bound: float
    passed: bool
    top1_agreement_baseline: float
    top1_agreement_pruned: float
    runtime: str


def _llamacpp_worker() -> None:
    """Child process: run llama.cpp on the request read from stdin and print the log-probabilities as JSON.
    A separate process because llama.cpp aborts the whole process on a file it cannot load (GGML_ASSERT)."""
    import json
    import sys

    import xllamacpp

    request = json.load(sys.stdin)
    params = xllamacpp.CommonParams()
    params.model.path = request["path"]
    params.n_ctx = max(64, len(request["ids"]) + 8)
    params.n_parallel = 1
    params.warmup = False
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = request["threads"]
    server = xllamacpp.Server(params)
    rows = []
    for end in range(1, len(request["ids"]) + 1):
        # one position per call: the server reports log-probabilities for generated tokens only; the shared
        # prefix stays in its cache, so each call evaluates one new token
        reply = server.handle_completions({"prompt": request["ids"][:end], "n_predict": 1, "n_probs": request["top_k"],
                                           "temperature": 0.0, "samplers": [], "cache_prompt": True})
        if "error" in reply:
            raise SystemExit(f"llama.cpp: {reply['error']}")
        top = reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        rows.append({str(item["id"]): item["logprob"] for item in top})
    json.dump({"rows": rows, "version": xllamacpp.__version__}, sys.stdout)


def verify_in_llamacpp(gguf_path: str | Path, probe: Sequence[int], *, top_k: int = 10,
                       threads: int | None = None, timeout: float = 900.0) -> tuple[list[dict[int, float]], str]:
    """llama.cpp's next-token log-probabilities on ``probe`` (token ids): for each prefix ``probe[:p]``,
    p = 1..len(probe), the ``top_k`` most likely next tokens and their log-probabilities (full softmax).
    Returns the rows and the runtime's version. Runs in a child process (:func:`_llamacpp_worker`); a file
    llama.cpp cannot load is an :class:`ExportError` quoting llama.cpp's own reason."""
    import importlib.util
    import json
    import subprocess
    import sys

    if importlib.util.find_spec("xllamacpp") is None:
        raise ConfigError("checking a GGUF in llama.cpp needs the xllamacpp package, which is not installed",
                          hint=f"Install it: {INSTALL_HINT}")
    request = {"path": str(gguf_path), "ids": [int(i) for i in probe], "top_k": int(top_k),
               "threads": int(threads or min(4, os.cpu_count() or 1))}
    # the child imports this very package, wherever it was imported from here
    package_root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "cornerstone.gguf_export"], input=json.dumps(request),
                          capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines()
                 if any(word in line for word in ("error", "failed", "llama.cpp:", "GGML_ASSERT"))]
        reason = (lines[-1] if lines else f"exit status {done.returncode}").strip()
        raise ExportError(f"llama.cpp cannot run '{gguf_path}': {reason}",
                          hint="llama.cpp does not run this file; please report it with the plan and the source GGUF.")
    reply = json.loads(done.stdout)
    rows = [{int(token): value for token, value in row.items()} for row in reply["rows"]]
    return rows, f"xllamacpp {reply['version']}"


def _gap(llama_rows: list[dict[int, float]], logprobs: Any) -> tuple[float, float]:
    """(max |difference| over positions and llama.cpp's top tokens, share of positions with the same top token)."""
    worst, same = 0.0, 0
    for position, row in enumerate(llama_rows):
        reference = logprobs[position]
        worst = max(worst, max(abs(value - float(reference[token])) for token, value in row.items()))
        same += max(row, key=row.__getitem__) == int(reference.argmax())
    return worst, same / len(llama_rows)


def check_against_masked(source: str | Path, pruned: str | Path, blocks: Collection[int], probe_text: str, *,
                         sublayers: Collection[str] = (), top_k: int = 10, factor: float = GAP_FACTOR,
                         slack: float = ABSOLUTE_SLACK, threads: int | None = None) -> GGUFCheck:
    """Compare ``pruned`` in llama.cpp with the transformers model of ``source`` (dequantised, float32)
    with ``blocks`` and the ``sublayers`` (player ids such as ``L5.attn``) masked, against the unpruned
    baseline (rules: :class:`GGUFCheck`). The probe is tokenised by the source's tokenizer and the same
    ids go to both runtimes."""
    import torch

    from .loading import load_model
    from .masking import without
    from .players import parse_players

    loaded = load_model(str(source), dtype="float32", device="cpu")
    ids = [int(i) for i in loaded.tokenizer(probe_text)["input_ids"]]
    if len(ids) < 2:
        raise ConfigError(f"the probe text gives {len(ids)} token(s); the check needs at least 2",
                          hint="Give a sentence or two as the probe.")
    tensor = torch.tensor([ids])
    with torch.no_grad():
        full = torch.log_softmax(loaded.model(tensor).logits[0].float(), dim=-1)
        with without(loaded.model, parse_players(loaded.model, [f"L{b}" for b in sorted(blocks)] + list(sublayers))):
            masked = torch.log_softmax(loaded.model(tensor).logits[0].float(), dim=-1)
    del loaded
    source_rows, runtime = verify_in_llamacpp(source, ids, top_k=top_k, threads=threads)
    pruned_rows, _ = verify_in_llamacpp(pruned, ids, top_k=top_k, threads=threads)
    baseline, agree_baseline = _gap(source_rows, full)
    gap, agree_pruned = _gap(pruned_rows, masked)
    control, _ = _gap(pruned_rows, full)
    bound = factor * baseline + slack
    return GGUFCheck(source=str(source), pruned=str(pruned), blocks_removed=sorted(blocks),
                     sublayers_removed=list(sublayers), probe_tokens=len(ids),
                     top_k=top_k, baseline_gap=baseline, pruned_gap=gap, control_gap=control, factor=factor,
                     slack=slack, bound=bound, passed=math.isfinite(gap) and gap <= bound,
                     top1_agreement_baseline=agree_baseline, top1_agreement_pruned=agree_pruned, runtime=runtime)


GGUFExportResult.model_rebuild()  # its check field names GGUFCheck, defined after it

if __name__ == "__main__":
    _llamacpp_worker()
