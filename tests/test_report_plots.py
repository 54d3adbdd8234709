"""The report's plots keep their titles inside the image, however many tasks a sweep names."""

from __future__ import annotations

from pathlib import Path

import pytest

from cornerstone import report as report_module
from cornerstone.scores import ScoreReport

REPORTS = Path(__file__).resolve().parents[1] / "reports"
# 15 tasks over SmolLM2's 60 sublayers (the sweep whose title used to run off the image), and 4 tasks
# over 30 blocks in a narrower figure
SWEEPS = [REPORTS / "paper" / "smollm2-135m-ablation.json", REPORTS / "pruning" / "smollm2-135m-drop8-real-scores.json"]


def titles_outside(figure) -> list[str]:
    """The figure's titles (suptitle and every axes title) that reach past the image's edges once laid out."""
    figure.tight_layout()
    figure.canvas.draw()
    renderer, bounds = figure.canvas.get_renderer(), figure.bbox
    texts = [figure._suptitle] if figure._suptitle is not None else []
    texts += [axes.title for axes in figure.axes]
    outside = []
    for text in texts:
        extent = text.get_window_extent(renderer)
        if text.get_text() and (extent.x0 < bounds.x0 - 0.5 or extent.x1 > bounds.x1 + 0.5
                                or extent.y0 < bounds.y0 - 0.5 or extent.y1 > bounds.y1 + 0.5):
            outside.append(text.get_text())
    return outside


@pytest.mark.parametrize("sweep", SWEEPS, ids=lambda p: p.stem)
@pytest.mark.parametrize("plot", [report_module.plot_sweep, report_module.plot_sweep_by_task])
def test_titles_stay_inside_the_image(plot, sweep, monkeypatch, tmp_path):
    report = ScoreReport.load(sweep)
    assert len(report.tasks) > 1
    save = report_module._save_figure
    checked = []

    def checking_save(figure, path):
        checked.append(titles_outside(figure))
        return save(figure, path)

    monkeypatch.setattr(report_module, "_save_figure", checking_save)
    written = plot(report, tmp_path / "sweep.png")
    assert written.is_file() and checked == [[]]


def test_a_long_title_is_wrapped_and_keeps_every_word():
    names = ", ".join(f"cs_real_task_number_{index}" for index in range(15))
    title = report_module._fit_title(f"model: ablation sweep on {names}\n(* = cornerstone)", 10.0, 9)
    lines = title.split("\n")
    assert len(lines) > 2 and max(map(len, lines)) <= int(10.0 * 72 / (0.6 * 9))
    assert title.split() == f"model: ablation sweep on {names}\n(* = cornerstone)".split()
    assert report_module._fit_title("short title", 10.0, 9) == "short title"
