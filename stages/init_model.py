"""init_model: pretrain's start point as a DVC out, so a moved champion is an input DVC can see.

With ``pretrain.init_from: champion`` it reads the MLflow registry's ``arpipe-<arch>@champion`` (or
version ``pretrain.init_version``) and writes that checkpoint, byte for byte, to
``paths.models/init`` (model.safetensors + config.json) with ``init.json`` naming the registered
version; with ``scratch`` or ``released`` it writes ``init.json`` alone, so the out always exists and
keeps its bytes (``core/start_point.py``). pretrain reads the folder as a declared dependency.

The registry is state outside the repository, so dvc.yaml marks this stage ``always_changed``:
DVC runs it every time (a few seconds) and re-runs pretrain only when the out's hash moved, i.e.
when the champion is another version. Refuses, in one line, when tracking is off, the tracking
server is unreachable, the registry has no such version or it holds another architecture.

Reads ``arch``, ``init_from`` and ``init_version`` of params.yaml's ``pretrain`` section (pretrain
owns and checks the section). Writes ``metrics/init_model.json`` (the version started from, if
any). Run by DVC as ``python -m stages.init_model``.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import ClassVar, Literal

from core.checkpoint import read_checkpoint
from core.config import Paths
from core.registry import WarmStartError, download_registered_checkpoint, registered_model_name, resolve_version
from core.stage import stage_main
from core.start_point import start_point_dir, write_start_point

STAGE = "init_model"


@dataclass(frozen=True, kw_only=True)
class Config:
    params_section: ClassVar[str] = "pretrain"
    """These keys live in pretrain's section: it owns them (and checks the rest of it)."""

    arch: Literal["gpt", "var"] = "gpt"
    """The registered model to start from is ``arpipe-<arch>``."""
    init_from: Literal["scratch", "champion", "released"] = "scratch"
    """``champion``: fetch the registry's champion; ``scratch`` / ``released``: a marker only
    (pretrain starts from random weights or reads the released file itself)."""
    init_version: int = 0
    """With ``champion``: the registered version to fetch; 0 = the one the alias points to now."""


def run(cfg: Config, paths: Paths, tracker) -> dict:
    out_dir = start_point_dir(paths.models)
    if cfg.init_from != "champion":
        write_start_point(out_dir, {"init_from": cfg.init_from})
        print(f"{STAGE}: pretrain.init_from is {cfg.init_from}: nothing to fetch -> {out_dir}")
        return {}
    client = registry_client()
    name = registered_model_name(cfg.arch)
    version = resolve_version(client, name, cfg.init_version)
    what = f"{name} v{version.version}"
    with tempfile.TemporaryDirectory() as tmp:
        folder = download_registered_checkpoint(client, version, tmp)
        _, config = read_checkpoint(folder, stage=f"evaluate ({what})")  # checks the fingerprint
        if config.get("arch") != cfg.arch:
            raise WarmStartError(
                f"pretrain.init_from: {what} holds a {config.get('arch')} model; pretrain.arch is {cfg.arch}"
            )
        record = {"init_from": "champion", "arch": cfg.arch, "init_version": cfg.init_version, "model": name,
                  "version": str(version.version), "run_id": version.run_id,
                  "fingerprint": config["fingerprint"]}  # fmt: skip
        write_start_point(out_dir, record, folder)
    tracker.set_tags({f"arpipe.init.{key}": value for key, value in record.items() if key != "init_from"})
    print(f"{STAGE}: {what} (fingerprint {config['fingerprint'][:12]}) -> {out_dir}")
    return {"version": int(version.version)}


def registry_client():
    """An MLflow client of the tracking store, or a one-line refusal saying why there is none."""
    from core.tracking import client_for, tracking_enabled, tracking_reachable, tracking_uri

    if not tracking_enabled():
        raise WarmStartError(
            "pretrain.init_from: champion reads the MLflow registry, but tracking is off (ARPIPE_TRACKING=off); "
            "turn tracking on or set init_from: scratch"
        )
    uri = tracking_uri()
    if not tracking_reachable(uri):
        raise WarmStartError(f"pretrain.init_from: champion: the tracking server {uri} is unreachable")
    return client_for()


def main() -> None:
    stage_main(STAGE, Config, run)


if __name__ == "__main__":
    main()
