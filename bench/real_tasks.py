"""Real benchmark tasks from ../shared/data as lm-eval task folders, for the benchmark scripts.

The data stay where they are (never copied into the project): the YAMLs written here point at them.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
ARC_FILES = {"arc_easy": "arc_easy/ARC-Easy-Test.jsonl", "arc_challenge": "arc_challenge/ARC-Challenge-Test.jsonl"}
ARC_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question.stem}}}}\\nAnswer:"
doc_to_choice: "{{{{question.choices | map(attribute='text') | list}}}}"
doc_to_target: "{{{{(question.choices | map(attribute='label') | list).index(answerKey)}}}}"
metric_list:
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def arc_task_folder(task: str = "arc_easy") -> tuple[Path, str]:
    """A temporary task folder holding ``<task>_bench`` (ARC read from ../shared/data); its path and the task name."""
    folder = Path(tempfile.mkdtemp())
    name = f"{task}_bench"
    (folder / f"{name}.yaml").write_text(ARC_YAML.format(name=name, path=SHARED / ARC_FILES[task]))
    return folder, name
