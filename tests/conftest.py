import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("ARPIPE_TRACKING", "off")  # unit tests never touch the user's MLflow store
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs 2 workers (-n 2): one thread per worker and per stage subprocess it starts,
    # so the two share 2 cores instead of oversubscribing them (set before torch is imported)
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"


REPO = Path(__file__).resolve().parents[1]
# Created by tools, not by tests: pytest's, ruff's and import-linter's caches, bytecode, coverage.
_TOOL_OUTPUTS = {".pytest_cache", "__pycache__", ".coverage", ".ruff_cache", ".import_linter_cache"}


@pytest.fixture(autouse=True)
def _tests_write_nothing_into_the_checkout():
    """Fail the test that leaves a new top-level file or folder in the checkout (e.g. MLflow's
    default ./mlruns, or a stage's default ``.arpipe/last_run``): tests write into tmp_path only."""
    before = {p.name for p in REPO.iterdir()}
    yield
    new = sorted({p.name for p in REPO.iterdir()} - before - _TOOL_OUTPUTS)
    assert not new, f"tests left {', '.join(new)} in {REPO}: write into tmp_path instead"


@pytest.fixture(autouse=True)
def _tests_leave_mlflow_on_the_environments_store():
    """Fail the test that calls ``mlflow.set_tracking_uri``: the process-wide URI it sets outlives
    the test and silently points later tests (in this worker) at its deleted store. Tests set
    MLFLOW_TRACKING_URI with monkeypatch (``mlflow_store``) instead."""
    yield
    utils = sys.modules.get("mlflow.tracking._tracking_service.utils")
    leaked = getattr(utils, "_tracking_uri", None)
    if leaked is not None:
        utils._tracking_uri = None
        pytest.fail(f"the test set MLflow's process-wide tracking URI ({leaked}); use the mlflow_store fixture")


@pytest.fixture
def shard_run(tmp_path):
    """Run the shard stage into tmp_path; returns (metrics, shards_dir)."""
    from core.config import Paths
    from core.tracking import NullTracker
    from stages.shard import Config, run

    def _run(out_name: str = "shards", **overrides):
        paths = Paths(shards=str(tmp_path / out_name), metrics=str(tmp_path / "metrics"))
        cfg = Config(**{"num_workers": 0, **overrides})
        return run(cfg, paths, NullTracker()), Path(paths.shards)

    return _run


@pytest.fixture(scope="session")
def mlflow_template_db(tmp_path_factory) -> Path:
    """One migrated MLflow sqlite DB per session (migrations cost ~3 s); tests copy it."""
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def mlflow_store(tmp_path, mlflow_template_db, monkeypatch):
    """A private, already-migrated MLflow store; tracking switched on for the test."""
    import shutil

    db = tmp_path / "mlruns" / "mlflow.db"
    db.parent.mkdir()
    shutil.copy(mlflow_template_db, db)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("ARPIPE_TRACKING", "on")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    return uri


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API (its own database) per session, for flow and deployment tests."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def tiny_caches(tmp_path_factory):
    """8 px digit shards plus, per tokenizer kind (vq, msvq), a 4-step tokenizer and its token
    cache; shared read-only by the AR-stage tests. Returns {kind: Paths}."""
    from helpers import TINY_TOKENIZERS

    from core.config import Paths
    from core.tracking import NullTracker
    from stages import cache_tokens, shard, train_tokenizer

    root = tmp_path_factory.mktemp("tiny-caches")
    shards = root / "shards"
    shard.run(
        shard.Config(image_size=8, num_workers=0), Paths(shards=str(shards), metrics=str(root / "m")), NullTracker()
    )
    out = {}
    for kind in ("vq", "msvq"):
        paths = Paths(
            shards=str(shards),
            metrics=str(root / kind / "m"),
            plots=str(root / kind / "p"),
            tokenizer=str(root / kind / "tokenizer"),
            tokens=str(root / kind / "tokens"),
            resume=str(root / kind / "r"),
        )
        cfg = train_tokenizer.Config(
            kind=kind, model=TINY_TOKENIZERS[kind], steps=4, batch_size=16, save_every=0, num_grid=2
        )
        train_tokenizer.run(cfg, paths, NullTracker())
        cache_tokens.run(cache_tokens.Config(batch_size=512, hflip=True), paths, NullTracker())
        out[kind] = paths
    return out
