"""Load real benchmark files from the ``shared/data`` folder beside the project, for the ``cs_real_*`` tasks.

The files are never copied into the project: these tasks read them where they lie, from
``$CORNERSTONE_SHARED_DATA`` or else ``../shared/data`` relative to the project checkout (where CI
puts them). lm-eval's own ``arc_easy``/``piqa``/... tasks need the hub; these give the same prompts
offline. ``labels`` names a file with one label per line (piqa and winogrande keep their labels
apart). ``format`` reads the files that are not JSON lines: ``tsv`` (a header row), ``json`` (one
list), ``hellaswag`` (bz2 text, six lines per item). The ``*_doc_to_*`` functions are lm-eval's
own preprocessing for winogrande and copa, restated so the tasks need no hub dataset.
"""

import bz2
import csv
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


def _read_rows(path: Path, format: str) -> list[dict]:
    if format == "jsonl":
        with open(path, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]
    if format == "tsv":
        with open(path, encoding="utf-8-sig", newline="") as handle:
            return list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    if format == "json":
        return json.loads(path.read_text(encoding="utf-8-sig"))
    if format == "hellaswag":
        lines = bz2.decompress(path.read_bytes()).decode("utf-8").split("\n")
        items = len(lines) // 6
        return [{"query": lines[6 * i].strip(), "label": int(lines[6 * i + 1]),
                 "choices": [line.strip() for line in lines[6 * i + 2:6 * i + 6]]} for i in range(items)]
    raise ValueError(f"unknown format {format!r}: use jsonl, tsv, json or hellaswag")


def load(data_files=None, labels=None, format="jsonl", **_metadata):
    root = shared_root()
    splits = {}
    for split, path in (data_files or {}).items():
        rows = _read_rows(root / path, format)
        if labels and split in labels:
            values = (root / labels[split]).read_text().split()
            if len(values) != len(rows):
                raise ValueError(f"{labels[split]} has {len(values)} labels for {len(rows)} rows of {path}")
            for row, value in zip(rows, values):
                row["label"] = int(value)
        for row in rows:  # SuperGLUE writes labels as true/false (booleans or strings), GLUE's tsv as text
            if isinstance(row.get("label"), bool) or row.get("label") in ("true", "false"):
                row["label"] = int(row["label"] in (True, "true"))
            elif isinstance(row.get("label"), str) and row["label"].isdigit():
                row["label"] = int(row["label"])
            if "mc1_targets" in row:  # TruthfulQA's {answer: 0/1} maps, as the hub dataset's choices/labels lists
                row["mc1_targets"] = {"choices": list(row["mc1_targets"]), "labels": list(row["mc1_targets"].values())}
                row.pop("mc2_targets", None)
        splits[split] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(splits)


def winogrande_doc_to_text(doc):
    """The context is chosen by the answer: each option is substituted into the blank (lm-eval's winogrande)."""
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_doc_to_target(doc):
    return doc["sentence"][doc["sentence"].index("_") + 1:].strip()


def winogrande_doc_to_choice(doc):
    blank = doc["sentence"].index("_")
    return [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]


def _lower_first(text):
    return text[0].lower() + text[1:]


def copa_doc_to_text(doc):
    connector = {"cause": "because", "effect": "therefore"}[doc["question"]]
    return doc["premise"].strip()[:-1] + f" {connector}"


def copa_doc_to_target(doc):
    return " " + _lower_first(doc["choice1"] if doc["label"] == 0 else doc["choice2"])


def copa_doc_to_choice(doc):
    return [" " + _lower_first(doc["choice1"]), " " + _lower_first(doc["choice2"])]
