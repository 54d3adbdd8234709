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
  model's logits. The default ``d = 1`` is pure distillation: the pruned model is pulled back toward
  what the unpruned one predicts on the text, not toward the text itself (plain language-model loss,
  ``d = 0``, pulled a pruned SmolLM2 toward its training text and away from what it knew). The teacher
  is, by default, the model the export was cut from (its ``cornerstone-export.json``).
- **Early stopping**: a seeded ``validation`` share of the training windows is held out; every
  ``eval_every`` steps the loss on it is measured, the best weights so far are kept, and training
  stops after ``patience`` measurements without improvement. The written model is the best one.
- **The final check** (``check``): before training, the pruned model is scored on ``check_limit``
  documents per task of ``check_tasks`` (default: the tasks the plan was scored on) drawn from those
  it was neither scored on nor trains on (they are kept out of the training text); after training
  the healed model is scored on the same documents. Unless ``keep="always"``, the healed weights are
  written only when they score higher; otherwise ``out`` holds the pruned weights unchanged and the
  result says so (``kept: pruned``), with both scores and the paired standard error of their difference.
- **Text**: a ``.txt`` (blank-line separated), ``.jsonl`` (``text`` field) or ``.json`` file, or
  the documents of lm-eval tasks (prompt + gold answer). Texts are tokenised, joined with EOS and
  cut into ``sequence_length`` windows; each epoch visits the training windows in a seeded order. Never heal on the
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

from .errors import ConfigError, HealError, TaskError
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
    distill: float = Field(1.0, ge=0.0, le=1.0, description="Weight d of the distillation term (1: distillation only; "
                           "0: plain language-model loss, no teacher).")
    temperature: float = Field(2.0, gt=0)
    teacher: str | None = Field(None, description="The unpruned model; default: the one the export was cut from.")
    validation: float = Field(0.1, ge=0.0, lt=1.0, description="Share of the training windows held out for early stopping.")
    validation_limit: int = Field(64, ge=1, description="Most held-out windows (a seeded draw of the share): each "
                                  "validation loss costs a forward pass of teacher and student over all of them, "
                                  "so a large training text must not make it cost more than the training.")
    eval_every: int = Field(10, ge=1, description="Steps between validation losses.")
    patience: int = Field(3, ge=1, description="Validation losses without improvement before training stops.")
    check: bool = Field(True, description="Score pruned and healed on held-out task documents; keep the better.")
    check_tasks: list[str] = Field(default_factory=list, description="Tasks of the final check; default: the plan's.")
    check_limit: int = Field(100, ge=2, description="Documents per check task (seeded draw, never trained or scored on).")
    keep: Literal["better", "always"] = Field("better", description="better: write the healed weights only when the "
                                              "check scores them higher; always: write them regardless.")
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


class HealCheck(BaseModel):
    """The final check: pruned and healed scored on the same held-out documents."""

    tasks: dict[str, list[int]]
    pruned_score: float
    healed_score: float
    difference: float
    stderr: float | None
    verdict: str


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
    best_step: int | None = None
    best_validation_loss: float | None = None
    stopped_early: bool = False
    teacher: str | None = None
    check: HealCheck | None = None
    unchecked: str | None = Field(None, description="Why there was no final check, when there was none.")
    kept: Literal["healed", "pruned"] = "healed"


def kept_weights(check: HealCheck | None, keep: str) -> Literal["healed", "pruned"]:
    """Which weights ``heal`` writes: the pruned ones when the final check found no gain (difference <= 0)
    and ``keep`` is ``better``; the healed ones otherwise (no check, a gain, or ``keep="always"``)."""
    return "pruned" if check is not None and keep == "better" and check.difference <= 0 else "healed"


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


def _save_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                     best: dict[str, torch.Tensor] | None = None) -> None:
    """Write the checkpoint (and the best weights on the held-out windows so far) to a new folder and swap
    it in, so a kill mid-write keeps the previous one."""
    from safetensors.torch import save_file

    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    trainable = {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, str(partial / "trainable.safetensors"))
    if best is not None:
        save_file({name: value.contiguous() for name, value in best.items()}, str(partial / "best.safetensors"))
    torch.save(optimizer.state_dict(), partial / "optimizer.pt")
    (partial / "state.json").write_text(json.dumps(state))
    retired = folder.with_name(folder.name + ".old")
    if folder.exists():
        os.replace(folder, retired)
    os.replace(partial, folder)
    shutil.rmtree(retired, ignore_errors=True)


class _CheckpointState(BaseModel):
    """``state.json`` of a heal checkpoint: where training stood, checked before it is trusted."""

    model_config = ConfigDict(extra="forbid", strict=True)

    key: str
    step: int = Field(ge=0)
    history: list[dict[str, float]]
    best: float | None
    best_step: int | None = Field(None, ge=1)
    bad: int = Field(ge=0)
    stopped: bool


def _damaged(folder: Path, problem: str) -> HealError:
    return HealError(f"the heal checkpoint in '{folder}' is damaged: {problem}",
                     hint="Delete that folder to start the heal over (its trained steps are lost).")


def _read_weights(folder: Path, name: str, expected: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors ``name``, which must be exactly ``expected``'s names and shapes."""
    from safetensors.torch import load_file

    try:
        weights = load_file(str(folder / name))
    except Exception as exc:  # a missing, cut or edited file: safetensors' own error type, or OSError
        raise _damaged(folder, f"{name} cannot be read ({type(exc).__name__})") from None
    if set(weights) != set(expected) or any(weights[n].shape != p.shape for n, p in expected.items()):
        raise HealError(f"the checkpoint in '{folder}' does not fit this model ({name})",
                        hint="Delete that folder to start over.")
    return weights


def _load_checkpoint(folder: Path, key: str, steps: int, model: torch.nn.Module,
                     optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """The state of a resumable run from its checkpoint ``folder``, with the model and optimizer restored;
    None when there is none. A checkpoint of other settings, or one that is cut, edited or of another
    model, is refused (:class:`HealError`) rather than half-loaded: the run would silently train on."""
    from pydantic import ValidationError

    state_file = folder / "state.json"
    if not state_file.exists():
        return None
    try:
        state = _CheckpointState.model_validate_json(state_file.read_bytes())
    except OSError as exc:
        raise _damaged(folder, f"state.json: {exc.strerror}") from None
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise _damaged(folder, f"state.json{' ' + where if where else ''}: {error['msg']}") from None
    if state.key != key:
        raise HealError(f"'{folder}' holds a checkpoint of a healing run with other settings",
                        hint="Start it again with the same settings, or delete that folder to start over.")
    if state.step > steps or len(state.history) != state.step:
        raise _damaged(folder, f"state.json says step {state.step} with {len(state.history)} logged, of {steps}")
    expected = {name: p for name, p in model.named_parameters() if p.requires_grad}
    weights = _read_weights(folder, "trainable.safetensors", expected)
    # the best weights so far on the held-out windows, which the run writes at its end unless it improves on them
    best = _read_weights(folder, "best.safetensors", expected) if state.best_step is not None else None
    model.load_state_dict(weights, strict=False)
    try:
        # our own file, read back with the safe unpickler (tensors and plain containers only)
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    except Exception as exc:  # cut (RuntimeError), refused by the safe unpickler (UnpicklingError), or of other shapes
        raise _damaged(folder, f"optimizer.pt cannot be read ({type(exc).__name__})") from None
    return {**state.model_dump(), "best_weights": best}


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

    See the module docstring for the method, loss, early stopping, the final check and checkpoints.
    ``evaluation_tasks`` are the tasks the healed model will be judged on: training on any of them is
    refused. Training on a task the plan was scored on uses the task's other documents (the plan in
    ``pruned`` records them) unless ``allow_overlap``; the check's documents are never trained on.
    """
    from . import harness
    from .exported import load_exported
    from .loading import fingerprint_folder, load_model, resolve_device
    from .quiet import no_progress_bars
    from .options import with_options

    healing = with_options(healing, Healing, options, function="heal")
    started = time.perf_counter()
    source, out = Path(pruned), Path(out)
    if not (source / "config.json").is_file():
        raise HealError(f"'{source}' is not an exported model folder", hint="Give the --out folder of `cornerstone export`.")
    if out.exists() and not overwrite:
        raise HealError(f"'{out}' already exists", hint="Choose another --out, or pass --overwrite.")
    check_output(out, overwrite=overwrite, marker=HEAL_MANIFEST, protected=(source,))  # before training, not after
    from .evaluate import scored_documents

    found = scored_documents(source)
    scored = {name: list(r.doc_indices) for name, r in found[0].items()} if found else {}
    check_names = healing.check_tasks or sorted(scored)
    check_specs: list[Any] = []
    unchecked = None if healing.check else "check: false"
    if healing.check and not check_names:
        unchecked = "no task to check on: the plan records none; name some with --check-tasks"
    elif healing.check:
        try:
            check_specs = harness.load_tasks(check_names, include_paths=include_paths, limit=healing.check_limit,
                                             seed=healing.seed, exclude=scored)
        except TaskError as exc:
            if healing.check_tasks:  # the user's own choice cannot be checked: say so before training
                raise
            unchecked = f"the plan's tasks leave no document to check on ({exc})"
    kept_out = {} if allow_overlap else dict(scored)
    for spec in check_specs:  # never train on what the check measures
        kept_out[spec.name] = sorted(set(kept_out.get(spec.name, [])) | set(spec.doc_indices))
    texts, data = training_texts(healing, include_paths, exclude=kept_out or None)
    overlap = sorted(set(data.get("tasks", [])) & _task_names(evaluation_tasks, include_paths))
    if overlap:
        raise ConfigError(f"healing would train on {', '.join(overlap)}, which the evaluation uses",
                          hint="Heal on other tasks or on a text file, so the evaluation stays honest.")
    teacher_name = _teacher_name(healing, source) if healing.distill > 0 else None
    device = resolve_device(device)
    torch.manual_seed(healing.seed)
    with no_progress_bars():
        model = load_exported(source, dtype=torch.float32).to(device)
    saved_dtype = _folder_dtype(source)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    windows = pack(tokenizer, texts, healing.sequence_length)
    sequences, held_out = split_windows(windows, healing.validation, healing.seed, healing.validation_limit)
    layers = int(getattr(text_config(model.config), "num_hidden_layers", -1))
    teacher = None  # checked before any training: its vocabulary must be the pruned model's
    if teacher_name is not None:
        with torch.random.fork_rng(devices=[]):  # loading draws no numbers from the seeded stream the LoRA init uses
            taught = load_model(teacher_name, dtype="float32", device=device)
        _check_teacher(teacher_name, taught.model, taught.tokenizer, model, tokenizer)
        teacher = taught.model.eval()
    before = _check_score(model, tokenizer, source, check_specs, device) if check_specs else None

    if healing.method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=healing.rank, lora_alpha=healing.alpha, lora_dropout=healing.dropout,
                                                 target_modules=healing.target_modules, task_type="CAUSAL_LM"))
    else:
        for parameter in model.parameters():
            parameter.requires_grad_(True)
    named_trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    trainable = list(named_trainable.values())
    optimizer = torch.optim.AdamW(trainable, lr=healing.rate(), weight_decay=0.0)

    key = _settings_key(healing, fingerprint_folder(source))
    checkpoint = checkpoint_dir(out)
    state = (_load_checkpoint(checkpoint, key, healing.steps, model, optimizer)
             or {"key": key, "step": 0, "history": [], "best": None, "best_step": None, "bad": 0, "stopped": False})
    resumed_from = state["step"]
    history: list[dict[str, float]] = state["history"]
    best_weights = state.pop("best_weights", None)  # tensors: not part of what state.json holds
    model.train()
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                              enabled=healing.compute_dtype == "bfloat16")

    def batch_loss(batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        with autocast:
            logits = model(input_ids=batch).logits[:, :-1]
            teacher_logits = None
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(input_ids=batch).logits[:, :-1]
        return _loss(logits, batch[:, 1:], teacher_logits, healing)

    step = resumed_from
    while step < healing.steps and not state["stopped"]:
        batch = sequences[batch_indices(step, len(sequences), healing.batch_size, healing.seed)].to(device)
        for group in optimizer.param_groups:
            group["lr"] = healing.lr_at(step)
        loss, parts = batch_loss(batch)
        if not torch.isfinite(loss):
            raise HealError(f"the training loss became {loss.item()} at step {step + 1}",
                            hint="Lower --learning-rate, or use --compute-dtype float32.")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        entry = {"step": step, "loss": loss.item(), "lr": healing.lr_at(step - 1), **parts}
        if held_out is not None and (step % healing.eval_every == 0 or step == healing.steps):
            model.eval()
            with torch.no_grad():
                entry["validation"] = _mean_of([batch_loss(held_out[i:i + healing.batch_size].to(device))[0].item()
                                                for i in range(0, len(held_out), healing.batch_size)])
            model.train()
            if state["best"] is None or entry["validation"] < state["best"] - 1e-6:
                state.update(best=entry["validation"], best_step=step, bad=0)
                best_weights = {name: p.detach().clone() for name, p in named_trainable.items()}
            else:
                state["bad"] += 1
                state["stopped"] = state["bad"] >= healing.patience
        history.append(entry)
        if progress is not None:
            progress(step, healing.steps, f"loss {loss.item():.3f}" + (f", validation {entry['validation']:.3f}"
                                                                      if "validation" in entry else ""))
        if step % healing.checkpoint_every == 0 and step < healing.steps and not state["stopped"]:
            _save_checkpoint(checkpoint, model, optimizer, {**state, "step": step, "history": history}, best_weights)
    if best_weights is not None and state["best_step"] != step:
        with torch.no_grad():  # the written model is the best one on the held-out windows
            for name, value in best_weights.items():
                named_trainable[name].copy_(value)

    model.eval()
    if healing.method == "lora":
        model = model.merge_and_unload()
    check = None
    if before is not None:
        after = _check_score(model, tokenizer, source, check_specs, device)
        check = _verdict(before, after, check_specs, healing.keep)
    kept = kept_weights(check, healing.keep)
    model = model.to(dtype=saved_dtype)
    parameters = unique_parameters(model)
    result = HealResult(
        path=str(out), source=str(source), method=healing.method, steps=step, resumed_from_step=resumed_from,
        trained_parameters=sum(p.numel() for p in trainable), parameters=parameters, layers=layers,
        tokens_per_step=healing.batch_size * healing.sequence_length, sequences=len(sequences), data=data,
        first_loss=_mean_loss(history[:max(1, len(history) // 10)]),
        last_loss=_mean_loss(history[-max(1, len(history) // 10):]), history=history,
        seconds=time.perf_counter() - started, best_step=state["best_step"], best_validation_loss=state["best"],
        stopped_early=bool(state["stopped"]), teacher=teacher_name, check=check, unchecked=unchecked, kept=kept)
    with staged_directory(out, if_exists="replace" if overwrite else "error", marker=HEAL_MANIFEST,
                          protected=(source,)) as staging:
        if kept == "healed":
            with no_progress_bars():
                model.save_pretrained(staging)
        else:  # healing did not help on held-out documents: the pruned weights, byte for byte
            for weights in [*source.glob("*.safetensors"), *source.glob("*.safetensors.index.json"), source / "config.json",
                            *source.glob("generation_config.json")]:
                shutil.copy2(weights, staging / weights.name)
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


def split_windows(windows: torch.Tensor, share: float, seed: int,
                  limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(training windows, held-out windows): a seeded ``share`` of them, at most ``limit``, held out for early
    stopping, at least one of each (None held out when ``share`` is 0 or there is a single window)."""
    count = round(share * len(windows))
    if share == 0 or len(windows) < 2:
        return windows, None
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))
    count = min(max(1, count), len(windows) - 1, limit or len(windows))
    return windows[order[count:].sort().values], windows[order[:count].sort().values]


def _teacher_name(healing: Healing, source: Path) -> str:
    """The distillation teacher: ``healing.teacher``, else the model the export was cut from."""
    if healing.teacher:
        return healing.teacher
    manifest = source / "cornerstone-export.json"
    base = None
    if manifest.is_file():
        try:
            base = (json.loads(manifest.read_text(encoding="utf-8")).get("base_model") or {}).get("spec")
        except (ValueError, AttributeError, UnicodeDecodeError):
            base = None
    if not isinstance(base, str) or not base:
        raise ConfigError(f"distillation needs the unpruned model as teacher, and '{source}' does not name it",
                          hint="Pass --teacher BASE_MODEL, or --distill 0 for plain language-model loss.")
    return base


def _check_score(model: torch.nn.Module, tokenizer: Any, source: Path, specs: Sequence[Any], device: str) -> Any:
    """``model`` scored on the check documents (the fast engine, lm-eval's numbers), with per-document values."""
    from .loading import LoadedModel
    from .value import ValueFunction

    loaded = LoadedModel(model=model, tokenizer=tokenizer, spec=str(source), source="folder", location=str(source),
                         fingerprint="in-memory", dtype="float32", device=device, load_seconds=0.0)
    with torch.no_grad():
        return ValueFunction(loaded, list(specs)).evaluate([])


def _verdict(before: Any, after: Any, specs: Sequence[Any], keep: str) -> HealCheck:
    from .estimators import differences, paired_stderr

    difference = after.score - before.score
    stderr = paired_stderr(differences(after, before))
    if difference > 0:
        verdict = "healing helped on held-out documents: the healed weights are kept"
    elif keep == "always":
        verdict = "healing did not help on held-out documents, but keep=always: the healed weights are kept"
    else:
        verdict = "healing did not help on held-out documents: the pruned weights are kept unchanged"
    return HealCheck(tasks={spec.name: list(spec.doc_indices) for spec in specs}, pruned_score=before.score,
                     healed_score=after.score, difference=difference, stderr=stderr, verdict=verdict)


def _mean_of(values: Sequence[float]) -> float:
    return sum(values) / len(values)


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
