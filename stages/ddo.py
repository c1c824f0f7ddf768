"""ddo: an AR checkpoint + the token cache -> the same model finetuned by Direct Discriminative Optimization.

Reads ``paths.models/<input>`` (``cca`` by default, the end of ``base → sar → cca``; either
family), the tokenizer in ``paths.tokenizer`` (VAR's quantizer, the fakes' round trip, sample
decoding) and ``paths.tokens/train.parquet`` (refusing a cache from another tokenizer).

Self-play in ``rounds``: each round freezes the current model as the reference (eval mode: no
dropout, no drop-path, no gradients; its weights do not change during the round), draws a buffer
of ``steps_per_round · batch_size`` fake sequences from it (class-balanced labels, guidance-free,
temperature 1, no top-k/top-p; optionally decoded and re-encoded by the tokenizer) and trains
the model with the real/fake implicit-discriminator loss of models/ddo.py: each step pairs a
batch of real cache rows with the buffer's next fake rows, labels dropped with probability
``uncond_ratio`` on both halves and no fake term on the dropped fake rows. At a round's start the
model equals its reference, so every reward is exactly 0. AdamW under ``accelerate`` like
pretrain; the optimizer state carries over between rounds.

Writes:
- ``paths.models/ddo/model.safetensors`` + ``config.json`` (the same keys as ``base``, plus the
  input checkpoint's fingerprint) and ``samples.png`` (one row per class, guidance-free first)
- ``paths.plots/ddo/train.csv`` (round, loss and the monitors) and ``metrics/ddo.json``

``rounds: 0`` passes the input through unchanged (same weights; ``config.json`` marks
``passthrough_of`` and ``skipped``, as ``sar`` does for a gpt), for a recipe without DDO (e.g.
presets/llamagen-gpt-b-cca.yaml: CCA then DD1); evaluate does not evaluate the copy.

A killed run resumes from ``paths.resume`` and ends with byte-identical weights (CPU): the
reference and the fake buffer are part of the resume state. Run by DVC as ``python -m stages.ddo``.
"""

from __future__ import annotations

import math
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
from models.cca import sequence_log_prob
from models.ddo import ddo_labels, ddo_loss, sample_fakes
from models.sampling import GuidanceScheduleName, guidance_per_step

STAGE = "ddo"
OUT_NAME = "ddo"
PRODUCER = {"base": "pretrain", "sar": "sar", "cca": "cca"}
MONITORS = ("sigmoid_real", "sigmoid_fake", "reward_real", "reward_fake", "margin", "accuracy")
TRAIN_COLUMNS = ("step", "round", "loss", *MONITORS, "lr", "grad_norm")


@dataclass(frozen=True, kw_only=True)
class Config(GuidedFinetuneConfig):
    """DDO's fields; the optimizer and run fields are ``core.finetune.FinetuneConfig``'s."""

    input: Literal["base", "sar", "cca"] = "cca"
    """Checkpoint folder under ``paths.models`` to finetune (the first round's reference)."""
    rounds: int = 2
    """Self-play rounds; each starts by freezing the current model as the reference and drawing
    fresh fakes from it. 0 = no DDO: the input is passed through unchanged."""
    steps_per_round: int = 0
    """Optimizer steps per round; 0 = one epoch of the train cache, ceil(rows / batch_size)."""
    batch_size: int = 64
    """Real sequences per optimizer step over all processes, and as many fakes."""
    lr: float = 1e-4
    """Peak AdamW learning rate (pretrain's final one: at θ = θ_ref the fake term's expected gradient
    is 0, so early steps are MLE plus sampling noise, and a larger lr lowers the real log-ratio)."""
    warmup_steps: int = 0
    """Linear warmup at the start of every round."""
    decay: Literal["cosine", "linear", "constant"] = "constant"
    """Decay after warmup, to ``min_lr_ratio·lr`` at the round's last step."""
    alpha: float = 1.0
    """α: weight of the fake term. The optimum is σ(β·Δ) = p_data / (p_data + α·p_ref)."""
    beta: float = 1.0
    """β: inverse temperature of the implicit discriminator σ(β·Δ). β = α = 1 has p_θ = p_data
    as its optimum; β < 1 overshoots away from the reference."""
    uncond_ratio: float = 0.1
    """ρ: fraction of rows, real and fake, whose label is nulled; nulled fakes get no fake term."""
    round_trip: bool = True
    """Decode the fakes to pixels and encode them again, as the real tokens were made."""
    fake_cfg_scale: float = 1.0
    """Guidance of the fakes (logits = u + cfg_scale·(c − u)); 1.0 = none, the DDO protocol: the fakes are
    samples of the reference itself, which the loss's optimum assumes."""
    fake_guidance_schedule: GuidanceScheduleName = "auto"
    """How ``fake_cfg_scale`` spreads over the sampling steps: ``constant``, ``linear`` (VAR's ramp) or
    ``auto``, the family's (gpt: constant, var: linear)."""
    keep_dropout: bool = False
    """Train the policy with its dropout / drop-path on (the reference is always deterministic)."""
    sample_batch_size: int = 256
    """Fakes generated per forward pass. Each batch draws from its own seeded generator, so the
    buffer depends on it: keep it fixed to reproduce a run."""
    log_every: int = 10
    """Steps between logged rows (MLflow and plots/ddo/train.csv); a round's last step is always logged."""

    def __post_init__(self):
        if self.rounds < 0:
            raise ValueError(f"rounds must be >= 0 (0 = pass the input through), got {self.rounds}")
        super().__post_init__()
        if self.sample_batch_size < 1 or self.steps_per_round < 0:
            raise ValueError("sample_batch_size must be >= 1 and steps_per_round >= 0")
        if self.beta <= 0 or self.alpha < 0:
            raise ValueError(f"beta must be > 0 and alpha >= 0, got beta={self.beta}, alpha={self.alpha}")
        if not 0 <= self.uncond_ratio < 1:
            raise ValueError(f"uncond_ratio must be in [0, 1), got {self.uncond_ratio}")


class FakeBuffer:
    """The current round's fakes (tokens and their class labels, on the CPU). Registered for
    checkpointing with the reference, so a resumed run continues the round with the same fakes."""

    def __init__(self):
        self.round = -1
        self.tokens_NL = torch.empty(0, 0, dtype=torch.long)
        self.labels_N = torch.empty(0, dtype=torch.long)

    def state_dict(self) -> dict:
        return {"round": self.round, "tokens_NL": self.tokens_NL, "labels_N": self.labels_N}

    def load_state_dict(self, state: dict) -> None:
        self.round = int(state["round"])
        self.tokens_NL, self.labels_N = state["tokens_NL"], state["labels_N"]


def fake_labels(cfg: Config, num_classes: int, count: int, round_index: int) -> torch.Tensor:
    """``count`` class-balanced labels (each class ⌊count/C⌋ or ⌈count/C⌉ times), shuffled per round."""
    labels = torch.arange(num_classes).repeat(math.ceil(count / num_classes))[:count]
    return labels[torch.randperm(count, generator=step_generator(cfg.seed, round_index, purpose=7))]


def begin_round(
    cfg: Config, round_index: int, policy, reference, tokenizer, buffer: FakeBuffer, count: int, guidance=1.0
) -> None:
    """Freeze the policy's current weights as the reference and fill the buffer with its fakes
    (``guidance``: ``generate``'s ``cfg_scale``, a scale or one per step)."""
    reference.load_state_dict(policy.state_dict())
    labels_N = fake_labels(cfg, policy.num_classes, count, round_index)
    tokens_NL = sample_fakes(
        reference, labels_N, seed=cfg.seed * 1_000 + round_index, batch_size=cfg.sample_batch_size,
        tokenizer=tokenizer if cfg.round_trip else None, cfg_scale=guidance,
    )  # fmt: skip
    buffer.round, buffer.tokens_NL, buffer.labels_N = round_index, tokens_NL.cpu(), labels_N


def load_models(cfg: Config, paths: Paths):
    """(tokenizer, its config, policy, frozen reference, input config) on the CPU."""
    tokenizer, tok_config, state, in_config = load_input(paths, cfg.input, PRODUCER[cfg.input], tokenizer_from_state)
    policy = ar_from_state(state, in_config, tokenizer).train(cfg.keep_dropout)
    return tokenizer, tok_config, policy, frozen_copy(policy), in_config


def run(cfg: Config, paths: Paths, tracker, on_step=None) -> dict:
    """Finetune and write the outs; ``on_step(step)`` runs after each step (tests use it to crash)."""
    accelerator = start_accelerator(STAGE, cfg)
    rank, world = accelerator.process_index, accelerator.num_processes
    tokenizer, tok_config, raw_model, reference, in_config = load_models(cfg, paths)
    if cfg.rounds == 0:
        return _pass_through(cfg, paths, tracker, raw_model, in_config, accelerator)
    fake_guidance = guidance_per_step(cfg.fake_cfg_scale, cfg.fake_guidance_schedule, arch=in_config["arch"],
                                      steps=raw_model.steps)  # fmt: skip
    train = load_tokens(Path(paths.tokens) / "train.parquet", expected_fingerprint=tok_config["fingerprint"])
    per_round = steps_or_one_epoch(cfg.steps_per_round, cfg.batch_size, len(train.tokens_NL))
    steps = cfg.rounds * per_round
    model, optimizer = prepare_training(accelerator, cfg, raw_model, tokenizer, reference)
    buffer = FakeBuffer()
    accelerator.register_for_checkpointing(reference, buffer)
    inputs = [paths.tokens, paths.tokenizer, Path(paths.models) / cfg.input]
    resume, start, history = restore_or_start(accelerator, STAGE, cfg, paths.resume, inputs,
                                              new_history(("loss", *MONITORS)))  # fmt: skip
    accelerator.print(
        f"{STAGE}: finetuning {paths.models}/{cfg.input} ({in_config['arch']}) for {cfg.rounds} rounds of "
        f"{per_round} steps, {cfg.batch_size} real + {cfg.batch_size} fake sequences each, "
        f"alpha {cfg.alpha}, beta {cfg.beta}"
    )
    tracker.log_params({"ddo.resolved_steps_per_round": per_round, "ddo.processes": world})

    bar = step_bar(STAGE, start, steps, accelerator)
    for step in bar:
        round_index, within = divmod(step, per_round)
        if buffer.round != round_index:
            bar.set_description(f"{STAGE}: round {round_index + 1}/{cfg.rounds}, sampling fakes")
            begin_round(cfg, round_index, raw_model, reference, tokenizer, buffer, per_round * cfg.batch_size,
                        fake_guidance)  # fmt: skip
            bar.set_description(f"{STAGE}: round {round_index + 1}/{cfg.rounds}")
        lr = apply_scheduled_lr(optimizer, cfg, within, per_round)
        real_BL, real_labels_B = batch_at(cfg, train.tokens_NL, train.labels_N, step)
        rows = slice(within * cfg.batch_size, (within + 1) * cfg.batch_size)
        fake_BL, fake_labels_B = buffer.tokens_NL[rows], buffer.labels_N[rows]
        # labels are dropped for the whole global batch before it is split, so any process count
        # draws the same null rows
        real_labels_B, fake_labels_B, conditional_B = ddo_labels(
            real_labels_B, fake_labels_B, raw_model.null_class, uncond_ratio=cfg.uncond_ratio,
            generator=step_generator(cfg.seed, step, purpose=5),
        )  # fmt: skip
        real_bl, real_b, fake_bl, fake_b, conditional_b = (
            t[rank::world].to(accelerator.device)
            for t in (real_BL, real_labels_B, fake_BL, fake_labels_B, conditional_B)
        )
        # one forward of 2b rows per model: the real sequences, then the fakes
        both_tokens, both_labels = torch.cat([real_bl, fake_bl]), torch.cat([real_b, fake_b])
        with accelerator.autocast():
            logp_2b = sequence_log_prob(model(both_tokens, both_labels, label_dropout=False), both_tokens)
            with torch.no_grad():
                ref_2b = sequence_log_prob(reference(both_tokens, both_labels, label_dropout=False), both_tokens)
        logp_real, logp_fake = logp_2b.chunk(2)
        ref_real, ref_fake = ref_2b.chunk(2)
        loss, monitors = ddo_loss(logp_real, ref_real, logp_fake, ref_fake, alpha=cfg.alpha, beta=cfg.beta,
                                  fake_conditional_B=conditional_b)  # fmt: skip
        check_finite({"loss": loss}, step, resume)
        grad_norm = optimizer_step(accelerator, model, optimizer, loss, cfg.grad_clip)
        add_to_window(history, {"loss": float(loss.detach()), **monitors})

        done = step + 1
        if done % cfg.log_every == 0 or done % per_round == 0:
            row = log_window(history, tracker, step=done, lr=lr, grad_norm=grad_norm, round=round_index + 1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", real=f"{row['sigmoid_real']:.3f}",
                            fake=f"{row['sigmoid_fake']:.3f}")  # fmt: skip
        end_step(resume, done, history, on_step)

    metrics: dict = {}
    if accelerator.is_main_process:
        metrics = _write_outputs(cfg, paths, raw_model.eval(), in_config, tokenizer, history, per_round)
        tracker.log_metrics(metrics)
        print(
            f"{STAGE}: last window loss {metrics['train_loss']:.4f}, sigma(real) {metrics['train_sigmoid_real']:.3f}, "
            f"sigma(fake) {metrics['train_sigmoid_fake']:.3f} -> {Path(paths.models) / OUT_NAME}"
        )
    resume.finish()
    return metrics


def _write_outputs(cfg, paths, model, in_config, tokenizer, history, per_round) -> dict:
    sample_grid = guided_sample_grid(sample_per_guidance, tokenizer, in_config["arch"], cfg)
    write_finetuned(paths, STAGE, OUT_NAME, cfg.input, in_config, model, recorded_config(cfg), sample_grid)
    write_train_csv(paths, STAGE, TRAIN_COLUMNS, history["train"])
    return {
        "rounds": cfg.rounds,
        "steps_per_round": per_round,
        "steps": cfg.rounds * per_round,
        **last_logged(history, ("loss", *MONITORS)),
    }


def _pass_through(cfg, paths, tracker, raw_model, in_config, accelerator) -> dict:
    """``rounds: 0``: write the input unchanged as ``ddo`` (marked as a pass-through, like sar's)."""
    reason = "rounds: 0 (no DDO in this recipe)"
    if accelerator.is_main_process:
        pass_through(paths, STAGE, OUT_NAME, cfg.input, raw_model.state_dict(), in_config, reason=reason,
                     stage_config=recorded_config(cfg), columns=TRAIN_COLUMNS, tracker=tracker)  # fmt: skip
    return {"skipped": reason, "rounds": 0, "steps": 0}


def main() -> None:
    stage_main(STAGE, Config, run, is_main_process=process_state().is_main_process)


if __name__ == "__main__":
    main()
