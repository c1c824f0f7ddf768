"""The sar stage: VAR end to end, monitors in MLflow, resume byte-identity, the CSFL's effect, gpt pass-through."""

import csv
import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from helpers import check_golden_losses

from core.checkpoint import read_checkpoint
from core.config import Paths
from core.tracking import NullTracker
from stages import cca, pretrain, sar
from stages.sar import Config, run

# dropout and drop-path on, as in the README's VAR recipe
TINY_MODEL = {"depth": 2, "width": 32, "heads": 2, "resid_dropout": 0.1, "ffn_dropout": 0.1, "drop_path": 0.1}
KIND_OF = {"gpt": "vq", "var": "msvq"}


class RecordingTracker(NullTracker):
    def __init__(self):
        self.metrics, self.params, self.tags, self.images = {}, {}, {}, []

    def log_metrics(self, metrics, step=None):
        for key, value in metrics.items():
            self.metrics.setdefault(key, []).append(value)

    def log_params(self, params):
        self.params.update(params)

    def set_tags(self, tags):
        self.tags.update(tags)

    def log_image(self, image_HWC, name):
        self.images.append(name)


@pytest.fixture(scope="module")
def bases(tiny_caches, tmp_path_factory):
    """Per family: the shared tiny tokenizer and token cache, and a tiny ``base`` (read-only)."""
    root = tmp_path_factory.mktemp("sar-bases")
    out = {}
    for arch, kind in KIND_OF.items():
        paths = dataclasses.replace(tiny_caches[kind], models=str(root / kind / "models"),
                                    plots=str(root / kind / "p"), metrics=str(root / kind / "m"))  # fmt: skip
        model = TINY_MODEL if arch == "var" else {k: v for k, v in TINY_MODEL.items() if k != "drop_path"}
        base = pretrain.Config(
            arch=arch, model=model, steps=12, batch_size=16, lr=3e-3, warmup_steps=2, log_every=4,
            eval_every=12, save_every=0, samples_per_class=1, sample_cfg_scales=[1.0],
        )  # fmt: skip
        pretrain.run(base, paths, NullTracker())
        out[arch] = paths
    return out


def tiny(**overrides) -> Config:
    values = dict(steps=6, batch_size=16, lr=1e-3, log_every=2, save_every=2, samples_per_class=1,
                  sample_cfg_scales=[1.0, 2.0])  # fmt: skip
    return Config(**{**values, **overrides})


def paths_for(bases, tmp_path, arch, name="run") -> Paths:
    """Outputs under tmp_path, with the fixture's base checkpoint linked in as the input."""
    inputs = bases[arch]
    out = tmp_path / name
    (out / "models").mkdir(parents=True)
    (out / "models" / "base").symlink_to(Path(inputs.models) / "base")
    return dataclasses.replace(
        inputs, metrics=str(out / "metrics"), plots=str(out / "plots"), models=str(out / "models"),
        resume=str(tmp_path / "resume"),
    )  # fmt: skip


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


def train_rows(paths: Paths) -> list[dict]:
    return list(csv.DictReader(open(Path(paths.plots) / "sar" / "train.csv")))


def test_refines_a_var_and_writes_a_checkpoint_evaluate_and_cca_can_read(bases, tmp_path):
    from models.ar import ar_from_state, sample_images, tokenizer_from_state

    paths = paths_for(bases, tmp_path, "var")
    base_dir = Path(paths.models) / "base"
    base_files = folder_bytes(base_dir)
    base_state, base_config = read_checkpoint(base_dir)
    tracker = RecordingTracker()
    metrics = run(tiny(), paths, tracker)

    state, config = read_checkpoint(Path(paths.models) / "sar")
    for key in ("arch", "model", "tokenizer_fingerprint", "token_layout", "class_names", "image_size"):
        assert config[key] == base_config[key], key
    assert config["stage"] == "sar" and config["input_checkpoint"]["fingerprint"] == base_config["fingerprint"]
    assert "passthrough_of" not in config and config["stage_config"]["transitions"] == "last"
    assert any(not torch.equal(state[k], base_state[k]) for k in state), "the model moved"
    assert folder_bytes(base_dir) == base_files, "the input checkpoint is untouched"
    # monitors: per logged window in the CSV and in MLflow, finite, rates in [0, 1]
    rows = train_rows(paths)
    assert [r["step"] for r in rows] == ["2", "4", "6"] and metrics["steps"] == 6
    for name in ("tf_loss", "csfl", "sf_loss", "disagreement", "sf_agreement"):
        logged = tracker.metrics[f"train/{name}"]
        assert len(logged) == 3 and all(math.isfinite(v) for v in logged)
    assert all(0 <= float(r["disagreement"]) <= 1 and 0 <= float(r["sf_agreement"]) <= 1 for r in rows)
    last = rows[-1]
    assert float(last["loss"]) == pytest.approx(float(last["tf_loss"]) + 0.05 * float(last["csfl"]), rel=1e-4)
    assert tracker.params["sar.forced_scales"] == [2] and "samples.png" in tracker.images
    assert metrics["train_tf_loss"] == pytest.approx(float(rows[-1]["tf_loss"]), rel=1e-5)
    # loadable and sampleable like any checkpoint; cca reads it as its input
    tok_state, tok_config = read_checkpoint(paths.tokenizer)
    tokenizer = tokenizer_from_state(tok_state, tok_config)
    model = ar_from_state(state, config, tokenizer)
    assert sample_images(model, tokenizer, torch.tensor([0, 1]), cfg_scale=2.0, seed=3).shape == (2, 8, 8, 3)
    _, _, policy, reference, in_config = cca.load_models(cca.Config(input="sar"), paths)
    assert in_config["fingerprint"] == config["fingerprint"]
    assert all(torch.equal(policy.state_dict()[k], state[k]) for k in state)
    assert (Path(paths.models) / "sar" / "samples.png").is_file()
    assert not any(Path(paths.resume).rglob("checkpoint_*")), "resume state is removed after success"


def test_killed_run_resumes_to_byte_identical_weights(bases, tmp_path):
    cfg = tiny(rollout="sample", rollout_top_k=8)  # dropout, label dropout and sampled rollouts all on
    reference = paths_for(bases, tmp_path, "var", "reference")
    run(cfg, reference, NullTracker())
    shutil.rmtree(tmp_path / "resume", ignore_errors=True)
    crashed = paths_for(bases, tmp_path, "var", "crashed")

    def crash(step):
        if step == 3:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        run(cfg, crashed, NullTracker(), on_step=crash)
    assert any(Path(crashed.resume).rglob("checkpoint_000000002")), "state saved at step 2"
    run(cfg, crashed, NullTracker())
    for name in ("model.safetensors", "config.json"):
        got, want = (Path(p.models) / "sar" / name for p in (crashed, reference))
        assert got.read_bytes() == want.read_bytes()
    assert train_rows(crashed) == train_rows(reference)


@pytest.mark.parametrize("transitions", ["last", "all"])
def test_csfl_pulls_student_forced_predictions_toward_teacher_forced_ones(bases, tmp_path, transitions, monkeypatch):
    """On one fixed batch the CSFL falls, and falls further with σ = 1 than with σ = 0 (teacher
    forcing alone); the rolled-out tokens really differ from the data. (σ = 1 is far above the
    default: with every transition forced it raises the teacher-forced loss on this batch.)"""
    first_batch = sar.batch_at
    monkeypatch.setattr(sar, "batch_at", lambda cfg, tokens, labels, step: first_batch(cfg, tokens, labels, 0))
    final = {}
    for sigma in (0.0, 1.0):
        paths = paths_for(bases, tmp_path, "var", f"sigma{sigma}")
        cfg = tiny(steps=15, log_every=1, save_every=0, lr=3e-3, sigma=sigma, transitions=transitions,
                   keep_dropout=False, label_dropout=False)  # fmt: skip
        tracker = RecordingTracker()
        run(cfg, paths, tracker)
        rows = train_rows(paths)
        assert tracker.params["sar.forced_scales"] == ([2] if transitions == "last" else [1, 2])
        assert float(rows[0]["disagreement"]) > 0.2, "the tiny base is far from perfect: inputs do change"
        if sigma == 0:
            assert float(rows[-1]["tf_loss"]) < float(rows[0]["tf_loss"])
        final[sigma] = float(rows[-1]["csfl"])
        first = float(rows[0]["csfl"])
    assert final[1.0] < 0.8 * first and final[1.0] < final[0.0]
    assert float(rows[-1]["sf_agreement"]) >= float(rows[0]["sf_agreement"])


def test_guided_rollout_draws_targets_from_the_guided_logits(bases, tmp_path, monkeypatch):
    """With ``rollout_guidance`` the rolled-out tokens are drawn from (1 + t)·cond − t·uncond, the
    uncond logits from one more teacher-forced pass on the null class (no gradient)."""
    from stages import sar

    seen = []
    real = sar.guided_rollout_logits

    def spy(cond, uncond, scales, strength, schedule):
        assert schedule == "sar", "auto: the SAR trainer's ramp, t from 0.5·g to g"
        seen.append((cond.detach().clone(), uncond.detach().clone(), strength))
        return real(cond, uncond, scales, strength, schedule)

    monkeypatch.setattr(sar, "guided_rollout_logits", spy)
    guided = paths_for(bases, tmp_path, "var", "guided")
    run(tiny(steps=2, keep_dropout=False, rollout="sample", rollout_guidance=1.2), guided, NullTracker())
    assert len(seen) == 2 and all(strength == 1.2 for *_, strength in seen)
    cond, uncond, _ = seen[0]
    assert cond.shape == uncond.shape and not torch.equal(cond, uncond), "the null class gives other logits"
    plain = paths_for(bases, tmp_path, "var", "plain")
    run(tiny(steps=2, keep_dropout=False, rollout="sample"), plain, NullTracker())
    assert len(seen) == 2, "no guidance, no extra pass"
    assert weights_differ(Path(guided.models) / "sar", Path(plain.models) / "sar")


def weights_differ(a: Path, b: Path) -> bool:
    return (a / "model.safetensors").read_bytes() != (b / "model.safetensors").read_bytes()


def test_gpt_checkpoint_passes_through_unchanged_and_records_why(bases, tmp_path):
    paths = paths_for(bases, tmp_path, "gpt")
    base_state, base_config = read_checkpoint(Path(paths.models) / "base")
    tracker = RecordingTracker()
    metrics = run(tiny(), paths, tracker)
    state, config = read_checkpoint(Path(paths.models) / "sar")
    assert state.keys() == base_state.keys() and all(torch.equal(state[k], base_state[k]) for k in state)
    assert config["passthrough_of"] == "base" and "gpt" in config["skipped"] and config["stage"] == "sar"
    assert config["input_checkpoint"]["fingerprint"] == base_config["fingerprint"]
    assert {k: config[k] for k in ("arch", "model", "tokenizer_fingerprint")} == {
        k: base_config[k] for k in ("arch", "model", "tokenizer_fingerprint")
    }
    assert metrics["skipped"] == config["skipped"] and metrics["steps"] == 0
    assert tracker.tags["arpipe.sar.skipped"] == config["skipped"] == tracker.params["sar.skipped"]
    assert train_rows(paths) == [] and (Path(paths.models) / "sar" / "samples.png").is_file()
    _, _, policy, _, _ = cca.load_models(cca.Config(input="sar"), paths)  # cca continues from it
    assert policy.config_dict() == base_config["model"]
    json.dumps(metrics)  # metrics/sar.json stays plain JSON


def test_config_refusals():
    with pytest.raises(ValueError, match="sigma"):
        Config(sigma=-0.1)
    with pytest.raises(ValueError, match="rollout_guidance"):
        Config(rollout_guidance=-1.0)
    with pytest.raises(ValueError, match="rollout_top_p"):
        Config(rollout_top_p=0.0)
    from core.config import ConfigError, load_section

    with pytest.raises(ConfigError, match="sar.transitions"):
        load_section({"sar": {"transitions": "some"}}, "sar", Config)


@pytest.mark.slow
def test_two_cpu_ranks_match_one_rank_at_the_same_global_batch(bases, tmp_path):
    """Under ``launcher: accelerate/cpu-2proc.yaml`` (two gloo ranks, DDP) the student-forced pass,
    run on the bare module, still has its gradients averaged: with dropout off the weights match a
    one-process run at the same global batch."""
    from helpers import run_stage_under_two_cpu_ranks

    cfg = tiny(save_every=3, keep_dropout=False, sigma=0.5)
    one = paths_for(bases, tmp_path, "var", "one")
    run(cfg, one, NullTracker())

    two = paths_for(bases, tmp_path, "var", "two")
    config = {**dataclasses.asdict(cfg), "betas": list(cfg.betas)}
    result = run_stage_under_two_cpu_ranks("sar", config, two, tmp_path / "project")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "relaunching under" in result.stdout
    state_one, _ = read_checkpoint(Path(one.models) / "sar")
    state_two, _ = read_checkpoint(Path(two.models) / "sar")
    assert any(not torch.equal(state_one[k], read_checkpoint(Path(one.models) / "base")[0][k]) for k in state_one)
    for key in state_one:
        torch.testing.assert_close(state_two[key], state_one[key], rtol=1e-4, atol=1e-5)


def test_first_losses_match_the_golden_file(bases, tmp_path):
    paths = paths_for(bases, tmp_path, "var")
    run(tiny(steps=8, log_every=1, save_every=0), paths, NullTracker())
    check_golden_losses("sar/var", [float(r["loss"]) for r in train_rows(paths)])
