"""Show and save a :class:`~cornerstone.scores.ScoreReport`: a rich terminal report, JSON, and a PNG plot.

The plot follows Figure 3 of Zhang, Dong & Kawaguchi (2024): the score after removing each
sublayer, attention and FFN in two colours, with the full-model score and chance as lines.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from .errors import OutputError, ReportError
from .files import atomic_write
from .scores import ScoreReport

KIND_COLOURS = {"attn": "#1f77b4", "mlp": "#ff7f0e", "block": "#2ca02c"}
KIND_STYLES = {"attn": "blue", "mlp": "dark_orange", "block": "green"}
BAR_WIDTH = 10


# Where commands write when given no --out: never a tracked folder (committed results live in reports/,
# and running the README's main job from a checkout must leave `git status` clean).
OUTPUT_FOLDER = "cornerstone-output"


def default_report_path(report: ScoreReport, folder: str | Path = OUTPUT_FOLDER) -> Path:
    model = Path(str(report.model.get("spec", "model"))).name.replace("/", "_") or "model"
    method = "-".join(filter(None, [report.method, (report.settings.get("estimator") or {}).get("estimator")]))
    return Path(folder) / f"{model}-{method}-{report.granularity}.json"


def save(report: ScoreReport, path: str | Path) -> tuple[Path, list[Path]]:
    """Write the JSON report and, beside it, the PNG plots: the removal sweep, the sweep per task
    (``-tasks.png``, with more than one task), and for Shapley runs the shares per layer
    (``-shares.png``); return the paths."""
    path = Path(path)
    atomic_write(path, report.to_json().encode())
    if not report.measures_scores:
        return path, [plot_importance(report, path.with_suffix(".png"))]
    plots = [plot_sweep(report, path.with_suffix(".png"))]
    if len(report.tasks) > 1 and any(p.per_task_removed for p in report.players.values()):
        plots.append(plot_sweep_by_task(report, path.with_name(path.stem + "-tasks.png")))
    if report.method == "shapley":
        plots.append(plot_shares(report, path.with_name(path.stem + "-shares.png")))
    return path, plots


def _fit_title(text: str, width_inches: float, fontsize: float) -> str:
    """``text`` broken into lines that fit ``width_inches`` at ``fontsize``. matplotlib never wraps a
    title, and a sweep over many tasks names them all, so its title would run off the image. A
    character is taken as 0.6 em wide (DejaVu Sans averages less), so a line errs short, not long."""
    per_line = max(20, int(width_inches * 72 / (0.6 * fontsize)))
    return "\n".join(textwrap.fill(line, per_line, break_on_hyphens=False) for line in text.split("\n"))


def _save_figure(figure: Any, path: Path) -> Path:
    """Save and close a matplotlib figure; a write failure is an :class:`OutputError`."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path)
    except OSError as exc:
        raise OutputError(f"cannot write '{path}': {exc.strerror or exc}") from exc
    finally:
        plt.close(figure)
    return path


def plot_shares(report: ScoreReport, path: str | Path) -> Path:
    """The paper's Figure 2: each player's share of the (negative-clipped) Shapley mass, by layer,
    with 95% intervals (1.96 standard errors, scaled like the shares) where the estimator gives them."""
    path = Path(path)
    total = sum(max(p.importance, 0.0) for p in report.players.values()) or 1.0
    figure, axes = _bars_by_layer(report, lambda p: p.share,
                                  lambda p: 1.96 * p.stderr / total if p.stderr is not None else 0.0)
    estimator = (report.settings.get("estimator") or {}).get("estimator") or ""
    axes.set_xlabel("layer")
    axes.set_ylabel("share of Shapley mass")
    axes.set_title(f"{report.model.get('spec')}: Shapley shares ({estimator}), top-4 share "
                   f"{report.top_share(4):.0%}\n(negative values clipped to 0; bars: 95% intervals)", fontsize=9)
    axes.legend(fontsize=7, loc="upper right")
    return _save_figure(figure, path)


def _bars_by_layer(report: ScoreReport, value: Any, error: Any = None) -> tuple[Any, Any]:
    """A figure with one bar per player at its layer (attention left, FFN right), coloured by kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(min(14.0, max(6.0, 0.2 * len(report.players) + 2)), 4.0), dpi=120)
    offsets = {"attn": -0.2, "mlp": 0.2, "block": 0.0}
    for kind in sorted({p.kind for p in report.players.values()}, key=list(KIND_COLOURS).index):
        members = [p for p in report.players.values() if p.kind == kind]
        errors = [error(p) for p in members] if error else []
        label = {"attn": "attention", "mlp": "FFN/MoE", "block": "block"}[kind]
        axes.bar([p.layer + offsets[kind] for p in members], [value(p) for p in members],
                 width=0.4 if kind != "block" else 0.8, color=KIND_COLOURS[kind], label=label,
                 yerr=errors if any(errors) else None, capsize=2, error_kw={"linewidth": 0.8})
        for p in members:
            if p.cornerstone:
                axes.annotate("*", (p.layer + offsets[kind], value(p)), ha="center", va="bottom", fontsize=12)
    return figure, axes


def plot_importance(report: ScoreReport, path: str | Path) -> Path:
    """A one-pass proxy's importance per player, by layer (* = cornerstone by the proxy's outlier rule)."""
    figure, axes = _bars_by_layer(report, lambda p: p.importance)
    axes.set_xlabel("layer")
    axes.set_ylabel(f"{report.method} importance")
    source = (report.diagnostics.get("calibration") or {}).get("source", "")
    axes.set_title(f"{report.model.get('spec')}: {report.method} ({report.granularity}), calibration text: {source}\n"
                   "(* = cornerstone: an outlier of its kind)", fontsize=9)
    axes.legend(fontsize=7, loc="upper right")
    return _save_figure(figure, Path(path))


def plot_sweep(report: ScoreReport, path: str | Path) -> Path:
    """The paper's Figure 3: score after removing each player, by layer, with full-model and chance lines.
    A one-pass proxy's report is drawn by :func:`plot_importance`; a report without players is a :class:`ReportError`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    if not report.players:
        raise ReportError("the report scores no players: there is nothing to plot",
                          hint="Score the model first: `cornerstone score`.")
    if not report.measures_scores:
        return plot_importance(report, path)  # a one-pass proxy measures no score without a player
    figure, axes = plt.subplots(figsize=(min(14.0, max(6.0, 0.2 * len(report.players) + 2)), 4.0), dpi=120)
    kinds = sorted({s.kind for s in report.players.values()}, key=list(KIND_COLOURS).index)
    offsets = {"attn": -0.2, "mlp": 0.2, "block": 0.0}
    for kind in kinds:
        items = [(s.layer, s.score_removed) for s in report.players.values() if s.kind == kind and s.score_removed is not None]
        if not items:
            continue
        layers, values = zip(*items)
        width = 0.4 if kind != "block" else 0.8
        label = {"attn": "attention removed", "mlp": "FFN/MoE removed", "block": "block removed"}[kind]
        axes.bar([x + offsets[kind] for x in layers], values, width=width, color=KIND_COLOURS[kind], label=label)
    cornerstones = [report.players[n] for n in report.cornerstones]
    for s in cornerstones:
        if s.score_removed is not None:
            axes.annotate("*", (s.layer + offsets[s.kind], s.score_removed), ha="center", va="bottom", fontsize=12)
    axes.axhline(report.base_score, color="black", linewidth=1.2, label=f"full model ({report.base_score:.3f})")
    axes.axhline(report.chance, color="grey", linestyle="--", linewidth=1.2, label=f"chance ({report.chance:.3f})")
    axes.set_xlabel("layer")
    axes.set_ylabel("score (" + ", ".join(sorted({t.metric for t in report.tasks})) + ")")
    task_names = ", ".join(t.name for t in report.tasks)
    # centred on the axes, which the legend outside on the right pushes left of the figure's centre
    axes.set_title(_fit_title(f"{report.model.get('spec')}: {report.method} sweep on {task_names}\n(* = cornerstone)",
                              0.85 * figure.get_figwidth(), 9), fontsize=9)
    axes.set_ylim(0, min(1.0, max(report.base_score, max((s.score_removed or 0) for s in report.players.values())) + 0.1))
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0), borderaxespad=0.0)
    return _save_figure(figure, path)


def plot_sweep_by_task(report: ScoreReport, path: str | Path) -> Path:
    """The sweep of :func:`plot_sweep` once per task (the paper's Figures 3-5 are per task): the task's
    score after removing each player, its full-model and chance lines, * on the task's own cornerstones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, len(report.tasks))
    rows = -(-len(report.tasks) // columns)
    width = min(18.0, max(6.0, 0.12 * len(report.players) + 2) * columns)
    figure, grid = plt.subplots(rows, columns, figsize=(width, 2.6 * rows), dpi=110, squeeze=False)
    offsets = {"attn": -0.2, "mlp": 0.2, "block": 0.0}
    for axes, task in zip(grid.flat, report.tasks):
        cornerstones = set(report.task_cornerstones(task.name))
        for kind in sorted({p.kind for p in report.players.values()}, key=list(KIND_COLOURS).index):
            members = [p for n, p in report.players.items() if p.kind == kind and task.name in p.per_task_removed]
            axes.bar([p.layer + offsets[kind] for p in members], [p.per_task_removed[task.name] for p in members],
                     width=0.4 if kind != "block" else 0.8, color=KIND_COLOURS[kind],
                     label={"attn": "attention removed", "mlp": "FFN/MoE removed", "block": "block removed"}[kind])
        for name in cornerstones:
            player = report.players[name]
            axes.annotate("*", (player.layer + offsets[player.kind], player.per_task_removed[task.name]),
                          ha="center", va="bottom", fontsize=11)
        axes.axhline(task.base_score, color="black", linewidth=1.0, label="full model")
        axes.axhline(task.chance, color="grey", linestyle="--", linewidth=1.0, label="chance")
        axes.set_title(f"{task.name} ({task.metric}, {task.num_docs} docs)", fontsize=8)
        axes.set_ylim(0, min(1.05, max(task.base_score, *(p.per_task_removed.get(task.name, 0) for p in report.players.values())) + 0.1))
        axes.tick_params(labelsize=7)
    for axes in list(grid.flat)[len(report.tasks):]:
        axes.axis("off")
    grid.flat[0].legend(fontsize=6, loc="lower right")
    figure.suptitle(_fit_title(f"{report.model.get('spec')}: {report.method} sweep per task (* = cornerstone for that task)",
                               figure.get_figwidth(), 9), fontsize=9)
    return _save_figure(figure, Path(path))


def _bar(fraction: float, style: str) -> Text:
    fraction = max(0.0, min(1.0, fraction))
    filled = round(fraction * BAR_WIDTH)
    return Text("█" * filled + "·" * (BAR_WIDTH - filled), style=style)


def render(report: ScoreReport, console: Console | None = None) -> None:
    """Print the cornerstone report to the terminal."""
    console = console or Console()
    model = report.model
    header = Table.grid(padding=(0, 2))
    header.add_column(style="bold")
    header.add_column()
    header.add_row("model", f"{model.get('spec')}  ({model.get('architecture')}, {model.get('num_hidden_layers')} layers, "
                   f"{(model.get('parameters') or 0) / 1e6:.1f}M parameters, {model.get('dtype')} on {model.get('device')})")
    header.add_row("fingerprint", str(model.get("fingerprint")))
    calibration = report.diagnostics.get("calibration")
    header.add_row("method", f"{report.method} ({report.granularity}), {report.evaluations} evaluation"
                   f"{'s' if report.evaluations != 1 else ''}" + (
                       f" + one calibration pass over {calibration['texts']} texts ({calibration['tokens']} tokens, "
                       f"source: {calibration['source']})" if calibration else ""))
    base_error = report.base_stderr
    header.add_row("full model", f"{report.base_score:.4f}" + (f" ±{report.rule.z * base_error:.4f}" if base_error else "")
                   + f"   chance {report.chance:.4f}")
    if report.method == "shapley":
        gap, rho = report.diagnostics.get("efficiency_gap"), report.diagnostics.get("spearman_with_ablation")
        header.add_row("shapley", f"{(report.settings.get('estimator') or {}).get('estimator')}: top-4 share "
                       f"{report.top_share(4):.1%}, sum of values - (v(N) - v(empty)) = "
                       f"{'n/a' if gap is None else f'{gap:+.4f}'} (efficiency check), Spearman with "
                       f"leave-one-out {'n/a' if rho is None else f'{rho:+.3f}'}")
    where = report.diagnostics.get("machine")
    header.add_row("time", f"{report.timing.get('total_seconds', 0):.1f} s total, "
                   f"{report.timing.get('seconds_per_evaluation', 0):.2f} s per evaluation"
                   + (f" ({where['cpu']}, {'AMX' if where.get('amx') else 'no AMX'}, {where['torch_threads']} threads)"
                      if where else ""))

    tasks = Table(title="tasks", title_justify="left", show_edge=False)
    for column in ("task", "metric", "docs", "full model", "chance"):
        tasks.add_column(column, justify="right" if column not in ("task", "metric") else "left")
    for task in report.tasks:
        error = f" ±{report.rule.z * task.base_stderr:.4f}" if task.base_stderr is not None else ""
        tasks.add_row(task.name, task.metric, f"{task.num_docs}/{task.total_docs}", f"{task.base_score:.4f}{error}",
                      f"{task.chance:.4f}")

    z = report.rule.z
    players = Table(title="score with the player removed (bar: from 0 to 1)", title_justify="left", show_edge=False)
    with_errors = any(p.stderr is not None for p in report.players.values())
    interval = "±95%" if z == 1.96 else f"±{z:g} s.e."
    for column in ("player", "removed", f"importance {interval}" if with_errors else "importance", "effect", "share", ""):
        players.add_column(column, justify="left" if column in ("player", "", "effect") else "right", no_wrap=True)
    for name, s in report.players.items():
        style = "bold red" if s.cornerstone else KIND_STYLES[s.kind]
        removed = f"{s.score_removed:.4f}" if s.score_removed is not None else "-"
        importance = f"{s.importance:+.4f}" + (f" ±{z * s.stderr:.4f}" if s.stderr is not None else "")
        bar_value = s.score_removed if s.score_removed is not None else s.share
        label = Text(name + (" ◆" if s.cornerstone else "") + (" ?" if s.resolved is False else ""), style=style)
        effect = {"none measurable": "none"}.get(s.effect or "", s.effect or "")
        players.add_row(label, removed, importance, effect, f"{100 * s.share:.1f}%", _bar(bar_value, style))

    if report.cornerstones:
        verdict = Text("◆ cornerstones: " + ", ".join(report.cornerstones), style="bold red")
    else:
        verdict = Text("no cornerstones: no single player's removal takes the model near chance", style="bold")
    lines = [verdict]
    unresolved = [name for name, p in report.players.items() if p.resolved is False]
    if unresolved:
        lines.append(Text(f"? too close to call at ±{z:g} s.e. (more documents decide: --until-resolved MAX_DOCS): " + ", ".join(unresolved),
                          style="yellow"))
    effects = [p.effect for p in report.players.values() if p.effect]
    if effects:
        lines.append(Text(f"removal effects by their ±{z:g} s.e. interval: "
                          + ", ".join(f"{effects.count(kind)} {kind}" for kind in ("hurts", "none measurable", "helps")),
                          style="dim"))
    rule = Text(report.rule.describe(report), style="dim")
    console.print(Panel(Group(header, Text(""), tasks, Text(""), players, Text(""), *lines, rule),
                        title="cornerstone report", title_align="left"))

