"""Post-training, side by side: base -> every post-training stage of the chain, both families, several seeds.

For each family (``gpt`` on the ``vq`` tokenizer, ``var`` on the ``msvq`` recipe of the README)
a scratch copy of the project is made under ``--work``; ``shard``, ``train_tokenizer``,
``cache_tokens`` and ``train_evalnet`` run once, then for every seed ``pretrain`` and each
post-training stage present in ``dvc.yaml`` (``sar``, ``cca``, ``ddo``, in chain order) run
with ``seed`` set to it, and ``evaluate`` scores every checkpoint with the stage's own metrics,
the same labels, sampling seeds and N for every checkpoint. Every stage runs exactly as DVC
would run it (``python -m stages.<name>`` over the copy's ``params.yaml``), tracking off.

Printed: per family, checkpoint and guidance the mean ± sd over seeds of FID, IS, precision,
recall and class accuracy, each seed's FID, and the papers' directions checked seed by seed
(CCA guidance-free FID below the base's and near the base with CFG; DDO guidance-free FID below
the base; SAR FID below the base, VAR only). ``--json`` also writes every number.

A family can start from a params file instead (``--params gpt=presets/photos-gpt.yaml``: the
file as is, its ``paths`` kept inside the copy), and ``--source DIR`` points ``shard`` at an image
folder (``<class>/<image>``). The figures also go to ``benchmarks/results/<--results>.json``.

Run from the repository root (about 8 min per family and seed on 2 CPU cores at the digits
defaults)::

    .venv/bin/python benchmarks/posttrain.py                        # both families, seeds 0 1 2
    .venv/bin/python benchmarks/posttrain.py --families gpt --seeds 0
    .venv/bin/python benchmarks/posttrain.py --source /data/photos --results posttrain_photos \
        --params gpt=presets/photos-gpt.yaml --params var=presets/photos-var.yaml
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python benchmarks/x.py` puts benchmarks/ first, not the root
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks._results import write_results  # noqa: E402

POSTTRAIN = ("sar", "cca", "ddo")
DATA_STAGES = ("shard", "train_tokenizer", "cache_tokens", "train_evalnet")
METRICS = ("fid", "is", "precision", "recall", "class_acc")

# The README's recipes (train_tokenizer / pretrain sections); gpt is params.yaml as shipped.
FAMILIES: dict[str, dict[str, dict]] = {
    "gpt": {},
    "var": {
        # the benchmark's tokenizer: the earlier msvq recipe (share 2.0, 1000 steps; 28.1 dB, 1x1 usage
        # 77%), with which the README's post-training table was measured. Its guided VAR is the
        # stronger one (FID at guidance 3: 9.0 vs 12.1 with the share-16, 2000-step usage recipe).
        "train_tokenizer": {
            "kind": "msvq",
            "steps": 1000,
            "model": {"scales": [1, 2, 3, 4], "z_channels": 16, "restart_max_total_share": 2.0},
        },
        "pretrain": {
            "arch": "var",
            "model": {
                "depth": 3,
                "width": 192,
                "heads": 3,
                # 0.4 without the mirrored digits (3 seeds: val loss 4.43 vs 5.14 at 0.25, FID at the floor)
                "resid_dropout": 0.4,
                "ffn_dropout": 0.4,
                "drop_path": 0.1,
            },
        },
        # the VAR post-training recipe (README): one-seed sweeps with the mirrored digits favoured a
        # stronger CCA and a softer DDO on VAR (cca lam 1000: 11.22 vs 11.61 at 300; ddo beta 0.5,
        # alpha 3: 12.34 vs 13.29 at the defaults, base 12.74); without them every VAR sits at the floor
        "cca": {"lam": 1000.0},
        "ddo": {"beta": 0.5, "alpha": 3.0},
    },
}


def project_files() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    return [line for line in out.stdout.splitlines() if line]


def make_copy(dest: Path) -> Path:
    """The tracked files of this checkout (no data, no .git) in ``dest``."""
    for name in project_files():
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, target)
    return dest


# Recipe values that replace the shipped dict instead of merging into it (a var model has no
# token_dropout, say, so the gpt model keys must not leak into it).
REPLACE = {("pretrain", "model")}


def merge(base: dict, update: dict, path: tuple[str, ...] = ()) -> dict:
    """``update`` over ``base``: nested dicts merge key by key (but the ``REPLACE`` ones), anything
    else replaces."""
    out = dict(base)
    for key, value in update.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict) and (*path, key) not in REPLACE
        out[key] = merge(out[key], value, (*path, key)) if nested else value
    return out


def write_params(root: Path, params: dict) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def chain_stages(root: Path) -> list[str]:
    """Post-training stages in ``dvc.yaml``, in its (chain) order."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    return [name for name in stages if name in POSTTRAIN]


def run_stage(root: Path, stage: str, log, *args: str, code: Path | None = None) -> float:
    """``python -m stages.<stage> [args]`` in ``root`` with the stages of ``code`` (default: ``root``)
    importable, tracking off; returns wall seconds."""
    env = {**os.environ, "ARPIPE_TRACKING": "off", "PYTHONPATH": str(code or root), "TQDM_MININTERVAL": "30"}
    start = time.perf_counter()
    command = [sys.executable, "-m", f"stages.{stage}", *args]
    proc = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    header = f"===== {' '.join([stage, *args])} ({seconds:.1f} s, exit {proc.returncode})"
    log.write(f"\n{header}\n{proc.stdout}\n{proc.stderr}")
    log.flush()
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])
        raise SystemExit(f"stage {stage} failed in {root} (exit {proc.returncode}):\n{tail}")
    return seconds


def family_params(root: Path, family: str, params_file: Path | None, source: Path | None, overrides: dict) -> dict:
    """The family's params: ``params_file`` as is (its ``paths`` replaced by the copy's own), or the
    copy's ``params.yaml`` with the family's recipe; then ``--source`` and the ``--set`` overrides."""
    shipped = yaml.safe_load((root / "params.yaml").read_text())
    if params_file is None:
        params = merge(shipped, FAMILIES[family])
    else:
        params = {**yaml.safe_load(params_file.read_text()), "paths": shipped["paths"]}
    if source is not None:
        params = merge(params, {"shard": {"source": "imagefolder", "source_path": str(source.resolve())}})
    return merge(params, overrides)


def run_family(
    family: str,
    seeds: list[int],
    work: Path,
    samples_per_class: int | None,
    log,
    overrides: dict,
    params_file: Path | None = None,
    source: Path | None = None,
    reuse_data: bool = False,
) -> dict:
    root = make_copy(work / family)
    params = family_params(root, family, params_file, source, overrides)
    if samples_per_class:
        params["evaluate"]["samples_per_class"] = samples_per_class
    params["evaluate"]["register"] = False
    write_params(root, params)
    stages = chain_stages(root)
    timings: dict[str, float] = {}
    done_file = root / "data_stages.json"  # the data stages' params, written when all of them finished
    data_params = {stage: params[stage] for stage in ("paths", *DATA_STAGES)}
    if reuse_data and done_file.is_file() and json.loads(done_file.read_text()) == data_params:
        print(f"  [{family}] {', '.join(DATA_STAGES)}: kept from an earlier run in {root} (--reuse-data)", flush=True)
    else:
        for stage in DATA_STAGES:
            timings[stage] = run_stage(root, stage, log)
            print(f"  [{family}] {stage}: {timings[stage]:.0f} s", flush=True)
        done_file.write_text(json.dumps(data_params))
    per_seed = {}
    for seed in seeds:
        for stage in ("pretrain", *stages):
            params[stage]["seed"] = seed
        write_params(root, params)
        for stage in ("pretrain", *stages, "evaluate"):
            seconds = run_stage(root, stage, log)
            timings[f"{stage}/seed{seed}"] = seconds
            print(f"  [{family} seed {seed}] {stage}: {seconds:.0f} s", flush=True)
        per_seed[seed] = json.loads((root / "metrics" / "evaluate.json").read_text())
        skipped = {}
        for stage in stages:
            metrics_file = root / "metrics" / f"{stage}.json"
            if metrics_file.is_file() and (reason := json.loads(metrics_file.read_text()).get("skipped")):
                skipped[stage] = reason
        per_seed[seed]["_skipped"] = skipped
    return {"stages": stages, "per_seed": per_seed, "timings": timings, "params": params}


def lookup(metrics: dict, key: str) -> float | None:
    """``metrics/evaluate.json`` value at ``checkpoint/guidance/metric`` (nested or flat)."""
    if key in metrics:
        return metrics[key]
    node = metrics
    for part in key.split("/"):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node if isinstance(node, int | float) else None


def guidances(metrics: dict, checkpoint: str) -> list[str]:
    node = metrics.get(checkpoint)
    if isinstance(node, dict):
        return [g for g in node if g.startswith("cfg")]
    prefix = f"{checkpoint}/"
    return sorted({k.split("/")[1] for k in metrics if k.startswith(prefix) and k.count("/") == 2})


def mean_sd(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def report(family: str, result: dict) -> list[str]:
    seeds = sorted(result["per_seed"])
    first = result["per_seed"][seeds[0]]
    checkpoints = ["base", *[s for s in result["stages"] if s not in first["_skipped"]]]
    lines = [
        f"### {family} ({len(seeds)} seed{'s' * (len(seeds) > 1)}: {', '.join(map(str, seeds))})",
        "",
        "| checkpoint | guidance | FID ↓ | IS ↑ | precision ↑ | recall ↑ | class acc ↑ | FID per seed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    # the real train images against the same val reference: the FID floor the models are read against
    floor = [[lookup(result["per_seed"][s], f"train/real/{m}") for m in METRICS] for s in seeds]
    if all(v is not None for row in floor for v in row):
        cells = [mean_sd(list(column)) for column in zip(*floor, strict=True)]
        per_seed = " / ".join(f"{row[0]:.2f}" for row in floor)
        lines.append(f"| *real train images (floor)* | real | {' | '.join(cells)} | {per_seed} |")
    for checkpoint in checkpoints:
        for guidance in guidances(first, checkpoint):
            cells = []
            for metric in METRICS:
                values = [lookup(result["per_seed"][s], f"{checkpoint}/{guidance}/{metric}") for s in seeds]
                cells.append(mean_sd([v for v in values if v is not None]))
            fids = [lookup(result["per_seed"][s], f"{checkpoint}/{guidance}/fid") for s in seeds]
            per_seed = " / ".join("—" if v is None else f"{v:.2f}" for v in fids)
            lines.append(f"| {checkpoint} | {guidance} | {' | '.join(cells)} | {per_seed} |")
    for stage, reason in first["_skipped"].items():
        lines.append(f"\n{stage}: skipped ({reason})")
    lines += ["", *directions(family, result, checkpoints)]
    return lines


def directions(family: str, result: dict, checkpoints: list[str]) -> list[str]:
    """The papers' directions, checked seed by seed."""
    seeds = sorted(result["per_seed"])

    def fid(seed, checkpoint, guidance="cfg1"):
        return lookup(result["per_seed"][seed], f"{checkpoint}/{guidance}/fid")

    guided = [g for g in guidances(result["per_seed"][seeds[0]], "base") if g != "cfg1"]
    checks = []
    for previous, checkpoint in itertools.pairwise(checkpoints):
        for reference in dict.fromkeys(("base", previous)):
            wins = [fid(s, checkpoint) < fid(s, reference) for s in seeds]
            pairs = ", ".join(f"{fid(s, checkpoint):.2f} vs {fid(s, reference):.2f}" for s in seeds)
            what = "the base's" if reference == "base" else f"its input's ({reference})"
            checks.append(f"- {checkpoint} guidance-free FID below {what}: {sum(wins)}/{len(seeds)} seeds ({pairs})")
    if "cca" in checkpoints and guided:
        best = guided[-1]
        gaps = [fid(s, "cca") - fid(s, "base", best) for s in seeds]
        checks.append(
            f"- cca guidance-free FID minus base FID at {best}: {', '.join(f'{g:+.2f}' for g in gaps)} "
            "(the paper: close to 0)"
        )
    return ["Directions:", *checks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default="gpt,var", help="comma-separated: gpt, var (default both)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (default 0,1,2)")
    parser.add_argument("--samples-per-class", type=int, default=None, help="evaluate N (default params.yaml's)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder, kept (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="write every number to this file")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a param for every family, e.g. --set pretrain.steps=300 --set cca.lam=100 (YAML value)",
    )
    parser.add_argument(
        "--params",
        action="append",
        default=[],
        metavar="FAMILY=FILE",
        help="start FAMILY from this params file (e.g. a preset) instead of params.yaml and its recipe",
    )
    parser.add_argument("--source", type=Path, default=None, help="image folder (<class>/<image>) to shard")
    parser.add_argument("--results", default="posttrain", help="benchmarks/results/<NAME>.json")
    parser.add_argument(
        "--reuse-data",
        action="store_true",
        help="keep the data stages' outputs already in --work (same params) and run only the seeds' stages",
    )
    args = parser.parse_args()
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        parser.error(f"unknown family {unknown[0]!r}; expected gpt or var")
    seeds = [int(s) for s in args.seeds.split(",")]
    params_files: dict[str, Path] = {}
    for item in args.params:
        family, sep, file = item.partition("=")
        if not sep or family not in FAMILIES:
            parser.error(f"--params {item!r}: expected FAMILY=FILE with FAMILY gpt or var")
        if not Path(file).is_file():
            parser.error(f"--params {item!r}: {file} is not a file")
        params_files[family] = Path(file).resolve()
    if args.source is not None and not args.source.is_dir():
        parser.error(f"--source {args.source}: not a folder")
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            parser.error(f"--set {item!r}: expected SECTION.KEY=VALUE")
        node = overrides
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    work = args.work or Path(tempfile.mkdtemp(prefix="arpipe-posttrain-"))
    work.mkdir(parents=True, exist_ok=True)
    results, lines = {}, []
    with open(work / "stages.log", "a") as log:
        print(f"scratch projects and stage logs in {work}", flush=True)
        for family in families:
            results[family] = run_family(
                family,
                seeds,
                work,
                args.samples_per_class,
                log,
                overrides,
                params_files.get(family),
                args.source,
                args.reuse_data,
            )
            lines += report(family, results[family]) + [""]
            print("\n".join(report(family, results[family])), flush=True)
    if len(families) > 1:
        print("\n" + "\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, sort_keys=True, default=str))
    figures = {
        "source": str(args.source or "params.yaml's"),
        "seeds": seeds,
        "set": args.set,
        "params_files": {f: str(p) for f, p in params_files.items()},
        "families": results,
        "table": lines,
    }
    write_results(args.results, figures)  # fmt: skip
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
