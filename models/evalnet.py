"""A small CNN classifier whose features and logits stand in for Inception when none is supplied.

``train_evalnet`` trains it on the real train images; ``evaluate`` uses its penultimate features
(``features(...)[0]``, D = ``feature_dim``) as the space for FID and precision/recall, and
``softmax(logits)`` for the Inception Score and the class accuracy of class-conditional samples.
Numbers in this space are a proxy: comparable between checkpoints of one pipeline, never with
published (Inception, ImageNet) figures.

Architecture, per level: [3x3 conv -> GroupNorm -> SiLU] x 2, then a 2x2 average pool between
levels; global average pool -> Linear -> SiLU (the features) -> Linear (the logits). No BatchNorm
and no dropout: train and eval mode compute the same function, and every layer has a deterministic
CPU and CUDA backward. The global pool accepts other image sizes, but features are only comparable
for images at ``image_size`` (the size it was trained on), so callers resize to it first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.config_dict import config_from_dict, config_to_dict, require


@dataclass(frozen=True, kw_only=True)
class EvalNetConfig:
    """Defaults: 16x16 RGB, 10 classes, (16, 32, 64) channels, 128-d features, about 0.08M params."""

    image_size: int = 16
    """Side of the square images it is trained on; features are meant for images of this size."""
    image_channels: int = 3
    """Channels of the images (3 for RGB)."""
    num_classes: int = 10
    """Classes of the logits."""
    channels: tuple[int, ...] = (16, 32, 64)
    """Width of each level; ``len - 1`` 2x2 average pools between them."""
    feature_dim: int = 128
    """Width D of the penultimate layer: the FID and precision/recall feature space."""
    norm_groups: int = 8
    """GroupNorm groups; must divide every level width."""

    def __post_init__(self) -> None:
        require(self.image_size > 0, "image_size", "must be positive")
        require(self.image_channels > 0, "image_channels", "must be positive")
        require(self.num_classes > 1, "num_classes", "must be at least 2")
        require(len(self.channels) > 0, "channels", "must not be empty")
        require(self.feature_dim > 0, "feature_dim", "must be positive")
        require(self.norm_groups > 0, "norm_groups", "must be positive")
        for width in self.channels:
            require(width > 0 and width % self.norm_groups == 0, "channels", f"{width} is not a norm_groups multiple")
        require(
            self.image_size >= 2 ** (len(self.channels) - 1),
            "image_size",
            f"must be at least {2 ** (len(self.channels) - 1)} for {len(self.channels)} levels",
        )


def conv_block(in_channels: int, out_channels: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.GroupNorm(groups, out_channels),
        nn.SiLU(),
        nn.Conv2d(out_channels, out_channels, 3, padding=1),
        nn.GroupNorm(groups, out_channels),
        nn.SiLU(),
    )


class EvalNet(nn.Module):
    """Image classifier; ``features`` gives the evaluation feature space, ``forward`` the logits."""

    def __init__(self, config: EvalNetConfig):
        super().__init__()
        self.config = config
        # 1. conv levels, full resolution first
        widths = (config.image_channels, *config.channels)
        self.levels = nn.ModuleList(
            conv_block(widths[i], widths[i + 1], config.norm_groups) for i in range(len(config.channels))
        )
        # 2. head: pooled channels -> features -> logits
        self.feature = nn.Linear(config.channels[-1], config.feature_dim)
        self.classifier = nn.Linear(config.feature_dim, config.num_classes)

    def config_dict(self) -> dict[str, Any]:
        return config_to_dict(self.config)

    def features(self, images_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features_BD, logits_BC) of images in [-1, 1]; D = feature_dim, C = num_classes."""
        expected = self.config.image_channels
        if images_BCHW.dim() != 4 or images_BCHW.shape[1] != expected:
            raise ValueError(f"images must be (B, {expected}, H, W), got {tuple(images_BCHW.shape)}")
        x = images_BCHW
        for index, level in enumerate(self.levels):
            if index > 0:
                x = F.avg_pool2d(x, 2)
            x = level(x)
        # A mean over H, W instead of adaptive_avg_pool2d, whose CUDA backward is non-deterministic.
        features_BD = F.silu(self.feature(x.mean(dim=(2, 3))))
        return features_BD, self.classifier(features_BD)

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) of images in [-1, 1]."""
        return self.features(images_BCHW)[1]


def evalnet_config(config: dict[str, Any]) -> EvalNetConfig:
    """Strictly parse a config dict: unknown or mistyped keys fail by name; missing keys take defaults."""
    return config_from_dict(EvalNetConfig, config, "evalnet config")


def build_evalnet(config: dict[str, Any]) -> EvalNet:
    """Rebuild the network from ``config.json["model"]`` (or any subset of EvalNetConfig's keys)."""
    return EvalNet(evalnet_config(config))


def images_to_input(images_NHWC: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC pixels -> float BCHW in [-1, 1], the scaling the network is trained with."""
    images = torch.as_tensor(images_NHWC)
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"expected uint8 (N, H, W, C) images, got {images.dtype} {tuple(images.shape)}")
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1


@torch.no_grad()
def embed_images(
    model: EvalNet, images_NHWC: np.ndarray | torch.Tensor, batch_size: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """(features_ND, logits_NC) as float64 numpy of uint8 NHWC images, in batches, in eval mode.

    ``softmax(logits)`` gives the class probabilities for the Inception Score and class accuracy.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    features, logits = [], []
    for start in range(0, len(images_NHWC), batch_size):
        x_BCHW = images_to_input(images_NHWC[start : start + batch_size]).to(device)
        features_BD, logits_BC = model.features(x_BCHW)
        features.append(features_BD.double().cpu().numpy())
        logits.append(logits_BC.double().cpu().numpy())
    model.train(was_training)
    config = model.config
    if not features:
        return np.zeros((0, config.feature_dim)), np.zeros((0, config.num_classes))
    return np.concatenate(features), np.concatenate(logits)
