"""Questions asked of the token cache (``{train,val}.parquet``), answered by DuckDB.

``token_stats(tokens_dir)`` counts rows per split x view x class, summarises the histogram of
codes per split and over both (distinct codes, min/median/max occurrences of a used code, entropy
in bits and perplexity = 2**entropy), and lists the codebook entries no row uses. The vocabulary
size comes from the Parquet metadata written by ``core.token_store.write_tokens``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import duckdb

from core.token_store import read_metadata

SPLITS = ("train", "val")


@dataclass(frozen=True)
class CodeHistogram:
    tokens: int
    """Token occurrences (rows x seq_len)."""
    distinct: int
    """Codes that occur at least once."""
    min_count: int
    """Occurrences of the rarest used code (unused codes are listed apart)."""
    median_count: float
    max_count: int
    entropy_bits: float
    """Entropy of the code distribution; log2(vocab_size) when every code is equally frequent."""

    @property
    def perplexity(self) -> float:
        return 2.0**self.entropy_bits


@dataclass(frozen=True)
class TokenStats:
    tokens_dir: Path
    vocab_size: int
    seq_len: int
    token_layout: dict
    fingerprint: str
    rows: list[tuple[str, int, int, int]]
    """(split, view, label, rows), ordered by label, split, view."""
    histograms: dict[str, CodeHistogram]
    """Per split, and ``all`` over both."""
    unused: list[int]
    """Code ids that no row of any split uses, ascending."""


def token_stats(tokens_dir: str | Path) -> TokenStats:
    tokens_dir = Path(tokens_dir)
    files = {split: tokens_dir / f"{split}.parquet" for split in SPLITS}
    for file in files.values():
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found: build the token cache first (dvc repro cache_tokens)")
    meta = {split: read_metadata(file) for split, file in files.items()}
    vocab_sizes = {int(m["vocab_size"]) for m in meta.values()}
    fingerprints = {m["fingerprint"] for m in meta.values()}
    if len(vocab_sizes) != 1 or len(fingerprints) != 1:
        raise ValueError(f"{tokens_dir}: train and val were written by different tokenizers; re-run cache_tokens")
    (vocab_size,) = vocab_sizes

    con = duckdb.connect()
    selects = [f"SELECT '{split}' AS split, * FROM read_parquet('{_sql_path(file)}')" for split, file in files.items()]
    con.execute(f"CREATE VIEW cache AS {' UNION ALL '.join(selects)}")
    con.execute("CREATE VIEW codes AS SELECT split, unnest(tokens) AS code FROM cache")
    rows = con.execute(
        "SELECT split, view, label, count(*) FROM cache GROUP BY ALL ORDER BY label, split, view"
    ).fetchall()
    histograms = {split: _histogram(con, f"WHERE split = '{split}'") for split in SPLITS}
    histograms["all"] = _histogram(con, "")
    unused = [
        code
        for (code,) in con.execute(
            f"SELECT i FROM range({vocab_size}) t(i) WHERE i NOT IN (SELECT DISTINCT code FROM codes) ORDER BY i"
        ).fetchall()
    ]
    con.close()
    return TokenStats(
        tokens_dir=tokens_dir,
        vocab_size=vocab_size,
        seq_len=int(meta["train"]["seq_len"]),
        token_layout=meta["train"]["token_layout"],
        fingerprint=meta["train"]["fingerprint"],
        rows=[(split, int(view), int(label), int(n)) for split, view, label, n in rows],
        histograms=histograms,
        unused=unused,
    )


def _histogram(con: duckdb.DuckDBPyConnection, where: str) -> CodeHistogram:
    """Occurrences per code, then their summary; entropy = -sum p log2 p over used codes."""
    tokens, distinct, low, median, high, entropy = con.execute(
        f"""
        WITH counts AS (SELECT code, count(*) AS n FROM codes {where} GROUP BY code),
             probs AS (SELECT n, n / sum(n) OVER () AS p FROM counts)
        SELECT coalesce(sum(n), 0), count(*), min(n), median(n), max(n), coalesce(-sum(p * log2(p)), 0)
        FROM probs
        """
    ).fetchone()
    return CodeHistogram(
        tokens=int(tokens),
        distinct=int(distinct),
        min_count=int(low or 0),
        median_count=float(median or 0),
        max_count=int(high or 0),
        entropy_bits=max(float(entropy), 0.0),  # -0.0 when a single code is used
    )


def _sql_path(path: Path) -> str:
    return str(path).replace("'", "''")


def format_token_stats(stats: TokenStats, show_unused: int = 32) -> str:
    """A plain-text report: the class x split/view table, the code histogram, the unused codes."""
    layout = stats.token_layout
    shape = "x".join(map(str, layout["grid"])) if "grid" in layout else "scales " + ",".join(map(str, layout["scales"]))
    out = [
        f"token cache {stats.tokens_dir}: {stats.seq_len} tokens per image ({layout['kind']} {shape}), "
        f"vocabulary {stats.vocab_size}, tokenizer {stats.fingerprint[:12]}",
        "",
    ]
    columns = sorted({(split, view) for split, view, _, _ in stats.rows}, key=lambda c: (c[0] != "train", c))
    per_label: dict[int, dict[tuple[str, int], int]] = {}
    for split, view, label, n in stats.rows:
        per_label.setdefault(label, {})[(split, view)] = n
    header = ["class", *(f"{split} v{view}" for split, view in columns), "total"]
    body = [
        [str(label), *(f"{counts.get(c, 0):,}" for c in columns), f"{sum(counts.values()):,}"]
        for label, counts in sorted(per_label.items())
    ]
    totals = [sum(counts.get(c, 0) for counts in per_label.values()) for c in columns]
    footer = ["total", *(f"{t:,}" for t in totals), f"{sum(totals):,}"]
    out += _table(header, body, footer) + [""]

    names = list(stats.histograms)
    h = stats.histograms
    rows = [
        ["tokens", *(f"{h[n].tokens:,}" for n in names)],
        ["distinct codes", *(f"{h[n].distinct:,}" for n in names)],
        ["min count", *(f"{h[n].min_count:,}" for n in names)],
        ["median count", *(f"{h[n].median_count:,.1f}" for n in names)],
        ["max count", *(f"{h[n].max_count:,}" for n in names)],
        ["entropy (bits)", *(f"{h[n].entropy_bits:.3f}" for n in names)],
        ["perplexity", *(f"{h[n].perplexity:,.1f}" for n in names)],
    ]
    out += _table(["codes", *names], rows)
    out.append(
        f"(a uniform use of all {stats.vocab_size} codes: {math.log2(stats.vocab_size):.3f} bits, "
        f"perplexity {stats.vocab_size:,}; counts are over used codes)"
    )
    out.append("")
    if stats.unused:
        shown = ", ".join(map(str, stats.unused[:show_unused]))
        more = f", ... ({len(stats.unused) - show_unused} more)" if len(stats.unused) > show_unused else ""
        out.append(f"never used: {len(stats.unused)} of {stats.vocab_size} codes: {shown}{more}")
    else:
        out.append(f"never used: none (all {stats.vocab_size} codes occur)")
    return "\n".join(out)


def _table(header: list[str], body: list[list[str]], footer: list[str] | None = None) -> list[str]:
    """First column left-aligned, figures right-aligned; a rule under the header (and above the footer)."""
    every = [header, *body, *([footer] if footer else [])]
    widths = [max(len(row[i]) for row in every) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    rule = line(["-" * w for w in widths])
    return [line(header), rule, *map(line, body), *([rule, line(footer)] if footer else [])]
