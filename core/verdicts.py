"""Sentences that read evaluate's numbers: which FIDs are within noise of the best, and whether
the tokenizer is what caps them. ``report.md`` and the end-of-run summary print the same ones.

Input: the nested ``metrics/evaluate.json`` (``<checkpoint>/<guidance>/<metric>``), where each FID
may carry ``<key>_lo``/``<key>_hi``, its bootstrap interval (``models.metrics.fid_interval``), and
the bounds ``reconstruction/real`` (the tokenizer's ceiling) and ``train/real`` (the real-data
floor). Rows without an interval get no noise verdict. Pure Python: no torch, no files.
"""

from __future__ import annotations

import math

BOUNDS = ("reconstruction", "train")
INTERVAL_LEVEL = 0.9
"""Coverage of the intervals ``evaluate`` computes."""
INTERVAL = f"{INTERVAL_LEVEL:.0%} bootstrap intervals"
CEILING_RATIO = 3.0
"""The tokenizer caps the numbers when its reconstructions' FID is above this multiple of the
floor's (issue #21's aim: reconstructions within 3x of the real-data floor)."""
TOKENIZER_ADVICE = (
    "more tokens per image (one fewer downsampling in `train_tokenizer.model.channel_multipliers`, or "
    "larger `scales` for msvq), a larger `train_tokenizer.model.codebook_size`, perceptual and GAN losses "
    "(`train_tokenizer.perceptual_weights`, `train_tokenizer.disc_weight`) or more `train_tokenizer.steps`"
)


def _name(key: str) -> str:
    return {"fid": "FID", "inception_fid": "Inception FID"}.get(key, key)


def _finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def interval(row: dict, key: str = "fid") -> tuple[float, float] | None:
    """(lo, hi) of ``key`` in one row, or None when it has no interval."""
    lo, hi = row.get(f"{key}_lo"), row.get(f"{key}_hi")
    return (lo, hi) if _finite(lo) and _finite(hi) else None


def fid_cell(row: dict, key: str = "fid") -> str:
    """``3.152 [2.09, 4.21]``: the value and its interval when it has one; ``-`` when missing."""
    value = row.get(key)
    if not _finite(value):
        return "-"
    bounds = interval(row, key)
    return f"{value:.3f}" + (f" [{bounds[0]:.2f}, {bounds[1]:.2f}]" if bounds else "")


def within_noise(a: dict, b: dict, key: str = "fid") -> bool:
    """Whether two rows' intervals of ``key`` overlap (False when either has none)."""
    first, second = interval(a, key), interval(b, key)
    return first is not None and second is not None and first[0] <= second[1] and second[0] <= first[1]


def _rows(metrics: dict, guidance: str, key: str) -> dict[str, dict]:
    """{checkpoint: its row at ``guidance``} for the checkpoints whose ``key`` has an interval."""
    rows = {}
    for name, by_guidance in metrics.items():
        row = by_guidance.get(guidance) if isinstance(by_guidance, dict) and name not in BOUNDS else None
        if isinstance(row, dict) and _finite(row.get(key)) and interval(row, key):
            rows[name] = row
    return rows


def _bound(metrics: dict, name: str) -> dict:
    row = (metrics.get(name) or {}).get("real")
    return row if isinstance(row, dict) else {}


def noise_sentence(metrics: dict, guidance: str, key: str = "fid") -> str:
    """Which checkpoints' ``key`` at ``guidance`` are within noise of the lowest (their intervals
    overlap its interval), which are beyond it, and whether the lowest is within noise of the
    real-data floor. "" when no checkpoint there has an interval."""
    rows = _rows(metrics, guidance, key)
    if not rows:
        return ""
    ranked = sorted(rows, key=lambda name: rows[name][key])  # stable: file order on ties
    best, others = ranked[0], ranked[1:]
    near = [name for name in others if within_noise(rows[best], rows[name], key)]
    far = [name for name in others if name not in near]
    listed = lambda names: ", ".join(f"{name} {fid_cell(rows[name], key)}" for name in names)  # noqa: E731
    text = f"{_name(key)} at {guidance} with {INTERVAL}: {best} {fid_cell(rows[best], key)} is the lowest"
    if near:
        text += f"; within noise of it: {listed(near)} (the intervals overlap: this sample count does not order them)"
    if far:
        text += f"; beyond noise: {listed(far)}"
    floor = _bound(metrics, "train")
    if within_noise(rows[best], floor, key):
        text += f"; {best} is within noise of the real-data floor {fid_cell(floor, key)}"
    return text + "."


def bottleneck_sentence(metrics: dict, guidance: str, key: str = "fid") -> str:
    """One sentence when the tokenizer caps the numbers: its reconstructions score above
    ``CEILING_RATIO`` x the real-data floor, or the lowest checkpoint at ``guidance`` is within
    noise of the reconstructions while they are beyond noise above the floor. "" otherwise (or
    without both bounds)."""
    ceiling, floor = _bound(metrics, "reconstruction"), _bound(metrics, "train")
    if not (_finite(ceiling.get(key)) and _finite(floor.get(key))):
        return ""
    ratio = ceiling[key] / floor[key] if floor[key] > 0 else math.inf
    rows = _rows(metrics, guidance, key)
    best = min(rows, key=lambda name: rows[name][key]) if rows else None
    ceiling_bounds, floor_bounds = interval(ceiling, key), interval(floor, key)
    above_floor = ceiling_bounds is not None and floor_bounds is not None and ceiling_bounds[0] > floor_bounds[1]
    reached = best is not None and above_floor and within_noise(rows[best], ceiling, key)
    if ratio <= CEILING_RATIO and not reached:
        return ""
    why = f"{ratio:.1f}x; the aim is within {CEILING_RATIO:g}x" if ratio > CEILING_RATIO else f"{ratio:.1f}x"
    if reached:
        why += f", and {best} {fid_cell(rows[best], key)} at {guidance} is already within noise of them"
    return (
        f"The tokenizer is the bottleneck: its reconstructions score {_name(key)} "
        f"{fid_cell(ceiling, key)} vs the real-data floor {fid_cell(floor, key)} ({why}), so no AR model trained on "
        f"its tokens can beat {ceiling[key]:.3f}; improve the tokenizer: {TOKENIZER_ADVICE}."
    )


def verdicts(metrics: dict, select_metric: str, guidance: str) -> list[str]:
    """The sentences that apply at ``guidance``, on the FID of the selection metric's feature space
    (``inception_fid`` for an ``inception_*`` metric, else the evalnet's ``fid``)."""
    key = "inception_fid" if select_metric.startswith("inception_") else "fid"
    return [
        text for text in (noise_sentence(metrics, guidance, key), bottleneck_sentence(metrics, guidance, key)) if text
    ]
