"""The estimator interface and registry, the shared player helpers, and the package's import graph."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import cornerstone
from cornerstone import harness
from cornerstone.calibration import Calibration
from cornerstone.errors import ConfigError
from cornerstone.estimation import Estimate, Estimator, PlayerEstimate, configure
from cornerstone.estimators import (METHODS, SHAPLEY_ESTIMATORS, Ablation, ExactShapley, KernelShapley, Proximity,
                                    estimator_class, make_estimator)
from cornerstone.players import Player, enumerate_players, forward_order, removed_blocks, unique_parameters
from cornerstone.proxies import AVSS, PROXIES, BlockInfluence, SublayerCosine
from cornerstone.scores import score

from .conftest import tiny_model
from .tasks import toy_docs, write_task

PACKAGE = Path(cornerstone.__file__).parent


def every_estimator() -> list[Estimator]:
    return [make_estimator(method, estimator) for method in METHODS
            for estimator in (SHAPLEY_ESTIMATORS if method == "shapley" else ["kernel"])]


# -- the registry ---------------------------------------------------------------------------------------

def test_the_registry_names_every_method_and_each_class_its_own_name():
    assert list(METHODS) == ["ablation", "shapley", "avss", "bi", "angular", "cosine"]
    for method, found in METHODS.items():
        classes = found.values() if isinstance(found, dict) else [found]
        assert all(kind.model_fields["method"].default == method for kind in classes)
    assert estimator_class("shapley", "exact") is ExactShapley and estimator_class("bi") is BlockInfluence
    for estimator in every_estimator():
        # what score reads of an estimator, and what a report records of it
        assert estimator.granularity in ("sublayer", "block")
        assert estimator.model_dump()["method"] == estimator.method


def test_planned_evaluations_count_the_full_model_and_what_each_method_removes():
    assert Ablation().planned_evaluations(6) == 6 + 1
    # the game's coalitions, then v(N) and each player alone for the cornerstone rule
    assert KernelShapley(budget=50).planned_evaluations(6) == 50 + 6 + 1
    assert ExactShapley().planned_evaluations(4) == 2**4 + 4 + 1
    assert Proximity(window=2).planned_evaluations(5) == (1 + 5 + 4) + 5 + 1
    assert all(proxy().planned_evaluations(6) == 1 for proxy in PROXIES.values())


def test_make_estimator_passes_each_class_only_its_own_options():
    options = dict(budget=50, target_stderr=0.01, window=2, seed=5,
                   proxy_options=dict(calibration=Calibration(samples=3), threshold=0.5, epsilon=None))
    kernel = make_estimator("shapley", "kernel", **options)
    assert (kernel.budget, kernel.target_stderr, kernel.seed) == (50, 0.01, 5)
    assert make_estimator("shapley", "proximity", **options).window == 2
    assert make_estimator("shapley", "exact", **options).model_dump() == ExactShapley().model_dump()
    assert make_estimator("ablation", granularity="block", **options).model_dump() == Ablation(granularity="block").model_dump()
    avss = make_estimator("avss", **options)
    # None keeps the field's default; calibration goes to every proxy, the AVSS options to AVSS only
    assert (avss.threshold, avss.epsilon, avss.calibration.samples) == (0.5, AVSS().epsilon, 3)
    bi = make_estimator("bi", **options)
    assert bi.model_dump() == BlockInfluence(calibration=Calibration(samples=3)).model_dump()


def test_granularity_defaults_to_the_method_s_own_and_is_checked():
    assert make_estimator("ablation").granularity == "sublayer"
    assert make_estimator("shapley").granularity == "sublayer"
    assert make_estimator("bi").granularity == "block" and make_estimator("cosine").granularity == "sublayer"
    with pytest.raises(ConfigError, match="cosine scores at sublayer granularity, not block") as refused:
        make_estimator("cosine", granularity="block")
    assert refused.value.hint == SublayerCosine.granularity_hint
    with pytest.raises(ConfigError, match="ablation scores at sublayer or block granularity, not layer"):
        make_estimator("ablation", granularity="layer")


def test_bad_names_and_options_are_config_errors_naming_what_is_available():
    with pytest.raises(ConfigError, match="unknown method 'magic'") as refused:
        make_estimator("magic")
    assert refused.value.hint == "Available: ablation, shapley, avss, bi, angular, cosine."
    with pytest.raises(ConfigError, match="unknown Shapley estimator 'fast'") as refused:
        make_estimator("shapley", "fast")
    assert refused.value.hint == "Available: kernel, permutation, proximity, exact."
    with pytest.raises(ConfigError, match="shapley option budget: .*greater than or equal to 4"):
        make_estimator("shapley", "kernel", budget=2)
    with pytest.raises(ConfigError, match="avss option prune_share"):
        configure(AVSS, prune_share=1.5)


@dataclass
class LayerOrder:
    """An estimator that is no pydantic model and no subclass of cornerstone's: later layers matter more.
    It measures only the full model, through the value function, as the protocol allows."""

    method: str = "layer-order"
    granularity: str = "block"

    def planned_evaluations(self, players: int) -> int:
        return 1

    def estimate(self, value, players, progress=None) -> Estimate:
        return Estimate(value.evaluate([]), {p.name: PlayerEstimate(importance=float(p.layer)) for p in players})

    def model_dump(self) -> dict:
        return {"method": self.method, "granularity": self.granularity}


def test_score_runs_any_estimator_that_meets_the_protocol(tiny_llama_dir, tmp_path):
    folder = write_task(tmp_path, "toy_protocol", toy_docs(4))
    specs = harness.load_tasks(["toy_protocol"], include_paths=[folder])
    sized = []
    report = score(str(tiny_llama_dir), specs, estimator=LayerOrder(), on_estimate=sized.append, store=None)
    # score sized the run by the estimator's own plan, and recorded what it is
    assert sized[0].evaluations == 1 and report.evaluations == 1
    assert report.method == "layer-order" and report.settings["estimator"] == LayerOrder().model_dump()
    assert {name: p.importance for name, p in report.players.items()} == {"L0": 0.0, "L1": 1.0, "L2": 2.0}
    assert report.ranking() == ["L0", "L1", "L2"]


# -- shared player helpers -----------------------------------------------------------------------------

def test_forward_order_sorts_players_as_the_forward_pass_meets_them():
    model = tiny_model("llama")
    players = enumerate_players(model, "block") + enumerate_players(model, "sublayer")
    ordered = sorted(reversed(players), key=forward_order)
    assert [p.name for p in ordered] == ["L0", "L0.attn", "L0.mlp", "L1", "L1.attn", "L1.mlp", "L2", "L2.attn", "L2.mlp"]
    assert [p.name for p in sorted(reversed(enumerate_players(model)), key=forward_order)] == \
        [p.name for p in enumerate_players(model)]


def test_removed_blocks_are_whole_blocks_and_blocks_that_lose_both_sublayers():
    def players(*names: str) -> list[Player]:
        return [Player(name, int(name[1:].split(".")[0]), name.split(".")[1] if "." in name else "block", "") for name in names]

    assert removed_blocks(players("L1", "L4")) == {1, 4}
    assert removed_blocks(players("L1.attn", "L1.mlp", "L2.attn", "L3.mlp")) == {1}
    assert removed_blocks(players("L2.attn", "L3.mlp")) == set()
    assert removed_blocks([]) == set()


def test_unique_parameters_counts_each_weight_once():
    tied = tiny_model("llama")
    tied.config.tie_word_embeddings = True
    tied.tie_weights()
    embeddings = tied.get_input_embeddings().weight
    assert tied.get_output_embeddings().weight is embeddings
    assert unique_parameters(tied) == sum(p.numel() for p in tied.parameters())

    # two Parameter objects over one storage are one weight
    aliased = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 4, bias=False))
    aliased[1].weight = torch.nn.Parameter(aliased[0].weight.data)
    assert len(list(aliased.parameters())) == 2 and unique_parameters(aliased) == 16
    # meta tensors have no storage (data_ptr 0 for all): each counts by itself
    assert unique_parameters(torch.nn.Linear(4, 4, device="meta")) == 4 * 4 + 4


def test_seeded_draw_is_the_draw_documents_and_calibration_texts_use():
    drawn = harness.seeded_draw(range(100), 10, 3)
    assert drawn == sorted(drawn) and len(set(drawn)) == 10 and drawn == harness.seeded_draw(list(range(100)), 10, 3)
    assert drawn != harness.seeded_draw(range(100), 10, 4)
    specs = harness.load_tasks(["cs_capitals"], limit=5, seed=3)
    total = specs[0].describe()["total_docs"]
    assert specs[0].doc_indices == harness.seeded_draw(range(total), 5, 3)


# -- the import graph ----------------------------------------------------------------------------------

def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported(path: Path, *, in_functions: bool) -> set[str]:
    """The package's modules that ``path`` imports: at module level (class bodies included, ``if
    TYPE_CHECKING:`` blocks left out, as they never run), and with ``in_functions`` those imported when a
    function runs. ``from . import x`` imports the module ``x``, not the package's ``__init__``."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(nodes: list[ast.stmt], module_level: bool) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, (ast.Import, ast.ImportFrom)) and (module_level or in_functions):
                if isinstance(node, ast.Import):
                    targets = [alias.name for alias in node.names]
                else:
                    base = node.module or ""
                    if node.level:
                        anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                        base = ".".join(anchor + ([node.module] if node.module else []))
                    targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
                found.update(t for t in targets if t in MODULES and t != name and not name.startswith(t + "."))
            inside = module_level and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            for field in ("body", "orelse", "finalbody", "handlers"):
                children = getattr(node, field, None)
                if isinstance(children, list):
                    visit(children, inside)

    visit(ast.parse(path.read_text(encoding="utf-8")).body, True)
    return found


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that ends where it starts, or None when it is acyclic."""
    done: set[str] = set()
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        path.append(node)
        for target in sorted(graph[node]):
            found = walk(target)
            if found:
                return found
        path.pop()
        done.add(node)
        return None

    return next((found for node in sorted(graph) if (found := walk(node))), None)


def test_every_module_imports():
    import importlib

    for name in MODULES:
        if name != "cornerstone.__main__":  # it runs the CLI
            importlib.import_module(name)


def test_the_package_has_no_import_cycle():
    graph = {name: imported(path, in_functions=False) for name, path in MODULES.items()}
    assert "cornerstone.proxies" in graph["cornerstone.estimators"]  # the graph sees relative imports
    assert cycle(graph) is None


def test_no_import_cycle_even_through_imports_inside_functions():
    graph = {name: imported(path, in_functions=True) for name, path in MODULES.items()}
    assert cycle(graph) is None
