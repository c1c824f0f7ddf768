"""The evaluate stage and the registry: side-by-side metrics, bounds, the champion gate, the pyfunc."""

import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import TINY_TOKENIZERS
from inception_weights import needs_torch_fidelity

from core.config import Paths
from core.registry import champion_decision, register_and_gate
from core.tracking import NullTracker
from stages import evaluate
from stages.evaluate import Config, run

INTERVAL = ("fid_lo", "fid_hi")


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """shard (8 px) -> tiny vq tokenizer -> token cache -> tiny GPT -> evalnet, built once (read-only)."""
    from stages import cache_tokens, pretrain, shard, train_evalnet, train_tokenizer

    root = tmp_path_factory.mktemp("eval-chain")
    paths = Paths(
        shards=str(root / "shards"),
        metrics=str(root / "metrics"),
        plots=str(root / "plots"),
        tokenizer=str(root / "tokenizer"),
        tokens=str(root / "tokens"),
        models=str(root / "models"),
        evalnet=str(root / "evalnet"),
        eval=str(root / "eval"),
        resume=str(root / "resume"),
        last_run=str(root / "last_run"),
    )
    shard.run(shard.Config(image_size=8, num_workers=0), paths, NullTracker())
    tok = train_tokenizer.Config(
        kind="vq", model=TINY_TOKENIZERS["vq"], steps=4, batch_size=16, save_every=0, num_grid=2
    )
    train_tokenizer.run(tok, paths, NullTracker())
    cache_tokens.run(cache_tokens.Config(hflip=True), paths, NullTracker())
    model = {"depth": 2, "width": 32, "heads": 2}
    pre = pretrain.Config(
        model=model, steps=30, batch_size=32, lr=3e-3, warmup_steps=3, save_every=0, samples_per_class=1
    )
    pretrain.run(pre, paths, NullTracker())
    train_evalnet.run(train_evalnet.Config(steps=60, save_every=0), paths, NullTracker())
    return paths


def tiny(**overrides) -> Config:
    return Config(
        **{"samples_per_class": 6, "cfg_scales": [1.0, 2.0], "batch_size": 32, "grid_per_class": 1, **overrides}
    )


def test_scores_every_checkpoint_and_the_bounds_side_by_side(chain, tmp_path):
    paths = dataclasses.replace(
        chain, eval=str(tmp_path / "eval"), metrics=str(tmp_path / "metrics"), last_run=str(tmp_path / "last_run")
    )
    metrics = run(tiny(register=False), paths, NullTracker())
    assert set(metrics) == {"reconstruction", "train", "base", "best_value"}
    assert set(metrics["base"]) == {"cfg1", "cfg2"}
    for block in (metrics["base"]["cfg1"], metrics["base"]["cfg2"], metrics["train"]["real"]):
        assert set(block) == {*evaluate.METRICS, *INTERVAL}
        assert block["fid"] >= 0 and 0 <= block["precision"] <= 1 and 0 <= block["recall"] <= 1
        assert 1 <= block["is"] <= 10 + 1e-6 and 0 <= block["class_acc"] <= 1
        assert 0 <= block["fid_lo"] < block["fid"] < block["fid_hi"]  # the bootstrap interval brackets FID
    # real train images are closer to val than a 30-step model's samples: the floor frames the numbers
    assert metrics["train"]["real"]["fid"] < metrics["base"]["cfg1"]["fid"]
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "| **base** | cfg1 |" in report and "through the tokenizer (ceiling)" in report
    assert "proxy space" in report
    cfg1 = metrics["base"]["cfg1"]
    assert f"| **base** | cfg1 | {cfg1['fid']:.3f} [{cfg1['fid_lo']:.2f}, {cfg1['fid_hi']:.2f}] |" in report
    # one checkpoint: the noise sentence names it as the lowest, and nothing within noise of it
    assert f"FID at cfg1 with 90% bootstrap intervals: base {cfg1['fid']:.3f} [" in report
    assert "within noise of it" not in report
    assert not (tmp_path / "metrics" / "evaluate_speed.json").exists()  # timings: not a tracked metric
    speed = json.loads((tmp_path / "last_run" / "evaluate_speed.json").read_text())
    assert speed["base"]["steps_per_image"] == 16 and speed["base"]["cfg1_images_per_s"] > 0
    from PIL import Image

    from core.images import image_grid

    grid = np.asarray(Image.open(tmp_path / "eval" / "grid.png").convert("RGB"))
    bare = image_grid(np.zeros((3 * 10, 8, 8, 3), np.uint8), 10)  # rows val, base cfg1, base cfg2; 10 classes
    top, left = grid.shape[0] - bare.shape[0], grid.shape[1] - bare.shape[1]
    assert top > 0 and left > 0
    assert (grid[top:, :left] < 128).any(), "row labels (checkpoint and guidance) left of the rows"
    assert (grid[:top, left:] < 128).any(), "class names above the columns"
    # deterministic: the same report and metrics again
    again = dataclasses.replace(paths, eval=str(tmp_path / "again"))
    assert run(tiny(register=False), again, NullTracker()) == metrics
    assert (tmp_path / "again" / "report.md").read_text() == report
    assert (tmp_path / "again" / "grid.png").read_bytes() == (tmp_path / "eval" / "grid.png").read_bytes()


def test_a_pass_through_checkpoint_is_named_in_the_report_but_not_evaluated(chain, tmp_path):
    """sar on a gpt base copies it unchanged: sampling it again would list the same model twice."""
    from stages import sar

    models = tmp_path / "models"
    models.mkdir()
    (models / "base").symlink_to(Path(chain.models) / "base")
    paths = dataclasses.replace(chain, models=str(models), eval=str(tmp_path / "eval"),
                                metrics=str(tmp_path / "metrics"), plots=str(tmp_path / "plots"))  # fmt: skip
    sar.run(sar.Config(), paths, NullTracker())
    assert json.loads((models / "sar" / "config.json").read_text())["passthrough_of"] == "base"
    metrics = run(tiny(register=False, cfg_scales=[1.0]), paths, NullTracker())
    assert "sar" not in metrics and "base" in metrics
    report = (tmp_path / "eval" / "report.md").read_text()
    lines = [line for line in report.splitlines() if "`sar`" in line]
    assert len(lines) == 1 and lines[0].startswith("Not evaluated: `sar`, a pass-through of `base`")
    assert "| sar |" not in report


def test_select_guidance_must_be_evaluated():
    with pytest.raises(ValueError, match="select_guidance 4.0 is not among cfg_scales"):
        Config(cfg_scales=[1.0, 2.0], select_guidance=4.0)


def test_fid_resamples_is_zero_or_at_least_two():
    with pytest.raises(ValueError, match="fid_resamples must be 0 .no intervals. or >= 2, got 1"):
        Config(fid_resamples=1)


@pytest.mark.parametrize(
    "candidate, champion, higher, promote",
    [
        (5.0, None, False, True),
        (4.0, 5.0, False, True),
        (6.0, 5.0, False, False),
        (5.0, 5.0, False, False),
        (0.9, 0.8, True, True),
        (0.7, 0.8, True, False),
    ],
)
def test_champion_gate_decision(candidate, champion, higher, promote):
    assert champion_decision(candidate, champion, higher)[0] is promote


def test_registry_sets_candidate_always_and_moves_champion_only_when_better(mlflow_store, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_store)
    # an explicit artifact folder: MLflow's default is ./mlruns in the cwd, i.e. the checkout
    experiment = client.create_experiment("reg", artifact_location=(tmp_path / "artifacts").as_uri())
    versions = {}
    for value in (10.0, 12.0, 8.0):
        run_id = client.create_run(experiment).info.run_id
        client.log_text(run_id, "x", "model/MLmodel")
        versions[value], decision = register_and_gate(
            client,
            name="arpipe-test",
            source=f"runs:/{run_id}/model",
            run_id=run_id,
            metric="fid@cfg1",
            value=value,
            higher_is_better=False,
        )
        champion = str(client.get_model_version_by_alias("arpipe-test", "champion").version)
        candidate = str(client.get_model_version_by_alias("arpipe-test", "candidate").version)
        assert candidate == versions[value]
        if value == 10.0:
            assert decision.promote and decision.reason == "no champion yet" and champion == versions[10.0]
        if value == 12.0:
            assert not decision.promote and decision.champion_value == 10.0 and champion == versions[10.0]
        if value == 8.0:
            assert decision.promote and decision.champion_value == 10.0 and champion == versions[8.0]


@pytest.mark.slow
def test_registered_champion_loads_as_pyfunc_and_samples_offline(chain, tmp_path, mlflow_store, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    from core.tracking import stage_run

    paths = dataclasses.replace(
        chain, eval=str(tmp_path / "eval"), metrics=str(tmp_path / "metrics"), last_run=str(tmp_path / "last_run")
    )
    with stage_run("evaluate") as tracker:
        run(tiny(), paths, tracker)
    record = json.loads((tmp_path / "last_run" / "evaluate_registry.json").read_text())
    assert record["model"] == "arpipe-gpt" and record["version"] == "1" and record["champion_moved"] is True
    assert record["champion_version"] == "1" and record["previous_champion_version"] is None
    client = MlflowClient(mlflow_store)
    version = client.get_model_version_by_alias("arpipe-gpt", "champion")
    assert version.tags["arpipe.checkpoint"] == "base"
    tags = client.get_run(tracker.run_id).data.tags
    assert tags["arpipe.registry.champion_moved"] == "True" and tags["arpipe.registry.decision"] == "no champion yet"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = mlflow.pyfunc.load_model("models:/arpipe-gpt@champion")
    assert not [w for w in caught if "type hints" in str(w.message)], [str(w.message) for w in caught]
    signature = model.metadata.signature  # what the MLflow UI shows under the model's schema
    assert signature.inputs.to_dict() == [
        {"type": "any", "name": "label", "required": True},
        {"type": "double", "name": "cfg_scale", "required": False},
        {"type": "long", "name": "seed", "required": False},
    ]
    assert signature.outputs.to_dict() == [
        {"type": "tensor", "tensor-spec": {"dtype": "uint8", "shape": (-1, 8, 8, 3)}}
    ]
    example = model.input_example  # logged beside the signature; the model samples it as sent
    assert list(example.columns) == ["label", "cfg_scale", "seed"]
    assert model.predict(example).shape == (len(example), 8, 8, 3)
    images = model.predict(pd.DataFrame({"label": [0, "1", 2], "cfg_scale": [1.0, 2.0, 2.0], "seed": [0, 0, 1]}))
    assert images.shape == (3, 8, 8, 3) and images.dtype == np.uint8
    again = model.predict(pd.DataFrame({"label": [0], "cfg_scale": [1.0], "seed": [0]}))
    np.testing.assert_array_equal(again[0], images[0])  # same seed, same image
    with pytest.raises(ValueError, match="unknown class 'zebra'"):
        model.predict(pd.DataFrame({"label": ["zebra"]}))
    assert Path(paths.eval, "report.md").is_file()


def test_arpipe_sample_writes_one_row_per_class_and_refuses_unknown_classes(chain, tmp_path, monkeypatch):
    import torch
    from click.testing import CliRunner
    from PIL import Image
    from torch._dynamo.testing import CompileCounter

    import models.gpt as gpt_module
    from arpipe.cli import cli

    out = tmp_path / "grid.png"
    base = str(Path(chain.models) / "base")
    args = ["sample", "--checkpoint", base, "--tokenizer", chain.tokenizer, "--classes", "3,7", "--n", "4"]
    result = CliRunner().invoke(cli, [*args, "--cfg-scale", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "8 samples (4 per class: 3, 7)" in result.output
    width, height = Image.open(out).size
    assert width > height > 0  # 2 rows of 4 cells
    bad = CliRunner().invoke(cli, [*args[:-4], "--classes", "3,zebra", "--out", str(out)])
    assert bad.exit_code != 0 and "unknown class 'zebra'" in bad.output
    # --compile draws the same images through compiled steps (traced here, not code-generated)
    counter, real_compile = CompileCounter(), torch.compile
    monkeypatch.setattr(gpt_module.torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": counter}))
    monkeypatch.setattr(gpt_module, "_COMPILED_STEPS", {})
    torch._dynamo.reset()
    compiled = tmp_path / "compiled.png"
    result = CliRunner().invoke(cli, [*args, "--cfg-scale", "2", "--compile", "--out", str(compiled)])
    assert result.exit_code == 0, result.output
    assert counter.frame_count >= 1 and compiled.read_bytes() == out.read_bytes()


# -- Inception feature space (torch-fidelity) ----------------------------------------------------


@pytest.fixture(scope="module")
def small_chain(chain, tmp_path_factory):
    """The chain with shards cut to 4 images per class (about 2 train + 2 val): Inception embeds
    every image at 299 x 299, ~0.1 s each on one CPU core."""
    from PIL import Image

    from core.shards import load_split
    from stages import shard

    root = tmp_path_factory.mktemp("small-chain")
    class_names = json.loads(Path(chain.shards, "classes.json").read_text())
    for split in ("train", "val"):
        data = load_split(chain.shards, split)
        for label, class_name in enumerate(class_names):
            for i, image in enumerate(data.images_NHWC[data.labels_N == label][:2]):
                (root / "images" / class_name).mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(root / "images" / class_name / f"{split}-{i}.png")
    paths = dataclasses.replace(chain, shards=str(root / "shards"), metrics=str(root / "metrics"))
    source = {"source": "imagefolder", "source_path": str(root / "images")}
    shard.run(shard.Config(**source, image_size=8, val_fraction=0.5, num_workers=0), paths, NullTracker())
    return paths


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    from inception_weights import write_random_inception_weights

    return write_random_inception_weights(tmp_path_factory.mktemp("inception") / "inception-test.pth")


@pytest.fixture
def no_network(monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@needs_torch_fidelity
def test_inception_weights_add_inception_space_metrics_and_the_report_names_each_space(
    small_chain, inception_weights, tmp_path, no_network
):
    from core.metrics import flatten_metrics

    def evaluate_into(name: str, **overrides) -> dict:
        paths = dataclasses.replace(small_chain, eval=str(tmp_path / name), metrics=str(tmp_path / name))
        return run(tiny(samples_per_class=1, cfg_scales=[1.0], register=False, **overrides), paths, NullTracker())

    metrics = evaluate_into("inception", inception_weights=str(inception_weights), select_metric="inception_fid")
    for block in (metrics["reconstruction"]["real"], metrics["train"]["real"], metrics["base"]["cfg1"]):
        assert set(block) == {*evaluate.METRICS, *evaluate.INCEPTION_METRICS, *INTERVAL, "inception_fid_lo",
                              "inception_fid_hi"}  # fmt: skip
        assert block["inception_fid"] >= 0 and 1 <= block["inception_is"] <= 1008 + 1e-6
        assert 0 <= block["inception_precision"] <= 1 and 0 <= block["inception_recall"] <= 1
    assert metrics["base"]["cfg1"]["inception_fid"] != metrics["base"]["cfg1"]["fid"]  # another space
    assert "base/cfg1/inception_fid" in flatten_metrics(metrics) and "base/cfg1/fid" in flatten_metrics(metrics)
    assert metrics["best_value"] == metrics["base"]["cfg1"]["inception_fid"]
    # the evalnet (proxy) numbers are the same with or without the Inception space
    proxy_only = evaluate_into("proxy")
    for name, guidance in (("train", "real"), ("base", "cfg1")):
        assert proxy_only[name][guidance] == {k: metrics[name][guidance][k] for k in (*evaluate.METRICS, *INTERVAL)}
    report = (tmp_path / "inception" / "report.md").read_text()
    proxy, inception = report.split("## Feature space: Inception (torch-fidelity InceptionV3)")
    assert "## Feature space: evalnet (proxy)" in proxy and "class acc" in proxy
    assert "`inception-test.pth`, sha256 " in inception
    assert "| checkpoint | guidance | FID ↓ | IS ↑ | precision ↑ | recall ↑ |\n" in inception  # no class accuracy
    block = metrics["base"]["cfg1"]
    inception_row = (
        f"| {block['inception_fid']:.3f} [{block['inception_fid_lo']:.2f}, {block['inception_fid_hi']:.2f}] |"
    )
    assert "| **base** | cfg1 " + inception_row in inception
    # selected in Inception space: the noise sentence reads the Inception FIDs
    assert f"Inception FID at cfg1 with 90% bootstrap intervals: base {block['inception_fid']:.3f} [" in inception
    assert "Feature space: Inception" not in (tmp_path / "proxy" / "report.md").read_text()


@needs_torch_fidelity
def test_missing_or_corrupt_inception_weights_fail_before_any_sampling(small_chain, tmp_path, no_network):
    paths = dataclasses.replace(small_chain, eval=str(tmp_path / "eval"), metrics=str(tmp_path / "metrics"))
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=f"evaluate.inception_weights: Inception weights {missing} not found"):
        run(tiny(register=False, inception_weights=str(missing)), paths, NullTracker())
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x00" * 1000)
    with pytest.raises(ValueError, match=f"evaluate.inception_weights: Inception weights {corrupt} are not a readable"):
        run(tiny(register=False, inception_weights=str(corrupt)), paths, NullTracker())
    assert not (tmp_path / "eval").exists()


def test_inception_metrics_need_inception_weights():
    with pytest.raises(ValueError, match="select_metric inception_fid needs inception_weights"):
        Config(select_metric="inception_fid")


def test_the_distilled_student_is_scored_at_one_and_two_steps_against_its_teacher(chain, tmp_path, monkeypatch):
    """One loop for every checkpoint: the student and its AR teacher are both sampled through the
    sampler interface (models/samplers.py), each in its own modes."""
    from models import samplers
    from stages import distill, distill_pairs

    sampled = []

    class Recorded:
        """A sampler that notes each ``sample`` call: (its kind, the mode)."""

        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def sample(self, labels_N, mode, **kwargs):
            sampled.append((type(self.inner).__name__, mode))
            return self.inner.sample(labels_N, mode, **kwargs)

    monkeypatch.setattr(evaluate, "sampler_from_state", lambda *args: Recorded(samplers.sampler_from_state(*args)))

    models = tmp_path / "models"
    models.mkdir()
    (models / "base").symlink_to(Path(chain.models) / "base")
    outs = {name: str(tmp_path / name) for name in ("distill", "eval", "metrics", "plots", "resume", "last_run")}
    paths = dataclasses.replace(chain, models=str(models), **outs)
    pairs = distill_pairs.Config(teacher="base", count=64, batch_size=32, cfg_scale=2.0, ode_steps=8, t_min=0.02)
    distill_pairs.run(pairs, paths, NullTracker())
    distill.run(distill.Config(steps=4, batch_size=16, warmup_steps=1, val_count=8, save_every=0, samples_per_class=1),
                paths, NullTracker())  # fmt: skip
    metrics = run(tiny(register=False), paths, NullTracker())
    assert sampled == [("ARSampler", "cfg1"), ("ARSampler", "cfg2"), ("StudentSampler", "1step"),
                       ("StudentSampler", "2step")]  # fmt: skip
    assert set(metrics["distilled"]) == {"1step", "2step"}
    for block in metrics["distilled"].values():
        assert set(block) == {*evaluate.METRICS, *INTERVAL, "fid_vs_teacher"}
        assert block["fid_vs_teacher"] == pytest.approx(block["fid"] / metrics["base"]["cfg2"]["fid"])
    speed = json.loads((tmp_path / "last_run" / "evaluate_speed.json").read_text())["distilled"]
    assert speed["1step_steps_per_image"] == 1 and speed["2step_steps_per_image"] == 2
    assert speed["1step_step_reduction"] == 16 and speed["2step_step_reduction"] == 8
    assert speed["1step_speedup"] > 0 and speed["2step_speedup"] > 0
    teacher_ms = json.loads((tmp_path / "last_run" / "evaluate_speed.json").read_text())["base"]["cfg2_token_ms_b1"]
    for mode in ("1step", "2step"):  # latency: one image's tokens at a time, against the teacher at its guidance
        assert speed[f"{mode}_latency_speedup"] == pytest.approx(teacher_ms / speed[f"{mode}_token_ms_b1"])
    assert metrics["best_value"] == metrics["base"]["cfg1"]["fid"], "the champion is chosen among AR checkpoints"
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "| distilled | 1step |" in report and "| distilled | 2step |" in report
    assert "Distilled student against its teacher" in report and "| 1step |" in report


@needs_torch_fidelity
def test_a_reference_batch_adds_the_papers_fid_against_its_statistics_or_its_images(
    small_chain, inception_weights, tmp_path, no_network
):
    """ADM's reference batches carry mu/sigma (or only arr_0): with the val images as the reference
    batch, FID against it is the Inception FID against val; a batch with both carries its statistics
    (as in ADM's evaluator), which evaluate then uses as they are."""
    import numpy as np

    from core.reference_batch import read_reference_batch
    from core.shards import load_split

    val = load_split(small_chain.shards, "val").images_NHWC
    np.savez(tmp_path / "images.npz", arr_0=val)
    paths = dataclasses.replace(small_chain, eval=str(tmp_path / "eval"), metrics=str(tmp_path / "metrics"))
    cfg = tiny(samples_per_class=1, cfg_scales=[1.0], register=False, inception_weights=str(inception_weights),
               reference_batch=str(tmp_path / "images.npz"))  # fmt: skip
    block = run(cfg, paths, NullTracker())["base"]["cfg1"]
    assert block["inception_fid_ref"] == pytest.approx(block["inception_fid"], rel=1e-6, abs=1e-6)
    assert "FID vs ref ↓" in (tmp_path / "eval" / "report.md").read_text()

    mu, sigma = np.arange(3.0), np.eye(3)
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma, arr_0=val[:2])
    batch = read_reference_batch(tmp_path / "stats.npz")
    assert set(batch) == {"mu", "sigma"} and (batch["mu"] == mu).all() and (batch["sigma"] == sigma).all()


def test_a_reference_batch_needs_inception_weights_and_a_readable_file(small_chain, tmp_path):
    from core.config import ConfigError, from_dict
    from core.reference_batch import ReferenceBatchError, read_reference_batch

    with pytest.raises(ConfigError, match="reference_batch needs inception_weights"):
        from_dict(evaluate.Config, {"reference_batch": "ref.npz"}, prefix="evaluate")
    with pytest.raises(ReferenceBatchError, match="nope.npz: no such reference batch"):
        read_reference_batch(tmp_path / "nope.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ReferenceBatchError, match="text.npz: not a readable .npz"):
        read_reference_batch(tmp_path / "text.npz")
    import numpy as np

    np.savez(tmp_path / "other.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(
        ReferenceBatchError, match=r"other.npz: holds \['images'\], neither 'mu' \+ 'sigma' nor 'arr_0'"
    ):
        read_reference_batch(tmp_path / "other.npz")


def test_the_dd2_generator_is_scored_at_one_step_with_the_gap_closed_vs_dd1(chain, tmp_path):
    from stages import distill, distill2, distill_pairs

    models = tmp_path / "models"
    models.mkdir()
    (models / "base").symlink_to(Path(chain.models) / "base")
    outs = {name: str(tmp_path / name) for name in ("distill", "eval", "metrics", "plots", "resume", "last_run")}
    paths = dataclasses.replace(chain, models=str(models), **outs)
    pairs = distill_pairs.Config(teacher="base", count=32, batch_size=32, cfg_scale=2.0, ode_steps=8, t_min=0.02)
    distill_pairs.run(pairs, paths, NullTracker())
    distill.run(distill.Config(steps=2, batch_size=16, warmup_steps=1, val_count=8, save_every=0, samples_per_class=1),
                paths, NullTracker())  # fmt: skip
    distill2.run(distill2.Config(gts_steps=2, steps=2, batch_size=8, head_width=16, head_depth=1, eval_count=8,
                                 save_every=0, samples_per_class=1, warmup_steps=1), paths, NullTracker())  # fmt: skip
    metrics = run(tiny(register=False), paths, NullTracker())
    assert set(metrics["distilled2"]) == {"1step"}, "a DD2 generator samples in one step only"
    block, dd1 = metrics["distilled2"]["1step"], metrics["distilled"]["1step"]
    teacher_fid = metrics["base"]["cfg2"]["fid"]
    if dd1["fid"] > teacher_fid:  # the ratio exists only where DD1 left a gap to its teacher
        assert set(block) == {*evaluate.METRICS, *INTERVAL, "fid_vs_teacher", "gap_closed_vs_dd1"}
        assert block["gap_closed_vs_dd1"] == pytest.approx((dd1["fid"] - block["fid"]) / (dd1["fid"] - teacher_fid))
    else:
        assert set(block) == {*evaluate.METRICS, *INTERVAL, "fid_vs_teacher"}
    speed = json.loads((tmp_path / "last_run" / "evaluate_speed.json").read_text())["distilled2"]
    assert speed["1step_step_reduction"] == 16 and speed["1step_latency_speedup"] > 0
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "| distilled2 | 1step |" in report and "gap closed vs DD1" in report


def test_the_gap_closed_vs_dd1_is_left_out_when_dd1_is_not_above_its_teacher():
    """``(FID_DD1 − FID_DD2) / (FID_DD1 − FID_teacher)`` divides by DD1's gap to the teacher: when DD1
    already scores at or below the teacher there is nothing to close, and a ratio would mislead."""
    teacher = {"name": "base", "fingerprint": "f", "cfg_scale": 1.0}
    teachers = {evaluate.DISTILLED: teacher, evaluate.DISTILLED2: dict(teacher)}

    def results(fid_dd1):
        return {"base": {"cfg1": {"fid": 4.0}}, evaluate.DISTILLED: {"1step": {"fid": fid_dd1}},
                evaluate.DISTILLED2: {"1step": {"fid": 5.0}}}  # fmt: skip

    behind = results(6.0)
    evaluate._gap_closed(behind, teachers)
    assert behind[evaluate.DISTILLED2]["1step"]["gap_closed_vs_dd1"] == pytest.approx(0.5)  # (6 - 5) / (6 - 4)
    for fid_dd1 in (4.0, 3.5):  # level with the teacher, or below it
        ahead = results(fid_dd1)
        evaluate._gap_closed(ahead, teachers)
        assert "gap_closed_vs_dd1" not in ahead[evaluate.DISTILLED2]["1step"]
