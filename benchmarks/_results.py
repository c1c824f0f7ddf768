"""Where every benchmark's figures go: ``benchmarks/results/<name>.json``, with their provenance.

Each benchmark keeps printing its table and also calls ``write_results(name, figures)`` once at the
end. The file holds the figures (JSON: numbers, strings, lists, dicts; dataclasses and paths are
converted) and what a reader needs to check a quoted number against its source and judge it:

- ``date`` (UTC, ISO 8601), ``git`` (commit and whether the worktree had uncommitted changes),
  ``command`` (the command line as typed, shell-quoted);
- ``machine``: host name, CPU model, CPU count, torch threads, the 1/5/15-minute load average
  when the benchmark started and when it wrote the file (the machines are shared: a load
  above the core count means the figures are pessimistic),
  Python and torch versions, the GPU's name when one is visible;
- ``peak``: the dense fp32 matmul throughput of the CPU (``core.training.matmul_peak_flops``)
  measured in the same process when the file is written, plus any peaks the benchmark measured
  itself (e.g. the GPU's bf16 peak), in FLOP/s.

A run overwrites the previous file: git keeps the history, and the README quotes the committed file.
``ARPIPE_BENCH_RESULTS`` names another folder (tests write there, never into the repository).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import os
import platform
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
LOAD_AT_START = os.getloadavg()  # when the benchmark imported this module, i.e. before measuring


def results_dir() -> Path:
    return Path(os.environ.get("ARPIPE_BENCH_RESULTS") or RESULTS_DIR)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()

    try:
        # benchmarks/results/ itself is left out: rewriting a result must not mark the tree dirty
        dirty = git("status", "--porcelain", "--", ".", ":(exclude)benchmarks/results")
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}


def machine() -> dict[str, Any]:
    import torch

    info = {
        "host": socket.gethostname(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_start": [round(x, 2) for x in LOAD_AT_START],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def cpu_fp32_peak() -> float:
    import torch

    from core.training import matmul_peak_flops

    return matmul_peak_flops(torch.device("cpu"), torch.float32)


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)  # strict JSON has no NaN/inf
    if isinstance(value, (int, str, bool)) or value is None:
        return value
    if hasattr(value, "item"):  # numpy / torch scalars
        return _jsonable(value.item())
    return str(value)


def write_results(
    name: str, figures: Any, *, peaks: dict[str, float] | None = None, argv: list[str] | None = None
) -> Path:
    """Write ``<results dir>/<name>.json``; print and return its path.

    ``peaks`` are FLOP/s the benchmark measured itself (e.g. ``{"gpu_bf16": ...}``); the CPU's fp32
    peak is measured here unless given as ``cpu_fp32``.
    """
    peaks = dict(peaks or {})
    if "cpu_fp32" not in peaks:
        peaks["cpu_fp32"] = cpu_fp32_peak()
    record = {
        "name": name,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git": git_state(),
        "command": shlex.join([sys.executable, *(sys.argv if argv is None else argv)]),
        "machine": machine(),
        "peak_flops": peaks,
        "figures": figures,
    }
    out = results_dir() / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_jsonable(record), indent=1) + "\n")
    print(f"figures written to {out}")
    return out
