"""Released checkpoints in the pipeline: ``train_tokenizer`` / ``pretrain`` with ``init_from:
released`` import (``steps: 0``) or fine-tune (``steps > 0``) the tiny LlamaGen-layout files, and
the stages after them (cache_tokens, cca, ``arpipe sample``) run on the result unchanged."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from helpers import REPO, git, make_project, png_bytes, write_released_files

from arpipe.cli import cli
from arpipe.released import import_released
from core.checkpoint import read_checkpoint
from core.config import ConfigError, Paths, from_dict
from core.released import ReleasedFile, ReleasedModel
from core.tracking import NullTracker
from stages import (
    cache_tokens,
    cca,
    ddo,
    distill,
    distill_pairs,
    evaluate,
    pretrain,
    sar,
    shard,
    train_evalnet,
    train_tokenizer,
)

VQ = ReleasedFile(format="llamagen-vq", file="vq_ds2_tiny.pt")
GPT = ReleasedModel(format="llamagen-gpt", file="c2i_tiny.pt", heads=4)


def imported_tokenizer(**overrides) -> train_tokenizer.Config:
    values = dict(kind="vq", model={}, init_from="released", released=VQ, steps=0, num_grid=2)
    return train_tokenizer.Config(**{**values, **overrides})


def imported_gpt(**overrides) -> pretrain.Config:
    values = dict(arch="gpt", model={}, init_from="released", released=GPT, steps=0, samples_per_class=1,
                  sample_cfg_scales=[1.0])  # fmt: skip
    return pretrain.Config(**{**values, **overrides})


@pytest.fixture(scope="module")
def run_metrics() -> dict:
    return {}


@pytest.fixture(scope="module")
def project(tmp_path_factory, run_metrics) -> Paths:
    """8 px digit shards (the import sizes the tiny 2x VQ for them: 4x4 = 16 tokens, which the GPT's
    rotary positions follow), the released files under paths.released, and the
    imported tokenizer, token cache and base model, each written by its stage's run()."""
    root = tmp_path_factory.mktemp("released-pipeline")
    paths = Paths(shards=str(root / "shards"), metrics=str(root / "metrics"), plots=str(root / "plots"),
                  tokenizer=str(root / "tokenizer"), tokens=str(root / "tokens"), models=str(root / "models"),
                  released=str(root / "released"), resume=str(root / "resume"), evalnet=str(root / "evalnet"),
                  distill=str(root / "distill"), eval=str(root / "eval"), last_run=str(root / "last_run"))  # fmt: skip
    write_released_files(Path(paths.released))
    shard.run(shard.Config(image_size=8, num_workers=0), paths, NullTracker())
    run_metrics["train_tokenizer"] = train_tokenizer.run(imported_tokenizer(), paths, NullTracker())
    cache_tokens.run(cache_tokens.Config(batch_size=256, hflip=False), paths, NullTracker())
    run_metrics["pretrain"] = pretrain.run(imported_gpt(), paths, NullTracker())
    return paths


def test_import_only_writes_the_released_weights_with_the_metrics_of_a_trained_stage(project, run_metrics, tmp_path):
    tok_state, tok_config = read_checkpoint(project.tokenizer)
    state, config = read_checkpoint(Path(project.models) / "base")
    # the same weights `arpipe import` writes, with the shards' class names and image size
    released = Path(project.released)
    by_hand = import_released("llamagen-vq", released / VQ.file, tmp_path / "tok", image_size=8)
    by_hand_state, _ = read_checkpoint(tmp_path / "tok")
    assert tok_state.keys() == by_hand_state.keys()
    assert all(torch.equal(tok_state[k], by_hand_state[k]) for k in tok_state)
    assert tok_config["model"] == by_hand["model"] and tok_config["class_names"] == [str(i) for i in range(10)]
    assert tok_config["init"]["from"] == "released" and tok_config["init"]["file"] == VQ.file
    assert tok_config["stage_config"]["released"]["format"] == "llamagen-vq"
    import_released("llamagen-gpt", released / GPT.file, tmp_path / "base", tokenizer_dir=project.tokenizer, heads=4)
    by_hand_state, _ = read_checkpoint(tmp_path / "base")
    assert all(torch.equal(state[k], by_hand_state[k]) for k in by_hand_state) and state.keys() == by_hand_state.keys()
    assert config["weights"] == "released" and config["model"]["prefix_rotation"] == "zero"
    assert config["tokenizer_fingerprint"] == tok_config["fingerprint"]
    assert config["init"]["from"] == "released" and len(config["init"]["sha256"]) == 64
    # the usual outs: val metrics (no training curve), the sample grid
    metrics = run_metrics["pretrain"]
    assert metrics["steps"] == 0 and metrics["val_loss"] > 0 and "train_loss" not in metrics
    assert (Path(project.models) / "base" / "samples.png").is_file()
    tok_metrics = run_metrics["train_tokenizer"]
    assert tok_metrics["steps"] == 0 and tok_metrics["val_psnr"] > 0
    assert tok_metrics["val_usage"]["overall"] > 0 and "train_usage" not in tok_metrics  # no train images read


def test_cca_and_arpipe_sample_run_on_a_model_imported_by_hand(project, tmp_path):
    paths = dataclasses.replace(project, models=str(tmp_path / "models"), metrics=str(tmp_path / "m"),
                                plots=str(tmp_path / "p"), resume=str(tmp_path / "resume"))  # fmt: skip
    # the base `arpipe import` writes (stage "import": no stage_config, a `source` entry) reads like the stage's
    released = Path(project.released) / GPT.file
    config = import_released("llamagen-gpt", released, tmp_path / "models" / "base", tokenizer_dir=project.tokenizer,
                             heads=4)  # fmt: skip
    assert config["stage"] == "import" and "stage_config" not in config
    cfg = cca.Config(input="base", steps=2, batch_size=8, lr=1e-4, log_every=1, save_every=0, samples_per_class=1,
                     sample_cfg_scales=[1.0])  # fmt: skip
    metrics = cca.run(cfg, paths, NullTracker())
    assert metrics["steps"] == 2
    state, config = read_checkpoint(tmp_path / "models" / "cca")
    assert config["model"]["prefix_rotation"] == "zero" and config["input_checkpoint"]["name"] == "base"
    out = tmp_path / "grid.png"
    checkpoint = str(tmp_path / "models" / "cca")
    args = ["--checkpoint", checkpoint, "--tokenizer", project.tokenizer, "--classes", "1,7", "--n", "1"]
    result = CliRunner().invoke(cli, ["sample", *args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 0 and "2 samples" in result.output
    # a recipe without CCA (the VAR-d16 preset): skip passes the input through, evaluate skips the copy
    skipped = dataclasses.replace(paths, models=str(tmp_path / "skipped"))
    (tmp_path / "skipped").mkdir()
    (tmp_path / "skipped" / "base").symlink_to(Path(project.models) / "base")
    assert cca.run(cca.Config(input="base", skip=True), skipped, NullTracker())["skipped"].startswith("skip: true")
    skipped_config = read_checkpoint(tmp_path / "skipped" / "cca")[1]
    assert skipped_config["passthrough_of"] == "base" and skipped_config["stage_config"]["skip"] is True
    # a recipe without DDO (the GPT-B CCA preset): rounds 0 passes cca through, and evaluate skips the copy
    metrics = ddo.run(ddo.Config(input="cca", rounds=0, samples_per_class=1), paths, NullTracker())
    assert metrics["skipped"].startswith("rounds: 0")
    ddo_state, ddo_config = read_checkpoint(tmp_path / "models" / "ddo")
    assert ddo_config["passthrough_of"] == "cca" and all(torch.equal(ddo_state[k], state[k]) for k in state)


def test_the_rest_of_the_chain_runs_on_the_imported_gpt(project, tmp_path):
    """sar (a gpt passes through), ddo, distill_pairs, distill, train_evalnet and evaluate, tiny."""
    outs = {
        name: str(tmp_path / name) for name in ("models", "distill", "evalnet", "eval", "metrics", "plots", "last_run")
    }
    paths = dataclasses.replace(project, resume=str(tmp_path / "resume"), **outs)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "base").symlink_to(Path(project.models) / "base")
    assert "skipped" in sar.run(sar.Config(samples_per_class=1, sample_cfg_scales=[1.0]), paths, NullTracker())
    ddo_cfg = ddo.Config(input="sar", rounds=1, steps_per_round=2, batch_size=8, sample_batch_size=16, log_every=1,
                         save_every=0, samples_per_class=1, sample_cfg_scales=[1.0])  # fmt: skip
    assert ddo.run(ddo_cfg, paths, NullTracker())["steps"] == 2
    pairs = distill_pairs.Config(teacher="ddo", count=32, batch_size=16, ode_steps=4, t_min=0.05)
    distill_pairs.run(pairs, paths, NullTracker())
    student = distill.Config(steps=2, batch_size=8, warmup_steps=1, log_every=1, val_count=8, save_every=0,
                             samples_per_class=1)  # fmt: skip
    distill.run(student, paths, NullTracker())
    train_evalnet.run(train_evalnet.Config(steps=4, batch_size=32, log_every=2, eval_every=4, save_every=0), paths,
                      NullTracker())  # fmt: skip
    scores = evaluate.run(evaluate.Config(samples_per_class=2, cfg_scales=[1.0], batch_size=20, grid_per_class=1,
                                          register=False), paths, NullTracker())  # fmt: skip
    assert {"base", "ddo", "distilled"} <= set(scores) and "sar" not in scores  # sar: a pass-through


def test_fine_tuning_a_released_tokenizer(project, tmp_path):
    paths = dataclasses.replace(project, tokenizer=str(tmp_path / "tok"), metrics=str(tmp_path / "m"),
                                plots=str(tmp_path / "p"), resume=str(tmp_path / "resume"))  # fmt: skip
    # restating the released architecture is allowed; restart_every is a fine-tuning knob
    imported_model = read_checkpoint(project.tokenizer)[1]["model"]
    model = {"codebook_size": imported_model["codebook_size"], "restart_every": 1}
    metrics = train_tokenizer.run(imported_tokenizer(steps=2, batch_size=8, model=model, log_every=1, eval_every=2),
                                  paths, NullTracker())  # fmt: skip
    assert metrics["steps"] == 2
    state, config = read_checkpoint(tmp_path / "tok")
    imported_state = read_checkpoint(project.tokenizer)[0]
    assert config["model"] == {**imported_model, "restart_every": 1} and config["init"]["from"] == "released"
    assert not torch.equal(state["encoder.conv_in.weight"], imported_state["encoder.conv_in.weight"])
    assert (tmp_path / "p" / "train_tokenizer" / "loss.csv").read_text().count("\n") == 3  # header + 2 steps


def test_fine_tuning_a_released_gpt(project, tmp_path):
    paths = dataclasses.replace(project, models=str(tmp_path / "models"), metrics=str(tmp_path / "m"),
                                plots=str(tmp_path / "p"), resume=str(tmp_path / "resume"))  # fmt: skip
    cfg = imported_gpt(steps=2, batch_size=8, log_every=1, eval_every=2, model={"resid_dropout": 0.0, "depth": 2})
    metrics = pretrain.run(cfg, paths, NullTracker())
    assert metrics["steps"] == 2 and "train_loss" in metrics
    config = read_checkpoint(tmp_path / "models" / "base")[1]
    assert config["weights"] == "final" and config["model"]["resid_dropout"] == 0.0


def test_bad_input_is_refused_before_any_work(project, tmp_path):
    tok_paths = dataclasses.replace(project, tokenizer=str(tmp_path / "tok"))
    ar_paths = dataclasses.replace(project, models=str(tmp_path / "models"))
    missing = dataclasses.replace(VQ, file="vq_missing.pt")
    with pytest.raises(FileNotFoundError, match=r"train_tokenizer\.released\.file: no released file at .*vq_missing"):
        train_tokenizer.run(imported_tokenizer(released=missing), tok_paths, NullTracker())
    with pytest.raises(FileNotFoundError, match=r"pretrain\.released\.file: no released file at .*c2i_missing"):
        pretrain.run(imported_gpt(released=dataclasses.replace(GPT, file="c2i_missing.pt")), ar_paths, NullTracker())
    assert not (tmp_path / "tok").exists() and not (tmp_path / "models").exists()
    # a key of the released architecture that params.yaml states wrongly; a GPT where a tokenizer goes
    with pytest.raises(ValueError, match=r"pretrain\.model\.depth is 3, but c2i_tiny\.pt has 2"):
        pretrain.run(imported_gpt(model={"depth": 3}), ar_paths, NullTracker())
    with pytest.raises(ValueError, match="llamagen-gpt"):
        train_tokenizer.run(imported_tokenizer(released=GPT), tok_paths, NullTracker())
    assert not (tmp_path / "tok").exists() and not (tmp_path / "models").exists()
    # strict params: an unknown format or key, steps 0 without a released start
    with pytest.raises(ConfigError, match="released.format 'llamagen' is not a released format"):
        from_dict(train_tokenizer.Config, {"init_from": "released", "released": {"format": "llamagen"}},
                  prefix="train_tokenizer")  # fmt: skip
    with pytest.raises(ConfigError, match=r"pretrain\.released\.path: unknown key"):
        from_dict(pretrain.Config, {"released": {"path": "x"}}, prefix="pretrain")
    with pytest.raises(ConfigError, match="steps must be >= 1"):
        from_dict(pretrain.Config, {"steps": 0}, prefix="pretrain")


def stale_stages(root) -> set[str]:
    out = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=root, capture_output=True, text=True)
    return set(yaml.safe_load(out.stdout or "{}"))


@pytest.mark.slow
def test_replacing_the_released_file_makes_dvc_rerun_the_stage(tmp_path):
    """Through dvc.yaml: the tokenizer's released file is its dependency; the GPT's file is not."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["shard"].update(source="imagefolder", source_path="sources/tiny", image_size=8, num_workers=0)
    params["train_tokenizer"].update(init_from="released", model={}, steps=0, num_grid=2,
                                     released={"format": "llamagen-vq", "file": VQ.file, "model": ""})  # fmt: skip
    params["pretrain"].update(init_from="released", released={"format": "llamagen-gpt", "file": GPT.file, "heads": 4})
    project = make_project(tmp_path / "project", params=params)
    for c in range(2):
        for i in range(4):
            image = np.random.default_rng(10 * c + i).integers(0, 256, (8, 8, 3), dtype=np.uint8)
            (project / "sources" / "tiny" / f"class{c}").mkdir(parents=True, exist_ok=True)
            (project / "sources" / "tiny" / f"class{c}" / f"{i}.png").write_bytes(png_bytes(image))
    files = write_released_files(project / "released")
    env = {**os.environ, "ARPIPE_TRACKING": "off", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1",
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}  # fmt: skip
    env.pop("PYTHONPATH", None)  # the project's own copy of the code runs
    repro = subprocess.run([sys.executable, "-m", "dvc", "repro", "train_tokenizer"], cwd=project, env=env,
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert repro.returncode == 0, repro.stdout + repro.stderr
    assert not stale_stages(project) & {"shard", "train_tokenizer"}
    files["gpt"].write_bytes(files["gpt"].read_bytes() + b"\0")  # pretrain's file: not the tokenizer's concern
    assert not stale_stages(project) & {"shard", "train_tokenizer"}
    vq = torch.load(files["vq"], weights_only=True)
    vq["model"]["decoder.conv_out.bias"] += 1.0
    torch.save(vq, files["vq"])
    assert stale_stages(project) & {"shard", "train_tokenizer"} == {"train_tokenizer"}
    git(project, "status")  # the released files are plain files in a git + DVC project


def test_the_var_recipe_runs_on_imported_var_files(project, tmp_path):
    """The var-d16-sar-ddo chain at toy size: VAR's VQVAE and a VAR imported by the stages, then SAR,
    cca skipped (a pass-through), DDO from sar, and `arpipe sample` with VAR's ramp."""
    from models.released.var_layout import random_released, var_layout, vqvae_layout

    scales = (1, 2, 3, 4)  # 8 px images, a 2x VQVAE: the last scale is the 4x4 latent
    released = tmp_path / "released"
    released.mkdir()
    vqvae = random_released(vqvae_layout(ch=32, ch_mult=(1, 2), res_blocks=1, z=8, vocab=64, scales=4), scales)
    var = random_released(var_layout(depth=2, width=32, vocab=64, z=8, classes=10, scales=scales), scales, seed=1)
    torch.save(vqvae, released / "vae_tiny.pth")
    torch.save({"model": var}, released / "var_d2.pth")
    outs = {name: str(tmp_path / name) for name in ("tokenizer", "tokens", "models", "metrics", "plots", "resume")}
    paths = dataclasses.replace(project, released=str(released), **outs)
    vq = ReleasedFile(format="var-vqvae", file="vae_tiny.pth", model="1_2_3_4")
    train_tokenizer.run(imported_tokenizer(kind="msvq", released=vq), paths, NullTracker())
    cache_tokens.run(cache_tokens.Config(batch_size=256, hflip=False), paths, NullTracker())
    model = ReleasedModel(format="var", file="var_d2.pth", model="d2")
    pretrain.run(imported_gpt(arch="var", released=model, model={"depth": 2}), paths, NullTracker())
    assert read_checkpoint(Path(paths.models) / "base")[1]["model"]["attn_l2_norm"] is True
    refine = sar.Config(steps=2, batch_size=8, log_every=1, save_every=0, rollout="sample", rollout_guidance=1.2,
                        rollout_top_k=900, samples_per_class=1, sample_cfg_scales=[1.0])  # fmt: skip
    assert sar.run(refine, paths, NullTracker())["steps"] == 2
    assert cca.run(cca.Config(input="sar", skip=True), paths, NullTracker())["skipped"]
    ddo_cfg = ddo.Config(input="sar", rounds=1, steps_per_round=2, batch_size=8, sample_batch_size=16, log_every=1,
                         save_every=0, samples_per_class=1, sample_cfg_scales=[1.0])  # fmt: skip
    assert ddo.run(ddo_cfg, paths, NullTracker())["steps"] == 2
    out = tmp_path / "grid.png"
    args = ["--checkpoint", str(Path(paths.models) / "ddo"), "--tokenizer", paths.tokenizer, "--n", "1",
            "--cfg-scale", "2.5"]  # fmt: skip
    result = CliRunner().invoke(cli, ["sample", *args, "--classes", "1,7", "--out", str(out)])
    assert result.exit_code == 0, result.output
