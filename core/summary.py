"""The results of a pipeline run in one screen: what ``arpipe run`` prints last and the Prefect
run's markdown artifact shows (the same text).

Read from files, no torch: ``metrics/evaluate.json`` (keyed ``<checkpoint>/<guidance>/<metric>``,
with the ``train/real`` floor: real train images scored like the samples; FIDs with their bootstrap
intervals, ``fid_lo``/``fid_hi``, read by ``core/verdicts.py``) and
``paths.last_run/evaluate_registry.json`` (the best checkpoint and the registry's decision, written
by ``evaluate``; not a DVC out because the version changes every run).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from core.verdicts import BOUNDS, INTERVAL, fid_cell, verdicts

COLUMNS = (("fid", "FID ↓"), ("class_acc", "class acc ↑"), ("precision", "precision ↑"), ("recall", "recall ↑"))


def _read(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _number(value) -> str:
    return f"{value:.3f}" if isinstance(value, int | float) and math.isfinite(value) else "-"


def results_summary(
    metrics_file: str | Path,
    registry_file: str | Path,
    eval_dir: str | Path,
    evaluate_status: str = "ran",
) -> str:
    """Markdown: a table per checkpoint and guidance (FID and its interval with the real-data floor
    beside it, class accuracy, precision, recall), the best checkpoint, which checkpoints are within
    noise of it, whether the tokenizer is the bottleneck, the champion and whether it moved, where
    the report and grid are, and how to browse the runs. "" when there are no evaluate metrics."""
    metrics = _read(Path(metrics_file))
    if not metrics:
        return ""
    registry = _read(Path(registry_file)) or {}
    floor = (metrics.get("train") or {}).get("real", {})
    ceiling = (metrics.get("reconstruction") or {}).get("real", {})
    inception = any("inception_fid" in row for ckpt in metrics.values() if isinstance(ckpt, dict)
                    for row in ckpt.values() if isinstance(row, dict))  # fmt: skip
    lines = [
        "## Results",
        "",
        "Each checkpoint's samples scored against the val images in the evalnet feature space (a proxy: "
        "not comparable with published ImageNet FIDs). Real-data floor: real train images scored the same way "
        "(a checkpoint near it is as close to val as real data is)"
        + (f". Tokenizer ceiling: train images through the tokenizer, FID {fid_cell(ceiling)}." if ceiling else ".")
        + (f" FIDs in brackets: {INTERVAL}." if any("fid_lo" in row for row in (floor, ceiling)) else ""),
        "",
        "| checkpoint | guidance | FID ↓ | real-data floor | "
        + " | ".join(title for key, title in COLUMNS[1:])
        + (" | Inception FID ↓" if inception else "")
        + " |",
        "|" + "---|" * (len(COLUMNS) + 3 + inception),
    ]
    best = registry.get("best_checkpoint")
    for name, guidances in metrics.items():
        if name in BOUNDS or not isinstance(guidances, dict):
            continue
        for guidance, row in guidances.items():
            if not isinstance(row, dict):
                continue
            shown = f"**{name}**" if name == best else name
            cells = [shown, guidance, fid_cell(row), fid_cell(floor)]
            cells += [_number(row.get(key)) for key, _ in COLUMNS[1:]]
            cells += [fid_cell(row, "inception_fid")] if inception else []
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if best:
        select = registry.get("select", "the selection metric")
        lines.append(f"Best checkpoint: **{best}** (by {select}: {_number(registry.get('best_value'))}).")
    metric, _, guidance = registry.get("select", "fid@cfg1").partition("@")
    lines += verdicts(metrics, metric, guidance)
    lines.append(_champion_line(registry, evaluate_status))
    eval_dir = Path(eval_dir)
    lines += [
        "",
        f"Report: `{eval_dir / 'report.md'}`; sample grid: `{eval_dir / 'grid.png'}`.",
        "Browse and compare the runs: `arpipe ui` (MLflow on http://127.0.0.1:5000).",
    ]
    return "\n".join(lines) + "\n"


def _champion_line(registry: dict, evaluate_status: str) -> str:
    if not registry:
        return "Champion: unknown (no registry record from evaluate)."
    stale = (
        "" if evaluate_status == "ran" else " (evaluate was up to date, so nothing new was registered: last decision)"
    )
    if not registry.get("registered"):
        return f"Champion: not registered ({registry.get('why_not', 'registration skipped')}){stale}."
    name, version = registry.get("model", "?"), registry.get("version", "?")
    if registry.get("champion_moved"):
        previous = registry.get("previous_champion_version")
        was = f" (was v{previous})" if previous else ""
        return (
            f"Champion: {name} v{version}, moved to this evaluation's best{was}: {registry.get('reason', '')}{stale}."
        )
    return (
        f"Champion: {name} v{registry.get('champion_version', '?')}, did not move (candidate v{version}): "
        f"{registry.get('reason', '')}{stale}."
    )
