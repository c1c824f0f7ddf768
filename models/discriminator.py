"""PatchGAN discriminator and hinge losses for optional adversarial tokenizer training.

Each output logit judges one receptive-field patch, so the loss sharpens local texture without
a global classifier. Follows taming's NLayerDiscriminator (4x4 convs, LeakyReLU 0.2,
N(0, 0.02) init) with GroupNorm or no norm instead of BatchNorm, which behaves the same on
one process or many.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.config_dict import config_to_dict, require


@dataclass(frozen=True, kw_only=True)
class DiscriminatorConfig:
    """PatchGAN shape. Defaults suit 16x16 RGB: 16 -> 8 -> 4 -> 3 -> 2x2 patch logits."""

    image_channels: int = 3
    """Channels of the images (3 for RGB)."""
    base_channels: int = 32
    """Width of the first conv (ndf); each further layer doubles it, capped at 8x."""
    layers: int = 2
    """Stride-2 conv layers; more layers see larger patches."""
    norm: str = "group"
    """"group" (GroupNorm) or "none"."""
    norm_groups: int = 8
    """GroupNorm groups; must divide every normalised width."""

    def __post_init__(self) -> None:
        require(self.image_channels > 0, "image_channels", "must be positive")
        require(self.base_channels > 0, "base_channels", "must be positive")
        require(self.layers > 0, "layers", "must be positive")
        require(self.norm in ("group", "none"), "norm", "must be 'group' or 'none'")
        if self.norm == "group":
            require(self.base_channels % self.norm_groups == 0, "norm_groups", "must divide base_channels")


class PatchDiscriminator(nn.Module):
    """images_BCHW in [-1, 1] -> patch logits (B, 1, h', w'); higher means "real"."""

    def __init__(self, config: DiscriminatorConfig):
        super().__init__()
        self.config = config
        width = config.base_channels
        layers: list[nn.Module] = [nn.Conv2d(config.image_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        for i in range(1, config.layers + 1):
            in_width, width = width, config.base_channels * min(2**i, 8)
            stride = 2 if i < config.layers else 1  # the last one keeps resolution, as taming
            layers += [
                nn.Conv2d(in_width, width, 4, stride, 1, bias=config.norm == "none"),
                self._norm(width),
                nn.LeakyReLU(0.2),
            ]
        layers.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.layers = nn.Sequential(*layers)
        self.apply(_init_weights)

    def _norm(self, width: int) -> nn.Module:
        if self.config.norm == "none":
            return nn.Identity()
        return nn.GroupNorm(self.config.norm_groups, width)

    def config_dict(self) -> dict:
        return config_to_dict(self.config)

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return self.layers(images_BCHW)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.GroupNorm):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: push real logits above +1 and fake ones below −1."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator loss: raise the discriminator's logits on reconstructions."""
    return -logits_fake.mean()
