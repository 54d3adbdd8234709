"""Benchmark: which way of choosing what to drop keeps the most, on tasks and text it never saw? (issue 20)

    python bench/plan_quality.py --model smollm2-135m --budgets 10,20,25,33 --eval-limit 100

Selection data, all that any method may look at: the four real tasks ARC-Easy, ARC-Challenge, BoolQ
and PIQA on the documents the committed reports were scored on (``--selection-report``, 40 per task),
and the first half of WikiText-2's raw test split. Evaluation, on data no method saw:

- ``unseen``: the seven other real tasks (HellaSwag, COPA, SST-2, TruthfulQA MC1, LAMBADA,
  OpenBookQA, Winogrande), ``--eval-limit`` documents each (seeded draw);
- ``family``: the four selection tasks on documents none of the reports was scored on;
- ``ppl``: perplexity on the second half of WikiText-2 (``--ppl-paragraphs`` paragraphs).

Every method is a block plan of ``budget x blocks`` blocks, halves rounded up (25% of Gemma 3's 18 is 5, not 20%'s 4), made by ``cornerstone plan``'s own
code with its defaults (first and last block kept, cornerstones protected):

- peers: ``last`` (the blocks before the final one; Gromov et al. 2024, Lu et al. 2024), ``bi``
  (ShortGPT's block influence), ``angular`` (lowest) and ``angular-span`` (Gromov et al.'s contiguous
  span), ``cosine`` (LLM-Drop, sublayer cosine summed per block), ``avss``, ``sleb`` (greedy on
  the perplexity of the selection half of WikiText-2, SLEB);
- ours: ``ablation`` and ``shapley`` (lowest), ``greedy`` and ``beam`` (measured search on the
  selection documents; ``greedy-prob`` values each document by the gold answer's probability instead of
  its accuracy); ``ablation-kl`` (single-block ablation on the selection documents, lowest) and ``greedy-kl``
  valuing each document by the divergence objective, exp(-KL) of the choice distribution from the full
  model's (``cornerstone score --objective divergence``); ``greedy-text-kl``: greedy on the divergence objective
  on the selection half of WikiText-2, exp(-KL) per token of every next-token distribution from the full
  model's (SLEB's search and text, the full model's distributions in place of the text's next tokens); ``pick-kl`` makes every ``--pick-from`` method's plan
  (peers' too) and keeps, at each budget, the one whose masked model scores highest on the selection documents
  by the same divergence objective (plan selection on the selection data; the row names the plan it picked); with ``--repair METHODS``, those methods' plans also with linear repair (ReplaceMe)
  fitted on the selection half of WikiText-2; with ``--heal METHODS``, those methods' plans (and their repaired
  plans, for methods also in ``--repair``; only those with ``--heal-variants repaired``) exported and healed with ``cornerstone heal``'s defaults
  (distillation from the full model, early stopping, the final check that keeps the pruned weights when
  healing scores lower) on the first half of WikiText-2. The heal's final check reads the selection tasks'
  other documents, so a healed row's **family** column is left blank: it is judged on unseen and ppl only.
  ``--heal-keep always`` keeps the healed weights whatever the check says, so the row judges weights the default
  would have discarded (the JSON's ``default_keeps`` says which model the default hands back).

A greedy or beam search runs once, to the largest budget, and is cut at each budget (``search_until``).
Pruned models are measured as masks of the one loaded model with the fast engine, whose per-document
results equal lm-eval's own loop (tests/test_engine.py), so every plan is scored on exactly the same
documents. ``kept`` is the share of the base model's above-chance score the pruned model keeps,
``(P - C) / (B - C)`` on the macro means of a group, with a bootstrap standard error over documents
(paired: base and pruned resampled together; ``--bootstrap`` draws, seeded). Throughput (forward
tokens/s, prefill) of a model with k blocks physically removed is measured side by side with the
full model in the same run and given as a ratio.

Writes ``reports/plan-quality/MODEL.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from cornerstone import harness
from cornerstone.evaluate import tokens_per_second
from cornerstone.export import drop_blocks
from cornerstone.files import atomic_write
from cornerstone.loading import load_model
from cornerstone.planner import Plan, Planner, make_plan
from cornerstone.players import parse_players, unique_parameters
from cornerstone.provenance import machine
from cornerstone.estimators import Ablation
from cornerstone.scores import ScoreReport, score
from cornerstone.value import ValueFunction

SELECTION_TASKS = ["cs_real_arc_challenge", "cs_real_arc_easy", "cs_real_boolq", "cs_real_piqa"]
UNSEEN_TASKS = ["cs_real_hellaswag", "cs_real_copa", "cs_real_sst2", "cs_real_truthfulqa_mc1", "cs_real_lambada_openai",
                "cs_real_openbookqa", "cs_real_winogrande"]
WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2" / "wiki.test.raw"

# each model's committed reports chosen on the selection tasks: method -> (report, policy)
REPORTS = {
    "smollm2-135m": {
        "bi": ("reports/proxies/proxy-fidelity-smollm2-135m-bi.json", "lowest"),
        "angular": ("reports/proxies/proxy-fidelity-smollm2-135m-angular.json", "lowest"),
        "angular-span": ("reports/proxies/proxy-fidelity-smollm2-135m-angular.json", "contiguous"),
        "cosine": ("reports/proxies/proxy-fidelity-smollm2-135m-cosine.json", "lowest"),
        "avss": ("reports/proxies/proxy-fidelity-smollm2-135m-avss.json", "lowest"),
        "ablation": ("reports/pruning/smollm2-135m-drop8-real-scores.json", "lowest"),
        "shapley": ("reports/proxies/smollm2-135m-real-shapley-kernel-block-bf16.json", "lowest"),
    },
    "gemma3-270m": {
        "bi": ("reports/proxies/proxy-fidelity-gemma3-270m-bi.json", "lowest"),
        "angular": ("reports/proxies/proxy-fidelity-gemma3-270m-angular.json", "lowest"),
        "angular-span": ("reports/proxies/proxy-fidelity-gemma3-270m-angular.json", "contiguous"),
        "cosine": ("reports/proxies/proxy-fidelity-gemma3-270m-cosine.json", "lowest"),
        "avss": ("reports/proxies/proxy-fidelity-gemma3-270m-avss.json", "lowest"),
        "ablation": ("reports/pruning/gemma3-270m-drop5-real-scores.json", "lowest"),
        "shapley": ("reports/proxies/gemma3-270m-real-shapley-kernel-block-bf16.json", "lowest"),
    },
}
PEERS = ("last", "bi", "angular", "angular-span", "cosine", "avss", "sleb")
OURS = ("ablation", "shapley", "greedy", "greedy-prob", "beam", "ablation-kl", "greedy-kl", "greedy-text-kl", "pick-kl")


def wikitext_halves(folder: Path, ppl_paragraphs: int, selection_paragraphs: int) -> tuple[Path, Path, Path]:
    """Text files in ``folder`` (outside the project): the first ``selection_paragraphs`` of the first half of
    WikiText-2's test paragraphs (selection: SLEB, repair), the first ``ppl_paragraphs`` of the second half (held
    out), and the whole first half (healing). The held-out file never shares a line with the other two."""
    raw = WIKITEXT.read_text(encoding="utf-8")
    paragraphs = [p.strip() for p in raw.split("\n") if p.strip() and not p.strip().startswith("=")]
    half = len(paragraphs) // 2
    selection = paragraphs[:half][:selection_paragraphs]
    held_out = paragraphs[half:][:ppl_paragraphs]
    paths = folder / "wikitext-selection.txt", folder / "wikitext-heldout.txt", folder / "wikitext-heal.txt"
    for path, texts in zip(paths, (selection, held_out, paragraphs[:half])):
        path.write_text("\n\n".join(texts) + "\n", encoding="utf-8")
    return paths


def kept_draws(base: dict[str, list[float]], pruned: list[dict[str, list[float]]], chance: dict[str, float],
               draws: int, seed: int) -> tuple[list[float] | None, np.ndarray | None]:
    """(P - C) / (B - C) for each of ``pruned`` on the macro means over ``base``'s tasks, and its bootstrap replicates.

    Every replicate resamples each task's documents once and reads the base model and every pruned model on the
    same draw (a paired bootstrap), so a row of the replicates (draws x len(pruned)) differences into the paired
    spread of two plans' margin: the documents both plans find hard cancel out of it."""
    tasks = sorted(base)
    margin = np.mean([np.mean(base[t]) - chance[t] for t in tasks])
    if margin <= 0:
        return None, None
    points = [float(np.mean([np.mean(p[t]) - chance[t] for t in tasks]) / margin) for p in pruned]
    rng = np.random.default_rng(seed)
    replicates = []
    for _ in range(draws):
        b, p = 0.0, np.zeros(len(pruned))
        for t in tasks:
            index = rng.integers(0, len(base[t]), len(base[t]))
            b += np.mean(np.asarray(base[t])[index]) - chance[t]
            p += [np.mean(np.asarray(one[t])[index]) - chance[t] for one in pruned]
        if b > 0:
            replicates.append(p / b)
    return points, np.array(replicates).reshape(-1, len(pruned))


def kept(base: dict[str, list[float]], pruned: dict[str, list[float]], chance: dict[str, float],
         draws: int, seed: int) -> tuple[float | None, float | None]:
    """(P - C) / (B - C) on the macro means over ``base``'s tasks, and its paired bootstrap standard error."""
    points, replicates = kept_draws(base, [pruned], chance, draws, seed)
    if points is None:
        return None, None
    return points[0], float(np.std(replicates[:, 0], ddof=1)) if len(replicates) > 1 else None


def margin(base: dict[str, list[float]], ours: dict[str, list[float]], peer: dict[str, list[float]],
           chance: dict[str, float], draws: int, seed: int) -> tuple[float | None, float | None]:
    """kept(ours) - kept(peer) and the standard error of that difference over paired replicates (both plans judged
    on the same resampled documents). Smaller than either plan's own error when they fail on the same documents."""
    points, replicates = kept_draws(base, [ours, peer], chance, draws, seed)
    if points is None:
        return None, None
    differences = replicates[:, 0] - replicates[:, 1]
    return points[0] - points[1], float(np.std(differences, ddof=1)) if len(differences) > 1 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", choices=sorted(REPORTS))
    parser.add_argument("--budgets", default="10,20,25,33", help="Shares of blocks to drop, in percent.")
    parser.add_argument("--methods", default=",".join(PEERS + OURS))
    parser.add_argument("--eval-limit", type=int, default=100, help="Documents per evaluation task.")
    parser.add_argument("--eval-seed", type=int, default=1)
    parser.add_argument("--ppl-paragraphs", type=int, default=200)
    parser.add_argument("--selection-paragraphs", type=int, default=64, help="WikiText-2 paragraphs SLEB and repair read.")
    parser.add_argument("--beam-width", type=int, default=3)
    parser.add_argument("--shortlist", type=int, default=8, help="Beam: candidates re-measured per path and step.")
    parser.add_argument("--greedy-shortlist", type=int, default=None, help="Greedy searches (greedy, greedy-prob, "
                        "greedy-kl, greedy-text-kl, sleb): re-measure only this many candidates per step after the first (default: all).")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="Every plan is chosen "
                        "(searches) and judged in this dtype, the base model too.")
    parser.add_argument("--repair", default="", help="Also measure these methods' plans with linear repair "
                        "(comma-separated, or 'all').")
    parser.add_argument("--heal", default="", help="Also measure these methods' plans exported and healed "
                        "(comma-separated, or 'all'); with --repair, their repaired plans healed too.")
    parser.add_argument("--heal-variants", choices=("both", "repaired"), default="both",
                        help="repaired: heal only the --repair plans, not the plain ones (a budget whose plain heal "
                        "is already reported, e.g. in an earlier run's table).")
    parser.add_argument("--heal-steps", type=int, default=None, help="Heal steps (default: cornerstone heal's).")
    parser.add_argument("--heal-keep", choices=("better", "always"), default=None,
                        help="always: keep the healed weights even where the heal's final check scores them lower, so "
                        "the table judges them on the unseen tasks too (the row's check says what the default, better, "
                        "hands back; the as-cut row is that model when it keeps the pruned weights).")
    parser.add_argument("--heal-check-limit", type=int, default=None, help="Documents per task of the heal's final "
                        "check (default: cornerstone heal's).")
    parser.add_argument("--groups", default="unseen,family,ppl", help="Evaluation groups to measure (comma-separated "
                        "of unseen, family, ppl); a group left out is blank in the table.")
    parser.add_argument("--merge", default=None, help="An earlier run's JSON (this script's, same model and evaluation "
                        "documents): its rows for methods not run now are carried into the table, after checking that "
                        "its base model scored exactly what this run's did on every group both measured.")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default="reports/plan-quality")
    parser.add_argument("--name", default=None, help="Output file name (default: the model's).")
    parser.add_argument("--store", default=None, help="Value store folder (cornerstone.store): every evaluation is kept "
                        "there as it is made, so a stopped run resumes where it was.")
    parser.add_argument("--texts", default=None, help="Folder the two WikiText-2 halves are written to (default: "
                        "the store's texts/, else a temporary folder); their path names their values in the store.")
    parser.add_argument("--orders", default=None, help="JSON {method: {\"order\": [...], \"seconds\": S}}: a measured "
                        "search's removal order and time from an earlier run of this script (its log), cut at each "
                        "budget instead of searching again.")
    parser.add_argument("--pick-from", default="last,bi,angular,angular-span,cosine,avss,ablation,shapley,ablation-kl,"
                        "greedy-kl", help="pick-kl's candidates: methods whose plans it measures on the selection "
                        "documents (divergence objective), keeping the best at each budget.")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    repaired_methods = methods if args.repair == "all" else [m for m in args.repair.split(",") if m]
    healed_methods = methods if args.heal == "all" else [m for m in args.heal.split(",") if m]
    if args.heal_variants == "repaired" and not (healed_methods and set(healed_methods) <= set(repaired_methods)):
        parser.error("--heal-variants repaired heals --repair plans only: name every --heal method in --repair too")
    started = time.perf_counter()

    loaded = load_model(args.model, dtype=args.dtype, device="cpu")
    blocks = loaded.model.config.get_text_config(decoder=True).num_hidden_layers
    # halves up, not Python's round-half-to-even: 25% of 18 blocks is 4.5, and 4 would repeat the 20% budget
    budgets = {float(b): max(1, math.floor(float(b) / 100 * blocks + 0.5)) for b in args.budgets.split(",")}
    largest = max(budgets.values())
    # the text tasks are named by their path, which keys their values in the store: a stable folder with one
    work = (Path(args.texts) if args.texts else Path(args.store) / "texts" if args.store
            else Path(tempfile.mkdtemp(prefix="plan-quality-")))
    work.mkdir(parents=True, exist_ok=True)
    selection_text, heldout_text, heal_text = wikitext_halves(work, args.ppl_paragraphs, args.selection_paragraphs)
    reports = {name: (ScoreReport.load(path), policy) for name, (path, policy) in REPORTS[args.model].items()}
    selection_report = reports["ablation"][0]
    print(f"{args.model}: {blocks} blocks, budgets {budgets}, methods {methods}", flush=True)

    def divergence_tasks() -> list[harness.TaskSpec]:
        return harness.load_tasks(selection_report.settings["tasks"], documents=selection_report.documents(),
                                  objective="divergence")

    # --- plans: block names per method and budget
    plans: dict[str, dict[float, list[str]]] = {}
    seconds: dict[str, float] = {}
    given = json.loads(args.orders) if args.orders else {}
    pick_from = [m for m in args.pick_from.split(",") if m]
    if "pick-kl" in pick_from:
        raise SystemExit("--pick-from cannot name pick-kl itself")
    picked: dict[str, dict[float, str]] = {}  # pick-kl's choice of candidate per budget

    def plan_method(method: str) -> None:
        """Fill ``plans[method]`` (block names per budget) and ``seconds[method]``, once."""
        if method in plans:
            return
        tick, candidates_seconds = time.perf_counter(), 0.0
        if method in given:
            plans[method] = {b: list(given[method]["order"][:k]) for b, k in budgets.items()}
        elif method == "last":
            plans[method] = {b: [f"L{i}" for i in range(blocks - 1 - k, blocks - 1)] for b, k in budgets.items()}
        elif method in reports:
            report, policy = reports[method]
            plans[method] = {b: make_plan(report, Planner(drop=k, policy=policy), loaded=loaded).player_names
                             for b, k in budgets.items()}
        elif method == "ablation-kl":  # `cornerstone score --objective divergence` on the selection documents, lowest
            report = score(loaded, divergence_tasks(), estimator=Ablation(granularity="block"), store=args.store or False,
                           batch_size=args.batch_size)
            plans[method] = {b: make_plan(report, Planner(drop=k), loaded=loaded).player_names
                             for b, k in budgets.items()}
        elif method == "pick-kl":  # every candidate's plan at each budget, the one the selection documents value most
            for candidate in pick_from:
                plan_method(candidate)
            tick, candidates_seconds = time.perf_counter(), sum(seconds[c] or 0.0 for c in pick_from)
            value = ValueFunction(loaded, divergence_tasks(), batch_size=args.batch_size, store=args.store)
            keys = [(b, c) for b in budgets for c in pick_from]
            values = dict(zip(keys, (e.score for e in value.evaluate_many(
                [parse_players(loaded.model, plans[c][b]) for b, c in keys]))))
            # ties go to the first candidate in --pick-from order
            picked[method] = {b: max(pick_from, key=lambda c: values[(b, c)]) for b in budgets}
            plans[method] = {b: plans[picked[method][b]][b] for b in budgets}
            print(f"  pick-kl values: {[(b, c, round(v, 4)) for (b, c), v in values.items()]}", flush=True)
        else:  # measured searches: one run to the largest budget, cut at each
            if method in ("sleb", "greedy-text-kl"):  # the same text, by perplexity or by every token's divergence
                objective = "divergence" if method == "greedy-text-kl" else "accuracy"
                value = ValueFunction(loaded, harness.load_tasks([f"text:{selection_text}"], objective=objective),
                                      batch_size=args.batch_size, store=args.store)
                planner = Planner(policy="greedy", drop=largest, shortlist=args.greedy_shortlist)
            elif method == "greedy":
                value = None
                planner = Planner(policy="greedy", drop=largest, shortlist=args.greedy_shortlist)
            elif method == "greedy-prob":  # the same documents, each valued by the gold answer's probability
                value = ValueFunction(loaded, harness.load_tasks(selection_report.settings["tasks"],
                                                                 documents=selection_report.documents(),
                                                                 objective="probability"), batch_size=args.batch_size,
                                      store=args.store)
                planner = Planner(policy="greedy", drop=largest, shortlist=args.greedy_shortlist)
            elif method == "greedy-kl":  # the same documents, each valued by exp(-KL) from the full model's choices
                value = ValueFunction(loaded, divergence_tasks(), batch_size=args.batch_size, store=args.store)
                planner = Planner(policy="greedy", drop=largest, shortlist=args.greedy_shortlist)
            elif method == "beam":
                value = None
                planner = Planner(policy="beam", drop=largest, width=args.beam_width, shortlist=args.shortlist)
            else:
                raise SystemExit(f"unknown method {method}")
            made = make_plan(selection_report, planner, loaded=loaded, value=value)
            order = [step.name for step in made.search]
            plans[method] = {b: order[:k] for b, k in budgets.items()}
        seconds[method] = (given[method].get("seconds") if method in given
                           else time.perf_counter() - tick + candidates_seconds)
        print(f"  plan {method}: {_seconds(seconds[method])}, {plans[method]}", flush=True)

    for method in methods:
        plan_method(method)

    # --- evaluation documents: none that any report was scored on
    used: dict[str, set[int]] = {}
    for report, _ in reports.values():
        for name, record in report.documents().items():
            used.setdefault(name, set()).update(record.doc_indices)
    family = harness.load_tasks(SELECTION_TASKS, limit=args.eval_limit, seed=args.eval_seed,
                                exclude={name: sorted(indices) for name, indices in used.items()})
    unseen = harness.load_tasks(UNSEEN_TASKS, limit=args.eval_limit, seed=args.eval_seed,
                                exclude={name: sorted(indices) for name, indices in used.items()})
    perplexity = harness.load_tasks([f"text:{heldout_text}"])
    wanted = [g for g in args.groups.split(",") if g]
    groups = {name: specs for name, specs in (("unseen", unseen), ("family", family), ("ppl", perplexity)) if name in wanted}

    variants = [(method, budget, False) for method in methods for budget in budgets]
    variants += [(method, budget, True) for method in repaired_methods for budget in budgets]
    masks = {(m, b): plans[m][b] for m, b, _ in variants}

    def measure(model_loaded: Any, keys: list[tuple[str, float]], specs: list[harness.TaskSpec],
                store: str | None = None, base: bool = True) -> dict:
        value = ValueFunction(model_loaded, specs, batch_size=args.batch_size, store=store)
        names = ([[]] if base else []) + [masks[key] for key in keys]
        total = len({frozenset(n) for n in names})
        done = iter(range(1, total + 1))
        evaluations = value.evaluate_many([parse_players(model_loaded.model, n) for n in names],
                                          on_done=lambda e: print(f"    {next(done)}/{total} masks "
                                                                  f"({e.seconds:.0f} s)", flush=True))
        return {**({"base": evaluations.pop(0)} if base else {}), **dict(zip(keys, evaluations))}

    results: dict[str, dict] = {}
    for group, specs in groups.items():
        tick = time.perf_counter()
        results[group] = measure(loaded, sorted({(m, b) for m, b, _ in variants}), specs, store=args.store)
        print(f"  evaluated {group}: {time.perf_counter() - tick:.0f} s", flush=True)
    from cornerstone.calibration import Calibration
    from cornerstone.repair import LinearRepair, repair

    # linear repair (ReplaceMe) fitted on the selection text, in memory here and in the healed exports alike
    fitted = LinearRepair(calibration=Calibration(source=str(selection_text), samples=args.selection_paragraphs))
    repaired: dict[tuple[str, float], dict[str, Any]] = {}
    if repaired_methods:
        for method, budget, _ in [v for v in variants if v[2]]:
            copy_loaded = copy.copy(loaded)
            copy_loaded.model = copy.deepcopy(loaded.model)
            layers = sorted(int(name[1:]) for name in plans[method][budget])
            repair(copy_loaded, layers, fitted)
            # no store: a repaired model has the base model's fingerprint but other weights
            # and no base: a repaired model with nothing removed is not the base model (the block before each span changed)
            repaired[(method, budget)] = {group: measure(copy_loaded, [(method, budget)], specs, base=False)[(method, budget)]
                                          for group, specs in groups.items()}
            print(f"  repaired {method} {budget}%", flush=True)
    heal_keep = args.heal_keep or "better"
    heal_label = " + heal" + (" (kept always)" if heal_keep == "always" else "")
    healed: dict[tuple[str, float, bool], dict[str, Any]] = {}
    if healed_methods:
        from cornerstone.export import export
        from cornerstone.heal import HEAL_MANIFEST, HealResult, heal, kept_weights

        folders = Path(args.store) / "heal" if args.store else Path(tempfile.mkdtemp(prefix="plan-quality-heal-"))
        for method, budget, with_repair in [(m, b, r) for m in healed_methods for b in budgets
                                            for r in ((False, True) if m in repaired_methods else (False,))
                                            if r or args.heal_variants == "both"]:
            names = plans[method][budget]
            # the plan as `cornerstone plan` writes it (the report's document record, which the heal's check avoids)
            plan = make_plan(selection_report, Planner(drop=len(names), keep=[f"L{i}" for i in range(blocks)
                                                                           if f"L{i}" not in names],
                                                       keep_first=0, keep_last=0, protect_cornerstones=False),
                             loaded=loaded)
            assert sorted(plan.player_names) == sorted(names), (plan.player_names, names)
            folder = folders / f"{method}-{budget:g}{'-repair' if with_repair else ''}{'-always' if heal_keep == 'always' else ''}"
            manifest = folder / "healed" / HEAL_MANIFEST
            finished = json.loads(manifest.read_text()) if manifest.is_file() else None
            if finished is not None and (folder / "pruned" / "cornerstone-plan.yaml").is_file() \
                    and sorted(Plan.load(folder / "pruned" / "cornerstone-plan.yaml").player_names) == sorted(names) \
                    and finished.get("settings", {}).get("keep", "better") == heal_keep:
                result = HealResult.model_validate({k: v for k, v in finished.items() if k in HealResult.model_fields})
            else:
                export(loaded, plan, folder / "pruned", overwrite=True, repair=fitted if with_repair else None)
                options = {"steps": args.heal_steps, "check_limit": args.heal_check_limit, "keep": heal_keep}
                result = heal(folder / "pruned", folder / "healed", data=str(heal_text), overwrite=True,
                              evaluation_tasks=UNSEEN_TASKS, **{k: v for k, v in options.items() if v is not None})
            healed_model = load_model(str(folder / "healed"), dtype=args.dtype, device="cpu")
            healed[(method, budget, with_repair)] = {
                "result": result, **{group: measure(healed_model, [], specs)["base"]
                                     for group, specs in groups.items() if group != "family"}}
            print(f"  healed {method}{' + repair' if with_repair else ''} {budget}%: kept {result.kept} "
                  f"({result.check.verdict if result.check else result.unchecked}), {result.seconds:.0f} s", flush=True)

    # --- throughput: k blocks physically removed, side by side with the full model
    slim = {k: drop_blocks(loaded.model, list(range(blocks - 1 - k, blocks - 1))) for k in sorted(set(budgets.values()))}
    speeds = tokens_per_second([loaded.model] + list(slim.values()))
    speed_ratio = {k: speed / speeds[0] for k, speed in zip(slim, speeds[1:])}
    parameters = {k: unique_parameters(model) for k, model in slim.items()}

    chance = {group: {spec.name: spec.chance for spec in specs} for group, specs in groups.items()}
    rows = []
    unseen_docs: dict[int, dict[str, list[float]]] = {}
    for method, budget, with_repair, with_heal in [(*v, False) for v in variants] + [(m, b, r, True) for m, b, r in healed]:
        measured = (healed[(method, budget, with_repair)] if with_heal else repaired[(method, budget)] if with_repair
                    else {g: results[g][(method, budget)] for g in groups})
        row: dict[str, Any] = {"method": method + (" + repair" if with_repair else "") + (heal_label if with_heal else ""),
                               "kind": "peer" if method in PEERS else "ours", "budget": budget,
                               "blocks": plans[method][budget], "parameters": parameters[budgets[budget]],
                               "speed_ratio": speed_ratio[budgets[budget]], "plan_seconds": seconds[method]}
        if method in picked:
            row["picked"] = picked[method][budget]
        if with_heal:
            result = measured["result"]
            row["heal"] = {"kept": result.kept, "seconds": result.seconds, "steps": result.steps,
                           "best_step": result.best_step, "check": result.check.model_dump() if result.check else None,
                           "keep": heal_keep,
                           # what heal's default (keep better) hands back: the as-cut (or repaired) row's model when "pruned"
                           "default_keeps": kept_weights(result.check, "better")}
        for group in [g for g in ("unseen", "family") if g in groups and g in measured]:
            point, error = kept(results[group]["base"].per_doc, measured[group].per_doc, chance[group],
                                args.bootstrap, seed=0)
            row[f"{group}_kept"], row[f"{group}_kept_se"] = point, error
            row[f"{group}_score"] = measured[group].score
        if "ppl" in groups:
            row["ppl"] = 1 / measured["ppl"].score if measured["ppl"].score > 0 else math.inf
        if "unseen" in measured:
            unseen_docs[id(row)] = measured["unseen"].per_doc
        rows.append(row)
    base = {**{g: results[g]["base"].score for g in ("unseen", "family") if g in groups},
            **({"ppl": 1 / results["ppl"]["base"].score} if "ppl" in groups else {}),
            "parameters": unique_parameters(loaded.model)}
    merged_from = None
    if args.merge:
        earlier = json.loads(Path(args.merge).read_text(encoding="utf-8"))
        shared = [g for g in ("unseen", "family", "ppl") if g in base and g in earlier["base"]]
        if earlier["model"] != args.model or not shared or any(earlier["base"][g] != base[g] for g in shared):
            raise SystemExit(f"--merge {args.merge}: its base scores differ from this run's on {shared or 'every group'}; "
                             "the rows were measured on other documents or numbers and cannot share a table")
        # an earlier margin was against that run's best peer, which this table may have replaced
        carried = [dict({k: v for k, v in row.items() if k != "unseen_vs_best_peer"}, carried=True)
                   for row in earlier["rows"] if row["method"].split(" + ")[0] not in methods and row["budget"] in budgets]
        for row in carried:  # the groups this run measured; the earlier run's others are not in this table
            for group in {"unseen", "family", "ppl"} - set(groups):
                for key in (f"{group}_kept", f"{group}_kept_se", f"{group}_score", group):
                    row.pop(key, None)
        rows += carried
        merged_from = {"file": args.merge, "methods": sorted({r["method"] for r in carried}), "groups_checked": shared}
    # every plan against the budget's best peer, the other peers too (is the best one distinguishable from them?),
    # on the same resampled documents (none when that peer was measured in an earlier run: its documents' values
    # are not in the JSON)
    for budget in budgets:
        peers = [r for r in rows if r["budget"] == budget and r["kind"] == "peer" and r.get("unseen_kept") is not None
                 and " + " not in r["method"]]
        if not peers:
            continue
        best = max(peers, key=lambda r: r["unseen_kept"])
        if id(best) not in unseen_docs:
            continue
        for row in [r for r in rows if r["budget"] == budget and r is not best and id(r) in unseen_docs]:
            point, error = margin(results["unseen"]["base"].per_doc, unseen_docs[id(row)], unseen_docs[id(best)],
                                  chance["unseen"], args.bootstrap, seed=0)
            row["unseen_vs_best_peer"] = {"peer": best["method"], "margin": point, "se": error}
    document = {"model": args.model, "blocks": blocks, "budgets": budgets, "base": base, "rows": rows,
                "selection": {"tasks": SELECTION_TASKS, "wikitext_paragraphs": args.selection_paragraphs},
                "evaluation": {**{g: {s.name: len(s.doc_indices) for s in groups[g]} for g in ("unseen", "family")
                                  if g in groups},
                               **({"ppl_paragraphs": len(perplexity[0].doc_indices)} if "ppl" in groups else {})},
                "machine": machine(), "seconds": time.perf_counter() - started, "args": vars(args),
                "merged": merged_from}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / f"{args.name or args.model}.json", (json.dumps(document, indent=2) + "\n").encode())
    atomic_write(out / f"{args.name or args.model}.md", markdown(document).encode())
    plot(document, out / f"{args.name or args.model}.png")
    print(markdown(document))


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} s"


def _number(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _pct(value: float | None, error: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}" + (f" ± {error:.0%}" if error is not None else "")


def _versus(versus: dict | None) -> str:
    """A margin in points of above-chance score kept, with its paired s.e. and whether it is a tie (within one s.e.)."""
    if not versus or versus["margin"] is None:
        return ""
    points, error = 100 * versus["margin"], 100 * (versus["se"] or 0)
    if versus["margin"] == 0 and not versus["se"]:  # no resample separates them: identical per-document values
        return f"equal on every document ({versus['peer']})"
    word = "tie" if abs(points) <= error else "ahead" if points > 0 else "behind"
    return f"{points:+.0f} ± {error:.0f} {word} ({versus['peer']})"


def markdown(document: dict) -> str:
    base = document["base"]
    lines = [f"# Plan quality: {document['model']} ({document['blocks']} blocks)", "",
             f"Chosen on {', '.join(document['selection']['tasks'])} (the reports' documents) and the first half of "
             f"WikiText-2; judged on {', '.join(document['evaluation']['unseen'])} (**unseen**, "
             f"{sum(document['evaluation']['unseen'].values())} documents), the four selection tasks "
             "on other documents (**family**) and perplexity on the second half of WikiText-2 (**ppl**). "
             "kept = share of the base model's above-chance score kept (macro over the group's tasks), ± bootstrap s.e.; "
             "vs best peer = points of unseen kept above the budget's best peer, ± the paired bootstrap s.e. of that "
             "difference (both plans on the same resampled documents; a tie is within one s.e.).",
             "", f"Base: unseen {_number(base.get('unseen'), '.4f')}, family {_number(base.get('family'), '.4f')}, "
             f"ppl {_number(base.get('ppl'), '.2f')}, {base['parameters']:,} parameters. Machine: {document['machine']}.", ""]
    for budget in sorted({row["budget"] for row in document["rows"]}):
        rows = sorted((r for r in document["rows"] if r["budget"] == budget),
                      key=lambda r: -(r["unseen_kept"] if r.get("unseen_kept") is not None else -9))
        first = rows[0]
        lines += [f"## {budget:g}% of blocks ({len(first['blocks'])}): {first['parameters']:,} parameters, "
                  f"{first['speed_ratio']:.2f}x the full model's tokens/s", "",
                  "| method | kind | unseen kept | vs best peer | family kept | ppl | blocks dropped | plan time |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['method']}{' → ' + r['picked'] if r.get('picked') else ''}{'*' if r.get('carried') else ''} | {r['kind']} | {_pct(r.get('unseen_kept'), r.get('unseen_kept_se'))} | "
                  f"{_versus(r.get('unseen_vs_best_peer'))} | "
                  f"{_pct(r.get('family_kept'), r.get('family_kept_se'))} | {_number(r.get('ppl'), '.1f')} | "
                  f"{','.join(sorted(r['blocks'], key=lambda n: int(n[1:])))} | {_seconds(r['plan_seconds'])} |" for r in rows]
        lines.append("")
    if any("heal" in r for r in document["rows"]):
        lines += ["`+ heal`: exported and healed with `cornerstone heal`'s defaults on the first half of WikiText-2; its "
                  "final check reads the selection tasks' other documents, so family is not measured for these rows. "
                  "`kept pruned` in the JSON means the check kept the pruned weights.", ""]
    if any(r.get("heal", {}).get("keep") == "always" for r in document["rows"]):
        lines += ["`(kept always)`: healed with `--keep always`, so the healed weights are judged even where the final "
                  "check scored them lower; `default_keeps` in the JSON says what the default (`keep: better`) hands back, "
                  "and when that is `pruned` the row without `+ heal` is the model the default returns.", ""]
    if document.get("merged"):
        lines += [f"\\* measured in an earlier run of this script ({document['merged']['file']}), whose base model scored "
                  f"exactly this run's on {', '.join(document['merged']['groups_checked'])}: the same documents and numerics.", ""]
    return "\n".join(lines)


def plot(document: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # one panel per group the run measured: a run with --groups unseen draws no empty family panel
    panels = [(key, title) for key, title in (("unseen_kept", "unseen tasks"), ("family_kept", "selection tasks, other documents"))
              if any(row.get(key) is not None for row in document["rows"])] or [("unseen_kept", "unseen tasks")]
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    axes = list(axes[0])
    for method in sorted({row["method"] for row in document["rows"]}):
        rows = sorted((r for r in document["rows"] if r["method"] == method), key=lambda r: r["budget"])
        style = "-" if rows[0]["kind"] == "ours" else "--"
        for axis, (key, _) in zip(axes, panels):
            axis.errorbar([r["budget"] for r in rows], [r[key] if r.get(key) is not None else np.nan for r in rows],
                          yerr=[r.get(f"{key}_se") or 0 for r in rows], label=method, linestyle=style, marker="o", capsize=2)
    for axis, (_, title) in zip(axes, panels):
        axis.set_xlabel("blocks removed (%)")
        axis.set_ylabel("above-chance score kept")
        axis.set_title(f"{document['model']}: {title}")
        axis.axhline(0, color="grey", linewidth=0.5)
    axes[-1].legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    random.seed(0)
    main()
