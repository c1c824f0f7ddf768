"""Small builders shared by tests."""

import importlib
import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def png_bytes(array: np.ndarray, mode: str | None = None, **save) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG", **save)
    return buffer.getvalue()


def random_rgb(seed: int, size: int = 24) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


# Tiny tokenizer configs for stage tests: 8x8 images, 32 codes, a few seconds of training.
TINY_MSVQ = {
    "base_channels": 8,
    "channel_multipliers": [1, 2],
    "attention": False,
    "z_channels": 8,
    "codebook_size": 32,
    "scales": [1, 2, 4],
    "candidate_buffer_size": 64,
    "restart_every": 4,
}
TINY_VQ = {k: v for k, v in TINY_MSVQ.items() if k != "scales"}
TINY_TOKENIZERS = {"msvq": TINY_MSVQ, "vq": TINY_VQ}


# A hand-made token cache (vocabulary 8, 3 tokens per row) with known counts, for `data tokens`.
TOKEN_META = {"token_layout": {"kind": "vq", "grid": [1, 3]}, "seq_len": 3, "vocab_size": 8, "fingerprint": "f" * 64}


def write_token_cache(root: Path, meta: dict = TOKEN_META) -> Path:
    """train: codes 0 x5, 1 x4, 2 x2, 5 x1 over 4 rows (2 images x 2 views); val: 2 x1, 6 x2 (1 row)."""
    from core.token_store import write_tokens

    root.mkdir(parents=True, exist_ok=True)
    train = np.array([[0, 0, 1], [0, 2, 2], [1, 1, 1], [0, 0, 5]])
    rows = {"key": list("aabb"), "label": [0, 0, 1, 1], "view": [0, 1, 0, 1]}
    write_tokens(root / "train.parquet", rows, train, meta)
    write_tokens(root / "val.parquet", {"key": ["c"], "label": [1], "view": [0]}, np.array([[2, 6, 6]]), meta)
    return root


# A throwaway copy of the project as its own git + DVC repo (flow tests).
PROJECT_FILES = [
    "dvc.yaml",
    "params.yaml",
    ".dvcignore",
    ".gitignore",
    ".dvc/config",
    ".dvc/.gitignore",
    "core",
    "stages",
    "models",
    "arpipe",
    "sources",
]


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout.strip()


def make_project(root: Path, params: dict | None = None, dvc_yaml: dict | None = None) -> Path:
    """A throwaway clone of the project (or a custom dvc.yaml) as its own git + DVC repo."""
    root.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = REPO / name
        dst = root / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dst)
    if params is not None:
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if dvc_yaml is not None:
        (root / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    git(root, "init", "-q")
    git(root, "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A")
    git(root, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init")
    return root


def run_stage_under_two_cpu_ranks(stage: str, config: dict, paths, project: Path) -> subprocess.CompletedProcess:
    """``python -m stages.<stage>`` in a copy of the code under ``project`` whose params.yaml holds
    ``paths`` (a core.config.Paths) and ``config`` with ``launcher: accelerate/cpu-2proc.yaml``:
    the stage relaunches itself as two gloo ranks (one thread each, tracking off)."""
    import dataclasses
    import os
    import sys

    for name in ("core", "stages", "models", "accelerate"):
        shutil.copytree(REPO / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    from core.config import as_params

    config_cls = importlib.import_module(f"stages.{stage}").Config  # params files hold every key
    section = as_params(config_cls(**{**config, "launcher": "accelerate/cpu-2proc.yaml"}))
    params = {"paths": {k: str(Path(v).resolve()) for k, v in dataclasses.asdict(paths).items()}, stage: section}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "ARPIPE_TRACKING": "off", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("ARPIPE_LAUNCHED", None)
    return subprocess.run(
        [sys.executable, "-m", f"stages.{stage}"], cwd=project, env=env, capture_output=True, text=True, timeout=300
    )


# Golden first-N training losses of the fine-tuning stages (tests/assets/finetune_golden.json), like
# pretrain's: a refactor that should not change numerics provably doesn't. Regenerate deliberately
# with ARPIPE_REGEN_GOLDEN=1 (and say why in the commit).
FINETUNE_GOLDEN = REPO / "tests" / "assets" / "finetune_golden.json"


def check_golden_losses(name: str, losses: list[float]) -> None:
    import json
    import os

    golden = json.loads(FINETUNE_GOLDEN.read_text()) if FINETUNE_GOLDEN.is_file() else {}
    if os.environ.get("ARPIPE_REGEN_GOLDEN"):
        golden[name] = [round(x, 6) for x in losses]
        FINETUNE_GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    assert name in golden, f"no golden losses for {name}: run with ARPIPE_REGEN_GOLDEN=1 once"
    np.testing.assert_allclose(losses, golden[name], rtol=2e-5, atol=2e-5)
