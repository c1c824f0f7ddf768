"""evaluate: every AR checkpoint in the chain, side by side, and the registry's champion gate.

For each checkpoint present under ``paths.models`` (``base`` today; ``sar``, ``cca``, ``ddo``,
``distilled`` as they land), samples ``samples_per_class`` images per class (class-balanced,
shuffled, per-batch seeds; the same labels and seeds for every checkpoint) guidance-free and at
each ``cfg_scales`` value, decodes them with the tokenizer and scores them against the val split
in the feature space of the ``train_evalnet`` classifier: FID, Inception Score (over shuffled
splits), precision/recall (k-NN radii) and class accuracy. Two bounds frame the numbers:
``reconstruction`` (train images through the tokenizer round trip: the ceiling an AR model trained
on their tokens can reach) and ``train`` (the real train images: the floor), both scored against
val like the samples. These are proxy-space numbers, not comparable with
published ImageNet (Inception) FIDs.

The distilled student (``distilled``, from the ``distill`` stage) has no guidance knob (its
teacher's is baked in): it is sampled in one and in two steps, reported as guidance ``1step`` and
``2step`` (keys ``distilled/1step/fid``, ...), next to its FID ratio to the teacher at the
teacher's distillation guidance (``fid_vs_teacher``) and its speed-up over that teacher measured
in this run (images/s ratio; sequential forward passes 1 or 2 against the teacher's steps). It is
reported, not registered: the champion is chosen among the AR checkpoints.

Writes ``paths.eval/report.md`` (one side-by-side table) and ``grid.png`` (one row per
checkpoint and guidance, a column per class), ``metrics/evaluate.json`` keyed
``<checkpoint>/<guidance>/<metric>`` (guidance ``cfg1`` is guidance-free), and the measured
speed (images/s; sequential forward passes per image) in ``metrics/evaluate_speed.json``.
With MLflow tracking on, the best checkpoint (``select_metric`` at ``select_guidance``) is logged
as a pyfunc and registered as ``arpipe-<arch>``: alias ``candidate`` always, ``champion`` only
when it beats the current champion.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from core.checkpoint import read_checkpoint
from core.config import Paths
from core.images import image_grid, save_png
from core.metrics import flatten_metrics
from core.shards import load_split
from core.stage import stage_main
from core.training import process_state
from models.ar import ar_from_state, sample_images, tokenizer_from_state
from models.dd_student import sample_distilled_images, student_from_state
from models.evalnet import build_evalnet, embed_images
from models.metrics import class_accuracy, fid_from_features, inception_score, precision_recall

STAGE = "evaluate"
CHAIN = ("base", "sar", "cca", "ddo", "distilled")
DISTILLED = "distilled"
DISTILLED_MODES = {"1step": 1, "2step": 2}  # guidance column of the distilled rows -> sequential passes
METRICS = ("fid", "is", "precision", "recall", "class_acc")
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True, kw_only=True)
class Config:
    samples_per_class: int = 100
    """Samples per class for each checkpoint and guidance scale."""
    cfg_scales: list[float] = field(default_factory=lambda: [1.0, 3.0])
    """Guidance scales (logits = u + cfg·(c − u)); 1.0 = guidance-free, always evaluated."""
    temperature: float = 1.0
    top_k: int = 0
    """0 = off."""
    top_p: float = 1.0
    """1.0 = off."""
    batch_size: int = 250
    """Images sampled per batch (each batch draws from its own seeded generator)."""
    seed: int = 0
    pr_k: int = 3
    """Neighbourhood size of precision/recall."""
    is_splits: int = 10
    """Inception Score splits (rows shuffled first)."""
    grid_per_class: int = 2
    """Samples per class in each row of grid.png."""
    select_metric: Literal["fid", "is", "precision", "recall", "class_acc"] = "fid"
    """Metric that picks the best checkpoint and gates the champion."""
    select_guidance: float = 1.0
    """Guidance scale whose numbers are compared (1.0 = guidance-free)."""
    register: bool = True
    """Register the best checkpoint in MLflow (needs tracking on; skipped otherwise)."""

    def __post_init__(self):
        if min(self.samples_per_class, self.batch_size, self.pr_k, self.is_splits, self.grid_per_class) < 1:
            raise ValueError("samples_per_class, batch_size, pr_k, is_splits and grid_per_class must be >= 1")
        if self.select_guidance not in self.scales:
            raise ValueError(f"select_guidance {self.select_guidance} is not among cfg_scales {self.scales}")

    @property
    def scales(self) -> list[float]:
        """Guidance scales to evaluate: 1.0 first, then the others in the given order."""
        return [1.0] + [s for s in dict.fromkeys(self.cfg_scales) if s != 1.0]

    @property
    def higher_is_better(self) -> bool:
        return self.select_metric != "fid"


def guidance_key(scale: float) -> str:
    return f"cfg{scale:g}"


def load_evalnet(evalnet_dir: str | Path):
    state, config = read_checkpoint(evalnet_dir, stage="train_evalnet")
    net = build_evalnet(config["model"])
    net.load_state_dict(state)
    return net.eval(), config


def score(feats_ND, logits_NC, labels_N, real_feats_MD, cfg: Config) -> dict:
    """The metrics of one image set against the real (val) features."""
    logits = torch.from_numpy(logits_NC)
    probs = torch.softmax(logits, dim=1).numpy()
    inception, _ = inception_score(probs, splits=min(cfg.is_splits, len(probs)), shuffle_seed=cfg.seed)
    precision, recall = precision_recall(real_feats_MD, feats_ND, k=cfg.pr_k)
    return {
        "fid": fid_from_features(feats_ND, real_feats_MD),
        "is": inception,
        "precision": precision,
        "recall": recall,
        "class_acc": class_accuracy(logits_NC, labels_N),
    }


def present_checkpoints(models_dir: str | Path) -> list[str]:
    """Chain checkpoints that exist, in chain order."""
    return [name for name in CHAIN if (Path(models_dir) / name / "config.json").is_file()]


def run(cfg: Config, paths: Paths, tracker) -> dict:
    torch.use_deterministic_algorithms(True)
    names = present_checkpoints(paths.models)
    if not names:
        raise FileNotFoundError(f"no checkpoint in {paths.models}/{{{','.join(CHAIN)}}}: run pretrain first")
    evalnet, evalnet_config = load_evalnet(paths.evalnet)
    tok_state, tok_config = read_checkpoint(paths.tokenizer, stage="train_tokenizer")
    tokenizer = tokenizer_from_state(tok_state, tok_config)
    val, train = load_split(paths.shards, "val"), load_split(paths.shards, "train")
    real_feats, _ = embed_images(evalnet, val.images_NHWC)
    num_classes = len(tok_config["class_names"])

    # 1. bounds: train images through the tokenizer (the best an AR model trained on their tokens
    # can do: the ceiling) and the real train images themselves (the floor), both unpaired with val
    results: dict = {}
    recon_NHWC = _reconstruct(tokenizer, train.images_NHWC)
    for bound, images in (("reconstruction", recon_NHWC), ("train", train.images_NHWC)):
        feats, logits = embed_images(evalnet, images)
        results[bound] = {"real": score(feats, logits, train.labels_N, real_feats, cfg)}

    # 2. every checkpoint at every guidance scale, same labels and seeds
    order = torch.randperm(num_classes * cfg.samples_per_class, generator=torch.Generator().manual_seed(cfg.seed))
    labels_N = torch.arange(num_classes).repeat_interleave(cfg.samples_per_class)[order]
    speed: dict = {}
    grid_rows = [_grid_row(val.images_NHWC, val.labels_N, num_classes, cfg.grid_per_class)]
    row_names = ["val (real)"]
    arches, models = {}, {}
    for name in names:
        state, config = read_checkpoint(Path(paths.models) / name)
        if config.get("tokenizer_fingerprint") != tok_config["fingerprint"]:
            raise ValueError(
                f"{paths.models}/{name} was trained on another tokenizer: re-run the stages after train_tokenizer"
            )
        if config.get("distilled"):
            student = student_from_state(state, config, tokenizer)
            results[name], speed[name] = {}, {}
            for mode, steps in DISTILLED_MODES.items():
                start = time.perf_counter()
                images = sample_distilled_images(
                    student, tokenizer, labels_N, steps=steps, seed=cfg.seed, batch_size=cfg.batch_size
                ).numpy()
                speed[name][f"{mode}_images_per_s"] = len(images) / (time.perf_counter() - start)
                speed[name][f"{mode}_steps_per_image"] = steps
                feats, logits = embed_images(evalnet, images)
                results[name][mode] = score(feats, logits, labels_N.numpy(), real_feats, cfg)
                grid_rows.append(_grid_row(images, labels_N.numpy(), num_classes, cfg.grid_per_class))
                row_names.append(f"{name} {mode}")
            _compare_with_teacher(cfg, config["teacher"], results, speed, models, tokenizer, labels_N, name)
            print(f"{STAGE}: {name}: " + ", ".join(f"{g} FID {m['fid']:.2f}" for g, m in results[name].items()))
            continue
        model = ar_from_state(state, config, tokenizer)
        models[name] = model
        arches[name] = config["arch"]
        results[name], speed[name] = {}, {"steps_per_image": model.steps}
        for scale in cfg.scales:
            start = time.perf_counter()
            images = sample_images(
                model,
                tokenizer,
                labels_N,
                cfg=scale,
                temperature=cfg.temperature,
                top_k=cfg.top_k,
                top_p=cfg.top_p,
                seed=cfg.seed,
                batch_size=cfg.batch_size,
            ).numpy()
            speed[name][f"{guidance_key(scale)}_images_per_s"] = len(images) / (time.perf_counter() - start)
            feats, logits = embed_images(evalnet, images)
            results[name][guidance_key(scale)] = score(feats, logits, labels_N.numpy(), real_feats, cfg)
            grid_rows.append(_grid_row(images, labels_N.numpy(), num_classes, cfg.grid_per_class))
            row_names.append(f"{name} {guidance_key(scale)}")
        print(f"{STAGE}: {name}: " + ", ".join(f"{g} FID {m['fid']:.2f}" for g, m in results[name].items()))

    # 3. outs, the best checkpoint (among the AR checkpoints, which the registry can serve) and the registry
    ar_names = [name for name in names if name in models]
    if not ar_names:
        raise FileNotFoundError(f"no AR checkpoint in {paths.models} besides the distilled student")
    best = _best(ar_names, results, cfg)
    eval_dir = Path(paths.eval)
    eval_dir.mkdir(parents=True, exist_ok=True)
    report = report_markdown(results, names, cfg, best, evalnet_config, speed)
    (eval_dir / "report.md").write_text(report)
    grid = image_grid(np.concatenate(grid_rows), num_classes * cfg.grid_per_class)
    save_png(grid, eval_dir / "grid.png")
    speed_file = Path(paths.metrics) / "evaluate_speed.json"
    speed_file.parent.mkdir(parents=True, exist_ok=True)
    speed_file.write_text(json.dumps(speed, indent=2, sort_keys=True) + "\n")
    metrics = {**results, "best_value": _value(results, best, cfg)}
    tracker.log_metrics({**flatten_metrics(results), **flatten_metrics(speed, "speed/")})
    tracker.log_image(grid, "grid.png")
    tracker.log_artifact(eval_dir / "report.md")
    tracker.set_tags({"arpipe.eval.best_checkpoint": best, "arpipe.eval.grid_rows": " | ".join(row_names)})
    if cfg.register:
        _register(cfg, paths, tracker, best, arches[best], results)
    print(f"{STAGE}: best checkpoint {best} ({cfg.select_metric} {_value(results, best, cfg):.3f}) -> {eval_dir}")
    return metrics


def _compare_with_teacher(cfg: Config, teacher: dict, results, speed, models, tokenizer, labels_N, name) -> None:
    """The student's FID ratio and speed-up against its teacher at the teacher's distillation
    guidance, timed in this run (the teacher is sampled again for timing if that guidance was not
    among ``cfg_scales``). Skipped when the teacher checkpoint is not evaluated here."""
    teacher_name, guidance = teacher["name"], guidance_key(teacher["cfg"])
    if teacher_name not in models:
        print(f"{STAGE}: {name}: teacher {teacher_name} is not evaluated here; no speed-up or FID ratio")
        return
    teacher_speed = speed[teacher_name]
    key = f"{guidance}_images_per_s"
    if key not in teacher_speed:
        start = time.perf_counter()
        sample_images(models[teacher_name], tokenizer, labels_N, cfg=teacher["cfg"], temperature=cfg.temperature,
                      top_k=cfg.top_k, top_p=cfg.top_p, seed=cfg.seed, batch_size=cfg.batch_size)  # fmt: skip
        teacher_speed[key] = len(labels_N) / (time.perf_counter() - start)
    for mode in DISTILLED_MODES:
        speed[name][f"{mode}_speedup"] = speed[name][f"{mode}_images_per_s"] / teacher_speed[key]
        speed[name][f"{mode}_step_reduction"] = teacher_speed["steps_per_image"] / DISTILLED_MODES[mode]
        if guidance in results[teacher_name]:
            results[name][mode]["fid_vs_teacher"] = results[name][mode]["fid"] / results[teacher_name][guidance]["fid"]


@torch.no_grad()
def _reconstruct(tokenizer, images_NHWC: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """decode(encode(images)) as uint8 NHWC."""
    out = []
    for start in range(0, len(images_NHWC), batch_size):
        x = torch.from_numpy(images_NHWC[start : start + batch_size]).permute(0, 3, 1, 2).float() / 127.5 - 1
        y = tokenizer.decode(tokenizer.encode(x))
        out.append(((y + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def _value(results: dict, name: str, cfg: Config) -> float:
    return results[name][guidance_key(cfg.select_guidance)][cfg.select_metric]


def _best(names: list[str], results: dict, cfg: Config) -> str:
    """The checkpoint with the best selection metric (the earliest in the chain on ties)."""
    sign = -1 if cfg.higher_is_better else 1
    return min(names, key=lambda n: (sign * _value(results, n, cfg), names.index(n)))


def _grid_row(images_NHWC: np.ndarray, labels_N: np.ndarray, num_classes: int, per_class: int) -> np.ndarray:
    """The first ``per_class`` images of each class, classes in order (blank where a class is short)."""
    blank = np.zeros_like(images_NHWC[0])
    row = []
    for c in range(num_classes):
        picked = list(images_NHWC[labels_N == c][:per_class])
        row += picked + [blank] * (per_class - len(picked))
    return np.stack(row)


def report_markdown(
    results: dict, names: list[str], cfg: Config, best: str, evalnet_config: dict, speed: dict | None = None
) -> str:
    """One side-by-side table: bounds first, then each checkpoint at each guidance scale (the
    distilled student at 1 and 2 steps), then the student against its teacher."""
    header = "| checkpoint | guidance | FID ↓ | IS ↑ | precision ↑ | recall ↑ | class acc ↑ |"
    lines = [
        "# arpipe evaluation",
        "",
        f"Feature space: the `train_evalnet` classifier (val accuracy {evalnet_config['val_accuracy']:.4f}); "
        "a proxy space, so FID/IS here are not comparable with published ImageNet (Inception) numbers. "
        f"Reference set: the val split. Samples: {cfg.samples_per_class} per class, class-balanced, "
        f"seed {cfg.seed}, temperature {cfg.temperature}, top-k {cfg.top_k}, top-p {cfg.top_p}. "
        "`cfg1` is guidance-free.",
        "",
        header,
        "|" + "---|" * 7,
    ]
    rows = [("reconstruction", "real"), ("train", "real")] + [(n, g) for n in names for g in results[n]]
    for name, guidance in rows:
        m = results[name][guidance]
        label = {
            "reconstruction": "*train images through the tokenizer (ceiling)*",
            "train": "*real train images (floor)*",
        }
        shown = label.get(name, f"**{name}**" if name == best else name)
        lines.append(
            f"| {shown} | {guidance} | {m['fid']:.3f} | {m['is']:.3f} | {m['precision']:.3f} | "
            f"{m['recall']:.3f} | {m['class_acc']:.3f} |"
        )
    lines += ["", f"Best by {cfg.select_metric} at {guidance_key(cfg.select_guidance)}: **{best}**.", ""]
    student = (speed or {}).get(DISTILLED, {})
    if "1step_speedup" in student:
        lines += [
            "Distilled student against its teacher (same run, same labels; speed-up = images/s ratio):",
            "",
            "| sampling | FID / teacher's ↓ | speed-up ↑ | sequential passes: teacher / student |",
            "|---|---|---|---|",
        ]
        for mode, steps in DISTILLED_MODES.items():
            ratio = results[DISTILLED][mode].get("fid_vs_teacher", float("nan"))
            passes = student[f"{mode}_step_reduction"] * steps
            lines.append(f"| {mode} | {ratio:.2f}x | {student[f'{mode}_speedup']:.1f}x | {passes:g} / {steps} |")
        lines.append("")
    return "\n".join(lines)


def _register(cfg: Config, paths: Paths, tracker, best: str, arch: str, results: dict) -> None:
    client, run_id = getattr(tracker, "client", None), getattr(tracker, "run_id", None)
    if client is None:
        print(f"{STAGE}: MLflow tracking is off: the best checkpoint is not registered")
        return
    from core.registry import log_pyfunc, register_and_gate

    source = log_pyfunc(
        client,
        run_id,
        REPO / "arpipe" / "pyfunc_model.py",
        artifacts={"model": str(Path(paths.models) / best), "tokenizer": str(paths.tokenizer)},
        code_paths=[str(REPO / "models")],
        pip_requirements=["torch", "numpy", "safetensors", "einops", "pandas"],
    )
    name = f"arpipe-{arch}"
    value = _value(results, best, cfg)
    version, decision = register_and_gate(
        client,
        name=name,
        source=source,
        run_id=run_id,
        metric=f"{cfg.select_metric}@{guidance_key(cfg.select_guidance)}",
        value=value,
        higher_is_better=cfg.higher_is_better,
        tags={"arpipe.checkpoint": best},
    )
    tracker.set_tags(
        {
            "arpipe.registry.model": name,
            "arpipe.registry.version": version,
            "arpipe.registry.champion_moved": decision.promote,
            "arpipe.registry.decision": decision.reason,
        }
    )
    tracker.log_metrics(
        {
            "registry/candidate_value": value,
            **({"registry/champion_value": decision.champion_value} if decision.champion_value is not None else {}),
        }
    )
    print(
        f"{STAGE}: registered {name} v{version} as candidate; champion {'moved' if decision.promote else 'kept'}: "
        f"{decision.reason}"
    )


def main() -> None:
    stage_main(STAGE, Config, run, is_main_process=process_state().is_main_process)


if __name__ == "__main__":
    main()
