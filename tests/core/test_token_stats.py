"""`arpipe data tokens`: DuckDB answers over a hand-made token cache, exact counts."""

import math

import pytest
from helpers import TOKEN_META as META
from helpers import write_token_cache as write_cache

from core.token_stats import format_token_stats, token_stats


def entropy(*counts):
    total = sum(counts)
    return -sum(n / total * math.log2(n / total) for n in counts)


def test_rows_histogram_and_unused_codes(tmp_path):
    stats = token_stats(write_cache(tmp_path / "tokens"))
    assert stats.vocab_size == 8 and stats.seq_len == 3 and stats.fingerprint == "f" * 64
    assert stats.rows == [
        ("train", 0, 0, 1),
        ("train", 1, 0, 1),
        ("train", 0, 1, 1),
        ("train", 1, 1, 1),
        ("val", 0, 1, 1),
    ]
    train, val, both = stats.histograms["train"], stats.histograms["val"], stats.histograms["all"]
    # train codes: 0 x5, 1 x4, 2 x2, 5 x1; val: 2 x1, 6 x2; both: 0 x5, 1 x4, 2 x3, 6 x2, 5 x1
    assert (train.tokens, train.distinct, train.min_count, train.median_count, train.max_count) == (12, 4, 1, 3.0, 5)
    assert (val.tokens, val.distinct, val.min_count, val.median_count, val.max_count) == (3, 2, 1, 1.5, 2)
    assert (both.tokens, both.distinct, both.min_count, both.median_count, both.max_count) == (15, 5, 1, 3.0, 5)
    assert train.entropy_bits == pytest.approx(entropy(5, 4, 2, 1))
    assert both.entropy_bits == pytest.approx(entropy(5, 4, 3, 2, 1))
    assert both.perplexity == pytest.approx(2 ** entropy(5, 4, 3, 2, 1))
    assert stats.unused == [3, 4, 7]


def test_report_shows_the_tables_and_the_unused_ids(tmp_path):
    text = format_token_stats(token_stats(write_cache(tmp_path / "tokens")), show_unused=2)
    lines = text.splitlines()
    assert "3 tokens per image (vq 1x3), vocabulary 8, tokenizer ffffffffffff" in lines[0]
    assert lines[2].split() == ["class", "train", "v0", "train", "v1", "val", "v0", "total"]
    assert lines[4].split() == ["0", "1", "1", "0", "2"] and lines[7].split() == ["total", "2", "2", "1", "5"]
    assert [line.split()[-1] for line in lines if line.startswith(("distinct codes", "max count"))] == ["5", "5"]
    assert lines[-1] == "never used: 3 of 8 codes: 3, 4, ... (1 more)"


def test_a_missing_cache_names_the_file_and_the_stage(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train\.parquet not found.*dvc repro cache_tokens"):
        token_stats(tmp_path / "nowhere")


def test_splits_from_different_tokenizers_are_refused(tmp_path):
    root = write_cache(tmp_path / "tokens")
    write_cache(tmp_path / "other", {**META, "fingerprint": "0" * 64})
    (tmp_path / "other" / "val.parquet").replace(root / "val.parquet")
    with pytest.raises(ValueError, match="different tokenizers"):
        token_stats(root)
