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

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from core.config import Paths
from core.finetune import (
    GuidedFinetuneConfig,
    apply_scheduled_lr,
    batch_at,
    end_step,
    frozen_copy,
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
from models.cca import cca_labels, cca_loss, sequence_log_prob

STAGE = "cca"
OUT_NAME = "cca"
MONITORS = ("sigmoid_pos", "sigmoid_neg", "reward_pos", "reward_neg", "margin", "accuracy")
TRAIN_COLUMNS = ("step", "loss", *MONITORS, "lr", "grad_norm")


@dataclass(frozen=True, kw_only=True)
class Config(GuidedFinetuneConfig):
    """CCA's fields; the optimizer and run fields are ``core.finetune.FinetuneConfig``'s."""

    input: Literal["base", "sar"] = "sar"
    """Checkpoint folder under ``paths.models`` to finetune (and to copy as the frozen reference)."""
    steps: int = 0
    """Optimizer steps; 0 = one epoch of the train cache, ceil(rows / batch_size)."""
    batch_size: int = 64
    """Sequences per optimizer step over all processes (each is scored twice: label and negative)."""
    lr: float = 3e-4
    """Peak AdamW learning rate (~1/3 of pretrain's: an epoch of the digits cache is ~50 steps, where
    the paper's 1e-5..2e-5 (1/10 of pretraining) ran 5,000)."""
    decay: Literal["cosine", "linear", "constant"] = "constant"
    """Decay after warmup, to ``min_lr_ratio·lr`` at the last step (the LlamaGen recipe is constant)."""
    beta: float = 0.5
    """Inverse temperature of the reward β·(log p_θ − log p_ref). The optimum tilts the reference by
    PMI/β, as CFG at scale s tilts by (s − 1)·PMI: 0.5 aims at scale 3 (the paper's 0.02 on 576-680
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
    log_every: int = 10
    """Steps between logged rows (MLflow and plots/cca/train.csv); the last step is always logged."""

    skip: bool = False
    """True: no CCA, the input is passed through unchanged (a recipe without CCA)."""

    def __post_init__(self):
        super().__post_init__()
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.beta <= 0 or self.lam < 0:
            raise ValueError(f"beta must be > 0 and lam >= 0, got beta={self.beta}, lam={self.lam}")
        if not 0 <= self.uncond_ratio < 1:
            raise ValueError(f"uncond_ratio must be in [0, 1), got {self.uncond_ratio}")


def load_models(cfg: Config, paths: Paths):
    """(tokenizer, its config, policy, frozen reference, input config) on the CPU."""
    tokenizer, tok_config, state, in_config = load_input(paths, cfg.input, "pretrain", tokenizer_from_state)
    policy = ar_from_state(state, in_config, tokenizer).train(cfg.keep_dropout)
    return tokenizer, tok_config, policy, frozen_copy(policy), in_config


def run(cfg: Config, paths: Paths, tracker, on_step=None) -> dict:
    """Finetune and write the outs; ``on_step(step)`` runs after each step (tests use it to crash)."""
    accelerator = start_accelerator(STAGE, cfg)
    rank, world = accelerator.process_index, accelerator.num_processes
    tokenizer, tok_config, raw_model, reference, in_config = load_models(cfg, paths)
    if cfg.skip:
        return _pass_through(cfg, paths, tracker, raw_model, in_config, accelerator)
    train = load_tokens(Path(paths.tokens) / "train.parquet", expected_fingerprint=tok_config["fingerprint"])
    steps = steps_or_one_epoch(cfg.steps, cfg.batch_size, len(train.tokens_NL))
    model, optimizer = prepare_training(accelerator, cfg, raw_model, tokenizer, reference)
    inputs = [paths.tokens, paths.tokenizer, Path(paths.models) / cfg.input]
    resume, start, history = restore_or_start(accelerator, STAGE, cfg, paths.resume, inputs,
                                              new_history(("loss", *MONITORS)))  # fmt: skip
    accelerator.print(
        f"{STAGE}: finetuning {paths.models}/{cfg.input} ({in_config['arch']}) for {steps} steps of "
        f"{cfg.batch_size} x 2 sequences, beta {cfg.beta}, lambda {cfg.lam}, {cfg.negatives} negatives"
    )
    tracker.log_params({"cca.resolved_steps": steps, "cca.processes": world})

    bar = step_bar(STAGE, start, steps, accelerator)
    for step in bar:
        lr = apply_scheduled_lr(optimizer, cfg, step, steps)
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
        grad_norm = optimizer_step(accelerator, model, optimizer, loss, cfg.grad_clip)
        add_to_window(history, {"loss": float(loss.detach()), **monitors})

        done = step + 1
        if done % cfg.log_every == 0 or done == steps:
            row = log_window(history, tracker, step=done, lr=lr, grad_norm=grad_norm)
            bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['accuracy']:.2f}", margin=f"{row['margin']:.3f}")
        end_step(resume, done, history, on_step)

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


def _write_outputs(cfg, paths, model, in_config, tokenizer, history, steps) -> dict:
    sample_grid = guided_sample_grid(sample_per_guidance, tokenizer, in_config["arch"], cfg)
    write_finetuned(paths, STAGE, OUT_NAME, cfg.input, in_config, model, stage_config(cfg), sample_grid)
    write_train_csv(paths, STAGE, TRAIN_COLUMNS, history["train"])
    return {"steps": steps, **last_logged(history, ("loss", *MONITORS))}


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
        pass_through(paths, STAGE, OUT_NAME, cfg.input, raw_model.state_dict(), in_config, reason=reason,
                     stage_config=stage_config(cfg), columns=TRAIN_COLUMNS, tracker=tracker)  # fmt: skip
    return {"skipped": reason, "steps": 0}


def main() -> None:
    stage_main(STAGE, Config, run, is_main_process=process_state().is_main_process)


if __name__ == "__main__":
    main()
