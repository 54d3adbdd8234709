"""The ``cornerstone`` command line: one plain function per command over the Python API.

Errors are turned into a one-line message, a hint and a distinct exit code in one place
(:class:`_ErrorMappingGroup`); ``--debug`` shows the traceback instead. Every command takes
``--json`` and then prints machine-readable JSON on stdout, with progress on stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperGroup

from .errors import ConfigError, CornerstoneError

EXIT_INTERRUPTED = 130
# 25 documents x 4 bundled tasks x 61 evaluations: the README's main job takes ~3 minutes on 2 CPU cores.
DEFAULT_LIMIT = 25
_state = {"debug": False}


class _ErrorMappingGroup(TyperGroup):
    """The CLI edge: every :class:`CornerstoneError` becomes ``error: ...`` plus ``hint: ...`` on stderr."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except CornerstoneError as exc:
            if _state["debug"]:
                raise
            typer.echo(f"error: {exc.message}", err=True)
            if exc.hint:
                typer.echo(f"hint: {exc.hint}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            if _state["debug"]:
                raise
            typer.echo("error: interrupted", err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None


app = typer.Typer(
    cls=_ErrorMappingGroup,
    name="cornerstone",
    help="Find the layers of a language model that matter, and cut the rest.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from .scores import package_versions

        typer.echo(f"cornerstone {package_versions()['cornerstone']}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks instead of one-line errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    _state["debug"] = debug


def _split(values: Optional[str]) -> list[str]:
    return [part.strip() for part in (values or "").split(",") if part.strip()]


def _print_json(payload: Any) -> None:
    typer.echo(payload if isinstance(payload, str) else json.dumps(payload, indent=2))


JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
ModelArgument = Annotated[
    str,
    typer.Argument(help="Hub id, local transformers folder, .gguf file, or bundled alias (see `cornerstone models`)."),
]
IncludePathOption = Annotated[
    Optional[list[Path]],
    typer.Option("--include-path", help="Extra folder of lm-eval task YAMLs (repeatable), as in lm-eval."),
]


@app.command()
def score(
    model: ModelArgument = "smollm2-135m",
    method: Annotated[str, typer.Option(help="ablation (leave one out) or shapley.")] = "ablation",
    estimator: Annotated[
        str, typer.Option(help="Shapley estimator: kernel (KernelSHAP regression, paired, exact border), permutation "
                          "(antithetic, truncated), proximity (the paper's) or exact.")
    ] = "kernel",
    budget: Annotated[int, typer.Option(min=4, help="Shapley sampling: most evaluations to spend.")] = 600,
    target_stderr: Annotated[
        Optional[float], typer.Option("--target-stderr", help="Shapley sampling: stop once every standard error is below this.")
    ] = None,
    window: Annotated[int, typer.Option(min=1, help="Proximity estimator: longest run of consecutive players removed.")] = 3,
    players_: Annotated[
        Optional[str], typer.Option("--players", help="Comma-separated players to score (the rest stay present), e.g. L0.attn,L0.mlp,L1.")
    ] = None,
    store: Annotated[
        Optional[Path], typer.Option(help="Folder keeping every v(S) on disk, so a killed run resumes. Default: ~/.cache/cornerstone/values.")
    ] = None,
    no_store: Annotated[bool, typer.Option("--no-store", help="Keep no values on disk (recompute everything).")] = False,
    granularity: Annotated[str, typer.Option(help="sublayer (Lk.attn, Lk.mlp) or block (Lk).")] = "sublayer",
    tasks: Annotated[
        str, typer.Option(help="Comma-separated lm-eval task names, groups or tags.")
    ] = "cornerstone_bundled",
    include_path: IncludePathOption = None,
    limit: Annotated[
        int,
        typer.Option(min=1, help="Documents per task, drawn at random with --seed. Every removal is one full "
                     "evaluation, so the sweep costs (players + 1) x limit x tasks documents."),
    ] = DEFAULT_LIMIT,
    all_docs: Annotated[bool, typer.Option("--all-docs", help="Use every document of every task (ignores --limit).")] = False,
    seed: Annotated[int, typer.Option(help="Seed for drawing the --limit documents (the same ones for every removal).")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Sequences per forward pass.")] = 32,
    engine: Annotated[
        str, typer.Option(help="fast (reuses work across masks; lm-eval's per-document results) or lm-eval (its own loop per mask).")
    ] = "fast",
    dtype: Annotated[str, typer.Option(help="float32 (reference), bfloat16 (faster on CPUs with AMX) or float16.")] = "float32",
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:N; default: cuda if available.")] = None,
    revision: Annotated[Optional[str], typer.Option(help="Hub revision (branch, tag or commit) of a hub model.")] = None,
    margin: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Cornerstone rule: removal leaves at most this share of the above-chance score.")
    ] = 0.2,
    out: Annotated[Optional[Path], typer.Option(help="Report path (JSON; a PNG plot goes beside it). Default: reports/MODEL-METHOD-GRANULARITY.json.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Score every layer/sublayer of MODEL on the tasks and print the cornerstone report."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from . import report as report_module
    from .estimators import SHAPLEY_ESTIMATORS, Ablation
    from .store import default_store_root
    from .harness import load_tasks
    from .loading import load_model, resolve
    from .scores import CornerstoneRule
    from .scores import score as run_score

    if method not in ("ablation", "shapley"):
        raise ConfigError(f"unknown method '{method}'", hint="Available: ablation, shapley.")
    if method == "shapley" and estimator not in SHAPLEY_ESTIMATORS:
        raise ConfigError(f"unknown Shapley estimator '{estimator}'", hint="Available: " + ", ".join(SHAPLEY_ESTIMATORS) + ".")
    if granularity not in ("sublayer", "block"):
        raise ConfigError(f"unknown granularity '{granularity}'", hint="Use sublayer or block.")
    if engine not in ("fast", "lm-eval"):
        raise ConfigError(f"unknown engine '{engine}'", hint="Use fast or lm-eval.")
    console = Console(stderr=as_json)
    resolve(model)  # a mistyped model path fails here, before the slower task loading
    with console.status("loading tasks"):
        specs = load_tasks(_split(tasks), include_paths=include_path or [], limit=None if all_docs else limit, seed=seed)
    with console.status(f"loading {model} ({dtype}; a GGUF file is dequantised once, then cached)"):
        loaded = load_model(model, dtype=dtype, device=device, revision=revision)
    console.print(f"loaded {model} in {loaded.load_seconds:.1f} s" + (" (cached)" if loaded.from_cache else ""))
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        job = bar.add_task("scoring", total=None)

        def progress(done: int, total: int, label: str) -> None:
            bar.update(job, completed=done, total=total, description=f"scoring: {label}")

        if method == "shapley":
            options = {"permutation": dict(budget=budget, target_stderr=target_stderr, seed=seed),
                       "kernel": dict(budget=budget, target_stderr=target_stderr, seed=seed),
                       "proximity": dict(window=window), "exact": {}}[estimator]
            chosen = SHAPLEY_ESTIMATORS[estimator](granularity=granularity, **options)  # type: ignore[arg-type]
        else:
            chosen = Ablation(granularity=granularity)  # type: ignore[arg-type]
        result = run_score(
            loaded,
            specs,
            estimator=chosen,
            players=_split(players_) or None,
            store=None if no_store else (store or default_store_root()),
            batch_size=batch_size,
            engine=engine,
            rule=CornerstoneRule(margin=margin),
            progress=progress,
        )
    json_path, plot_paths = report_module.save(result, out or report_module.default_report_path(result))
    if as_json:
        _print_json(result.to_json())
        return
    report_module.render(result, console)
    console.print(f"report: {json_path}\nplots:  " + ", ".join(str(p) for p in plot_paths))


@app.command()
def report(
    path: Annotated[Path, typer.Argument(help="A JSON report written by `cornerstone score`.")],
    plot: Annotated[Optional[Path], typer.Option(help="Also (re)draw the PNG sweep plot here.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Re-render a saved score report."""
    from . import report as report_module
    from .scores import ScoreReport

    loaded = ScoreReport.load(path)
    if plot is not None:
        report_module.plot_sweep(loaded, plot)
    if as_json:
        _print_json(loaded.to_json())
        return
    report_module.render(loaded)


@app.command()
def players(
    model: ModelArgument = "smollm2-135m",
    granularity: Annotated[str, typer.Option(help="sublayer or block.")] = "sublayer",
    as_json: JsonOption = False,
) -> None:
    """List the players (removable parts) of MODEL."""
    from .loading import load_model
    from .players import enumerate_players

    if granularity not in ("sublayer", "block"):
        raise ConfigError(f"unknown granularity '{granularity}'", hint="Use sublayer or block.")
    loaded = load_model(model)
    listed = [
        {"name": p.name, "layer": p.layer, "kind": p.kind, "module": p.module_path}
        for p in enumerate_players(loaded.model, granularity)  # type: ignore[arg-type]
    ]
    if as_json:
        _print_json(listed)
        return
    for entry in listed:
        typer.echo(f"{entry['name']:<10} {entry['module']}")


@app.command()
def models(as_json: JsonOption = False) -> None:
    """List the bundled model aliases and whether their packages are installed."""
    import importlib.util

    from .loading import BUNDLED_MODELS

    listed = [
        {
            "alias": alias,
            "package": entry.package,
            "installed": importlib.util.find_spec(entry.package) is not None,
            "install": entry.install,
            "license": entry.license,
        }
        for alias, entry in BUNDLED_MODELS.items()
    ]
    if as_json:
        _print_json(listed)
        return
    for entry in listed:
        state = "installed" if entry["installed"] else f"not installed: {entry['install']}"
        typer.echo(f"{entry['alias']:<14} {state}  ({entry['license']})")


@app.command("tasks")
def list_tasks_command(include_path: IncludePathOption = None, as_json: JsonOption = False) -> None:
    """List the bundled offline tasks (and those under --include-path)."""
    from .harness import BUNDLED_TASK_GROUP, list_tasks

    names = list_tasks(include_path or [], bundled_only=not include_path)
    if as_json:
        _print_json({"group": BUNDLED_TASK_GROUP, "tasks": names})
        return
    typer.echo(f"{BUNDLED_TASK_GROUP} (all bundled tasks)")
    for name in names:
        typer.echo(f"  {name}")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
