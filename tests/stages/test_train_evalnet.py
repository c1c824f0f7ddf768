"""The train_evalnet stage on 8x8 digits: it learns, its outs reload, reproduce and resume exactly."""

import pytest
import torch
from safetensors.torch import load_file

from core.checkpoint import read_checkpoint
from core.config import ConfigError, Paths, from_dict
from core.shards import load_split
from core.tracking import NullTracker
from core.training import NonFiniteLossError
from models.evalnet import build_evalnet, embed_images
from models.metrics import class_accuracy
from stages import shard, train_evalnet
from stages.train_evalnet import Config, batch_at, run, translate

# A short run of the default network on 8x8 digits (10 classes, chance 0.1) measured 0.855 val
# accuracy in about a second; the bound leaves room for thread-count rounding differences.
SHORT_RUN_MIN_ACCURACY = 0.80


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """8x8 digit shards, shared read-only by every test here."""
    root = tmp_path_factory.mktemp("evalnet-shards")
    paths = Paths(shards=str(root / "shards"), metrics=str(root / "metrics"))
    shard.run(shard.Config(image_size=8, num_workers=0), paths, NullTracker())
    return root / "shards"


def tiny(**overrides) -> Config:
    values = dict(model={"channels": [8, 16], "feature_dim": 16}, steps=8, batch_size=16, log_every=2, eval_every=3)
    return Config(**{**values, "save_every": 2, **overrides})


def paths_for(tmp_path, shards, name="run") -> Paths:
    out = tmp_path / name
    return Paths(
        shards=str(shards),
        metrics=str(out / "metrics"),
        evalnet=str(out / "evalnet"),
        resume=str(tmp_path / "resume"),
    )


class RecordingTracker(NullTracker):
    def __init__(self):
        self.metrics: dict[str, list[tuple[int | None, float]]] = {}

    def log_metrics(self, metrics, step=None):
        for key, value in metrics.items():
            self.metrics.setdefault(key, []).append((step, value))


def test_short_run_learns_and_the_checkpoint_reloads_into_the_same_model(tmp_path, shards):
    paths = paths_for(tmp_path, shards)
    tracker = RecordingTracker()
    cfg = Config(steps=60, batch_size=32, log_every=10, eval_every=30, save_every=0)
    metrics = run(cfg, paths, tracker)
    assert metrics["steps"] == 60 and metrics["val_accuracy"] >= SHORT_RUN_MIN_ACCURACY
    assert [step for step, _ in tracker.metrics["train/loss"]] == [10, 20, 30, 40, 50, 60]
    assert [step for step, _ in tracker.metrics["val/accuracy"]] == [30, 60]

    state_dict, config = read_checkpoint(paths.evalnet)
    assert config["image_size"] == 8 and len(config["class_names"]) == 10 and config["feature_dim"] == 128
    assert config["val_accuracy"] == metrics["val_accuracy"] and config["stage_config"]["steps"] == 60
    model = build_evalnet(config["model"])
    model.load_state_dict(state_dict)
    val = load_split(shards, "val")
    features_ND, logits_NC = embed_images(model, val.images_NHWC)
    assert features_ND.shape == (len(val), 128) and logits_NC.shape == (len(val), 10)
    assert class_accuracy(logits_NC, val.labels_N) == metrics["val_accuracy"]


def test_its_mlflow_run_has_one_name_per_metric(tmp_path, shards, mlflow_store):
    """The final val accuracy is the last point of the `val/accuracy` curve, not a second metric
    `val_accuracy` (metrics/train_evalnet.json keeps DVC's name)."""
    from mlflow import MlflowClient

    from core.tracking import stage_run

    with stage_run("train_evalnet") as tracker:
        metrics = run(tiny(save_every=0), paths_for(tmp_path, shards), tracker)
    client = MlflowClient(mlflow_store)
    logged = client.get_run(tracker.run_id).data.metrics
    assert not [name for name in logged if name.startswith(("train_", "val_"))], sorted(logged)
    assert logged["val/accuracy"] == metrics["val_accuracy"] and logged["val/loss"] == metrics["val_loss"]
    history = client.get_metric_history(tracker.run_id, "val/accuracy")
    assert [point.step for point in history] == [3, 6, 8]  # eval_every 3, then the final one once
    assert logged["steps"] == 8 and "train/loss" in logged


def test_same_seed_gives_byte_identical_outs(tmp_path, shards):
    first, second = paths_for(tmp_path, shards, "a"), paths_for(tmp_path, shards, "b")
    assert run(tiny(), first, NullTracker()) == run(tiny(), second, NullTracker())
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "a" / "evalnet" / name).read_bytes() == (tmp_path / "b" / "evalnet" / name).read_bytes()


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, shards):
    cfg = tiny(steps=8, save_every=3)
    straight = paths_for(tmp_path, shards, "straight")
    expected = run(cfg, straight, NullTracker())

    def crash(step):
        if step == 4:  # state saved at step 3; step 4 is lost and redone
            raise KeyboardInterrupt

    resumed = paths_for(tmp_path, shards, "resumed")
    with pytest.raises(KeyboardInterrupt):
        run(cfg, resumed, NullTracker(), on_step=crash)
    assert list((tmp_path / "resume" / "train_evalnet").glob("*/checkpoint_000000003"))
    assert run(cfg, resumed, NullTracker()) == expected
    a = load_file(tmp_path / "straight" / "evalnet" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "evalnet" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list((tmp_path / "resume" / "train_evalnet").glob("*/checkpoint_*"))


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_state(tmp_path, shards, monkeypatch):
    real = train_evalnet.classification_loss
    calls = []

    def poisoned(logits, labels):
        calls.append(1)
        loss = real(logits, labels)
        return loss * float("nan") if len(calls) == 5 else loss

    monkeypatch.setattr(train_evalnet, "classification_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"step 4 .*checkpoint_000000004"):
        run(tiny(save_every=2), paths_for(tmp_path, shards), NullTracker())
    assert list((tmp_path / "resume" / "train_evalnet").glob("*/checkpoint_000000004/state.json"))
    assert not (tmp_path / "run" / "evalnet").exists()


def test_config_is_strict_and_data_fixed_keys_come_from_the_shards():
    with pytest.raises(ConfigError, match="feature_dims"):
        from_dict(Config, {"model": {"feature_dims": 3}}, prefix="train_evalnet")
    with pytest.raises(ConfigError, match="model.num_classes is set from the shards"):
        from_dict(Config, {"model": {"num_classes": 3}}, prefix="train_evalnet")
    with pytest.raises(ConfigError, match="max_shift"):
        from_dict(Config, {"max_shift": -1}, prefix="train_evalnet")


def test_translation_moves_content_by_the_offset_and_batches_are_a_function_of_the_step():
    x = torch.full((1, 3, 8, 8), -1.0)
    x[0, :, 3, 3] = 1.0
    moved = translate(x, torch.tensor([[0, 2]]), pad=1)  # row offset 0: down 1; col offset 2: left 1
    assert moved.shape == x.shape and (moved[0, 0] > 0).nonzero().tolist() == [[4, 2]]
    assert torch.equal(translate(x, torch.tensor([[1, 1]]), pad=1), x)  # offset = pad: identity

    images = torch.rand(40, 3, 8, 8) * 2 - 1
    labels = torch.arange(40)
    cfg = Config(batch_size=16, max_shift=2, seed=3)
    a_x, a_y = batch_at(cfg, images, labels, step=5)
    b_x, b_y = batch_at(cfg, images, labels, step=5)
    assert torch.equal(a_x, b_x) and torch.equal(a_y, b_y) and a_x.shape == (16, 3, 8, 8)
    unshifted, same_labels = batch_at(Config(batch_size=16, max_shift=0, seed=3), images, labels, step=5)
    assert torch.equal(same_labels, a_y) and torch.equal(unshifted, images[a_y])  # labels follow their images
