"""The MLflow model registry: log a checkpoint as a pyfunc, alias it ``candidate``, gate ``champion``.

A registered model is an MLflow pyfunc "model from code" (``arpipe/pyfunc_model.py``): the code
is stored as source, the weights as safetensors artifacts (no pickles). Every evaluation aliases
its best checkpoint ``candidate``; ``champion`` moves to it only when it beats the current
champion on the selection metric, and the decision with both numbers is returned for logging.
This module talks to MLflow only through a client (no fluent active run), so it can be called
from inside a stage's run.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METRIC_TAG = "arpipe.selection_metric"
VALUE_TAG = "arpipe.selection_value"


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str
    candidate_value: float
    champion_value: float | None
    champion_version: str | None


def champion_decision(candidate: float, champion: float | None, higher_is_better: bool) -> tuple[bool, str]:
    """Should ``candidate`` replace the champion? (decision, reason). Ties keep the champion."""
    if champion is None:
        return True, "no champion yet"
    better = candidate > champion if higher_is_better else candidate < champion
    word = "higher" if higher_is_better else "lower"
    if better:
        return True, f"candidate {candidate:.6g} beats champion {champion:.6g} ({word} is better)"
    return False, f"candidate {candidate:.6g} does not beat champion {champion:.6g} ({word} is better)"


def sampler_signature(image_shape_HWC: tuple[int, int, int]):
    """The registered sampler's signature (arpipe/pyfunc_model.py): rows of ``label`` (a class name
    or index, so any type), optional ``cfg_scale`` (float guidance scale) and ``seed`` (int) in; one uint8
    image (N, H, W, C) per row out."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema, TensorSpec
    from mlflow.types.schema import AnyType

    inputs = Schema(
        [
            ColSpec(AnyType(), "label"),
            ColSpec(DataType.double, "cfg_scale", required=False),
            ColSpec(DataType.long, "seed", required=False),
        ]
    )
    outputs = Schema([TensorSpec(np.dtype(np.uint8), (-1, *image_shape_HWC))])
    return ModelSignature(inputs=inputs, outputs=outputs)


def sampler_input_example():
    """Two rows a user could send: class 0 guidance-free, class 1 at guidance 2 with seed 7."""
    import pandas as pd

    return pd.DataFrame({"label": [0, 1], "cfg_scale": [1.0, 2.0], "seed": [0, 7]})


def log_pyfunc(
    client,
    run_id: str,
    python_model: str | Path,
    artifacts: dict[str, str],
    code_paths: list[str],
    pip_requirements: list[str],
    signature=None,
    input_example=None,
) -> str:
    """Save a models-from-code pyfunc (with its ``signature`` and ``input_example`` when given) and
    log it under the run's ``model/`` artifacts; return its URI."""
    import mlflow.pyfunc

    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "model"
        mlflow.pyfunc.save_model(
            path=str(target),
            python_model=str(python_model),
            artifacts=artifacts,
            code_paths=code_paths,
            pip_requirements=pip_requirements,
            signature=signature,
            input_example=input_example,
        )
        client.log_artifacts(run_id, str(target), "model")
        shutil.rmtree(target, ignore_errors=True)
    return f"runs:/{run_id}/model"


def register_and_gate(
    client,
    *,
    name: str,
    source: str,
    run_id: str,
    metric: str,
    value: float,
    higher_is_better: bool,
    tags: dict[str, Any] | None = None,
) -> tuple[str, GateDecision]:
    """Register ``source`` as a new version of ``name``, alias it ``candidate``, and move
    ``champion`` to it if it beats the current champion's ``metric`` (stored on each version)."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="arpipe AR image generator: class labels in, images out")
    version = client.create_model_version(
        name,
        source,
        run_id=run_id,
        tags={METRIC_TAG: metric, VALUE_TAG: repr(float(value)), **{k: str(v) for k, v in (tags or {}).items()}},
    ).version
    client.set_registered_model_alias(name, "candidate", version)
    try:
        champion = client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        champion = None
    champion_value = None
    if champion is not None and champion.tags.get(METRIC_TAG) == metric:
        champion_value = float(champion.tags[VALUE_TAG])
    elif champion is not None:  # selected by another metric: not comparable, the new one wins
        champion_value = None
    promote, reason = champion_decision(float(value), champion_value, higher_is_better)
    if promote:
        client.set_registered_model_alias(name, "champion", version)
    decision = GateDecision(promote, reason, float(value), champion_value, str(champion.version) if champion else None)
    return str(version), decision


# -- warm starts: a registered checkpoint back as weights ---------------------------------------


class WarmStartError(ValueError):
    """The registered model to start from cannot be used; the message says why and what to do."""


def registered_model_name(arch: str) -> str:
    return f"arpipe-{arch}"


def resolve_version(client, name: str, version: int = 0):
    """The ModelVersion to start from: ``version`` when > 0, else the one aliased ``champion``."""
    from mlflow.exceptions import MlflowException

    try:
        if version > 0:
            return client.get_model_version(name, str(version))
        return client.get_model_version_by_alias(name, "champion")
    except MlflowException as exc:
        with_champion = []
        try:
            models = client.search_registered_models("name LIKE 'arpipe-%'")
            with_champion = [m.name for m in models if "champion" in (m.aliases or {})]
        except MlflowException:
            pass
        what = f"version {version} of {name}" if version > 0 else f"champion alias on {name}"
        hint = (
            f"models with a champion: {', '.join(with_champion)} (does pretrain.arch match?)"
            if with_champion
            else "no arpipe model has a champion yet: run the pipeline through evaluate once with init_from: scratch"
        )
        raise WarmStartError(f"pretrain.init_from: the registry has no {what}; {hint}") from exc


def download_registered_checkpoint(client, model_version, dest: str | Path) -> Path:
    """Download the version's logged pyfunc and return its AR checkpoint folder (``model``
    artifact: model.safetensors + config.json)."""
    import yaml

    run_id, source = model_version.run_id, str(model_version.source)
    if not run_id or not source.startswith(f"runs:/{run_id}/"):
        raise WarmStartError(
            f"pretrain.init_from: {model_version.name} v{model_version.version} was not logged by arpipe's "
            f"evaluate stage (source {source})"
        )
    local = Path(client.download_artifacts(run_id, source.split(f"runs:/{run_id}/", 1)[1], str(dest)))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    artifacts = mlmodel.get("flavors", {}).get("python_function", {}).get("artifacts", {})
    if "model" not in artifacts:
        what = f"{model_version.name} v{model_version.version}"
        raise WarmStartError(f"pretrain.init_from: {what} has no 'model' artifact (not logged by evaluate?)")
    return local / artifacts["model"]["path"]


def check_state_fits(loaded: dict, target: dict, what: str) -> None:
    """Refuse a state dict whose keys or shapes differ from the model's, naming the first key."""
    missing = sorted(set(target) - set(loaded))
    unexpected = sorted(set(loaded) - set(target))
    if missing or unexpected:
        key, where = (missing[0], "missing from") if missing else (unexpected[0], "not in this model but in")
        raise WarmStartError(
            f"pretrain.init_from: {what} does not fit this model: {key} is {where} its weights "
            f"({len(missing)} missing, {len(unexpected)} unexpected); pretrain.arch/model changed? "
            "Set init_from: scratch or match the champion's architecture"
        )
    for key in target:
        if tuple(loaded[key].shape) != tuple(target[key].shape):
            raise WarmStartError(
                f"pretrain.init_from: {what} does not fit this model: {key} has shape {tuple(loaded[key].shape)} "
                f"in it and {tuple(target[key].shape)} here (pretrain.model, the tokenizer's codebook or the "
                "class count changed); set init_from: scratch or match the champion's architecture"
            )
