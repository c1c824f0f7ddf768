"""distill: the teacher + its flow-matching pairs -> a one/two-step DD1 student (either family).

Reads ``paths.distill/pairs.parquet`` (from ``distill_pairs``) and the teacher it names under
``paths.models`` (refusing pairs whose teacher fingerprint differs), and the tokenizer (the codebook
space; VAR's quantizer; decoding). The student (models/dd_student.py) starts from the teacher's
weights. Each training row is the state ``X_t``: with probability ``prefix_fraction`` the first
``two_step_at`` AR steps hold the teacher's tokens (data) and the rest the row's ORIGINAL noise,
otherwise everything is noise (t ∈ {0, two_step_at}, DD1's timestep set for 2-step models). The
loss is cross-entropy on the logits-head positions (the first ``split`` AR steps) plus
``continuous_weight`` × MSE to the codeword on the continuous-head positions, over noise positions
only. AdamW under ``accelerate`` like pretrain; optional EMA weights. The last ``val_count`` pairs
are held out: the share of their tokens that one- and two-step sampling reproduce exactly.

Writes:
- ``paths.models/distilled/model.safetensors`` + ``config.json`` (``"distilled": true``, the
  teacher's architecture under ``model``, the student's additions under ``dd``, the teacher's name
  and fingerprint, the pairs' settings) and ``samples.png`` (per class: 1-step, then 2-step)
- ``paths.plots/distill/train.csv`` and ``metrics/distill.json``

A killed run resumes from ``paths.resume`` with byte-identical weights (CPU). Run by DVC as
``python -m stages.distill``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from core.checkpoint import read_checkpoint, teacher_cfg_scale, write_checkpoint
from core.config import Paths
from core.finetune import (
    FinetuneConfig,
    apply_scheduled_lr,
    batch_index,
    end_step,
    last_logged,
    optimizer_step,
    output_weights,
    prepare_training,
    restore_or_start,
    start_accelerator,
    write_train_csv,
)
from core.images import image_grid, save_png
from core.pair_store import load_pairs, read_meta
from core.stage import stage_main
from core.training import (
    EMA,
    add_to_window,
    check_finite,
    log_window,
    new_history,
    process_state,
    recorded_config,
    step_bar,
    step_generator,
)
from models.ar import ar_from_state, tokenizer_from_state
from models.dd import code_space, tokens_per_step
from models.dd_student import DDConfig, sample_distilled_images, student_from_teacher

STAGE = "distill"
OUT_NAME = "distilled"
PAIRS_FILE = "pairs.parquet"
MONITORS = ("ce", "mse", "token_acc", "code_acc")
TRAIN_COLUMNS = ("step", "loss", *MONITORS, "lr", "grad_norm")


@dataclass(frozen=True, kw_only=True)
class Config(FinetuneConfig):
    """DD1's fields; the optimizer and run fields are ``core.finetune.FinetuneConfig``'s."""

    steps: int = 500
    """Optimizer steps."""
    batch_size: int = 64
    """Pairs per optimizer step over all processes."""
    lr: float = 5e-4
    """Peak AdamW learning rate."""
    warmup_steps: int = 50
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup, to ``min_lr_ratio·lr`` at the last step."""
    min_lr_ratio: float = 0.1
    ema_decay: float = 0.0
    """EMA of the weights written as the student (0 = off; DD1 evaluates EMA weights)."""
    split: int = 0
    """AR steps (GPT tokens, VAR scales) whose positions use the logits head, the rest the
    continuous head; 0 = GPT ⌊3L/4⌋, VAR K − 1 (only the last scale continuous). DD1: 80 of 256
    tokens, 5 of 10 scales; on digits half the steps (GPT 8 of 16, VAR 2 of 4) gave 1.3-2.4x the
    teacher's FID and these 1.05-1.45x: the regressed codewords are the students' weak part."""
    two_step_at: int = 0
    """AR steps kept as data between the two sampling steps (t2, ≤ split); 0 = GPT ⌊L/4⌋, VAR
    ⌈K/2⌉ (DD1: 80 of 256 tokens, 5 of 10 scales)."""
    prefix_fraction: float = 0.5
    """Share of training rows given the data prefix of ``two_step_at`` steps (the rest start
    from pure noise)."""
    continuous_weight: float = 1.0
    """Weight of the continuous head's MSE against the logits head's cross-entropy."""
    val_count: int = 500
    """Last pairs held out for the token agreement of 1- and 2-step sampling (0 = none)."""
    keep_dropout: bool = False
    """Train with the teacher's dropout on (off: the student is fit deterministically)."""
    log_every: int = 25
    """Steps between logged rows (MLflow and plots/distill/train.csv); the last step is always logged."""
    save_every: int = 250
    """Steps between resume states (0 = never)."""

    def __post_init__(self):
        super().__post_init__()
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if min(self.split, self.two_step_at, self.val_count) < 0:
            raise ValueError("split, two_step_at and val_count must be >= 0")
        if not 0 <= self.prefix_fraction <= 1 or self.continuous_weight < 0:
            raise ValueError("prefix_fraction must be in [0, 1] and continuous_weight >= 0")
        if not (self.ema_decay == 0 or 0 < self.ema_decay < 1):
            raise ValueError(f"ema_decay must be 0 (off) or in (0, 1), got {self.ema_decay}")


def dd_config(cfg: Config, arch: str, steps: int, code_dim: int) -> DDConfig:
    """The student's split and two-step point, with the documented automatic values for 0."""
    split = cfg.split or max(3 * steps // 4 if arch == "gpt" else steps - 1, 1)
    two_step_at = cfg.two_step_at or (max(steps // 4, 1) if arch == "gpt" else math.ceil(steps / 2))
    dd = DDConfig(code_dim=code_dim, split=split, two_step_at=two_step_at)
    try:
        dd.check(steps)
    except ValueError as error:
        raise ValueError(f"distill: {error} (the teacher samples in {steps} steps)") from None
    return dd


def load_inputs(cfg: Config, paths: Paths):
    """(student, pairs, teacher config, tokenizer, tokenizer config) on the CPU."""
    pairs_path = Path(paths.distill) / PAIRS_FILE
    meta = read_meta(pairs_path)
    tok_state, tok_config = read_checkpoint(paths.tokenizer, stage="train_tokenizer")
    tokenizer = tokenizer_from_state(tok_state, tok_config)
    teacher_dir = Path(paths.models) / meta["teacher"]
    state, teacher_config = read_checkpoint(teacher_dir, stage=f"the stage that writes {meta['teacher']}")
    if teacher_config["tokenizer_fingerprint"] != tok_config["fingerprint"]:
        raise ValueError(f"{teacher_dir} was trained on another tokenizer; re-run the stages after train_tokenizer")
    pairs = load_pairs(pairs_path, expected_teacher_fingerprint=teacher_config["fingerprint"])
    teacher = ar_from_state(state, teacher_config, tokenizer)
    codebook_VD, _ = code_space(tokenizer)
    if codebook_VD.shape[1] != meta["code_dim"]:
        raise ValueError(
            f"{pairs_path}: noise of {meta['code_dim']} dims, the tokenizer's codes have {codebook_VD.shape[1]}"
        )
    dd = dd_config(cfg, teacher_config["arch"], len(tokens_per_step(teacher)), meta["code_dim"])
    student = student_from_teacher(teacher_config["arch"], teacher, dd, codebook_VD)
    return student, pairs, teacher_config, tokenizer, tok_config


def training_batch(cfg: Config, pairs, index: np.ndarray, prefix_positions: int, step: int):
    """(noise, tokens, data mask, labels) of the rows ``index``: a ``prefix_fraction`` of them hold
    the teacher's tokens on the first ``prefix_positions`` positions (drawn for the global batch)."""
    noise_BLD = torch.from_numpy(pairs.noise_NLD[index])
    tokens_BL = torch.from_numpy(pairs.tokens_NL[index].astype(np.int64))
    labels_B = torch.from_numpy(pairs.labels_N[index].astype(np.int64))
    prefixed_B = torch.rand(len(index), generator=step_generator(cfg.seed, step, purpose=6)) < cfg.prefix_fraction
    data_BL = prefixed_B[:, None] & (torch.arange(tokens_BL.shape[1]) < prefix_positions)
    return noise_BLD, tokens_BL, data_BL, labels_B


def run(cfg: Config, paths: Paths, tracker, on_step=None) -> dict:
    """Train the student and write the outs; ``on_step(step)`` runs after each step (tests crash there)."""
    accelerator = start_accelerator(STAGE, cfg)
    rank, world = accelerator.process_index, accelerator.num_processes
    raw_model, pairs, teacher_config, tokenizer, tok_config = load_inputs(cfg, paths)
    train_rows = len(pairs.labels_N) - cfg.val_count
    if train_rows < 1:
        raise ValueError(f"distill.val_count {cfg.val_count} leaves no training pairs of {len(pairs.labels_N)}")
    raw_model.train(cfg.keep_dropout)
    model, optimizer = prepare_training(accelerator, cfg, raw_model, tokenizer)
    ema = EMA(raw_model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    teacher_dir = Path(paths.models) / pairs.meta["teacher"]
    inputs = [Path(paths.distill) / PAIRS_FILE, paths.tokenizer, teacher_dir]
    resume, start, history = restore_or_start(accelerator, STAGE, cfg, paths.resume, inputs,
                                              new_history(("loss", *MONITORS)))  # fmt: skip
    dd = raw_model.dd
    prefix_positions = raw_model.prefix_positions(dd.two_step_at)
    accelerator.print(
        f"{STAGE}: {teacher_config['arch']} student from {teacher_dir} on {train_rows} pairs for {cfg.steps} steps; "
        f"logits head on {raw_model.prefix_positions(dd.split)} of {raw_model.seq_len} positions "
        f"({dd.split} steps), two-step point {dd.two_step_at} steps ({prefix_positions} positions)"
    )
    tracker.log_params({"distill.resolved_split": dd.split, "distill.resolved_two_step_at": dd.two_step_at,
                        "distill.processes": world})  # fmt: skip

    bar = step_bar(STAGE, start, cfg.steps, accelerator)
    for step in bar:
        lr = apply_scheduled_lr(optimizer, cfg, step, cfg.steps)
        batch = training_batch(cfg, pairs, batch_index(cfg, train_rows, step), prefix_positions, step)
        noise_bLD, tokens_bL, data_bL, labels_b = (t[rank::world].to(accelerator.device) for t in batch)
        with accelerator.autocast():
            logits_bLV, continuous_bLD = model(noise_bLD, tokens_bL, data_bL, labels_b)
        loss, monitors = raw_model.loss(logits_bLV, continuous_bLD, tokens_bL, data_bL, cfg.continuous_weight)
        check_finite({"loss": loss}, step, resume)
        grad_norm = optimizer_step(accelerator, model, optimizer, loss, cfg.grad_clip)
        if ema is not None:
            ema.update(raw_model)
        add_to_window(history, {"loss": float(loss.detach()), **monitors})

        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            row = log_window(history, tracker, step=done, lr=lr, grad_norm=grad_norm)
            bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['token_acc']:.3f}", mse=f"{row['mse']:.4f}")
        end_step(resume, done, history, on_step)

    metrics: dict = {}
    if accelerator.is_main_process:
        student = output_weights(raw_model, ema).eval()
        metrics = _write_outputs(cfg, paths, student, pairs, teacher_config, tok_config, tokenizer, history)
        tracker.log_metrics(metrics)
        tracker.log_image(_samples(student, tokenizer, cfg), "samples.png")
        print(
            f"{STAGE}: last window loss {metrics['train_loss']:.4f}; held-out token agreement with the teacher's map "
            f"1-step {metrics.get('val_agreement_1step', float('nan')):.3f}, "
            f"2-step {metrics.get('val_agreement_2step', float('nan')):.3f} -> {Path(paths.models) / OUT_NAME}"
        )
    resume.finish()
    return metrics


@torch.no_grad()
def agreement(student, pairs, rows: np.ndarray, batch_size: int = 500) -> dict[str, float]:
    """Share of tokens equal to the teacher's mapped tokens, 1- and 2-step, on ``rows``."""
    device = student.codebook_VD.device
    hits = {1: 0, 2: 0}
    for start in range(0, len(rows), batch_size):
        index = rows[start : start + batch_size]
        noise_BLD = torch.from_numpy(pairs.noise_NLD[index]).to(device)
        labels_B = torch.from_numpy(pairs.labels_N[index].astype(np.int64)).to(device)
        target_BL = torch.from_numpy(pairs.tokens_NL[index].astype(np.int64)).to(device)
        for steps in hits:
            tokens_BL, _ = student.sample(noise_BLD, labels_B, steps=steps)
            hits[steps] += int((tokens_BL == target_BL).sum())
    total = len(rows) * student.seq_len
    return {f"val_agreement_{steps}step": count / total for steps, count in hits.items()}


def _samples(student, tokenizer, cfg: Config) -> np.ndarray:
    """One row per class: 1-step samples, a gap, then 2-step samples from the same noise."""
    labels = torch.arange(student.num_classes).repeat_interleave(cfg.samples_per_class)
    blocks = [
        image_grid(sample_distilled_images(student, tokenizer, labels, steps=steps, seed=cfg.seed).numpy(),
                   cfg.samples_per_class)
        for steps in (1, 2)
    ]  # fmt: skip
    gap = np.full((blocks[0].shape[0], 8, blocks[0].shape[2]), 255, np.uint8)
    return np.concatenate([blocks[0], gap, blocks[1]], axis=1)


def _write_outputs(cfg, paths, student, pairs, teacher_config, tok_config, tokenizer, history) -> dict:
    out_dir = Path(paths.models) / OUT_NAME
    meta = pairs.meta
    config = {
        "arch": teacher_config["arch"],
        "model": teacher_config["model"],
        "dd": student.config_dict(),
        "distilled": True,
        "stage": STAGE,
        "tokenizer_fingerprint": tok_config["fingerprint"],
        "token_layout": teacher_config["token_layout"],
        "class_names": teacher_config["class_names"],
        "image_size": teacher_config["image_size"],
        "weights": "ema" if cfg.ema_decay > 0 else "final",
        "teacher": {
            "name": meta["teacher"],
            "fingerprint": teacher_config["fingerprint"],
            "steps": len(student.step_sizes),
            "cfg_scale": teacher_cfg_scale(meta["stage_config"]),
            "guidance_schedule": meta["stage_config"].get("guidance_schedule", "constant"),
        },  # fmt: skip
        "pairs": {"count": len(pairs.labels_N), **meta["stage_config"]},
        "stage_config": recorded_config(cfg),
    }
    write_checkpoint(out_dir, student.state_dict(), config)
    save_png(_samples(student, tokenizer, cfg), out_dir / "samples.png")
    write_train_csv(paths, STAGE, TRAIN_COLUMNS, history["train"])
    metrics = {"steps": cfg.steps, "split": student.dd.split, "two_step_at": student.dd.two_step_at,
               **last_logged(history, ("loss", *MONITORS))}  # fmt: skip
    if cfg.val_count:
        rows = np.arange(len(pairs.labels_N) - cfg.val_count, len(pairs.labels_N))
        metrics.update(agreement(student, pairs, rows))
    return metrics


def main() -> None:
    stage_main(STAGE, Config, run, is_main_process=process_state().is_main_process)


if __name__ == "__main__":
    main()
