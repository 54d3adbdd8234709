"""Benchmark: held-out WikiText-2 perplexity of a block-pruned model without and with linear repair (ReplaceMe).

    python bench/repair_quality.py                       # SmolLM2-135M, blocks 20-23, and a 6-block non-contiguous plan
    python bench/repair_quality.py --plan 20-23 --plan 10,11,16,20,21,24 --samples 256

WikiText-2's raw test split (../shared/data/wikitext2/wiki.test.raw) is cut in two by line: the paragraphs of the
first half calibrate the repair, the second half is the held-out text whose perplexity is measured (non-overlapping
windows of ``--window`` tokens). No line is in both. Dropping is done in memory with the plan's blocks masked
(what ``export`` writes, logit for logit; tests/test_repair.py checks that). Prints a markdown table and the machine.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

from cornerstone.calibration import Calibration
from cornerstone.loading import load_model
from cornerstone.masking import without
from cornerstone.players import parse_players
from cornerstone.provenance import machine
from cornerstone.repair import LinearRepair, repair, spans

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext2" / "wiki.test.raw"


def paragraphs(path: Path) -> tuple[list[str], list[str]]:
    """The article paragraphs (no headings, no blank lines) of the first and of the second half of the file's lines."""
    lines = path.read_text(encoding="utf-8").splitlines()
    half = len(lines) // 2

    def keep(part: list[str]) -> list[str]:
        return [line.strip() for line in part if line.strip() and not line.strip().startswith("=")]

    return keep(lines[:half]), keep(lines[half:])


def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch: int = 8) -> float:
    """exp(mean next-token negative log-likelihood) over every predicted token of ``windows``."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(windows), batch):
            ids = windows[start:start + batch]
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].double()
            total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                             reduction="sum"))
            count += ids[:, 1:].numel()
    return math.exp(total / count)


def parse_plan(text: str) -> list[int]:
    blocks: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        blocks += range(int(first), int(last or first) + 1)
    return sorted(set(blocks))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--plan", action="append", help="blocks to drop, e.g. 20-23 or 10,11,16 (repeatable)")
    parser.add_argument("--samples", type=int, default=256, help="calibration paragraphs (first half of the lines)")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--window", type=int, default=256, help="held-out window length in tokens")
    parser.add_argument("--windows", type=int, default=64, help="held-out windows (second half of the lines)")
    parser.add_argument("--order", action="append", choices=["sequential", "independent"])
    args = parser.parse_args(argv)
    plans = [parse_plan(p) for p in (args.plan or ["20-23", "10,11,16,20,21,24"])]
    orders = args.order or ["sequential", "independent"]

    loaded = load_model(args.model, dtype="float32", device="cpu")
    model = loaded.model
    calibration_lines, held_out_lines = paragraphs(WIKITEXT)
    ids = loaded.tokenizer("\n\n".join(held_out_lines), return_tensors="pt")["input_ids"][0]
    usable = min(args.windows, len(ids) // args.window)
    windows = ids[:usable * args.window].reshape(usable, args.window)
    original = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as folder:
        calibration_file = Path(folder) / "calibration.txt"
        calibration_file.write_text("\n\n".join(calibration_lines), encoding="utf-8")
        calibration = Calibration(source=str(calibration_file), samples=args.samples, max_length=args.max_length)
        full = perplexity(model, windows)
        info = machine()
        print(f"model {args.model} ({model.config.num_hidden_layers} blocks), float32, machine: {info['cpu']}, "
              f"{info['torch_threads']} torch threads; held-out: {usable} windows x {args.window} tokens from the "
              f"{len(held_out_lines)} paragraphs of WikiText-2's second half of lines; calibration: {args.samples} "
              f"paragraphs (<= {args.max_length} tokens) of the first half")
        print(f"full model perplexity: {full:.3f}\n")
        print("| blocks dropped | order | ppl dropped | ppl repaired | repair wall s | calibration tokens | "
              "relative error on calibration, before -> after |")
        print("|---|---|---|---|---|---|---|", flush=True)
        for blocks in plans:
            players = parse_players(model, [f"L{b}" for b in blocks])
            with without(model, players):
                dropped = perplexity(model, windows)
            # one span: both orders fit the same map on the same pass
            for order in orders if len(spans(blocks)) > 1 else orders[:1]:
                model.load_state_dict(original)
                started = time.perf_counter()
                result = repair(loaded, blocks, LinearRepair(calibration=calibration, order=order))
                seconds = time.perf_counter() - started
                with without(model, players):
                    repaired = perplexity(model, windows)
                errors = "; ".join(f"L{s.blocks[0]}-{s.blocks[-1]}: {s.error_before:.3f}->{s.error_after:.3f}"
                                   for s in result.spans)
                print(f"| {','.join(map(str, blocks))} | {order} | {dropped:.3f} | {repaired:.3f} | {seconds:.1f} | "
                      f"{result.spans[0].tokens} | {errors} |", flush=True)
            model.load_state_dict(original)


if __name__ == "__main__":
    main()
