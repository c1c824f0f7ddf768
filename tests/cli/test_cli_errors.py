"""`arpipe` errors a person can act on, run as a user runs them (a subprocess, real output)."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def arpipe(*args: str, cwd: Path, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "ARPIPE_DEBUG"}
    child_env = {**base, "PYTHONPATH": str(REPO), "ARPIPE_TRACKING": "off", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "arpipe.cli", *args], cwd=cwd, env=child_env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def project(tmp_path: Path, params_text: str | None = None) -> Path:
    """A folder arpipe accepts as a project (dvc.yaml + params.yaml), outside the checkout."""
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    (root / "params.yaml").write_text(params_text or (REPO / "params.yaml").read_text())
    return root


def test_run_with_a_mistyped_param_fails_in_one_line_before_starting(tmp_path):
    text = (REPO / "params.yaml").read_text().replace("\n  steps: 600 ", "\n  stepz: 600 ", 1)
    root = project(tmp_path, text)
    result = arpipe("run", cwd=root)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("arpipe: error: params.yaml: pretrain.stepz: unknown key")
    assert "Prefect" not in result.stdout + result.stderr  # failed before the flow started
    debug = arpipe("--debug", "run", cwd=root)
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_ui_on_a_busy_port_fails_without_printing_a_url(tmp_path):
    root = project(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = arpipe("ui", "--port", str(port), cwd=root, env={"ARPIPE_TRACKING": "on"})
    assert result.returncode != 0
    assert "http://" not in result.stdout
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and f"--port {port + 1}" in result.stderr


def _checkpoint(path: Path, config: dict) -> str:
    from core.checkpoint import write_checkpoint

    return write_checkpoint(path, {"w": torch.zeros(2)}, config)


def _tokenizer(path: Path) -> str:
    layout = {"kind": "vq", "grid": [2, 2]}
    return _checkpoint(path, {"kind": "vq", "token_layout": layout, "codebook_size": 8, "class_names": ["a", "b"]})


def test_sample_names_a_malformed_config_file(tmp_path):
    model = tmp_path / "base"
    _checkpoint(model, {"arch": "gpt"})
    (model / "config.json").write_text('{"arch": "gp\tt"}')
    result = arpipe("sample", "--checkpoint", str(model), "--tokenizer", str(model), cwd=tmp_path)
    assert result.returncode != 0
    assert f"{model / 'config.json'}: not valid JSON" in result.stderr, result.stderr


def test_sample_says_when_the_checkpoint_is_a_tokenizer(tmp_path):
    tokenizer = tmp_path / "tokenizer"
    _tokenizer(tokenizer)
    result = arpipe("sample", "--checkpoint", str(tokenizer), "--tokenizer", str(tokenizer), cwd=tmp_path)
    assert result.returncode == 2
    assert f"{tokenizer} is a tokenizer (written by train_tokenizer), not an AR model" in result.stderr
    assert "None" not in result.stderr


def test_sample_refuses_guidance_on_the_distilled_student_and_steps_on_an_ar_model(tmp_path):
    fingerprint = _tokenizer(tmp_path / "tokenizer")
    student = tmp_path / "distilled"
    teacher = {"name": "ddo", "cfg": 3.0}  # the key before it was renamed cfg_scale: old checkpoints still read
    _checkpoint(student, {"distilled": True, "tokenizer_fingerprint": fingerprint, "class_names": ["a", "b"],
                          "teacher": teacher})  # fmt: skip
    args = ["sample", "--checkpoint", str(student), "--tokenizer", str(tmp_path / "tokenizer")]
    result = arpipe(*args, "--cfg-scale", "3", cwd=tmp_path)
    assert result.returncode == 2
    assert "is a distilled student: its teacher's guidance (cfg_scale 3.0)" in result.stderr
    assert "drop --cfg-scale" in result.stderr
    compiled = arpipe(*args, "--compile", cwd=tmp_path)
    assert compiled.returncode == 2 and "drop --compile" in compiled.stderr
    model = tmp_path / "base"
    _checkpoint(model, {"arch": "gpt", "tokenizer_fingerprint": fingerprint, "class_names": ["a", "b"]})
    steps = arpipe("sample", "--checkpoint", str(model), "--tokenizer", str(tmp_path / "tokenizer"), "--steps", "2",
                   cwd=tmp_path)  # fmt: skip
    assert steps.returncode == 2 and "is not a distilled student: --steps applies only" in steps.stderr
