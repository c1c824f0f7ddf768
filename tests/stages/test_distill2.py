"""distill2 (DD2): both families end to end, the checkpoint evaluate/sample load, resume, bad input."""

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from core.checkpoint import read_checkpoint
from core.tracking import NullTracker
from core.training import NonFiniteLossError
from stages import distill2, distill_pairs, pretrain

TINY_MODEL = {"depth": 2, "width": 32, "heads": 2}
KIND_OF = {"gpt": "vq", "var": "msvq"}


@pytest.fixture(scope="module")
def teachers(tiny_caches, tmp_path_factory):
    """Per family: the shared tiny tokenizer, a tiny ``base`` teacher and its pairs at guidance 2 (read-only)."""
    root = tmp_path_factory.mktemp("distill2-teachers")
    out = {}
    for arch, kind in KIND_OF.items():
        paths = dataclasses.replace(
            tiny_caches[kind], models=str(root / kind / "models"), plots=str(root / kind / "p"),
            metrics=str(root / kind / "m"), distill=str(root / kind / "distill"),
        )  # fmt: skip
        base = pretrain.Config(
            arch=arch, model=TINY_MODEL, steps=12, batch_size=16, lr=3e-3, warmup_steps=2, log_every=4,
            eval_every=12, save_every=0, samples_per_class=1, sample_cfg_scales=[1.0],
        )  # fmt: skip
        pretrain.run(base, paths, NullTracker())
        pairs = distill_pairs.Config(teacher="base", count=48, batch_size=48, cfg_scale=2.0, ode_steps=8, t_min=0.02)
        distill_pairs.run(pairs, paths, NullTracker())
        out[arch] = paths
    return out


def tiny(**overrides) -> distill2.Config:
    values = dict(gts_steps=3, steps=3, batch_size=8, log_every=2, save_every=2, head_width=16, head_depth=1,
                  eval_count=16, samples_per_class=1, warmup_steps=1, denoiser_chunk=7)  # fmt: skip
    return distill2.Config(**{**values, **overrides})


def paths_for(teachers, tmp_path, arch, name="run"):
    inputs = teachers[arch]
    out = tmp_path / name
    (out / "models").mkdir(parents=True)
    (out / "models" / "base").symlink_to(Path(inputs.models) / "base")
    return dataclasses.replace(inputs, metrics=str(out / "metrics"), plots=str(out / "plots"),
                               models=str(out / "models"), resume=str(tmp_path / "resume"))  # fmt: skip


@pytest.mark.parametrize("arch", ["gpt", "var"])
def test_writes_a_one_step_generator_that_evaluate_and_sample_load(teachers, tmp_path, arch):
    from models.ar import tokenizer_from_state
    from models.dd_student import sample_distilled_images, student_from_state, token_latency_ms

    paths = paths_for(teachers, tmp_path, arch)
    metrics = distill2.run(tiny(), paths, NullTracker())
    state, config = read_checkpoint(Path(paths.models) / "distilled2")
    _, base_config = read_checkpoint(Path(paths.models) / "base")
    assert config["distilled"] is True and config["stage"] == "distill2" and config["arch"] == arch
    assert config["dd"]["split"] == 0 and config["dd"]["two_step_at"] == 0 and config["dd2"]["t_gen"] == 0.5
    assert config["teacher"]["name"] == "base" and config["teacher"]["fingerprint"] == base_config["fingerprint"]
    assert config["teacher"]["cfg_scale"] == 2.0 and config["model"] == base_config["model"]
    assert {"gen_nll_per_token", "teacher_entropy_per_token", "codes_used", "train_gts_loss", "train_csd_loss"} <= set(
        metrics
    )
    assert [r["step"] for r in csv.DictReader(open(Path(paths.plots) / "distill2" / "gts.csv"))] == ["2", "3"]
    assert [r["step"] for r in csv.DictReader(open(Path(paths.plots) / "distill2" / "csd.csv"))] == ["4", "6"]
    assert not any(Path(paths.resume).rglob("checkpoint_*"))

    tokenizer = tokenizer_from_state(*read_checkpoint(paths.tokenizer))
    generator = student_from_state(state, config, tokenizer)
    noise = torch.randn(3, generator.seq_len, generator.dd.code_dim, generator=torch.Generator().manual_seed(0))
    tokens, vectors = generator.sample(noise, torch.tensor([0, 4, 9]))
    assert tokens.shape == (3, generator.seq_len) and vectors.shape == noise.shape
    with pytest.raises(ValueError, match="1 step"):
        generator.sample(noise, torch.tensor([0, 4, 9]), steps=2)
    images = sample_distilled_images(generator, tokenizer, torch.tensor([0, 1]), steps=1, seed=1)
    assert images.shape == (2, 8, 8, 3) and images.dtype == torch.uint8
    assert token_latency_ms(generator, torch.tensor([0, 1]), steps=1) > 0

    from click.testing import CliRunner

    from arpipe.cli import cli

    out = tmp_path / "grid.png"
    args = ["sample", "--checkpoint", str(Path(paths.models) / "distilled2"), "--tokenizer", paths.tokenizer]
    result = CliRunner().invoke(cli, [*args, "--classes", "0,3", "--n", "2", "--steps", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file()


@pytest.mark.parametrize("arch", ["gpt", "var"])
def test_killed_run_resumes_to_byte_identical_weights(teachers, tmp_path, arch):
    cfg = tiny()
    reference = paths_for(teachers, tmp_path, arch, "reference")
    distill2.run(cfg, reference, NullTracker())
    shutil.rmtree(tmp_path / "resume", ignore_errors=True)
    crashed = paths_for(teachers, tmp_path, arch, "crashed")

    def crash(step):
        if step == 5:  # inside CSD, with a state saved at step 4
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        distill2.run(cfg, crashed, NullTracker(), on_step=crash)
    assert any(Path(crashed.resume).rglob("checkpoint_000000004"))
    distill2.run(cfg, crashed, NullTracker())
    for name in ("model.safetensors", "config.json"):
        assert (Path(crashed.models) / "distilled2" / name).read_bytes() == (
            Path(reference.models) / "distilled2" / name
        ).read_bytes()
    for name in ("gts.csv", "csd.csv"):
        assert (Path(crashed.plots) / "distill2" / name).read_text() == (
            Path(reference.plots) / "distill2" / name
        ).read_text()


def test_a_nan_loss_stops_with_the_stage_and_key_and_keeps_the_last_state(teachers, tmp_path, monkeypatch):
    paths = paths_for(teachers, tmp_path, "gpt")
    real = distill2.fcs_loss
    monkeypatch.setattr(distill2, "fcs_loss", lambda *a: real(*a) * float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"distill2\.fcs_loss") as error:
        distill2.run(tiny(), paths, NullTracker())
    assert "checkpoint_000000002" in str(error.value), "names the last good state"
    assert any(Path(paths.resume).rglob("checkpoint_000000002"))


def test_bad_input_names_the_stage_and_key(teachers, tmp_path, monkeypatch):
    paths = paths_for(teachers, tmp_path, "gpt")
    other = teachers["var"]  # a tokenizer the gpt teacher was not trained on
    with pytest.raises(ValueError, match=r"distill2: paths.tokenizer is not the tokenizer"):
        distill2.run(tiny(), dataclasses.replace(paths, tokenizer=other.tokenizer), NullTracker())

    def no_codebook(tokenizer):
        raise ValueError(f"unknown tokenizer kind {'pixels'!r}")

    monkeypatch.setattr(distill2, "code_space", no_codebook)
    with pytest.raises(ValueError, match=r"distill2: paths.tokenizer has no codebook"):
        distill2.run(tiny(), paths, NullTracker())
    with pytest.raises(ValueError, match=r"distill2.t_min"):
        distill2.Config(t_min=0.0)
    with pytest.raises(ValueError, match=r"distill2.fake_updates"):
        distill2.Config(fake_updates=0)


def test_params_yaml_section_matches_the_config():
    import yaml

    section = yaml.safe_load(open(Path(__file__).resolve().parents[2] / "params.yaml"))["distill2"]
    fields = {f.name: f.default for f in dataclasses.fields(distill2.Config)}
    assert set(section) == set(fields)
    assert json.loads(json.dumps(section)) == json.loads(json.dumps(fields))
