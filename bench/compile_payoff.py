"""Benchmark: does torch.compile pay for itself within a sweep on this machine? (issue 22)

    python bench/compile_payoff.py [--model smollm2-135m] [--task cs_real_copa] [--docs 50] [--masks 13]

The engine runs the model's own forward and removes a player by replacing its module's ``forward`` on
the instance (:func:`cornerstone.masking.without`), so the natural unit to compile is each decoder
layer's direct children (attention, MLP, norms): their instance ``forward`` becomes
``torch.compile(forward, dynamic=True)`` (inductor; one graph for the engine's varying batch shapes),
a removal still swaps it out and puts it back, and the residual adds stay eager. In one run, on the
same masks (the full model and single-sublayer removals spread over the layers), each with a fresh
value function so nothing is memoised:

1. eager: seconds for the masks;
2. compiled, first time: the same masks with the compiled children, compilation included (into a fresh
   inductor cache folder unless ``--warm-cache``: a cached compile is a few seconds);
3. compiled, warm: the same masks again (fresh value function, compiled code reused).

It prints the compile time (2 minus 3: building the engine costs both the same), the seconds per mask
saved (1 minus 3, per mask after the first, which also builds the engine), the masks a
sweep needs before compiling has paid off, a full sublayer sweep's masks for comparison, and how many
per-document values (the gold answer's probability) differ from eager and by how much (compiled kernels
may sum in another order). Nothing
here is a timed test; the machine and threads are printed with the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# a cold compile unless --warm-cache: inductor keeps compiled kernels on disk, and a second run would time the cache
if "--warm-cache" not in sys.argv:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="compile-payoff-")

import torch  # noqa: E402

from cornerstone import harness  # noqa: E402
from cornerstone.files import atomic_write  # noqa: E402
from cornerstone.loading import load_model  # noqa: E402
from cornerstone.players import decoder_layers, enumerate_players  # noqa: E402
from cornerstone.provenance import machine  # noqa: E402
from cornerstone.value import ValueFunction  # noqa: E402


def run(loaded, specs, masks, batch_size: int) -> tuple[float, float, list]:
    """Seconds for all ``masks`` (the first includes building the engine), seconds per mask after the first, results."""
    value = ValueFunction(loaded, specs, batch_size=batch_size)
    done: list[float] = []
    started = time.perf_counter()
    results = value.evaluate_many(masks, on_done=lambda _evaluation: done.append(time.perf_counter()))
    total = time.perf_counter() - started
    return total, (done[-1] - done[0]) / max(1, len(done) - 1), results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="cs_real_copa")
    parser.add_argument("--docs", type=int, default=50)
    parser.add_argument("--masks", type=int, default=13, help="The full model and this many minus one single removals.")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warm-cache", action="store_true", help="Keep inductor's on-disk cache of compiled kernels "
                        "(default: a fresh one, so the compile time is a first compile's).")
    parser.add_argument("--json", dest="json_out", default=None)
    args = parser.parse_args()

    loaded = load_model(args.model, dtype=args.dtype, device="cpu")
    # continuous per-document values (the gold answer's probability), so any change in the numerics shows
    specs = harness.load_tasks([args.task], limit=args.docs, seed=0, objective="probability")
    players = enumerate_players(loaded.model)
    step = max(1, len(players) // max(1, args.masks - 1))
    masks = [[]] + [[p] for p in players[::step][:args.masks - 1]]
    print(f"{args.model} ({args.dtype}), {args.task}: {len(specs[0].doc_indices)} docs, {len(masks)} masks; "
          f"{machine()}, {torch.get_num_threads()} threads", flush=True)

    eager_seconds, eager_per_mask, eager = run(loaded, specs, masks, args.batch_size)
    print(f"eager: {eager_seconds:.1f} s ({eager_per_mask:.2f} s/mask after the first)", flush=True)

    compiled_modules = 0
    for layer in decoder_layers(loaded.model)[1]:
        for child in layer.children():
            child.forward = torch.compile(child.forward, dynamic=True)
            compiled_modules += 1
    first_seconds, _, _ = run(loaded, specs, masks, args.batch_size)
    print(f"compiled, first time: {first_seconds:.1f} s ({compiled_modules} modules)", flush=True)
    warm_seconds, warm_per_mask, warm = run(loaded, specs, masks, args.batch_size)
    print(f"compiled, warm: {warm_seconds:.1f} s ({warm_per_mask:.2f} s/mask after the first)", flush=True)

    pairs = [(a, b) for x, y in zip(eager, warm) for t in x.per_doc for a, b in zip(x.per_doc[t], y.per_doc[t])]
    differing = sum(a != b for a, b in pairs)
    largest = max(abs(a - b) for a, b in pairs)
    documents = sum(len(v) for x in eager for v in x.per_doc.values())
    compile_seconds = first_seconds - warm_seconds
    saved = eager_per_mask - warm_per_mask
    payoff = compile_seconds / saved if saved > 0 else None
    sweep = 1 + len(players)
    print(f"compile time {compile_seconds:.1f} s; {saved:+.3f} s/mask saved ({warm_per_mask / eager_per_mask:.2f}x eager's "
          f"time per mask); pays off after {'never' if payoff is None else f'{payoff:.0f} masks'} (a sublayer sweep is {sweep}); "
          f"{differing}/{documents} per-document values (gold probability) differ from eager, by at most {largest:.2e}", flush=True)
    if args.json_out:
        atomic_write(Path(args.json_out), (json.dumps({
            "machine": machine(), "threads": torch.get_num_threads(), "args": vars(args), "masks": len(masks),
            "compiled_modules": compiled_modules, "eager_seconds": eager_seconds, "compiled_first_seconds": first_seconds,
            "compiled_warm_seconds": warm_seconds,
            "eager_seconds_per_mask": eager_per_mask, "compiled_seconds_per_mask": warm_per_mask, "compile_seconds": compile_seconds, "seconds_saved_per_mask": saved,
            "payoff_masks": payoff, "sublayer_sweep_masks": sweep, "documents_differing": differing, "largest_difference": largest,
            "documents": documents}, indent=2) + "\n").encode())


if __name__ == "__main__":
    main()
