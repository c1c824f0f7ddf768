"""Stage metrics: ``metrics/<stage>.json`` (DVC metrics, git-tracked) and their flat MLflow form."""

from __future__ import annotations

import json
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
