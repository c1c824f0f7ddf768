"""An LPIPS-style perceptual distance on a frozen VGG16 ``features`` stack.

The layer list is torchvision's ``vgg16().features`` (13 3x3 convs with ReLUs, 5 max-pools), so a
torchvision-format state_dict (``features.N.weight`` / ``features.N.bias``) loads as is; channel
widths are read from the weights, so a narrower VGG with the same layout loads too (tests use one).
Distance, as in LPIPS (Zhang et al. 2018) with uniform linear weights:

    images in [-1, 1] -> [0, 1] -> ImageNet mean/std; upsampled to >= 32 px (four pools must
    leave >= 2x2 at relu5_3); features at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3;
    each unit-normalised over channels; sum over channels of the squared difference (0..4),
    averaged over positions, images and the five layers.

Identical images give exactly 0. This module reads no files: the stage loads the state_dict.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# torchvision's VGG16 "D" configuration: conv widths, "M" = 2x2 max-pool.
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
TAPS = (3, 8, 15, 22, 29)
"""Indices in ``features`` of relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3."""
MIN_SIDE = 32
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def vgg16_features(widths: tuple[int, ...] = (64, 128, 256, 512, 512)) -> nn.Sequential:
    """torchvision's ``vgg16().features`` with the five blocks' widths (the default is VGG16's)."""
    layers: list[nn.Module] = []
    channels, block = 3, 0
    for item in VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            block += 1
        else:
            layers += [nn.Conv2d(channels, widths[block], kernel_size=3, padding=1), nn.ReLU(inplace=False)]
            channels = widths[block]
    return nn.Sequential(*layers)


class PerceptualLoss(nn.Module):
    """Frozen VGG16 features -> LPIPS-style distance; ``forward(x_BCHW, y_BCHW)`` -> scalar."""

    def __init__(self, features: nn.Sequential):
        super().__init__()
        self.features = features[: TAPS[-1] + 1]  # nothing past relu5_3 is used
        self.register_buffer("mean_C", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std_C", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_torchvision_state_dict(cls, state_dict: dict[str, torch.Tensor]) -> PerceptualLoss:
        """Build from ``features.N.weight`` / ``.bias`` keys (classifier keys are ignored).

        Missing or misshapen conv weights raise with the key's name."""
        convs = [i for i, layer in enumerate(vgg16_features((1,) * 5)) if isinstance(layer, nn.Conv2d)]
        widths_per_conv = []
        for index in convs:
            key = f"features.{index}.weight"
            if key not in state_dict:
                raise KeyError(f"VGG16 weights have no {key!r}: expected torchvision vgg16 keys features.N.weight")
            widths_per_conv.append(int(state_dict[key].shape[0]))
        widths = tuple(widths_per_conv[i] for i in (0, 2, 4, 7, 10))  # first conv of each block
        features = vgg16_features(widths)
        wanted = {k: v for k, v in state_dict.items() if k.startswith("features.")}
        features.load_state_dict({k[len("features.") :]: v for k, v in wanted.items()}, strict=True)
        return cls(features)

    def _taps(self, x_BCHW: torch.Tensor) -> list[torch.Tensor]:
        x_BCHW = ((x_BCHW + 1) / 2 - self.mean_C) / self.std_C
        side = min(x_BCHW.shape[-2:])
        if side < MIN_SIDE:
            x_BCHW = F.interpolate(x_BCHW, scale_factor=math.ceil(MIN_SIDE / side), mode="bilinear")
        taps = []
        for index, layer in enumerate(self.features):
            x_BCHW = layer(x_BCHW)
            if index in TAPS:
                taps.append(x_BCHW)
        return taps

    def forward(self, x_BCHW: torch.Tensor, y_BCHW: torch.Tensor) -> torch.Tensor:
        """Mean LPIPS-style distance between two batches of images in [-1, 1] (same shape)."""
        distances = []
        for fx, fy in zip(self._taps(x_BCHW), self._taps(y_BCHW), strict=True):
            diff = _unit(fx) - _unit(fy)
            distances.append(diff.pow(2).sum(dim=1).mean())
        return torch.stack(distances).mean()


def _unit(f_BCHW: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Unit length over channels at each position (LPIPS's normalize_tensor). F.normalize divides
    by max(norm, eps), so an all-zero ReLU position has a zero gradient, not 0 * inf = NaN."""
    return F.normalize(f_BCHW, dim=1, eps=eps)
