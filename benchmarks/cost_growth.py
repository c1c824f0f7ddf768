"""How a pipeline run's cost grows: every stage's wall time for 1x, 4x, 16x the images and 16 vs 64 tokens.

Issue 20's table, so a user can predict a run's length from a measured one. Per variant, a copy of
this checkout (tracked files only) in ``--work`` gets ``params.yaml`` as shipped with ``shard.source:
imagefolder`` over the first N images per class of ``--source`` (linked into a subset folder, not
copied), plus the variant's overrides; then every ``dvc.yaml`` stage runs in order as DVC would
run it (``python -m stages.<name>``, tracking off) and its wall time is recorded, process start
included. Variants:

- ``--images 1000,4000,16000``: totals over all classes, each at the shipped 16 tokens per image;
- ``--tokens 64``: the smallest image count again at 64 tokens per image (the tokenizer downsamples
  16 px by 2 instead of 4: ``channel_multipliers [1, 2]``, an 8x8 latent).

Training stages run a fixed number of steps, so their time follows tokens per image (sequence
length) rather than the image count; ``shard``, ``cache_tokens`` and the train-set statistics of
``evaluate`` follow the images. The table says which. Fashion-MNIST (Debian's
``dataset-fashion-mnist``, 60,000 train images) makes a folder large enough::

    .venv/bin/python benchmarks/idx_to_folder.py --src /usr/share/... --out /data/fmnist16k --per-class 1600
    .venv/bin/python benchmarks/cost_growth.py --source /data/fmnist16k --images 1000,4000,16000 --tokens 64
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python benchmarks/x.py` puts benchmarks/ first, not the root
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks._results import write_results  # noqa: E402
from benchmarks.posttrain import make_copy, merge, run_stage, write_params  # noqa: E402

TOKENS_OVERRIDE = {64: {"train_tokenizer": {"model": {"channel_multipliers": [1, 2]}}}}
"""Tokens per image -> the tokenizer change that gives them at the shipped 16 px (16 is shipped)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, required=True, help="image folder, <class>/<image>")
    parser.add_argument("--images", default="1000,4000,16000", help="comma-separated total image counts")
    parser.add_argument("--tokens", default="64", help="comma-separated extra tokens-per-image variants "
                        "(at the smallest image count); '' for none")  # fmt: skip
    parser.add_argument("--work", type=Path, help="scratch folder, kept (default: a temporary one)")
    parser.add_argument("--results", default="cost_growth", help="benchmarks/results/<NAME>.json")
    args = parser.parse_args(argv)
    args.images = [int(n) for n in args.images.split(",") if n]
    args.tokens = [int(n) for n in args.tokens.split(",") if n]
    for tokens in args.tokens:
        if tokens not in TOKENS_OVERRIDE:
            parser.error(f"--tokens {tokens}: known variants are {sorted(TOKENS_OVERRIDE)} (16 is the default)")
    if not args.source.is_dir():
        parser.error(f"--source {args.source}: not a folder")
    return args


def subset_folder(source: Path, total: int, dest: Path) -> int:
    """Link the first ``total / classes`` images (sorted by name) of each class of ``source`` into
    ``dest``; returns the number linked. Raises if a class has fewer."""
    classes = sorted(p for p in source.iterdir() if p.is_dir())
    per_class = total // len(classes)
    linked = 0
    for folder in classes:
        files = sorted(p for p in folder.iterdir() if p.is_file())
        if len(files) < per_class:
            raise SystemExit(f"--source {source}: class {folder.name} has {len(files)} images, {per_class} needed")
        (dest / folder.name).mkdir(parents=True, exist_ok=True)
        for path in files[:per_class]:
            (dest / folder.name / path.name).symlink_to(path.resolve())
            linked += 1
    return linked


def stage_names(root: Path) -> list[str]:
    return list(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])


def run_variant(work: Path, name: str, folder: Path, overrides: dict, log) -> dict:
    root = make_copy(work / name)
    count = sum(1 for path in folder.rglob("*") if path.is_symlink())
    shipped = yaml.safe_load((root / "params.yaml").read_text())
    params = merge(shipped, {"shard": {"source": "imagefolder", "source_path": str(folder.resolve())}})
    params = merge(params, overrides)
    params["evaluate"]["register"] = False
    write_params(root, params)
    seconds = {}
    for stage in stage_names(root):
        seconds[stage] = run_stage(root, stage, log)
        print(f"  [{name}] {stage}: {seconds[stage]:.1f} s", flush=True)
    return {"images": count, "overrides": overrides, "seconds": seconds, "total_seconds": sum(seconds.values())}


def table(variants: dict[str, dict]) -> list[str]:
    names = list(variants)
    stages = list(variants[names[0]]["seconds"])
    base = names[0]
    header = "| stage | " + " | ".join(names) + " | grows with |"
    lines = [header, "|" + "---|" * (len(names) + 2)]
    for stage in [*stages, "total"]:
        cells = []
        for name in names:
            value = variants[name]["total_seconds"] if stage == "total" else variants[name]["seconds"][stage]
            cells.append(f"{value:.0f} s")
        lines.append(f"| {stage} | " + " | ".join(cells) + f" | {grows_with(variants, base, stage)} |")
    return lines


def grows_with(variants: dict[str, dict], base: str, stage: str) -> str:
    """'images' / 'tokens' / 'both' / '-': which variants took over 1.5x the base's time."""
    if stage == "total":
        return ""
    reference = variants[base]["seconds"][stage]
    grew = set()
    for name, variant in variants.items():
        if name != base and variant["seconds"][stage] > 1.5 * reference:
            grew.add("tokens" if variant["overrides"] else "images")
    return " and ".join(sorted(grew)) or "neither (fixed steps)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="arpipe-cost-"))
    work.mkdir(parents=True, exist_ok=True)
    plan = [(f"{n} images, 16 tokens", n, {}) for n in args.images]
    plan += [(f"{min(args.images)} images, {t} tokens", min(args.images), TOKENS_OVERRIDE[t]) for t in args.tokens]
    folders = {}
    for images in args.images:  # every subset first: a folder too small fails before any stage runs
        folders[images] = work / f"images-{images}"
        if not folders[images].is_dir():  # built aside, so a failed build is never taken for a subset
            partial = work / f"images-{images}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            subset_folder(args.source, images, partial)
            partial.rename(folders[images])
    variants = {}
    started = time.perf_counter()
    with (work / "stages.log").open("a") as log:
        for index, (name, images, overrides) in enumerate(plan):
            print(f"{name} ({index + 1}/{len(plan)}) in {work}", flush=True)
            variants[name] = run_variant(work, f"v{index}", folders[images], overrides, log)
    lines = table(variants)
    print("\n" + "\n".join(lines))
    print(
        f"\n{len(plan)} pipelines in {(time.perf_counter() - started) / 60:.1f} min; stage logs: {work / 'stages.log'}"
    )
    figures = {"source": str(args.source), "variants": variants, "table": lines}
    write_results(args.results, figures, argv=None if argv is None else ["benchmarks/cost_growth.py", *argv])
    return 0


if __name__ == "__main__":
    sys.exit(main())
