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

from arpipe.project import root as _root
from arpipe.project import setup_env as _setup_env
from arpipe.sample_command import sample


@click.group(name="arpipe", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--debug", is_flag=True, help="Show tracebacks of errors (also for the stages it runs; or ARPIPE_DEBUG=1)."
)
def cli(debug: bool) -> None:
    """arpipe: raw images to an evaluated autoregressive image generator.

    Every stage is a DVC stage (see dvc.yaml; parameters in params.yaml), chained by a Prefect
    flow and tracked in MLflow. Run commands from the repository root.
    """
    if debug:
        from core.errors import DEBUG_ENV

        os.environ[DEBUG_ENV] = "1"


cli.add_command(sample)


def _check_params(root: Path, stages: list[str]) -> None:
    """Load the params file's section of every stage about to run, strictly, before Prefect starts:
    a mistyped key fails in a second, in one line, instead of after the stages before it."""
    import importlib

    from core.config import ConfigError, load_paths, load_stage_config, read_params

    path = root / "params.yaml"
    params = read_params(path)
    try:
        load_paths(params)
        for stage in stages:
            try:
                config = importlib.import_module(f"stages.{stage}").Config
            except (ImportError, AttributeError):  # a stage of a custom dvc.yaml: DVC checks it
                continue
            load_stage_config(params, stage, config)
    except ConfigError as exc:
        raise ConfigError(f"{path.name}: {exc}") from None


@cli.command()
@click.option("--until", metavar="STAGE", help="Stop after this stage (default: run every stage).")
@click.option(
    "--stage-timeout",
    type=float,
    default=6 * 3600,
    show_default=True,
    help="Seconds before a stage's whole process group is killed.",
)
@click.option("--wait", is_flag=True, help="If another arpipe run is running in this checkout, queue behind it.")
@click.option(
    "--durable",
    is_flag=True,
    help="After a successful run, commit dvc.lock + metrics + plots to the results branch and `dvc push` "
    "(params.yaml `durable`: branch, dvc_remote, git_remote). Scheduled runs do this by default.",
)
def run(until: str | None, stage_timeout: float, wait: bool, durable: bool) -> None:
    """Run the pipeline: every dvc.yaml stage in order, skipping those DVC finds up to date.

    Starts Prefect's temporary local server unless PREFECT_API_URL points to a running one.
    Each stage's MLflow run nests under one pipeline run (see `arpipe ui`). One run per checkout:
    a second one fails at once naming the running one (or waits, with --wait).
    """
    root = _root()
    from core.durable import DurableError
    from core.runlock import PipelineBusy, pipeline_lock
    from flows.pipeline import StageFailed, pipeline, run_summary, select_stages, stage_names

    try:
        stages = select_stages(stage_names(root), until)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--until") from exc
    _check_params(root, stages)
    _setup_env(root)
    try:
        with pipeline_lock(root, wait=wait):
            results = pipeline(until=until, root=str(root), stage_timeout_s=stage_timeout, durable=durable)
    except (PipelineBusy, StageFailed, DurableError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo("")
    for r in results:
        word = {"ran": "ran", "skipped": "up to date, skipped", "restored": "restored from run-cache"}
        click.echo(f"  {r['stage']:<16} {word[r['status']]:<26} {r['seconds']:>8.1f} s")
    summary = run_summary(root, results)
    click.echo(
        "\n" + (summary or "Results: evaluate did not run (see --until); `arpipe ui` shows the stage runs.\n"), nl=False
    )


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
    # MLflow's job runner (GenAI judges, trace roll-ups) is seven more processes arpipe never uses.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
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
    _check_port_free(host, port)
    click.echo(f"MLflow UI on http://{host}:{port} (store {uri})")
    click.echo(f"  runs: {_runs_url(host, port, root)}")
    raise SystemExit(subprocess.call(cmd))


def _check_port_free(host: str, port: int) -> None:
    """Fail before printing a URL that would lead to someone else's server (or to nothing)."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is free
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise click.ClickException(
                f"cannot listen on {host}:{port} ({exc.strerror or exc}): another `arpipe ui` or program holds "
                f"the port; pass --port {port + 1} (or stop the other one)"
            ) from None


def _runs_url(host: str, port: int, root: Path) -> str:
    """The experiment's runs table in the saved view ``arpipe`` (its key metrics as columns,
    core/compare.py ``save_runs_view``). MLflow 3.17 opens an experiment in its GenAI (traces)
    view unless the URL asks for the model-training one (the sidebar's "Model training" switch)."""
    from mlflow.exceptions import MlflowException

    from core.compare import VIEW_KEY, save_runs_view
    from core.tracking import DEFAULT_EXPERIMENT, client_for

    view = "?workflowType=machine_learning"
    client = client_for(root)
    experiment = client.get_experiment_by_name(os.environ.get("ARPIPE_EXPERIMENT", DEFAULT_EXPERIMENT))
    if experiment is None:  # nothing tracked yet
        return f"http://{host}:{port}/#/experiments{view}"
    try:
        save_runs_view(client, experiment.experiment_id)
        view += f"&viewStateShareKey={VIEW_KEY}"
    except MlflowException as exc:  # e.g. a shared server that refuses writes: the plain table
        click.echo(f"  (no saved columns: {str(exc).splitlines()[0]})")
    return f"http://{host}:{port}/#/experiments/{experiment.experiment_id}/runs{view}"


@cli.command(name="import")
@click.argument("format_name", metavar="FORMAT")
@click.argument("file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder to write.")
@click.option("--model", "model_name", metavar="NAME", help="Released model name: GPT-B ... GPT-3B, VQ-16, d16 ...")
@click.option(
    "--tokenizer",
    "tokenizer_dir",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="AR formats: the imported tokenizer folder the model samples with.",
)
@click.option("--heads", type=int, help="Attention heads, where --model does not say them.")
@click.option("--image-size", type=int, help="Tokenizer formats: image side in pixels (LlamaGen VQ: 256).")
@click.option(
    "--class-names",
    "class_names_file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="One class name per line (default: the tokenizer's, else ImageNet's 1000 as '0'..'999').",
)
def import_command(format_name, file, out, model_name, tokenizer_dir, heads, image_size, class_names_file) -> None:
    """Convert a released checkpoint FILE into an arpipe checkpoint folder, offline.

    \b
    FORMAT: llamagen-vq, llamagen-gpt, var-vqvae, var. For example:
      arpipe import llamagen-vq  vq_ds16_c2i.pt --out imported/lg-tok
      arpipe import llamagen-gpt c2i_B_256.pt --model GPT-B --tokenizer imported/lg-tok --out imported/lg-base
    The folder is what train_tokenizer / pretrain write (model.safetensors + config.json), so
    `arpipe sample --checkpoint imported/lg-base --tokenizer imported/lg-tok` and every later stage
    read it. Nothing is written unless every check passes.
    """
    from arpipe.released import import_released
    from core.released import ImportFailed

    try:
        config = import_released(
            format_name,
            file,
            out,
            model=model_name,
            tokenizer_dir=tokenizer_dir,
            heads=heads,
            image_size=image_size,
            class_names_file=class_names_file,
        )
    except ImportFailed as exc:
        raise click.ClickException(str(exc)) from exc
    what = f"{config['arch']} model" if "arch" in config else f"{config['kind']} tokenizer"
    not_copied = config["source"]["not_copied"]
    click.echo(
        f"wrote {out}: {what} from {file.name} ({format_name}), fingerprint {config['fingerprint'][:12]}"
        + (f"; rebuilt, not copied: {', '.join(not_copied)}" if not_copied else "")
    )


@cli.command()
@click.option("--last", default=5, show_default=True, help="Compare the newest N pipeline runs.")
@click.option("--format", "fmt", type=click.Choice(["md", "csv"]), default="md", show_default=True)
def compare(last: int, fmt: str) -> None:
    """Pipeline runs side by side: params that differ, key metrics per checkpoint, the champion."""
    root = _root()
    _setup_env(root)
    from core.compare import compare_pipeline_runs, format_comparison
    from core.tracking import client_for, experiment_id

    client = client_for(root)
    try:
        comparison = compare_pipeline_runs(experiment_id(client, root), last=last, client=client)
    except LookupError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(format_comparison(comparison, fmt), nl=False)


@cli.command()
@click.argument("stages", nargs=-1, metavar="[STAGE]...")
@click.option(
    "--rev", metavar="REV", help="Also show the values at this git revision (HEAD~1, a branch) and the change."
)
@click.option("--format", "fmt", type=click.Choice(["table", "md", "csv"]), default="table", show_default=True)
def metrics(stages: tuple[str, ...], rev: str | None, fmt: str) -> None:
    """The stages' metrics (metrics/<stage>.json), one line per key, floats to 4 significant
    digits: a readable `dvc metrics show` (and, with --rev, `dvc metrics diff`)."""
    root = _root()
    from core.config import load_paths, read_params
    from core.metrics_view import format_metrics, read_metrics

    metrics_dir = Path(load_paths(read_params(root / "params.yaml")).metrics)
    click.echo(format_metrics(read_metrics(root, metrics_dir, stages, rev), fmt), nl=False)


@cli.command()
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".arpipe/plots"),
    show_default=True,
    help="Folder for the PNGs and index.html.",
)
def plots(out: Path) -> None:
    """Every training curve (the CSVs under paths.plots) as a PNG, and an HTML page of them all
    that opens offline (`dvc plots show` loads its chart library from a CDN)."""
    root = _root()
    from core.config import load_paths, read_params
    from core.plots import write_plot_pages

    plots_dir = root / load_paths(read_params(root / "params.yaml")).plots
    try:
        page, count = write_plot_pages(plots_dir, out)
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"wrote {page}: {count} plots as PNGs, no network needed to view them")


@cli.command()
@click.option("--cron", metavar="EXPR", help='Cron schedule, e.g. "0 3 * * 1" (Mondays 03:00, server time zone).')
@click.option(
    "--interval",
    type=click.FloatRange(min=1, min_open=False),
    metavar="SECONDS",
    help="Instead of --cron: a run every SECONDS (e.g. 30 to try a schedule out).",
)
@click.option("--name", default="retrain", show_default=True, help="Deployment name (arpipe-pipeline/<name>).")
@click.option("--until", metavar="STAGE", help="Stop each scheduled run after this stage.")
@click.option("--list", "list_", is_flag=True, help="List the arpipe deployments: schedule, last and next run.")
@click.option("--remove", metavar="NAME", help="Delete the deployment arpipe-pipeline/NAME.")
@click.option(
    "--durable/--no-durable",
    default=True,
    show_default=True,
    help="After each successful scheduled run, commit dvc.lock + metrics + plots to the results branch and "
    "`dvc push` (params.yaml `durable`).",
)
def schedule(cron: str | None, interval: float | None, name: str, until: str | None, list_: bool,
             remove: str | None, durable: bool) -> None:  # fmt: skip
    """Scheduled retraining: serve the pipeline as a Prefect deployment with a cron schedule.

    Needs a running Prefect server (its temporary server cannot hold schedules): PREFECT_API_URL,
    or a local one on 127.0.0.1:4200 that this command starts when none answers (log in
    .arpipe/prefect-server.log, pid in .arpipe/prefect-server.pid). With --cron the command keeps
    running and executes the scheduled runs, and checks that the server schedules them: if the
    server's scheduler logs an error, or creates no run within 90 s, it stops with one line saying
    so (exit 1). Ctrl-C stops it and Prefect pauses the schedule (listed as paused until served
    again or removed with --remove). --list shows each deployment's last and next run.
    """
    root = _root()
    _setup_env(root)
    from flows import schedule as sched

    if sum(bool(x) for x in (cron or interval, list_, remove)) != 1 or (cron and interval):
        raise click.UsageError("give exactly one of --cron EXPR, --interval SECONDS, --list or --remove NAME")
    try:
        api = sched.ensure_server(root)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from exc
    if list_:
        found = sched.list_schedules()
        if not found:
            click.echo(f"no arpipe deployments on {api}")
        for d in found:
            click.echo(f"{d['name']}  {', '.join(d['cron']) or '-'}{'  (paused)' if d['paused'] else ''}")
            for key in ("last", "next"):
                run = d[key]
                when = f"{run['state']:<10} {run['at']:%Y-%m-%d %H:%M:%S %Z}" if run else "none"
                click.echo(f"  {key} run: {when}")
        return
    if remove:
        try:
            sched.remove(remove)
        except Exception as exc:  # Prefect's ObjectNotFound
            raise click.ClickException(f"no deployment {remove!r} on {api}: {exc}") from exc
        click.echo(f"removed {remove}")
        return
    try:
        sched.deployment(name, cron, root, until, durable, interval)
    except ValueError as exc:
        raise click.BadParameter(f"{cron!r} is not a cron expression (e.g. '0 3 * * 1')", param_hint="--cron") from exc
    own_log = root / sched.SERVER_LOG if api == sched.LOCAL_API else None
    every = f"cron '{cron}'" if cron else f"a run every {interval:g} s"
    click.echo(f"serving arpipe-pipeline/{name} on {api} with {every}; Ctrl-C to stop")
    click.echo(f"check it: arpipe schedule --list (last and next run){f'; server log {own_log}' if own_log else ''}")
    try:
        sched.serve(name, cron, root, until, durable, interval, watchdog=sched.Watchdog(name, own_log))
    except sched.ScheduleFailed as exc:
        raise click.ClickException(str(exc)) from exc


@cli.command()
@click.option(
    "--params",
    "params_file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=Path("params.yaml"),
    show_default=True,
    help="Params file to plan for, e.g. presets/imagenet256-var-d16.yaml.",
)
@click.option("--gpus", default=1, show_default=True, help="Data-parallel GPUs the global batch_size is split over.")
@click.option(
    "--num-classes",
    type=int,
    help="Classes of the data (default: params shard.num_classes; else 1000 for a released model, 10 for the "
    "digits source, else classes.json of the built shards).",
)
@click.option(
    "--images",
    type=click.IntRange(min=1),
    help="Images in the source, for the time table (default: 1,797 for the digits source, else the built "
    "shards' manifest).",
)
@click.option(
    "--gpu-peak-tflops",
    type=click.FloatRange(min=0, min_open=True),
    help="Assumed dense peak of the one GPU (default: 989, one H100 SXM in bf16).",
)
@click.option(
    "--gpu-mfu",
    type=click.FloatRange(min=0, max=1, min_open=True),
    help="Assumed share of that peak the stages reach (default: 0.35).",
)
@click.option(
    "--cpu-peak-gflops",
    type=click.FloatRange(min=0, min_open=True),
    help="The CPU's fp32 matmul peak to scale the calibration to (default: measured now; "
    "benchmarks/results/stage_times.json holds the calibrating machine's).",
)
@click.option(
    "--stage-times",
    type=click.Path(dir_okay=False, path_type=Path),
    help="CPU calibration (default: the committed benchmarks/results/stage_times.json).",
)
def plan(
    params_file: Path,
    gpus: int,
    num_classes: int | None,
    images: int | None,
    gpu_peak_tflops: float | None,
    gpu_mfu: float | None,
    cpu_peak_gflops: float | None,
    stage_times: Path | None,
) -> None:
    """Per trained model (tokenizer, AR model, evalnet): parameter count, training FLOPs per step
    and the expected GPU memory, from the params alone (models built on the meta device: no memory).
    Then per stage that computes: its work, FLOPs and estimated time on this CPU and on one GPU,
    the total and the total per 1,000 images.

    \b
    Assumptions:
    - FLOPs/step: the AR model's 6*N*tokens (N = non-embedding params) + 12*depth*width*L per token
      for the attention matmuls, x batch_size x L; conv nets: 3 x the counted forward FLOPs.
    - Memory per GPU = 16 bytes/param (fp32 weights, grads, AdamW's 2 moments; FSDP divides it by
      the GPUs) + activations saved for backward at the per-GPU micro-batch
      (batch_size / gpus / grad_accum), measured in fp32 on the meta device, halved under bf16,
      without attention score matrices (flash attention does not keep them), no checkpointing.
    - Not counted: CUDA context, allocator slack, data loading (budget 10-20% more), the
      tokenizer's discriminator and perceptual network.
    - Stage FLOPs: arpipe/stage_work.py (e.g. cca/ddo: policy trained and reference run on 2x the
      batch; sampling: forward per token x tokens x samples, 2x with guidance).
    - CPU time, measured: per-stage efficiency (FLOP/s / the fp32 matmul peak) from a real
      `arpipe run` (benchmarks/results/stage_times.json), x the peak measured now; shard per
      image; the time between stages as measured. Missing or malformed file: marked UNCALIBRATED.
    - GPU time, assumed (never measured here): FLOPs / (--gpu-peak-tflops x --gpu-mfu), default
      one H100 SXM at 989 TFLOP/s dense bf16 x 35% MFU, but at least 10 ms per optimizer step,
      1 ms per sampling pass and 0.2 ms per ODE step (launch overhead of tiny models).
    """
    from arpipe.plan import format_plan, plan_models
    from arpipe.plan_time import GPU_MFU, GPU_PEAK_TFLOPS, STAGE_TIMES, GpuAssumption, time_table
    from arpipe.stage_work import source_images
    from core.config import ConfigError, read_params

    try:
        params = read_params(params_file)
        num_classes, origin = _plan_classes(params, num_classes)
        rows = plan_models(params, gpus=gpus, num_classes=num_classes)
        images, images_origin = source_images(params, images)
        if images:
            gpu = GpuAssumption(gpu_peak_tflops or GPU_PEAK_TFLOPS, gpu_mfu or GPU_MFU)
            cpu_peak = cpu_peak_gflops * 1e9 if cpu_peak_gflops else None
            times = time_table(params, num_classes, images, images_origin, gpu, cpu_peak, stage_times or STAGE_TIMES)
    except (ConfigError, ValueError) as exc:
        raise click.ClickException(f"{params_file}: {exc}") from exc
    click.echo(f"{params_file}: {num_classes} classes ({origin}), {gpus} GPU(s)\n")
    click.echo(format_plan(rows, gpus))
    if not images:
        click.echo(f"No time estimate: {images_origin}; pass --images N (the images in shard.source_path).")
        return
    click.echo(times, nl=False)


def _plan_classes(params: dict, given: int | None) -> tuple[int, str]:
    """(class count, where it came from): the flag, the params' shard.num_classes, the digits
    source's 10, or the built shards' classes.json."""
    import json

    from core.config import load_paths

    if given is not None:
        return given, "--num-classes"
    shard = params.get("shard") or {}
    if isinstance(shard.get("num_classes"), int) and shard["num_classes"] > 0:
        return shard["num_classes"], "shard.num_classes"
    if (params.get("pretrain") or {}).get("init_from") == "released":
        return 1000, "a released model (ImageNet's classes; the import checks it)"
    if shard.get("source", "digits") == "digits":
        return 10, "the digits source"
    classes = Path(load_paths(params).shards) / "classes.json"
    if classes.is_file():
        return len(json.loads(classes.read_text())), str(classes)
    raise click.UsageError(f"{classes} does not exist yet: set shard.num_classes in the params or pass --num-classes")


@cli.group()
def tracking() -> None:
    """The MLflow tracking store: runs spooled while the server was unreachable."""


@tracking.command()
def sync() -> None:
    """Upload the runs spooled in .arpipe/spool/ while the tracking server was unreachable."""
    root = _root()
    _setup_env(root)
    from core.tracking import spool_dir, sync_spool, tracking_reachable, tracking_uri

    uri = tracking_uri(root)
    if not tracking_reachable(uri):
        raise click.ClickException(f"tracking server {uri} is still unreachable; nothing uploaded")
    uploaded = sync_spool(root)
    for name, run_id in uploaded:
        click.echo(f"  {name} -> run {run_id}")
    click.echo(f"uploaded {len(uploaded)} spooled run(s) from {spool_dir(root)} to {uri}")


@cli.group()
def data() -> None:
    """Inspect the sharded dataset and the token cache."""


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


@data.command()
@click.option(
    "--tokens",
    "tokens_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Token cache folder with train.parquet and val.parquet (default: params.yaml paths.tokens).",
)
@click.option("--show-unused", default=32, show_default=True, help="Unused code ids to list.")
def tokens(tokens_dir: Path | None, show_unused: int) -> None:
    """Rows per split x view x class, the code histogram (distinct codes, counts, entropy,
    perplexity) and the codebook entries never used (DuckDB over the token cache)."""
    from core.token_stats import format_token_stats, token_stats

    if tokens_dir is None:
        from core.config import load_paths, read_params

        tokens_dir = Path(load_paths(read_params(_root() / "params.yaml")).tokens)
    try:
        click.echo(format_token_stats(token_stats(tokens_dir), show_unused=show_unused))
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc


def main(argv: list[str] | None = None) -> None:
    """The console script: click's own errors as click prints them; a user error (bad param, file)
    as one line and Ctrl-C as ``arpipe: interrupted`` (exit 130), tracebacks only with --debug."""
    from core.errors import EXIT_INTERRUPTED, reported_errors

    with reported_errors("arpipe"):
        try:
            code = cli.main(args=argv, prog_name="arpipe", standalone_mode=False)
        except click.exceptions.Abort as exc:
            if isinstance(exc.__cause__, KeyboardInterrupt):
                click.echo("arpipe: interrupted", err=True)
                raise SystemExit(EXIT_INTERRUPTED) from None
            click.echo("Aborted!", err=True)
            raise SystemExit(1) from None
        except click.exceptions.ClickException as exc:
            exc.show()
            raise SystemExit(exc.exit_code) from None
    raise SystemExit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
