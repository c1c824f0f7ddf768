"""One pipeline run per checkout: an exclusive ``flock`` on ``.arpipe/pipeline.lock``.

``arpipe run`` takes the lock before starting the flow. A second run fails at once with a
message naming the running one (pid, command, start time and, once known, its Prefect flow run),
or waits for it with ``wait=True``. The kernel releases the lock when the holder exits, however
it exits, so a crashed run never leaves a stale lock; the JSON beside it is only a description.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = "pipeline.lock"
INFO_FILE = "pipeline.json"


class PipelineBusy(RuntimeError):
    """Another pipeline run holds the lock; the message names it."""


def _state_dir(root: str | Path) -> Path:
    path = Path(root) / ".arpipe"
    path.mkdir(parents=True, exist_ok=True)
    return path


def holder(root: str | Path) -> dict:
    """What the current (or last) holder wrote about itself; {} when nothing was written."""
    try:
        return json.loads((_state_dir(root) / INFO_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def describe(info: dict) -> str:
    if not info:
        return "another arpipe run"
    parts = [f"pid {info.get('pid')}", f"started {info.get('started', '?')}"]
    if info.get("flow_run_name"):
        parts.append(f"flow run '{info['flow_run_name']}' ({info.get('flow_run_id', '')})")
    return f"arpipe run `{info.get('command', '?')}` ({', '.join(parts)})"


@contextmanager
def pipeline_lock(root: str | Path, *, wait: bool = False, poll_s: float = 1.0) -> Iterator[None]:
    """Hold the checkout's pipeline lock for the body; raise ``PipelineBusy`` if another run holds it
    (or, with ``wait``, block until it is free, printing once who is running)."""
    state = _state_dir(root)
    handle = open(state / LOCK_FILE, "a+")  # noqa: SIM115 - held for the body's lifetime
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            running = describe(holder(root))
            if not wait:
                raise PipelineBusy(
                    f"{running} is already running in {Path(root).resolve()}; wait for it to finish, "
                    "or run again with --wait to queue behind it"
                ) from None
            print(f"waiting for {running} to finish ...", file=sys.stderr, flush=True)
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    time.sleep(poll_s)
        info = {
            "pid": os.getpid(),
            "command": " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:]),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }
        (state / INFO_FILE).write_text(json.dumps(info) + "\n")
        yield
    finally:
        handle.close()  # releases the flock


def annotate(root: str | Path, **fields: str) -> None:
    """Add fields (e.g. the Prefect flow run) to the holder description, if this process holds it."""
    info = holder(root)
    if info.get("pid") == os.getpid():
        info.update(fields)
        (_state_dir(root) / INFO_FILE).write_text(json.dumps(info) + "\n")
