"""``arpipe``: run the pipeline, browse runs, inspect data.

Commands import their heavy dependencies (Prefect, MLflow, DuckDB) only when they run, so
``arpipe --help`` answers at once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click

# Offline-friendly defaults for every command; an explicit environment variable wins.
_ENV_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_ENABLE_TELEMETRY": "false",
}


def _root() -> Path:
    root = Path.cwd()
    if not (root / "dvc.yaml").is_file():
        raise click.ClickException(f"no dvc.yaml in {root}: run arpipe from the repository root")
    return root


def _setup_env(root: Path) -> None:
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from core.tracking import tracking_uri

    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri(root)  # absolute, for `dvc exp run --temp`


@click.group(name="arpipe", context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """arpipe: raw images to an evaluated autoregressive image generator.

    Every stage is a DVC stage (see dvc.yaml; parameters in params.yaml), chained by a Prefect
    flow and tracked in MLflow. Run commands from the repository root.
    """


@cli.command()
@click.option("--until", metavar="STAGE", help="Stop after this stage (default: run every stage).")
@click.option(
    "--stage-timeout",
    type=float,
    default=6 * 3600,
    show_default=True,
    help="Seconds before a stage's whole process group is killed.",
)
def run(until: str | None, stage_timeout: float) -> None:
    """Run the pipeline: every dvc.yaml stage in order, skipping those DVC finds up to date.

    Starts Prefect's temporary local server unless PREFECT_API_URL points to a running one.
    Each stage's MLflow run nests under one pipeline run (see `arpipe ui`).
    """
    root = _root()
    _setup_env(root)
    from flows.pipeline import StageFailed, pipeline, select_stages, stage_names

    try:
        select_stages(stage_names(root), until)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--until") from exc
    try:
        results = pipeline(until=until, root=str(root), stage_timeout_s=stage_timeout)
    except StageFailed as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo("")
    for r in results:
        word = {"ran": "ran", "skipped": "up to date, skipped", "restored": "restored from run-cache"}
        click.echo(f"  {r['stage']:<16} {word[r['status']]:<26} {r['seconds']:>8.1f} s")


@cli.command()
@click.option("--port", default=5000, show_default=True, help="Port to listen on.")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Interface to bind. The UI has no authentication: keep it on 127.0.0.1 and "
    "use an SSH tunnel (ssh -L 5000:127.0.0.1:5000 host) from another machine.",
)
def ui(port: int, host: str) -> None:
    """Start the MLflow UI over the project's tracking store.

    Compare stage runs, their params, metrics and images; stage runs are nested under their
    pipeline run. Stop it with Ctrl-C.
    """
    root = _root()
    _setup_env(root)
    uri = os.environ["MLFLOW_TRACKING_URI"]
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    if uri.startswith("sqlite:"):
        cmd += ["--artifacts-destination", str(root / ".arpipe" / "mlartifacts")]
    click.echo(f"MLflow UI on http://{host}:{port} (store {uri})")
    raise SystemExit(subprocess.call(cmd))


@cli.group()
def data() -> None:
    """Inspect the sharded dataset."""


@data.command()
@click.option(
    "--shards",
    "shards_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Shards folder (default: params.yaml paths.shards).",
)
def stats(shards_dir: Path | None) -> None:
    """Per-split x per-class counts, duplicates and rejects (DuckDB over the manifest)."""
    from core.manifest import data_stats, format_stats

    if shards_dir is None:
        from core.config import load_paths, read_params

        shards_dir = Path(load_paths(read_params(_root() / "params.yaml")).shards)
    try:
        click.echo(format_stats(data_stats(shards_dir)))
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from exc


def main() -> None:
    cli(prog_name="arpipe")


if __name__ == "__main__":
    main()
