"""The presets (ImageNet-256, photos) load through the stages' own strict Config parsing, and `arpipe plan`
sizes them (and the default params) correctly: published parameter counts, FLOPs, memory."""

import importlib
import json
from pathlib import Path

import pytest
import yaml
from helpers import REPO

from core.config import Paths, load_section, read_params
from core.durable import DurableConfig

PRESETS = sorted((REPO / "presets").glob("*.yaml"))
SPECIAL = {"paths": Paths, "durable": DurableConfig}


IMAGENET = [p for p in PRESETS if not p.stem.startswith("photos-")]


def test_there_are_the_imagenet_and_the_photo_presets():
    assert {p.stem for p in PRESETS} == {
        "imagenet256-var-d16",
        "imagenet256-gpt-b",
        "llamagen-gpt-b-cca",
        "var-d16-sar-ddo",
        "photos-gpt",
        "photos-var",
    }


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_every_section_loads_strictly_and_matches_params_yaml(preset):
    params = read_params(preset)
    shipped = read_params(REPO / "params.yaml")
    assert list(params) == list(shipped), f"{preset.name} must have the same sections as params.yaml, in order"
    for section in params:
        cls = SPECIAL.get(section) or importlib.import_module(f"stages.{section}").Config
        load_section(params, section, cls)
    if preset not in IMAGENET:
        return
    assert params["shard"]["image_size"] == 256  # the tokenizer, evalnet and AR model take their sizes from it
    assert params["pretrain"]["launcher"] and (REPO / params["pretrain"]["launcher"]).is_file()


@pytest.fixture(scope="module")
def plans():
    from arpipe.plan import plan_models

    return {p.stem: plan_models(read_params(p), gpus=8, num_classes=1000) for p in IMAGENET}


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


def test_the_released_presets_size_the_released_architectures(plans):
    """The papers' recipes on the released models: the plan sizes what the import will build."""
    for stem, tokenizer_params, model_params, length in (
        ("llamagen-gpt-b-cca", 72e6, 111e6, 256),  # LlamaGen VQ-16 + GPT-B
        ("var-d16-sar-ddo", 109e6, 310e6, 680),  # VAR's VQVAE + VAR-d16
    ):
        tokenizer, model, _ = plans[stem]
        assert tokenizer.params == pytest.approx(tokenizer_params, rel=0.02)
        assert model.params == pytest.approx(model_params, rel=0.02)
        assert f"L={length}; released" in model.name and "import only" in model.name
    gpt = read_params(REPO / "presets" / "llamagen-gpt-b-cca.yaml")
    var = read_params(REPO / "presets" / "var-d16-sar-ddo.yaml")
    # the recipe's chain: what the preset does not run passes its input through
    assert gpt["ddo"]["rounds"] == 0 and gpt["distill_pairs"]["teacher"] == "cca"
    assert var["cca"]["skip"] and var["ddo"]["input"] == "sar" and var["distill_pairs"]["teacher"] == "ddo"
    # the papers' hyperparameters (shared/reference/posttrain.md)
    assert (gpt["cca"]["beta"], gpt["cca"]["lam"], gpt["cca"]["lr"]) == (0.02, 1000.0, 1e-5)
    assert (var["sar"]["sigma"], var["ddo"]["beta"], var["ddo"]["rounds"]) == (0.01, 0.02, 2)
    assert (gpt["distill"]["split"], var["distill"]["split"]) == (80, 5)


def test_arpipe_plan_prints_a_released_preset_for_1000_classes():
    from click.testing import CliRunner

    from arpipe.cli import cli

    preset = REPO / "presets" / "llamagen-gpt-b-cca.yaml"
    result = CliRunner().invoke(cli, ["plan", "--params", str(preset), "--gpus", "8"])
    assert result.exit_code == 0, result.output
    assert "1000 classes (shard.num_classes), 8 GPU(s)" in result.output
    assert "| pretrain (gpt, L=256; released GPT-B, import only) | 110.9M |" in result.output


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


def test_the_released_presets_restate_exactly_the_released_architectures():
    """What `arpipe plan` sizes is what the import builds: each preset's ``model`` passes the
    import's check against the official-size released layouts (shapes only, on the meta device)."""
    import torch

    from core.released import merge_model
    from models.released import converter
    from models.released.var_layout import random_released, var_layout, vqvae_layout
    from stages import pretrain, train_tokenizer

    def meta(shapes: dict) -> dict:
        return {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}

    llamagen = json.loads((REPO / "tests" / "assets" / "released" / "llamagen_shapes.json").read_text())
    scales = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    with torch.device("meta"):
        var_files = (random_released(vqvae_layout(), scales, device="meta"),
                     random_released(var_layout(depth=16), scales, device="meta"))  # fmt: skip
    for stem, (tokenizer_file, model_file) in {
        "llamagen-gpt-b-cca": (meta(llamagen["VQ-16"]), meta(llamagen["GPT-B"])),
        "var-d16-sar-ddo": var_files,
    }.items():
        params = read_params(REPO / "presets" / f"{stem}.yaml")
        tok, ar = params["train_tokenizer"], params["pretrain"]
        tok_body = converter(tok["released"]["format"])(
            tokenizer_file, model=tok["released"]["model"] or None, image_size=params["shard"]["image_size"]
        ).config
        merge_model(tok["model"], tok_body["model"], train_tokenizer.FINETUNE_KEYS, "train_tokenizer.model",
                    Path(tok["released"]["file"]))  # fmt: skip
        ar_body = converter(ar["released"]["format"])(
            model_file, model=ar["released"]["model"], tokenizer=tok_body
        ).config
        merge_model(
            ar["model"], ar_body["model"], pretrain.FINETUNE_KEYS, "pretrain.model", Path(ar["released"]["file"])
        )
        assert ar_body["arch"] == ar["arch"] and tok_body["kind"] == tok["kind"]


@pytest.mark.parametrize("preset", IMAGENET, ids=lambda p: p.stem)
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


def _flat(node, prefix=""):
    if not isinstance(node, dict):
        return {prefix: node}
    out = {}
    for key, value in node.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else key))
    return out


PHOTO_RECIPE = {
    "shard.source",
    "shard.source_path",
    "shard.image_size",
    "train_tokenizer.model.codebook_size",
    "train_tokenizer.steps",
    "train_tokenizer.recon_loss",
    "cache_tokens.hflip",
}
VAR_RECIPE = {
    "train_tokenizer.kind",
    "train_tokenizer.model.z_channels",
    "train_tokenizer.model.scales",
    "train_tokenizer.model.restart_max_total_share",
    "pretrain.arch",
    "pretrain.model.token_dropout",
    "pretrain.model.drop_path",
    "cca.lam",
    "ddo.alpha",
    "ddo.beta",
}


def test_the_photo_presets_are_params_yaml_plus_the_measured_photo_recipe():
    """A default changed in params.yaml reaches the photo presets: they differ from it only in the
    recipe's keys (docs/experiments.md, "Photo recipe"), so they cannot drift from it unseen."""
    shipped = _flat(read_params(REPO / "params.yaml"))
    for stem, recipe in (("photos-gpt", PHOTO_RECIPE), ("photos-var", PHOTO_RECIPE | VAR_RECIPE)):
        preset = _flat(read_params(REPO / "presets" / f"{stem}.yaml"))
        changed = {key for key in shipped.keys() | preset.keys() if shipped.get(key) != preset.get(key)}
        assert changed == recipe, f"{stem}: {sorted(changed ^ recipe)}"


def test_the_photo_presets_model_64_and_130_tokens_of_32_px_photos():
    from arpipe.plan import plan_models

    gpt = read_params(REPO / "presets" / "photos-gpt.yaml")
    var = read_params(REPO / "presets" / "photos-var.yaml")
    assert gpt["shard"]["source"] == var["shard"]["source"] == "imagefolder"
    assert gpt["shard"]["image_size"] == var["shard"]["image_size"] == 32
    assert not gpt["pretrain"]["launcher"] and not var["pretrain"]["launcher"]  # CPU-sized: one process
    assert "L=64" in plan_models(gpt, gpus=1, num_classes=8)[1].name
    assert "L=130" in plan_models(var, gpus=1, num_classes=8)[1].name
