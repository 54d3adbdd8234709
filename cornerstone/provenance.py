"""Where a number came from: the CPU and threads it was measured on, and the library versions it depends on."""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    """The CPU the numbers came from (speed differs several-fold between CPUs with and without AMX's
    bf16 matrix units), and the torch threads used."""
    import torch

    name, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("", platform.machine(), platform.processor()):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = line
    except OSError:
        pass
    return {"cpu": name, "amx": "amx_bf16" in flags, "torch_threads": torch.get_num_threads()}


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("cornerstone", "torch", "transformers", "lm_eval", "accelerate", "safetensors"):
        try:
            versions[package] = metadata.version(package.replace("_", "-"))
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions
