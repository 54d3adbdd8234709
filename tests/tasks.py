"""Small lm-eval task folders written by tests (absolute data paths, so they work from any directory)."""

from __future__ import annotations

import json
from pathlib import Path

YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: {output_type}
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
{metrics}
metadata:
  version: 1.0
"""


def write_task(folder: Path, name: str, docs: list[dict], metrics=("acc", "acc_norm"), output_type="multiple_choice") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    metric_lines = "".join(f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n" for m in metrics)
    (folder / f"{name}.yaml").write_text(
        YAML.format(name=name, data=data, metrics=metric_lines.rstrip("\n"), output_type=output_type)
    )
    return folder


def toy_docs(n: int = 12) -> list[dict]:
    """Two- and four-choice questions, so the chance level is a mix of 1/2 and 1/4."""
    docs = []
    for i in range(n):
        if i % 2:
            docs.append({"question": f"What is {i} + 1?", "choices": [str(i + 1), str(i + 7)], "label": 0})
        else:
            docs.append({"question": f"What is {i} + 2?", "choices": [str(i), str(i + 5), str(i + 2), str(i + 9)], "label": 2})
    return docs
