"""Progress of a long loop: a tqdm bar on a terminal, one plain line every few seconds elsewhere.

Off a terminal (``arpipe run`` streams each stage through a pipe into the Prefect log, DVC's
output captured to a file) a bar's carriage-return redraws arrive as dozens of fragments, many
stuck at 0%. There a loop prints ``<desc>: 750/1500 step (50%), 12.3 step/s, 1m01s left,
loss=3.812`` every ``TQDM_MININTERVAL`` seconds (default 10) and one closing line. ``TQDM_DISABLE=1``
silences both, as tqdm does.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
DEFAULT_INTERVAL_S = 10.0


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() not in {"", "0", "false", "no", "off"}


def progress(
    iterable: Iterable[T],
    *,
    desc: str,
    unit: str = "it",
    total: int | None = None,
    initial: int = 0,
    disable: bool = False,
    leave: bool = True,
    mininterval: float | None = None,
):
    """Iterate ``iterable`` with progress: ``tqdm`` when stderr is a terminal, else ``LineProgress``.
    Both take ``set_postfix``/``set_description``; ``total`` defaults to ``len(iterable)``."""
    if total is None and hasattr(iterable, "__len__"):
        total = initial + len(iterable)  # type: ignore[arg-type]
    if sys.stderr.isatty():
        from tqdm import tqdm

        extra = {} if mininterval is None else {"mininterval": mininterval}
        return tqdm(iterable, desc=desc, unit=unit, total=total, initial=initial, disable=disable, leave=leave,
                    **extra)  # fmt: skip
    return LineProgress(iterable, desc=desc, unit=unit, total=total, initial=initial,
                        disable=disable or _env_flag("TQDM_DISABLE"), leave=leave)  # fmt: skip


class LineProgress:
    """One line per interval (and one at the end when ``leave``) on stderr; no carriage returns."""

    def __init__(self, iterable: Iterable[T], *, desc: str, unit: str, total: int | None, initial: int = 0,
                 disable: bool = False, leave: bool = True):  # fmt: skip
        self.iterable, self.desc, self.unit, self.total = iterable, desc, unit, total
        self.n, self.initial, self.disable, self.leave = initial, initial, disable, leave
        self.postfix = ""
        self.interval = float(os.environ.get("TQDM_MININTERVAL") or DEFAULT_INTERVAL_S)
        self.started = self.last = time.monotonic()
        self.first: tuple[float, int] | None = None  # (time, n) at the first item: start-up is not throughput

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.first is None:
            self.first = (now, self.n)
        if not self.disable and now - self.last >= self.interval:
            self.last = now
            print(self.line(now), file=sys.stderr, flush=True)

    def line(self, now: float, final: bool = False) -> str:
        elapsed = max(now - self.started, 1e-9)
        since, at = self.first or (now, self.n)
        rate = (self.n - at) / (now - since) if self.n > at and now > since else 0.0
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        if final:
            parts = [f"{count} {self.unit}{share} in {_duration(elapsed)}"]
        else:
            parts = [f"{count} {self.unit}{share}"] + ([f"{rate:.3g} {self.unit}/s"] if rate > 0 else [])
            if self.total and rate > 0:
                parts.append(f"{_duration((self.total - self.n) / rate)} left")
        if self.postfix:
            parts.append(self.postfix)
        return f"{self.desc}: " + ", ".join(parts)

    def __iter__(self) -> Iterator[T]:
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def close(self) -> None:
        if self.disable:
            return
        self.disable = True  # once
        if self.leave:
            print(self.line(time.monotonic(), final=True), file=sys.stderr, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
