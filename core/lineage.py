"""Tie MLflow runs to DVC: the pipeline (parent) run, dvc.lock hashes as tags, skipped stages.

Used by the Prefect flow (no torch here). After ``dvc repro`` a stage's dvc.lock entry holds the
md5 of its deps and outs; the flow tags the stage's run with them and logs a PNG of each curve
file the stage wrote (``plots/<name>.png``: viewable offline, unlike ``dvc plots show``). When
DVC skips an up-to-date stage no new run exists, so the pipeline run links the run whose
``arpipe.dvc.outs`` tag matches the current outs: that run produced the artifacts in the workspace.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml

from core.config import flatten_params, load_paths, read_params
from core.metrics import flatten_metrics
from core.plots import log_curve_images
from core.tracking import (
    MlflowTracker,
    client_for,
    close_abandoned_runs,
    experiment_id,
    git_commit,
    git_dirty,
    param_value,
    process_tags,
)

OUTS_TAG = "arpipe.dvc.outs"
DEPS_TAG = "arpipe.dvc.deps"


NAME_CHANGES_SHOWN = 3  # changed params spelled out in a pipeline run's name; the rest are counted


def pipeline_run_name(version: str, params: dict[str, str], changes: list[str] | None) -> str:
    """``pipeline <commit>[+dirty] <k=v, ...>``: up to NAME_CHANGES_SHOWN changed params with their
    new values (``k=–`` for a removed key), ``no param changes``, or nothing when ``changes`` is None
    (no previous run to compare with). MLflow keeps at most 250 characters of a run name."""
    words = ["pipeline", version] if version else ["pipeline"]
    if changes is not None:
        shown = [f"{k}={params.get(k, '–')}" for k in changes[:NAME_CHANGES_SHOWN]]
        more = len(changes) - len(shown)
        words.append(", ".join(shown) + (f" (+{more} more)" if more else "") if changes else "no param changes")
    name = " ".join(words)
    return name if len(name) <= 250 else name[:249] + "…"


def lock_entry(root: Path, stage: str) -> dict[str, Any] | None:
    lock = root / "dvc.lock"
    if not lock.is_file():
        return None
    return (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).get(stage)


def lock_hashes(entry: dict[str, Any]) -> tuple[str, str]:
    """``path=md5`` lists (sorted, ``;``-joined) of a dvc.lock stage entry's deps and outs."""

    def joined(items: list[dict]) -> str:
        return ";".join(sorted(f"{i['path']}={i.get('md5', i.get('hash', ''))}" for i in items))

    return joined(entry.get("deps", [])), joined(entry.get("outs", []))


class PipelineRun:
    """The parent MLflow run of one ``arpipe run``; stage runs nest under it.

    It logs params.yaml, flattened (``pretrain.lr``), as its params and is named by the commit and
    the params that changed since the experiment's previous pipeline run, e.g.
    ``pipeline 1a2b3c4+dirty pretrain.lr=0.002`` (or ``... no param changes``; the first run names
    only its commit). Every changed key is in the tag ``arpipe.params_changed``."""

    def __init__(self, root: Path, flow_run_id: str | None, tags: dict[str, str] | None = None):
        self.root = root
        self.client = client_for(root)
        self.experiment_id = experiment_id(self.client, root)
        close_abandoned_runs(self.client, self.experiment_id)
        commit = git_commit(root)
        params_file = root / "params.yaml"
        params_yaml = read_params(params_file) if params_file.is_file() else {}
        self.plots_dir = root / load_paths(params_yaml).plots
        params = {k: param_value(v) for k, v in flatten_params(params_yaml).items()}
        changes = self._changes_since_previous_run(params)
        run_tags = {"arpipe.stage": "pipeline", "git.commit": commit, **process_tags(), **(tags or {})}
        if flow_run_id:
            run_tags["prefect.flow_run_id"] = flow_run_id
        if changes is not None:
            run_tags["arpipe.params_changed"] = param_value(", ".join(changes) or "none")
        version = "" if commit == "unknown" else commit[:7] + ("+dirty" if git_dirty(root) else "")
        name = pipeline_run_name(version, params, changes)
        self.run_id = self.client.create_run(self.experiment_id, run_name=name, tags=run_tags).info.run_id
        MlflowTracker(self.client, self.run_id).log_params(params)

    def _changes_since_previous_run(self, params: dict[str, str]) -> list[str] | None:
        """Keys whose value differs from the previous pipeline run's (sorted); None when there is
        no previous run that logged params (the first run, or one from before runs logged them)."""
        previous = self.client.search_runs(
            [self.experiment_id],
            "tags.`arpipe.stage` = 'pipeline'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if not previous or not previous[0].data.params:
            return None
        before = previous[0].data.params
        return sorted(k for k in before.keys() | params.keys() if before.get(k) != params.get(k))

    def env(self) -> dict[str, str]:
        """What a stage subprocess needs to nest its run under this one."""
        from core.tracking import tracking_uri

        return {
            "MLFLOW_TRACKING_URI": tracking_uri(self.root),
            "ARPIPE_EXPERIMENT": self.client.get_experiment(self.experiment_id).name,
            "ARPIPE_PARENT_RUN_ID": self.run_id,
        }

    def record_stage(self, stage: str, status: str, metrics: dict[str, Any] | None) -> str | None:
        """Tag the stage's run with its dvc.lock hashes, or link the producing run if DVC skipped it.

        Returns the run id that produced the stage's current outs (None if none is known).
        """
        entry = lock_entry(self.root, stage)
        deps, outs = lock_hashes(entry) if entry else ("", "")
        run_id = None
        if status == "ran":
            runs = self.client.search_runs(
                [self.experiment_id],
                f"tags.mlflow.parentRunId = '{self.run_id}' and tags.`arpipe.stage` = '{stage}'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
            if runs:
                run_id = runs[0].info.run_id
                self.client.set_tag(run_id, DEPS_TAG, deps)
                self.client.set_tag(run_id, OUTS_TAG, outs)
                # DVC removed the stage's outs before it ran: every curve file there is this run's
                log_curve_images(MlflowTracker(self.client, run_id), self.plots_dir / stage)
        elif outs:
            escaped = outs.replace("'", "\\'")
            runs = self.client.search_runs(
                [self.experiment_id],
                f"tags.`{OUTS_TAG}` = '{escaped}'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
            run_id = runs[0].info.run_id if runs else None
        tags = {f"arpipe.{stage}.status": status}
        if run_id:
            tags[f"arpipe.{stage}.run_id"] = run_id
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)
        if metrics:
            from mlflow.entities import Metric

            flat = flatten_metrics(metrics, f"{stage}/")
            now = int(time.time() * 1000)
            points = [Metric(k, v, now, 0) for k, v in flat.items()]
            for i in range(0, len(points), 1000):
                self.client.log_batch(self.run_id, metrics=points[i : i + 1000])
        return run_id

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


class OfflinePipelineRun:
    """Stands in for ``PipelineRun`` when tracking is off or the server is unreachable: stages run
    unparented (and spool their runs when the server is unreachable); nothing is recorded here."""

    run_id = ""

    def __init__(self, root: Path):
        self.root = root

    def env(self) -> dict[str, str]:
        from core.tracking import tracking_uri

        return {"MLFLOW_TRACKING_URI": tracking_uri(self.root), "ARPIPE_PARENT_RUN_ID": ""}

    def record_stage(self, stage: str, status: str, metrics: dict[str, Any] | None) -> str | None:
        return None

    def finish(self, status: str) -> None:
        pass


def open_pipeline_run(root: Path, flow_run_id: str | None, tags: dict[str, str] | None = None):
    """The pipeline's parent run, or an offline stand-in when tracking is off or unreachable."""
    from core.tracking import tracking_enabled, tracking_reachable, tracking_uri

    if not tracking_enabled() or not tracking_reachable(tracking_uri(root)):
        return OfflinePipelineRun(root)
    return PipelineRun(root, flow_run_id, tags)
