"""Recipes: strict validation that names the offending key, the shipped examples, and a whole run through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cornerstone.cli import app
from cornerstone.errors import ConfigError
from cornerstone.evaluate import Comparison
from cornerstone.recipe import load_recipe

from .tasks import toy_docs, write_task

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
MINIMAL = {"name": "r", "plan": {"drop": 1}, "export": {"out": "x"}}


def write(tmp_path, data) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_is_valid(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem and recipe.export.out.startswith("exports/")


@pytest.mark.parametrize("mistake, where, allowed", [
    ({"modle": "x"}, "modle", "model"),
    ({"score": {"metod": "ablation"}}, "score.metod", "method"),
    ({"plan": {"drop": 1, "polcy": "lowest"}}, "plan.polcy", "policy"),
    ({"eval": {"tasks": {"nmes": ["t"]}}}, "eval.tasks.nmes", "names"),
    ({"export": {"out": "x", "shard": "1GB"}}, "export.shard", "max_shard_size"),
])
def test_unknown_keys_are_errors_that_name_the_key(tmp_path, mistake, where, allowed):
    with pytest.raises(ConfigError) as failure:
        load_recipe(write(tmp_path, {**MINIMAL, **mistake}))
    assert f"unknown key '{where}'" in failure.value.message
    assert allowed in failure.value.hint


def test_bad_values_and_files_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="plan.drop"):
        load_recipe(write(tmp_path, {**MINIMAL, "plan": {"drop": "lots"}}))
    with pytest.raises(ConfigError, match="'plan'"):
        load_recipe(write(tmp_path, {"name": "r", "export": {"out": "x"}}))
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_recipe(tmp_path / "list.yaml")


def test_cornerstone_run_does_the_whole_pipeline(tiny_llama_dir, tmp_path, monkeypatch):
    folder = write_task(tmp_path / "tasks", "toy_recipe", toy_docs(8))
    monkeypatch.chdir(tmp_path)
    recipe = {
        "name": "tiny", "model": str(tiny_llama_dir),
        "tasks": {"names": ["toy_recipe"], "include_paths": [str(folder)], "limit": 6},
        "score": {"method": "ablation", "granularity": "sublayer", "batch_size": 4},
        "plan": {"policy": "greedy", "granularity": "block", "drop": 1, "keep_first": 0, "keep_last": 0},
        "export": {"out": "exports/tiny"},
        "heal": {"data": "corpus.txt", "out": "exports/tiny-healed", "steps": 3, "sequence_length": 16, "batch_size": 2,
                 "rank": 2},
        "eval": {"tasks": {"names": ["toy_recipe"], "include_paths": [str(folder)], "limit": None}, "batch_size": 4},
    }
    (tmp_path / "corpus.txt").write_text("\n\n".join(["Question: What is the capital of France? Answer: Paris"] * 8))
    path = write(tmp_path, recipe)
    result = CliRunner().invoke(app, ["run", str(path), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    exported = Path(summary["export"]["path"])
    assert exported == Path("exports/tiny") and summary["export"]["format"] == "stock"
    saved_recipe = yaml.safe_load((tmp_path / exported / "cornerstone-recipe.yaml").read_text())
    assert saved_recipe == load_recipe(path).model_dump(mode="json")
    plan = yaml.safe_load((tmp_path / exported / "cornerstone-plan.yaml").read_text())
    assert plan["planner"]["policy"] == "greedy" and plan["removed"][0]["step"] == 1
    assert Path(summary["report"]).exists() and Path(summary["plan"]).exists()
    comparison = Comparison.model_validate(summary["evaluation"])
    assert comparison.pruned.parameters == plan["parameters"]["remaining"]
    # evaluated on the 2 documents the plan was not chosen on, the report's 6 left out
    scored = json.loads(Path(summary["report"]).read_text())["tasks"][0]["doc_indices"]
    assert sorted(comparison.tasks[0]["doc_indices"] + scored) == list(range(8)) and comparison.documents["overlap"] == {"toy_recipe": 0}
    assert Path(summary["report"]).parent == Path("cornerstone-output")  # the default folder, never reports/
    assert all(Path(p).exists() for p in summary["evaluation_files"])
    # healed after export, evaluated as a third column: same size, same layer count
    assert summary["heal"]["layers"] == plan["blocks"]["remaining"] and summary["heal"]["steps"] == 3
    assert comparison.healed is not None and comparison.healed.parameters == comparison.pruned.parameters
    assert "| healed |" in comparison.to_markdown() and set(comparison.healed_retention.retention) == {"toy_recipe"}
    failed = CliRunner().invoke(app, ["run", str(write(tmp_path, {**MINIMAL, "modle": "x"}))])
    assert failed.exit_code == 2 and "unknown key 'modle'" in failed.output
