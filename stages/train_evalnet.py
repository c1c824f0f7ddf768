"""train_evalnet: shard images -> the classifier whose features are the offline evaluation space.

Reads the train and val splits of ``paths.shards`` into memory (see ``core/shards.py``) and trains
``models.evalnet.EvalNet`` on the real train images with cross-entropy, under ``accelerate``.
Augmentation is a random translation of up to ``max_shift`` pixels (edge-replicated pad + crop),
never a flip: digits and most class labels are not flip-invariant. image_size, image_channels and
num_classes come from the shards. Writes:

- ``paths.evalnet/model.safetensors`` + ``config.json`` (model config, class names, image size,
  val accuracy and loss, this stage's config, fingerprint); rebuild it with
  ``models.evalnet.build_evalnet(config["model"])``
- ``metrics/train_evalnet.json`` (val_accuracy, val_loss, steps)

Its features feed FID and precision/recall and its softmax the Inception Score and class accuracy
in ``evaluate`` when no Inception weights are supplied. Resumes from ``paths.resume`` after a
crash. Run by DVC as ``python -m stages.train_evalnet`` (or ``accelerate launch -m ...``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from core.checkpoint import write_checkpoint
from core.config import Paths
from core.metrics import flatten_metrics
from core.shards import class_names, load_split
from core.stage import stage_main
from core.training import (
    Resume,
    build_accelerator,
    check_finite,
    process_state,
    resume_dir,
    seed_everything,
    step_bar,
    step_generator,
)
from models.evalnet import build_evalnet, embed_images, evalnet_config, images_to_input
from models.metrics import class_accuracy

STAGE = "train_evalnet"
DEFAULT_MODEL = {"channels": [16, 32, 64], "feature_dim": 128}
# Model keys the stage takes from the shards, never from params.yaml.
DERIVED_KEYS = ("image_size", "image_channels", "num_classes")


@dataclass(frozen=True, kw_only=True)
class Config:
    model: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_MODEL))
    """Keys of models/evalnet.py EvalNetConfig (channels, feature_dim, norm_groups), checked
    strictly; image_size, image_channels and num_classes come from the shards."""
    steps: int = 400
    """Optimizer steps."""
    batch_size: int = 64
    """Images per step, over all processes."""
    lr: float = 3e-3
    """Peak AdamW learning rate; cosine decay to 1% over ``steps``."""
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    """Max gradient norm (0 = no clipping)."""
    max_shift: int = 1
    """Random translation of each training image by up to this many pixels per axis (0 = off)."""
    seed: int = 0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    log_every: int = 25
    """Steps between logged train loss/accuracy (MLflow)."""
    eval_every: int = 200
    """Steps between val accuracy/loss evaluations (the last step is always evaluated)."""
    save_every: int = 200
    """Steps between resume states (0 = never)."""

    def __post_init__(self):
        for key in DERIVED_KEYS:
            if key in self.model:
                raise ValueError(f"model.{key} is set from the shards; remove it from params.yaml")
        evalnet_config(self.model)  # unknown or mistyped model keys fail here, by name
        if min(self.steps, self.batch_size, self.log_every, self.eval_every) < 1:
            raise ValueError("steps, batch_size, log_every and eval_every must be >= 1")
        if self.lr <= 0 or self.grad_clip < 0 or self.save_every < 0 or self.max_shift < 0:
            raise ValueError("lr must be > 0; grad_clip, save_every and max_shift >= 0")


def run(cfg: Config, paths: Paths, tracker, on_step=None) -> dict:
    """Train and write the outs; ``on_step(step)`` runs after each step (tests use it to crash)."""
    accelerator = build_accelerator(cfg.mixed_precision)
    seed_everything(cfg.seed)
    train, val = load_split(paths.shards, "train"), load_split(paths.shards, "val")
    names = class_names(paths.shards)
    _, side, _, channels = train.images_NHWC.shape
    raw_model = build_evalnet({**cfg.model, "image_size": side, "image_channels": channels, "num_classes": len(names)})
    optimizer = torch.optim.AdamW(raw_model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    model, optimizer = accelerator.prepare(raw_model, optimizer)

    resume = Resume(accelerator, resume_dir(paths.resume, STAGE, cfg, [paths.shards]), cfg.save_every)
    start, _ = resume.restore()
    images_NCHW = images_to_input(train.images_NHWC)
    labels_N = torch.from_numpy(train.labels_N)
    rank, world = accelerator.process_index, accelerator.num_processes
    bar = step_bar(STAGE, start, cfg.steps, accelerator)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, step)
        x_BCHW, y_B = batch_at(cfg, images_NCHW, labels_N, step)
        x_BCHW, y_B = x_BCHW[rank::world].to(accelerator.device), y_B[rank::world].to(accelerator.device)
        with accelerator.autocast():
            logits_BC = model(x_BCHW)
            loss = classification_loss(logits_BC, y_B)
        check_finite({"loss": loss}, step, resume)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if cfg.grad_clip > 0:
            accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()

        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            logged = {"loss": float(loss.detach()), "accuracy": class_accuracy(logits_BC.detach(), y_B)}
            tracker.log_metrics({f"train/{k}": v for k, v in logged.items()}, step=step + 1)
            bar.set_postfix(loss=f"{logged['loss']:.4f}")
        if (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:  # the last step: after the loop
            scores = evaluate(raw_model, val.images_NHWC, val.labels_N)
            tracker.log_metrics(flatten_metrics(scores, "val/"), step=step + 1)
        resume.step_done(step + 1)
        if on_step is not None:
            on_step(step + 1)

    final = evaluate(raw_model, val.images_NHWC, val.labels_N)
    metrics = {"val_accuracy": final["accuracy"], "val_loss": final["loss"], "steps": cfg.steps}
    if accelerator.is_main_process:
        tracker.log_metrics(flatten_metrics(final, "val/"), step=cfg.steps)
        _write_outputs(cfg, paths, raw_model, names, metrics)
        tracker.log_metrics(flatten_metrics(metrics))
        print(f"{STAGE}: val accuracy {metrics['val_accuracy']:.4f} ({len(val)} images) -> {paths.evalnet}")
    resume.finish()
    return metrics


def lr_at(cfg: Config, step: int) -> float:
    """Cosine from ``lr`` to ``lr / 100``; a function of the step alone, so resuming needs no state."""
    return cfg.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * step / cfg.steps)))


def classification_loss(logits_BC: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats) in fp32; no label smoothing, which would cap the softmax confidence
    the Inception Score reads."""
    return F.cross_entropy(logits_BC.float(), labels_B)


def batch_at(
    cfg: Config, images_NCHW: torch.Tensor, labels_N: torch.Tensor, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's global batch: epochs are seeded permutations; each image is shifted by up to
    ``max_shift`` pixels per axis (a function of the step alone, so resuming needs no sampler state)."""
    count = len(images_NCHW)
    per_epoch = max(count // cfg.batch_size, 1)
    epoch, within = divmod(step, per_epoch)
    order = torch.randperm(count, generator=step_generator(cfg.seed, epoch, purpose=2))
    index = order[within * cfg.batch_size : (within + 1) * cfg.batch_size]
    shifts_B2 = torch.randint(
        0, 2 * cfg.max_shift + 1, (len(index), 2), generator=step_generator(cfg.seed, step, purpose=3)
    )
    return translate(images_NCHW[index], shifts_B2, cfg.max_shift), labels_N[index]


def translate(x_BCHW: torch.Tensor, offsets_B2: torch.Tensor, pad: int) -> torch.Tensor:
    """Crop each image at (row, col) = ``offsets_B2[b]`` from its edge-replicated ``pad``-pixel
    padding: offset ``pad`` is the identity, 0 and 2·pad the largest shifts."""
    if pad == 0:
        return x_BCHW
    _, _, height, width = x_BCHW.shape
    padded = F.pad(x_BCHW, (pad, pad, pad, pad), mode="replicate")
    rows_BH = offsets_B2[:, :1] + torch.arange(height)
    cols_BW = offsets_B2[:, 1:] + torch.arange(width)
    batch = torch.arange(len(x_BCHW))[:, None, None]
    # Advanced indexing on dims 0, 2, 3 puts the channel dim last: (B, H, W, C).
    return padded.permute(0, 2, 3, 1)[batch, rows_BH[:, :, None], cols_BW[:, None, :]].permute(0, 3, 1, 2)


def evaluate(model, images_NHWC: np.ndarray, labels_N: np.ndarray) -> dict[str, float]:
    """Val accuracy and mean cross-entropy (nats) of the unaugmented images."""
    _, logits_NC = embed_images(model, images_NHWC)
    logits = torch.from_numpy(logits_NC)
    labels = torch.from_numpy(labels_N)
    return {"accuracy": class_accuracy(logits, labels), "loss": float(F.cross_entropy(logits, labels))}


def _write_outputs(cfg: Config, paths: Paths, model, names: list[str], metrics: dict) -> None:
    config = {
        "model": model.config_dict(),
        "class_names": names,
        "image_size": model.config.image_size,
        "feature_dim": model.config.feature_dim,
        "val_accuracy": metrics["val_accuracy"],
        "val_loss": metrics["val_loss"],
        "stage_config": dataclasses.asdict(cfg),
    }
    write_checkpoint(paths.evalnet, model.state_dict(), config)


def main() -> None:
    stage_main(STAGE, Config, run, is_main_process=process_state().is_main_process)


if __name__ == "__main__":
    main()
