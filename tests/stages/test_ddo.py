"""The ddo stage: both families end to end, self-play rounds with a frozen reference, resume byte-identity."""

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import check_golden_losses

from core.checkpoint import read_checkpoint
from core.config import Paths
from core.tracking import NullTracker
from stages import ddo, pretrain
from stages.ddo import Config, run

# dropout on, so the test shows the stage's reference (and by default its policy) runs without it
TINY_MODEL = {"depth": 2, "width": 32, "heads": 2, "resid_dropout": 0.1, "ffn_dropout": 0.1}
KIND_OF = {"gpt": "vq", "var": "msvq"}


@pytest.fixture(scope="module")
def bases(tiny_caches, tmp_path_factory):
    """Per family: the shared tiny tokenizer and token cache, and a tiny ``base`` (read-only)."""
    root = tmp_path_factory.mktemp("ddo-bases")
    out = {}
    for arch, kind in KIND_OF.items():
        paths = dataclasses.replace(tiny_caches[kind], models=str(root / kind / "models"),
                                    plots=str(root / kind / "p"), metrics=str(root / kind / "m"))  # fmt: skip
        base = pretrain.Config(
            arch=arch, model=TINY_MODEL, steps=12, batch_size=16, lr=3e-3, warmup_steps=2, log_every=4,
            eval_every=12, save_every=0, samples_per_class=1, sample_cfg_scales=[1.0],
        )  # fmt: skip
        pretrain.run(base, paths, NullTracker())
        out[arch] = paths
    return out


def tiny(**overrides) -> Config:
    values = dict(input="base", rounds=2, steps_per_round=3, batch_size=16, lr=1e-3, alpha=2.0, beta=0.5,
                  log_every=1, save_every=2, sample_batch_size=32, samples_per_class=1,
                  sample_cfg_scales=[1.0, 2.0])  # fmt: skip
    return Config(**{**values, **overrides})


def paths_for(bases, tmp_path, arch, name="run") -> Paths:
    """Outputs under tmp_path, with the fixture's base checkpoint linked in as the input."""
    inputs = bases[arch]
    out = tmp_path / name
    (out / "models").mkdir(parents=True)
    (out / "models" / "base").symlink_to(Path(inputs.models) / "base")
    return dataclasses.replace(
        inputs,
        metrics=str(out / "metrics"),
        plots=str(out / "plots"),
        models=str(out / "models"),
        resume=str(tmp_path / "resume"),
    )


def weights_bytes(paths: Paths) -> bytes:
    return (Path(paths.models) / "ddo" / "model.safetensors").read_bytes()


def train_rows(paths: Paths) -> list[dict]:
    return list(csv.DictReader(open(Path(paths.plots) / "ddo" / "train.csv")))


@pytest.mark.parametrize("arch", ["gpt", "var"])
def test_finetunes_in_rounds_and_writes_a_loadable_sampleable_checkpoint(bases, tmp_path, arch):
    from models.ar import ar_from_state, sample_images, tokenizer_from_state

    paths = paths_for(bases, tmp_path, arch)
    base_state, base_config = read_checkpoint(Path(paths.models) / "base")
    metrics = run(tiny(), paths, NullTracker())
    state, config = read_checkpoint(Path(paths.models) / "ddo")
    for key in ("arch", "model", "tokenizer_fingerprint", "token_layout", "class_names", "image_size"):
        assert config[key] == base_config[key], key
    assert config["stage"] == "ddo" and config["input_checkpoint"]["name"] == "base"
    assert config["input_checkpoint"]["fingerprint"] == base_config["fingerprint"]
    assert config["stage_config"]["rounds"] == 2 and config["stage_config"]["round_trip"] is True
    assert any(not torch.equal(state[k], base_state[k]) for k in state), "the policy moved"
    assert metrics["steps"] == 6 and metrics["rounds"] == 2 and metrics["steps_per_round"] == 3
    rows = train_rows(paths)
    assert [(r["step"], r["round"]) for r in rows] == [("1", "1"), ("2", "1"), ("3", "1"),
                                                        ("4", "2"), ("5", "2"), ("6", "2")]  # fmt: skip
    # each round starts with the policy equal to its (deterministic) reference: rewards exactly 0
    for first in (rows[0], rows[3]):
        assert float(first["sigmoid_real"]) == float(first["sigmoid_fake"]) == 0.5, first
        assert float(first["margin"]) == 0.0
    assert float(rows[2]["margin"]) != 0.0
    tok_state, tok_config = read_checkpoint(paths.tokenizer)
    tokenizer = tokenizer_from_state(tok_state, tok_config)
    model = ar_from_state(state, config, tokenizer)
    images = sample_images(model, tokenizer, torch.tensor([0, 1]), cfg_scale=2.0, seed=3)
    assert images.shape == (2, 8, 8, 3) and images.dtype == torch.uint8
    assert (Path(paths.models) / "ddo" / "samples.png").is_file()
    assert not any(Path(paths.resume).rglob("checkpoint_*")), "resume state is removed after success"


def test_each_round_freezes_the_current_model_and_samples_its_fakes_from_it(bases, tmp_path, monkeypatch):
    """The reference is in eval mode without gradients, its weights do not change during its round,
    it is the input checkpoint in round 1 and the policy as round 1 left it in round 2; the fakes
    are plain samples of that reference, one buffer of steps_per_round·batch_size per round."""
    paths = paths_for(bases, tmp_path, "gpt")
    base_state, _ = read_checkpoint(Path(paths.models) / "base")
    rounds = []
    real_sample_fakes = ddo.sample_fakes

    def spy(reference, labels_N, **kwargs):
        tokens = real_sample_fakes(reference, labels_N, **kwargs)
        weights = {k: v.clone() for k, v in reference.state_dict().items()}
        rounds.append({"reference": reference, "weights": weights, "labels": labels_N, "kwargs": kwargs,
                       "tokens": tokens, "frozen_ok": []})  # fmt: skip
        return tokens

    def check(step):
        current = rounds[-1]
        reference = current["reference"]
        frozen = not reference.training and not any(p.requires_grad or p.grad is not None
                                                    for p in reference.parameters())  # fmt: skip
        same = all(torch.equal(current["weights"][k], v) for k, v in reference.state_dict().items())
        current["frozen_ok"].append(frozen and same)

    monkeypatch.setattr(ddo, "sample_fakes", spy)
    cfg = tiny(round_trip=False, save_every=0)
    run(cfg, paths, NullTracker(), on_step=check)
    assert len(rounds) == 2 and all(r["frozen_ok"] == [True] * 3 for r in rounds)
    assert all(torch.equal(rounds[0]["weights"][k], base_state[k]) for k in base_state)
    assert any(not torch.equal(rounds[1]["weights"][k], base_state[k]) for k in base_state)
    for r in rounds:
        assert r["tokens"].shape == (3 * 16, r["reference"].config.seq_len)
        assert sorted(torch.bincount(r["labels"], minlength=10).tolist())[::9] in ([4, 5], [5, 5])
        assert r["kwargs"]["tokenizer"] is None
    assert not torch.equal(rounds[0]["labels"], rounds[1]["labels"]), "fresh labels per round"
    # the round-1 fakes are what the input checkpoint samples with the round's seed (no guidance)
    tokenizer, _, policy, _, _ = ddo.load_models(cfg, paths)
    again = real_sample_fakes(policy.eval(), rounds[0]["labels"], seed=rounds[0]["kwargs"]["seed"],
                              batch_size=cfg.sample_batch_size)  # fmt: skip
    assert torch.equal(again, rounds[0]["tokens"])


def test_one_epoch_per_round_by_default(bases, tmp_path):
    import pyarrow.parquet as pq

    paths = paths_for(bases, tmp_path, "var")
    metrics = run(tiny(steps_per_round=0, rounds=1, batch_size=256, log_every=100), paths, NullTracker())
    rows = pq.ParquetFile(Path(paths.tokens) / "train.parquet").metadata.num_rows
    assert metrics["steps_per_round"] == -(-rows // 256) == metrics["steps"]
    assert len(train_rows(paths)) == 1, "a round's last step is always logged"


@pytest.mark.parametrize(("arch", "save_every", "crash_at"), [("gpt", 2, 5), ("gpt", 3, 4), ("var", 2, 5)])
def test_killed_run_resumes_to_byte_identical_weights(bases, tmp_path, arch, save_every, crash_at):
    """Killed mid-round (restored from inside round 2: same reference, same buffer) or just after a
    round boundary (restored at the boundary: round 2 begins afresh)."""
    cfg = tiny(save_every=save_every)
    reference = paths_for(bases, tmp_path, arch, "reference")
    run(cfg, reference, NullTracker())
    shutil.rmtree(tmp_path / "resume", ignore_errors=True)
    crashed = paths_for(bases, tmp_path, arch, "crashed")

    def crash(step):
        if step == crash_at:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        run(cfg, crashed, NullTracker(), on_step=crash)
    saved = crash_at - crash_at % save_every
    assert any(Path(crashed.resume).rglob(f"checkpoint_{saved:09d}")), f"state saved at step {saved}"
    run(cfg, crashed, NullTracker())
    assert weights_bytes(crashed) == weights_bytes(reference)
    assert train_rows(crashed) == train_rows(reference)
    assert (
        json.loads((Path(crashed.models) / "ddo" / "config.json").read_text())["fingerprint"]
        == json.loads((Path(reference.models) / "ddo" / "config.json").read_text())["fingerprint"]
    )


@pytest.mark.parametrize("arch", ["gpt", "var"])
def test_the_discriminator_separates_real_from_fake_within_a_round(bases, tmp_path, arch):
    """With α = 1 the optimal discriminator is p_data / (p_data + p_ref): above 1/2 on average over
    real sequences, below it over the reference's fakes."""
    paths = paths_for(bases, tmp_path, arch)
    cfg = tiny(rounds=1, steps_per_round=12, lr=3e-3, alpha=1.0, uncond_ratio=0.0, save_every=0)
    run(cfg, paths, NullTracker())
    rows = train_rows(paths)
    first, last = rows[0], rows[-1]
    assert float(first["loss"]) == pytest.approx(2 * 0.6931472, rel=1e-5), "(1 + α)·log 2 at the reference"
    # each step draws new real and fake batches, so judge the last few together: reals scored
    # above fakes (the margin), fakes pushed below 1/2, and the loss down from the reference's
    tail = rows[-4:]
    mean = lambda key: sum(float(r[key]) for r in tail) / len(tail)  # noqa: E731
    assert mean("sigmoid_real") > mean("sigmoid_fake") and mean("sigmoid_fake") < 0.5
    assert mean("margin") > 0 and mean("accuracy") > 0.5
    assert float(last["loss"]) < float(first["loss"])


def test_config_refusals():
    with pytest.raises(ValueError, match="uncond_ratio"):
        Config(uncond_ratio=1.0)
    with pytest.raises(ValueError, match="beta"):
        Config(beta=0.0)
    with pytest.raises(ValueError, match="rounds"):
        Config(rounds=-1)  # 0 passes the input through (tests/stages/test_released_pipeline.py)


@pytest.mark.slow
def test_two_cpu_ranks_match_one_rank_at_the_same_global_batch(bases, tmp_path):
    """Under ``launcher: accelerate/cpu-2proc.yaml`` (two gloo ranks, DDP) every rank draws the
    same round's fakes (same seeds) and trains on its half of the real and fake rows, with the
    gradients averaged: with dropout and label nulling off the weights match a one-process run at
    the same global batch, and the reference is re-frozen from the synchronised policy each round."""
    from helpers import run_stage_under_two_cpu_ranks

    cfg = tiny(save_every=0, keep_dropout=False, uncond_ratio=0.0, round_trip=False)
    one = paths_for(bases, tmp_path, "gpt", "one")
    run(cfg, one, NullTracker())

    two = paths_for(bases, tmp_path, "gpt", "two")
    config = {**dataclasses.asdict(cfg), "betas": list(cfg.betas)}
    result = run_stage_under_two_cpu_ranks("ddo", config, two, tmp_path / "project")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "relaunching under" in result.stdout
    state_one, _ = read_checkpoint(Path(one.models) / "ddo")
    state_two, _ = read_checkpoint(Path(two.models) / "ddo")
    base_state, _ = read_checkpoint(Path(one.models) / "base")
    assert any(not torch.equal(state_one[k], base_state[k]) for k in state_one)
    for key in state_one:
        torch.testing.assert_close(state_two[key], state_one[key], rtol=1e-4, atol=1e-5)
    assert len(train_rows(two)) == len(train_rows(one))


@pytest.mark.parametrize("arch", ["gpt", "var"])
def test_first_losses_match_the_golden_file(bases, tmp_path, arch):
    paths = paths_for(bases, tmp_path, arch)
    run(tiny(rounds=2, steps_per_round=4, log_every=1, save_every=0), paths, NullTracker())
    check_golden_losses(f"ddo/{arch}", [float(r["loss"]) for r in train_rows(paths)])
