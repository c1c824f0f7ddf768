"""pretrain's start point as a DVC out: the folder ``paths.models/init`` that ``init_model`` writes.

``init.json`` says what the folder holds: ``{"init_from": "scratch"}`` (or ``released``) and nothing
else, or, for ``init_from: champion``, the registered model it was fetched from (``model``,
``version``, ``run_id``, ``fingerprint``) and the params that chose it (``arch``, ``init_version``),
next to that checkpoint's ``model.safetensors`` + ``config.json``, copied byte for byte. No
timestamps: the folder's bytes, and so its DVC hash, change only when the start point does, which
is what makes DVC re-run pretrain when the champion moved and skip it when it did not.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from core.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from core.registry import WarmStartError

INIT_NAME = "init"
"""The folder under ``paths.models``."""
RECORD_FILE = "init.json"


def start_point_dir(models_dir: str | Path) -> Path:
    return Path(models_dir) / INIT_NAME


def write_start_point(out_dir: str | Path, record: dict[str, Any], checkpoint_dir: str | Path | None = None) -> Path:
    """Write ``out_dir`` atomically (via ``<out_dir>.partial``): ``init.json`` = ``record`` and, when
    given, the checkpoint files of ``checkpoint_dir`` unchanged."""
    out_dir = Path(out_dir)
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    if checkpoint_dir is not None:
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            shutil.copyfile(Path(checkpoint_dir) / name, partial / name)
    (partial / RECORD_FILE).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    partial.rename(out_dir)
    return out_dir


def read_start_point(out_dir: str | Path, expected: dict[str, Any]) -> dict[str, Any]:
    """``init.json`` of ``out_dir``, refused unless it was written for the params in ``expected``
    (``init_from``, ...): a folder from before a params change would start from the wrong weights."""
    record_file = Path(out_dir) / RECORD_FILE
    if not record_file.is_file():
        raise FileNotFoundError(f"{record_file} not found: run init_model first (`dvc repro init_model`)")
    record = json.loads(record_file.read_text())
    for key, value in expected.items():
        if record.get(key) != value:
            raise WarmStartError(
                f"{out_dir} holds the start point for {key} {record.get(key)!r}, but pretrain.{key} is {value!r}: "
                "run init_model again (`dvc repro pretrain` or arpipe run does)"
            )
    return record
