"""cca: an AR checkpoint + the token cache -> the same model finetuned by Condition Contrastive Alignment.

Reads ``paths.models/<input>`` (``base`` by default; either family), the tokenizer in
``paths.tokenizer`` (VAR's quantizer, sample decoding) and ``paths.tokens/train.parquet``
(refusing a cache from another tokenizer). The policy starts from the input's weights; the
reference is a frozen copy of it (eval mode: no dropout, no drop-path, no gradients), so at step 0
the rewards are exactly 0. Each step contrasts the batch's sequences with their labels against the
same sequences with mismatched labels (``negatives``), with a fraction ``uncond_ratio`` of rows
nulled on both halves (models/cca.py). One epoch of the cache by default, AdamW, under
``accelerate`` like pretrain.

Writes:
- ``paths.models/cca/model.safetensors`` + ``config.json`` (the same keys as ``base``, plus the
  input checkpoint's fingerprint) and ``samples.png`` (one row per class, guidance-free first)
- ``paths.plots/cca/train.csv`` (loss and the monitors) and ``metrics/cca.json``

``skip: true`` passes the input through unchanged (same weights; ``config.json`` marks
``passthrough_of`` and ``skipped``, as ``sar`` does for a gpt), for a recipe without CCA (e.g.
presets/var-d16-sar-ddo.yaml: SAR then DDO); evaluate does not evaluate the copy.

A killed run resumes from ``paths.resume`` and ends with byte-identical weights (CPU). Run by DVC
as ``python -m stages.cca``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from core.checkpoint import finetuned_config, passthrough_config, read_checkpoint, write_checkpoint, write_passthrough
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
from models.cca import cca_labels, cca_loss, sequence_log_prob

STAGE = "cca"
OUT_NAME = "cca"
MONITORS = ("sigmoid_pos", "sigmoid_neg", "reward_pos", "reward_neg", "margin", "accuracy")
TRAIN_COLUMNS = ("step", "loss", *MONITORS, "lr", "grad_norm")


@dataclass(frozen=True, kw_only=True)
class Config:
    input: Literal["base", "sar"] = "sar"
    """Checkpoint folder under ``paths.models`` to finetune (and to copy as the frozen reference)."""
    steps: int = 0
    """Optimizer steps; 0 = one epoch of the train cache, ceil(rows / batch_size)."""
    batch_size: int = 64
    """Sequences per optimizer step over all processes (each is scored twice: label and negative)."""
    lr: float = 3e-4
    """Peak AdamW learning rate (~1/3 of pretrain's: an epoch of the digits cache is ~50 steps, where
    the paper's 1e-5..2e-5 (1/10 of pretraining) ran 5,000)."""
    warmup_steps: int = 0
    decay: Literal["cosine", "linear", "constant"] = "constant"
    """Decay after warmup, to ``min_lr_ratio·lr`` at the last step (the LlamaGen recipe is constant)."""
    min_lr_ratio: float = 1.0
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    """AdamW decay on matmul weights only."""
    grad_clip: float = 1.0
    """Max global gradient norm (0 = no clipping)."""
    beta: float = 0.5
    """Inverse temperature of the reward β·(log p_θ − log p_ref). The optimum tilts the reference by
    PMI/β, as CFG at scale s tilts by (s − 1)·PMI: 0.5 aims at cfg 3 (the paper's 0.02 on 576-680
    tokens is far from its optimum after one epoch; 16-21 tokens get there faster)."""
    lam: float = 30.0
    """λ: weight of the negative term, the guidance-strength knob (the loss is divided by max(λ, 1))."""
    uncond_ratio: float = 0.1
    """ρ: fraction of rows whose label and negative are both the null class (keeps CFG working)."""
    negatives: Literal["roll", "resample"] = "resample"
    """``roll``: the batch's labels shifted by one (the reference; collisions count as positives);
    ``resample``: a uniformly drawn other class (no collisions, which matter with few classes)."""
    keep_dropout: bool = False
    """Train the policy with its dropout / drop-path on (the reference is always deterministic)."""
    mixed_precision: Literal["no", "bf16"] = "no"
    compile: bool = False
    """torch.compile the prepared model for training (GPUs: faster steps after a first step that
    compiles; off on CPU). Eager and compiled runs differ in rounding; resume is exact either way."""
    seed: int = 0
    log_every: int = 10
    """Steps between logged rows (MLflow and plots/cca/train.csv); the last step is always logged."""
    save_every: int = 25
    """Steps between resume states (0 = never)."""
    samples_per_class: int = 8
    sample_cfg: list[float] = field(default_factory=lambda: [1.0, 3.0])
    """Guidance scales of the sample grid (1.0 = guidance-free)."""
    launcher: str = ""
    """accelerate config file to run under; "" = this process."""

    skip: bool = False
    """True: no CCA, the input is passed through unchanged (a recipe without CCA)."""

    def __post_init__(self):
        for name in ("batch_size", "log_every", "samples_per_class"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps < 0 or self.save_every < 0 or self.warmup_steps < 0:
            raise ValueError("steps, save_every and warmup_steps must be >= 0")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1 or self.grad_clip < 0:
            raise ValueError("lr must be > 0, min_lr_ratio in [0, 1] and grad_clip >= 0")
        if self.beta <= 0 or self.lam < 0:
            raise ValueError(f"beta must be > 0 and lam >= 0, got beta={self.beta}, lam={self.lam}")
        if not 0 <= self.uncond_ratio < 1:
            raise ValueError(f"uncond_ratio must be in [0, 1), got {self.uncond_ratio}")
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
    """(tokenizer, its config, policy, frozen reference, input config) on the CPU."""
    tok_state, tok_config = read_checkpoint(paths.tokenizer, stage="train_tokenizer")
    tokenizer = tokenizer_from_state(tok_state, tok_config)
    state, in_config = read_checkpoint(Path(paths.models) / cfg.input, stage="pretrain")
    if in_config["tokenizer_fingerprint"] != tok_config["fingerprint"]:
        raise ValueError(f"{paths.models}/{cfg.input} was trained on another tokenizer; re-run its stage")
    policy = ar_from_state(state, in_config, tokenizer).train(cfg.keep_dropout)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    return tokenizer, tok_config, policy, reference, in_config


def run(cfg: Config, paths: Paths, tracker, on_step=None) -> dict:
    """Finetune and write the outs; ``on_step(step)`` runs after each step (tests use it to crash)."""
    accelerator = build_accelerator(cfg.mixed_precision)
    seed_everything(cfg.seed)
    rank, world = accelerator.process_index, accelerator.num_processes
    if cfg.batch_size % world:
        raise ValueError(f"cca.batch_size {cfg.batch_size} must be divisible by processes ({world})")
    tokenizer, tok_config, raw_model, reference, in_config = load_models(cfg, paths)
    if cfg.skip:
        return _pass_through(cfg, paths, tracker, raw_model, in_config, accelerator)
    train = load_tokens(Path(paths.tokens) / "train.parquet", expected_fingerprint=tok_config["fingerprint"])
    steps = total_steps(cfg, len(train.tokens_NL))
    for module in (tokenizer, raw_model, reference):
        module.to(accelerator.device)
    optimizer = torch.optim.AdamW(raw_model.param_groups(cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    model, optimizer = accelerator.prepare(raw_model, optimizer)
    model = compile_model(model, cfg.compile)  # after wrapping: see core.training.compile_model

    inputs = [paths.tokens, paths.tokenizer, Path(paths.models) / cfg.input]
    resume = Resume(accelerator, resume_dir(paths.resume, STAGE, cfg, inputs), cfg.save_every)
    start, history = resume.restore()
    history = history or new_history(("loss", *MONITORS))
    accelerator.print(
        f"{STAGE}: finetuning {paths.models}/{cfg.input} ({in_config['arch']}) for {steps} steps of "
        f"{cfg.batch_size} x 2 sequences, beta {cfg.beta}, lambda {cfg.lam}, {cfg.negatives} negatives"
    )
    tracker.log_params({"cca.resolved_steps": steps, "cca.processes": world})

    bar = step_bar(STAGE, start, steps, accelerator)
    for step in bar:
        lr = warmup_decay_lr(step, steps=steps, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                             min_lr_ratio=cfg.min_lr_ratio, decay=cfg.decay)  # fmt: skip
        for group in optimizer.param_groups:
            group["lr"] = lr
        tokens_BL, labels_B = batch_at(cfg, train.tokens_NL, train.labels_N, step)
        # Labels are built for the whole global batch before it is split, so any process count
        # draws the same negatives and null rows.
        positives_B, negatives_B, as_positive_B = cca_labels(
            labels_B, raw_model.num_classes, mode=cfg.negatives, uncond_ratio=cfg.uncond_ratio,
            generator=step_generator(cfg.seed, step, purpose=5),
        )  # fmt: skip
        tokens_bl, pos_b, neg_b, as_pos_b = (
            t[rank::world].to(accelerator.device) for t in (tokens_BL, positives_B, negatives_B, as_positive_B)
        )
        # one forward of 2b rows per model: the sequences with their labels, then with the negatives
        both_tokens, both_labels = torch.cat([tokens_bl, tokens_bl]), torch.cat([pos_b, neg_b])
        with accelerator.autocast():
            logp_2b = sequence_log_prob(model(both_tokens, both_labels, label_dropout=False), both_tokens)
            with torch.no_grad():
                ref_2b = sequence_log_prob(reference(both_tokens, both_labels, label_dropout=False), both_tokens)
        logp_pos, logp_neg = logp_2b.chunk(2)
        ref_pos, ref_neg = ref_2b.chunk(2)
        loss, monitors = cca_loss(logp_pos, ref_pos, logp_neg, ref_neg, beta=cfg.beta, lam=cfg.lam,
                                  as_positive_B=as_pos_b)  # fmt: skip
        check_finite({"loss": loss}, step, resume)
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        add_to_window(history, {"loss": float(loss.detach()), **monitors})

        done = step + 1
        if done % cfg.log_every == 0 or done == steps:
            row = log_window(history, tracker, step=done, lr=lr, grad_norm=float(grad_norm))
            bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['accuracy']:.2f}", margin=f"{row['margin']:.3f}")
        resume.step_done(done, history)
        if on_step is not None:
            on_step(done)

    metrics: dict = {}
    if accelerator.is_main_process:
        metrics = _write_outputs(cfg, paths, raw_model.eval(), in_config, tokenizer, history, steps)
        tracker.log_metrics(metrics)
        print(
            f"{STAGE}: last window loss {metrics['train_loss']:.4f}, accuracy {metrics['train_accuracy']:.2f}, "
            f"margin {metrics['train_margin']:.3f} -> {Path(paths.models) / OUT_NAME}"
        )
    resume.finish()
    return metrics


def sample_grid(model, tokenizer, arch: str, cfg: Config) -> np.ndarray:
    """One row per class: guidance-free samples, then each other scale of ``sample_cfg`` (the
    family's authors' sampling: ``models.ar.sample_per_guidance``)."""
    samples = sample_per_guidance(model, tokenizer, arch, cfg.samples_per_class, cfg.sample_cfg, cfg.seed)
    return guidance_grid(samples, cfg.samples_per_class)


def _write_outputs(cfg, paths, model, in_config, tokenizer, history, steps) -> dict:
    out_dir = Path(paths.models) / OUT_NAME
    config = finetuned_config(STAGE, cfg.input, in_config, model.config_dict(), stage_config(cfg))
    write_checkpoint(out_dir, model.state_dict(), config)
    save_png(sample_grid(model, tokenizer, in_config["arch"], cfg), out_dir / "samples.png")
    write_rows_csv(Path(paths.plots) / STAGE / "train.csv", TRAIN_COLUMNS, history["train"])
    last = history["train"][-1]
    return {"steps": steps, **{f"train_{k}": last[k] for k in ("loss", *MONITORS)}}


def stage_config(cfg: Config) -> dict:
    """config.json's ``stage_config``; ``skip`` only when set, so the files of a run from before
    the key existed stay byte-identical."""
    config = recorded_config(cfg)
    if not cfg.skip:
        del config["skip"]
    return config


def _pass_through(cfg, paths, tracker, raw_model, in_config, accelerator) -> dict:
    """``skip: true``: write the input unchanged as ``cca`` (marked as a pass-through, like sar's)."""
    reason = "skip: true (no CCA in this recipe)"
    if accelerator.is_main_process:
        config = passthrough_config(STAGE, cfg.input, in_config, reason, stage_config(cfg))
        out_dir = write_passthrough(paths.models, cfg.input, OUT_NAME, raw_model.state_dict(), config)
        write_rows_csv(Path(paths.plots) / STAGE / "train.csv", TRAIN_COLUMNS, [])  # a DVC plots out: no rows
        tracker.set_tags({"arpipe.cca.skipped": reason})
        print(f"{STAGE}: skipped, {reason}; {paths.models}/{cfg.input} passed through unchanged -> {out_dir}")
    return {"skipped": reason, "steps": 0}


def main() -> None:
    stage_main(STAGE, Config, run, is_main_process=process_state().is_main_process)


if __name__ == "__main__":
    main()
