"""The cca stage: both families end to end, frozen reference, resume byte-identity, monitors' direction."""

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
from stages import cca, pretrain
from stages.cca import Config, run

# dropout on, so the test shows the stage's reference (and by default its policy) runs without it
TINY_MODEL = {"depth": 2, "width": 32, "heads": 2, "resid_dropout": 0.1, "ffn_dropout": 0.1}
KIND_OF = {"gpt": "vq", "var": "msvq"}


@pytest.fixture(scope="module")
def bases(tiny_caches, tmp_path_factory):
    """Per family: the shared tiny tokenizer and token cache, and a tiny ``base`` (read-only)."""
    root = tmp_path_factory.mktemp("cca-bases")
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
    values = dict(input="base", steps=6, batch_size=16, lr=1e-3, beta=0.5, lam=2.0, log_every=2, save_every=2,
                  samples_per_class=1, sample_cfg_scales=[1.0, 2.0])  # fmt: skip
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
    return (Path(paths.models) / "cca" / "model.safetensors").read_bytes()


def train_rows(paths: Paths) -> list[dict]:
    return list(csv.DictReader(open(Path(paths.plots) / "cca" / "train.csv")))


@pytest.mark.parametrize("arch", ["gpt", "var"])
def test_finetunes_and_writes_a_loadable_sampleable_checkpoint(bases, tmp_path, arch):
    from models.ar import ar_from_state, sample_images, tokenizer_from_state

    paths = paths_for(bases, tmp_path, arch)
    base_state, base_config = read_checkpoint(Path(paths.models) / "base")
    metrics = run(tiny(negatives="roll"), paths, NullTracker())
    state, config = read_checkpoint(Path(paths.models) / "cca")
    for key in ("arch", "model", "tokenizer_fingerprint", "token_layout", "class_names", "image_size"):
        assert config[key] == base_config[key], key
    assert config["stage"] == "cca" and config["input_checkpoint"]["fingerprint"] == base_config["fingerprint"]
    assert config["stage_config"]["negatives"] == "roll"
    assert any(not torch.equal(state[k], base_state[k]) for k in state), "the policy moved"
    assert read_checkpoint(Path(paths.models) / "base")[0].keys() == base_state.keys()
    assert metrics["steps"] == 6 and [r["step"] for r in train_rows(paths)] == ["2", "4", "6"]
    tok_state, tok_config = read_checkpoint(paths.tokenizer)
    tokenizer = tokenizer_from_state(tok_state, tok_config)
    model = ar_from_state(state, config, tokenizer)
    images = sample_images(model, tokenizer, torch.tensor([0, 1]), cfg_scale=2.0, seed=3)
    assert images.shape == (2, 8, 8, 3) and images.dtype == torch.uint8
    assert (Path(paths.models) / "cca" / "samples.png").is_file()
    assert not any(Path(paths.resume).rglob("checkpoint_*")), "resume state is removed after success"


def test_one_epoch_by_default_and_the_reference_stays_frozen(bases, tmp_path):
    paths = paths_for(bases, tmp_path, "gpt")
    cfg = tiny(steps=0, batch_size=256, log_every=100)
    tokenizer, _, policy, reference, _ = cca.load_models(cfg, paths)
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    tokens = torch.randint(0, 32, (3, reference.config.seq_len))
    labels = torch.tensor([0, 1, reference.null_class])
    assert torch.equal(reference.sequence_log_prob(tokens, labels), reference.sequence_log_prob(tokens, labels))
    assert all(torch.equal(before[k], v) for k, v in reference.state_dict().items())
    metrics = run(cfg, paths, NullTracker())
    rows = pq_rows(Path(paths.tokens) / "train.parquet")
    assert metrics["steps"] == -(-rows // 256)


def pq_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


@pytest.mark.parametrize("arch", ["gpt", "var"])
def test_killed_run_resumes_to_byte_identical_weights(bases, tmp_path, arch):
    cfg = tiny()
    reference = paths_for(bases, tmp_path, arch, "reference")
    run(cfg, reference, NullTracker())
    shutil.rmtree(tmp_path / "resume", ignore_errors=True)
    crashed = paths_for(bases, tmp_path, arch, "crashed")

    def crash(step):
        if step == 3:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        run(cfg, crashed, NullTracker(), on_step=crash)
    assert any(Path(crashed.resume).rglob("checkpoint_000000002")), "state saved at step 2"
    run(cfg, crashed, NullTracker())
    assert weights_bytes(crashed) == weights_bytes(reference)
    assert train_rows(crashed) == train_rows(reference)
    assert (
        json.loads((Path(crashed.models) / "cca" / "config.json").read_text())["fingerprint"]
        == json.loads((Path(reference.models) / "cca" / "config.json").read_text())["fingerprint"]
    )


@pytest.mark.parametrize("arch", ["gpt", "var"])
def test_monitors_move_in_the_right_direction_on_a_fixed_batch(bases, tmp_path, arch, monkeypatch):
    """Rewards start at exactly 0 (deterministic reference = policy) and separate as the policy
    fits one fixed batch with fixed (rolled) negatives."""
    first_batch = cca.batch_at
    monkeypatch.setattr(cca, "batch_at", lambda cfg, tokens, labels, step: first_batch(cfg, tokens, labels, 0))
    paths = paths_for(bases, tmp_path, arch)
    run(tiny(steps=20, log_every=1, save_every=0, lr=3e-3, negatives="roll", uncond_ratio=0.0), paths, NullTracker())
    rows = train_rows(paths)
    first, last = rows[0], rows[-1]
    assert float(first["sigmoid_pos"]) == float(first["sigmoid_neg"]) == 0.5 and float(first["margin"]) == 0
    assert float(last["sigmoid_pos"]) > 0.5 > float(last["sigmoid_neg"])
    assert float(last["accuracy"]) > 0.8 and float(last["margin"]) > 0.1
    assert float(last["loss"]) < float(first["loss"])


def test_config_refusals():
    with pytest.raises(ValueError, match="uncond_ratio"):
        Config(uncond_ratio=1.0)
    with pytest.raises(ValueError, match="beta"):
        Config(beta=0.0)


@pytest.mark.parametrize("arch", ["gpt", "var"])
def test_first_losses_match_the_golden_file(bases, tmp_path, arch):
    paths = paths_for(bases, tmp_path, arch)
    run(tiny(steps=8, log_every=1, save_every=0), paths, NullTracker())
    check_golden_losses(f"cca/{arch}", [float(r["loss"]) for r in train_rows(paths)])
