"""The token cache: ``{split}.parquet`` with key, label, view and a fixed-length token list.

Parquet schema metadata (``arpipe.*`` keys) holds the token layout, sequence length, vocabulary
size and the fingerprint of the tokenizer that wrote it. ``load_tokens`` returns the tokens as a
zero-copy numpy view of the Arrow buffer (one row group per file, so no concatenation copy).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


@dataclass(frozen=True)
class TokenSplit:
    tokens_NL: np.ndarray
    """uint16 (int32 for vocabularies over 65,535) token ids, read-only."""
    labels_N: np.ndarray
    views_N: np.ndarray
    """0 = the image as stored, 1 = its horizontal flip."""
    keys: list[str]
    token_layout: dict[str, Any]
    seq_len: int
    vocab_size: int
    fingerprint: str


def token_dtype(vocab_size: int) -> pa.DataType:
    return pa.uint16() if vocab_size <= 65_536 else pa.int32()


def write_tokens(path: str | Path, rows: dict[str, Any], tokens_NL: np.ndarray, meta: dict[str, Any]) -> None:
    """``rows`` holds key, label, view columns; ``meta``: token_layout, seq_len, vocab_size, fingerprint."""
    num_rows, seq_len = tokens_NL.shape
    dtype = token_dtype(meta["vocab_size"])
    flat = pa.array(np.ascontiguousarray(tokens_NL).reshape(-1).astype(dtype.to_pandas_dtype()), type=dtype)
    schema = pa.schema(
        [("key", pa.string()), ("label", pa.int32()), ("view", pa.uint8()), ("tokens", pa.list_(dtype, seq_len))],
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


def read_metadata(path: str | Path) -> dict[str, Any]:
    raw = pq.read_schema(path).metadata or {}
    return {k.decode()[len("arpipe.") :]: json.loads(v) for k, v in raw.items() if k.startswith(b"arpipe.")}


def load_tokens(path: str | Path, expected_fingerprint: str | None = None) -> TokenSplit:
    """Read one split; with ``expected_fingerprint``, refuse a cache made by another tokenizer."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the cache_tokens stage first (dvc repro cache_tokens)")
    meta = read_metadata(path)
    if expected_fingerprint is not None and meta.get("fingerprint") != expected_fingerprint:
        raise ValueError(
            f"{path} was written by tokenizer {str(meta.get('fingerprint'))[:12]}, not the given "
            f"{expected_fingerprint[:12]}: re-run the cache_tokens stage (dvc repro cache_tokens)"
        )
    table = pq.read_table(path, memory_map=True)
    tokens = table.column("tokens")
    if tokens.num_chunks != 1:
        tokens = tokens.combine_chunks()  # several row groups: one copy
        values = tokens.values
    else:
        values = tokens.chunk(0).values
    seq_len = int(meta["seq_len"])
    tokens_NL = values.to_numpy(zero_copy_only=True).reshape(-1, seq_len)
    return TokenSplit(
        tokens_NL=tokens_NL,
        labels_N=table.column("label").to_numpy(),
        views_N=table.column("view").to_numpy(),
        keys=table.column("key").to_pylist(),
        token_layout=meta["token_layout"],
        seq_len=seq_len,
        vocab_size=int(meta["vocab_size"]),
        fingerprint=meta["fingerprint"],
    )
