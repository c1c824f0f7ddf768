"""The curve CSVs under ``plots/`` as PNG images, drawn with matplotlib: no chart library from a CDN.

``dvc plots show`` renders the same CSVs with vega, which its HTML page loads from a CDN (blank
offline). A stage logs a PNG of each curve file it wrote to its MLflow run (``plots/<name>.png``,
``log_curve_images``); ``arpipe plots`` writes them all, with an HTML page that only links the
PNGs (``write_plot_pages``). Nothing here is a DVC out: the CSVs stay the tracked record.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

PANEL_INCHES = (3.2, 2.2)  # one column of a curve file against its first (``step``)
PANELS_PER_ROW = 4


def read_curves(path: str | Path) -> tuple[str, dict[str, list[float]]]:
    """(x name, {column: values}) of a curve CSV; cells that are not numbers become NaN."""

    def number(text: str) -> float:
        try:
            return float(text)
        except ValueError:
            return math.nan

    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        values: dict[str, list[float]] = {name: [] for name in columns}
        for row in reader:
            for name in columns:
                values[name].append(number(row.get(name) or ""))
    if not columns:
        raise ValueError(f"{path}: no header line")
    return columns[0], values


def curve_image(path: str | Path, title: str | None = None) -> np.ndarray:
    """A uint8 RGB image (H, W, 3) of a curve CSV: one panel per column against the first."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x_name, values = read_curves(path)
    names = [name for name in values if name != x_name] or [x_name]
    cols = min(len(names), PANELS_PER_ROW)
    rows = math.ceil(len(names) / cols)
    figure = Figure(figsize=(PANEL_INCHES[0] * cols, PANEL_INCHES[1] * rows + 0.4), dpi=100, layout="constrained")
    figure.suptitle(title or Path(path).name)
    for i, name in enumerate(names):
        axes = figure.add_subplot(rows, cols, i + 1)
        axes.plot(values[x_name], values[name], marker="." if len(values[name]) < 30 else None)
        axes.set_title(name, fontsize=9)
        axes.set_xlabel(x_name, fontsize=8)
        axes.tick_params(labelsize=7)
        axes.grid(alpha=0.3)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def log_curve_images(tracker, folder: str | Path, since: float = 0.0) -> list[str]:
    """Log ``plots/<name>.png`` to ``tracker`` for every CSV in ``folder`` written at or after
    ``since`` (a time.time(); older files are an earlier run's); the artifact names."""
    logged = []
    for path in sorted(Path(folder).glob("*.csv")):
        if path.stat().st_mtime >= since:
            name = f"plots/{path.stem}.png"
            tracker.log_image(curve_image(path, f"{Path(folder).name}/{path.name}"), name)
            logged.append(name)
    return logged


def write_plot_pages(plots_dir: str | Path, out_dir: str | Path) -> tuple[Path, int]:
    """A PNG per curve CSV under ``plots_dir`` (``<stage>/<name>.png`` in ``out_dir``) and an
    ``index.html`` showing them all, with no script: it opens offline. (the page, PNG count)"""
    from PIL import Image

    plots_dir, out_dir = Path(plots_dir), Path(out_dir)
    sections = []
    for path in sorted(plots_dir.rglob("*.csv")):
        relative = path.relative_to(plots_dir).with_suffix(".png")
        target = out_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(curve_image(path, str(path.relative_to(plots_dir)))).save(target)
        sections.append(f'<h2>{relative.with_suffix(".csv")}</h2>\n<img src="{relative.as_posix()}" alt="{relative}">')
    if not sections:
        raise FileNotFoundError(f"no curve files (*.csv) under {plots_dir}: run a training stage first")
    page = out_dir / "index.html"
    page.write_text(
        "<!doctype html>\n<meta charset=utf-8>\n<title>arpipe plots</title>\n"
        f"<h1>arpipe plots ({plots_dir})</h1>\n" + "\n".join(sections) + "\n"
    )
    return page, len(sections)
