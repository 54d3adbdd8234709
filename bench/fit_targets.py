"""Benchmark: plans made to a cost target (issue 23), measured on this machine against the target.

    python bench/fit_targets.py --model smollm2-135m

For each target (default ``decode:1.3x`` and ``kv:50%``):

1. ``cornerstone profile``'s measurement of the model on this device (``--decode`` context x batch,
   ``--prefill`` length), saved to ``reports/fit/MODEL-profile.json``;
2. ``plan --policy fit`` from the committed one-pass cosine report (LLM-Drop's sublayer scores, chosen
   on ARC-Easy, ARC-Challenge, BoolQ and PIQA) at ``--granularity`` (default: the model's entry in
   ``REPORTS``; sublayer plans export in the DeciLM layout for SmolLM2 and the pruned Gemma 3 layout for
   Gemma 3; ``mixed`` plans the fit at sublayers);
3. ``plan --policy greedy`` to the same target: measured greedy, each step the least score lost per
   share of the need covered, on the report's own tasks and documents (``--greedy-docs`` per task) with the
   gold-probability objective or, with ``--greedy-objective divergence``, exp(-KL) from the full model's
   choices (``--greedy-shortlist`` candidates re-measured per step); with ``--granularity mixed`` it weighs
   every whole block beside its two sublayers;
4. the baseline the issue names: whole blocks dropped in the order of the same report's block
   importance until the profile's summed costs meet the same target (every block a plan may drop, when even
   they are predicted to fall short: the measured columns then say whether they meet it);
5. each plan physically removed (``drop_sublayers`` / ``drop_blocks``, the export's own surgery) and
   measured side by side with the unpruned model in the same run: decode and prefill time (the
   profile's timing: the models taking turns at every timed step, ``--repeats`` steps after a warm-up per
   round, each keeping the median of its ``--rounds`` rounds' medians; the unpruned model is timed twice, the
   second time as an A/A control whose ratio to the first is the measurement's own error), weight bytes and
   the KV-cache bytes per token its own
   cache holds;
6. held-out quality: the seven real tasks no report saw (HellaSwag, COPA, SST-2, TruthfulQA MC1,
   LAMBADA, OpenBookQA, Winogrande), ``--eval-limit`` documents each, scored with the engine (masks
   equal to the removals; tests/test_engine.py), as the share of the above-chance score kept with a
   paired bootstrap standard error (plan_quality's ``kept``).

Writes ``reports/fit/NAME.{json,md}`` and ``NAME-profile.json`` (NAME: ``--name``, default the model).

``--rejudge EARLIER.json`` judges an earlier run's plans again on other held-out documents (step 6 only,
``--eval-limit`` and ``--eval-seed`` of this run), with no profiling, planning or timing: its plans, measured
costs and A/A control are carried over as they were measured. At 40 documents a task a plan's kept share has a
standard error of about 14 points, wider than most differences between plans; 200 a task halve it and more.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from plan_quality import UNSEEN_TASKS, _versus, kept, margin  # noqa: E402

from cornerstone import harness  # noqa: E402
from cornerstone.costs import (MEASURES, CostProfile, ProfileSettings, measure_profile, measure_side_by_side,  # noqa: E402
                              parse_target, savings)  # noqa: E402
from cornerstone.export import drop_blocks, drop_sublayers  # noqa: E402
from cornerstone.files import atomic_write  # noqa: E402
from cornerstone.loading import load_model  # noqa: E402
from cornerstone.planner import Planner, make_plan  # noqa: E402
from cornerstone.players import parse_players  # noqa: E402
from cornerstone.provenance import machine  # noqa: E402
from cornerstone.scores import ScoreReport  # noqa: E402
from cornerstone.value import ValueFunction  # noqa: E402

REPORTS = {"smollm2-135m": ("reports/proxies/proxy-fidelity-smollm2-135m-cosine.json", "sublayer"),
           "gemma3-270m": ("reports/proxies/proxy-fidelity-gemma3-270m-cosine.json", "block")}


def block_baseline(report: ScoreReport, profile: CostProfile, target: str, loaded: Any, headroom: float = 0.0) -> list[str]:
    """Whole blocks in the order of the report's block importance, until the profile's costs meet ``target``
    (planned with the same ``headroom`` as the other plans)."""
    from cornerstone.errors import PlanError

    parsed = parse_target(target)
    need = parsed.need(profile, headroom)
    names: list[str] = []
    for k in range(1, report.model["num_hidden_layers"] - 1):
        try:
            names = make_plan(report, Planner(drop=k, granularity="block"), loaded=loaded).player_names
        except PlanError:  # every block the plan may drop is dropped: measured below, where the table says if it meets
            print(f"  blocks {target}: the profile predicts that even the {len(names)} blocks a plan may drop fall "
                  "short; measuring them all", flush=True)
            break
        if sum(profile.cost(n, parsed.measure) for n in names) >= need:
            break
    if not names:
        raise SystemExit(f"no block plan can be made for {target}")
    return names


def step_printer(label: str) -> Any:
    """A make_plan progress callback that prints a line when a search step begins (the search runs for minutes)."""
    last = {"what": None}

    def progress(done: int, total: int, what: str) -> None:
        if what != last["what"]:
            last["what"] = what
            print(f"    {label}: {what} ({done} evaluations so far)", flush=True)

    return progress


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", choices=sorted(REPORTS))
    parser.add_argument("--targets", default="decode:1.3x,kv:50%")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--prefill", type=int, default=128)
    parser.add_argument("--decode", default="512x1", help="CONTEXTxBATCH of the decode targets and the KV cache.")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--greedy-shortlist", type=int, default=6, help="0: no measured greedy plans")
    parser.add_argument("--greedy-targets", default="decode:1.3x", help="targets also planned by measured greedy")
    parser.add_argument("--greedy-docs", type=int, default=15, help="greedy: documents per task, drawn from the report's")
    parser.add_argument("--granularity", default=None, choices=["block", "sublayer", "mixed"], help="Players of the fit "
                        "and greedy plans (default: the model's entry in REPORTS); mixed: the greedy plan weighs every "
                        "sublayer and every whole block, and the fit plan (which cannot) is made at sublayers.")
    parser.add_argument("--greedy-objective", default="probability", choices=["probability", "divergence"],
                        help="greedy: each document's value, the gold answer's probability or exp(-KL) of the choice "
                        "distribution from the full model's (no labels; the steadier ranking, reports/plan-quality)")
    parser.add_argument("--headroom", type=float, default=0.0, help="Planner.headroom of every plan (the block "
                        "baseline's too): time targets planned this share below their limit.")
    parser.add_argument("--eval-limit", type=int, default=40)
    parser.add_argument("--eval-seed", type=int, default=1)
    parser.add_argument("--bootstrap", type=int, default=500)
    parser.add_argument("--out", default="reports/fit")
    parser.add_argument("--store", default=None, help="Value store folder (cornerstone.store) of the greedy plans' "
                        "and the held-out evaluations: a re-run replays them instead of measuring again.")
    parser.add_argument("--name", default=None, help="Output file names (default: the model's; the profile is NAME-profile.json).")
    parser.add_argument("--rejudge", default=None, help="An earlier run's JSON: judge its plans again on this run's "
                        "held-out documents (--eval-limit, --eval-seed), its measured costs carried over.")
    args = parser.parse_args()
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.rejudge:
        rejudge(args, started)
        return

    loaded = load_model(args.model, dtype=args.dtype, device="cpu")
    settings = ProfileSettings(prefill_lengths=[args.prefill], decode_shapes=[args.decode], repeats=args.repeats,
                               rounds=args.rounds)
    profile_path = measure_profile(loaded, settings).save(out / f"{args.name or args.model}-profile.json")
    profile = CostProfile.load(profile_path)
    report_path, granularity = REPORTS[args.model]
    granularity = args.granularity or granularity
    report = ScoreReport.load(report_path)
    print(f"{args.model}: profiled in {time.perf_counter() - started:.0f} s; decode {args.decode} "
          f"{profile.total('decode') * 1e3:.1f} ms, KV {profile.total('kv') / 1024:.1f} KiB/token", flush=True)

    plans: dict[str, dict[str, Any]] = {}
    # the greedy plans measure on the report's own tasks and documents, by --greedy-objective
    import random

    records = {name: record.model_copy(update={"content_sha256": None, "doc_indices": sorted(random.Random(0).sample(
        record.doc_indices, min(args.greedy_docs, len(record.doc_indices))))}) for name, record in report.documents().items()}
    chosen_on = harness.load_tasks(list(records), objective=args.greedy_objective, documents=records)
    for target in args.targets.split(","):
        headroom = args.headroom if parse_target(target).timed else 0.0
        fitted = "sublayer" if granularity == "mixed" else granularity  # a report sums a block from its halves
        fit = make_plan(report, Planner(policy="fit", granularity=fitted, targets=[target],
                                        profile=str(profile_path), headroom=headroom), loaded=loaded)
        plans[f"fit {target}"] = {"target": target, "method": f"fit ({fitted}s)", "players": fit.player_names}
        keys = [f"fit {target}"]
        if args.greedy_shortlist and target in args.greedy_targets.split(","):
            t0 = time.perf_counter()
            value = ValueFunction(loaded, chosen_on, batch_size=32, store=args.store)
            greedy = make_plan(report, Planner(policy="greedy", granularity=granularity, targets=[target],
                                               profile=str(profile_path), shortlist=args.greedy_shortlist,
                                               headroom=headroom),
                               loaded=loaded, value=value, progress=step_printer(f"greedy {target}"))
            plans[f"greedy {target}"] = {"target": target, "method": f"measured greedy ({granularity}"
                                         + ("" if granularity == "mixed" else "s")
                                         + (", divergence)" if args.greedy_objective == "divergence" else ")"),
                                         "players": greedy.player_names, "seconds": time.perf_counter() - t0,
                                         # the search's evaluations, whether measured now or replayed from --store
                                         "evaluations": value.evaluations + value.reused, "replayed": value.reused}
            keys.append(f"greedy {target}")
            print(f"  greedy {target}: {value.evaluations + value.reused} evaluations ({value.reused} replayed), "
                  f"{time.perf_counter() - t0:.0f} s, "
                  f"{greedy.player_names}", flush=True)
        plans[f"blocks {target}"] = {"target": target, "method": "blocks in report order",
                                     "players": block_baseline(report, profile, target, loaded, headroom)}
        keys.append(f"blocks {target}")
        for key in keys:
            saved = savings(profile, plans[key]["players"], MEASURES)
            plans[key]["predicted"] = {m: profile.total(m) - saved[m] for m in MEASURES}
            print(f"  {key}: {plans[key]['players']}", flush=True)

    # --- measured: each plan physically removed, side by side with the unpruned model
    def surgery(players: list[str]) -> Any:
        parsed = parse_players(loaded.model, players)
        if all(p.kind == "block" for p in parsed):
            return drop_blocks(loaded.model, [p.layer for p in parsed])
        return drop_sublayers(loaded.model, parsed)

    # the unpruned model twice: its second timing is the A/A control, whose ratio to the first should be 1.00x
    models = {"base": loaded.model, "control": loaded.model,
              **{key: surgery(plan["players"]) for key, plan in plans.items()}}
    measured = measure_side_by_side(list(models.values()), settings, rounds=args.rounds)
    speed = dict(zip(models, measured))
    control = {"decode_ratio": speed["base"]["decode_seconds"][args.decode] / speed["control"]["decode_seconds"][args.decode],
               "prefill_ratio": speed["base"]["prefill_seconds"][str(args.prefill)]
               / speed["control"]["prefill_seconds"][str(args.prefill)]}
    print(f"  measured speed: {time.perf_counter() - started:.0f} s", flush=True)

    for key, plan in plans.items():
        plan.update(key=key, check=parse_target(plan["target"]).check(speed["base"], speed[key]),
                    decode_speedup=speed["base"]["decode_seconds"][args.decode] / speed[key]["decode_seconds"][args.decode],
                    prefill_speedup=speed["base"]["prefill_seconds"][str(args.prefill)]
                    / speed[key]["prefill_seconds"][str(args.prefill)],
                    kv_kept=speed[key]["kv_cache_bytes_per_token"] / speed["base"]["kv_cache_bytes_per_token"],
                    weights_kept=speed[key]["weight_bytes"] / speed["base"]["weight_bytes"], measured=speed[key])
    base_eval, rows, unseen = held_out(loaded, report, list(plans.values()), args)
    document = {"model": args.model, "dtype": args.dtype, "report": report_path, "granularity": granularity,
                "profile": str(profile_path), "shapes": {"prefill": args.prefill, "decode": args.decode},
                "base": {**speed["base"], "score": base_eval.score,
                         "predicted": {m: profile.total(m) for m in MEASURES}}, "control": control, "rows": rows,
                "evaluation": {s.name: len(s.doc_indices) for s in unseen}, "machine": machine(),
                "seconds": time.perf_counter() - started, "args": vars(args)}
    write(document, out, args.name or args.model)


def held_out(loaded: Any, report: ScoreReport, plans: list[dict[str, Any]], args: argparse.Namespace) -> tuple[Any, list[dict[str, Any]], list[Any]]:
    """Step 6: the base model's evaluation, each plan's row with its kept share and its margin over the same
    target's block plan (the done-means of issue 23, with the paired s.e. of the difference), and the tasks."""
    used = {name: sorted(record.doc_indices) for name, record in report.documents().items()}
    unseen = harness.load_tasks(UNSEEN_TASKS, limit=args.eval_limit, seed=args.eval_seed, exclude=used)
    value = ValueFunction(loaded, unseen, batch_size=32, store=args.store)
    evaluations = value.evaluate_many([[]] + [parse_players(loaded.model, plan["players"]) for plan in plans])
    chance = {spec.name: spec.chance for spec in unseen}
    base_eval = evaluations[0]
    per_doc = {plan["key"]: evaluation.per_doc for plan, evaluation in zip(plans, evaluations[1:])}
    rows = []
    for plan, evaluation in zip(plans, evaluations[1:]):
        point, error = kept(base_eval.per_doc, evaluation.per_doc, chance, args.bootstrap, seed=0)
        blocks = f"blocks {plan['target']}"
        difference, difference_se = (margin(base_eval.per_doc, evaluation.per_doc, per_doc[blocks], chance,
                                            args.bootstrap, seed=0) if plan["key"] != blocks else (None, None))
        rows.append({**plan, "kept": point, "kept_se": error, "score": evaluation.score,
                     "vs_blocks": {"peer": "blocks", "margin": difference, "se": difference_se}
                     if difference is not None else None})
    return base_eval, rows, unseen


def write(document: dict[str, Any], out: Path, name: str) -> None:
    atomic_write(out / f"{name}.json", (json.dumps(document, indent=2) + "\n").encode())
    atomic_write(out / f"{name}.md", markdown(document).encode())
    print(markdown(document))


# what a row of an earlier run must hold to be judged again; the rest of it is carried as it was
_ROW_KEYS = {"key": str, "target": str, "method": str, "players": list, "predicted": dict, "check": dict,
             "decode_speedup": float, "prefill_speedup": float, "kv_kept": float, "weights_kept": float, "measured": dict}
_JUDGED = ("kept", "kept_se", "score", "vs_blocks")


def rejudge(args: argparse.Namespace, started: float) -> None:
    """``--rejudge``: an earlier run's plans judged again on this run's held-out documents; nothing else re-measured."""
    from cornerstone.files import parse_json

    source = Path(args.rejudge)
    try:
        earlier = parse_json(source.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SystemExit(f"--rejudge: cannot read {source}: {exc}") from None
    if not isinstance(earlier, dict) or earlier.get("model") != args.model:
        raise SystemExit(f"--rejudge: {source} is not a run of this script on {args.model} (hint: pass its --model)")
    rows = earlier.get("rows")
    if not isinstance(rows, list) or not rows or not all(
            isinstance(row, dict) and all(isinstance(row.get(k), t if t is not float else (int, float))
                                          for k, t in _ROW_KEYS.items()) for row in rows):
        raise SystemExit(f"--rejudge: {source} holds no plan rows of this script (each needs {', '.join(_ROW_KEYS)})")
    keys = [row["key"] for row in rows]
    missing = {f"blocks {row['target']}" for row in rows} - set(keys)
    if len(set(keys)) != len(keys) or missing:
        raise SystemExit(f"--rejudge: {source}'s rows repeat a plan or lack a block plan ({', '.join(sorted(missing))})")
    report_path = earlier.get("report")
    if report_path != REPORTS[args.model][0]:
        raise SystemExit(f"--rejudge: {source} was planned from {report_path}, not {REPORTS[args.model][0]}")
    name = args.name or f"{source.stem}-rejudged"
    if (Path(args.out) / f"{name}.json").resolve() == source.resolve():
        raise SystemExit(f"--rejudge: the output would replace {source} itself (hint: pass another --name)")
    loaded = load_model(args.model, dtype=earlier.get("dtype", args.dtype), device="cpu")
    report = ScoreReport.load(report_path)
    plans = [{k: v for k, v in row.items() if k not in _JUDGED} for row in rows]
    base_eval, judged, unseen = held_out(loaded, report, plans, args)
    document = {**earlier, "rows": judged, "base": {**earlier["base"], "score": base_eval.score},
                "evaluation": {s.name: len(s.doc_indices) for s in unseen},
                "rejudged": {"from": str(source), "machine": machine(), "seconds": time.perf_counter() - started,
                             "args": vars(args)}}
    write(document, Path(args.out), name)


def markdown(document: dict) -> str:
    base = document["base"]
    lines = [f"# Plans to a cost target: {document['model']} ({document['dtype']}, {document['machine'].get('cpu')}, "
             f"AMX {'yes' if document['machine'].get('amx') else 'no'}, {document['machine'].get('torch_threads')} threads)",
             "",
             f"Unpruned: decode {document['shapes']['decode']} "
             f"{base['decode_seconds'][document['shapes']['decode']] * 1e3:.1f} ms/token, prefill "
             f"{document['shapes']['prefill']} tokens {base['prefill_seconds'][str(document['shapes']['prefill'])] * 1e3:.1f} ms, KV cache "
             f"{base['kv_cache_bytes_per_token'] / 1024:.1f} KiB/token, held-out score {base['score']:.3f}. "
             f"Importance: `{document['report']}`; held out: {', '.join(document['evaluation'])} "
             f"({sum(document['evaluation'].values())} documents)."
             + (f" A/A control (the unpruned model timed again in the same turns): decode "
                f"{document['control']['decode_ratio']:.2f}x, prefill {document['control']['prefill_ratio']:.2f}x."
                if document.get("control") else "")
             + (f" Plans and costs: `{document['rejudged']['from']}` (as measured there); judged again here on "
                f"{sum(document['evaluation'].values())} held-out documents ({document['rejudged']['machine'].get('cpu')})."
                if document.get("rejudged") else ""),
             "",
             "| target | plan | removed | met | decode speed-up (predicted) | KV kept | weights kept | prefill speed-up "
             "(predicted) | kept (± se) | vs blocks |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in document["rows"]:
        kept = "n/a" if row["kept"] is None else f"{row['kept']:.0%} ± {row['kept_se']:.0%}"
        lines.append(f"| {row['target']} | {row['method']} | {len(row['players'])}: {', '.join(row['players'])} | "
                     f"{'yes' if row['check']['met'] else 'no'} | "
                     f"{row['decode_speedup']:.2f}x ({base['predicted']['decode'] / row['predicted']['decode']:.2f}x) | "
                     f"{row['kv_kept']:.0%} | {row['weights_kept']:.0%} | "
                     f"{row['prefill_speedup']:.2f}x ({base['predicted']['prefill'] / row['predicted']['prefill']:.2f}x) | "
                     f"{kept} | {_versus(row.get('vs_blocks'))} |")
    lines += ["", "Measured: each plan physically removed and timed side by side with the unpruned model in the same "
              "run; (predicted): the profile's calibrated costs summed, what the planner planned with; `kept` is the "
              "share of the above-chance score kept on the held-out tasks; `vs blocks`: kept minus the same target's "
              "block plan's, in points, with the paired bootstrap s.e. of the difference (a tie is within one s.e.).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
