"""The fine-tuning skeleton of the post-training stages (sar, cca, ddo, distill; distill2 shares the
start, the step and the EMA output): the optimizer and run fields of their configs, batching,
loading the input checkpoint, the optimizer step, and the outs. A stage keeps its objective, its
loop and what it logs::

    accelerator = start_accelerator(STAGE, cfg)
    tokenizer, tok_config, state, in_config = load_input(paths, cfg.input, "pretrain", tokenizer_from_state)
    model, optimizer = prepare_training(accelerator, cfg, raw_model, tokenizer)
    resume, start, history = restore_or_start(accelerator, STAGE, cfg, paths.resume, inputs, new_history(names))
    for step in step_bar(STAGE, start, steps, accelerator):
        lr = apply_scheduled_lr(optimizer, cfg, step, steps)
        tokens_BL, labels_B = batch_at(cfg, train.tokens_NL, train.labels_N, step)
        loss, monitors = ...                                   # the stage's objective
        check_finite({"loss": loss}, step, resume)
        grad_norm = optimizer_step(accelerator, model, optimizer, loss, cfg.grad_clip)
        ...
        end_step(resume, step + 1, history, on_step)

Model code is passed in by the stage (``tokenizer_from_state``, ``sample_per_guidance``): this
module imports no ``models``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from accelerate import Accelerator

from core.checkpoint import finetuned_config, passthrough_config, read_checkpoint, write_checkpoint, write_passthrough
from core.config import Paths
from core.images import guidance_grid, save_png
from core.metrics import write_rows_csv
from core.training import (
    EMA,
    Resume,
    build_accelerator,
    compile_model,
    resume_dir,
    seed_everything,
    step_generator,
    warmup_decay_lr,
)


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """The optimizer and run fields of a fine-tuning stage. A stage's ``Config`` adds its
    objective's fields and re-declares those whose default or docstring are its own (``lr``,
    ``decay``, ``log_every``, ...): a re-declared field keeps its place here, with the stage's
    default and docstring. The fields without a default here are re-declared by every stage."""

    batch_size: int
    lr: float
    warmup_steps: int = 0
    decay: Literal["cosine", "linear", "constant"]
    min_lr_ratio: float = 1.0
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    """AdamW decay on matmul weights only."""
    grad_clip: float = 1.0
    """Max global gradient norm (0 = no clipping)."""
    mixed_precision: Literal["no", "bf16"] = "no"
    compile: bool = False
    """torch.compile the prepared model for training (GPUs: faster steps after a first step that
    compiles; off on CPU). Eager and compiled runs differ in rounding; resume is exact either way."""
    seed: int = 0
    log_every: int
    save_every: int = 25
    """Steps between resume states (0 = never)."""
    samples_per_class: int = 8
    launcher: str = ""
    """accelerate config file to run under; "" = this process."""

    def __post_init__(self):
        for name in ("batch_size", "log_every", "samples_per_class"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("save_every", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1 or self.grad_clip < 0:
            raise ValueError("lr must be > 0, min_lr_ratio in [0, 1] and grad_clip >= 0")


@dataclass(frozen=True, kw_only=True)
class GuidedFinetuneConfig(FinetuneConfig):
    """A fine-tuned AR model's config (sar, cca, ddo): its sample grid has a block per guidance scale."""

    sample_cfg_scales: list[float] = field(default_factory=lambda: [1.0, 3.0])
    """Guidance scales of the sample grid (1.0 = guidance-free)."""

    def __post_init__(self):
        super().__post_init__()
        if not self.sample_cfg_scales:
            raise ValueError("sample_cfg_scales needs at least one guidance scale (1.0 = guidance-free)")


# 1. Setup: the accelerator, the input checkpoint, the optimizer, the resume state.


def start_accelerator(stage: str, cfg) -> Accelerator:
    """The run's Accelerator, with the global RNGs seeded (before any model is built) and a
    global batch that splits evenly over the processes."""
    accelerator = build_accelerator(cfg.mixed_precision)
    seed_everything(cfg.seed)
    world = accelerator.num_processes
    if cfg.batch_size % world:
        raise ValueError(f"{stage}.batch_size {cfg.batch_size} must be divisible by processes ({world})")
    return accelerator


def load_input(paths: Paths, input_name: str, producer: str, tokenizer_from_state: Callable):
    """(tokenizer, its config, the weights and config.json of ``paths.models/<input_name>``) on the
    CPU; refuses an input trained on another tokenizer. ``producer`` is the stage that writes it."""
    tok_state, tok_config = read_checkpoint(paths.tokenizer, stage="train_tokenizer")
    tokenizer = tokenizer_from_state(tok_state, tok_config)
    state, in_config = read_checkpoint(Path(paths.models) / input_name, stage=producer)
    if in_config["tokenizer_fingerprint"] != tok_config["fingerprint"]:
        raise ValueError(f"{paths.models}/{input_name} was trained on another tokenizer; re-run its stage")
    return tokenizer, tok_config, state, in_config


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A reference model: a copy in eval mode (no dropout, no drop-path) without gradients."""
    return copy.deepcopy(model).eval().requires_grad_(False)


def prepare_training(accelerator: Accelerator, cfg: FinetuneConfig, raw_model, *companions: torch.nn.Module):
    """(model, optimizer): ``raw_model`` and the modules it trains with (tokenizer, reference) on
    the device, AdamW over the model's parameter groups, both prepared (wrapped) by the accelerator,
    the model compiled when ``cfg.compile`` (after wrapping: see ``core.training.compile_model``)."""
    for module in (raw_model, *companions):
        module.to(accelerator.device)
    optimizer = torch.optim.AdamW(raw_model.param_groups(cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    model, optimizer = accelerator.prepare(raw_model, optimizer)
    return compile_model(model, cfg.compile), optimizer


def restore_or_start(accelerator: Accelerator, stage: str, cfg, resume_root: str, inputs: Iterable, fresh: Any):
    """(resume state, first step, history): the latest saved state of this params + inputs
    (``core.training.resume_dir``) if there is one, else step 0 and the ``fresh`` history. Call
    after everything to restore is prepared or registered for checkpointing."""
    resume = Resume(accelerator, resume_dir(resume_root, stage, cfg, inputs), cfg.save_every)
    start, history = resume.restore()
    return resume, start, history or fresh


# 2. The loop: batches, learning rate, optimizer step.


def steps_or_one_epoch(steps: int, batch_size: int, rows: int) -> int:
    """``steps``, or one epoch of ``rows`` (ceil(rows / batch_size)) when it is 0."""
    return steps or math.ceil(rows / batch_size)


def batch_index(cfg: FinetuneConfig, rows: int, step: int) -> np.ndarray:
    """Row indices of the step's global batch: epochs are seeded permutations of the rows (a
    function of the step alone, so a resumed run draws the same batches); the last batch of an
    epoch wraps around to the permutation's start."""
    per_epoch = math.ceil(rows / cfg.batch_size)
    epoch, within = divmod(step, per_epoch)
    order = torch.randperm(rows, generator=step_generator(cfg.seed, epoch, purpose=2)).numpy()
    return np.take(order, np.arange(within * cfg.batch_size, (within + 1) * cfg.batch_size), mode="wrap")


def batch_at(
    cfg: FinetuneConfig, tokens_NL: np.ndarray, labels_N: np.ndarray, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's global batch of cache rows (``batch_index``) as int64 tensors (tokens, labels)."""
    index = batch_index(cfg, len(tokens_NL), step)
    return torch.from_numpy(tokens_NL[index].astype(np.int64)), torch.from_numpy(labels_N[index].astype(np.int64))


def apply_scheduled_lr(optimizer, cfg: FinetuneConfig, step: int, steps: int) -> float:
    """Set and return the learning rate of ``step`` of ``steps`` (``core.training.warmup_decay_lr``)."""
    lr = warmup_decay_lr(step, steps=steps, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                         min_lr_ratio=cfg.min_lr_ratio, decay=cfg.decay)  # fmt: skip
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def optimizer_step(accelerator: Accelerator, model, optimizer, loss: torch.Tensor, grad_clip: float) -> float:
    """Backward, clip the global gradient norm to ``grad_clip`` (0 = no clipping), step, zero the
    gradients; the norm before clipping."""
    accelerator.backward(loss)
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)


def end_step(resume: Resume, done: int, history: Any, on_step: Callable[[int], None] | None) -> None:
    """After ``done`` steps: the resume state when due, then ``on_step(done)`` (tests crash there)."""
    resume.step_done(done, history)
    if on_step is not None:
        on_step(done)


# 3. The outs.


def write_finetuned(paths: Paths, stage: str, out_name: str, input_name: str, in_config: dict, model,
                    stage_config: dict, sample_grid: Callable[[Any], np.ndarray]) -> Path:  # fmt: skip
    """``paths.models/<out_name>``: the model's weights + config.json (``finetuned_config``), then
    ``samples.png`` drawn by ``sample_grid(model)``; the folder."""
    out_dir = Path(paths.models) / out_name
    config = finetuned_config(stage, input_name, in_config, model.config_dict(), stage_config)
    write_checkpoint(out_dir, model.state_dict(), config)
    save_png(sample_grid(model), out_dir / "samples.png")
    return out_dir


def guided_sample_grid(sample_per_guidance: Callable, tokenizer, arch: str, cfg: GuidedFinetuneConfig):
    """``sample_grid`` for ``write_finetuned``: one row per class, guidance-free samples, then each
    other scale of ``sample_cfg_scales`` (the family's authors' sampling: ``models.ar.sample_per_guidance``)."""

    def sample_grid(model) -> np.ndarray:
        samples = sample_per_guidance(model, tokenizer, arch, cfg.samples_per_class, cfg.sample_cfg_scales, cfg.seed)
        return guidance_grid(samples, cfg.samples_per_class)

    return sample_grid


def write_train_csv(paths: Paths, stage: str, columns: Iterable[str], rows: list[dict]) -> None:
    """``paths.plots/<stage>/train.csv``: the logged rows (none for a pass-through: it is a DVC out)."""
    write_rows_csv(Path(paths.plots) / stage / "train.csv", columns, rows)


def last_logged(history: dict, names: Iterable[str]) -> dict[str, float]:
    """``{train_<name>: value}`` of the last logged row, for ``metrics/<stage>.json``."""
    last = history["train"][-1]
    return {f"train_{name}": last[name] for name in names}


def pass_through(paths: Paths, stage: str, out_name: str, input_name: str, state_dict: dict, in_config: dict, *,
                 reason: str, stage_config: dict, columns: Iterable[str], tracker) -> Path:  # fmt: skip
    """A stage that does not run: write the input unchanged as ``out_name`` (config.json marks
    ``passthrough_of`` and ``skipped``, which evaluate reads to skip it), an empty train.csv and
    the ``arpipe.<stage>.skipped`` tag; the folder. Main process only."""
    config = passthrough_config(stage, input_name, in_config, reason, stage_config)
    out_dir = write_passthrough(paths.models, input_name, out_name, state_dict, config)
    write_train_csv(paths, stage, columns, [])
    tracker.set_tags({f"arpipe.{stage}.skipped": reason})
    print(f"{stage}: skipped, {reason}; {paths.models}/{input_name} passed through unchanged -> {out_dir}")
    return out_dir


def output_weights(raw_model: torch.nn.Module, ema: EMA | None) -> torch.nn.Module:
    """The model to write: a copy holding the EMA weights, or ``raw_model`` itself without EMA."""
    if ema is None:
        return raw_model
    averaged = copy.deepcopy(raw_model)
    ema.copy_to(averaged)
    return averaged
