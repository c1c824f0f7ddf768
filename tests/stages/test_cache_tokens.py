import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import TINY_MSVQ

from core.shards import load_split
from core.token_store import load_tokens
from core.tracking import NullTracker
from stages import cache_tokens, train_tokenizer

MODEL = TINY_MSVQ


@pytest.fixture
def cached(tmp_path, shard_run):
    metrics, shards = shard_run(image_size=8)
    from core.config import Paths

    paths = Paths(
        shards=str(shards),
        metrics=str(tmp_path / "m"),
        plots=str(tmp_path / "p"),
        tokenizer=str(tmp_path / "tokenizer"),
        tokens=str(tmp_path / "tokens"),
        resume=str(tmp_path / "r"),
    )
    cfg = train_tokenizer.Config(kind="msvq", model=MODEL, steps=3, batch_size=16, save_every=0, num_grid=2)
    train_tokenizer.run(cfg, paths, NullTracker())
    out = cache_tokens.run(cache_tokens.Config(batch_size=50), paths, NullTracker())
    return metrics, paths, out


def test_rows_views_and_metadata(cached):
    shard_metrics, paths, metrics = cached
    model, config = cache_tokens.load_tokenizer(paths.tokenizer)
    train = load_tokens(f"{paths.tokens}/train.parquet", expected_fingerprint=config["fingerprint"])
    val = load_tokens(f"{paths.tokens}/val.parquet", expected_fingerprint=config["fingerprint"])
    assert len(train.tokens_NL) == 2 * shard_metrics["train"]["count"] == metrics["train"]["rows"]
    assert len(val.tokens_NL) == shard_metrics["val"]["count"] and set(val.views_N) == {0}
    assert train.tokens_NL.dtype == np.uint16 and train.tokens_NL.shape[1] == model.seq_len == 21
    assert not train.tokens_NL.flags.owndata  # a view of the Arrow buffer
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


def test_fingerprint_mismatch_names_the_stage(cached):
    _, paths, _ = cached
    with pytest.raises(ValueError, match="re-run the cache_tokens stage"):
        load_tokens(f"{paths.tokens}/val.parquet", expected_fingerprint="0" * 64)


def test_outs_are_byte_identical_across_runs(cached, tmp_path):
    _, paths, _ = cached
    before = {p.name: p.read_bytes() for p in sorted((tmp_path / "tokens").iterdir())}
    cache_tokens.run(cache_tokens.Config(batch_size=7), paths, NullTracker())
    assert before == {p.name: p.read_bytes() for p in sorted((tmp_path / "tokens").iterdir())}
