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

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from core.config import Paths
from core.finetune import (
    GuidedFinetuneConfig,
    apply_scheduled_lr,
    batch_at,
    end_step,
    guided_sample_grid,
    last_logged,
    load_input,
    optimizer_step,
    pass_through,
    prepare_training,
    restore_or_start,
    start_accelerator,
    steps_or_one_epoch,
    write_finetuned,
    write_train_csv,
)
from core.stage import stage_main
from core.token_store import load_tokens
from core.training import (
    add_to_window,
    check_finite,
    log_window,
    new_history,
    process_state,
    recorded_config,
    step_bar,
    step_generator,
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
class Config(GuidedFinetuneConfig):
    """SAR's fields; the optimizer and run fields are ``core.finetune.FinetuneConfig``'s."""

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
    decay: Literal["cosine", "linear", "constant"] = "linear"
    """Decay after warmup, to ``min_lr_ratio·lr`` at the last step (the reference: linear)."""
    min_lr_ratio: float = 0.67
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
    log_every: int = 10
    """Steps between logged rows (MLflow and plots/sar/train.csv); the last step is always logged."""

    def __post_init__(self):
        super().__post_init__()
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")
        if self.rollout_guidance < 0:
            raise ValueError(f"rollout_guidance must be >= 0, got {self.rollout_guidance}")
        if self.rollout_temperature <= 0 or self.rollout_top_k < 0 or not 0 < self.rollout_top_p <= 1:
            raise ValueError("rollout_temperature must be > 0, rollout_top_k >= 0 and rollout_top_p in (0, 1]")


def run(cfg: Config, paths: Paths, tracker, on_step=None) -> dict:
    """Refine and write the outs; ``on_step(step)`` runs after each step (tests use it to crash)."""
    accelerator = start_accelerator(STAGE, cfg)
    rank, world = accelerator.process_index, accelerator.num_processes
    tokenizer, tok_config, state, in_config = load_input(paths, cfg.input, "pretrain", tokenizer_from_state)
    if in_config["arch"] != "var":
        return _pass_through(cfg, paths, tracker, state, in_config, accelerator, GPT_SKIP_REASON)
    raw_model = ar_from_state(state, in_config, tokenizer).train(cfg.keep_dropout)
    train = load_tokens(Path(paths.tokens) / "train.parquet", expected_fingerprint=tok_config["fingerprint"])
    steps = steps_or_one_epoch(cfg.steps, cfg.batch_size, len(train.tokens_NL))
    model, optimizer = prepare_training(accelerator, cfg, raw_model, tokenizer)

    scales = raw_model.config.scales
    forced = student_forced_scales(len(scales), cfg.transitions)
    forced_L = scale_mask(scales, forced, accelerator.device)
    rolled_L = scale_mask(scales, [k - 1 for k in forced], accelerator.device)
    inputs = [paths.tokens, paths.tokenizer, Path(paths.models) / cfg.input]
    resume, start, history = restore_or_start(accelerator, STAGE, cfg, paths.resume, inputs,
                                              new_history(("loss", *MONITORS)))  # fmt: skip
    accelerator.print(
        f"{STAGE}: refining {paths.models}/{cfg.input} (var, scales {list(scales)}) for {steps} steps of "
        f"{cfg.batch_size} sequences, student-forced scales {forced} ({cfg.transitions}), {cfg.rollout} "
        f"rollout (guidance {cfg.rollout_guidance:g}), sigma {cfg.sigma}, target {cfg.target}"
    )
    tracker.log_params({"sar.resolved_steps": steps, "sar.processes": world, "sar.forced_scales": forced})

    bar = step_bar(STAGE, start, steps, accelerator)
    for step in bar:
        lr = apply_scheduled_lr(optimizer, cfg, step, steps)
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
        grad_norm = optimizer_step(accelerator, model, optimizer, loss, cfg.grad_clip)
        add_to_window(history, {"loss": float(loss.detach()), **monitors})

        done = step + 1
        if done % cfg.log_every == 0 or done == steps:
            row = log_window(history, tracker, step=done, lr=lr, grad_norm=grad_norm)
            bar.set_postfix(loss=f"{row['loss']:.4f}", csfl=f"{row['csfl']:.3f}", dis=f"{row['disagreement']:.2f}")
        end_step(resume, done, history, on_step)

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
    if accelerator.is_main_process:
        tracker.log_params({"sar.skipped": reason})
        pass_through(paths, STAGE, OUT_NAME, cfg.input, state, in_config, reason=reason,
                     stage_config=recorded_config(cfg), columns=TRAIN_COLUMNS, tracker=tracker)  # fmt: skip
    return {"skipped": reason, "steps": 0}


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _write_outputs(cfg, paths, model, in_config, tokenizer, history, steps) -> dict:
    sample_grid = guided_sample_grid(sample_per_guidance, tokenizer, in_config["arch"], cfg)
    write_finetuned(paths, STAGE, OUT_NAME, cfg.input, in_config, model, recorded_config(cfg), sample_grid)
    write_train_csv(paths, STAGE, TRAIN_COLUMNS, history["train"])
    return {"steps": steps, **last_logged(history, ("loss", *MONITORS))}


def main() -> None:
    stage_main(STAGE, Config, run, is_main_process=process_state().is_main_process)


if __name__ == "__main__":
    main()
