"""sar: a next-scale (VAR) checkpoint + the token cache -> the same model after Self-Autoregressive Refinement.

Reads ``paths.models/<input>`` (``base``), the tokenizer in ``paths.tokenizer`` (VAR's quantizer
builds the inputs; samples are decoded by it) and ``paths.tokens/train.parquet`` (refusing a cache
from another tokenizer). Each step runs the model teacher-forced on the batch, takes its own
predictions of every scale (argmax or sampled, no gradient), rebuilds the inputs of the
student-forced scales from them with the ground-truth context below (models/sar.py), runs the
model again on those inputs and trains on ``CE(teacher-forced, ground truth) + σ·CE(student-forced,
teacher-forced prediction)``. The target is the current model's own detached prediction, so
there is no frozen reference model. Labels are dropped to the null class with the model's
``class_dropout`` (the same labels in both passes), and dropout stays on by default: SAR is the
tail of pretraining with the CSFL term added. AdamW under ``accelerate`` like pretrain.

A ``gpt`` checkpoint has no scales to roll out: it is passed through unchanged (same weights;
``config.json`` marks ``passthrough_of`` and ``skipped``), and ``metrics/sar.json`` and the MLflow
run record ``skipped`` with the reason.

Writes:
- ``paths.models/sar/model.safetensors`` + ``config.json`` (the same keys as ``base``, plus the
  input checkpoint's fingerprint) and ``samples.png`` (one row per class, guidance-free first)
- ``paths.plots/sar/train.csv`` (loss and the monitors) and ``metrics/sar.json``

A killed run resumes from ``paths.resume`` and ends with byte-identical weights (CPU). With
``rollout: sample`` each process draws its own shard's tokens, so samples depend on the process
count. Run by DVC as ``python -m stages.sar``.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from core.checkpoint import finetuned_config, read_checkpoint, write_checkpoint
from core.config import Paths
from core.images import guidance_grid, save_png
from core.metrics import write_rows_csv
from core.stage import stage_main
from core.token_store import load_tokens
from core.training import (
    Resume,
    add_to_window,
    build_accelerator,
    check_finite,
    compile_model,
    log_window,
    new_history,
    process_state,
    recorded_config,
    resume_dir,
    seed_everything,
    step_bar,
    step_generator,
    warmup_decay_lr,
)
from models.ar import ar_from_state, sample_per_guidance, tokenizer_from_state
from models.sar import (
    guided_rollout_logits,
    rollout_tokens,
    sar_loss,
    scale_mask,
    student_forced_input,
    student_forced_scales,
)

STAGE = "sar"
OUT_NAME = "sar"
MONITORS = ("tf_loss", "csfl", "sf_loss", "tf_loss_forced", "disagreement", "sf_agreement")
TRAIN_COLUMNS = ("step", "loss", *MONITORS, "lr", "grad_norm")
GPT_SKIP_REASON = "arch gpt has no scales to roll out: SAR applies to next-scale (var) models"


@dataclass(frozen=True, kw_only=True)
class Config:
    input: Literal["base"] = "base"
    """Checkpoint folder under ``paths.models`` to refine."""
    steps: int = 100
    """Optimizer steps; 0 = one epoch of the train cache, ceil(rows / batch_size). The paper runs
    ~5.5% of pretraining (10 epochs after 170-350); 100 steps of 64 are ~2 epochs of the digits
    cache, ~7% of pretrain's 1,500 steps."""
    batch_size: int = 64
    """Sequences per optimizer step over all processes (each runs twice: teacher- and student-forced)."""
    lr: float = 1.5e-4
    """Peak AdamW learning rate. The reference continues pretraining's schedule at its tail
    (≈0.16 → 0.10 of the peak): 1.5e-4 → 1e-4 against pretrain's peak 1e-3 and floor 1e-4."""
    warmup_steps: int = 0
    decay: Literal["cosine", "linear", "constant"] = "linear"
    """Decay after warmup, to ``min_lr_ratio·lr`` at the last step (the reference: linear)."""
    min_lr_ratio: float = 0.67
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    """AdamW decay on matmul weights only."""
    grad_clip: float = 1.0
    """Max global gradient norm (0 = no clipping; the reference uses 2.0, pretrain here 1.0)."""
    sigma: float = 0.05
    """σ, the weight of the CSFL term (the paper: 0.01 with 680 tokens; suggested toy sweep
    0.01 / 0.05 / 0.1)."""
    transitions: Literal["last", "all"] = "last"
    """Student-forced transitions: ``last`` (only the last scale sees a predicted scale below it:
    the released code) or ``all`` (every scale but the first: the paper's text)."""
    rollout: Literal["argmax", "sample"] = "argmax"
    """How the model's own predictions are drawn from the teacher-forced logits (the authors'
    scripts intend argmax; their trainer samples, with guidance 1.2, top-k 900, top-p 0.96)."""
    rollout_guidance: float = 0.0
    """Guidance on the rolled-out predictions (and so on the CSFL targets), the authors' trainer's
    ``sf_cfg_scale`` (1.2 there): at scale k, ``(1 + t)·cond − t·uncond`` with t ramping from
    ``0.5·g`` at the first scale to ``g`` at the last; the null-class logits come from one more
    teacher-forced pass without gradient. 0 = off (no extra pass)."""
    rollout_guidance_schedule: Literal["auto", "sar", "linear", "constant"] = "auto"
    """How ``rollout_guidance`` g spreads over the scales: ``sar`` (t from 0.5·g to g, the SAR
    trainer's), ``linear`` (t from 0 to g: VAR's sampler), ``constant`` (t = g); ``auto`` = the SAR
    authors' protocol, ``sar``."""
    rollout_temperature: float = 1.0
    rollout_top_k: int = 0
    """0 = off."""
    rollout_top_p: float = 1.0
    """1.0 = off."""
    target: Literal["teacher", "ground_truth"] = "teacher"
    """CSFL target: the teacher-forced prediction (SAR) or the ground truth (naive student forcing,
    the paper's worse ablation)."""
    keep_dropout: bool = True
    """Train with the model's dropout / drop-path on, as pretraining did."""
    label_dropout: bool = True
    """Drop labels to the null class with the model's ``class_dropout`` (keeps CFG working)."""
    mixed_precision: Literal["no", "bf16"] = "no"
    compile: bool = False
    """torch.compile the prepared model for training (GPUs: faster steps after a first step that
    compiles; off on CPU). Eager and compiled runs differ in rounding; resume is exact either way."""
    seed: int = 0
    log_every: int = 10
    """Steps between logged rows (MLflow and plots/sar/train.csv); the last step is always logged."""
    save_every: int = 25
    """Steps between resume states (0 = never)."""
    samples_per_class: int = 8
    sample_cfg: list[float] = field(default_factory=lambda: [1.0, 3.0])
    """Guidance scales of the sample grid (1.0 = guidance-free)."""
    launcher: str = ""
    """accelerate config file to run under; "" = this process."""

    def __post_init__(self):
        for name in ("batch_size", "log_every", "samples_per_class"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps < 0 or self.save_every < 0 or self.warmup_steps < 0:
            raise ValueError("steps, save_every and warmup_steps must be >= 0")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1 or self.grad_clip < 0:
            raise ValueError("lr must be > 0, min_lr_ratio in [0, 1] and grad_clip >= 0")
        if self.sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")
        if self.rollout_guidance < 0:
            raise ValueError(f"rollout_guidance must be >= 0, got {self.rollout_guidance}")
        if self.rollout_temperature <= 0 or self.rollout_top_k < 0 or not 0 < self.rollout_top_p <= 1:
            raise ValueError("rollout_temperature must be > 0, rollout_top_k >= 0 and rollout_top_p in (0, 1]")
        if not self.sample_cfg:
            raise ValueError("sample_cfg needs at least one guidance scale (1.0 = guidance-free)")


def total_steps(cfg: Config, rows: int) -> int:
    return cfg.steps or math.ceil(rows / cfg.batch_size)


def batch_at(cfg: Config, tokens_NL: np.ndarray, labels_N: np.ndarray, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's global batch: epochs are seeded permutations of the rows (a function of the step
    alone); the last batch of an epoch wraps around to the permutation's start."""
    count = len(tokens_NL)
    per_epoch = math.ceil(count / cfg.batch_size)
    epoch, within = divmod(step, per_epoch)
    order = torch.randperm(count, generator=step_generator(cfg.seed, epoch, purpose=2)).numpy()
    index = np.take(order, np.arange(within * cfg.batch_size, (within + 1) * cfg.batch_size), mode="wrap")
    return torch.from_numpy(tokens_NL[index].astype(np.int64)), torch.from_numpy(labels_N[index].astype(np.int64))


def load_models(cfg: Config, paths: Paths):
    """(tokenizer, its config, the input's weights, the input's config.json) on the CPU."""
    tok_state, tok_config = read_checkpoint(paths.tokenizer, stage="train_tokenizer")
    tokenizer = tokenizer_from_state(tok_state, tok_config)
    state, in_config = read_checkpoint(Path(paths.models) / cfg.input, stage="pretrain")
    if in_config["tokenizer_fingerprint"] != tok_config["fingerprint"]:
        raise ValueError(f"{paths.models}/{cfg.input} was trained on another tokenizer; re-run its stage")
    return tokenizer, tok_config, state, in_config


def run(cfg: Config, paths: Paths, tracker, on_step=None) -> dict:
    """Refine and write the outs; ``on_step(step)`` runs after each step (tests use it to crash)."""
    accelerator = build_accelerator(cfg.mixed_precision)
    seed_everything(cfg.seed)
    rank, world = accelerator.process_index, accelerator.num_processes
    if cfg.batch_size % world:
        raise ValueError(f"sar.batch_size {cfg.batch_size} must be divisible by processes ({world})")
    tokenizer, tok_config, state, in_config = load_models(cfg, paths)
    if in_config["arch"] != "var":
        return _pass_through(cfg, paths, tracker, state, in_config, accelerator, GPT_SKIP_REASON)
    raw_model = ar_from_state(state, in_config, tokenizer).train(cfg.keep_dropout)
    train = load_tokens(Path(paths.tokens) / "train.parquet", expected_fingerprint=tok_config["fingerprint"])
    steps = total_steps(cfg, len(train.tokens_NL))
    for module in (tokenizer, raw_model):
        module.to(accelerator.device)
    optimizer = torch.optim.AdamW(raw_model.param_groups(cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    model, optimizer = accelerator.prepare(raw_model, optimizer)
    model = compile_model(model, cfg.compile)  # after wrapping: see core.training.compile_model

    scales = raw_model.config.scales
    forced = student_forced_scales(len(scales), cfg.transitions)
    forced_L = scale_mask(scales, forced, accelerator.device)
    rolled_L = scale_mask(scales, [k - 1 for k in forced], accelerator.device)
    inputs = [paths.tokens, paths.tokenizer, Path(paths.models) / cfg.input]
    resume = Resume(accelerator, resume_dir(paths.resume, STAGE, cfg, inputs), cfg.save_every)
    start, history = resume.restore()
    history = history or new_history(("loss", *MONITORS))
    accelerator.print(
        f"{STAGE}: refining {paths.models}/{cfg.input} (var, scales {list(scales)}) for {steps} steps of "
        f"{cfg.batch_size} sequences, student-forced scales {forced} ({cfg.transitions}), {cfg.rollout} "
        f"rollout (guidance {cfg.rollout_guidance:g}), sigma {cfg.sigma}, target {cfg.target}"
    )
    tracker.log_params({"sar.resolved_steps": steps, "sar.processes": world, "sar.forced_scales": forced})

    bar = step_bar(STAGE, start, steps, accelerator)
    for step in bar:
        lr = warmup_decay_lr(step, steps=steps, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                             min_lr_ratio=cfg.min_lr_ratio, decay=cfg.decay)  # fmt: skip
        for group in optimizer.param_groups:
            group["lr"] = lr
        tokens_BL, labels_B = batch_at(cfg, train.tokens_NL, train.labels_N, step)
        # dropped for the whole global batch before it is split (any process count drops the same
        # rows) and shared by both passes, so the CSFL target comes from the same condition
        if cfg.label_dropout:
            labels_B = raw_model.drop_labels(labels_B, step_generator(cfg.seed, step, purpose=4))
        tokens_bl, labels_b = (t[rank::world].to(accelerator.device) for t in (tokens_BL, labels_B))
        with accelerator.autocast():
            teacher_blV = model(tokens_bl, labels_b, label_dropout=False)
        rollout_blV = teacher_blV
        if cfg.rollout_guidance > 0:
            with torch.no_grad(), accelerator.autocast():
                null_b = torch.full_like(labels_b, raw_model.null_class)
                uncond_blV = raw_model(tokens_bl, null_b, label_dropout=False)
            schedule = "sar" if cfg.rollout_guidance_schedule == "auto" else cfg.rollout_guidance_schedule
            rollout_blV = guided_rollout_logits(teacher_blV, uncond_blV, scales, cfg.rollout_guidance, schedule)
        predicted_bl = rollout_tokens(
            rollout_blV, mode=cfg.rollout, temperature=cfg.rollout_temperature, top_k=cfg.rollout_top_k,
            top_p=cfg.rollout_top_p, generator=step_generator(cfg.seed, step * world + rank, purpose=6),
        )  # fmt: skip
        student_inputs = student_forced_input(raw_model.quantizer, tokens_bl, predicted_bl, forced)
        with accelerator.autocast():
            # the bare module: the wrapped one's forward is the teacher-forced pass; one backward
            # below sums both passes' gradients before any data-parallel reduction hook fires
            student_blV = raw_model.forward_from_inputs(student_inputs, labels_b, label_dropout=False)
        loss, monitors = sar_loss(teacher_blV, student_blV, tokens_bl, predicted_bl, forced_L, rolled_L,
                                  sigma=cfg.sigma, target=cfg.target)  # fmt: skip
        check_finite({"loss": loss}, step, resume)
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        add_to_window(history, {"loss": float(loss.detach()), **monitors})

        done = step + 1
        if done % cfg.log_every == 0 or done == steps:
            row = log_window(history, tracker, step=done, lr=lr, grad_norm=float(grad_norm))
            bar.set_postfix(loss=f"{row['loss']:.4f}", csfl=f"{row['csfl']:.3f}", dis=f"{row['disagreement']:.2f}")
        resume.step_done(done, history)
        if on_step is not None:
            on_step(done)

    metrics: dict = {}
    if accelerator.is_main_process:
        metrics = _write_outputs(cfg, paths, raw_model.eval(), in_config, tokenizer, history, steps)
        tracker.log_metrics(metrics)
        tracker.log_image(_read_png(Path(paths.models) / OUT_NAME / "samples.png"), "samples.png")
        print(
            f"{STAGE}: last window loss {metrics['train_loss']:.4f} (teacher-forced {metrics['train_tf_loss']:.4f}, "
            f"CSFL {metrics['train_csfl']:.4f}, disagreement {metrics['train_disagreement']:.2f}) "
            f"-> {Path(paths.models) / OUT_NAME}"
        )
    resume.finish()
    return metrics


def _pass_through(cfg, paths, tracker, state, in_config, accelerator, reason: str) -> dict:
    """Write the input unchanged as ``sar`` (marked as a pass-through) and record why."""
    metrics = {"skipped": reason, "steps": 0}
    if accelerator.is_main_process:
        out_dir = Path(paths.models) / OUT_NAME
        config = {k: v for k, v in in_config.items() if k not in ("fingerprint", "stage_config")}
        config.update(
            stage=STAGE,
            passthrough_of=cfg.input,
            skipped=reason,
            input_checkpoint={"name": cfg.input, "fingerprint": in_config["fingerprint"]},
            stage_config=recorded_config(cfg),
        )
        write_checkpoint(out_dir, state, config)
        samples = Path(paths.models) / cfg.input / "samples.png"
        if samples.is_file():
            shutil.copyfile(samples, out_dir / "samples.png")
        _write_train_csv(paths, [])  # a DVC plots out: present, with no rows
        tracker.log_params({"sar.skipped": reason})
        tracker.set_tags({"arpipe.sar.skipped": reason})
        print(f"{STAGE}: skipped, {reason}; {paths.models}/{cfg.input} passed through unchanged -> {out_dir}")
    return metrics


def sample_grid(model, tokenizer, arch: str, cfg: Config) -> np.ndarray:
    """One row per class: guidance-free samples, then each other scale of ``sample_cfg`` (the
    family's authors' sampling: ``models.ar.sample_per_guidance``)."""
    samples = sample_per_guidance(model, tokenizer, arch, cfg.samples_per_class, cfg.sample_cfg, cfg.seed)
    return guidance_grid(samples, cfg.samples_per_class)


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _write_outputs(cfg, paths, model, in_config, tokenizer, history, steps) -> dict:
    out_dir = Path(paths.models) / OUT_NAME
    config = finetuned_config(STAGE, cfg.input, in_config, model.config_dict(), recorded_config(cfg))
    write_checkpoint(out_dir, model.state_dict(), config)
    save_png(sample_grid(model, tokenizer, in_config["arch"], cfg), out_dir / "samples.png")
    _write_train_csv(paths, history["train"])
    last = history["train"][-1]
    return {"steps": steps, **{f"train_{k}": last[k] for k in ("loss", *MONITORS)}}


def _write_train_csv(paths: Paths, rows: list[dict]) -> None:
    write_rows_csv(Path(paths.plots) / STAGE / "train.csv", TRAIN_COLUMNS, rows)


def main() -> None:
    stage_main(STAGE, Config, run, is_main_process=process_state().is_main_process)


if __name__ == "__main__":
    main()
