"""Stage metrics: ``metrics/<stage>.json`` (DVC metrics, git-tracked), their flat MLflow form, and
the curve CSVs under ``plots/``."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from core.config import Paths


def write_metrics(paths: Paths, stage: str, metrics: dict[str, Any]) -> Path:
    """Write deterministic JSON (sorted keys, no timings) so ``dvc metrics diff`` shows real changes."""
    out = Path(paths.metrics) / f"{stage}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return out


def flatten_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"train": {"count": 3}}`` -> ``{"train/count": 3.0}``; non-numeric leaves are dropped."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat |= flatten_metrics(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = float(value)
    return flat


def write_rows_csv(path: str | Path, columns: Iterable[str], rows: Iterable[dict[str, Any]]) -> Path:
    """A curve file for ``dvc plots``: header ``columns``, one line per row, floats as ``%.6g``
    (short, and the same bytes for the same values)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows)
    return path
