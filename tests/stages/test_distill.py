"""distill_pairs + distill: both families end to end, the pairs file, one-/two-step sampling, resume."""

import csv
import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import check_golden_losses

from core.checkpoint import read_checkpoint
from core.config import Paths
from core.pair_store import load_pairs, read_meta
from core.tracking import NullTracker
from stages import distill, distill_pairs, pretrain

TINY_MODEL = {"depth": 2, "width": 32, "heads": 2}
KIND_OF = {"gpt": "vq", "var": "msvq"}


@pytest.fixture(scope="module")
def teachers(tiny_caches, tmp_path_factory):
    """Per family: the shared tiny tokenizer and cache, a tiny ``base`` teacher and its pairs (read-only)."""
    root = tmp_path_factory.mktemp("distill-teachers")
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
        pairs_metrics = distill_pairs.run(tiny_pairs(), paths, NullTracker())
        out[arch] = (paths, pairs_metrics)
    return out


def tiny_pairs(**overrides) -> distill_pairs.Config:
    values = dict(teacher="base", count=96, batch_size=40, cfg_scale=2.0, ode_steps=12, t_min=0.02)
    return distill_pairs.Config(**{**values, **overrides})


def tiny(**overrides) -> distill.Config:
    values = dict(steps=6, batch_size=16, lr=1e-3, warmup_steps=1, log_every=2, save_every=2, val_count=16,
                  samples_per_class=1)  # fmt: skip
    return distill.Config(**{**values, **overrides})


def paths_for(teachers, tmp_path, arch, name="run") -> Paths:
    inputs, _ = teachers[arch]
    out = tmp_path / name
    (out / "models").mkdir(parents=True)
    (out / "models" / "base").symlink_to(Path(inputs.models) / "base")
    return dataclasses.replace(inputs, metrics=str(out / "metrics"), plots=str(out / "plots"),
                               models=str(out / "models"), resume=str(tmp_path / "resume"))  # fmt: skip


def load_tokenizer(paths: Paths):
    from models.ar import tokenizer_from_state

    return tokenizer_from_state(*read_checkpoint(paths.tokenizer))


# -- distill_pairs ------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt", "var"])
def test_pairs_round_trip_with_the_teachers_fingerprint_and_follow_the_teacher(teachers, arch):
    from models.ar import ar_from_state
    from models.dd import code_space, map_teacher, ode_grid
    from models.sampling import family_filters, guidance_per_step

    paths, metrics = teachers[arch]
    _, base_config = read_checkpoint(Path(paths.models) / "base")
    pairs = load_pairs(Path(paths.distill) / "pairs.parquet", expected_teacher_fingerprint=base_config["fingerprint"])
    seq_len = base_config["model"].get("seq_len") or sum(s * s for s in base_config["model"]["scales"])
    tokenizer = load_tokenizer(paths)
    codebook, _ = code_space(tokenizer)
    assert pairs.noise_NLD.shape == (96, seq_len, codebook.shape[1]) and pairs.noise_NLD.dtype == np.float32
    assert pairs.tokens_NL.shape == (96, seq_len) and pairs.tokens_NL.dtype == np.uint16
    assert np.array_equal(pairs.labels_N, np.arange(96) % 10), "class-balanced labels"
    assert pairs.meta["teacher"] == "base" and pairs.meta["arch"] == arch
    assert pairs.meta["stage_config"]["cfg_scale"] == 2.0
    # the stored tokens are the teacher's map of the stored noise (rows 38..42 straddle two batches of 40)
    teacher = ar_from_state(*read_checkpoint(Path(paths.models) / "base"), tokenizer)
    rows = slice(38, 43)
    # each family's authors' sampling (guidance_schedule, top_k, top_p "auto"): gpt constant, var ramped + 900/0.96
    guidance = guidance_per_step(2.0, "auto", arch=arch, steps=teacher.steps)
    top_k, top_p = family_filters("auto", "auto", arch=arch, vocab_size=teacher.config.vocab_size)
    assert (guidance, top_k, top_p) == ((2.0, 0, 1.0) if arch == "gpt" else ([1.0, 1.5, 2.0], 32, 0.96))
    again = map_teacher(teacher, torch.from_numpy(pairs.labels_N[rows]).long(), torch.from_numpy(pairs.noise_NLD[rows]),
                        codebook, ode_grid(12, 0.02), cfg_scale=guidance, top_k=top_k, top_p=top_p)  # fmt: skip
    assert np.array_equal(again.numpy(), pairs.tokens_NL[rows])
    assert metrics["count"] == 96 and metrics["codes_used"] > 1
    assert abs(metrics["mapped_nll_per_token"] - metrics["teacher_entropy_per_token"]) < 0.25
    with pytest.raises(ValueError, match="not by the current one"):
        load_pairs(Path(paths.distill) / "pairs.parquet", expected_teacher_fingerprint="0" * 64)


def test_pairs_do_not_depend_on_the_batch_size_and_the_file_is_deterministic(teachers, tmp_path):
    paths, _ = teachers["gpt"]
    original = Path(paths.distill) / "pairs.parquet"
    other = dataclasses.replace(paths, distill=str(tmp_path / "a"))
    distill_pairs.run(tiny_pairs(batch_size=40), other, NullTracker())
    assert (Path(other.distill) / "pairs.parquet").read_bytes() == original.read_bytes()
    rebatched = dataclasses.replace(paths, distill=str(tmp_path / "b"))
    distill_pairs.run(tiny_pairs(batch_size=96), rebatched, NullTracker())
    a, b = load_pairs(original), load_pairs(Path(rebatched.distill) / "pairs.parquet")
    assert np.array_equal(a.tokens_NL, b.tokens_NL) and np.array_equal(a.noise_NLD, b.noise_NLD)


def test_pairs_refuse_a_missing_teacher_and_bad_settings(teachers, tmp_path):
    paths, _ = teachers["gpt"]
    with pytest.raises(FileNotFoundError, match="nope"):
        distill_pairs.run(tiny_pairs(teacher="nope"), paths, NullTracker())
    with pytest.raises(ValueError, match="t_min"):
        distill_pairs.Config(t_min=0.0)
    with pytest.raises(FileNotFoundError, match="distill_pairs"):
        read_meta(tmp_path / "missing.parquet")


# -- distill ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt", "var"])
def test_distills_a_loadable_student_whose_one_step_samples_decode(teachers, tmp_path, arch):
    from models.dd_student import sample_distilled_images, student_from_state

    paths = paths_for(teachers, tmp_path, arch)
    _, base_config = read_checkpoint(Path(paths.models) / "base")
    metrics = distill.run(tiny(), paths, NullTracker())
    state, config = read_checkpoint(Path(paths.models) / "distilled")
    assert config["distilled"] is True and config["stage"] == "distill" and config["arch"] == arch
    assert config["teacher"]["name"] == "base" and config["teacher"]["fingerprint"] == base_config["fingerprint"]
    assert config["model"] == base_config["model"] and config["teacher"]["cfg_scale"] == 2.0
    assert 1 <= config["dd"]["two_step_at"] <= config["dd"]["split"]
    assert {"val_agreement_1step", "val_agreement_2step", "train_loss", "train_ce", "train_mse"} <= set(metrics)
    assert [r["step"] for r in csv.DictReader(open(Path(paths.plots) / "distill" / "train.csv"))] == ["2", "4", "6"]
    assert (Path(paths.models) / "distilled" / "samples.png").is_file()
    assert not any(Path(paths.resume).rglob("checkpoint_*"))

    tokenizer = load_tokenizer(paths)
    student = student_from_state(state, config, tokenizer)
    noise = torch.randn(3, student.seq_len, student.dd.code_dim, generator=torch.Generator().manual_seed(0))
    tokens, vectors = student.sample(noise, torch.tensor([0, 4, 9]), steps=1)
    assert tokens.shape == (3, student.seq_len) and tokens.dtype == torch.int64
    assert vectors.shape == (3, student.seq_len, student.dd.code_dim)
    head = student.prefix_positions(student.dd.split)
    assert torch.equal(vectors[:, :head], student.codebook_VD[tokens[:, :head]]), "logits head gives codewords"
    images = sample_distilled_images(student, tokenizer, torch.tensor([0, 1, 2]), steps=1, seed=1)
    assert images.shape == (3, 8, 8, 3) and images.dtype == torch.uint8
    assert torch.equal(images, sample_distilled_images(student, tokenizer, torch.tensor([0, 1, 2]), steps=1, seed=1))

    # the user's way in: `arpipe sample --checkpoint data/models/distilled --steps 1|2`
    from click.testing import CliRunner
    from PIL import Image

    from arpipe.cli import cli

    for steps in ("1", "2"):
        out = tmp_path / f"grid-{steps}.png"
        args = ["sample", "--checkpoint", str(Path(paths.models) / "distilled"), "--tokenizer", paths.tokenizer]
        result = CliRunner().invoke(cli, [*args, "--classes", "0,3", "--n", "2", "--steps", steps, "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert f"distilled student, {steps}-step (teacher base at cfg_scale 2.0)" in result.output
        assert Image.open(out).size[0] >= 2 * 8


@pytest.mark.parametrize("arch", ["gpt", "var"])
def test_two_step_sampling_reuses_the_original_noise(teachers, tmp_path, arch):
    from models.dd_student import student_from_state

    paths = paths_for(teachers, tmp_path, arch)
    distill.run(tiny(save_every=0), paths, NullTracker())
    student = student_from_state(*read_checkpoint(Path(paths.models) / "distilled"), load_tokenizer(paths))
    noise = torch.randn(4, student.seq_len, student.dd.code_dim, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([1, 2, 3, 4])
    calls = []
    predict = student.predict

    def spy(noise_BLD, labels_B, tokens_BL=None, data_BL=None):
        out = predict(noise_BLD, labels_B, tokens_BL, data_BL)
        calls.append((noise_BLD.clone(), data_BL, out))
        return out

    student.predict = spy
    tokens, _ = student.sample(noise, labels, steps=2)
    assert len(calls) == 2
    (first_noise, first_data, (first_tokens, _)), (second_noise, second_data, _) = calls
    assert first_data is None and torch.equal(first_noise, noise) and torch.equal(second_noise, noise)
    kept = student.prefix_positions(student.dd.two_step_at)
    assert bool(second_data[:, :kept].all()) and not bool(second_data[:, kept:].any())
    assert torch.equal(tokens[:, :kept], first_tokens[:, :kept]), "the kept prefix is the first step's"
    one, _ = student.sample(noise, labels, steps=1)
    assert torch.equal(one, first_tokens)
    with pytest.raises(ValueError, match="1 or 2 steps"):
        student.sample(noise, labels, steps=3)


@pytest.mark.parametrize("arch", ["gpt", "var"])
def test_killed_run_resumes_to_byte_identical_weights(teachers, tmp_path, arch):
    cfg = tiny()
    reference = paths_for(teachers, tmp_path, arch, "reference")
    distill.run(cfg, reference, NullTracker())
    shutil.rmtree(tmp_path / "resume", ignore_errors=True)
    crashed = paths_for(teachers, tmp_path, arch, "crashed")

    def crash(step):
        if step == 3:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        distill.run(cfg, crashed, NullTracker(), on_step=crash)
    assert any(Path(crashed.resume).rglob("checkpoint_000000002"))
    distill.run(cfg, crashed, NullTracker())
    for name in ("model.safetensors", "config.json"):
        assert (Path(crashed.models) / "distilled" / name).read_bytes() == (
            Path(reference.models) / "distilled" / name
        ).read_bytes()
    assert (Path(crashed.plots) / "distill" / "train.csv").read_text() == (
        Path(reference.plots) / "distill" / "train.csv"
    ).read_text()


def test_student_fits_the_pairs_better_than_at_init(teachers, tmp_path):
    """A few dozen steps on a small set: the training loss falls and held-out agreement is above chance."""
    paths = paths_for(teachers, tmp_path, "gpt")
    metrics = distill.run(tiny(steps=40, lr=3e-3, log_every=5, save_every=0), paths, NullTracker())
    rows = list(csv.DictReader(open(Path(paths.plots) / "distill" / "train.csv")))
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    assert metrics["val_agreement_1step"] > 1 / 32


def test_config_refusals(teachers, tmp_path):
    with pytest.raises(ValueError, match="prefix_fraction"):
        distill.Config(prefix_fraction=1.5)
    paths = paths_for(teachers, tmp_path, "gpt")
    with pytest.raises(ValueError, match="two_step_at"):
        distill.run(tiny(split=2, two_step_at=3), paths, NullTracker())
    with pytest.raises(ValueError, match="val_count"):
        distill.run(tiny(val_count=96), paths, NullTracker())


@pytest.mark.parametrize("arch", ["gpt", "var"])
def test_first_losses_match_the_golden_file(teachers, tmp_path, arch):
    paths = paths_for(teachers, tmp_path, arch)
    distill.run(tiny(steps=8, log_every=1, save_every=0), paths, NullTracker())
    rows = csv.DictReader(open(Path(paths.plots) / "distill" / "train.csv"))
    check_golden_losses(f"distill/{arch}", [float(r["loss"]) for r in rows])
