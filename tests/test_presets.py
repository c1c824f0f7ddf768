"""The ImageNet-256 presets load through the stages' own strict Config parsing, and `arpipe plan`
sizes them (and the default params) correctly: published parameter counts, FLOPs, memory."""

import importlib
import json

import pytest
import yaml
from helpers import REPO

from core.config import Paths, load_section, read_params
from core.durable import DurableConfig

PRESETS = sorted((REPO / "presets").glob("*.yaml"))
SPECIAL = {"paths": Paths, "durable": DurableConfig}


def test_there_are_both_presets():
    assert {p.stem for p in PRESETS} == {"imagenet256-var-d16", "imagenet256-gpt-b"}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_every_section_loads_strictly_and_matches_params_yaml(preset):
    params = read_params(preset)
    shipped = read_params(REPO / "params.yaml")
    assert list(params) == list(shipped), f"{preset.name} must have the same sections as params.yaml, in order"
    for section in params:
        cls = SPECIAL.get(section) or importlib.import_module(f"stages.{section}").Config
        load_section(params, section, cls)
    assert params["shard"]["image_size"] == 256  # the tokenizer, evalnet and AR model take their sizes from it
    assert params["pretrain"]["launcher"] and (REPO / params["pretrain"]["launcher"]).is_file()


@pytest.fixture(scope="module")
def plans():
    from arpipe.plan import plan_models

    return {p.stem: plan_models(read_params(p), gpus=8, num_classes=1000) for p in PRESETS}


def test_var_d16_and_gpt_b_have_their_published_sizes(plans):
    var_tokenizer, var, _ = plans["imagenet256-var-d16"]
    gpt_tokenizer, gpt, _ = plans["imagenet256-gpt-b"]
    assert var.params == pytest.approx(310e6, rel=0.02)  # VAR-d16: 310M
    assert gpt.params == pytest.approx(111e6, rel=0.02)  # LlamaGen GPT-B: 111M
    assert var_tokenizer.params == pytest.approx(109e6, rel=0.02)  # VAR's VQVAE
    assert gpt_tokenizer.params == pytest.approx(72e6, rel=0.02)  # LlamaGen's VQ-16
    assert "L=680" in var.name and "L=256" in gpt.name
    # FLOPs per step = (6 * non-embedding params + 12 * depth * width * L) * batch * L
    non_embedding = gpt.params - 16384 * 768 - 1001 * 768  # token and class (+ null) embeddings
    assert gpt.flops_per_step == (6 * non_embedding + 12 * 12 * 768 * 256) * 256 * 256
    # 16 bytes per parameter for weights, grads and AdamW; activations per GPU at the micro-batch
    assert gpt.state_bytes == 16 * gpt.params and (gpt.micro_batch, var.micro_batch) == (32, 96)
    assert 0 < gpt.activation_bytes < var.activation_bytes < 80 * 1024**3  # d16 at 96/GPU fits an 80 GB GPU


def test_activations_scale_with_the_per_gpu_batch():
    from arpipe.plan import plan_models

    params = read_params(REPO / "params.yaml")
    on_one, on_two = (plan_models(params, gpus=g, num_classes=10)[1] for g in (1, 2))
    assert on_one.micro_batch == 2 * on_two.micro_batch
    assert on_one.activation_bytes == pytest.approx(2 * on_two.activation_bytes, rel=0.05)
    assert on_one.flops_per_step == on_two.flops_per_step  # the global step is the same work


def test_arpipe_plan_on_the_default_params_matches_the_trained_model():
    from click.testing import CliRunner

    from arpipe.cli import cli

    result = CliRunner().invoke(cli, ["plan", "--params", str(REPO / "params.yaml")])
    assert result.exit_code == 0, result.output
    assert "10 classes" in result.output and "| pretrain (gpt, L=16) |" in result.output
    trained = json.loads((REPO / "metrics" / "pretrain.json").read_text())["params"]  # what the stage built
    row = next(line for line in result.output.splitlines() if line.startswith("| pretrain"))
    assert row.split("|")[2].strip() == f"{trained / 1e6:.1f}M"


def test_arpipe_plan_names_a_bad_preset_key(tmp_path):
    from click.testing import CliRunner

    from arpipe.cli import cli

    params = yaml.safe_load(PRESETS[0].read_text())
    params["pretrain"]["model"]["depht"] = 3
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(cli, ["plan", "--params", str(bad), "--num-classes", "1000"])
    assert result.exit_code == 1 and "model.depht is not a key of the" in result.output


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_plan_takes_the_class_count_from_the_preset_not_the_local_shards(preset, tmp_path):
    import os
    import subprocess
    import sys

    (tmp_path / "data" / "shards").mkdir(parents=True)  # digits shards in the cwd must not count
    (tmp_path / "data" / "shards" / "classes.json").write_text(json.dumps([str(i) for i in range(10)]))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "arpipe.cli", "plan", "--params", str(preset), "--gpus", "8"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"{preset}: 1000 classes (shard.num_classes), 8 GPU(s)"
