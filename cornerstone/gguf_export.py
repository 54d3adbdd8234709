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
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from .errors import (ConfigError, ExportError, ModelLoadError, ModelNotFoundError, OutputError, PlanError,
                     UnsupportedArchitectureError)
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
    check: GGUFCheck | None = None  # llama.cpp against the masked model, when prune_gguf was given a probe


def size_accounted(source_bytes: int, removed_tensor_bytes: int, metadata_bytes_change: int, bytes_on_disk: int,
                   alignment: int) -> bool:
    """Whether the output is the source less the removed tensors' padded bytes plus the header change, to the
    byte, but for the padding after the last tensor (gguf's writer pads it; a source file may not have)."""
    return abs(bytes_on_disk - (source_bytes - removed_tensor_bytes + metadata_bytes_change)) < alignment


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
        marked = MARKER_KEY in _reader(out).fields
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

    from .planner import Plan

    source, out = Path(source), Path(out)
    if isinstance(plan, (str, Path)):
        plan = Plan.load(plan)
    reader = _reader(source)
    if isinstance(plan, Plan) and not allow_other_model:
        check_plan_source(plan, source)
    removed = _blocks_of(plan)
    arch = _scalar(reader, gguf.Keys.General.ARCHITECTURE)
    if not isinstance(arch, str):
        raise ModelLoadError(f"'{source}' names no general.architecture",
                             hint="Re-convert it with llama.cpp's converter.")
    count = _scalar(reader, f"{arch}.block_count")
    if not isinstance(count, int) or count < 1:
        raise ExportError(f"'{source}' has no {arch}.block_count, so it has no blocks to remove",
                          hint="Give the GGUF of a decoder model (one with blk.N.* tensors).")
    if arch not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"GGUF architecture '{arch}' is not one cornerstone prunes",
            hint="Supported: " + ", ".join(sorted(ARCHITECTURES)) + "; others need their per-layer rules checked "
            "in llama.cpp first (a row in cornerstone/gguf_export.py).")
    if not removed <= set(range(count)):
        missing = sorted(removed - set(range(count)))
        raise PlanError(f"blocks {missing} do not exist: '{source}' has blk.0..blk.{count - 1}",
                        hint="Use a plan made for this model.")
    keep = [index for index in range(count) if index not in removed]
    if not keep:
        raise PlanError(f"a plan cannot remove every block ({count} of {count})", hint="Lower --drop.")
    fields, sliced = _metadata(reader, arch, count, keep)
    pattern, notes = _explicit_pattern(reader, arch, count, removed, portable)
    _check_target(out, source, overwrite)
    renumber = {old: new for new, old in enumerate(keep)}
    kept, removed_tensors = [], []
    for tensor in reader.tensors:
        block = _tensor_block(tensor.name)
        if block is not None and block >= count:
            raise ModelLoadError(f"'{source}' holds tensor {tensor.name} but {arch}.block_count is {count}",
                                 hint="The file contradicts itself; re-convert it.")
        if block in removed:
            removed_tensors.append(tensor)
            continue
        name = tensor.name if block is None else f"blk.{renumber[block]}.{tensor.name.split('.', 2)[2]}"
        kept.append((name, tensor))
    alignment = int(_scalar(reader, gguf.Keys.General.ALIGNMENT) or gguf.GGUF_DEFAULT_ALIGNMENT)

    with _staged_file(out) as staging:
        writer = gguf.GGUFWriter(staging, arch, endianess=reader.endianess)
        writer.data_alignment = alignment
        for key, value, vtype, sub_type in fields:
            writer.add_key_value(key, value, vtype, sub_type=sub_type)
        if pattern is not None:
            writer.add_key_value(f"{arch}.{PATTERN_KEY}", pattern, gguf.GGUFValueType.ARRAY,
                                 sub_type=gguf.GGUFValueType.BOOL)
        writer.add_key_value(MARKER_KEY, sorted(removed), gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT32)
        writer.add_key_value(SOURCE_BLOCKS_KEY, count, gguf.GGUFValueType.UINT32)
        for name, tensor in kept:
            # the raw bytes and the GGML type as stored: shape in elements comes from the type's block size
            writer.add_tensor_info(name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, tensor in kept:
            writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
        writer.close()
        written = _reader(staging)
        data_offset = written.data_offset
        del written
        check = None if probe is None else check_against_masked(source, staging, removed, probe)
        if check is not None and not check.passed:
            raise ExportError(f"llama.cpp's log-probabilities on the pruned file differ from the masked model by "
                              f"{check.pruned_gap:.3g} nats, beyond {check.bound:.3g} ({check.factor:g} x the unpruned "
                              f"gap {check.baseline_gap:.3g} + {check.slack:g})",
                              hint="Nothing was written. Please report this with the plan and the source GGUF.")

    sizes = dict(source_bytes=source.stat().st_size, bytes_on_disk=out.stat().st_size, alignment=alignment,
                 removed_tensor_bytes=sum(_padded(int(t.n_bytes), alignment) for t in removed_tensors),
                 metadata_bytes_change=int(data_offset) - int(reader.data_offset))
    return GGUFExportResult(
        path=str(out), source=str(source), architecture=arch, blocks_original=count, blocks_removed=sorted(removed),
        blocks_kept=len(keep), tensors_removed=len(removed_tensors), tensors_kept=len(kept), sliced_keys=sliced,
        notes=notes, size_accounted=size_accounted(**sizes), check=check, **sizes)


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
                         top_k: int = 10, factor: float = GAP_FACTOR, slack: float = ABSOLUTE_SLACK,
                         threads: int | None = None) -> GGUFCheck:
    """Compare ``pruned`` in llama.cpp with the transformers model of ``source`` (dequantised, float32)
    with ``blocks`` masked, against the unpruned baseline (rules: :class:`GGUFCheck`). The probe is
    tokenised by the source's tokenizer and the same ids go to both runtimes."""
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
        with without(loaded.model, parse_players(loaded.model, [f"L{b}" for b in sorted(blocks)])):
            masked = torch.log_softmax(loaded.model(tensor).logits[0].float(), dim=-1)
    del loaded
    source_rows, runtime = verify_in_llamacpp(source, ids, top_k=top_k, threads=threads)
    pruned_rows, _ = verify_in_llamacpp(pruned, ids, top_k=top_k, threads=threads)
    baseline, agree_baseline = _gap(source_rows, full)
    gap, agree_pruned = _gap(pruned_rows, masked)
    control, _ = _gap(pruned_rows, full)
    bound = factor * baseline + slack
    return GGUFCheck(source=str(source), pruned=str(pruned), blocks_removed=sorted(blocks), probe_tokens=len(ids),
                     top_k=top_k, baseline_gap=baseline, pruned_gap=gap, control_gap=control, factor=factor,
                     slack=slack, bound=bound, passed=math.isfinite(gap) and gap <= bound,
                     top1_agreement_baseline=agree_baseline, top1_agreement_pruned=agree_pruned, runtime=runtime)


GGUFExportResult.model_rebuild()  # its check field names GGUFCheck, defined after it

if __name__ == "__main__":
    _llamacpp_worker()
