"""Benchmark: how close the engine comes to this CPU's matmul bound, and where the rest of its time goes (issue 22).

    python bench/engine_bound.py [--model smollm2-135m] [--tasks cs_real_piqa,cs_real_arc_easy] [--docs 100]

For each task and each dtype (float32, bfloat16), in one run on this machine:

1. the matmul peak *at the model's shapes*: the best FLOP/s of one block's weight matrices and the LM
   head applied to a batch of as many tokens as the engine's batches hold, up to 16 times as many (the
   bound is what the CPU reaches on these weights at any batch: a batch too small to fill the cores is the
   engine's loss, not the bound's), and of attention's two products at the engine's row length;
2. the full single-sublayer sweep (the full model and every attention and MLP removed alone) with the
   engine: seconds per mask, and the matmul bound of the same work, ``linear FLOPs / linear peak +
   attention FLOPs / attention peak``, counted by the engine over the forwards it actually ran (prefix
   reuse, skipped players, scored positions only: ``Engine.linear_flops``, ``attention_flops``); the
   ratio bound / time is the share of the bound reached;
3. a profile of a few masks: self CPU time of matmuls, attention, norms and element-wise ops, the LM head's
   log-softmax and gathers, and the rest of the wall time (Python, scheduling, hooks);
4. lm-eval's own loop (float32) on ``--plain-masks`` masks: seconds per mask, and the engine's per-document
   results on those masks against lm-eval's (float32: equal but for exact ties).

Nothing here is a timed test: it prints ratios measured side by side in one run, with the CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from cornerstone import harness
from cornerstone.estimators import Ablation
from cornerstone.files import atomic_write
from cornerstone.loading import load_model
from cornerstone.players import decoder_layers, enumerate_players, text_config
from cornerstone.provenance import machine
from cornerstone.value import ValueFunction

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")
ATTENTION_OPS = ("aten::_scaled_dot_product", "aten::scaled_dot_product", "aten::softmax", "aten::_softmax")
HEAD_OPS = ("aten::log_softmax", "aten::_log_softmax", "aten::index", "aten::argmax", "aten::index_select", "aten::eq")


def _seconds(fn, repeats: int) -> float:
    """The best of ``repeats`` timed calls after two warm-ups: a peak is what the kernels reach at best
    (a mean takes in the other jobs of a shared machine, and the first calls' allocations)."""
    fn()
    fn()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def peaks(model, tokens: int, rows: int, length: int, repeats: int = 7) -> dict[str, float]:
    """FLOP/s of this model's own matrices: ``linear`` the best over batches of ``tokens`` (the engine's) up to
    16x as many tokens, so the bound is what the CPU reaches on these weights at any batch, not only at the
    batch the engine chose; ``linear_at_engine_batch`` at the engine's; ``attention``, the two products of
    attention at the engine's row length."""
    _, layers = decoder_layers(model)
    weights = [w for w in layers[0].parameters() if w.dim() >= 2] + [model.get_output_embeddings().weight]
    config = text_config(model.config)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads

    def linear_peak(count: int) -> float:
        # one input per width, made before timing (drawing it inside the timed loop made the peak look lower)
        inputs = {w.shape[1]: torch.randn(count, w.shape[1], dtype=model.dtype) for w in weights}

        def linears():
            with torch.inference_mode():
                for w in weights:
                    torch.nn.functional.linear(inputs[w.shape[1]], w)

        return sum(2 * count * w.numel() for w in weights) / _seconds(linears, repeats)

    at_batch = {count: linear_peak(count) for count in (tokens, 2 * tokens, 4 * tokens, 8 * tokens, 16 * tokens)}
    q = torch.randn(rows, heads, length, head_dim, dtype=model.dtype)

    def attention():
        with torch.inference_mode():
            (q @ q.transpose(-1, -2)) @ q

    attention_flops = 4 * rows * heads * length * length * head_dim
    best = max(at_batch, key=at_batch.get)
    return {"linear": at_batch[best], "linear_best_tokens": best, "linear_at_engine_batch": at_batch[tokens],
            "attention": attention_flops / _seconds(attention, repeats)}


def profile_split(value: ValueFunction, masks: list) -> dict[str, float]:
    """Share of wall time per kind of work over ``masks`` (the engine's prefix cache already filled)."""
    from torch.profiler import ProfilerActivity, profile

    engine = value._engine
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in engine.loglikelihoods_many(masks):
            pass
    wall = time.perf_counter() - started
    split = {"matmul": 0.0, "attention": 0.0, "head": 0.0, "norms and element-wise": 0.0}
    for event in prof.key_averages():
        name, seconds = event.key, event.self_cpu_time_total / 1e6
        if not name.startswith("aten::"):
            continue
        kind = ("matmul" if name.startswith(MATMUL_OPS) else "attention" if name.startswith(ATTENTION_OPS)
                else "head" if name.startswith(HEAD_OPS) else "norms and element-wise")
        split[kind] += seconds
    split["python, scheduling, hooks"] = max(0.0, wall - sum(split.values()))
    return {kind: seconds / wall for kind, seconds in split.items()} | {"wall_seconds": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default="cs_real_piqa,cs_real_arc_easy")
    parser.add_argument("--docs", type=int, default=100)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--plain-masks", type=int, default=2, help="Masks timed with lm-eval's own loop (0: skip).")
    parser.add_argument("--profile-masks", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32, help="The engine's rows per forward (cornerstone's default 32).")
    parser.add_argument("--json", dest="json_out", default=None)
    args = parser.parse_args()
    print(f"{machine()}, {torch.get_num_threads()} threads", flush=True)
    rows_out = []
    for task in args.tasks.split(","):
        specs = harness.load_tasks([task], limit=args.docs, seed=0)
        plain_seconds = None
        plain_docs: dict = {}
        for dtype in args.dtypes.split(","):
            loaded = load_model(args.model, dtype=dtype, device="cpu")
            players = enumerate_players(loaded.model)
            started = time.perf_counter()
            value = ValueFunction(loaded, specs, batch_size=args.batch_size)
            result = Ablation().estimate(value, players)
            seconds = time.perf_counter() - started
            engine = value._engine
            masks = 1 + len(players)
            batches = engine.batches
            tokens = int(statistics.median(b.inputs.numel() for b in batches))
            rows = int(statistics.median(b.inputs.shape[0] for b in batches))
            length = int(statistics.median(b.inputs.shape[1] for b in batches))
            peak = peaks(loaded.model, tokens, rows, length)
            bound = engine.linear_flops / peak["linear"] + engine.attention_flops / peak["attention"]
            split = profile_split(value, [[p] for p in players[:args.profile_masks]])
            row = {"task": task, "dtype": dtype, "docs": len(specs[0].doc_indices), "masks": masks,
                   "seconds_per_mask": seconds / masks, "bound_seconds_per_mask": bound / masks,
                   "share_of_bound": bound / seconds, "linear_peak_tflops": peak["linear"] / 1e12,
                   "linear_peak_tokens": peak["linear_best_tokens"],
                   "linear_at_engine_batch_tflops": peak["linear_at_engine_batch"] / 1e12,
                   "attention_peak_tflops": peak["attention"] / 1e12, "batch_tokens": tokens, "profile": split,
                   "full_score": result.full.score}
            if dtype == "float32" and args.plain_masks:
                reference = ValueFunction(loaded, specs, engine="lm-eval", batch_size=args.batch_size)
                chosen = [[]] + [[p] for p in players[:args.plain_masks - 1]]
                started = time.perf_counter()
                plain = reference.evaluate_many(chosen)
                plain_seconds = (time.perf_counter() - started) / len(chosen)
                ours = value.evaluate_many(chosen)
                differing = sum(a != b for x, y in zip(plain, ours) for t in x.per_doc for a, b in zip(x.per_doc[t], y.per_doc[t]))
                plain_docs = {"masks": len(chosen), "documents_differing": differing,
                              "documents": sum(len(v) for x in plain for v in x.per_doc.values())}
            if plain_seconds:
                row["plain_lm_eval_seconds_per_mask"] = plain_seconds
                row["speedup_over_plain"] = plain_seconds / row["seconds_per_mask"]
                row["plain_check"] = plain_docs
            rows_out.append(row)
            print(f"{task} {dtype}: {row['seconds_per_mask']:.3f} s/mask, bound {row['bound_seconds_per_mask']:.3f} s/mask "
                  f"({row['share_of_bound']:.0%} of it; peaks {row['linear_peak_tflops']:.3f} linear at "
                  f"{peak['linear_best_tokens']} tokens, {row['linear_at_engine_batch_tflops']:.3f} at the engine's "
                  f"{tokens} tokens/batch, {row['attention_peak_tflops']:.3f} attention TFLOP/s)"
                  + (f", {row['speedup_over_plain']:.1f}x lm-eval's loop ({plain_seconds:.2f} s/mask, float32; "
                     f"{plain_docs['documents_differing']}/{plain_docs['documents']} documents differ)" if plain_seconds else ""),
                  flush=True)
            print("   profile: " + ", ".join(f"{k} {v:.0%}" for k, v in split.items() if k != "wall_seconds"), flush=True)
            if args.json_out:  # after every row: a run stopped early keeps what it measured
                atomic_write(Path(args.json_out), (json.dumps({"machine": machine(), "threads": torch.get_num_threads(),
                                                               "rows": rows_out, "args": vars(args)}, indent=2) + "\n").encode())


if __name__ == "__main__":
    main()
