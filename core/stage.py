"""The thin ``main()`` every stage shares: command line -> strict params -> MLflow run (rank 0) ->
run -> metrics.

The command line is the same for every stage: ``python -m stages.<stage> [--params FILE] [--debug]``;
``--help`` lists the stage's parameters (name, type, default and meaning, read from its ``Config``).
Parameters are set in the params file, never by flags (DVC's up-to-date check reads params.yaml).
A bad parameter or input prints one line and exits non-zero (``core/errors.py``).

A training stage whose params name an accelerate launcher config (``launcher:
accelerate/cpu-2proc.yaml``) is re-executed under ``accelerate launch --config_file <it>`` so
``dvc repro`` (which runs ``python -m stages.<stage>``) scales to several processes, GPUs or nodes
by a param change alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, get_type_hints

from core.config import (
    PARAMS_FILE,
    ConfigError,
    as_flat_dict,
    field_default,
    field_docs,
    load_paths,
    load_stage_config,
    read_params,
    type_name,
)
from core.errors import DEBUG_ENV, reported_errors
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


class _OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (``prog: error: ... (see --help)``), exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def params_help(stage: str, config_cls: type) -> str:
    """One entry per ``Config`` field: ``name (type, default: value)`` and its docstring."""
    hints, docs = get_type_hints(config_cls), field_docs(config_cls)
    section = getattr(config_cls, "params_section", stage)
    lines = textwrap.wrap(
        f"parameters (params file section `{section}`; set them there or with "
        f"`dvc exp run -S {section}.KEY=VALUE`, not by flags):",
        width=100,
    )
    for field in (f for f in dataclasses.fields(config_cls) if f.init):
        default = field_default(field)
        shown = "required" if default is dataclasses.MISSING else f"default: {_yaml_value(default)}"
        lines.append(f"  {field.name} ({type_name(hints[field.name])}, {shown})")
        doc = " ".join(docs[field.name].split())
        lines += textwrap.wrap(doc, width=96, initial_indent="      ", subsequent_indent="      ")
    lines += ["", "Paths come from the `paths` section of the same file."]
    return "\n".join(lines)


def _yaml_value(value: Any) -> str:
    """A default as it would be written in params.yaml (``true``, ``""``, ``[1.0, 3.0]``)."""
    import json

    text = json.dumps(value, default=str)
    return text if len(text) <= 120 else text[:117] + "..."


def parse_stage_args(stage: str, config_cls: type, argv: Sequence[str] | None = None) -> argparse.Namespace:
    module = sys.modules.get(f"stages.{stage}") or sys.modules.get("__main__")
    description = (getattr(module, "__doc__", None) or "").strip()
    parser = _OneLineParser(
        prog=f"python -m stages.{stage}",
        description=description,
        epilog=params_help(stage, config_cls),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--params",
        metavar="FILE",
        default=str(PARAMS_FILE),
        help="parameters file (default: %(default)s, the one DVC reads; another file is for running the "
        "stage by hand, e.g. a preset)",
    )
    parser.add_argument("--debug", action="store_true", help=f"show tracebacks of errors (or {DEBUG_ENV}=1)")
    return parser.parse_args(argv)


def stage_main(
    stage: str,
    config_cls: type,
    run: Callable[..., dict[str, Any]],
    *,
    is_main_process: bool = True,
    argv: Sequence[str] | None = None,
):
    """Parse the command line, load section ``stage`` of the params file strictly, then
    ``run(cfg, paths, tracker)``.

    Only the main process opens an MLflow run and writes ``metrics/<stage>.json``; other ranks of
    a multi-process launch run with the null tracker. When the section has a non-empty
    ``launcher`` and this process was not started by it, the stage re-executes itself under
    ``accelerate launch`` with that config and the same arguments (the environment, MLflow parent
    run included, is kept).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_stage_args(stage, config_cls, argv)
    with reported_errors(stage, debug=args.debug, params_file=args.params):
        params = read_params(args.params)
        cfg = load_stage_config(params, stage, config_cls)
        paths = load_paths(params)
        launcher = getattr(cfg, "launcher", "")
        if launcher and not os.environ.get(LAUNCHED_ENV):
            command = launcher_command(stage, launcher) + argv
            print(f"{stage}: relaunching under {' '.join(command)}", flush=True)
            os.environ[LAUNCHED_ENV] = "1"
            os.execv(command[0], command)
        if not is_main_process:
            run(cfg, paths, NullTracker())
            return
        with stage_run(stage, {f"{stage}.{k}": v for k, v in as_flat_dict(cfg).items()}) as tracker:
            metrics = run(cfg, paths, tracker)
        write_metrics(paths, stage, metrics)
