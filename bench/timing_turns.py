"""Benchmark: how far apart does the timing put a model and itself? (A/A test of cornerstone's speed measurement)

    python bench/timing_turns.py                      # SmolLM2-135M, decode 512x1, prefill 128, 6 trials
    python bench/timing_turns.py --model gemma3-270m --decode 2048x1

The very same model object is timed twice per trial, so every ratio but 1.00x is the measurement's own error.
Two schedules, in the same run, alternating trial by trial:

* **back to back** (cornerstone before this bench): per round, every repeat of the first model, then every
  repeat of the second (each with its own warm-up), ``--rounds`` rounds, each model keeping the median of its
  rounds' medians;
* **turns** (:func:`cornerstone.costs.measure_side_by_side` now): the models take turns at every timed step
  (:func:`cornerstone.costs.take_turns`), same repeats and rounds.

Prints each trial's ratio (first / second timing) per shape, and per schedule the largest distance from 1.00x
and the standard deviation of the ratios, with the machine. Writes ``--out`` (JSON and Markdown).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

from cornerstone.costs import (
    ProfileSettings,
    _medians,
    _time_shapes,
    measure_side_by_side,
)
from cornerstone.files import atomic_write
from cornerstone.loading import load_model
from cornerstone.provenance import machine


def back_to_back(model, settings: ProfileSettings, rounds: int) -> list[dict]:
    """The schedule cornerstone used before: whole measurements of each model in turn, round by round."""
    runs: list[list[dict]] = [[], []]
    for _ in range(rounds):
        for index in range(2):
            runs[index].append(_time_shapes([(model, nullcontext)], settings)[0][0][0])
    return [_medians(r) for r in runs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prefill", type=int, default=128)
    parser.add_argument("--decode", default="512x1")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--out", default="reports/speed/turns")
    args = parser.parse_args()

    loaded = load_model(args.model, dtype=args.dtype, device="cpu")
    settings = ProfileSettings(prefill_lengths=[args.prefill], decode_shapes=[args.decode], repeats=args.repeats)
    shapes = {"decode": ("decode_seconds", args.decode), "prefill": ("prefill_seconds", str(args.prefill))}
    ratios: dict[str, dict[str, list[float]]] = {s: {m: [] for m in shapes} for s in ("back to back", "turns")}
    started = time.perf_counter()
    for trial in range(args.trials):
        for schedule in ("back to back", "turns") if trial % 2 == 0 else ("turns", "back to back"):
            first, second = (back_to_back(loaded.model, settings, args.rounds) if schedule == "back to back"
                             else measure_side_by_side([loaded.model, loaded.model], settings, rounds=args.rounds))
            for measure, (key, shape) in shapes.items():
                ratios[schedule][measure].append(first[key][shape] / second[key][shape])
        print(f"trial {trial + 1}: " + ", ".join(f"{s} {m} {r[m][-1]:.3f}x" for s, r in ratios.items() for m in shapes),
              flush=True)

    summary = {s: {m: {"ratios": r[m], "largest_error": max(abs(x - 1) for x in r[m]),
                       "stdev": statistics.stdev(r[m]) if len(r[m]) > 1 else 0.0} for m in shapes}
               for s, r in ratios.items()}
    document = {"model": args.model, "dtype": args.dtype, "shapes": {"prefill": args.prefill, "decode": args.decode},
                "repeats": args.repeats, "rounds": args.rounds, "trials": args.trials, "summary": summary,
                "machine": machine(), "seconds": time.perf_counter() - started}
    lines = [f"# A/A timing: {args.model} timed against itself ({args.dtype}, {document['machine'].get('cpu')}, "
             f"{document['machine'].get('torch_threads')} threads)", "",
             f"{args.trials} trials, each timing the same model object twice: decode {args.decode}, prefill "
             f"{args.prefill} tokens, {args.repeats} repeats x {args.rounds} rounds. Every ratio but 1.00x is the "
             "measurement's own error.", "",
             "| schedule | measure | largest error | s.d. of the ratio | ratios |", "|---|---|---|---|---|"]
    for schedule, measures in summary.items():
        for measure, s in measures.items():
            lines.append(f"| {schedule} | {measure} | {s['largest_error']:.1%} | {s['stdev']:.3f} | "
                         f"{', '.join(f'{x:.3f}' for x in s['ratios'])} |")
    markdown = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out.with_suffix(".json"), (json.dumps(document, indent=2) + "\n").encode())
    atomic_write(out.with_suffix(".md"), markdown.encode())
    print(markdown)


if __name__ == "__main__":
    main()
