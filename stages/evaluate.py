"""evaluate: every AR checkpoint in the chain, side by side, and the registry's champion gate.

For each checkpoint present under ``paths.models`` (``base`` today; ``sar``, ``cca``, ``ddo``,
``distilled`` as they land), samples ``samples_per_class`` images per class (class-balanced,
shuffled, per-batch seeds; the same labels and seeds for every checkpoint) guidance-free and at
each ``cfg_scales`` value, decodes them with the tokenizer and scores them against the val split
in the feature space of the ``train_evalnet`` classifier: FID, Inception Score (over shuffled
splits), precision/recall (k-NN radii) and class accuracy; each FID with its 90% bootstrap interval
over the scored images (``fid_lo``, ``fid_hi``; ``fid_resamples`` resamples, seeded). Two bounds frame
the numbers:
``reconstruction`` (train images through the tokenizer round trip: the ceiling an AR model trained
on their tokens can reach) and ``train`` (the real train images: the floor), both scored against
val like the samples. These are proxy-space numbers, not comparable with
published ImageNet (Inception) FIDs. The report says which checkpoints are within noise of the
best (their intervals overlap) and, in one sentence, when the tokenizer is the bottleneck
(``core/verdicts.py``; the end-of-run summary prints the same sentences).

With ``inception_weights`` set to a local torch-fidelity InceptionV3 weights file, the same sets
are also embedded by that network (``models/inception.py``; never downloaded) and FID, IS and
precision/recall are computed again on its features, keyed ``inception_<metric>``. Class
accuracy exists only in the evalnet space (Inception's logits are ImageNet classes). The report
says which feature space each number uses.

A pass-through checkpoint (``config.json`` has ``passthrough_of``, e.g. ``sar`` on a ``gpt``) holds
the same weights as the checkpoint it copies, so it is not sampled again: the report says so in one
line and ``metrics/evaluate.json`` has no entry for it.

The distilled student (``distilled``, from the ``distill`` stage) has no guidance knob (its
teacher's is baked in): it is sampled in one and in two steps, reported as guidance ``1step`` and
``2step`` (keys ``distilled/1step/fid``, ...), next to its FID ratio to the teacher at the
teacher's distillation guidance (``fid_vs_teacher``) and its speed-up over that teacher measured
in this run: in throughput (images/s ratio at ``batch_size``) and in latency (one image's tokens
at a time, decode excluded), with the sequential forward passes, 1 or 2 against the teacher's steps. It is
reported, not registered: the champion is chosen among the AR checkpoints. Every checkpoint is
sampled through the same interface (``models/samplers.py``: its modes, ``sample``, latency), so the
scoring loop does not know which kind it holds; the comparisons with the teacher are made after it,
over its results.

The DD2 generator (``distilled2``, from ``distill2``) is scored the same way in one step only
(``distilled2/1step/*``; DD1's keep-prefix second step has no DD2 counterpart), with its speed-ups
over the teacher and, when DD1's student and the teacher at the shared distillation guidance are
scored in the same run, the share of DD1's gap to the teacher it closes:
``distilled2/1step/gap_closed_vs_dd1 = (FID_DD1 − FID_DD2) / (FID_DD1 − FID_teacher)`` (one-step
FIDs; ``inception_gap_closed_vs_dd1`` in Inception space).

Writes ``paths.eval/report.md`` (one side-by-side table) and ``grid.png`` (one row per
checkpoint and guidance, labelled on the left; ``grid_per_class`` columns per class, the class name
above them), ``metrics/evaluate.json`` keyed
``<checkpoint>/<guidance>/<metric>`` (guidance ``cfg1`` is guidance-free), and
``paths.last_run/evaluate_registry.json`` (the registry's decision). The measured speed
(images/s; sequential forward passes per image) changes on every run, so it stays out of the DVC
outs and metrics: MLflow (``speed/*``) and ``paths.last_run/evaluate_speed.json`` (gitignored).
With MLflow tracking on, the best checkpoint (``select_metric`` at ``select_guidance``) is logged
as a pyfunc and registered as ``arpipe-<arch>``: alias ``candidate`` always, ``champion`` only
when it beats the current champion.

This module scores; the report's text is ``core/eval_report.py`` and the registry gate
``core/eval_registry.py``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from core.checkpoint import read_checkpoint, teacher_cfg_scale
from core.config import Paths
from core.eval_registry import registry_record
from core.eval_report import DISTILLED, DISTILLED2, guidance_key, report_markdown
from core.images import labelled_grid, save_png
from core.metrics import flatten_metrics
from core.reference_batch import read_reference_batch
from core.shards import load_split
from core.stage import stage_main
from core.training import deterministic_kernels, process_state
from core.verdicts import INTERVAL_LEVEL, verdicts
from models.ar import tokenizer_from_state
from models.evalnet import build_evalnet, embed_images
from models.inception import embed_inception, load_inception
from models.metrics import (
    class_accuracy,
    feature_statistics,
    fid_from_features,
    fid_interval,
    frechet_distance,
    inception_score,
    precision_recall,
)
from models.samplers import Sampler, SamplingSettings, sampler_from_state
from models.sampling import GuidanceScheduleName

STAGE = "evaluate"
CHAIN = ("base", "sar", "cca", "ddo", "distilled", "distilled2")
LATENCY_IMAGES = 20  # images generated one at a time for the latency speed-up
METRICS = ("fid", "is", "precision", "recall", "class_acc")
"""Metrics in the evalnet (proxy) feature space, always computed."""
INCEPTION_METRICS = ("inception_fid", "inception_is", "inception_precision", "inception_recall")
"""The same metrics in torch-fidelity's InceptionV3 space (with ``inception_weights``); no class accuracy."""


@dataclass(frozen=True, kw_only=True)
class Config:
    samples_per_class: int = 100
    """Samples per class for each checkpoint and guidance scale."""
    cfg_scales: list[float] = field(default_factory=lambda: [1.0, 3.0])
    """Guidance scales (logits = u + cfg_scale·(c − u)); 1.0 = guidance-free, always evaluated. Under a
    ramp the scale is the last step's (VAR's own ``cfg = 1.5`` is 2.5 here)."""
    guidance_schedule: GuidanceScheduleName = "auto"
    """How each scale is spread over the sampling steps: ``constant``, ``linear`` (1.0 at the first
    step up to the scale at the last: VAR's ramp over scales) or ``auto``, each family's authors'
    protocol (gpt: constant, var: linear)."""
    temperature: float = 1.0
    top_k: int | Literal["auto"] = "auto"
    """0 = off; ``auto``: the family's (gpt: off, var: 900, capped at the vocabulary)."""
    top_p: float | Literal["auto"] = "auto"
    """1.0 = off; ``auto``: the family's (gpt: off, var: 0.96)."""
    batch_size: int = 250
    """Images sampled per batch (each batch draws from its own seeded generator)."""
    compile: bool = False
    """Sample the AR checkpoints through ``torch.compile``d decoding steps (a static KV cache for
    gpt, a graph per scale for var): the same draws, faster on GPUs once compiled; off on CPU, where
    compiling costs more than it saves at these sizes. The first batch's time includes compiling."""
    seed: int = 0
    pr_k: int = 3
    """Neighbourhood size of precision/recall."""
    is_splits: int = 10
    """Inception Score splits (rows shuffled first)."""
    fid_resamples: int = 50
    """Bootstrap resamples of each scored set behind its FID's 90% interval (``fid_lo``, ``fid_hi``;
    ``inception_fid_lo``, ``inception_fid_hi``): the report says which checkpoints are within noise
    of the best. 0 = no intervals."""
    grid_per_class: int = 2
    """Samples per class in each row of grid.png."""
    select_metric: Literal[
        "fid",
        "is",
        "precision",
        "recall",
        "class_acc",
        "inception_fid",
        "inception_is",
        "inception_precision",
        "inception_recall",
    ] = "fid"
    """Metric that picks the best checkpoint and gates the champion (``inception_*`` needs
    ``inception_weights``)."""
    select_guidance: float = 1.0
    """Guidance scale whose numbers are compared (1.0 = guidance-free)."""
    register: bool = True
    """Register the best checkpoint in MLflow (needs tracking on; skipped otherwise)."""
    inception_weights: str = ""
    """Local torch-fidelity InceptionV3 weights (``weights-inception-2015-12-05-6726825d.pth``),
    absolute or relative to the directory the stage runs in: adds ``inception_*`` metrics. Empty =
    evalnet space only. Never downloaded."""
    reference_batch: str = ""
    """An ADM reference batch (e.g. ``VIRTUAL_imagenet256_labeled.npz``: its ``mu``/``sigma``, else
    its ``arr_0`` images through our Inception): adds ``inception_fid_ref``, the Inception-space FID
    against it, the number the papers' tables report (at their sample count and resolution).
    Needs ``inception_weights``. Empty = off."""

    def __post_init__(self):
        if min(self.samples_per_class, self.batch_size, self.pr_k, self.is_splits, self.grid_per_class) < 1:
            raise ValueError("samples_per_class, batch_size, pr_k, is_splits and grid_per_class must be >= 1")
        if self.fid_resamples < 0 or self.fid_resamples == 1:
            raise ValueError(f"fid_resamples must be 0 (no intervals) or >= 2, got {self.fid_resamples}")
        if self.select_guidance not in self.scales:
            raise ValueError(f"select_guidance {self.select_guidance} is not among cfg_scales {self.scales}")
        if self.select_metric in INCEPTION_METRICS and not self.inception_weights:
            raise ValueError(f"select_metric {self.select_metric} needs inception_weights (a local weights file)")
        if self.reference_batch and not self.inception_weights:
            raise ValueError("reference_batch needs inception_weights: its statistics are Inception features")

    @property
    def scales(self) -> list[float]:
        """Guidance scales to evaluate: 1.0 first, then the others in the given order."""
        return [1.0] + [s for s in dict.fromkeys(self.cfg_scales) if s != 1.0]

    @property
    def higher_is_better(self) -> bool:
        return self.select_metric not in ("fid", "inception_fid")


def load_evalnet(evalnet_dir: str | Path):
    state, config = read_checkpoint(evalnet_dir, stage="train_evalnet")
    net = build_evalnet(config["model"])
    net.load_state_dict(state)
    return net.eval(), config


def score(feats_ND, logits_NC, labels_N, real_feats_MD, cfg: Config) -> dict:
    """The metrics of one image set against the real (val) features; no class accuracy when
    ``labels_N`` is None (a network whose classes are not the dataset's); FID's interval with
    ``fid_resamples``."""
    logits = torch.from_numpy(logits_NC)
    probs = torch.softmax(logits, dim=1).numpy()
    inception, _ = inception_score(probs, splits=min(cfg.is_splits, len(probs)), shuffle_seed=cfg.seed)
    precision, recall = precision_recall(real_feats_MD, feats_ND, k=cfg.pr_k)
    if cfg.fid_resamples:
        fid, fid_lo, fid_hi = fid_interval(
            feats_ND, real_feats_MD, resamples=cfg.fid_resamples, level=INTERVAL_LEVEL, seed=cfg.seed
        )
        metrics = {"fid": fid, "fid_lo": fid_lo, "fid_hi": fid_hi}
    else:
        metrics = {"fid": fid_from_features(feats_ND, real_feats_MD)}
    metrics.update({"is": inception, "precision": precision, "recall": recall})
    if labels_N is not None:
        metrics["class_acc"] = class_accuracy(logits_NC, labels_N)
    return metrics


@dataclass(frozen=True)
class FeatureSpace:
    """A network whose features and logits the metrics are computed on, and the val set's features."""

    prefix: str
    """Prepended to the metric names: "" for the evalnet, "inception_" for Inception."""
    embed: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
    """uint8 NHWC images -> (features_ND, logits_NC), float64."""
    has_classes: bool
    """Its logits are the dataset's classes (class accuracy is meaningful)."""
    real_features: np.ndarray
    """Features of the val images (the reference set)."""
    reference_stats: tuple[np.ndarray, np.ndarray] | None = None
    """(mu, sigma) of an external reference batch: adds ``fid_ref`` in this space."""


def feature_spaces(evalnet, inception, val_NHWC: np.ndarray, reference: dict | None = None) -> list[FeatureSpace]:
    """The evalnet space always, Inception's when its extractor is loaded; val embedded in each, and
    an ADM reference batch (``core.reference_batch``) as Inception statistics when one is given."""
    spaces = [FeatureSpace("", lambda x: embed_images(evalnet, x), True, embed_images(evalnet, val_NHWC)[0])]
    if inception is not None:
        embed = lambda x: embed_inception(inception, x)  # noqa: E731
        stats = None
        if reference is not None:
            stats = (reference["mu"], reference["sigma"]) if "mu" in reference else feature_statistics(
                embed(reference["images"])[0]
            )  # fmt: skip
        spaces.append(FeatureSpace("inception_", embed, False, embed(val_NHWC)[0], stats))
    return spaces


def score_images(images_NHWC: np.ndarray, labels_N: np.ndarray, spaces: list[FeatureSpace], cfg: Config) -> dict:
    """Every metric of one image set in every feature space, keyed ``<prefix><metric>``."""
    metrics = {}
    for space in spaces:
        feats, logits = space.embed(images_NHWC)
        scores = score(feats, logits, labels_N if space.has_classes else None, space.real_features, cfg)
        if space.reference_stats is not None:
            scores["fid_ref"] = frechet_distance(*feature_statistics(feats), *space.reference_stats)
        metrics.update({space.prefix + key: value for key, value in scores.items()})
    return metrics


def load_inception_weights(cfg: Config):
    """torch-fidelity's InceptionV3 from ``inception_weights``, or None when it is empty."""
    if not cfg.inception_weights:
        return None, None
    try:
        extractor = load_inception(cfg.inception_weights)
    except (OSError, ValueError, ImportError) as error:
        raise type(error)(f"{STAGE}.inception_weights: {error}") from error
    path = Path(cfg.inception_weights)
    with path.open("rb") as f:
        identity = f"`{path.name}`, sha256 {hashlib.file_digest(f, 'sha256').hexdigest()[:12]}"
    return extractor, identity


def present_checkpoints(models_dir: str | Path) -> list[str]:
    """Chain checkpoints that exist, in chain order."""
    return [name for name in CHAIN if (Path(models_dir) / name / "config.json").is_file()]


def pass_throughs(models_dir: str | Path, names: list[str]) -> dict[str, str]:
    """{name: why it is not evaluated} for the checkpoints that are unchanged copies of another."""
    out = {}
    for name in names:
        config = json.loads((Path(models_dir) / name / "config.json").read_text())
        if config.get("passthrough_of"):
            reason = config.get("skipped", "no reason recorded")
            out[name] = f"a pass-through of `{config['passthrough_of']}` (same weights; {reason})"
    return out


def run(cfg: Config, paths: Paths, tracker) -> dict:
    deterministic_kernels()
    names = present_checkpoints(paths.models)
    if not names:
        raise FileNotFoundError(f"no checkpoint in {paths.models}/{{{','.join(CHAIN)}}}: run pretrain first")
    skipped = pass_throughs(paths.models, names)
    names = [name for name in names if name not in skipped]
    for name, why in skipped.items():
        print(f"{STAGE}: {name}: not evaluated, {why}")
    inception, inception_identity = load_inception_weights(cfg)  # before any work: a bad path fails here
    reference = read_reference_batch(cfg.reference_batch) if cfg.reference_batch else None
    evalnet, evalnet_config = load_evalnet(paths.evalnet)
    tok_state, tok_config = read_checkpoint(paths.tokenizer, stage="train_tokenizer")
    tokenizer = tokenizer_from_state(tok_state, tok_config)
    val, train = load_split(paths.shards, "val"), load_split(paths.shards, "train")
    spaces = feature_spaces(evalnet, inception, val.images_NHWC, reference)
    num_classes = len(tok_config["class_names"])

    # 1. bounds: train images through the tokenizer (the best an AR model trained on their tokens
    # can do: the ceiling) and the real train images themselves (the floor), both unpaired with val
    results: dict = {}
    recon_NHWC = _reconstruct(tokenizer, train.images_NHWC)
    for bound, images in (("reconstruction", recon_NHWC), ("train", train.images_NHWC)):
        results[bound] = {"real": score_images(images, train.labels_N, spaces, cfg)}

    # 2. every checkpoint in each of its modes (guidance scales; a student's step counts), same labels
    # and seeds, all through one sampler interface (models/samplers.py)
    order = torch.randperm(num_classes * cfg.samples_per_class, generator=torch.Generator().manual_seed(cfg.seed))
    labels_N = torch.arange(num_classes).repeat_interleave(cfg.samples_per_class)[order]
    speed: dict = {}
    grid_rows = [_grid_row(val.images_NHWC, val.labels_N, num_classes, cfg.grid_per_class)]
    row_names = ["val (real)"]
    settings = SamplingSettings(
        guidance={guidance_key(scale): scale for scale in cfg.scales},
        guidance_schedule=cfg.guidance_schedule,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        compile=cfg.compile,
    )
    samplers: dict[str, Sampler] = {}
    for name in names:
        state, config = read_checkpoint(Path(paths.models) / name)
        if config.get("tokenizer_fingerprint") != tok_config["fingerprint"]:
            raise ValueError(
                f"{paths.models}/{name} was trained on another tokenizer: re-run the stages after train_tokenizer"
            )
        sampler = samplers[name] = sampler_from_state(state, config, tokenizer, settings)
        results[name], speed[name] = {}, _passes(sampler)
        for mode in sampler.modes:
            start = time.perf_counter()
            images = sampler.sample(labels_N, mode, seed=cfg.seed, batch_size=cfg.batch_size).numpy()
            speed[name][f"{mode}_images_per_s"] = len(images) / (time.perf_counter() - start)
            results[name][mode] = score_images(images, labels_N.numpy(), spaces, cfg)
            grid_rows.append(_grid_row(images, labels_N.numpy(), num_classes, cfg.grid_per_class))
            row_names.append(f"{name} {mode}")
        print(f"{STAGE}: {name}: " + ", ".join(_fid_line(g, m) for g, m in results[name].items()))

    # 3. the distilled students against their teachers: ratios over the results, timings in this run
    teachers = {name: sampler.teacher for name, sampler in samplers.items() if sampler.teacher is not None}
    for name in teachers:
        _compare_with_teacher(cfg, name, samplers, results, speed, labels_N)
    _gap_closed(results, teachers)

    # 4. outs, the best checkpoint (among the AR checkpoints, which the registry can serve) and the registry
    ar_names = [name for name in names if samplers[name].registrable]
    if not ar_names:
        raise FileNotFoundError(f"no AR checkpoint in {paths.models} besides the distilled student")
    best = _best(ar_names, results, cfg)
    eval_dir = Path(paths.eval)
    eval_dir.mkdir(parents=True, exist_ok=True)
    report = report_markdown(results, names, cfg, best, evalnet_config, inception_identity, skipped, speed)
    (eval_dir / "report.md").write_text(report)
    grid = labelled_grid(  # rows: val, then checkpoint x guidance; a class name over its columns
        np.concatenate(grid_rows), num_classes * cfg.grid_per_class, row_names, list(tok_config["class_names"])
    )
    save_png(grid, eval_dir / "grid.png")
    write_last_run(paths, "evaluate_speed.json", speed)  # timings: not a DVC out (see Paths.last_run)
    metrics = {**results, "best_value": _value(results, best, cfg)}
    tracker.log_metrics({**flatten_metrics(results), **flatten_metrics(speed, "speed/")})
    tracker.log_image(grid, "grid.png")
    tracker.log_artifact(eval_dir / "report.md")
    tracker.set_tags({"arpipe.eval.best_checkpoint": best, "arpipe.eval.grid_rows": " | ".join(row_names),
                      **{f"arpipe.eval.skipped.{name}": why for name, why in skipped.items()}})  # fmt: skip
    record = registry_record(
        tracker,
        paths,
        best=best,
        arch=samplers[best].arch,
        select=f"{cfg.select_metric}@{guidance_key(cfg.select_guidance)}",
        value=_value(results, best, cfg),
        higher_is_better=cfg.higher_is_better,
        register=cfg.register,
        image_shape_HWC=(tokenizer.config.image_size, tokenizer.config.image_size, tokenizer.config.image_channels),
    )
    write_last_run(paths, "evaluate_registry.json", record)
    print(f"{STAGE}: best checkpoint {best} ({cfg.select_metric} {_value(results, best, cfg):.3f}) -> {eval_dir}")
    for verdict in verdicts(results, cfg.select_metric, guidance_key(cfg.select_guidance)):
        print(f"{STAGE}: {verdict}")
    return metrics


def write_last_run(paths: Paths, name: str, record: dict) -> Path:
    """``paths.last_run/<name>``: figures that change every run, kept out of DVC outs and git."""
    target = Path(paths.last_run) / name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return target


def _passes(sampler: Sampler) -> dict[str, int]:
    """Sequential forward passes per image for the speed record: ``steps_per_image`` when every mode
    takes the same (AR models), else ``<mode>_steps_per_image`` (students)."""
    if sampler.steps_per_image is not None:
        return {"steps_per_image": sampler.steps_per_image}
    return {f"{mode}_steps_per_image": sampler.passes(mode) for mode in sampler.modes}


def _fid_line(guidance: str, metrics: dict) -> str:
    inception = f" (Inception {metrics['inception_fid']:.2f})" if "inception_fid" in metrics else ""
    return f"{guidance} FID {metrics['fid']:.2f}{inception}"


def _gap_closed(results: dict, teachers: dict) -> None:
    """DD2's one-step FID gap to the teacher against DD1's: ``(FID_DD1 − FID_DD2) / (FID_DD1 −
    FID_teacher)`` at the teacher's distillation guidance, in every feature space scored; only when
    both students distil the same teacher at the same guidance, all three were scored here and DD1's FID
    is above the teacher's (otherwise the ratio divides by a gap that is not there)."""
    if DISTILLED not in teachers or DISTILLED2 not in teachers:
        return
    dd1, dd2 = teachers[DISTILLED], teachers[DISTILLED2]
    distilled_from = lambda teacher: (teacher["name"], teacher.get("fingerprint"), teacher_cfg_scale(teacher))
    same = distilled_from(dd1) == distilled_from(dd2)
    teacher_row = results.get(dd2["name"], {}).get(guidance_key(teacher_cfg_scale(dd2)))
    if not same or teacher_row is None:
        print(f"{STAGE}: {DISTILLED2}: no gap closed vs DD1 (different teachers, or the teacher not scored here)")
        return
    for prefix in ("", "inception_"):
        if prefix + "fid" not in teacher_row:
            continue
        fid_dd1, fid_dd2 = results[DISTILLED]["1step"][prefix + "fid"], results[DISTILLED2]["1step"][prefix + "fid"]
        gap = fid_dd1 - teacher_row[prefix + "fid"]
        if gap <= 0:  # DD1 already scores at or below its teacher: there is no gap for DD2 to close
            print(f"{STAGE}: {DISTILLED2}: no {prefix}gap closed vs DD1: DD1's one-step {prefix}FID {fid_dd1:.3f} is "
                  f"not above the teacher's {teacher_row[prefix + 'fid']:.3f}")  # fmt: skip
            continue
        results[DISTILLED2]["1step"][prefix + "gap_closed_vs_dd1"] = (fid_dd1 - fid_dd2) / gap


def _compare_with_teacher(cfg: Config, name: str, samplers: dict, results: dict, speed: dict, labels_N) -> None:
    """Student ``name``'s FID ratio and speed-up against its teacher at the teacher's distillation
    guidance, timed in this run (the teacher is sampled again for timing if that guidance was not
    among ``cfg_scales``). Skipped when the teacher checkpoint is not evaluated here."""
    student, teacher = samplers[name], samplers[name].teacher
    teacher_name, scale = teacher["name"], teacher_cfg_scale(teacher)
    guidance = guidance_key(scale)
    if teacher_name not in samplers:
        print(f"{STAGE}: {name}: teacher {teacher_name} is not evaluated here; no speed-up or FID ratio")
        return
    # the pairs' guidance, spread as distill_pairs spread it (students before the schedule: constant)
    at_distillation = samplers[teacher_name].with_guidance(
        {guidance: (scale, teacher.get("guidance_schedule", "constant"))}
    )
    teacher_speed = speed[teacher_name]
    key = f"{guidance}_images_per_s"
    if key not in teacher_speed:
        start = time.perf_counter()
        at_distillation.sample(labels_N, guidance, seed=cfg.seed, batch_size=cfg.batch_size)
        teacher_speed[key] = len(labels_N) / (time.perf_counter() - start)
    # latency: one image's tokens at a time, decode excluded (the same decoder serves both)
    latency_labels = labels_N[:LATENCY_IMAGES]
    teacher_speed[f"{guidance}_token_ms_b1"] = at_distillation.token_latency_ms(latency_labels, guidance, seed=cfg.seed)
    for mode in student.modes:
        speed[name][f"{mode}_speedup"] = speed[name][f"{mode}_images_per_s"] / teacher_speed[key]
        speed[name][f"{mode}_step_reduction"] = at_distillation.passes(guidance) / student.passes(mode)
        speed[name][f"{mode}_token_ms_b1"] = student.token_latency_ms(latency_labels, mode, seed=cfg.seed)
        speed[name][f"{mode}_latency_speedup"] = (
            teacher_speed[f"{guidance}_token_ms_b1"] / speed[name][f"{mode}_token_ms_b1"]
        )
        if guidance in results[teacher_name]:
            results[name][mode]["fid_vs_teacher"] = results[name][mode]["fid"] / results[teacher_name][guidance]["fid"]
        print(
            f"{STAGE}: {name} {mode}: {speed[name][f'{mode}_speedup']:.2f}x the images/s of {teacher_name} "
            f"at {guidance} (batch {cfg.batch_size}), {speed[name][f'{mode}_latency_speedup']:.2f}x its latency "
            f"(one image's tokens at a time), {speed[name][f'{mode}_step_reduction']:g}x fewer sequential passes"
        )


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


def main() -> None:
    stage_main(STAGE, Config, run, is_main_process=process_state().is_main_process)


if __name__ == "__main__":
    main()
