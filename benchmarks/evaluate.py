"""Throughput of the evaluation metrics and wall time of the ``evaluate`` stage.

1. Metric throughput on synthetic features (N real vs N fake, D dims, seeded Gaussians): FID,
   precision/recall (k = 3, blocked k-NN) and Inception Score, in features/s; and the evalnet's
   feature extraction in images/s (``data/evalnet`` if present, else a freshly initialised net).
2. The ``evaluate`` stage end to end on the project's current outputs (``data/shards``,
   ``data/tokenizer``, ``data/evalnet``, ``data/models/*``) with the params.yaml defaults
   (``--samples-per-class`` to override), registry off, outputs in a temporary folder.
   Skipped with a message when those outputs do not exist yet (run ``make run`` first).

Run from the repository root::

    .venv/bin/python benchmarks/evaluate.py        # or: make bench
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python benchmarks/evaluate.py` puts benchmarks/ first, not the root
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks._results import write_results  # noqa: E402


def timed(fn, repeats: int = 3) -> float:
    """Best wall time of ``repeats`` calls, seconds."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def metric_rows(n: int, dim: int, classes: int) -> list[tuple[str, int, float]]:
    from models.evalnet import EvalNet, EvalNetConfig, embed_images
    from models.metrics import fid_from_features, inception_score, precision_recall

    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(n, dim)), rng.normal(0.1, 1.0, size=(n, dim))
    logits = rng.normal(size=(n, classes)) * 3
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    rows = [
        ("FID", 2 * n, timed(lambda: fid_from_features(real, fake))),
        ("precision/recall (k=3)", 2 * n, timed(lambda: precision_recall(real, fake, k=3), repeats=1)),
        ("Inception Score (10 splits)", n, timed(lambda: inception_score(probs))),
    ]
    evalnet_dir = REPO_ROOT / "data" / "evalnet"
    if (evalnet_dir / "config.json").is_file():
        from stages.evaluate import load_evalnet

        net, _ = load_evalnet(evalnet_dir)
        size, source = net.config.image_size, "data/evalnet"
    else:
        net, size, source = EvalNet(EvalNetConfig()).eval(), 16, "fresh init"
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    rows.append((f"evalnet features ({source}, {size} px)", n, timed(lambda: embed_images(net, images))))
    return rows


def stage_wall_time(samples_per_class: int | None) -> tuple[float, dict] | str:
    from core.config import load_paths, load_section, read_params
    from core.tracking import NullTracker
    from stages import evaluate

    params = read_params(REPO_ROOT / "params.yaml")
    paths = load_paths(params)
    paths = dataclasses.replace(
        paths, **{f.name: str(REPO_ROOT / getattr(paths, f.name)) for f in dataclasses.fields(paths)}
    )
    missing = [p for p in (paths.shards, paths.tokenizer, paths.evalnet) if not Path(p).exists()]
    if missing or not evaluate.present_checkpoints(paths.models):
        return f"skipped: no {', '.join(missing) or paths.models + '/base'} yet (run `make run` first)"
    cfg = load_section(params, "evaluate", evaluate.Config)
    overrides = {"register": False}
    if samples_per_class:
        overrides["samples_per_class"] = samples_per_class
    cfg = dataclasses.replace(cfg, **overrides)
    with tempfile.TemporaryDirectory() as tmp:
        paths = dataclasses.replace(paths, eval=str(Path(tmp) / "eval"), metrics=str(Path(tmp) / "metrics"))
        start = time.perf_counter()
        metrics = evaluate.run(cfg, paths, NullTracker())
        return time.perf_counter() - start, {"cfg": cfg, "metrics": metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="feature rows per set for the metric timings")
    parser.add_argument("--dim", type=int, default=128, help="feature width (the evalnet's default)")
    parser.add_argument("--samples-per-class", type=int, default=None, help="override evaluate.samples_per_class")
    args = parser.parse_args()
    torch.manual_seed(0)

    print(f"metric throughput, {args.n:,} x {args.dim} features ({torch.get_num_threads()} threads)\n")
    print(f"{'metric':<42} {'rows':>8} {'seconds':>8} {'rows/s':>12}")
    print(f"{'-' * 42} {'-' * 8} {'-' * 8} {'-' * 12}")
    metrics_table = metric_rows(args.n, args.dim, classes=10)
    for name, rows, seconds in metrics_table:
        print(f"{name:<42} {rows:>8,} {seconds:>8.3f} {rows / seconds:>12,.0f}")
    figures = {
        "config": {"n": args.n, "dim": args.dim, "samples_per_class": args.samples_per_class},
        "metric_throughput": [{"metric": n, "rows": r, "seconds": s, "rows_per_s": r / s} for n, r, s in metrics_table],
    }

    print("\nevaluate stage, end to end on the project's outputs (registry off):")
    result = stage_wall_time(args.samples_per_class)
    if isinstance(result, str):
        print(f"  {result}")
        write_results("evaluate", {**figures, "stage": result})
        return
    seconds, info = result
    cfg, metrics = info["cfg"], info["metrics"]
    checkpoints = [k for k in metrics if k not in ("reconstruction", "train", "best_value")]
    images = len(checkpoints) * len(cfg.scales) * cfg.samples_per_class * 10
    print(
        f"  {seconds:.1f} s for {len(checkpoints)} checkpoint(s) x {len(cfg.scales)} guidance scales x "
        f"{cfg.samples_per_class} samples/class (~{images:,} generated images, plus the two bounds)"
    )
    write_results(
        "evaluate",
        {**figures, "stage": {"seconds": seconds, "checkpoints": checkpoints, "generated_images": images,
                              "config": cfg, "metrics": metrics}},
    )  # fmt: skip


if __name__ == "__main__":
    main()
