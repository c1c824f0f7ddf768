"""Conv encoder/decoder shared by both tokenizers (LlamaGen / taming style).

Encoder: conv_in -> per level [res blocks (+ attention at the lowest resolution)] with a stride-2
downsample between levels -> mid (Res, Attn, Res) -> GroupNorm, swish, conv_out to ``z_channels``.
Decoder mirrors it with one more res block per level and nearest-upsample + conv between levels.
Images are BCHW floats in [-1, 1]; the downsample factor is 2 ** (levels - 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from models.config_dict import require


@dataclass(frozen=True, kw_only=True)
class ConvBackboneConfig:
    """Encoder/decoder shape. The tokenizer configs extend this one."""

    image_size: int = 16
    """Side of the (square) input images in pixels; fixes the token grid."""
    image_channels: int = 3
    """Channels of the images (3 for RGB)."""
    base_channels: int = 32
    """Width of the first level; level i has ``base_channels * channel_multipliers[i]``."""
    channel_multipliers: tuple[int, ...] = (1, 2, 2)
    """One entry per level; ``len - 1`` stride-2 downsamples, so (1, 2, 2) gives f=4."""
    res_blocks: int = 1
    """Res blocks per encoder level; the decoder uses one more per level."""
    attention: bool = True
    """Self-attention after each res block of the lowest-resolution level (mid always has one)."""
    norm_groups: int = 8
    """GroupNorm groups; every level width must be a multiple (8 lets 32-wide nets work)."""
    z_channels: int = 64
    """Channels of the encoder output / decoder input."""

    def __post_init__(self) -> None:
        require(self.image_size > 0, "image_size", "must be positive")
        require(self.image_channels > 0, "image_channels", "must be positive")
        require(len(self.channel_multipliers) > 0, "channel_multipliers", "must not be empty")
        require(all(m > 0 for m in self.channel_multipliers), "channel_multipliers", "must be positive")
        require(self.res_blocks > 0, "res_blocks", "must be positive")
        require(self.norm_groups > 0, "norm_groups", "must be positive")
        for width in self.level_channels:
            require(
                width % self.norm_groups == 0,
                "norm_groups",
                f"must divide every level width, {width} is not a multiple",
            )
        require(
            self.image_size % self.downsample_factor == 0,
            "image_size",
            f"must be a multiple of the downsample factor {self.downsample_factor}",
        )

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.base_channels * m for m in self.channel_multipliers)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_multipliers) - 1)

    @property
    def latent_side(self) -> int:
        return self.image_size // self.downsample_factor


def check_images(images_BCHW: torch.Tensor, config: ConvBackboneConfig) -> None:
    expected = (config.image_channels, config.image_size, config.image_size)
    if images_BCHW.dim() != 4 or tuple(images_BCHW.shape[1:]) != expected:
        raise ValueError(f"images must be (B, {', '.join(map(str, expected))}), got {tuple(images_BCHW.shape)}")


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the h*w positions of a feature map."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (n c) h w -> n b 1 (h w) c", n=3)
        out = F.scaled_dot_product_attention(q, k, v)
        out = rearrange(out, "b 1 (h w) c -> b c h w", h=height, w=width)
        return x + self.proj(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv; the (0, 1, 0, 1) pad makes an even side halve exactly."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid_block(channels: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        ResBlock(channels, channels, groups), AttentionBlock(channels, groups), ResBlock(channels, channels, groups)
    )


def _level(in_channels: int, out_channels: int, blocks: int, groups: int, attention: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(blocks):
        layers.append(ResBlock(in_channels if i == 0 else out_channels, out_channels, groups))
        if attention:
            layers.append(AttentionBlock(out_channels, groups))
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """images_BCHW in [-1, 1] -> z_BChw with ``z_channels`` channels, h = H / f."""

    def __init__(self, config: ConvBackboneConfig):
        super().__init__()
        widths, groups = config.level_channels, config.norm_groups
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(config.image_channels, widths[0], 3, padding=1)
        blocks: list[nn.Module] = []
        in_width = widths[0]
        for i, width in enumerate(widths):
            blocks.append(_level(in_width, width, config.res_blocks, groups, config.attention and i == last))
            if i != last:
                blocks.append(Downsample(width))
            in_width = width
        self.levels = nn.Sequential(*blocks)
        self.mid = _mid_block(widths[-1], groups)
        self.norm_out = group_norm(widths[-1], groups)
        self.conv_out = nn.Conv2d(widths[-1], config.z_channels, 3, padding=1)

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.levels(self.conv_in(images_BCHW)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """z_BChw with ``z_channels`` channels -> images_BCHW (unclamped)."""

    def __init__(self, config: ConvBackboneConfig):
        super().__init__()
        widths, groups = config.level_channels, config.norm_groups
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(config.z_channels, widths[-1], 3, padding=1)
        self.mid = _mid_block(widths[-1], groups)
        blocks: list[nn.Module] = []
        in_width = widths[-1]
        for i in reversed(range(len(widths))):  # lowest resolution first
            blocks.append(_level(in_width, widths[i], config.res_blocks + 1, groups, config.attention and i == last))
            if i != 0:
                blocks.append(Upsample(widths[i]))
            in_width = widths[i]
        self.levels = nn.Sequential(*blocks)
        self.norm_out = group_norm(widths[0], groups)
        self.conv_out = nn.Conv2d(widths[0], config.image_channels, 3, padding=1)

    def forward(self, z_BChw: torch.Tensor) -> torch.Tensor:
        h = self.levels(self.mid(self.conv_in(z_BChw)))
        return self.conv_out(F.silu(self.norm_out(h)))
