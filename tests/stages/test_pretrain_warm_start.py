"""pretrain.init_from: champion: init_model fetches the MLflow registry's champion into
paths.models/init (a DVC out), pretrain warm-starts from that folder; the refusals of both."""

import csv
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from helpers import REPO

from core.checkpoint import read_checkpoint
from core.registry import WarmStartError, log_pyfunc, register_and_gate
from core.tracking import NullTracker
from stages import init_model
from stages.pretrain import Config, batch_at, token_loss
from stages.pretrain import run as pretrain

# no dropout, so the step-0 loss is a function of the weights and the batch alone
MODEL = {"depth": 2, "width": 32, "heads": 2, "token_dropout": 0.0, "resid_dropout": 0.0, "ffn_dropout": 0.0}


def tiny(**overrides) -> Config:
    values = dict(model=dict(MODEL), steps=2, batch_size=16, warmup_steps=1, log_every=1, eval_every=2,
                  save_every=0, samples_per_class=1, sample_cfg_scales=[1.0])  # fmt: skip
    return Config(**{**values, **overrides})


def paths_in(tiny_caches, root: Path):
    return dataclasses.replace(
        tiny_caches["vq"],
        metrics=str(root / "metrics"),
        plots=str(root / "plots"),
        models=str(root / "models"),
        resume=str(root / "resume"),
    )


@pytest.fixture(scope="module")
def champion_dir(tiny_caches, tmp_path_factory) -> Path:
    """A GPT trained for 40 steps: its loss is well below a fresh model's log V."""
    paths = paths_in(tiny_caches, tmp_path_factory.mktemp("champion"))
    pretrain(tiny(steps=40, lr=3e-3, warmup_steps=3, log_every=10, eval_every=40), paths, NullTracker())
    return Path(paths.models) / "base"


def run(cfg: Config, paths, tracker) -> dict:
    """What DVC runs for these params: init_model (its keys of the pretrain section), then pretrain."""
    start = init_model.Config(arch=cfg.arch, init_from=cfg.init_from, init_version=cfg.init_version)
    init_model.run(start, paths, NullTracker())
    return pretrain(cfg, paths, tracker)


def register(store_uri: str, checkpoint: Path, tokenizer: str, name: str = "arpipe-gpt", value: float = 1.0) -> str:
    """Log ``checkpoint`` as evaluate does (pyfunc, weights as artifacts) and make it the champion
    (its FID ``value`` must beat the current champion's)."""
    from mlflow import MlflowClient

    client = MlflowClient(store_uri)
    artifacts = Path(store_uri.removeprefix("sqlite:///")).parent / "artifacts"  # not ./mlruns in the cwd
    existing = client.get_experiment_by_name(f"registry-{name}")
    experiment = existing.experiment_id if existing else client.create_experiment(
        f"registry-{name}", artifact_location=artifacts.as_uri()
    )  # fmt: skip
    run_id = client.create_run(experiment).info.run_id
    source = log_pyfunc(
        client,
        run_id,
        REPO / "arpipe" / "pyfunc_model.py",
        artifacts={"model": str(checkpoint), "tokenizer": tokenizer},
        code_paths=[str(REPO / "models")],
        pip_requirements=["torch"],
    )
    version, decision = register_and_gate(
        client, name=name, source=source, run_id=run_id, metric="fid@cfg1", value=value, higher_is_better=False
    )
    assert decision.promote
    return version


def first_logged_loss(paths) -> float:
    rows = list(csv.DictReader(open(Path(paths.plots) / "pretrain" / "train.csv")))
    return float(rows[0]["loss"])


def step0_loss(checkpoint: Path, tiny_caches, cfg: Config) -> float:
    """The loss of ``checkpoint``'s weights on the stage's step-0 batch (labels dropped as the stage does)."""
    from core.token_store import load_tokens
    from core.training import step_generator
    from models.ar import ar_from_state, tokenizer_from_state

    tok_state, tok_config = read_checkpoint(tiny_caches["vq"].tokenizer)
    state, config = read_checkpoint(checkpoint)
    model = ar_from_state(state, config, tokenizer_from_state(tok_state, tok_config)).train()
    train = load_tokens(Path(tiny_caches["vq"].tokens) / "train.parquet")
    tokens_BL, labels_B = batch_at(cfg, train.tokens_NL, train.labels_N, 0)
    labels_B = model.drop_labels(labels_B, step_generator(cfg.seed, 0, purpose=4))
    with torch.no_grad():
        return float(token_loss(model(tokens_BL, labels_B, label_dropout=False), tokens_BL))


def test_warm_start_begins_from_the_champions_weights(tiny_caches, champion_dir, tmp_path, mlflow_store):
    from mlflow import MlflowClient

    from core.tracking import stage_run

    version = register(mlflow_store, champion_dir, tiny_caches["vq"].tokenizer)
    cfg = tiny(init_from="champion")
    warm = paths_in(tiny_caches, tmp_path / "warm")
    with stage_run("pretrain") as tracker:
        run(cfg, warm, tracker)
    expected = step0_loss(champion_dir, tiny_caches, cfg)
    assert first_logged_loss(warm) == pytest.approx(expected, rel=1e-5)

    scratch = paths_in(tiny_caches, tmp_path / "scratch")
    run(tiny(), scratch, NullTracker())
    assert first_logged_loss(scratch) > expected + 0.1  # a fresh model starts near log V, far above

    _, champion_config = read_checkpoint(champion_dir)
    _, config = read_checkpoint(Path(warm.models) / "base")
    assert config["init"]["version"] == version and config["init"]["model"] == "arpipe-gpt"
    assert config["init"]["fingerprint"] == champion_config["fingerprint"] and config["init"]["same_tokenizer"]
    tags = MlflowClient(mlflow_store).get_run(tracker.run_id).data.tags
    assert tags["arpipe.init.from"] == "champion" and tags["arpipe.init.version"] == version
    assert tags["arpipe.init.fingerprint"] == champion_config["fingerprint"]
    assert "init" not in json.loads((Path(scratch.models) / "base" / "config.json").read_text())

    # a pinned version is the same start point, whatever the alias says
    pinned = paths_in(tiny_caches, tmp_path / "pinned")
    run(tiny(init_from="champion", init_version=int(version)), pinned, NullTracker())
    assert first_logged_loss(pinned) == pytest.approx(expected, rel=1e-5)


def test_refuses_with_tracking_off(tiny_caches, tmp_path, monkeypatch):
    monkeypatch.setenv("ARPIPE_TRACKING", "off")
    with pytest.raises(WarmStartError, match="tracking is off"):
        run(tiny(init_from="champion"), paths_in(tiny_caches, tmp_path), NullTracker())


def test_refuses_when_there_is_no_champion(tiny_caches, tmp_path, mlflow_store):
    with pytest.raises(WarmStartError, match="no champion alias on arpipe-gpt; no arpipe model has a champion yet"):
        run(tiny(init_from="champion"), paths_in(tiny_caches, tmp_path), NullTracker())


def test_refuses_another_architecture_naming_the_key(tiny_caches, champion_dir, tmp_path, mlflow_store):
    register(mlflow_store, champion_dir, tiny_caches["vq"].tokenizer)
    wider = tiny(init_from="champion", model={**MODEL, "width": 64})
    shape = r"class_embedding.weight has shape \(\d+, 32\) in it and \(\d+, 64\) here"
    with pytest.raises(WarmStartError, match=shape):
        run(wider, paths_in(tiny_caches, tmp_path), NullTracker())
    deeper = tiny(init_from="champion", model={**MODEL, "depth": 3})
    with pytest.raises(WarmStartError, match=r"blocks.2.\S+ is missing from its weights"):
        run(deeper, paths_in(tiny_caches, tmp_path), NullTracker())
    # pretrain.arch var looks for arpipe-var, which has no champion: the message points at the mismatch
    with pytest.raises(WarmStartError, match="models with a champion: arpipe-gpt \\(does pretrain.arch match"):
        run(tiny(arch="var", model={"depth": 2, "width": 32, "heads": 2}, init_from="champion"),
            paths_in({"vq": tiny_caches["msvq"]}, tmp_path), NullTracker())  # fmt: skip


def test_without_a_champion_init_model_writes_a_stable_marker_and_pretrain_refuses_a_stale_folder(
    tiny_caches, tmp_path
):
    paths = paths_in(tiny_caches, tmp_path)
    with pytest.raises(FileNotFoundError, match="init.json not found: run init_model first"):
        pretrain(tiny(init_from="champion"), paths, NullTracker())
    folder = Path(paths.models) / "init"
    for _ in range(2):  # the same bytes every time: DVC sees no change, pretrain is not re-run
        assert init_model.run(init_model.Config(), paths, NullTracker()) == {}
        assert sorted(p.name for p in folder.iterdir()) == ["init.json"]
        assert json.loads((folder / "init.json").read_text()) == {"init_from": "scratch"}
    # params now say champion, but init_model has not run since: the folder is refused, by name
    with pytest.raises(WarmStartError, match=r"holds the start point for init_from 'scratch', but pretrain.init_from"):
        pretrain(tiny(init_from="champion"), paths, NullTracker())


def tiny_checkpoint(folder: Path, value: float) -> Path:
    """A checkpoint folder that init_model accepts (arch gpt, valid fingerprint): weights do not matter."""
    from core.checkpoint import write_checkpoint

    write_checkpoint(folder, {"w": torch.full((2,), value)}, {"arch": "gpt"})
    return folder


@pytest.mark.slow
def test_dvc_reruns_pretrain_only_when_the_materialised_champion_changed(tiny_caches, tmp_path, mlflow_store):
    """init_model (from dvc.yaml as shipped) runs on every repro; a stage that depends on its out,
    as pretrain does, re-runs only after the champion alias moved to another version."""
    import os
    import subprocess
    import sys

    import yaml
    from helpers import make_project

    shipped = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert shipped["init_model"]["always_changed"] is True
    assert "${paths.models}/init" in shipped["pretrain"]["deps"]
    trainer = {"cmd": "python -c \"import shutil; shutil.copy('data/models/init/init.json', 'started.json')\"",
               "deps": ["${paths.models}/init"], "outs": ["started.json"]}  # fmt: skip
    project = make_project(
        tmp_path / "project",
        params={"paths": {"models": "data/models", "metrics": "metrics"},
                "pretrain": {"arch": "gpt", "init_from": "champion", "init_version": 0}},
        dvc_yaml={"stages": {"init_model": shipped["init_model"], "trainer": trainer}},
    )  # fmt: skip
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"],
           "OMP_NUM_THREADS": "1", "ARPIPE_TRACKING": "on", "MLFLOW_TRACKING_URI": mlflow_store}  # fmt: skip

    def repro() -> str:
        done = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=project, env=env, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    tokenizer = tiny_caches["vq"].tokenizer
    first = register(mlflow_store, tiny_checkpoint(tmp_path / "v1", 1.0), tokenizer, value=2.0)
    assert "Running stage 'trainer'" in repro()
    out = repro()
    assert "Running stage 'init_model'" in out, "always_changed: the registry is read on every repro"
    assert "Stage 'trainer' didn't change, skipping" in out
    assert json.loads((project / "started.json").read_text())["version"] == first

    second = register(mlflow_store, tiny_checkpoint(tmp_path / "v2", 2.0), tokenizer, value=1.0)
    assert "Running stage 'trainer'" in repro()
    assert json.loads((project / "started.json").read_text())["version"] == second != first
    assert json.loads((project / "metrics" / "init_model.json").read_text()) == {"version": int(second)}


def test_init_model_reads_its_keys_from_the_pretrain_section_which_owns_them():
    from core.config import ConfigError, load_stage_config, read_params
    from core.stage import params_help

    params = read_params(REPO / "params.yaml")
    assert load_stage_config(params, "init_model", init_model.Config) == init_model.Config()
    assert "params file section `pretrain`" in params_help("init_model", init_model.Config)
    with pytest.raises(ConfigError, match="pretrain.init_from: expected one of 'scratch', 'champion', 'released'"):
        load_stage_config({"pretrain": {**params["pretrain"], "init_from": "x"}}, "init_model", init_model.Config)
    del params["pretrain"]["init_version"]
    with pytest.raises(ConfigError, match="pretrain.init_version: missing key"):
        load_stage_config(params, "init_model", init_model.Config)


def test_init_version_needs_init_from_champion():
    with pytest.raises(ValueError, match="init_version 3 needs init_from: champion"):
        Config(init_version=3)


def test_arpipe_sample_from_the_champion_prints_its_result_without_library_noise(
    tiny_caches, champion_dir, tmp_path, mlflow_store
):
    """`arpipe sample --model champion` as a user runs it: no MLflow type-hint warning, no
    artifact-download bars; one line naming the file it wrote."""
    import os
    import shutil
    import subprocess
    import sys

    register(mlflow_store, champion_dir, tiny_caches["vq"].tokenizer)
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(REPO / "dvc.yaml", project / "dvc.yaml")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": mlflow_store}
    result = subprocess.run(
        [sys.executable, "-m", "arpipe.cli", "sample", "--model", "champion", "--classes", "0,1", "--n", "2",
         "--out", str(tmp_path / "grid.png")],
        cwd=project, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote {tmp_path / 'grid.png'}: 4 samples from models:/arpipe-gpt@champion")
    assert "UserWarning" not in result.stderr and "Downloading artifacts" not in result.stderr, result.stderr
