import json

import pytest
import torch
from helpers import TINY_TOKENIZERS
from safetensors.torch import load_file

from core.checkpoint import read_checkpoint
from core.config import ConfigError, Paths, from_dict
from core.shards import load_split
from core.tracking import NullTracker
from core.training import NonFiniteLossError
from models.tokenizers import build_tokenizer
from stages import train_tokenizer
from stages.train_tokenizer import Config, run

TINY = TINY_TOKENIZERS


@pytest.fixture
def shards(shard_run):
    return shard_run(image_size=8)[1]


def tiny(kind="msvq", **overrides):
    values = dict(
        kind=kind, model=TINY[kind], steps=6, batch_size=16, log_every=2, eval_every=3, save_every=2, num_grid=4
    )
    return Config(**{**values, **overrides})


def paths_for(tmp_path, shards, name="run"):
    out = tmp_path / name
    return Paths(
        shards=str(shards),
        metrics=str(out / "metrics"),
        plots=str(out / "plots"),
        tokenizer=str(out / "tokenizer"),
        resume=str(tmp_path / "resume"),
    )


@pytest.mark.parametrize("kind", ["msvq", "vq"])
def test_outs_rebuild_the_model_and_reproduce_encode(tmp_path, shards, kind, capsys):
    paths = paths_for(tmp_path, shards)
    metrics = run(tiny(kind), paths, NullTracker())
    assert metrics["steps"] == 6 and metrics["val_psnr"] > 0 and 0 < metrics["usage"]["overall"] <= 1
    # the reconstruction-quality proxy is reported next to PSNR, in the metrics and the end line
    assert metrics["val_recon_fid_pixels"] > 0
    end = capsys.readouterr().out.splitlines()[-1]
    assert f"val PSNR {metrics['val_psnr']:.2f} dB, reconstruction FID {metrics['val_recon_fid_pixels']:.3f}" in end
    # Usage is also counted over the whole train set and its flips, per scale for msvq.
    assert metrics["train_usage"].keys() == metrics["usage"].keys()
    assert all(0 < value <= 1 for value in metrics["train_usage"].values())
    state_dict, config = read_checkpoint(paths.tokenizer)
    assert config["kind"] == kind and config["image_size"] == 8 and len(config["class_names"]) == 10
    model = build_tokenizer(config["kind"], config["model"]).eval()
    model.load_state_dict(state_dict)
    assert config["seq_len"] == model.seq_len and config["token_layout"] == model.token_layout
    images = torch.from_numpy(load_split(shards, "val").images_NHWC[:5]).permute(0, 3, 1, 2).float() / 127.5 - 1
    tokens = model.encode(images)
    assert tokens.shape == (5, model.seq_len) and int(tokens.max()) < config["codebook_size"]
    assert model.decode(tokens).shape == images.shape and torch.equal(model.encode(images), tokens)
    lines = (tmp_path / "run" / "plots" / "train_tokenizer" / "loss.csv").read_text().splitlines()
    assert lines[0].startswith("step,loss,recon") and len(lines) == 1 + 3
    assert not (tmp_path / "resume" / "train_tokenizer").exists() or not any(
        (tmp_path / "resume" / "train_tokenizer").iterdir()
    )


def test_no_restart_in_the_last_restart_window(tmp_path, shards, monkeypatch):
    from models.residual_quantizer import MultiScaleResidualQuantizer

    real, allowed = MultiScaleResidualQuantizer.update_codebook, []

    def recording(self, counts, candidates, generator, allow_restart=True):
        allowed.append(allow_restart)
        return real(self, counts, candidates, generator, allow_restart)

    monkeypatch.setattr(MultiScaleResidualQuantizer, "update_codebook", recording)
    run(tiny(steps=10, save_every=0), paths_for(tmp_path, shards), NullTracker())
    # restart_every 4: the restart due at update 8 would leave its codes 2 steps to train.
    assert allowed == [True] * 6 + [False] * 4


def test_same_seed_gives_byte_identical_outs(tmp_path, shards):
    first, second = paths_for(tmp_path, shards, "a"), paths_for(tmp_path, shards, "b")
    run(tiny(), first, NullTracker())
    run(tiny(), second, NullTracker())
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "a" / "tokenizer" / name).read_bytes() == (tmp_path / "b" / "tokenizer" / name).read_bytes()
    assert (tmp_path / "a" / "plots" / "train_tokenizer" / "loss.csv").read_bytes() == (
        tmp_path / "b" / "plots" / "train_tokenizer" / "loss.csv"
    ).read_bytes()


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, shards):
    cfg = tiny(steps=8, save_every=3, disc_weight=0.1, disc_start=2)
    straight = paths_for(tmp_path, shards, "straight")
    run(cfg, straight, NullTracker())

    def crash(step):
        if step == 4:  # state saved at step 3; step 4 is lost and redone
            raise KeyboardInterrupt

    resumed = paths_for(tmp_path, shards, "resumed")
    with pytest.raises(KeyboardInterrupt):
        run(cfg, resumed, NullTracker(), on_step=crash)
    assert list((tmp_path / "resume" / "train_tokenizer").glob("*/checkpoint_000000003"))
    run(cfg, resumed, NullTracker())
    a = load_file(tmp_path / "straight" / "tokenizer" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "tokenizer" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "straight" / "plots" / "train_tokenizer" / "loss.csv").read_bytes() == (
        tmp_path / "resumed" / "plots" / "train_tokenizer" / "loss.csv"
    ).read_bytes()
    assert not list((tmp_path / "resume" / "train_tokenizer").glob("*/checkpoint_*"))


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_state(tmp_path, shards, monkeypatch):
    real = train_tokenizer.reconstruction_loss
    calls = []

    def poisoned(kind, recon, x):
        calls.append(1)
        loss = real(kind, recon, x)
        return loss * float("nan") if len(calls) == 5 else loss

    monkeypatch.setattr(train_tokenizer, "reconstruction_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"step 4 .*checkpoint_000000004"):
        run(tiny(save_every=2), paths_for(tmp_path, shards), NullTracker())
    assert list((tmp_path / "resume" / "train_tokenizer").glob("*/checkpoint_000000004/state.json"))


def test_model_keys_are_checked_strictly():
    with pytest.raises(ConfigError, match="codebook_sise"):
        from_dict(Config, {"kind": "vq", "model": {"codebook_sise": 3}}, prefix="train_tokenizer")
    assert json.dumps(Config().model)  # the default is JSON-ready


@pytest.mark.parametrize("key", ["image_size", "image_channels"])
def test_image_size_and_channels_come_from_the_shards_not_the_params(key):
    with pytest.raises(ConfigError, match=rf"train_tokenizer: model.{key} is set from the shards"):
        from_dict(Config, {"kind": "vq", "model": {key: 16}}, prefix="train_tokenizer")


def vgg_file(tmp_path, suffix: str):
    """A randomly initialised narrow VGG16 saved as a torchvision-format state_dict (no real weights here)."""
    from safetensors.torch import save_file

    from models.perceptual import vgg16_features

    torch.manual_seed(0)
    state_dict = {f"features.{k}": v for k, v in vgg16_features((4, 8, 8, 16, 16)).state_dict().items()}
    path = tmp_path / f"vgg16{suffix}"
    save_file(state_dict, path) if suffix == ".safetensors" else torch.save(state_dict, path)
    return path


def test_perceptual_loss_from_a_local_file_trains(tmp_path, shards):
    cfg = tiny("vq", steps=2, log_every=1, save_every=0, perceptual_weights=str(vgg_file(tmp_path, ".safetensors")))
    metrics = run(cfg, paths_for(tmp_path, shards), NullTracker())
    assert metrics["steps"] == 2
    lines = (tmp_path / "run" / "plots" / "train_tokenizer" / "loss.csv").read_text().splitlines()
    assert lines[0].endswith(",perceptual") and len(lines) == 3
    assert all(float(line.rsplit(",", 1)[1]) > 0 for line in lines[1:])
    state_dict, config = read_checkpoint(tmp_path / "run" / "tokenizer")
    assert not any("features" in key for key in state_dict)  # the VGG is never saved with the tokenizer
    assert config["stage_config"]["perceptual_weights"] == cfg.perceptual_weights


def test_pth_and_safetensors_weights_load_the_same_network(tmp_path):
    a = train_tokenizer.load_perceptual(str(vgg_file(tmp_path, ".pth")))
    b = train_tokenizer.load_perceptual(str(vgg_file(tmp_path, ".safetensors")))
    x, y = torch.rand(2, 3, 8, 8) * 2 - 1, torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.equal(a(x, y), b(x, y)) and train_tokenizer.load_perceptual("") is None


def test_missing_perceptual_weights_fail_by_name_before_any_work(tmp_path):
    missing = tmp_path / "nowhere" / "vgg16.pth"
    with pytest.raises(FileNotFoundError, match=rf"train_tokenizer\.perceptual_weights: no file at '{missing}'"):
        run(tiny(perceptual_weights=str(missing)), paths_for(tmp_path, tmp_path / "no-shards"), NullTracker())
    assert not (tmp_path / "run").exists()


class RoundTrip(torch.nn.Module):
    """A stand-in tokenizer whose decode(encode(x)) is x area-averaged over ``blur`` x ``blur`` patches."""

    def __init__(self, blur: int):
        super().__init__()
        self.blur = blur
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # reconstruct() reads the device from a parameter

    def encode(self, x):
        return x

    def decode(self, z):
        return torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(z, self.blur), scale_factor=self.blur)

    def codebook_usage(self):
        return {"overall": 1.0}


def test_pixel_reconstruction_fid_is_zero_for_a_lossless_round_trip_and_grows_with_blur(shards):
    val = load_split(shards, "val").images_NHWC
    fids = [train_tokenizer.evaluate(RoundTrip(blur), val)["val_recon_fid_pixels"] for blur in (1, 2, 4)]
    assert fids[0] == pytest.approx(0, abs=1e-9)
    assert 0 < fids[1] < fids[2]
