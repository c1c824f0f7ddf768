"""What every ``arpipe`` command needs of the project it runs in: its root and the environment."""

from __future__ import annotations

import os
from pathlib import Path

import click

# Offline-friendly defaults for every command; an explicit environment variable wins.
_ENV_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_ENABLE_TELEMETRY": "false",
    # MLflow's artifact download/upload bars: dozens of fragments in a log, nothing to act on
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def root() -> Path:
    root = Path.cwd()
    if not (root / "dvc.yaml").is_file():
        raise click.ClickException(f"no dvc.yaml in {root}: run arpipe from the repository root")
    return root


def setup_env(root: Path) -> None:
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from core.tracking import tracking_uri

    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri(root)  # absolute, for `dvc exp run --temp`
