"""The thin ``main()`` every stage shares: strict params -> MLflow run (rank 0) -> run -> metrics.

A training stage whose params name an accelerate launcher config (``launcher:
accelerate/cpu-2proc.yaml``) is re-executed under ``accelerate launch --config_file <it>`` so
``dvc repro`` (which runs ``python -m stages.<stage>``) scales to several processes, GPUs or nodes
by a param change alone.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.config import ConfigError, as_flat_dict, load_paths, load_section, read_params
from core.metrics import write_metrics
from core.tracking import NullTracker, stage_run

LAUNCHED_ENV = "ARPIPE_LAUNCHED"


def launcher_command(stage: str, config_file: str) -> list[str]:
    """``accelerate launch --config_file <config_file> -m stages.<stage>`` with this interpreter's
    accelerate (the one in the same environment)."""
    if not Path(config_file).is_file():
        raise ConfigError(f"{stage}.launcher: accelerate config {config_file!r} not found")
    accelerate = Path(sys.executable).with_name("accelerate")
    exe = str(accelerate) if accelerate.is_file() else (shutil.which("accelerate") or "accelerate")
    return [exe, "launch", "--config_file", config_file, "-m", f"stages.{stage}"]


def stage_main(stage: str, config_cls: type, run: Callable[..., dict[str, Any]], *, is_main_process: bool = True):
    """Load ``params.yaml`` section ``stage`` strictly, then ``run(cfg, paths, tracker)``.

    Only the main process opens an MLflow run and writes ``metrics/<stage>.json``; other ranks of
    a multi-process launch run with the null tracker. When the section has a non-empty
    ``launcher`` and this process was not started by it, the stage re-executes itself under
    ``accelerate launch`` with that config (the environment, MLflow parent run included, is kept).
    """
    params = read_params()
    cfg = load_section(params, stage, config_cls)
    paths = load_paths(params)
    launcher = getattr(cfg, "launcher", "")
    if launcher and not os.environ.get(LAUNCHED_ENV):
        command = launcher_command(stage, launcher)
        print(f"{stage}: relaunching under {' '.join(command)}", flush=True)
        os.environ[LAUNCHED_ENV] = "1"
        os.execv(command[0], command)
    if not is_main_process:
        run(cfg, paths, NullTracker())
        return
    with stage_run(stage, {f"{stage}.{k}": v for k, v in as_flat_dict(cfg).items()}) as tracker:
        metrics = run(cfg, paths, tracker)
    write_metrics(paths, stage, metrics)
