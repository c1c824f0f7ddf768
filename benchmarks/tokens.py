"""Tokenizer encode speed and token-cache read speed: images/s, GB/s and sequences/s.

Three measurements, all on CPU unless a GPU is visible, tracking off, no network:

- **encode**: ``stages.cache_tokens.encode_images`` (the stage's own path: uint8 NHWC -> [-1, 1]
  -> ``tokenizer.encode``) over ``--images`` random images of the tokenizer's size, at batch sizes
  64 and 256, best of ``--repeats`` after an untimed warm-up pass. The tokenizer is the trained one
  in ``data/tokenizer`` when it exists, else a freshly initialised default one (``train_tokenizer``'s
  defaults); the output says which. Encoding cost does not depend on the pixels, so random images
  measure the same work as real ones.
- **read**: a synthetic cache of ``--rows`` rows x ``--seq-len`` tokens (uint16, random codes of a
  4,096-code vocabulary, 8-hex-digit keys) written once with ``core.token_store.write_tokens`` to a
  temporary directory (not timed): ``train.parquet`` and its memory-mappable ``train.arrow`` twin.
  Then ``load_tokens`` as consumers call it, on both paths: the mapped Arrow IPC file, alone and
  followed by one pass over every token (so the bytes are really read, from the page cache), and
  the Parquet fallback (a copy of the ``.parquet`` without its twin, as caches written before the
  ``.arrow`` existed), alone and with the keys built as Python strings (what ``load_tokens``
  returned before keys became lazy). GB/s = token bytes in the numpy array / seconds, best of
  ``--repeats``; the files are in the OS page cache (warm).
- **gather**: random rows of each path's loaded tokens gathered into an int64 torch batch (what a
  training step does), batch 64 and 256: sequences/s and GB/s of token bytes gathered.

Prints whether the goal (``load_tokens`` >= 1 GB/s of tokens, zero-copy) is met, with every token
touched once so that an untouched mapping does not count as reading. Run from the repository root::

    .venv/bin/python benchmarks/tokens.py
    .venv/bin/python benchmarks/tokens.py --rows 500000 --seq-len 30 --images 1024
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

SCRIPT_START = time.perf_counter()
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python benchmarks/tokens.py` puts benchmarks/ first, not the root
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks._results import write_results  # noqa: E402

GOAL_GB_PER_S = 1.0
ENCODE_BATCHES = (64, 256)
GATHER_BATCHES = (64, 256)
VOCAB_SIZE = 4096
SEED = 1234


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time tokenizer encoding (images/s) and token-cache reads (GB/s, sequences/s).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--tokenizer", default="data/tokenizer", help="trained tokenizer folder, if present")
    parser.add_argument("--images", type=int, default=2048, help="random images encoded per batch size")
    parser.add_argument("--rows", type=int, default=2_000_000, help="rows in the synthetic token cache")
    parser.add_argument("--seq-len", type=int, default=16, help="tokens per row (vq 4x4: 16, msvq 1,2,3,4: 30)")
    parser.add_argument("--gather-steps", type=int, default=2000, help="batches gathered per batch size")
    parser.add_argument("--repeats", type=int, default=3, help="timed reads per case; the best is reported")
    args = parser.parse_args(argv)
    if min(args.images, args.rows, args.seq_len, args.gather_steps, args.repeats) < 1:
        parser.error("--images, --rows, --seq-len, --gather-steps and --repeats must be >= 1")
    return args


def load_or_build_tokenizer(model_dir: Path):
    """(model in eval mode, a description): the trained tokenizer, else train_tokenizer's default."""
    from stages.cache_tokens import load_tokenizer

    if (model_dir / "model.safetensors").is_file():
        model, config = load_tokenizer(model_dir)
        return model, f"trained {config['kind']} tokenizer in {model_dir} ({config['fingerprint'][:12]})"
    from models.tokenizers import build_tokenizer
    from stages.train_tokenizer import Config

    default = Config()
    model = build_tokenizer(default.kind, default.model).eval()
    return model, f"freshly initialised default {default.kind} tokenizer (no {model_dir}; train_tokenizer defaults)"


def bench_encode(model, images: int, repeats: int) -> list[tuple[int, float]]:
    """(batch size, images/s, best of ``repeats``) of the stage's encode path, after a warm-up pass
    (the first pass pays one-off kernel and allocator set-up several times over)."""
    import numpy as np
    import torch

    from stages.cache_tokens import encode_images

    if torch.cuda.is_available():
        model = model.cuda()
    side = model.config.image_size
    pixels = np.random.default_rng(SEED).integers(0, 256, (images, side, side, 3), dtype=np.uint8)

    def encode(batch: int) -> None:
        encode_images(model, pixels, False, batch, "encode", progress=False)
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    results = []
    for batch in ENCODE_BATCHES:
        encode(batch)  # warm-up
        results.append((batch, images / best_seconds(lambda b=batch: encode(b), repeats)))
    return results


def write_cache(path: Path, rows: int, seq_len: int):
    import numpy as np

    from core.token_store import write_tokens

    rng = np.random.default_rng(SEED)
    tokens_NL = rng.integers(0, VOCAB_SIZE, (rows, seq_len), dtype=np.uint16)
    columns = {
        "key": [f"{i:08x}" for i in range(rows)],
        "label": rng.integers(0, 1000, rows, dtype=np.int32),
        "view": np.zeros(rows, dtype=np.uint8),
    }
    meta = {"token_layout": {"kind": "synthetic"}, "seq_len": seq_len, "vocab_size": VOCAB_SIZE, "fingerprint": "0"}
    write_tokens(path, columns, tokens_NL, meta)
    return tokens_NL


def best_seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_read(tmp: Path, rows: int, seq_len: int, repeats: int):
    """(case, seconds, GB/s of tokens) per read path, the loaded splits, token bytes and file sizes."""
    import numpy as np

    from core.token_store import arrow_path, load_tokens

    cache = tmp / "train.parquet"
    tokens_NL = write_cache(cache, rows, seq_len)
    old = tmp / "old" / "train.parquet"  # an older cache: the Parquet without its .arrow twin
    old.parent.mkdir()
    shutil.copy(cache, old)
    nbytes = tokens_NL.nbytes

    mapped, decoded = load_tokens(cache), load_tokens(old)
    assert mapped.source == arrow_path(cache) and decoded.source == old
    assert not mapped.tokens_NL.flags.writeable and np.array_equal(mapped.tokens_NL, tokens_NL)
    assert np.array_equal(decoded.tokens_NL, tokens_NL)
    del tokens_NL
    cases = [
        ("arrow, mapped: load_tokens", lambda: load_tokens(cache)),
        ("arrow, mapped: load_tokens + touch every token", lambda: load_tokens(cache).tokens_NL.max()),
        ("parquet, decoded: load_tokens", lambda: load_tokens(old)),
        ("parquet, decoded: load_tokens + keys as str", lambda: load_tokens(old).keys),
    ]
    results = []
    for name, fn in cases:
        seconds = best_seconds(fn, repeats)
        results.append((name, seconds, nbytes / seconds / 1e9))
    sizes = {path.name: path.stat().st_size for path in (cache, arrow_path(cache))}
    return results, {"arrow": mapped, "parquet": decoded}, nbytes, sizes


def bench_gather(tokens_NL, steps: int) -> list[tuple[int, float]]:
    """(batch size, sequences/s): random rows -> int64 torch tensor, as a training step takes them."""
    import numpy as np
    import torch

    rng = np.random.default_rng(SEED)
    results = []
    for batch in GATHER_BATCHES:
        index = rng.integers(0, len(tokens_NL), (steps, batch))
        start = time.perf_counter()
        for row in index:
            tokens_BL = torch.from_numpy(tokens_NL[row].astype(np.int64))
        results.append((batch, steps * batch / (time.perf_counter() - start)))
        assert tokens_BL.dtype == torch.int64 and tokens_BL.shape == (batch, tokens_NL.shape[1])
    return results


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    device = "cuda" if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} torch threads"
    print(f"{os.cpu_count()} CPU(s), {device}, Python {sys.version.split()[0]}, torch {torch.__version__}")

    model, described = load_or_build_tokenizer(Path(args.tokenizer))
    side = model.config.image_size
    print(f"\nencode: {described}; {args.images:,} random {side}x{side} images, {model.seq_len} tokens each")
    encoded = bench_encode(model, args.images, args.repeats)
    print(table(("batch", "images/s"), [(str(b), f"{rate:,.0f}") for b, rate in encoded]))

    tmp = Path(tempfile.mkdtemp(prefix="arpipe-bench-tokens-"))
    try:
        print(f"\nwriting a {args.rows:,} x {args.seq_len} token cache to {tmp} (not timed) ...", flush=True)
        with contextlib.redirect_stderr(io.StringIO()):
            reads, splits, nbytes, sizes = bench_read(tmp, args.rows, args.seq_len, args.repeats)
        files = ", ".join(f"{name} {size / 1e6:,.1f} MB" for name, size in sizes.items())
        print(f"read: {nbytes / 1e6:,.1f} MB of uint16 tokens ({files}); warm page cache, best of {args.repeats}")
        print(table(("path", "seconds", "GB/s"), [(n, f"{s:.4f}", f"{g:,.2f}") for n, s, g in reads]))

        row_bytes = 2 * args.seq_len
        print(f"\ngather: random rows -> int64 torch tensor, {args.gather_steps:,} batches each")
        gathered = [
            (source, batch, rate)
            for source, split in splits.items()
            for batch, rate in bench_gather(split.tokens_NL, args.gather_steps)
        ]
        rows = [(s, str(b), f"{r:,.0f}", f"{r * row_bytes / 1e9:.3f}") for s, b, r in gathered]
        print(table(("tokens from", "batch", "sequences/s", "GB/s"), rows))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    touched, decoded = reads[1][2], reads[2][2]
    verdict = "MET" if touched >= GOAL_GB_PER_S else "NOT MET"
    print(
        f"\ngoal >= {GOAL_GB_PER_S:.0f} GB/s zero-copy read: {verdict} (mapped .arrow with every token touched "
        f"{touched:,.2f} GB/s; mapping alone {reads[0][2]:,.0f} GB/s; Parquet decode {decoded:.2f} GB/s)"
    )
    figures = {
        "config": {"images": args.images, "rows": args.rows, "seq_len": args.seq_len, "repeats": args.repeats,
                   "gather_steps": args.gather_steps, "tokenizer": described, "device": device},
        "encode": [{"batch": b, "images_per_s": rate} for b, rate in encoded],
        "read": {"token_bytes": nbytes, "file_bytes": sizes,
                 "paths": [{"path": n, "seconds": sec, "gb_per_s": gb} for n, sec, gb in reads]},
        "gather": [{"tokens_from": src, "batch": b, "sequences_per_s": r, "gb_per_s": r * row_bytes / 1e9}
                   for src, b, r in gathered],
        "goal_gb_per_s": GOAL_GB_PER_S,
        "goal_met": touched >= GOAL_GB_PER_S,
    }  # fmt: skip
    write_results("tokens", figures, argv=None if argv is None else ["benchmarks/tokens.py", *argv])
    print(f"whole benchmark (cache writing, imports and clean-up included): {time.perf_counter() - SCRIPT_START:.1f} s")
    return 0  # a benchmark, not a test: a missed goal is reported, not an error


if __name__ == "__main__":
    sys.exit(main())
