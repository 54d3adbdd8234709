"""Heal a pruned model: a short fine-tune that wins back part of what removing layers cost.

:func:`heal` is the Python API behind ``cornerstone heal``. Layer-pruning papers heal the cut model
before they evaluate it: Gromov et al. 2024 (arXiv:2403.17887) with QLoRA, Kim et al. 2024
(Shortened LLaMA, arXiv:2402.02834) with LoRA or continued pretraining. Here:

- **LoRA** (Hu et al. 2021, arXiv:2106.09685) through peft by default: ``W + (alpha / r) B A`` on
  every linear layer but the output head (``target_modules="all-linear"``); after training the
  adapter is merged into the weights (``merge_and_unload``), so the result is again a plain
  checkpoint of the same architecture and layer count. ``method="full"`` trains every weight.
- **Loss** per token, averaged over the batch's tokens, with ``d = distill``:

      L = (1 - d) * CE(student, next token) + d * T^2 * KL(softmax(z_teacher / T) || softmax(z_student / T))

  the second term being distillation (Hinton et al. 2015, arXiv:1503.02531) from the unpruned
  model's logits. ``d = 0`` (the default) is plain language-model loss and needs no teacher.
- **Text**: a ``.txt`` (blank-line separated), ``.jsonl`` (``text`` field) or ``.json`` file, or
  the documents of lm-eval tasks (prompt + gold answer). Texts are tokenised, joined with EOS and
  cut into ``sequence_length`` windows; each epoch visits them in a seeded order. Never heal on the
  tasks you evaluate on: :func:`heal` refuses when ``evaluation_tasks`` overlap the training tasks.
- **Resumable**: every ``checkpoint_every`` steps the trainable weights (safetensors), the
  optimizer state and the loss history are written beside the output (``.NAME-heal-checkpoint``);
  a killed run started again with the same settings resumes from the last one. The batch of step
  ``s`` is a function of (seed, s) only, so a resumed run sees the batches the first would have.
- **Output**: written through a staging folder, so ``out`` is absent or complete. It holds the
  weights (the pruned model's dtype), tokenizer, the pruned folder's plan and export manifest, any
  modeling files it carried (DeciLM layout), and ``cornerstone-heal.json`` (settings, data,
  loss curve).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from .errors import ConfigError, HealError
from .files import check_output, staged_directory
from .players import text_config, unique_parameters

HEAL_MANIFEST = "cornerstone-heal.json"
CARRIED_FILES = ("cornerstone-plan.yaml", "cornerstone-export.json", "cornerstone-recipe.yaml")
ALL_TEXTS = 10**9


class Healing(BaseModel):
    """How to heal: LoRA (or full) fine-tuning settings, the training text, distillation and checkpoints."""

    model_config = ConfigDict(extra="forbid")

    data: str = Field(..., description="A .txt/.jsonl/.json file, or comma-separated lm-eval task names.")
    method: Literal["lora", "full"] = "lora"
    rank: int = Field(16, ge=1, description="LoRA rank r.")
    alpha: float = Field(32.0, gt=0, description="LoRA scale numerator: the update is (alpha / r) B A.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | str = Field("all-linear", description="peft target modules; all-linear = every linear but the head.")
    learning_rate: float | None = Field(None, gt=0, description="Default: 2e-4 for LoRA, 2e-5 for full fine-tuning.")
    steps: int = Field(100, ge=1)
    warmup: int = Field(10, ge=0, description="Linear warm-up steps; then cosine decay to a tenth.")
    sequence_length: int = Field(256, ge=8)
    batch_size: int = Field(8, ge=1)
    samples: int | None = Field(None, ge=1, description="Most training texts (a seeded draw); default all.")
    distill: float = Field(0.0, ge=0.0, le=1.0, description="Weight d of the distillation term.")
    temperature: float = Field(2.0, gt=0)
    teacher: str | None = Field(None, description="The unpruned model (needed when distill > 0).")
    compute_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Autocast dtype of the forward and backward passes; weights stay float32.")
    seed: int = 0
    checkpoint_every: int = Field(25, ge=1)

    def rate(self) -> float:
        return self.learning_rate or (2e-4 if self.method == "lora" else 2e-5)

    def lr_at(self, step: int) -> float:
        """Linear warm-up to the rate, then cosine decay to a tenth of it at the last step."""
        if step < self.warmup:
            return self.rate() * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.rate() * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class HealResult(BaseModel):
    """What :func:`heal` trained and wrote."""

    path: str
    source: str
    method: str
    steps: int
    resumed_from_step: int
    trained_parameters: int
    parameters: int
    layers: int
    tokens_per_step: int
    sequences: int
    data: dict[str, Any]
    first_loss: float
    last_loss: float
    history: list[dict[str, float]]
    seconds: float


def training_tasks(data: str) -> list[str]:
    """The task names ``data`` names (empty when it is a file)."""
    if Path(data).suffix in (".txt", ".jsonl", ".json") or Path(data).exists():
        return []
    return [name.strip() for name in data.split(",") if name.strip()]


def training_texts(healing: Healing, include_paths: Sequence[str | Path] = (),
                   exclude: dict[str, list[int]] | None = None) -> tuple[list[str], dict[str, Any]]:
    """The training texts and a description of where they came from (for the manifest and the report).
    Task documents in ``exclude`` (the ones the plan was scored on) are left out."""
    from . import harness
    from .texts import read_texts

    tasks = training_tasks(healing.data)
    samples = healing.samples or ALL_TEXTS
    if not tasks:
        if not Path(healing.data).is_file():
            hint = ("Give one .txt (blank-line separated), .jsonl (a 'text' field per line) or .json file, or "
                    "comma-separated lm-eval task names.")
            what = "is a folder" if Path(healing.data).is_dir() else "does not exist"
            raise ConfigError(f"--data '{healing.data}' {what}", hint=hint)
        texts = read_texts(healing.data, samples, healing.seed)
        return texts, {"file": healing.data, "texts": len(texts)}
    specs = harness.load_tasks(tasks, include_paths=include_paths, exclude=exclude)
    texts = read_texts("tasks", samples, healing.seed, specs)
    return texts, {"tasks": [spec.name for spec in specs], "texts": len(texts),
                   "documents": {spec.name: harness.selection_text(spec) for spec in specs}}


def pack(tokenizer: Any, texts: Sequence[str], length: int) -> torch.Tensor:
    """Token windows of ``length``: texts joined with EOS, each window opened with BOS where the
    tokenizer uses one (Gemma and Llama 3 expect it at position 0)."""
    bos = tokenizer.bos_token_id if tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id] else None
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False).input_ids + ([eos] if eos is not None else [])
    body = length - (bos is not None)
    windows = len(stream) // body
    if windows == 0:
        raise ConfigError(f"the training text has {len(stream)} tokens, fewer than one window of {length}",
                          hint="Give more text, or a smaller --sequence-length.")
    ids = torch.tensor(stream[:windows * body]).view(windows, body)
    if bos is not None:
        ids = torch.cat([torch.full((windows, 1), bos), ids], dim=1)
    return ids


def batch_indices(step: int, sequences: int, batch_size: int, seed: int) -> torch.Tensor:
    """The windows of ``step``: epochs visit every window once in an order seeded by (seed, epoch)."""
    first = step * batch_size
    orders: dict[int, torch.Tensor] = {}  # a batch spans at most a few epochs: shuffle each once
    picked = []
    for position in range(first, first + batch_size):
        epoch, offset = divmod(position, sequences)
        if epoch not in orders:
            orders[epoch] = torch.randperm(sequences, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        picked.append(int(orders[epoch][offset]))
    return torch.tensor(picked)


def _settings_key(healing: Healing, source_fingerprint: str) -> str:
    payload = healing.model_dump(mode="json", exclude={"checkpoint_every"}) | {"source": source_fingerprint}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def checkpoint_dir(out: Path) -> Path:
    return out.parent / f".{out.name}-heal-checkpoint"


def _save_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Write the checkpoint to a new folder and swap it in, so a kill mid-write keeps the previous one."""
    from safetensors.torch import save_file

    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    trainable = {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, str(partial / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), partial / "optimizer.pt")
    (partial / "state.json").write_text(json.dumps(state))
    retired = folder.with_name(folder.name + ".old")
    if folder.exists():
        os.replace(folder, retired)
    os.replace(partial, folder)
    shutil.rmtree(retired, ignore_errors=True)


def _load_checkpoint(folder: Path, key: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    from safetensors.torch import load_file

    state_file = folder / "state.json"
    if not state_file.exists():
        return None
    state = json.loads(state_file.read_text())
    if state.get("key") != key:
        raise HealError(f"'{folder}' holds a checkpoint of a healing run with other settings",
                        hint="Start it again with the same settings, or delete that folder to start over.")
    weights = load_file(str(folder / "trainable.safetensors"))
    missing = model.load_state_dict(weights, strict=False)
    if missing.unexpected_keys:
        raise HealError(f"the checkpoint in '{folder}' does not fit this model", hint="Delete that folder to start over.")
    # our own file, read back with the safe unpickler (tensors and plain containers only)
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    return state


def _loss(student_logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None,
          healing: Healing) -> tuple[torch.Tensor, dict[str, float]]:
    vocab = student_logits.shape[-1]
    student = student_logits.float().reshape(-1, vocab)
    cross_entropy = torch.nn.functional.cross_entropy(student, targets.reshape(-1))
    if teacher_logits is None or healing.distill == 0:
        return cross_entropy, {"ce": cross_entropy.item()}
    t = healing.temperature
    teacher = teacher_logits.float().reshape(-1, vocab)
    kl = torch.nn.functional.kl_div(torch.log_softmax(student / t, -1), torch.log_softmax(teacher / t, -1),
                                    log_target=True, reduction="batchmean") * t * t
    loss = (1 - healing.distill) * cross_entropy + healing.distill * kl
    return loss, {"ce": cross_entropy.item(), "kl": kl.item()}


def heal(
    pruned: str | Path,
    out: str | Path,
    healing: Healing | None = None,
    *,
    include_paths: Sequence[str | Path] = (),
    evaluation_tasks: Sequence[str] = (),
    overwrite: bool = False,
    device: str | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    allow_overlap: bool = False,
    **options: Any,
) -> HealResult:
    """Fine-tune the exported model in ``pruned`` on ``healing.data`` and write the merged result to ``out``.

    ``healing`` is the heal step's settings (those of ``cornerstone heal`` and a recipe's ``heal:``);
    ``options`` set its fields by name, e.g. ``heal(folder, out, data="notes.txt", steps=50)``.

    See the module docstring for the method, loss and checkpoints. ``evaluation_tasks`` are the
    tasks the healed model will be judged on: training on any of them is refused. Training on a task
    the plan was scored on uses the task's other documents (the plan in ``pruned`` records them) unless
    ``allow_overlap``.
    """
    from .export import load_exported
    from .loading import fingerprint_folder, load_model, resolve_device
    from .quiet import no_progress_bars

    from .settings import with_options

    healing = with_options(healing, Healing, options, function="heal")
    started = time.perf_counter()
    source, out = Path(pruned), Path(out)
    if not (source / "config.json").is_file():
        raise HealError(f"'{source}' is not an exported model folder", hint="Give the --out folder of `cornerstone export`.")
    if out.exists() and not overwrite:
        raise HealError(f"'{out}' already exists", hint="Choose another --out, or pass --overwrite.")
    check_output(out, overwrite=overwrite, marker=HEAL_MANIFEST, protected=(source,))  # before training, not after
    from .evaluate import scored_documents

    found = None if allow_overlap else scored_documents(source)
    texts, data = training_texts(healing, include_paths,
                                 exclude={name: r.doc_indices for name, r in found[0].items()} if found else None)
    overlap = sorted(set(data.get("tasks", [])) & _task_names(evaluation_tasks, include_paths))
    if overlap:
        raise ConfigError(f"healing would train on {', '.join(overlap)}, which the evaluation uses",
                          hint="Heal on other tasks or on a text file, so the evaluation stays honest.")
    if healing.distill > 0 and not healing.teacher:
        raise ConfigError("distillation needs the unpruned model as teacher", hint="Pass --teacher BASE_MODEL.")
    device = resolve_device(device)
    torch.manual_seed(healing.seed)
    with no_progress_bars():
        model = load_exported(source, dtype=torch.float32).to(device)
    saved_dtype = _folder_dtype(source)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    sequences = pack(tokenizer, texts, healing.sequence_length)
    layers = int(getattr(text_config(model.config), "num_hidden_layers", -1))
    teacher = None  # checked before any training: its vocabulary must be the pruned model's
    if healing.distill > 0:
        with torch.random.fork_rng(devices=[]):  # loading draws no numbers from the seeded stream the LoRA init uses
            taught = load_model(healing.teacher, dtype="float32", device=device)
        _check_teacher(healing.teacher, taught.model, taught.tokenizer, model, tokenizer)
        teacher = taught.model.eval()

    if healing.method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=healing.rank, lora_alpha=healing.alpha, lora_dropout=healing.dropout,
                                                 target_modules=healing.target_modules, task_type="CAUSAL_LM"))
    else:
        for parameter in model.parameters():
            parameter.requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=healing.rate(), weight_decay=0.0)

    key = _settings_key(healing, fingerprint_folder(source))
    checkpoint = checkpoint_dir(out)
    state = _load_checkpoint(checkpoint, key, model, optimizer) or {"key": key, "step": 0, "history": []}
    resumed_from = state["step"]
    history: list[dict[str, float]] = state["history"]
    model.train()
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                              enabled=healing.compute_dtype == "bfloat16")
    for step in range(resumed_from, healing.steps):
        batch = sequences[batch_indices(step, len(sequences), healing.batch_size, healing.seed)].to(device)
        for group in optimizer.param_groups:
            group["lr"] = healing.lr_at(step)
        with autocast:
            logits = model(input_ids=batch).logits[:, :-1]
            teacher_logits = None
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(input_ids=batch).logits[:, :-1]
        loss, parts = _loss(logits, batch[:, 1:], teacher_logits, healing)
        if not torch.isfinite(loss):
            raise HealError(f"the training loss became {loss.item()} at step {step + 1}",
                            hint="Lower --learning-rate, or use --compute-dtype float32.")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append({"step": step + 1, "loss": loss.item(), "lr": healing.lr_at(step), **parts})
        if progress is not None:
            progress(step + 1, healing.steps, f"loss {loss.item():.3f}")
        if (step + 1) % healing.checkpoint_every == 0 and step + 1 < healing.steps:
            _save_checkpoint(checkpoint, model, optimizer, {"key": key, "step": step + 1, "history": history})

    model.eval()
    if healing.method == "lora":
        model = model.merge_and_unload()
    model = model.to(dtype=saved_dtype)
    parameters = unique_parameters(model)
    result = HealResult(
        path=str(out), source=str(source), method=healing.method, steps=healing.steps, resumed_from_step=resumed_from,
        trained_parameters=sum(p.numel() for p in trainable), parameters=parameters, layers=layers,
        tokens_per_step=healing.batch_size * healing.sequence_length, sequences=len(sequences), data=data,
        first_loss=_mean_loss(history[:max(1, len(history) // 10)]),
        last_loss=_mean_loss(history[-max(1, len(history) // 10):]), history=history,
        seconds=time.perf_counter() - started)
    with staged_directory(out, if_exists="replace" if overwrite else "error", marker=HEAL_MANIFEST,
                          protected=(source,)) as staging:
        with no_progress_bars():
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
        for name in [*CARRIED_FILES, *(p.name for p in source.glob("*.py"))]:
            if (source / name).is_file():
                shutil.copy2(source / name, staging / name)
        (staging / HEAL_MANIFEST).write_text(json.dumps({**result.model_dump(), "settings": healing.model_dump(mode="json")},
                                                        indent=2))
        with no_progress_bars():
            reloaded = load_exported(staging)
        if getattr(text_config(reloaded.config), "num_hidden_layers", layers) != layers:
            raise HealError("the healed model's layer count differs from the pruned model's",
                            hint="Nothing was written. Please report this with the pruned folder.")
        del reloaded
    shutil.rmtree(checkpoint, ignore_errors=True)
    return result


def _check_teacher(name: str | None, teacher: torch.nn.Module, teacher_tokenizer: Any, student: torch.nn.Module,
                   tokenizer: Any) -> None:
    """Refuse a distillation teacher whose logits do not speak the pruned model's vocabulary: the KL term
    compares the two distributions token id by token id, so the vocabularies must be the same, in size
    and in which text each id stands for."""
    sizes = [model.get_output_embeddings().weight.shape[0] for model in (teacher, student)]
    if sizes[0] != sizes[1]:
        raise HealError(f"the teacher '{name}' has a vocabulary of {sizes[0]:,} tokens, the pruned model {sizes[1]:,}",
                        hint="Distil from the unpruned model the pruned one was cut from (same tokenizer).")
    if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise HealError(f"the teacher '{name}' has another tokenizer than the pruned model (same size, {sizes[0]:,} "
                        "tokens, other texts)", hint="Distil from the unpruned model the pruned one was cut from.")


def _task_names(names: Sequence[str], include_paths: Sequence[str | Path]) -> set[str]:
    """Task names with groups and tags expanded, so 'cornerstone_bundled' and 'cs_capitals' meet (the
    training side is expanded by :func:`training_texts`)."""
    from . import harness

    return {spec.name for spec in harness.load_tasks(list(names), include_paths=include_paths, limit=1)} if names else set()


def _mean_loss(entries: list[dict[str, float]]) -> float:
    return sum(e["loss"] for e in entries) / len(entries) if entries else float("nan")


def _folder_dtype(folder: Path) -> torch.dtype:
    """The dtype the folder's weights are stored in (its config's), so healing does not change the file size."""
    from .loading import read_config

    config = read_config(folder)
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, str(name), torch.float32)
