"""Pipeline runs side by side: the params that differ, key metrics per checkpoint, the champion;
and the same key metrics as the saved columns of the MLflow runs table (``save_runs_view``).

Reads the tracking store through the given client (one DataFrame per query) and shapes it with
DuckDB: every pipeline run contributes its stage runs' params (the stage runs that ran in it, or
produced the outs it reused: ``arpipe.<stage>.run_id`` tags) and the stage metrics logged on the
pipeline run itself (``<stage>/<metric>``). Only params whose values differ between the compared
runs are shown. One column per pipeline run, newest first.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass

# metric columns (DuckDB LIKE patterns on "<stage>/<metric>") worth a glance, in display order
KEY_METRICS = (
    "evaluate/%/cfg%/fid",
    "evaluate/%/cfg%/class_acc",
    "pretrain/val_loss",
    "train_tokenizer/val_psnr",
    "train_tokenizer/val_recon_fid_pixels",
    "train_evalnet/val_accuracy",
)

VIEW_KEY = "arpipe"  # `arpipe ui` opens the runs table with ?viewStateShareKey=arpipe: these columns
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"


@dataclass(frozen=True)
class Comparison:
    runs: list[str]
    """Pipeline run ids, newest first (the columns)."""
    rows: list[tuple[str, list[str]]]
    """(row label, one cell per run)."""


def compare_pipeline_runs(experiment_id: str, last: int = 5, client=None) -> Comparison:
    import duckdb
    import pandas as pd
    from mlflow import MlflowClient

    client = client or MlflowClient()
    parents = _runs_frame(
        client.search_runs(
            [experiment_id],
            "tags.`arpipe.stage` = 'pipeline'",
            order_by=["attributes.start_time DESC"],
            max_results=last,
        )
    )
    if parents.empty:
        raise LookupError("no pipeline runs in the tracking store yet: run `arpipe run` first")
    run_ids = list(parents["run_id"])

    # params of the stage runs behind each pipeline run, long format
    params, cache = [], {}
    link_columns = [c for c in parents.columns if c.startswith("tags.arpipe.") and c.endswith(".run_id")]
    for _, parent in parents.iterrows():
        for column in link_columns:
            stage_run = parent[column]
            if not isinstance(stage_run, str) or not stage_run:
                continue
            if stage_run not in cache:
                cache[stage_run] = client.get_run(stage_run).data.params
            params += [(parent["run_id"], key, value) for key, value in cache[stage_run].items()]
    params_df = pd.DataFrame(params, columns=["run", "key", "value"])  # noqa: F841 - read by DuckDB
    # a key differs when its value (missing counts as a value) varies across the runs that ran or
    # reused its stage
    differing = duckdb.sql("""
        WITH stage_runs AS (SELECT DISTINCT run, split_part(key, '.', 1) AS stage FROM params_df),
             keys AS (SELECT DISTINCT key, split_part(key, '.', 1) AS stage FROM params_df),
             grid AS (SELECT k.key, s.run FROM keys k JOIN stage_runs s ON k.stage = s.stage)
        SELECT g.key FROM grid g LEFT JOIN params_df p ON p.key = g.key AND p.run = g.run
        GROUP BY g.key HAVING count(DISTINCT coalesce(p.value, '–')) > 1 ORDER BY g.key
    """).fetchall()

    wanted = key_metric_names(c.removeprefix("metrics.") for c in parents.columns if c.startswith("metrics."))

    champions = _champion_runs(client)
    rows: list[tuple[str, list[str]]] = [
        ("started", [str(t)[:19] for t in parents["start_time"]]),
        ("status", list(parents["status"])),
        ("champion", [champions.get(_tag(p, "tags.arpipe.evaluate.run_id"), "") for _, p in parents.iterrows()]),
    ]
    lookup = {(r, k): v for r, k, v in params}
    for (key,) in differing:
        rows.append((f"param {key}", [lookup.get((run, key), "–") for run in run_ids]))
    for name in wanted:
        values = parents[f"metrics.{name}"]
        rows.append((name, ["–" if pd.isna(v) else f"{v:.4g}" for v in values]))
    return Comparison(runs=run_ids, rows=rows)


def _runs_frame(runs):
    """``runs`` (searched through a client) as ``mlflow.search_runs`` would give them: columns run_id,
    start_time, status, tags.*, metrics.*. ``mlflow.search_runs`` itself reads the process-wide
    tracking URI, not the client's store."""
    import pandas as pd

    rows = [
        {
            "run_id": run.info.run_id,
            "start_time": pd.to_datetime(run.info.start_time, unit="ms", utc=True),
            "status": run.info.status,
            **{f"tags.{key}": value for key, value in run.data.tags.items()},
            **{f"metrics.{key}": value for key, value in run.data.metrics.items()},
        }
        for run in runs
    ]
    return pd.DataFrame(rows, columns=None if rows else ["run_id", "start_time", "status"])


def key_metric_names(names: Iterable[str]) -> list[str]:
    """The ``names`` that match KEY_METRICS, in its order (then by name)."""
    import duckdb
    import pandas as pd

    metrics_df = pd.DataFrame({"name": list(names)}, dtype=str)  # noqa: F841 - read by DuckDB
    wanted: list[str] = []
    for pattern in KEY_METRICS:
        found = duckdb.sql("SELECT name FROM metrics_df WHERE name LIKE ? ORDER BY name", params=[pattern]).fetchall()
        wanted += [name for (name,) in found if name not in wanted]
    return wanted


def save_runs_view(client, experiment_id: str, last: int = 20) -> list[str]:
    """Save the runs-table view ``arpipe ui`` opens: the KEY_METRICS columns that the newest ``last``
    pipeline runs hold, newest run first. MLflow's UI keeps a shared view as the experiment tag
    ``mlflow.sharedViewState.<key>`` (its Share button writes one) and opens it for the URL
    parameter ``viewStateShareKey=<key>``; the state is plain JSON. Returns the metric columns."""
    runs = client.search_runs(
        [experiment_id],
        "tags.`arpipe.stage` = 'pipeline'",
        order_by=["attributes.start_time DESC"],
        max_results=last,
    )
    metrics = key_metric_names(sorted({name for run in runs for name in run.data.metrics}))
    state = {
        "selectedColumns": ["attributes.`Duration`", *(f"metrics.`{name}`" for name in metrics)],
        "orderByKey": "attributes.start_time",
        "orderByAsc": False,
    }
    client.set_experiment_tag(experiment_id, VIEW_TAG, json.dumps(state))
    return metrics


def _tag(row, column: str) -> str:
    value = row.get(column)
    return value if isinstance(value, str) else ""


def _champion_runs(client) -> dict[str, str]:
    """evaluate run id -> 'arpipe-<arch> vN' for the versions aliased champion."""
    from mlflow.exceptions import MlflowException

    out = {}
    try:
        models = client.search_registered_models("name LIKE 'arpipe-%'")
    except MlflowException:
        return out
    for model in models:
        if "champion" in model.aliases:
            version = client.get_model_version_by_alias(model.name, "champion")
            out[version.run_id] = f"{model.name} v{version.version}"
    return out


def format_comparison(comparison: Comparison, fmt: str = "md") -> str:
    header = ["", *[run[:8] for run in comparison.runs]]
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["field", *comparison.runs])
        writer.writerows([label, *cells] for label, cells in comparison.rows)
        return buffer.getvalue()
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([label, *cells]) + " |" for label, cells in comparison.rows]
    return "\n".join(lines) + "\n"
