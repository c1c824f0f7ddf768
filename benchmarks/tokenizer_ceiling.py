"""Tokenizer ceiling against the real-data floor on an image folder, for several tokenizer configs.

Issue 21's measure of a tokenizer recipe: the FID of the tokenizer's reconstructions of the train
images against val (the *ceiling*: no AR model trained on these tokens can score better) over the
FID of the real train images against val (the *floor*), both in the ``train_evalnet`` feature
space, exactly as ``evaluate`` computes its ``reconstruction`` and ``train`` rows (its functions
are called, not copied). A ratio <= 3 (``core.verdicts.CEILING_RATIO``) is the aim.

For an image folder (``shard.source: imagefolder``) the benchmark shards once and trains the
evalnet once per distinct ``shard`` / ``train_evalnet`` setting (a config may set
``shard.image_size``), then trains the tokenizer of every config and scores it. Every stage runs
as DVC would run it (``python -m stages.<name> --params FILE``, tracking off) over a params file
in the scratch folder: ``params.yaml`` as shipped, then ``shard.source: imagefolder`` and
``--source``, then every ``--set``, then the config's own overrides.

A config is ``--config NAME`` (one of ``CONFIGS`` below) or ``--config "NAME KEY=VALUE ..."``
(whitespace-separated ``SECTION.KEY=VALUE`` overrides, YAML values, sections ``shard``,
``train_tokenizer``, ``train_evalnet`` and ``evaluate``). Without ``--config`` every built-in config
runs. Printed: one row per config (tokens per image, codes, steps, wall time of the stage, val
PSNR, the stage's pixel-space reconstruction FID, ceiling and floor FID, their ratio and the
ceiling's class accuracy); the figures go to ``benchmarks/results/<--results>.json``::

    .venv/bin/python benchmarks/photo_folder.py --out /data/photos-a
    .venv/bin/python benchmarks/tokenizer_ceiling.py --source /data/photos-a --label photos-a \\
        --config default --config 16px-8x8-1024-l1 --set train_tokenizer.steps=600
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python benchmarks/x.py` puts benchmarks/ first, not the root
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import posttrain  # noqa: E402
from benchmarks._results import write_results  # noqa: E402
from benchmarks.posttrain import merge  # noqa: E402

SECTIONS = ("shard", "train_tokenizer", "train_evalnet", "evaluate")
GROUP_SECTIONS = ("shard", "train_evalnet")
"""A distinct value of these sections is a distinct data set and feature space: sharded and its
evalnet trained once, its floor measured once."""

CONFIGS: dict[str, dict] = {
    # params.yaml as shipped: 16 px, 4x4 = 16 tokens, 256 codes, L2 (issue 21: ceiling 59x the floor)
    "default": {},
    # 8x8 = 64 tokens at 16 px: one downsampling fewer
    "16px-8x8-256-l2": {"train_tokenizer": {"model": {"channel_multipliers": [1, 2]}}},
    "16px-8x8-1024-l2": {"train_tokenizer": {"model": {"channel_multipliers": [1, 2], "codebook_size": 1024}}},
    "16px-8x8-1024-l1": {
        "train_tokenizer": {"model": {"channel_multipliers": [1, 2], "codebook_size": 1024}, "recon_loss": "l1"}
    },
    "16px-8x8-1024-l1-disc": {
        "train_tokenizer": {
            "model": {"channel_multipliers": [1, 2], "codebook_size": 1024},
            "recon_loss": "l1",
            "disc_weight": 0.1,
        }
    },
    # 32 px: 8x8 = 64 tokens (two downsamplings), and 4x4 = 16 tokens (three)
    "32px-8x8-1024-l1": {
        "shard": {"image_size": 32},
        "train_tokenizer": {"model": {"channel_multipliers": [1, 2, 2], "codebook_size": 1024}, "recon_loss": "l1"},
    },
    "32px-4x4-1024-l1": {
        "shard": {"image_size": 32},
        "train_tokenizer": {"model": {"channel_multipliers": [1, 2, 2, 2], "codebook_size": 1024}, "recon_loss": "l1"},
    },
}


def parse_overrides(items: list[str], what: str) -> dict:
    """``SECTION.KEY[.SUB]=VALUE`` items -> a nested dict (YAML values)."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise SystemExit(f"{what} {item!r}: expected SECTION.KEY=VALUE")
        section, *parents, last = key.split(".")
        if section not in SECTIONS:
            raise SystemExit(f"{what} {item!r}: section {section!r} is not one of {', '.join(SECTIONS)}")
        node = out.setdefault(section, {})
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    return out


def parse_config(spec: str) -> tuple[str, dict]:
    """``NAME`` (built-in) or ``NAME KEY=VALUE ...`` -> (name, overrides)."""
    name, *items = shlex.split(spec)
    if not items:
        if name not in CONFIGS:
            raise SystemExit(f"--config {name!r}: not a built-in config ({', '.join(CONFIGS)}); add KEY=VALUE items")
        return name, CONFIGS[name]
    return name, parse_overrides(items, f"--config {name}")


def run_stage(stage: str, params_file: Path, log) -> float:
    """``python -m stages.<stage> --params FILE`` in the file's folder (tracking off); wall seconds."""
    return posttrain.run_stage(params_file.parent, stage, log, "--params", str(params_file), code=REPO_ROOT)


def scratch_paths(folder: Path, tokenizer: str = "tokenizer", metrics: str = "metrics") -> dict:
    """Every ``paths`` key inside ``folder`` (absolute), so nothing is written into the checkout."""
    return {
        "shards": str(folder / "shards"),
        "metrics": str(folder / metrics),
        "plots": str(folder / f"plots-{tokenizer}"),
        "tokenizer": str(folder / tokenizer),
        "tokens": str(folder / "tokens"),
        "models": str(folder / "models"),
        "distill": str(folder / "distill"),
        "evalnet": str(folder / "evalnet"),
        "eval": str(folder / "eval"),
        "resume": str(folder / "resume"),
        "released": str(REPO_ROOT / "released"),
        "last_run": str(folder / "last_run"),
    }


def write_params(path: Path, params: dict) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


class Scorer:
    """``evaluate``'s bounds for one data group: its evalnet's space, the val features, the floor."""

    def __init__(self, folder: Path, params: dict):
        from core.config import load_section
        from core.shards import load_split
        from stages import evaluate

        self.evaluate = evaluate
        self.cfg = load_section(params, "evaluate", evaluate.Config)
        evalnet, self.evalnet_config = evaluate.load_evalnet(folder / "evalnet")
        val = load_split(folder / "shards", "val")
        self.train = load_split(folder / "shards", "train")
        self.spaces = evaluate.feature_spaces(evalnet, None, val.images_NHWC)
        self.counts = {"train": len(self.train.images_NHWC), "val": len(val.images_NHWC)}
        self.floor = self.score(self.train.images_NHWC)

    def score(self, images_NHWC) -> dict:
        return self.evaluate.score_images(images_NHWC, self.train.labels_N, self.spaces, self.cfg)

    def ceiling(self, tokenizer_dir: Path) -> tuple[dict, dict]:
        from core.checkpoint import read_checkpoint
        from models.ar import tokenizer_from_state

        state, config = read_checkpoint(tokenizer_dir, stage="train_tokenizer")
        tokenizer = tokenizer_from_state(state, config)
        return self.score(self.evaluate._reconstruct(tokenizer, self.train.images_NHWC)), config


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| config | px | tokens | codes | loss | disc | steps | time (s) | val PSNR (dB) | pixel recon FID "
        "| ceiling FID | floor FID | ceiling / floor | ceiling class acc | train usage |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        usage = r["train_usage"]
        usage = "/".join(f"{u:.0%}" for u in usage) if isinstance(usage, list) else f"{usage:.0%}"
        lines.append(
            f"| {r['config']} | {r['image_size']} | {r['tokens']} | {r['codes']} | {r['recon_loss']} "
            f"| {r['disc_weight']:g} | {r['steps']} | {r['seconds']:.0f} | {r['val_psnr']:.2f} "
            f"| {r['val_recon_fid_pixels']:.3f} | {r['ceiling']['fid']:.3f} | {r['floor']['fid']:.3f} "
            f"| **{r['ratio']:.1f}** | {r['ceiling']['class_acc']:.2f} | {usage} |"
        )
    return lines


def usage_value(metrics: dict):
    """``train_usage`` (over the train set and its flips) as a share; msvq: one per scale."""
    usage = metrics.get("train_usage", metrics.get("usage", {}))
    per_scale = [v for k, v in usage.items() if k != "overall"]
    return per_scale or usage.get("overall", float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, required=True, help="image folder (<class>/<image>), shard.source_path")
    parser.add_argument("--label", default="", help="what the folder is (recorded with the figures), e.g. photos-a")
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="SPEC",
        help=f"NAME (built-in: {', '.join(CONFIGS)}) or 'NAME KEY=VALUE ...'; repeatable (default: every built-in)",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override for every config (YAML value)"
    )
    parser.add_argument("--work", type=Path, default=None, help="scratch folder, kept (default: a temporary one)")
    parser.add_argument("--results", default="tokenizer_ceiling", help="benchmarks/results/<NAME>.json")
    args = parser.parse_args()
    if not args.source.is_dir():
        parser.error(f"--source {args.source}: not a folder")
    configs = [parse_config(spec) for spec in (args.config or list(CONFIGS))]
    names = [name for name, _ in configs]
    if len(set(names)) != len(names):
        parser.error("config names must be distinct")
    common = parse_overrides(args.set, "--set")

    shipped = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    base = merge(shipped, {"shard": {"source": "imagefolder", "source_path": str(args.source.resolve())}})
    base = merge(base, common)
    work = args.work or Path(tempfile.mkdtemp(prefix="arpipe-tokceil-"))
    work.mkdir(parents=True, exist_ok=True)
    groups: dict[str, dict] = {}  # group key -> {"folder", "scorer", "timings"}
    rows = []
    print(f"scratch folders and stage logs in {work}", flush=True)
    with open(work / "stages.log", "a") as log:
        for name, overrides in configs:
            params = merge(base, overrides)
            key = json.dumps({s: params[s] for s in GROUP_SECTIONS}, sort_keys=True)
            if key not in groups:
                folder = work / f"data{len(groups)}-{params['shard']['image_size']}px"
                folder.mkdir(parents=True, exist_ok=True)
                group_params = write_params(folder / "params.yaml", {**params, "paths": scratch_paths(folder)})
                timings = {stage: run_stage(stage, group_params, log) for stage in GROUP_SECTIONS}
                scorer = Scorer(folder, {**params, "paths": scratch_paths(folder)})
                shard_metrics = json.loads((folder / "metrics" / "shard.json").read_text())
                evalnet_metrics = json.loads((folder / "metrics" / "train_evalnet.json").read_text())
                groups[key] = {"folder": folder, "scorer": scorer, "timings": timings, "shard": shard_metrics,
                               "evalnet": evalnet_metrics}  # fmt: skip
                print(
                    f"  [{folder.name}] shard {timings['shard']:.0f} s ({scorer.counts['train']} train, "
                    f"{scorer.counts['val']} val), train_evalnet {timings['train_evalnet']:.0f} s "
                    f"(val acc {evalnet_metrics.get('val_accuracy', float('nan')):.3f}); "
                    f"floor FID {scorer.floor['fid']:.3f}",
                    flush=True,
                )
            group = groups[key]
            folder = group["folder"]
            paths = scratch_paths(folder, tokenizer=f"tokenizer-{name}", metrics=f"metrics-{name}")
            params_file = write_params(folder / f"params-{name}.yaml", {**params, "paths": paths})
            seconds = run_stage("train_tokenizer", params_file, log)
            metrics = json.loads((Path(paths["metrics"]) / "train_tokenizer.json").read_text())
            ceiling, tok_config = group["scorer"].ceiling(Path(paths["tokenizer"]))
            floor = group["scorer"].floor
            tok = params["train_tokenizer"]
            row = {
                "config": name,
                "overrides": overrides,
                "image_size": params["shard"]["image_size"],
                "kind": tok["kind"],
                "model": tok_config["model"],
                "tokens": tok_config["seq_len"],
                "codes": tok_config["codebook_size"],
                "recon_loss": tok["recon_loss"],
                "disc_weight": tok["disc_weight"],
                "steps": tok["steps"],
                "seconds": seconds,
                "val_psnr": metrics["val_psnr"],
                "val_recon_fid_pixels": metrics["val_recon_fid_pixels"],
                "train_usage": usage_value(metrics),
                "ceiling": ceiling,
                "floor": floor,
                "ratio": ceiling["fid"] / floor["fid"],
                "data": folder.name,
                "tokenizer_metrics": metrics,
            }
            rows.append(row)
            print("\n".join(table([row])[2:]), flush=True)
    lines = table(rows)
    print(f"\n{args.label or args.source}: ceiling = FID of the tokenizer's reconstructions of the train images "
          "vs val, "
          "floor = FID of the real train images vs val, both in the evalnet's space (evaluate's bounds)\n")  # fmt: skip
    print("\n".join(lines), flush=True)
    figures = {
        "source": str(args.source),
        "label": args.label,
        "set": args.set,
        "rows": rows,
        "data": {
            g["folder"].name: {
                "timings": g["timings"],
                "counts": g["scorer"].counts,
                "shard": g["shard"],
                "evalnet": g["evalnet"],
                "floor": g["scorer"].floor,
            }  # fmt: skip
            for g in groups.values()
        },
        "table": lines,
    }
    write_results(args.results, figures)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
