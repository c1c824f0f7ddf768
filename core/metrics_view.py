"""``arpipe metrics``: the stages' ``metrics/<stage>.json`` in long format, one line per key.

``dvc metrics show`` puts every key of every file in one wide row (165 columns here, mostly
``-``); this reads one block per stage, ``base.cfg1.fid  3.897``, and with a git revision the
value there and the change beside it (a readable ``dvc metrics diff``). Not a DVC dependency of
any stage (unlike ``core/metrics.py``), so changing it re-runs nothing.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from core.config import flatten_params

MISSING = "–"  # a stage or key absent on one side of the comparison


@dataclass
class MetricsView:
    rev: str | None  # the git revision compared against; None: the workspace alone
    blocks: dict[str, list[tuple[str, Any, Any]]] = field(default_factory=dict)
    """stage -> (dotted key, workspace value, value at ``rev``); ``None`` where absent."""


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)


def _pipeline_order(root: Path, names: set[str]) -> list[str]:
    """``names`` in dvc.yaml's stage order, then any others alphabetically."""
    try:
        stages = list((yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages") or {})
    except (OSError, yaml.YAMLError, AttributeError):
        stages = []
    return [s for s in stages if s in names] + sorted(names - set(stages))


def _parse(text: str, where: str) -> dict[str, Any]:
    try:
        return flatten_params(json.loads(text))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def _files_at(root: Path, metrics_dir: str, rev: str) -> dict[str, str]:
    """stage -> its metrics file's text at ``rev`` (``git show REV:path``)."""
    if _git(root, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}").returncode != 0:
        raise ValueError(f"--rev {rev}: not a commit of the git repository in {root}")
    listed = _git(root, "ls-tree", "--name-only", rev, "--", f"{metrics_dir}/").stdout.splitlines()
    texts = {}
    for name in (Path(line) for line in listed if line.endswith(".json")):
        texts[name.stem] = _git(root, "show", f"{rev}:./{metrics_dir}/{name.name}").stdout
    return texts


def read_metrics(root: Path, metrics_dir: Path, stages: tuple[str, ...] = (), rev: str | None = None) -> MetricsView:
    """The metrics of ``stages`` (default: every stage with a metrics file) in the workspace and,
    with ``rev``, at that git revision. An unknown stage fails naming the known ones."""
    metrics_dir = metrics_dir.relative_to(root) if metrics_dir.is_absolute() else metrics_dir
    current = {path.stem: path for path in sorted((root / metrics_dir).glob("*.json"))}
    old_texts = _files_at(root, metrics_dir.as_posix(), rev) if rev else {}
    known = _pipeline_order(root, set(current) | set(old_texts))
    unknown = [stage for stage in stages if stage not in known]
    if unknown:
        raise ValueError(
            f"unknown stage {unknown[0]!r}: stages with metrics in {metrics_dir}/: {', '.join(known) or 'none'}"
        )
    view = MetricsView(rev=rev)
    for stage in stages or known:
        now = _parse(current[stage].read_text(), str(current[stage])) if stage in current else {}
        old = _parse(old_texts[stage], f"{rev}:{metrics_dir}/{stage}.json") if stage in old_texts else {}
        keys = list(now) + [key for key in old if key not in now]
        view.blocks[stage] = [(key, now.get(key), old.get(key)) for key in keys]
    return view


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def format_value(value: Any) -> str:
    """Floats to 4 significant digits; integers (counts, steps) whole; absent as ``–``."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    return value if isinstance(value, str) else json.dumps(value)


def format_change(now: Any, old: Any) -> str:
    if now is None or old is None:
        return MISSING
    if not (_is_number(now) and _is_number(old)):
        return "" if now == old else "changed"
    change = now - old
    if change == 0:
        return "0"
    return f"{change:+d}" if isinstance(change, int) else f"{change:+.4g}"


def _rows(view: MetricsView) -> list[tuple[str, str, list[str]]]:
    """(stage, key, cells): the workspace value, then with a revision the old value and the change."""
    rows = []
    for stage, entries in view.blocks.items():
        for key, now, old in entries:
            cells = [format_value(now)]
            if view.rev:
                cells = [format_value(old), cells[0], format_change(now, old)]
            rows.append((stage, key, cells))
    return rows


def format_metrics(view: MetricsView, fmt: str = "table") -> str:
    """``table``: a block per stage, keys indented; ``md``: one markdown table; ``csv``: unrounded."""
    header = [view.rev, "workspace", "change"] if view.rev else ["value"]
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["stage", "metric", *header])
        for stage, entries in view.blocks.items():
            for key, now, old in entries:
                raw = [old, now, format_change(now, old)] if view.rev else [now]
                writer.writerow([stage, key, *("" if v is None else v for v in raw)])
        return buffer.getvalue()
    rows = _rows(view)
    if fmt == "md":
        lines = ["| " + " | ".join(["stage", "metric", *header]) + " |", "|---|---|" + "--:|" * len(header)]
        lines += ["| " + " | ".join([stage, key, *cells]) + " |" for stage, key, cells in rows]
        return "\n".join(lines) + "\n"
    key_width = max([len(key) + 2 for _, key, _ in rows] + [len(s) for s in view.blocks], default=0)
    # a long string (``sar.skipped``'s reason) overflows its column rather than widening every row
    widths = [max([len(h)] + [min(len(cells[i]), 12) for *_, cells in rows]) for i, h in enumerate(header)]
    lines = []
    for stage in view.blocks:
        heading = [h.rjust(w) for h, w in zip(header, widths, strict=True)] if view.rev else []
        lines.append("  ".join([stage.ljust(key_width), *heading]).rstrip())
        for _, key, cells in (row for row in rows if row[0] == stage):
            lines.append(
                "  ".join([f"  {key}".ljust(key_width), *(c.rjust(w) for c, w in zip(cells, widths, strict=True))])
            )
        lines.append("")
    return "\n".join(lines)
