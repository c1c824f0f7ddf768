"""The token cache's two files: the Parquet for queries, the mapped Arrow IPC twin for training."""

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.token_store import arrow_path, load_tokens, write_tokens

META = {"token_layout": {"kind": "vq", "grid": [2, 2]}, "seq_len": 4, "vocab_size": 4096, "fingerprint": "a" * 64}


def write_split(path: Path, meta: dict = META, rows: int = 50) -> np.ndarray:
    rng = np.random.default_rng(0)
    tokens_NL = rng.integers(0, meta["vocab_size"], (rows, meta["seq_len"]))
    columns = {
        "key": [f"img{i // 2:04d}" for i in range(rows)],
        "label": rng.integers(0, 10, rows),
        "view": np.tile(np.array([0, 1], np.uint8), rows // 2),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_tokens(path, columns, tokens_NL, meta)
    return tokens_NL


def parquet_only(path: Path, tmp_path: Path) -> Path:
    """A copy of the split as a cache written before the .arrow twin existed."""
    (tmp_path / "old").mkdir()
    return Path(shutil.copy(path, tmp_path / "old" / path.name))


def mapping_of(path: Path) -> tuple[int, int]:
    """(start, end) address of this process's memory mapping of ``path`` (Linux /proc)."""
    maps = Path("/proc/self/maps")
    if not maps.is_file():
        pytest.skip("needs /proc/self/maps")
    (line,) = [line for line in maps.read_text().splitlines() if line.endswith(str(path))]
    start, end = (int(address, 16) for address in line.split()[0].split("-"))
    return start, end


def test_arrow_and_parquet_hold_the_same_table_and_metadata(tmp_path):
    path = tmp_path / "train.parquet"
    tokens_NL = write_split(path)
    with pa.memory_map(str(arrow_path(path))) as source:
        mapped = pa.ipc.open_file(source).read_all()
    assert mapped.equals(pq.read_table(path), check_metadata=True)

    fast, slow = load_tokens(path), load_tokens(parquet_only(path, tmp_path))
    assert fast.source == arrow_path(path) and slow.source.suffix == ".parquet"
    assert fast.tokens_NL.dtype == slow.tokens_NL.dtype == np.uint16
    assert np.array_equal(fast.tokens_NL, tokens_NL) and np.array_equal(slow.tokens_NL, tokens_NL)
    for name in ("labels_N", "views_N"):
        assert np.array_equal(getattr(fast, name), getattr(slow, name))
    assert fast.keys == slow.keys and fast.keys[:3] == ["img0000", "img0000", "img0001"]
    for name in ("token_layout", "seq_len", "vocab_size", "fingerprint"):
        assert getattr(fast, name) == getattr(slow, name) == META[name]


def test_tokens_are_a_read_only_view_of_the_mapped_file(tmp_path):
    path = tmp_path / "train.parquet"
    write_split(path)
    split = load_tokens(path)
    start, end = mapping_of(arrow_path(path))
    for array in (split.tokens_NL, split.labels_N, split.views_N):
        assert not array.flags.writeable and not array.flags.owndata
        # the data lies inside the file's mapping: no copy was made
        assert start <= array.ctypes.data and array.ctypes.data + array.nbytes <= end
    with pytest.raises(ValueError, match="read-only"):
        split.tokens_NL[0, 0] = 1


def test_keys_are_built_only_when_asked(tmp_path):
    path = tmp_path / "train.parquet"
    write_split(path)
    split = load_tokens(path)
    assert "keys" not in vars(split)  # no Python strings yet
    assert len(split.keys) == 50 and split.keys is split.keys  # built once, then cached


def test_large_vocabularies_map_as_int32(tmp_path):
    path = tmp_path / "train.parquet"
    tokens_NL = write_split(path, {**META, "vocab_size": 70_000})
    split = load_tokens(path)
    assert split.tokens_NL.dtype == np.int32 and np.array_equal(split.tokens_NL, tokens_NL)


@pytest.mark.parametrize("old_cache", [False, True], ids=["arrow", "parquet-only"])
def test_fingerprint_mismatch_is_refused(tmp_path, old_cache):
    path = tmp_path / "val.parquet"
    write_split(path)
    if old_cache:
        path = parquet_only(path, tmp_path)
    assert load_tokens(path, expected_fingerprint="a" * 64).fingerprint == "a" * 64
    with pytest.raises(ValueError, match="re-run the cache_tokens stage"):
        load_tokens(path, expected_fingerprint="b" * 64)


def test_an_arrow_twin_out_of_step_with_its_parquet_is_refused(tmp_path):
    path, other = tmp_path / "val.parquet", tmp_path / "other" / "val.parquet"
    write_split(path)
    write_split(other, {**META, "fingerprint": "b" * 64})
    shutil.copy(arrow_path(other), arrow_path(path))
    with pytest.raises(ValueError, match="does not match val.parquet"):
        load_tokens(path)


def test_both_files_are_byte_identical_across_writes(tmp_path):
    first, second = tmp_path / "a" / "train.parquet", tmp_path / "b" / "train.parquet"
    write_split(first)
    write_split(second)
    for a, b in ((first, second), (arrow_path(first), arrow_path(second))):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_seq_len_must_match_the_tokens(tmp_path):
    rows = {"key": ["a"], "label": [0], "view": [0]}
    with pytest.raises(ValueError, match="seq_len"):
        write_tokens(tmp_path / "train.parquet", rows, np.zeros((1, 3), np.uint16), META)
