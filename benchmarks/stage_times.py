"""Calibrate ``arpipe plan``'s CPU column on a finished ``arpipe run``: per stage, effective FLOP/s ÷ the matmul peak.

Reads a copy of the project's MLflow store (``<project>/.arpipe/mlflow.db`` by default; the copy is
opened, so the store itself is never migrated or written), takes the newest finished run tagged
``arpipe.stage = pipeline`` (or ``--run-id``) and its stage runs: the tags
``arpipe.<stage>.run_id`` of stages whose ``arpipe.<stage>.status`` is ``ran`` (a stage DVC skipped
links an older run, which did not run here) and the runs whose ``mlflow.parentRunId`` is the
pipeline run. Per stage:

- seconds: the stage run's end − start (the stage process, after its imports);
- FLOPs: ``arpipe.stage_work`` on the run's params (the params logged on the pipeline run, the
  flattened params.yaml; runs from before that have them on the stage runs, ``<section>.<key>``,
  which fill in) and image counts (the shard run's ``train/count`` and ``val/count``);
- efficiency: FLOPs ÷ seconds ÷ the CPU's fp32 matmul peak. The peak is the one ``pretrain``
  measured in the same run (``speed/peak_tflops_per_process``) when logged, else the one measured
  here now (``core.training.matmul_peak_flops``; run this on the machine and with the threads of
  the timed run, without OMP_NUM_THREADS=1). Both are written.

``shard`` has no FLOPs model: its seconds per image. A stage that ran but computed nothing (``sar``
on a gpt: a pass-through) and the time outside the stage runs (process starts, ``dvc repro``'s
checks, Prefect, MLflow) make up ``between_stages_seconds`` = pipeline seconds − the timed stages.
Writes ``benchmarks/results/stage_times.json``, which ``arpipe plan`` reads. Run from the
repository root::

    .venv/bin/python benchmarks/stage_times.py                     # this checkout's .arpipe/mlflow.db
    .venv/bin/python benchmarks/stage_times.py --store /path/to/mlflow.db --run-id <pipeline run id>
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python benchmarks/stage_times.py` puts benchmarks/ first, not the root
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks._results import cpu_fp32_peak, write_results  # noqa: E402

PIPELINE = "pipeline"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Per-stage effective FLOP/s of a finished `arpipe run`, for `arpipe plan`'s CPU column.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--project", type=Path, default=REPO_ROOT, help="project whose run it was")
    parser.add_argument("--store", type=Path, help="MLflow SQLite store (default: <project>/.arpipe/mlflow.db)")
    parser.add_argument("--run-id", help="pipeline run to read (default: the newest finished one)")
    return parser.parse_args(argv)


def pipeline_run(client, run_id: str | None):
    if run_id:
        return client.get_run(run_id)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, f"tags.`arpipe.stage` = '{PIPELINE}' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1)  # fmt: skip
    if not runs:
        raise SystemExit("no finished pipeline run in the store: run `arpipe run` first")
    return runs[0]


def stage_runs(client, pipeline) -> dict[str, Any]:
    """stage -> its finished run in this pipeline run, from the tags and from the child runs."""
    tags = pipeline.data.tags
    ids = {
        key.removeprefix("arpipe.").removesuffix(".run_id"): value
        for key, value in tags.items()
        if key.startswith("arpipe.") and key.endswith(".run_id")
    }
    runs = {stage: client.get_run(i) for stage, i in ids.items() if tags.get(f"arpipe.{stage}.status", "ran") == "ran"}
    children = client.search_runs([pipeline.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{pipeline.info.run_id}'")  # fmt: skip
    for child in children:
        runs.setdefault(child.data.tags.get("arpipe.stage", child.info.run_name), child)
    return {stage: run for stage, run in runs.items() if run.info.status == "FINISHED" and run.info.end_time}


def seconds(run) -> float:
    return (run.info.end_time - run.info.start_time) / 1000


def run_params(base: dict, pipeline, runs: dict[str, Any]) -> dict:
    """``base`` (a params.yaml) with every key the runs logged, parsed to the type base has there."""
    from core.config import flatten_params

    logged: dict[str, str] = {}
    for run in runs.values():
        logged.update(run.data.params)
    logged.update(pipeline.data.params)  # the flattened params.yaml itself wins
    params = _copy(base)
    for key, default in flatten_params(base).items():
        if key in logged:
            section = params
            *parents, name = key.split(".")
            for parent in parents:
                section = section[parent]
            section[name] = _parse(key, logged[key], default)
    return params


def _copy(params: dict) -> dict:
    return {k: _copy(v) if isinstance(v, dict) else v for k, v in params.items()}


def _parse(key: str, text: str, default: Any) -> Any:
    try:
        if isinstance(default, bool):
            return {"True": True, "False": False}[text]
        if isinstance(default, int | float):
            return type(default)(text)
        if isinstance(default, list):
            return [list(v) if isinstance(v, tuple) else v for v in ast.literal_eval(text)]
        return text
    except (KeyError, ValueError, SyntaxError) as exc:
        raise SystemExit(f"{key}: logged as {text!r}, not a {type(default).__name__}") from exc


def image_counts(runs: dict[str, Any]) -> tuple[int, int, int | None]:
    """(train, val, classes) from the shard run's metrics."""
    if "shard" not in runs:
        raise SystemExit("the pipeline run has no shard run: its image count is unknown")
    metrics = runs["shard"].data.metrics
    classes = sum(1 for key in metrics if key.startswith("train/class_"))
    return int(metrics["train/count"]), int(metrics["val/count"]), classes or None


def calibrate(store: Path, project: Path, run_id: str | None, peak_now: float) -> dict:
    from mlflow import MlflowClient

    from arpipe.stage_work import Images, model_costs, stage_works
    from core.config import read_params

    with tempfile.TemporaryDirectory() as tmp:  # MLflow may migrate what it opens: open a copy
        copy = Path(tmp) / "mlflow.db"
        shutil.copy2(store, copy)
        client = MlflowClient(tracking_uri=f"sqlite:///{copy}")
        pipeline = pipeline_run(client, run_id)
        runs = stage_runs(client, pipeline)
        base = project / "params.yaml"
        params = run_params(read_params(base if base.is_file() else REPO_ROOT / "params.yaml"), pipeline, runs)
        train, val, classes = image_counts(runs)
        pretrain = runs["pretrain"].data.metrics if "pretrain" in runs else {}
    classes = classes or params["shard"]["num_classes"] or 10  # the digits source has 10
    images = Images(train, val)
    works = {w.stage: w for w in stage_works(params, model_costs(params, classes), images, classes)}
    runs = {stage: runs[stage] for stage in sorted(runs, key=lambda s: list(works).index(s) if s in works else 99)}
    peak_run = pretrain.get("speed/peak_tflops_per_process", 0.0) * 1e12
    peak = peak_run or peak_now
    stages, timed = {}, 0.0
    for stage, run in runs.items():
        if stage not in works:
            continue
        took, work = seconds(run), works[stage]
        timed += took
        if stage == "shard":
            source = f"{params['shard']['source']} images at {params['shard']['image_size']} px"
            stages[stage] = {"seconds": took, "images": work.images, "seconds_per_image": took / work.images,
                             "source": source}  # fmt: skip
        else:
            flops = work.work.flops
            stages[stage] = {"seconds": took, "flops": flops, "flop_per_s": flops / took,
                             "efficiency": flops / took / peak}  # fmt: skip
    info = pipeline.info
    return {
        "pipeline_run": {
            "id": info.run_id,
            "start": dt.datetime.fromtimestamp(info.start_time / 1000, dt.UTC).isoformat(timespec="seconds"),
            "seconds": seconds(pipeline),
            "git_commit": pipeline.data.tags.get("git.commit", "unknown"),
            "host": pipeline.data.tags.get("arpipe.host", "unknown"),
            "store": str(store),
        },
        "images": {"train": train, "val": val},
        "num_classes": classes,
        "peak_flops": peak,
        "peak_from": "logged by pretrain in the run" if peak_run else "measured now",
        "peak_flops_now": peak_now,
        "stages": stages,
        "between_stages_seconds": seconds(pipeline) - timed,
        "not_timed": sorted(set(works) - set(stages)),
        "passed_through": {s: seconds(r) for s, r in runs.items() if s not in works},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    store = args.store or args.project / ".arpipe" / "mlflow.db"
    if not store.is_file():
        raise SystemExit(f"{store} does not exist: run `arpipe run` there first, or pass --store")
    peak_now = cpu_fp32_peak()
    figures = calibrate(store, args.project, args.run_id, peak_now)
    run = figures["pipeline_run"]
    print(f"pipeline run {run['id']} of {run['start']} ({run['seconds']:.0f} s, commit {run['git_commit'][:7]}); "
          f"peak {figures['peak_flops'] / 1e9:.1f} GFLOP/s ({figures['peak_from']}), "
          f"{peak_now / 1e9:.1f} now")  # fmt: skip
    print("| stage | seconds | FLOPs | GFLOP/s | of the peak |\n|---|---|---|---|---|")
    for stage, s in figures["stages"].items():
        if "efficiency" in s:
            print(f"| {stage} | {s['seconds']:.1f} | {s['flops']:.3g} | {s['flop_per_s'] / 1e9:.1f} "
                  f"| {s['efficiency']:.1%} |")  # fmt: skip
        else:
            each = f"{s['images']:,} images, {s['seconds_per_image'] * 1000:.2f} ms each"
            print(f"| {stage} | {s['seconds']:.1f} | {each} | | |")
    print(f"| between stages | {figures['between_stages_seconds']:.1f} | | | |")
    if figures["not_timed"]:
        print(f"not timed in this run (arpipe plan uses the median efficiency): {', '.join(figures['not_timed'])}")
    write_results("stage_times", figures, peaks={"cpu_fp32": peak_now},
                  argv=None if argv is None else ["benchmarks/stage_times.py", *argv])  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
