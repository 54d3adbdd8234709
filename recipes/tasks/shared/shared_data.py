"""Load real benchmark files from the ``shared/data`` folder beside the project, for the ``cs_real_*`` tasks.

The files are never copied into the project: these tasks read them where they lie, from
``$CORNERSTONE_SHARED_DATA`` or else ``../shared/data`` relative to the project checkout (where CI
puts them). lm-eval's own ``arc_easy``/``piqa``/... tasks need the hub; these give the same prompts
offline. ``labels`` names a file with one label per line (piqa keeps its labels apart).
"""

import json
import os
from pathlib import Path

import datasets


def shared_root() -> Path:
    configured = os.environ.get("CORNERSTONE_SHARED_DATA")
    root = Path(configured) if configured else Path(__file__).resolve().parents[4] / "shared" / "data"
    if not root.is_dir():
        raise FileNotFoundError(
            f"real benchmark data not found at {root}: set CORNERSTONE_SHARED_DATA to the folder holding "
            "arc_easy/, piqa/, boolq/ ... (see shared/data/MANIFEST.md)")
    return root


def load(data_files=None, labels=None, **_metadata):
    root = shared_root()
    splits = {}
    for split, path in (data_files or {}).items():
        with open(root / path, encoding="utf-8") as handle:
            rows = [json.loads(line) for line in handle if line.strip()]
        if labels and split in labels:
            values = (root / labels[split]).read_text().split()
            if len(values) != len(rows):
                raise ValueError(f"{labels[split]} has {len(values)} labels for {len(rows)} rows of {path}")
            for row, value in zip(rows, values):
                row["label"] = int(value)
        for row in rows:  # SuperGLUE writes labels as true/false (booleans or strings)
            if isinstance(row.get("label"), bool) or row.get("label") in ("true", "false"):
                row["label"] = int(row["label"] in (True, "true"))
        splits[split] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(splits)
