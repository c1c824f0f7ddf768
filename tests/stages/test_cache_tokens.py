import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from helpers import REPO, TINY_MSVQ

from core.config import Paths, as_params
from core.shards import load_split
from core.token_store import load_tokens
from core.tracking import NullTracker
from stages import cache_tokens, train_tokenizer

MODEL = TINY_MSVQ


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """Shards, a tokenizer and its one-process token cache, built once for the module (read-only)."""
    from stages import shard

    tmp_path = tmp_path_factory.mktemp("cached")
    paths = Paths(
        shards=str(tmp_path / "shards"),
        metrics=str(tmp_path / "m"),
        plots=str(tmp_path / "p"),
        tokenizer=str(tmp_path / "tokenizer"),
        tokens=str(tmp_path / "tokens"),
        resume=str(tmp_path / "r"),
    )
    metrics = shard.run(shard.Config(image_size=8, num_workers=0), paths, NullTracker())
    cfg = train_tokenizer.Config(kind="msvq", model=MODEL, steps=3, batch_size=16, save_every=0, num_grid=2)
    train_tokenizer.run(cfg, paths, NullTracker())
    out = cache_tokens.run(cache_tokens.Config(batch_size=50, hflip=True), paths, NullTracker())
    return metrics, paths, out


def test_rows_views_and_metadata(cached):
    shard_metrics, paths, metrics = cached
    model, config = cache_tokens.load_tokenizer(paths.tokenizer)
    train = load_tokens(f"{paths.tokens}/train.parquet", expected_fingerprint=config["fingerprint"])
    val = load_tokens(f"{paths.tokens}/val.parquet", expected_fingerprint=config["fingerprint"])
    assert len(train.tokens_NL) == 2 * shard_metrics["train"]["count"] == metrics["train"]["rows"]
    assert len(val.tokens_NL) == shard_metrics["val"]["count"] and set(val.views_N) == {0}
    assert train.tokens_NL.dtype == np.uint16 and train.tokens_NL.shape[1] == model.seq_len == 21
    assert not train.tokens_NL.flags.owndata  # a view of the mapped Arrow IPC file
    assert train.source == Path(paths.tokens) / "train.arrow"
    assert train.token_layout == {"kind": "msvq", "scales": [1, 2, 4]} and train.vocab_size == 32
    assert list(train.views_N[:4]) == [0, 1, 0, 1] and train.keys[0] == train.keys[1]
    schema = pq.read_schema(f"{paths.tokens}/train.parquet")
    assert schema.field("tokens").type.list_size == 21

    images = load_split(paths.shards, "train")
    x = torch.from_numpy(images.images_NHWC[:7]).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        assert np.array_equal(train.tokens_NL[0:14:2], model.encode(x).numpy())
        assert np.array_equal(train.tokens_NL[1:14:2], model.encode(x.flip(-1)).numpy())
        decoded = model.decode(torch.from_numpy(val.tokens_NL[:3].astype(np.int64)))
    assert decoded.shape == (3, 3, 8, 8) and list(train.labels_N[0:14:2]) == list(images.labels_N[:7])


def test_without_hflip_each_train_image_is_one_row_as_stored(cached, tmp_path):
    """hflip off: no mirrored rows, so the models never learn to draw a mirrored glyph."""
    _, paths, flipped = cached
    plain = dataclasses.replace(paths, tokens=str(tmp_path / "plain"))
    metrics = cache_tokens.run(cache_tokens.Config(batch_size=50, hflip=False), plain, NullTracker())
    train = load_tokens(f"{plain.tokens}/train.parquet")
    both = load_tokens(f"{paths.tokens}/train.parquet")
    assert metrics["train"]["rows"] == metrics["train"]["images"] == flipped["train"]["rows"] // 2
    assert set(train.views_N) == {0} and train.keys == both.keys[0::2]
    assert np.array_equal(train.tokens_NL, both.tokens_NL[0::2])
    assert np.array_equal(train.labels_N, both.labels_N[0::2])


def test_fingerprint_mismatch_names_the_stage(cached):
    _, paths, _ = cached
    with pytest.raises(ValueError, match="re-run the cache_tokens stage"):
        load_tokens(f"{paths.tokens}/val.parquet", expected_fingerprint="0" * 64)


def test_outs_are_byte_identical_across_runs(cached, tmp_path):
    _, paths, _ = cached
    again = dataclasses.replace(paths, tokens=str(tmp_path / "again"))
    cache_tokens.run(cache_tokens.Config(batch_size=7, hflip=True), again, NullTracker())
    files = sorted(p.name for p in Path(paths.tokens).iterdir())
    assert files == ["train.arrow", "train.parquet", "val.arrow", "val.parquet"]
    assert all((Path(paths.tokens) / f).read_bytes() == (tmp_path / "again" / f).read_bytes() for f in files)


LAUNCHES = {
    # The spelling: --cpu --num_processes 2 would start only one process.
    "flags": ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"],
    "config_file": ["--config_file", str(REPO / "accelerate" / "cpu-2proc.yaml")],
}


@pytest.mark.slow
@pytest.mark.parametrize("launch", LAUNCHES)
def test_two_processes_write_the_same_files_as_one(cached, tmp_path, launch):
    """Two gloo ranks each encode half of every split; rank 0 writes what one process writes."""
    _, paths, one_metrics = cached
    project = tmp_path / "project"
    project.mkdir()
    params = {
        "paths": {
            "shards": paths.shards,
            "tokenizer": paths.tokenizer,
            "tokens": str(tmp_path / "tokens-2proc"),
            "metrics": str(tmp_path / "metrics-2proc"),
        },
        "cache_tokens": as_params(cache_tokens.Config(batch_size=64, hflip=True)),
    }
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "true",  # CPU ranks even where a GPU is visible
        "ARPIPE_TRACKING": "off",
        "OMP_NUM_THREADS": "1",  # two ranks on a shared CPU: no oversubscription
        "PYTHONPATH": str(REPO),  # the code under test, whatever the venv's editable install points to
    }
    accelerate = Path(sys.executable).with_name("accelerate")
    # --main_process_port 0: any free port (29500 may be taken by a concurrent run).
    command = [str(accelerate), "launch", *LAUNCHES[launch], "--main_process_port", "0", "-m", "stages.cache_tokens"]
    done = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "on 2 process(es)" in done.stdout
    for name in ("train.parquet", "train.arrow", "val.parquet", "val.arrow"):
        one = (Path(paths.tokens) / name).read_bytes()
        assert (tmp_path / "tokens-2proc" / name).read_bytes() == one, name
    assert json.loads((tmp_path / "metrics-2proc" / "cache_tokens.json").read_text()) == one_metrics
