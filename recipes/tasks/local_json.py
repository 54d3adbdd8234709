"""Load a bundled task's JSONL files relative to this folder, whatever the working directory.

lm-eval hands ``dataset_kwargs.data_files`` to ``datasets.load_dataset("json", ...)``, which reads
relative paths from the current directory; the bundled YAMLs name their files relative to this
folder instead and route loading through ``custom_dataset: !function local_json.load``.
"""

from pathlib import Path

import datasets

HERE = Path(__file__).parent


def load(data_files=None, **_metadata):
    files = {split: str(HERE / path) for split, path in (data_files or {}).items()}
    return datasets.load_dataset("json", data_files=files)
