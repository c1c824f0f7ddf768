"""`arpipe ui` in a real browser: headless Chromium, driven by Playwright, on the MLflow UI of a
tiny pipeline's store (a pipeline run with real `shard` and `train_tokenizer` stage runs nested
under it), started through the command users run. Checks what a user looks for: the saved view's
key-metric columns, the stage runs nested in the experiment's runs table, their metrics in the
run-compare view and on each run's page, and their sample images in the artifact viewer with the
pixels MLflow stored.

Needs Debian's chromium (`make browser-deps`) and the dev extra's playwright; it never downloads a
browser. Outside CI it is skipped when they are missing; in CI (env CI set) it fails instead.
Screenshots land in the test's tmp folder and, when ARPIPE_SCREENSHOTS names a folder, there too.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, TINY_TOKENIZERS
from PIL import Image

pytestmark = pytest.mark.slow

CHROMIUM = Path(os.environ.get("ARPIPE_CHROMIUM", "/usr/bin/chromium"))
# Without the background-networking flags Chromium keeps dialling Google's hosts, which a closed
# network refuses; Playwright gives every launch a fresh, empty profile (user data dir).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# The image as the browser decoded it: [[width, height], sum of its R, G and B values].
PIXELS_JS = """img => {
    const canvas = document.createElement("canvas");
    [canvas.width, canvas.height] = [img.naturalWidth, img.naturalHeight];
    const context = canvas.getContext("2d");
    context.drawImage(img, 0, 0);
    const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
    let sum = 0;
    for (let i = 0; i < data.length; i++) if (i % 4 !== 3) sum += data[i];
    return [[img.naturalWidth, img.naturalHeight], sum];
}"""
SERVER_START_S = 180  # `mlflow server` needs ~9 s on an idle machine, far more on a busy one
UI_TIMEOUT_MS = 60_000  # per wait for the React app to render something


@pytest.fixture
def sync_playwright():
    """Playwright's sync API, or a skip (a failure in CI) naming what is missing; checked before
    the store and the server are built."""
    missing = []
    if not CHROMIUM.is_file():
        missing.append(f"Chromium ({CHROMIUM}; `make browser-deps` installs Debian's chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
        missing.append("the playwright package (`pip install -e .[dev]`)")
    if missing:
        message = "browser test needs " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(message + " (in CI it must run: .ci/run installs both)")
        pytest.skip(message)
    return sync_playwright


@pytest.fixture
def pipeline_store(tmp_path, mlflow_store, monkeypatch):
    """A pipeline run with two real stage runs nested under it, as `arpipe run` records them:
    shard (8 px digits) and a 4-step tokenizer, each with its metrics and sample image."""
    from core.config import Paths, as_flat_dict
    from core.lineage import PipelineRun
    from core.tracking import stage_run
    from stages import shard, train_tokenizer

    (tmp_path / "dvc.yaml").write_text("stages: {}\n")  # a project root, for `arpipe ui`
    pipeline = PipelineRun(tmp_path, flow_run_id=None)
    monkeypatch.setenv("ARPIPE_PARENT_RUN_ID", pipeline.run_id)
    paths = Paths(
        shards=str(tmp_path / "shards"),
        metrics=str(tmp_path / "metrics"),
        plots=str(tmp_path / "plots"),
        tokenizer=str(tmp_path / "tokenizer"),
        resume=str(tmp_path / "resume"),
    )
    configs = {
        "shard": (shard, shard.Config(image_size=8, num_workers=0)),
        "train_tokenizer": (
            train_tokenizer,
            train_tokenizer.Config(kind="vq", model=TINY_TOKENIZERS["vq"], steps=4, batch_size=16, num_grid=4),
        ),
    }
    runs = {}
    for stage, (module, cfg) in configs.items():
        with stage_run(stage, {f"{stage}.{k}": v for k, v in as_flat_dict(cfg).items()}) as tracker:
            metrics = module.run(cfg, paths, tracker)
        pipeline.record_stage(stage, "ran", metrics)
        runs[stage] = {"run_id": tracker.run_id, "metrics": metrics}
    pipeline.finish("FINISHED")
    return runs


@pytest.fixture
def ui_url(pipeline_store, tmp_path):
    """`arpipe ui` on a free 127.0.0.1 port over the store; yields the runs URL it prints."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path / "arpipe-ui.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "arpipe.cli", "ui", "--port", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the server's workers stop with it
        )
    try:
        deadline = time.monotonic() + SERVER_START_S
        while not _healthy(port):
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"`arpipe ui` did not answer on port {port}:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        printed = re.search(r"runs: (\S+)", log.read_text())
        assert printed, f"`arpipe ui` printed no runs URL:\n{log.read_text()}"
        yield printed.group(1)
    finally:
        _stop_group(server)


def _stop_group(leader: subprocess.Popen, timeout_s: float = 30) -> None:
    """SIGTERM `arpipe ui`'s process group (it, `mlflow server`, uvicorn), SIGKILL what is left
    after `timeout_s`; returns once no live process of the group remains."""
    with contextlib.suppress(ProcessLookupError):  # it may have exited on its own
        os.killpg(leader.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        leader.poll()  # reap our own child; the others are reaped by init
        if not _live_members(leader.pid):
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(leader.pid, signal.SIGKILL)
    leader.wait()


def _live_members(group: int) -> list[int]:
    """Processes of process group `group` that are not zombies (Linux /proc)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)"
        except OSError:
            continue  # exited meanwhile
        if int(fields[2]) == group and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture
def screenshots(tmp_path):
    """Folder for the screenshots; copied to $ARPIPE_SCREENSHOTS (when set) after the test."""
    folder = tmp_path / "screenshots"
    folder.mkdir()
    yield folder
    if target := os.environ.get("ARPIPE_SCREENSHOTS"):
        Path(target).mkdir(parents=True, exist_ok=True)
        for png in folder.glob("*.png"):
            shutil.copy(png, Path(target) / png.name)


def test_the_mlflow_ui_shows_stage_runs_metrics_and_sample_images(sync_playwright, pipeline_store, ui_url, screenshots):
    from playwright.sync_api import expect

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.set_default_timeout(UI_TIMEOUT_MS)
            expect.set_options(timeout=UI_TIMEOUT_MS)

            # 1. The runs table `arpipe ui` points to: the pipeline run, its stage runs nested under it.
            page.goto(ui_url)
            pipeline_link = page.get_by_role("link", name="pipeline", exact=True)
            expect(pipeline_link).to_be_visible()
            close_assistant = page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]')
            if close_assistant.is_visible():  # a chat side panel that only hides the table
                close_assistant.click()
            row = page.locator(".ag-row", has=pipeline_link)
            # It opens the saved view: the key metrics as columns (core/compare.py save_runs_view),
            # here the tokenizer's PSNR, with the pipeline run's value on its line.
            psnr = f"{float(pipeline_store['train_tokenizer']['metrics']['val_psnr'])!r}"  # as JS prints it
            expect(page.get_by_role("columnheader", name="train_tokenizer/val_psnr").first).to_be_visible()
            line = page.locator(f'.ag-row[row-index="{row.get_attribute("row-index")}"]')
            expect(line.get_by_text(psnr, exact=True)).to_be_visible()
            for stage in pipeline_store:  # children stay folded until their parent is expanded
                expect(page.get_by_role("link", name=stage, exact=True)).to_have_count(0)
            row.get_by_role("button").click()
            stage_rows = {
                stage: page.locator(".ag-row", has=page.get_by_role("link", name=stage, exact=True))
                for stage in pipeline_store
            }
            for stage_row in stage_rows.values():
                expect(stage_row).to_be_visible()
            page.screenshot(path=screenshots / "experiment.png")

            # 2. The run-compare view, reached as a user does: tick the stage runs, press Compare.
            for stage_row in stage_rows.values():
                stage_row.get_by_role("checkbox").check()
            page.get_by_role("button", name="Compare", exact=True).click()
            expect(page.get_by_text(f"Comparing {len(stage_rows)} Runs")).to_be_visible()
            for stage, run in pipeline_store.items():
                expect(page.get_by_role("link", name=run["run_id"], exact=True)).to_be_visible()
                expect(page.get_by_text(stage, exact=True).first).to_be_visible()
            # Its metrics table shows only its first rows: MLflow 3.17 scrolls the values but not
            # their names, so only a metric near the top can be read off (shard's `accepted`).
            _expect_compare_row(page, "accepted", str(pipeline_store["shard"]["metrics"]["accepted"]))
            page.set_viewport_size({"width": 1600, "height": 2400})  # the page scrolls inside a panel
            page.screenshot(path=screenshots / "compare.png")
            page.set_viewport_size({"width": 1600, "height": 1000})

            # 3. Each stage run's page: its metrics, its pipeline run, its sample image as decoded by
            # the browser from the artifact MLflow stored.
            base, experiment, view = re.fullmatch(r"(.+)#/experiments/(\d+)/runs(\?.*)", ui_url).groups()
            # (MLflow name, metrics/<stage>.json key, artifact): the final PSNR ends the `val/psnr` curve
            shown = {
                "shard": ("accepted", "accepted", "preview.png"),
                "train_tokenizer": ("val/psnr", "val_psnr", "reconstructions.png"),
            }
            for stage, (metric, key, artifact) in shown.items():
                run_id = pipeline_store[stage]["run_id"]
                page.goto(f"{base}#/experiments/{experiment}/runs/{run_id}{view}")
                expect(page.get_by_role("heading", name=stage, exact=True)).to_be_visible()
                value = f"{float(pipeline_store[stage]['metrics'][key])!r}".removesuffix(".0")  # as JS prints it
                expect(page.get_by_role("row", name=f"{metric} {value}", exact=True)).to_be_visible()
                expect(page.get_by_role("link", name="pipeline", exact=True)).to_be_visible()  # Parent run
                page.screenshot(path=screenshots / f"run-{stage}.png")

                page.get_by_role("tab", name="Artifacts").click()
                page.get_by_text(artifact, exact=True).first.click()
                image = page.locator(f'img[alt="{artifact}"]')
                expect(image).to_be_visible()
                page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
                _assert_shows_the_logged_image(image, run_id, artifact)
                page.screenshot(path=screenshots / f"artifact-{stage}.png")
        finally:
            browser.close()


def _expect_compare_row(page, metric: str, value: str) -> None:
    """The compare view's metrics table shows `value` on the line of `metric` (names and values
    are two virtualised grids side by side, so "same line" is "same height on screen")."""
    from playwright.sync_api import expect

    names, values = page.get_by_role("grid").first, page.get_by_role("grid").last
    name = names.get_by_text(metric, exact=True)
    cells = values.get_by_text(value, exact=True)
    expect(name).to_be_visible()
    expect(cells.first).to_be_visible()

    def middle(box):
        return box["y"] + box["height"] / 2

    line = middle(name.bounding_box())
    boxes = [cells.nth(i).bounding_box() for i in range(cells.count())]
    assert any(box and abs(middle(box) - line) < 8 for box in boxes), f"no {value} on the line of {metric}"


def _assert_shows_the_logged_image(image, run_id: str, artifact: str) -> None:
    """The <img> holds the artifact's pixels as MLflow stored them (read back through the tracking
    client, not the UI): same size, same sum of RGB values."""
    from mlflow import MlflowClient

    logged = np.asarray(Image.open(MlflowClient().download_artifacts(run_id, artifact)).convert("RGB"))
    assert logged.std() > 0, f"{artifact} is blank"
    (width, height), rgb_sum = image.evaluate(PIXELS_JS)
    assert (height, width) == logged.shape[:2], f"{artifact}: the browser shows {width}x{height} px"
    assert rgb_sum == int(logged.sum(dtype=np.int64)), f"{artifact}: the browser shows other pixels"
