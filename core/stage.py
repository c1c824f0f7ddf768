"""The thin ``main()`` every stage shares: strict params -> MLflow run (rank 0) -> run -> metrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from core.config import as_flat_dict, load_paths, load_section, read_params
from core.metrics import write_metrics
from core.tracking import NullTracker, stage_run


def stage_main(stage: str, config_cls: type, run: Callable[..., dict[str, Any]], *, is_main_process: bool = True):
    """Load ``params.yaml`` section ``stage`` strictly, then ``run(cfg, paths, tracker)``.

    Only the main process opens an MLflow run and writes ``metrics/<stage>.json``; other ranks of
    a multi-process launch run with the null tracker.
    """
    params = read_params()
    cfg = load_section(params, stage, config_cls)
    paths = load_paths(params)
    if not is_main_process:
        run(cfg, paths, NullTracker())
        return
    with stage_run(stage, {f"{stage}.{k}": v for k, v in as_flat_dict(cfg).items()}) as tracker:
        metrics = run(cfg, paths, tracker)
    write_metrics(paths, stage, metrics)
