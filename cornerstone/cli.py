"""The ``cornerstone`` command line: one plain function per command over the Python API.

Errors are turned into a one-line message, a hint and a distinct exit code in one place
(:class:`_ErrorMappingGroup`); ``--debug`` shows the traceback instead. Every command takes
``--json`` and then prints machine-readable JSON on stdout, with progress on stderr.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import click
import typer
from typer.core import TyperGroup

from .distributed import ERROR_FILE
from .errors import ConfigError, CornerstoneError, OutputError
from .heal import Healing
from .planner import Planner
from .proxies import AVSS
from .settings import CalibrationText, EvalSettings, EvalTasks, ExportSettings, ScoreSettings, TaskSelection
from .costs import ProfileSettings

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
EXIT_TERMINATED = 143  # 128 + SIGTERM
_state = {"debug": False}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every ``finally`` and staging clean-up runs before exit."""


def _raise_terminated(_signum: int, _frame: Any) -> None:
    raise Terminated()


# what a stopped command keeps for its re-run: the value store (every measured value, as it is made), a heal's
# checkpoints; a command not named here starts over
_RESUMES = {
    "score": "re-run the same command to resume from the value store",
    "plan": "re-run the same command to resume from the value store (a greedy or beam search's measured values)",
    "run": "re-run the same command to resume from the value store (and a heal from its last checkpoint)",
    "heal": "re-run the same command to resume from its last checkpoint (written every --checkpoint-every steps)",
}


class _ErrorMappingGroup(TyperGroup):
    """The CLI edge: every :class:`CornerstoneError` becomes ``error: ...`` plus ``hint: ...`` on stderr."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except CornerstoneError as exc:
            _fail(exc)
        except KeyboardInterrupt as exc:
            if _state["debug"]:
                raise
            terminated = isinstance(exc, Terminated)
            _report(f"{'terminated (SIGTERM)' if terminated else 'interrupted'}",
                    f"nothing half-written was left; {_RESUMES.get(ctx.invoked_subcommand, 're-run the same command')}.",
                    EXIT_TERMINATED if terminated else EXIT_INTERRUPTED)
        except _USAGE_ERRORS as exc:
            _usage_error(exc)
        except ValueError as exc:
            # a value the OS cannot take as a path, which no check above caught: a NUL byte (from a recipe,
            # say) or text that is not UTF-8; any other ValueError is a bug and keeps its traceback
            if not (isinstance(exc, UnicodeEncodeError) or "embedded null byte" in str(exc)):
                raise
            problem = "contains a NUL byte" if "null byte" in str(exc) else "is not UTF-8 text"
            _fail(ConfigError(f"a path or name {problem}", hint=_TEXT_HINT), exc)
        except OSError as exc:
            # a path the system refuses (too long, a loop of links, a device gone) that no check above caught
            name = exc.filename
            where = f" '{_printable(os.fsdecode(name) if isinstance(name, (str, bytes)) else str(name))}'" if name else ""
            _fail(ConfigError(f"cannot use{where}: {exc.strerror or exc}",
                              hint="Check the paths given on the command line (or in the recipe)."), exc)

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        try:
            _check_arguments(self, ctx, args)
            return super().parse_args(ctx, args)
        except CornerstoneError as exc:
            _fail(exc)
        except _USAGE_ERRORS as exc:
            _usage_error(exc)


def _report(message: str, hint: str, code: int, kind: str = "CornerstoneError") -> NoReturn:
    """Print ``error: MESSAGE`` and ``hint: HINT`` on stderr and exit with ``code``.

    A rank of a multi-process job (:func:`cornerstone.distributed.launch` names a file in
    ``$CORNERSTONE_ERROR_FILE``) writes them to that file instead: the launcher prints the error once.
    """
    path = os.environ.get(ERROR_FILE)
    if path:
        try:
            Path(path).write_text(json.dumps({"type": kind, "message": message, "hint": hint, "exit_code": code}),
                                  encoding="utf-8")
        except OSError:
            path = None
    if not path:
        typer.echo(f"error: {message}", err=True)
        if hint:
            typer.echo(f"hint: {hint}", err=True)
    raise typer.Exit(code)


def _fail(error: CornerstoneError, cause: BaseException | None = None) -> NoReturn:
    if _state["debug"]:
        raise cause or error
    _report(error.message, error.hint, error.exit_code, type(error).__name__)


def _check_arguments(group: TyperGroup, ctx: Any, args: list[str]) -> None:
    """Refuse, before any work, a command-line argument that is not UTF-8 text (bytes such as \\xff in a
    path arrive as surrogates) or holds a NUL byte: it would be written into the report, the plan or a
    file name at the very end, and the run's result lost there."""
    command = next((group.get_command(ctx, argument) for argument in args if argument in group.commands), None)
    for position, argument in enumerate(args):
        try:
            argument.encode("utf-8")
            if "\0" not in argument:
                continue
            problem = "contains a NUL byte"
        except UnicodeEncodeError:
            problem = "is not UTF-8 text"
        option, _, value = argument.partition("=") if argument.startswith("--") and "=" in argument else ("", "", argument)
        if not option and position and _takes_value(command, args[position - 1]):
            option = args[position - 1]
        raise ConfigError(f"{option or 'argument'} '{_printable(value)}' {problem}", hint=_TEXT_HINT)


_TEXT_HINT = ("Give paths and names as UTF-8 text without NUL bytes (rename the file or folder); every path is "
              "written into reports, plans and exports as UTF-8.")


def _printable(text: str) -> str:
    """``text`` with the bytes that are not UTF-8 shown as ``\\xff`` and NUL as ``\\0``, so the message can be printed."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace").replace("\0", "\\0")


def _takes_value(command: Any, option: str) -> bool:
    for parameter in getattr(command, "params", ()):
        if option in getattr(parameter, "opts", ()):
            return not (getattr(parameter, "is_flag", False) or getattr(parameter, "count", False))
    return False


def _usage_error_types() -> tuple[type[Exception], ...]:
    found: list[type[Exception]] = [click.UsageError]
    try:  # recent typer releases parse with their own vendored copy of click
        from typer._click.exceptions import UsageError as VendoredUsageError
    except ImportError:
        pass
    else:
        found.append(VendoredUsageError)
    return tuple(found)


_USAGE_ERRORS = _usage_error_types()


def _usage_error(exc: Any) -> NoReturn:
    """A bad option or argument: one line and a hint, like every other error, instead of click's usage box."""
    if _state["debug"]:
        raise exc
    command = exc.ctx.command_path if exc.ctx is not None else "cornerstone"
    _report(exc.format_message(), f"see `{command} --help`", exc.exit_code)


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
        from .provenance import package_versions

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


def _default(model: type[Any], field: str) -> Any:
    """An option's default: the settings model's (:mod:`cornerstone.settings`), the one set of defaults
    that the CLI, recipes and the API share."""
    return model.model_fields[field].get_default(call_default_factory=True)


def _split(values: Optional[str]) -> list[str]:
    return [part.strip() for part in (values or "").split(",") if part.strip()]


def _number(low: float | None = None, high: float | None = None, *, above: bool = False) -> Callable[[Any], float]:
    """The parser of a float option: a finite number, at least ``low`` (more than ``low`` with ``above``) and at
    most ``high``. typer's own ``min``/``max`` let nan and inf through wherever no bound happens to stop them."""

    def parse(value: Any) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise typer.BadParameter(f"'{value}' is not a number") from None
        if not math.isfinite(number):
            raise typer.BadParameter(f"{value} is not a finite number")
        if low is not None and (number <= low if above else number < low):
            raise typer.BadParameter(f"{value} is not {'more than' if above else 'at least'} {low:g}")
        if high is not None and number > high:
            raise typer.BadParameter(f"{value} is more than {high:g}")
        return number

    return parse


def _device_option(value: Optional[str]) -> Optional[str]:
    """``--device``: one this machine has (see :func:`cornerstone.loading.resolve_device`), checked before any work."""
    if value is not None:
        from .loading import resolve_device

        resolve_device(value)
    return value


def _output_file(path: Optional[Path]) -> Optional[Path]:
    """``--out`` of a long command: refused before any work when it cannot be written (a folder, under a
    file, in a folder that is not writable, a name too long), instead of after the run, at save."""
    if path is None:
        return None
    import tempfile

    existing = path.parent
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot write '{path}': '{existing}' is a file, not a folder")
    longest = os.pathconf(existing, "PC_NAME_MAX")
    if any(len(os.fsencode(part)) > longest for part in path.parts):
        raise OutputError(f"cannot write '{path}': a name in it is longer than {longest} bytes")
    if path.is_dir():
        raise OutputError(f"--out '{path}' is a folder", hint=f"Give a file path, e.g. {path / 'result.json'}.")
    try:  # a real write says what permissions, read-only mounts and root's exemptions allow; it leaves no file
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as exc:
        raise OutputError(f"cannot write '{path}': the folder '{existing}' is not writable ({exc.strerror or exc})") from None
    return path


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def _device_map_option(value: Optional[str]) -> Optional[str]:
    if value is not None and value not in DEVICE_MAPS:
        raise ConfigError(f"--device-map '{value}' is not a placement (use one of: {', '.join(DEVICE_MAPS)})",
                          hint="--device-map auto spreads a model larger than one device over GPUs, CPU and disk.")
    return value


def _memory_option(value: Optional[str]) -> Optional[str]:
    _memory_map(value)
    return value


def _memory_map(text: Optional[str]) -> dict[Any, Any] | None:
    """``0=70GiB,cpu=200GiB`` as accelerate's ``max_memory`` ({0: "70GiB", "cpu": "200GiB"}): devices are GPU
    indices, cpu or disk; amounts are bytes or a number with a unit. Anything else is a :class:`ConfigError`
    naming the entry, before the model is loaded."""
    if not text:
        return None
    from accelerate.utils import convert_file_size_to_int, get_max_memory

    devices = [*get_max_memory(), "disk"]  # what accelerate can place weights on here: GPU indices, cpu, mps
    hint = (f"Write DEVICE=AMOUNT entries, e.g. 0=70GiB,1=70GiB,cpu=200GiB; devices here: "
            f"{', '.join(map(str, devices))}.")
    memory: dict[Any, Any] = {}
    for item in _split(text):
        device, _, amount = (part.strip() for part in item.partition("="))
        key = int(device) if device.isdecimal() and device.isascii() else device
        if key not in devices:
            raise ConfigError(f"--max-memory entry '{item}' names no device of this machine ('{device}')", hint=hint)
        size: Any = int(amount) if amount.isdecimal() and amount.isascii() else amount  # accelerate takes bytes as an int
        try:
            if convert_file_size_to_int(size) <= 0:
                raise ValueError
        except (ValueError, OverflowError):  # OverflowError: "infGB"
            raise ConfigError(f"--max-memory entry '{item}': '{amount}' is not an amount of memory", hint=hint) from None
        memory[key] = size
    return memory


def _option_error(exc: Any, hints: dict[str, str], command: str, what: str) -> ConfigError:
    """The first problem pydantic found in ``what`` settings made from options, as one line naming the option
    and the value (pydantic's own text spans lines and ends in a documentation URL); ``hints`` by field."""
    first = exc.errors()[0]
    # the task selection's fields are options of their own (--limit, --objective), not a --tasks section
    location = first["loc"][1:] if first["loc"][:1] == ("tasks",) and len(first["loc"]) > 1 else first["loc"]
    field = str(location[0]) if location else ""
    message = first["msg"].removeprefix("Value error, ")
    given = "" if first["type"] == "value_error" or "input" not in first else f" (got {first['input']!r})"
    named = f"option --{field.replace('_', '-')}" if field else "options"  # a check across fields names none
    return ConfigError(f"invalid {what} {named}: {message}{given}",
                       hint=hints.get(field, f"See `cornerstone {command} --help`."))


def _without_option(argv: list[str], option: str) -> list[str]:
    """``argv`` without ``option`` and its value (``--option N`` or ``--option=N``)."""
    kept, skip = [], False
    for argument in argv:
        if skip:
            skip = False
        elif argument == option:
            skip = True
        elif not argument.startswith(option + "="):
            kept.append(argument)
    return kept


def _print_json(payload: Any) -> None:
    typer.echo(payload if isinstance(payload, str) else json.dumps(payload, indent=2))


JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
ModelArgument = Annotated[
    str,
    typer.Argument(help="Hub id, local transformers folder, .gguf file, or bundled alias (see `cornerstone models`)."),
]
TrustRemoteCodeOption = Annotated[
    bool, typer.Option("--trust-remote-code", help="Let a model folder run its own modeling code (auto_map). Off by default: "
                       "that code runs on this machine. cornerstone's own DeciLM exports need no flag.")]
AllowPickleOption = Annotated[
    bool, typer.Option("--allow-pickle", help="Load pickled .bin weights. Off by default: unpickling runs code from the file.")]
DeviceOption = Annotated[Optional[str], typer.Option(callback=_device_option,
                                                     help="cpu, cuda, cuda:N (or mps); default: cuda if available.")]
IncludePathOption = Annotated[
    Optional[list[Path]],
    typer.Option("--include-path", help="Extra folder of lm-eval task YAMLs (repeatable), as in lm-eval."),
]


@app.command()
def score(
    model: ModelArgument = "smollm2-135m",
    method: Annotated[str, typer.Option(help="ablation (leave one out), shapley, or a one-pass proxy: avss (activation "
                                        "variance/sparsity), bi (block influence), angular (angular distance) or cosine (sublayer cosine).")] = _default(ScoreSettings, "method"),
    estimator: Annotated[
        str, typer.Option(help="Shapley estimator: kernel (KernelSHAP regression, paired, exact border), permutation "
                          "(antithetic, truncated), proximity (the paper's) or exact.")
    ] = _default(ScoreSettings, "estimator"),
    budget: Annotated[int, typer.Option(min=4, help="Shapley sampling: most evaluations to spend.")] = _default(ScoreSettings, "budget"),
    target_stderr: Annotated[
        Optional[float], typer.Option("--target-stderr", parser=_number(0, above=True), metavar="FLOAT", help="Shapley sampling: stop once every standard error is below this.")
    ] = _default(ScoreSettings, "target_stderr"),
    window: Annotated[int, typer.Option(min=1, help="Proximity estimator: longest run of consecutive players removed.")] = _default(ScoreSettings, "window"),
    players_: Annotated[
        Optional[str], typer.Option("--players", help="Comma-separated players to score (the rest stay present), e.g. L0.attn,L0.mlp,L1.")
    ] = None,
    store: Annotated[
        Optional[Path], typer.Option(help="Folder keeping every v(S) on disk, so a killed run resumes. Default: ~/.cache/cornerstone/values.")
    ] = None,
    no_store: Annotated[bool, typer.Option("--no-store", help="Keep no values on disk (recompute everything).")] = False,
    granularity: Annotated[
        Optional[str], typer.Option(help="sublayer (Lk.attn, Lk.mlp) or block (Lk). Default: sublayer; block for bi, angular and avss.")
    ] = None,
    tasks: Annotated[
        str, typer.Option(help="Comma-separated lm-eval task names, groups or tags.")
    ] = ",".join(_default(TaskSelection, "names")),
    calibration: Annotated[
        str, typer.Option(help="Proxies: the text read in the one pass: tasks (the --tasks documents), bundled, or a "
                          ".txt/.jsonl/.json file.")
    ] = _default(CalibrationText, "source"),
    calibration_samples: Annotated[int, typer.Option("--calibration-samples", min=1, help="Proxies: most calibration texts.")] = _default(CalibrationText, "samples"),
    max_length: Annotated[int, typer.Option("--max-length", min=2, help="Proxies: tokens per calibration text.")] = _default(CalibrationText, "max_length"),
    avss_threshold: Annotated[
        float, typer.Option("--avss-threshold", parser=_number(0), metavar="FLOAT", help="AVSS: an entry is near zero below this share of its token's RMS.")
    ] = _default(AVSS, "threshold"),
    avss_absolute: Annotated[bool, typer.Option("--avss-absolute", help="AVSS: the threshold is absolute, not relative to the RMS.")] = False,
    avss_epsilon: Annotated[float, typer.Option("--avss-epsilon", parser=_number(0), metavar="FLOAT", help="AVSS: added to the sparsity before dividing.")] = _default(AVSS, "epsilon"),
    avss_share: Annotated[float, typer.Option("--avss-share", parser=_number(0, 1), metavar="FLOAT", help="AVSS: cumulative share of the pruning candidates.")] = _default(AVSS, "prune_share"),
    outlier: Annotated[
        float, typer.Option(parser=_number(1), metavar="FLOAT", help="Proxies' cornerstone rule: importance at least this many times the median of its kind.")
    ] = _default(ScoreSettings, "outlier"),
    include_path: IncludePathOption = None,
    limit: Annotated[
        int,
        typer.Option(min=1, help="Documents per task, drawn at random with --seed. Every removal is one full "
                     "evaluation, so the sweep costs (players + 1) x limit x tasks documents."),
    ] = _default(TaskSelection, "limit"),
    all_docs: Annotated[bool, typer.Option("--all-docs", help="Use every document of every task (ignores --limit).")] = False,
    objective: Annotated[str, typer.Option(help="accuracy (lm-eval's, 0/1 per document), probability (the gold "
                                           "answer's, continuous: less noise per document) or divergence (exp(-KL) of "
                                           "the choice distribution from the full model's; on a text:FILE task, of every next-token "
                                           "distribution: no labels needed).")
                         ] = _default(TaskSelection, "objective"),
    until_resolved: Annotated[
        Optional[int], typer.Option("--until-resolved", min=2, metavar="MAX_DOCS",
                                    help="Ablation: start at --limit documents per task and double them while a player's "
                                    "cornerstone decision (or side of --boundary) is within its interval, up to MAX_DOCS.")
    ] = None,
    boundary: Annotated[
        Optional[int], typer.Option(min=1, help="With --until-resolved: the number of players a plan will drop; resolve "
                                    "which side of that boundary each player is on.")
    ] = None,
    seed: Annotated[int, typer.Option(help="The run's one seed: the --limit documents (the same ones for every removal), the calibration texts and the Shapley sampling.")] = _default(TaskSelection, "seed"),
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Sequences per forward pass.")] = _default(ScoreSettings, "batch_size"),
    engine: Annotated[
        str, typer.Option(help="fast (reuses work across masks; lm-eval's per-document results) or lm-eval (its own loop per mask).")
    ] = _default(ScoreSettings, "engine"),
    dtype: Annotated[str, typer.Option(help="float32 (reference), bfloat16 (faster on CPUs with AMX) or float16.")] = "float32",
    device: DeviceOption = None,
    revision: Annotated[Optional[str], typer.Option(help="Hub revision (branch, tag or commit) of a hub model.")] = None,
    margin: Annotated[
        float, typer.Option(parser=_number(0, 1), metavar="FLOAT", help="Cornerstone rule: removal leaves at most this share of the above-chance score.")
    ] = _default(ScoreSettings, "margin"),
    out: Annotated[Optional[Path], typer.Option(callback=_output_file, help="Report path (JSON; a PNG plot goes beside it). Default: cornerstone-output/MODEL-METHOD-GRANULARITY.json.")] = None,
    num_processes: Annotated[
        int, typer.Option("--num-processes", min=1, help="Split the evaluations over this many processes (torch.distributed; "
                          "one model replica each, one GPU each on a GPU machine).")
    ] = 1,
    force: Annotated[bool, typer.Option("--force", help="Run even when the estimate says the memory will not suffice.")] = False,
    device_map: Annotated[
        Optional[str], typer.Option("--device-map", callback=_device_map_option, help="auto: place a model larger than one device across GPUs, CPU and disk (accelerate).")
    ] = None,
    max_memory: Annotated[
        Optional[str], typer.Option("--max-memory", callback=_memory_option, help="With --device-map: most memory per device, e.g. 0=70GiB,1=70GiB,cpu=200GiB.")
    ] = None,
    trust_remote_code: TrustRemoteCodeOption = False,
    allow_pickle: AllowPickleOption = False,
    as_json: JsonOption = False,
) -> None:
    """Score every layer/sublayer of MODEL on the tasks and print the cornerstone report."""
    from . import distributed

    if device_map is not None and (num_processes > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        raise ConfigError("--device-map spreads one replica over every device; it cannot be combined with several processes",
                          hint="Use --device-map for a model larger than one device, --num-processes for one that fits.")
    if max_memory is not None and device_map is None:
        raise ConfigError("--max-memory applies with --device-map", hint="Add --device-map auto, or drop --max-memory.")
    placement = {"device_map": device_map, "max_memory": _memory_map(max_memory)} if device_map else {}
    ranks = distributed.from_environment()
    from pydantic import ValidationError
    from rich.console import Console

    from . import report as report_module
    from .loading import load_model, resolve
    from .scores import score as run_score

    try:
        settings = ScoreSettings(
            method=method, estimator=estimator, granularity=granularity, budget=budget, target_stderr=target_stderr,
            window=window, players=_split(players_) or None, batch_size=batch_size, engine=engine, margin=margin,
            outlier=outlier, store=False if no_store else str(store) if store else True, until_resolved=until_resolved,
            boundary=boundary, force=force,
            tasks=TaskSelection(names=_split(tasks), include_paths=[str(p) for p in include_path or []],
                                limit=None if all_docs else limit, seed=seed, objective=objective),  # type: ignore[arg-type]
            calibration=CalibrationText(source=calibration, samples=calibration_samples, max_length=max_length),
            avss=dict(threshold=avss_threshold, relative=not avss_absolute, epsilon=avss_epsilon, prune_share=avss_share))
    except ValidationError as exc:
        raise _option_error(exc, {}, "score", "scoring") from None
    console = Console(stderr=as_json, quiet=ranks is not None and not ranks.main)
    device = distributed.rank_device(ranks, device)
    resolve(model)  # a mistyped model path fails here, before the slower task loading
    with console.status("loading tasks"):
        specs = settings.tasks.load()
    if num_processes > 1 and ranks is None:
        # every option, the model path and the tasks are checked above, once, before the ranks start
        distributed.launch(num_processes, _without_option(sys.argv[1:], "--num-processes"))
        return
    with console.status(f"loading {model} ({dtype}; a GGUF file is dequantised once, then cached)"):
        loaded = load_model(model, dtype=dtype, device=device, revision=revision, trust_remote_code=trust_remote_code,
                            allow_pickle=allow_pickle, **placement)
    console.print(f"loaded {model} in {loaded.load_seconds:.1f} s" + (" (cached)" if loaded.from_cache else ""))
    if "device_map" in loaded.extra:
        from collections import Counter

        counts = Counter(loaded.extra["device_map"].values())
        console.print("placed: " + (", ".join(f"{count} modules on {where}" for where, count in counts.items())
                                    or f"the whole model on {loaded.device}"))
    with _progress_bar(console, "scoring") as progress:
        # the sequential rounds draw their own documents, from the task names
        result = run_score(loaded, None if settings.until_resolved else specs, settings, progress=progress, ranks=ranks,
                           on_estimate=lambda estimate: console.print(estimate.describe()), log=console.print)
    if ranks is not None and not ranks.main:
        return  # every rank holds the same report; rank 0 writes and prints it
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


def _share_between_0_and_1(value: float) -> float:
    if not 0.0 < value < 1.0:
        raise typer.BadParameter(f"{value} is not a share strictly between 0 and 1.")
    return value


@app.command()
def compare(
    reports: Annotated[list[Path], typer.Argument(help="Two or more JSON score reports of the same model (any methods).")],
    bottom: Annotated[
        float, typer.Option(callback=_share_between_0_and_1, help="Share of players in the bottom set whose overlap is compared.")
    ] = 0.25,
    out: Annotated[Optional[Path], typer.Option(help="Also save the comparison here (JSON; Markdown beside it).")] = None,
    as_json: JsonOption = False,
) -> None:
    """How much do importance methods agree? Rank correlations and bottom-set overlap of score reports."""
    from . import compare as compare_module

    comparison = compare_module.compare_reports(reports, bottom=bottom)
    saved = compare_module.save(comparison, out) if out is not None else None
    if as_json:
        _print_json(comparison.model_dump_json(indent=2))
        if saved:
            typer.echo(f"saved: {saved[0]}, {saved[1]}", err=True)
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"agreement on {comparison.model}: {len(comparison.players)} {comparison.granularity} players, "
                        f"bottom set of {comparison.bottom_k}")
    for column in ("a", "b", "spearman", "kendall tau-b", f"bottom-{comparison.bottom_k} overlap"):
        table.add_column(column, justify="left" if column in ("a", "b") else "right")
    for pair in comparison.pairs:
        table.add_row(pair.a, pair.b, f"{pair.spearman:+.3f}", f"{pair.kendall:+.3f}", f"{pair.bottom_overlap:.0%}")
    console.print(table)
    for entry in comparison.methods:
        console.print(f"bottom set of {entry.label}: {', '.join(entry.bottom_set)}", highlight=False)
    if comparison.cornerstone_ranks:
        ranks = Table(title="cornerstone ranks (1 = most important)")
        ranks.add_column("player")
        for label in comparison.labels:
            ranks.add_column(label, justify="right")
        for name, by_label in comparison.cornerstone_ranks.items():
            ranks.add_row(name, *(str(by_label[label]) for label in comparison.labels))
        console.print(ranks)
    for note in comparison.notes:
        typer.echo(f"note: {note}")
    if saved:
        typer.echo(f"saved: {saved[0]}, {saved[1]}")


@app.command()
def players(
    model: ModelArgument = "smollm2-135m",
    granularity: Annotated[str, typer.Option(help="sublayer or block.")] = "sublayer",
    trust_remote_code: TrustRemoteCodeOption = False,
    allow_pickle: AllowPickleOption = False,
    as_json: JsonOption = False,
) -> None:
    """List the players (removable parts) of MODEL."""
    from .loading import load_model
    from .players import enumerate_players

    if granularity not in ("sublayer", "block"):
        raise ConfigError(f"unknown granularity '{granularity}'", hint="Use sublayer or block.")
    loaded = load_model(model, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
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


@app.command()
def plan(
    report: Annotated[Path, typer.Argument(help="A JSON report written by `cornerstone score`.")],
    drop: Annotated[Optional[str], typer.Option(help="How much to drop: a number of players (8) or a share of parameters "
                                                "(25%). Needed unless --target is given.")] = None,
    policy: Annotated[str, typer.Option(help="lowest (one shot by importance), greedy (remove one, re-measure the rest, "
                                        "repeat; loads the model), beam (greedy keeping --width paths), contiguous "
                                        "(the lowest-importance run of consecutive players) or fit (the least "
                                        "importance meeting --target on --profile's measured costs; greedy also plans "
                                        "to --target, measuring).")] = _default(Planner, "policy"),
    target: Annotated[Optional[list[str]], typer.Option("--target", help="fit, greedy: a cost target (repeatable), "
                                                        "instead of --drop: kv:50% "
                                                        "(share of the KV cache kept), weights:70% or weights:90MB, "
                                                        "decode:1.3x or decode:4ms, prefill:1.2x or prefill:30ms.")] = None,
    profile: Annotated[Optional[Path], typer.Option(help="fit, greedy: the cost profile (`cornerstone profile`'s JSON) the "
                                                    "targets are measured on.")] = None,
    headroom: Annotated[float, typer.Option(min=0, max=0.49, help="fit, greedy: plan prefill/decode targets this share "
                                            "below their limit (0.03: decode:1.3x is planned as 1.34x), against "
                                            "measurement noise.")] = _default(Planner, "headroom"),
    granularity: Annotated[str, typer.Option(help="block, sublayer or mixed (sublayers and whole blocks "
                                             "both, for greedy and beam); sublayer and mixed plans need a sublayer "
                                             "report.")] = _default(Planner, "granularity"),
    keep_first: Annotated[int, typer.Option("--keep-first", min=0, help="Never drop the first k blocks.")] = _default(Planner, "keep_first"),
    keep_last: Annotated[int, typer.Option("--keep-last", min=0, help="Never drop the last k blocks.")] = _default(Planner, "keep_last"),
    keep: Annotated[Optional[str], typer.Option(help="Players never dropped, comma-separated (L5,L7.attn).")] = None,
    no_protect: Annotated[bool, typer.Option("--no-protect", help="Let cornerstones be dropped too.")] = False,
    harmless_only: Annotated[bool, typer.Option("--harmless-only", help="Drop only players whose removal has no "
                                                "measurable cost (importance interval reaches zero).")] = False,
    width: Annotated[int, typer.Option(min=1, help="beam: partial removal sets kept at every step.")] = _default(Planner, "width"),
    shortlist: Annotated[Optional[int], typer.Option(min=1, help="greedy/beam: re-measure only this many candidates per "
                                                     "step, those that hurt least at the previous one.")] = None,
    lazy: Annotated[bool, typer.Option("--lazy", help="greedy: measure candidates best last score first, --shortlist "
                                       "(default 4) at a time, and stop a step once none left can beat the best "
                                       "(exact when removing more never helps).")] = False,
    search_until: Annotated[Optional[str], typer.Option("--search-until", help="greedy/beam: search on to this many "
                                                        "players or share (>= --drop) and record the whole order.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Plan path (YAML). Default: beside the report, REPORT-plan.yaml.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Choose what to drop from a score report; write a plan YAML with every removal and its reason."""
    from pydantic import ValidationError
    from rich.console import Console

    from .planner import Planner, make_plan
    from .store import default_store_root

    try:
        planner = Planner(policy=policy, granularity=granularity, drop=drop, keep_first=keep_first,  # type: ignore[arg-type]
                          keep_last=keep_last, keep=_split(keep), protect_cornerstones=not no_protect,
                          harmless_only=harmless_only, width=width, shortlist=shortlist, lazy=lazy,
                          search_until=search_until, targets=[t for text in target or [] for t in _split(text)],
                          profile=str(profile) if profile is not None else None, headroom=headroom)
    except ValidationError as exc:
        raise _option_error(exc, {"drop": "Write --drop 8 (a number of players) or --drop 25% (a share of the parameters).",
                                  "": "Give --drop, or --target with --profile (made by `cornerstone profile MODEL`) "
                                      "and --policy fit or greedy.",
                                  "search_until": "Write --search-until 12 (players) or 40% (of the parameters), at least --drop.",
                                  "headroom": "Give a time target (--target decode:1.3x or prefill:1.2x), or leave --headroom out.",
                                  "granularity": "Plan mixed with --policy greedy or beam, or use --granularity sublayer."},
                            "plan", "planning") from None
    console = Console(stderr=True)
    with _progress_bar(console, "planning") as progress:
        # greedy and beam keep every measured set in the value store, as score does: a re-plan reads them back
        made = make_plan(report, planner, progress=progress, store=default_store_root())
    path = made.save(out or report.with_name(report.stem + "-plan.yaml"))
    if as_json:
        _print_json({**made.model_dump(mode="json"), "path": str(path), "notes": made.notes})
        return
    from rich.table import Table

    table = Table(title=f"plan: drop {made.what} ({made.parameters.removed_fraction:.1%} of {made.parameters.original:,} "
                        f"parameters; {made.blocks['remaining']} of {made.blocks['original']} blocks left), policy {made.planner.policy}")
    for column in ("player", "importance", "rank", "parameters", "reason"):
        table.add_column(column, justify="right" if column in ("importance", "rank", "parameters") else "left",
                         no_wrap=column != "reason")
    for removal in made.removed:
        table.add_row(removal.name, f"{removal.importance:+.4f}", str(removal.rank), f"{removal.parameters:,}", removal.reason)
    Console().print(table)
    if made.protected:
        typer.echo("protected: " + ", ".join(f"{p.name} ({p.reason})" for p in made.protected))
    from .costs import format_cost

    for measure, cost in (made.fit or {}).get("measures", {}).items():
        planned = cost.get("planned_limit", cost["limit"])
        widened = f", planned to {format_cost(measure, planned)} with headroom" if planned < cost["limit"] * (1 - 1e-9) else ""
        typer.echo(f"{measure}: {format_cost(measure, cost['whole'])} -> {format_cost(measure, cost['whole'] - cost['saved'])} "
                   f"predicted (target at most {format_cost(measure, cost['limit'])}{widened}; from the profile's summed costs)")
    if made.predicted_score is not None:
        what = "measured score" if made.predicted_measured else "estimated score (not measured)"
        typer.echo(f"{what} {made.predicted_score:.4f} (full model {made.report['base_score']:.4f}): {made.predicted_by}")
    for note in made.notes:
        typer.echo(f"note: {note}")
    typer.echo(f"plan: {path}")


@app.command()
def profile(
    model: ModelArgument,
    out: Annotated[Optional[Path], typer.Option(callback=_output_file, help="Profile path (JSON). Default: "
                                                "cornerstone-output/MODEL-profile-DEVICE-DTYPE.json.")] = None,
    prefill: Annotated[str, typer.Option(help="Prompt lengths to time, comma-separated; prefill targets use the first.")] = "256",
    decode: Annotated[str, typer.Option(help="Decode shapes CONTEXTxBATCH to time, comma-separated; decode and kv "
                                        "targets use the first.")] = "512x1",
    repeats: Annotated[int, typer.Option(min=1, help="Timed runs per shape (after a warm-up); the median is kept.")] = _default(ProfileSettings, "repeats"),
    rounds: Annotated[int, typer.Option(min=1, help="Rounds of the calibration (the model with and without each kind of "
                                        "sublayer, taking turns at every timed step).")] = _default(ProfileSettings, "rounds"),
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16: the dtype you will serve in.")] = "float32",
    device: DeviceOption = None,
    trust_remote_code: TrustRemoteCodeOption = False,
    allow_pickle: AllowPickleOption = False,
    as_json: JsonOption = False,
) -> None:
    """Measure what each sublayer of MODEL costs on this device (weights, KV cache, prefill and decode time), for `plan --policy fit`."""
    from pydantic import ValidationError
    from rich.console import Console

    from .costs import format_cost, measure_profile
    from .loading import load_model

    try:
        settings = ProfileSettings(prefill_lengths=_split(prefill), decode_shapes=_split(decode), repeats=repeats,  # type: ignore[arg-type]
                                   rounds=rounds)
    except ValidationError as exc:
        raise _option_error(exc, {"prefill_lengths": "Write e.g. --prefill 128,512.",
                                  "decode_shapes": "Write e.g. --decode 512x1,2048x8 (context x batch)."},
                            "profile", "profiling") from None
    console = Console(stderr=True)
    with console.status(f"loading {model} ({dtype})"):
        loaded = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    with _progress_bar(console, "profiling") as progress:
        measured = measure_profile(loaded, settings, progress=progress)
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(model).name)
    path = measured.save(out or Path("cornerstone-output") / f"{safe}-profile-{measured.device.replace(':', '')}-{measured.dtype}.json")
    if as_json:
        _print_json({**measured.model_dump(mode="json"), "path": str(path)})
        return
    from rich.table import Table

    table = Table(title=f"cost profile of {model} on {measured.device} ({measured.dtype}, {measured.machine.get('cpu') or ''})")
    for column in ("player", "weights", "KV/token", f"prefill {settings.prefill_lengths[0]}", f"decode {settings.decode_shapes[0]}"):
        table.add_column(column, justify="left" if column == "player" else "right")
    # a player's times are what its removal saves: its hooked time, calibrated (costs module docstring)
    rows = [(name, lambda m, name=name: measured.cost(name, m)) for name in measured.players]
    rows.append(("whole model", measured.total))
    for name, cost in rows:
        table.add_row(name, *(format_cost(m, cost(m)) for m in ("weights", "kv", "prefill", "decode")))
    Console().print(table)
    if measured.uncalibrated:
        typer.echo(f"warning: removing the sublayers saved no more than the timing noise for {', '.join(measured.uncalibrated)}: "
                   "there the times are the hooked ones, uncalibrated (more --rounds and --repeats, or a quieter machine)",
                   err=True)
    typer.echo(f"profile: {path}")


@app.command()
def export(
    model: ModelArgument,
    plan_path: Annotated[Path, typer.Argument(metavar="PLAN", help="A plan YAML written by `cornerstone plan`.")],
    out: Annotated[Path, typer.Option(help="Folder to write the slim checkpoint to (must not exist unless --overwrite).")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier export at --out (only a folder cornerstone wrote).")] = False,
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Largest safetensors shard, e.g. 2GB.")] = _default(ExportSettings, "max_shard_size"),
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip reloading the export and comparing its logits.")] = False,
    allow_other_model: Annotated[bool, typer.Option("--allow-other-model", help="Apply a plan made for another model.")] = False,
    format: Annotated[str, typer.Option("--format", help="safetensors (a folder), or gguf: prune MODEL's .gguf file into "
                                        "--out FILE.gguf, quantised tensors copied as they are (block plans).")] = _default(ExportSettings, "format"),
    portable: Annotated[bool, typer.Option("--portable", help="gguf: refuse a plan that moves Gemma 3's global layers "
                                           "(only runtimes reading the pattern key would follow it).")] = False,
    repair: Annotated[bool, typer.Option("--repair", help="Fit a linear map for each removed span of blocks on calibration "
                                         "text and fold it into the block before it (ReplaceMe; block plans, safetensors).")] = False,
    repair_text: Annotated[str, typer.Option("--repair-text", help="--repair's calibration text: bundled (the bundled "
                                             "tasks' documents), or a .txt/.jsonl/.json file.")] = "bundled",
    repair_samples: Annotated[int, typer.Option("--repair-samples", min=1, help="--repair: most calibration texts.")] = _default(CalibrationText, "samples"),
    stream: Annotated[bool, typer.Option("--stream", help="Block plans of a local safetensors folder: copy the kept "
                                         "tensors one at a time, never building the model (models larger than memory).")] = False,
    dtype: Annotated[Optional[str], typer.Option(help="Weights' dtype in the export: float32, bfloat16 or float16 "
                                                 "(default: float32; with --stream, the source's).")] = None,
    device: DeviceOption = None,
    trust_remote_code: TrustRemoteCodeOption = False,
    allow_pickle: AllowPickleOption = False,
    as_json: JsonOption = False,
) -> None:
    """Cut a plan's players from MODEL and write a slim checkpoint (safetensors folder or GGUF file), checked against the masked original."""
    from pydantic import ValidationError
    from rich.console import Console

    from .export import export as run_export
    from .loading import load_model

    try:
        settings = ExportSettings(out=str(out), overwrite=overwrite, max_shard_size=max_shard_size, verify=not no_verify,
                                  allow_other_model=allow_other_model, format=format, portable=portable,  # type: ignore[arg-type]
                                  repair={"calibration": {"source": repair_text, "samples": repair_samples}} if repair else None,
                                  stream=stream, dtype=dtype if stream else None)
    except ValidationError as exc:
        raise _option_error(exc, {"format": "Write --format safetensors or --format gguf."}, "export", "exporting") from None
    console = Console(stderr=True)
    if settings.format == "gguf":  # the file is pruned as it is: no model to load (the check loads what it needs)
        with console.status(f"pruning {model} into {out}" + (" and checking it in llama.cpp" if settings.verify else "")):
            pruned = run_export(model, plan_path, settings=settings)
        if as_json:
            _print_json(pruned.model_dump())
            return
        typer.echo(f"wrote {pruned.path}: {pruned.blocks_kept} of {pruned.blocks_original} blocks, "
                   f"{pruned.bytes_on_disk / 2**20:,.1f} MiB ({pruned.source_bytes / 2**20:,.1f} MiB before)")
        if pruned.check is not None:
            check = pruned.check
            typer.echo(f"checked in llama.cpp: gap to the masked model {check.pruned_gap:.3f} nats, within "
                       f"{check.bound:.3f} (the unpruned file's own gap {check.baseline_gap:.3f})")
        for note in pruned.notes:
            typer.echo(f"note: {note}")
        return
    if settings.stream:  # no model to load: the folder is copied tensor by tensor (the check loads what it needs)
        with console.status(f"streaming {model} into {out}"):
            result = run_export(model, plan_path, settings=settings)
    else:
        with console.status(f"loading {model}"):
            loaded = load_model(model, dtype=dtype or "float32", device=device, trust_remote_code=trust_remote_code,
                                allow_pickle=allow_pickle)
        result = _export_loaded(run_export, loaded, plan_path, settings, console, out)
    if as_json:
        _print_json(result.model_dump())
        return
    typer.echo(f"exported a {result.format} checkpoint to {result.path}: {result.parameters:,} parameters, "
               f"{result.bytes_on_disk / 2**20:,.1f} MiB in {result.seconds:.1f} s")
    for span in result.repair.spans if result.repair else []:
        typer.echo(f"repaired L{span.blocks[0]}..L{span.blocks[-1]} in {span.module}: relative error on the calibration "
                   f"text {span.error_before:.3f} (dropped) -> {span.error_after:.3f} (mapped), {span.tokens:,} tokens")
    if result.max_abs_logit_diff is not None:
        typer.echo(f"checked: logits equal the masked original (max abs difference {result.max_abs_logit_diff:.2g})")
    for note in result.notes:
        typer.echo(f"note: {note}")


def _export_loaded(run_export: Callable[..., Any], loaded: Any, plan_path: Path, settings: ExportSettings,
                   console: Any, out: Path) -> Any:
    """The in-memory export, with a progress bar while a repair reads its calibration text."""
    if settings.repair is not None:
        with _progress_bar(console, "repair") as progress:
            result = run_export(loaded, plan_path, settings=settings, progress=progress)
    else:
        with console.status(f"exporting to {out}"):
            result = run_export(loaded, plan_path, settings=settings)
    return result


@app.command()
def heal(
    pruned: Annotated[str, typer.Argument(metavar="PRUNED", help="An exported folder (`cornerstone export --out`).")],
    data: Annotated[str, typer.Option(help="Training text: a .txt/.jsonl/.json file, or comma-separated lm-eval tasks not used for evaluation.")],
    out: Annotated[Path, typer.Option(help="Folder for the healed checkpoint (must not exist unless --overwrite).")],
    method: Annotated[str, typer.Option(help="lora (adapter merged into the weights) or full.")] = _default(Healing, "method"),
    rank: Annotated[int, typer.Option(min=1, help="LoRA rank.")] = _default(Healing, "rank"),
    alpha: Annotated[float, typer.Option(parser=_number(0, above=True), metavar="FLOAT", help="LoRA alpha (the update is alpha/rank * B A).")] = _default(Healing, "alpha"),
    target_modules: Annotated[str, typer.Option("--target-modules", help="Comma-separated module names, or all-linear.")] = _default(Healing, "target_modules"),
    learning_rate: Annotated[Optional[float], typer.Option("--learning-rate", parser=_number(0, above=True), metavar="FLOAT", help="Default 2e-4 (LoRA) or 2e-5 (full).")] = None,
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps.")] = _default(Healing, "steps"),
    sequence_length: Annotated[int, typer.Option("--sequence-length", min=8, help="Tokens per training window.")] = _default(Healing, "sequence_length"),
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Windows per step.")] = _default(Healing, "batch_size"),
    samples: Annotated[Optional[int], typer.Option(min=1, help="Most training texts (seeded draw); default all.")] = None,
    distill: Annotated[float, typer.Option(parser=_number(0, 1), metavar="FLOAT", help="Weight of the distillation loss against --teacher's logits (0 = none).")] = _default(Healing, "distill"),
    teacher: Annotated[Optional[str], typer.Option(help="The unpruned model, teacher for --distill.")] = None,
    temperature: Annotated[float, typer.Option(parser=_number(0, above=True), metavar="FLOAT", help="Distillation temperature.")] = _default(Healing, "temperature"),
    compute_dtype: Annotated[str, typer.Option("--compute-dtype", help="float32, or bfloat16 autocast (faster on CPUs with bf16).")] = _default(Healing, "compute_dtype"),
    seed: Annotated[int, typer.Option(help="Seed of the LoRA init, the batch order and the --samples draw.")] = _default(Healing, "seed"),
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", min=1, help="Steps between resumable checkpoints.")] = _default(Healing, "checkpoint_every"),
    validation: Annotated[float, typer.Option(parser=_number(0, 1), metavar="FLOAT", help="Share of the training windows held out for early stopping.")] = _default(Healing, "validation"),
    validation_limit: Annotated[int, typer.Option("--validation-limit", min=1, help="Most held-out windows (each held-out loss reads them all).")] = _default(Healing, "validation_limit"),
    eval_every: Annotated[int, typer.Option("--eval-every", min=1, help="Steps between held-out losses.")] = _default(Healing, "eval_every"),
    patience: Annotated[int, typer.Option(min=1, help="Held-out losses without improvement before training stops.")] = _default(Healing, "patience"),
    no_check: Annotated[bool, typer.Option("--no-check", help="Skip the final check (pruned vs healed on held-out documents).")] = False,
    check_tasks: Annotated[Optional[str], typer.Option("--check-tasks", help="Tasks of the final check, comma-separated (default: the plan's).")] = None,
    check_limit: Annotated[int, typer.Option("--check-limit", min=2, help="Documents per check task.")] = _default(Healing, "check_limit"),
    keep: Annotated[str, typer.Option(help="better: write the healed weights only if the check scores them higher; always.")] = _default(Healing, "keep"),
    not_on: Annotated[Optional[str], typer.Option("--not-on", help="Comma-separated tasks you will evaluate on: refuse to train on them.")] = None,
    allow_overlap: Annotated[bool, typer.Option("--allow-overlap", help="Train on the documents the plan was scored on "
                                                "too (by default a scored task's other documents only).")] = False,
    include_path: IncludePathOption = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier healed folder at --out (only a folder cornerstone wrote).")] = False,
    device: DeviceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Fine-tune a pruned model briefly (LoRA by default) to win back what pruning cost; write it merged."""
    from pydantic import ValidationError
    from rich.console import Console

    from .heal import heal as run_heal

    try:
        healing = Healing(data=data, method=method, rank=rank, alpha=alpha, learning_rate=learning_rate, steps=steps,
                          target_modules=target_modules if target_modules == "all-linear" else _split(target_modules),
                          sequence_length=sequence_length, batch_size=batch_size, samples=samples, distill=distill,
                          teacher=teacher, temperature=temperature, compute_dtype=compute_dtype, seed=seed,
                          checkpoint_every=checkpoint_every, validation=validation, validation_limit=validation_limit, eval_every=eval_every,
                          patience=patience, check=not no_check, check_tasks=_split(check_tasks), check_limit=check_limit,
                          keep=keep)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise _option_error(exc, {}, "heal", "healing") from None
    console = Console(stderr=True)
    with _progress_bar(console, "healing") as progress:
        result = run_heal(pruned, out, healing, include_paths=include_path or [], evaluation_tasks=_split(not_on),
                          overwrite=overwrite, device=device, progress=progress, allow_overlap=allow_overlap)
    if as_json:
        _print_json(result.model_dump(exclude={"history"}))
        return
    resumed = f", resumed at step {result.resumed_from_step}" if result.resumed_from_step else ""
    stopped = f", stopped early (best held-out loss at step {result.best_step})" if result.stopped_early else ""
    typer.echo(f"healed {result.source} -> {result.path}: {result.steps} steps of {result.method} "
               f"({result.trained_parameters:,} of {result.parameters:,} parameters trained{resumed}{stopped}), loss "
               f"{result.first_loss:.3f} -> {result.last_loss:.3f} in {result.seconds:.0f} s")
    if result.check is not None:
        check = result.check
        error = f" ± {1.96 * check.stderr:.4f}" if check.stderr is not None else ""
        typer.echo(f"check on {sum(map(len, check.tasks.values()))} held-out documents: pruned {check.pruned_score:.4f}, "
                   f"healed {check.healed_score:.4f} ({check.difference:+.4f}{error}): {check.verdict}")
    else:
        typer.echo(f"not checked: {result.unchecked}")


@app.command("eval")
def eval_command(
    base: Annotated[str, typer.Argument(help="The original model (alias, folder, .gguf or hub id).")],
    pruned: Annotated[str, typer.Argument(help="The exported folder.")],
    tasks: Annotated[str, typer.Option(help="Comma-separated lm-eval tasks; cornerstone_real reads ../shared/data.")] = ",".join(_default(EvalTasks, "names")),
    include_path: IncludePathOption = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Documents per task (seeded random, from those not "
                                                 "scored); default all of them.")] = _default(EvalTasks, "limit"),
    seed: Annotated[int, typer.Option(help="Seed for drawing the --limit documents.")] = _default(EvalTasks, "seed"),
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="lm-eval batch size.")] = _default(EvalSettings, "batch_size"),
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    device: DeviceOption = None,
    out: Annotated[Optional[Path], typer.Option(callback=_output_file, help="Comparison path (JSON; Markdown beside it). "
                                                "Default: cornerstone-output/eval-PRUNED.json.")] = None,
    healed: Annotated[Optional[str], typer.Option(help="Also evaluate this `cornerstone heal` output, as a third column.")] = None,
    report: Annotated[Optional[Path], typer.Option(help="The score report the plan was made from (default: the plan "
                                                   "saved in PRUNED says); its documents are left out.")] = None,
    allow_overlap: Annotated[bool, typer.Option("--allow-overlap", help="Evaluate on the scored documents too "
                                                "(by default only on documents the plan was not chosen on).")] = False,
    trust_remote_code: TrustRemoteCodeOption = False,
    allow_pickle: AllowPickleOption = False,
    as_json: JsonOption = False,
) -> None:
    """Evaluate PRUNED (and --healed) against BASE with lm-eval's standard hf path; print a side-by-side table."""
    from rich.console import Console

    from .evaluate import default_eval_path, evaluate_models, save

    settings = EvalSettings(tasks=EvalTasks(names=_split(tasks), include_paths=[str(p) for p in include_path or []],
                                            limit=limit, seed=seed),
                            batch_size=batch_size, allow_overlap=allow_overlap)
    console = Console(stderr=True)
    with console.status(f"evaluating {base} and {pruned} with lm-eval"):
        comparison = evaluate_models(base, pruned, settings=settings, device=device, dtype=dtype,
                             trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, healed=healed, report=report)
    json_path, markdown_path = save(comparison, out or default_eval_path(pruned))
    if as_json:
        _print_json(comparison.model_dump_json(indent=2))
        return
    typer.echo(comparison.to_markdown())
    typer.echo(f"saved: {json_path}, {markdown_path}")


@app.command()
def run(
    recipe_path: Annotated[Path, typer.Argument(metavar="RECIPE", help="A recipe YAML (see recipes/).")],
    reports: Annotated[Optional[Path], typer.Option(help="Folder for the report, plan and evaluation (overrides the "
                                                    "recipe's reports:; `--reports reports/pruning` or `reports/quickstart` regenerates the committed results).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Run a whole recipe: score, plan, export and evaluate, as one YAML file says."""
    from rich.console import Console

    from .recipe import load_recipe, run_recipe

    recipe = load_recipe(recipe_path)
    if reports is not None:
        recipe = recipe.model_copy(update={"reports": str(reports)})
    console = Console(stderr=True)
    with _progress_bar(console, recipe.name) as progress:
        result = run_recipe(recipe, log=console.print, progress=progress)
    if as_json:
        _print_json(result.model_dump_json(indent=2))
        return
    if result.evaluation is not None:
        from .evaluate import Comparison

        typer.echo(Comparison.model_validate(result.evaluation).to_markdown())
    typer.echo(f"report: {result.report}\nplan:   {result.plan}\nexport: {result.export['path']}")


@contextmanager
def _progress_bar(console: Any, label: str) -> Iterator[Callable[[int, int, str], None]]:
    """A transient rich progress bar, handed out as the ``progress(done, total, label)`` callback the API takes."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        job = bar.add_task(label, total=None)

        def progress(done: int, total: int, what: str) -> None:
            bar.update(job, completed=done, total=total, description=f"{label}: {what}")

        yield progress


@app.command("tasks")
def list_tasks_command(include_path: IncludePathOption = None, as_json: JsonOption = False) -> None:
    """List the bundled offline tasks, the real benchmarks read from ../shared/data, and tasks under --include-path."""
    from .harness import BUNDLED_TASK_GROUP, REAL_TASK_GROUP, list_tasks

    names = list_tasks(include_path or [], bundled_only=not include_path)
    real = list_tasks(real=True)
    if as_json:
        _print_json({"group": BUNDLED_TASK_GROUP, "tasks": names, "real_group": REAL_TASK_GROUP, "real_tasks": real})
        return
    typer.echo(f"{BUNDLED_TASK_GROUP} (all bundled tasks)")
    for name in names:
        typer.echo(f"  {name}")
    typer.echo(f"real benchmarks read from ../shared/data or $CORNERSTONE_SHARED_DATA (tags {REAL_TASK_GROUP}: "
               "arc, boolq, piqa; cornerstone_paper: the paper's six; cornerstone_real_all: all)")
    for name in real:
        typer.echo(f"  {name}")


def main() -> None:
    import signal

    # pipelines stop jobs with SIGTERM; without a handler Python dies at once and skips every clean-up
    signal.signal(signal.SIGTERM, _raise_terminated)
    app()


if __name__ == "__main__":
    sys.exit(main())
