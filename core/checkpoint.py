"""Model directories: ``model.safetensors`` + ``config.json`` with a content fingerprint.

The fingerprint is sha256 over the safetensors bytes and the canonical (sorted, compact) JSON of
the config without the fingerprint itself, so it changes with any weight or setting and with
nothing else: no timestamps or run ids go into either file. Downstream stages read the
architecture from ``config.json`` and refuse artifacts made from another fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def canonical_json(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, separators=(",", ":"))


def fingerprint(weights: bytes, config: dict[str, Any]) -> str:
    config = {k: v for k, v in config.items() if k != "fingerprint"}
    return hashlib.sha256(weights + canonical_json(config).encode()).hexdigest()


def write_checkpoint(out_dir: str | Path, state_dict: dict[str, torch.Tensor], config: dict[str, Any]) -> str:
    """Write ``out_dir`` atomically (via ``<out_dir>.partial``); return the fingerprint."""
    out_dir = Path(out_dir)
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    weights = save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()})
    config = {**config, "fingerprint": fingerprint(weights, config)}
    (partial / WEIGHTS_FILE).write_bytes(weights)
    (partial / CONFIG_FILE).write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    partial.rename(out_dir)
    return config["fingerprint"]


def read_checkpoint(model_dir: str | Path, stage: str = "the stage that wrote it") -> tuple[dict, dict[str, Any]]:
    """(state_dict, config) of a model directory, after checking its fingerprint."""
    model_dir = Path(model_dir)
    weights_file, config_file = model_dir / WEIGHTS_FILE, model_dir / CONFIG_FILE
    if not weights_file.is_file() or not config_file.is_file():
        raise FileNotFoundError(f"{model_dir}: no {WEIGHTS_FILE} + {CONFIG_FILE}; run {stage} first")
    weights = weights_file.read_bytes()
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{config_file}: not valid JSON ({exc}); re-run {stage} or restore the file") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{config_file}: expected a JSON object, got {type(config).__name__}")
    if config.get("fingerprint") != fingerprint(weights, config):
        raise ValueError(f"{model_dir}: fingerprint does not match the files (edited by hand?); re-run {stage}")
    return load_file(weights_file), config


def teacher_cfg_scale(record: dict[str, Any]) -> float:
    """The teacher's guidance scale in a distilled checkpoint's ``teacher`` record or the pairs'
    ``stage_config``: ``cfg_scale``, or ``cfg`` in files written before that key was renamed."""
    return record["cfg_scale"] if "cfg_scale" in record else record["cfg"]


def finetuned_config(stage: str, input_name: str, in_config: dict[str, Any], model_config: dict[str, Any],
                     stage_config: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """config.json of a checkpoint finetuned from ``in_config`` (a post-training stage's out): the
    input's architecture, tokenizer, layout and classes, plus which checkpoint it started from."""
    return {
        "arch": in_config["arch"],
        "model": model_config,
        "stage": stage,
        "tokenizer_fingerprint": in_config["tokenizer_fingerprint"],
        "token_layout": in_config["token_layout"],
        "class_names": in_config["class_names"],
        "image_size": in_config["image_size"],
        "weights": "final",
        "input_checkpoint": {"name": input_name, "fingerprint": in_config["fingerprint"]},
        "stage_config": stage_config,
    }


def passthrough_config(stage: str, input_name: str, in_config: dict[str, Any], reason: str,
                       stage_config: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """config.json of a post-training stage that did not run and passes its input on unchanged
    (same weights): marked ``passthrough_of`` and ``skipped``, which evaluate reads to skip it."""
    config = {k: v for k, v in in_config.items() if k not in ("fingerprint", "stage_config")}
    config.update(
        stage=stage,
        passthrough_of=input_name,
        skipped=reason,
        input_checkpoint={"name": input_name, "fingerprint": in_config["fingerprint"]},
        stage_config=stage_config,
    )
    return config


def write_passthrough(models_dir: str | Path, input_name: str, out_name: str, state_dict: dict, config: dict) -> Path:
    """Write the input checkpoint ``input_name`` unchanged as ``out_name`` (``config`` from
    ``passthrough_config``), with the input's ``samples.png`` when it has one; the folder."""
    out_dir = Path(models_dir) / out_name
    write_checkpoint(out_dir, state_dict, config)
    samples = Path(models_dir) / input_name / "samples.png"
    if samples.is_file():
        shutil.copyfile(samples, out_dir / "samples.png")
    return out_dir
