"""evaluate's registry gate: the best checkpoint into the MLflow registry, and the decision on record.

With tracking on, the best checkpoint (by evaluate's selection metric at its selection guidance) is
logged as a pyfunc "model from code" (``arpipe/pyfunc_model.py``: a sampler that loads safetensors)
and registered as ``arpipe-<arch>``: alias ``candidate`` always, ``champion`` only when it beats the
current champion (``core/registry.py``). The decision comes back as the record evaluate writes to
``paths.last_run/evaluate_registry.json`` (read by the end-of-run summary, ``core/summary.py``; not
a DVC out because the version changes every run).
"""

from __future__ import annotations

from pathlib import Path

from core.config import Paths
from core.registry import log_pyfunc, register_and_gate, sampler_input_example, sampler_signature

STAGE = "evaluate"
"""The stage this gate serves: its messages start with it."""
REPO = Path(__file__).resolve().parents[1]


def registry_record(
    tracker,
    paths: Paths,
    *,
    best: str,
    arch: str,
    select: str,
    value: float,
    higher_is_better: bool,
    register: bool,
    image_shape_HWC,
) -> dict:
    """Register ``best`` when ``register`` is set and tracking is on (``select``: ``<metric>@<guidance>``,
    ``value`` its number); the selection and the registry's decision as a JSON-able record."""
    registry = (
        _register(paths, tracker, best, arch, select, value, higher_is_better, image_shape_HWC) if register else {}
    )
    record = {"best_checkpoint": best, "select": select, "best_value": value, "registered": bool(registry), **registry}
    if not registry:
        record["why_not"] = "register: false" if not register else "MLflow tracking is off"
    return record


def _register(
    paths: Paths, tracker, best: str, arch: str, select: str, value: float, higher_is_better: bool, image_shape_HWC
) -> dict:
    """Register ``best`` (a sampler of ``image_shape_HWC`` images) and gate the champion; the
    decision as a JSON-able record ({} when tracking is off)."""
    client, run_id = getattr(tracker, "client", None), getattr(tracker, "run_id", None)
    if client is None:
        print(f"{STAGE}: MLflow tracking is off: the best checkpoint is not registered")
        return {}
    source = log_pyfunc(
        client,
        run_id,
        REPO / "arpipe" / "pyfunc_model.py",
        artifacts={"model": str(Path(paths.models) / best), "tokenizer": str(paths.tokenizer)},
        code_paths=[str(REPO / "models")],
        pip_requirements=["torch", "numpy", "safetensors", "einops", "pandas"],
        signature=sampler_signature(image_shape_HWC),
        input_example=sampler_input_example(),
    )
    name = f"arpipe-{arch}"
    version, decision = register_and_gate(
        client,
        name=name,
        source=source,
        run_id=run_id,
        metric=select,
        value=value,
        higher_is_better=higher_is_better,
        tags={"arpipe.checkpoint": best},
    )
    tracker.set_tags(
        {
            "arpipe.registry.model": name,
            "arpipe.registry.version": version,
            "arpipe.registry.champion_moved": decision.promote,
            "arpipe.registry.decision": decision.reason,
        }
    )
    tracker.log_metrics(
        {
            "registry/candidate_value": value,
            **({"registry/champion_value": decision.champion_value} if decision.champion_value is not None else {}),
        }
    )
    print(f"{STAGE}: {champion_sentence(name, version, decision.promote, decision.champion_version, decision.reason)}")
    return {
        "model": name,
        "version": version,
        "checkpoint": best,
        "champion_moved": decision.promote,
        "champion_version": version if decision.promote else decision.champion_version,
        "previous_champion_version": decision.champion_version,
        "previous_champion_value": decision.champion_value,
        "reason": decision.reason,
    }


def champion_sentence(name: str, version: str, promoted: bool, previous: str | None, reason: str) -> str:
    """``registered arpipe-gpt v3 (alias candidate); it is now the champion (no champion yet)``."""
    head = f"registered {name} v{version} (alias candidate); "
    if promoted:
        was = f", was v{previous}" if previous else ""
        return head + f"it is now the champion{was} ({reason})"
    return head + f"the champion stays v{previous} ({reason})"
