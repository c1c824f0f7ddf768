"""Questions asked of the shard manifest, answered by DuckDB over the Parquet files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import duckdb


@dataclass
class DataStats:
    splits: list[str]
    class_counts: list[tuple[str, dict[str, int]]]  # (class_name, {split: count}) in label order
    duplicate_keys: int  # manifest rows sharing a sha256 (0 unless the shards were edited by hand)
    duplicates: int  # inputs dropped as copies of an accepted image
    rejects: list[tuple[str, int]]  # (reason, count), most frequent first
    seen: int


def data_stats(shards_dir: str | Path) -> DataStats:
    shards_dir = Path(shards_dir)
    manifest = shards_dir / "manifest.parquet"
    rejected = shards_dir / "rejected.parquet"
    for file in (manifest, rejected):
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found: run the shard stage first (arpipe run --until shard)")
    con = duckdb.connect()
    con.execute(f"CREATE VIEW manifest AS SELECT * FROM read_parquet('{_sql_path(manifest)}')")
    con.execute(f"CREATE VIEW rejected AS SELECT * FROM read_parquet('{_sql_path(rejected)}')")
    splits = [
        s for (s,) in con.execute("SELECT DISTINCT split FROM manifest ORDER BY split <> 'train', split").fetchall()
    ]
    rows = con.execute(
        "SELECT label, class_name, split, count(*) FROM manifest GROUP BY ALL ORDER BY label, split"
    ).fetchall()
    per_class: dict[tuple[int, str], dict[str, int]] = {}
    for label, name, split, count in rows:
        per_class.setdefault((label, name), {})[split] = count
    (duplicate_keys,) = con.execute(
        "SELECT coalesce(sum(n - 1), 0) FROM (SELECT count(*) AS n FROM manifest GROUP BY sha256)"
    ).fetchone()
    (duplicates,) = con.execute("SELECT count(*) FROM rejected WHERE kind = 'duplicate'").fetchone()
    rejects = con.execute(
        "SELECT reason_kind, count(*) AS n FROM ("
        "  SELECT regexp_replace(reason, ':.*$', '') AS reason_kind FROM rejected WHERE kind = 'invalid')"
        " GROUP BY reason_kind ORDER BY n DESC, reason_kind"
    ).fetchall()
    (accepted,) = con.execute("SELECT count(*) FROM manifest").fetchone()
    (refused,) = con.execute("SELECT count(*) FROM rejected").fetchone()
    con.close()
    return DataStats(
        splits=splits,
        class_counts=[(name, counts) for (_, name), counts in sorted(per_class.items())],
        duplicate_keys=int(duplicate_keys),
        duplicates=int(duplicates),
        rejects=[(reason, int(n)) for reason, n in rejects],
        seen=int(accepted + refused),
    )


def _sql_path(path: Path) -> str:
    return str(path).replace("'", "''")


def format_stats(stats: DataStats) -> str:
    """A plain-text report: split x class table, then duplicates and rejects."""
    header = ["class", *stats.splits, "total"]
    body = [
        [name, *(str(counts.get(s, 0)) for s in stats.splits), str(sum(counts.values()))]
        for name, counts in stats.class_counts
    ]
    totals = [sum(c.get(s, 0) for _, c in stats.class_counts) for s in stats.splits]
    body.append(["total", *(str(t) for t in totals), str(sum(totals))])
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    out = [line(header), line(["-" * w for w in widths]), *map(line, body[:-1])]
    out += [line(["-" * w for w in widths]), line(body[-1]), ""]
    out.append(
        f"seen {stats.seen} = accepted {sum(totals)} + rejected "
        f"{sum(n for _, n in stats.rejects)} + duplicates {stats.duplicates}"
    )
    if stats.duplicate_keys:
        out.append(f"warning: {stats.duplicate_keys} manifest rows share a sha256 with another row")
    if stats.rejects:
        out.append("rejected by reason:")
        out += [f"  {n:>6}  {reason}" for reason, n in stats.rejects]
    return "\n".join(out)
