"""The token cache: per split, ``{split}.parquet`` for queries and ``{split}.arrow`` for training.

Both files hold the same table (key, label, view, tokens as a fixed-length list of uint16, int32
above 65,536 codes) and the same schema metadata (``arpipe.*`` keys: token layout, sequence
length, vocabulary size and the fingerprint of the tokenizer that wrote it).

- ``{split}.parquet`` is the format the issue specifies; DuckDB queries it (``core.token_stats``).
  Reading it into numpy decodes the list pages: a copy, ~0.25 GB/s.
- ``{split}.arrow`` is an uncompressed Arrow IPC file with one record batch. ``load_tokens``
  memory-maps it, so ``tokens_NL`` is a read-only numpy view of the mapped file: no decode and
  no copy; pages come from the OS page cache as training touches them.

``load_tokens`` reads the ``.arrow`` beside the given ``.parquet`` and falls back to the Parquet
for caches written before the ``.arrow`` existed. Keys stay an Arrow column until ``.keys`` is
asked for, so neither path builds millions of Python strings that training never reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

RERUN = "re-run the cache_tokens stage (dvc repro cache_tokens)"


@dataclass(frozen=True)
class TokenSplit:
    tokens_NL: np.ndarray
    """uint16 (int32 for vocabularies over 65,535) token ids, read-only."""
    labels_N: np.ndarray
    views_N: np.ndarray
    """0 = the image as stored, 1 = its horizontal flip."""
    key_column: pa.Array
    """The image keys as an Arrow string column (no Python objects); ``keys`` lists them."""
    token_layout: dict[str, Any]
    seq_len: int
    vocab_size: int
    fingerprint: str
    source: Path
    """The file the arrays were read from: ``{split}.arrow`` (mapped) or ``{split}.parquet`` (decoded)."""

    @cached_property
    def keys(self) -> list[str]:
        """The image key of every row, as Python strings (built on first use: ~0.1 s per million rows)."""
        return self.key_column.to_pylist()


def token_dtype(vocab_size: int) -> pa.DataType:
    return pa.uint16() if vocab_size <= 65_536 else pa.int32()


def arrow_path(parquet_path: str | Path) -> Path:
    """The memory-mappable twin of a cache's ``{split}.parquet``."""
    return Path(parquet_path).with_suffix(".arrow")


def write_tokens(path: str | Path, rows: dict[str, Any], tokens_NL: np.ndarray, meta: dict[str, Any]) -> None:
    """Write ``path`` (``{split}.parquet``) and its ``{split}.arrow`` twin, byte-deterministically.

    ``rows`` holds key, label, view columns; ``meta``: token_layout, seq_len, vocab_size, fingerprint.
    """
    num_rows, seq_len = tokens_NL.shape
    if seq_len != meta["seq_len"]:
        raise ValueError(f"tokens have {seq_len} per row but meta seq_len is {meta['seq_len']}")
    dtype = token_dtype(meta["vocab_size"])
    flat = pa.array(np.ascontiguousarray(tokens_NL).reshape(-1).astype(dtype.to_pandas_dtype()), type=dtype)
    # The list's child is named "element", as Parquet stores it, so both files read back one schema.
    schema = pa.schema(
        [
            ("key", pa.string()),
            ("label", pa.int32()),
            ("view", pa.uint8()),
            ("tokens", pa.list_(pa.field("element", dtype), seq_len)),
        ],
        metadata={f"arpipe.{k}": json.dumps(v, sort_keys=True) for k, v in meta.items()},
    )
    table = pa.table(
        [
            pa.array(rows["key"], pa.string()),
            pa.array(rows["label"], pa.int32()),
            pa.array(rows["view"], pa.uint8()),
            pa.FixedSizeListArray.from_arrays(flat, seq_len),
        ],
        schema=schema,
    )
    pq.write_table(table, path, row_group_size=max(num_rows, 1))
    # One record batch (the table is one chunk), uncompressed: each column is one contiguous,
    # 8-byte-aligned run of the file that numpy can view in place. IPC writes no timestamps, so
    # the bytes depend only on the table.
    with pa.OSFile(str(arrow_path(path)), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        writer.write_table(table)


def _decode_metadata(raw: dict[bytes, bytes] | None) -> dict[str, Any]:
    return {k.decode()[len("arpipe.") :]: json.loads(v) for k, v in (raw or {}).items() if k.startswith(b"arpipe.")}


def read_metadata(path: str | Path) -> dict[str, Any]:
    return _decode_metadata(pq.read_schema(path).metadata)


def _column(table: pa.Table, name: str) -> pa.Array:
    """The column as one array: the file's own buffer when it has one chunk (one row group or
    record batch, as ``write_tokens`` writes), else a concatenated copy."""
    column = table.column(name)
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def load_tokens(path: str | Path, expected_fingerprint: str | None = None) -> TokenSplit:
    """Read one split given its ``{split}.parquet``: the mapped ``.arrow`` twin when present.

    With ``expected_fingerprint``, refuse a cache made by another tokenizer.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the cache_tokens stage first (dvc repro cache_tokens)")
    parquet_footer = pq.ParquetFile(path).metadata  # the footer only: metadata and row count
    meta = _decode_metadata(parquet_footer.schema.to_arrow_schema().metadata)
    if expected_fingerprint is not None and meta.get("fingerprint") != expected_fingerprint:
        raise ValueError(
            f"{path} was written by tokenizer {str(meta.get('fingerprint'))[:12]}, not the given "
            f"{expected_fingerprint[:12]}: {RERUN}"
        )
    mapped = arrow_path(path)
    if mapped.is_file():
        # Arrow buffers keep the mapping alive after the file object is closed.
        with pa.memory_map(str(mapped)) as source:
            table, source_path = pa.ipc.open_file(source).read_all(), mapped
        if _decode_metadata(table.schema.metadata) != meta or table.num_rows != parquet_footer.num_rows:
            raise ValueError(f"{mapped} does not match {path.name} (metadata or row count): {RERUN}")
    else:  # a cache written before the .arrow twin: decode the Parquet (one copy)
        table, source_path = pq.read_table(path, memory_map=True), path
    seq_len = int(meta["seq_len"])
    return TokenSplit(
        tokens_NL=_column(table, "tokens").values.to_numpy(zero_copy_only=True).reshape(-1, seq_len),
        labels_N=_column(table, "label").to_numpy(zero_copy_only=True),
        views_N=_column(table, "view").to_numpy(zero_copy_only=True),
        key_column=_column(table, "key"),
        token_layout=meta["token_layout"],
        seq_len=seq_len,
        vocab_size=int(meta["vocab_size"]),
        fingerprint=meta["fingerprint"],
        source=source_path,
    )
