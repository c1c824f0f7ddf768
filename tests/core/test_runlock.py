"""One pipeline run per checkout: a second run fails fast naming the first, or waits for it."""

import subprocess
import sys
import textwrap
import threading
import time

import pytest
from helpers import REPO

from core.runlock import PipelineBusy, annotate, holder, pipeline_lock


def hold_in_subprocess(root, seconds: float) -> subprocess.Popen:
    """Another process holding the lock (flock is per open file, so a thread would not do)."""
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from core.runlock import annotate, pipeline_lock
        with pipeline_lock({str(root)!r}):
            annotate({str(root)!r}, flow_run_name="brave-otter", flow_run_id="f-123")
            print("held", flush=True)
            time.sleep({seconds})
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_run_fails_fast_naming_the_running_flow(tmp_path):
    proc = hold_in_subprocess(tmp_path, 30)
    try:
        start = time.monotonic()
        with pytest.raises(PipelineBusy, match=r"pid \d+.*flow run 'brave-otter' \(f-123\).*--wait"):
            with pipeline_lock(tmp_path):
                pass
        assert time.monotonic() - start < 2
    finally:
        proc.kill()
        proc.wait()
    with pipeline_lock(tmp_path):  # the kernel released the dead holder's lock: no stale lock
        assert holder(tmp_path)["pid"] != proc.pid


def test_wait_queues_behind_the_running_one(tmp_path):
    proc = hold_in_subprocess(tmp_path, 1.5)
    entered = threading.Event()
    start = time.monotonic()
    with pipeline_lock(tmp_path, wait=True, poll_s=0.1):
        entered.set()
        waited = time.monotonic() - start
    proc.wait()
    assert entered.is_set() and waited >= 1.0


def test_annotate_only_touches_our_own_description(tmp_path):
    annotate(tmp_path, flow_run_name="x")  # not holding: nothing written
    assert holder(tmp_path) == {}
    with pipeline_lock(tmp_path):
        annotate(tmp_path, flow_run_name="calm-fox")
        assert holder(tmp_path)["flow_run_name"] == "calm-fox"
