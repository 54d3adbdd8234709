"""Benchmark: Shapley estimators against exact Shapley values on a real reduced layer game.

    python bench/shapley_estimators.py [--players L25.attn,...] [--docs 50] [--budgets 64,128,256] [--seeds 20]

The game: SmolLM2-135M (float32), a fixed slice of ARC-Easy from ../shared/data, and a chosen subset
of sublayers as players (every other sublayer stays present). Every one of its 2^n coalitions is
evaluated once (exact Shapley, the ground truth; values kept in the on-disk store, so a re-run is
free). Each estimator is then run at equal evaluation budgets over several seeds, drawing its values
from the evaluated game, and the table gives its root-mean-square error against exact (mean over
seeds), the evaluations it used, and its wall time: the measured seconds of the evaluations it
used plus its own computation. Estimators: the paper's proximity estimator, plain permutation
sampling, antithetic and truncated permutation sampling, KernelSHAP (regression and unbiased), and
shapiq's approximators when shapiq is installed.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from cornerstone import harness
from cornerstone.estimators import ExactShapley, Game, KernelShapley, PermutationShapley, Proximity
from cornerstone.loading import load_model
from cornerstone.players import parse_players
from cornerstone.store import default_store_root
from cornerstone.value import ValueFunction

DEFAULT_PLAYERS = ",".join(f"L{layer}.{kind}" for layer in range(25, 30) for kind in ("attn", "mlp"))


def shapiq_estimators():
    try:
        import shapiq
    except ImportError:
        return {}
    return {f"shapiq {name}": getattr(shapiq, name) for name in ("KernelSHAP", "UnbiasedKernelSHAP", "PermutationSamplingSV",
                                                                 "SVARM", "StratifiedSamplingSV")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--players", default=DEFAULT_PLAYERS)
    parser.add_argument("--docs", type=int, default=50)
    parser.add_argument("--budgets", default="64,128,256")
    parser.add_argument("--seeds", type=int, default=20)
    args = parser.parse_args()

    specs = harness.load_tasks(["cs_real_arc_easy"], limit=args.docs, seed=0)
    loaded = load_model("smollm2-135m", dtype="float32", device="cpu")
    players = parse_players(loaded.model, args.players)
    n = len(players)
    value = ValueFunction(loaded, specs, store=default_store_root())
    print(f"game: {n} players ({args.players}), {args.docs} ARC-Easy docs, 2^{n} = {2**n} coalitions; "
          f"{len(value.store) if value.store else 0} already in the store")

    started = time.perf_counter()
    exact = ExactShapley(max_players=16).estimate(value, players)
    print(f"exact: {time.perf_counter() - started:.0f} s ({value.evaluations} evaluated, {value.reused} from the store), "
          f"v(N) {exact.diagnostics['v_full']:.4f}, v(empty) {exact.diagnostics['v_empty']:.4f}")
    truth = np.array([exact.players[p.name].importance for p in players])
    for p, phi in zip(players, truth):
        print(f"  {p.name:<9} phi {phi:+.4f}   v(N \\ i) {exact.players[p.name].score_removed:.4f}")

    seconds_of = {}
    for key, evaluation in value._memo.items():
        seconds_of[frozenset(i for i, p in enumerate(players) if p.name in key)] = evaluation.seconds
    score_of = {removed: value._memo[frozenset(players[i].name for i in removed)].score for removed in seconds_of}
    mean_seconds = float(np.mean(list(seconds_of.values())))

    def run(estimate) -> tuple[float, int, float]:
        game = Game(lambda removed_sets: [score_of[r] for r in removed_sets], n)
        started = time.perf_counter()
        values = estimate(game)
        compute = time.perf_counter() - started
        used = sum(seconds_of[r] for r in game.values)
        return float(np.sqrt(np.mean((values - truth) ** 2))), game.evaluations, used + compute

    ours = {
        "plain permutation": lambda budget, seed: PermutationShapley(budget=budget, seed=seed, antithetic=False, truncation=0.0),
        "antithetic permutation": lambda budget, seed: PermutationShapley(budget=budget, seed=seed, truncation=0.0),
        "antithetic + truncated permutation": lambda budget, seed: PermutationShapley(budget=budget, seed=seed),
        "kernel (unbiased, paired, border)": lambda budget, seed: KernelShapley(budget=budget, seed=seed, variant="unbiased"),
        "kernel (regression, paired, border; default)": lambda budget, seed: KernelShapley(budget=budget, seed=seed),
    }
    print(f"\nmean measured seconds per evaluation: {mean_seconds:.2f}")
    print(f"{'estimator':<48} {'budget':>6} {'RMSE':>8} {'x plain':>8} {'evals':>6} {'wall s':>8}")
    rmse, evals, wall = run(lambda game: Proximity(window=3).shapley(game).values)
    print(f"{'proximity (paper, k=3)':<48} {'-':>6} {rmse:8.4f} {'':>8} {evals:6d} {wall:8.1f}")
    for budget in [int(b) for b in args.budgets.split(",")]:
        plain_rmse = None
        for label, make in ours.items():
            runs = [run(lambda game, seed=seed: make(budget, seed).shapley(game).values) for seed in range(args.seeds)]
            rmse, evals, wall = (float(np.mean(column)) for column in zip(*runs))
            plain_rmse = plain_rmse or rmse
            print(f"{label:<48} {budget:6d} {rmse:8.4f} {rmse / plain_rmse:8.2f} {evals:6.0f} {wall:8.1f}")
        for label, approximator in shapiq_estimators().items():
            def shapiq_values(game: Game, seed: int, approximator=approximator) -> np.ndarray:
                def batch(coalitions: np.ndarray) -> np.ndarray:
                    return game([frozenset(np.flatnonzero(~row).tolist()) for row in coalitions.astype(bool)])
                result = approximator(n=n, random_state=seed, **({"max_order": 1, "index": "SV"} if "Kernel" in label else {}))
                return np.asarray(result.approximate(budget=budget, game=batch).get_n_order_values(1))
            try:
                runs = [run(lambda game, seed=seed: shapiq_values(game, seed)) for seed in range(args.seeds)]
            except Exception as exc:  # shapiq's API moves; report instead of failing the benchmark
                print(f"{label:<48} {budget:6d} failed: {type(exc).__name__}: {exc}")
                continue
            rmse, evals, wall = (float(np.mean(column)) for column in zip(*runs))
            print(f"{label:<48} {budget:6d} {rmse:8.4f} {rmse / plain_rmse:8.2f} {evals:6.0f} {wall:8.1f}")


if __name__ == "__main__":
    main()
