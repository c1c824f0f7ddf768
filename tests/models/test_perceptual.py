"""LPIPS-style perceptual loss on a VGG16 features stack loaded from a torchvision-format state_dict."""

from __future__ import annotations

import pytest
import torch

from models.perceptual import TAPS, PerceptualLoss, vgg16_features

NARROW = (4, 8, 8, 16, 16)  # VGG16's layout at 1/16 to 1/32 of its widths: fast, same keys


def torchvision_state_dict(widths=NARROW, seed=0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {f"features.{k}": v for k, v in vgg16_features(widths).state_dict().items()}


def images(seed: int, side: int = 8) -> torch.Tensor:
    return torch.rand(3, 3, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_layer_indices_and_keys_are_torchvision_vgg16():
    features = vgg16_features()
    assert len(features) == 31 and sum(p.numel() for p in features.parameters()) == 14_714_688
    assert all(isinstance(features[i], torch.nn.ReLU) and isinstance(features[i - 1], torch.nn.Conv2d) for i in TAPS)
    assert "28.weight" in features.state_dict() and isinstance(features[30], torch.nn.MaxPool2d)


def test_identical_images_are_at_distance_zero_and_others_are_not():
    loss = PerceptualLoss.from_torchvision_state_dict(torchvision_state_dict())
    x = images(0)
    assert loss(x, x.clone()).item() == 0.0
    y = images(1).requires_grad_(True)
    distance = loss(y, x)
    distance.backward()
    assert distance.item() > 0 and torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in loss.parameters())  # frozen


def test_widths_come_from_the_weights_and_classifier_keys_are_ignored():
    state_dict = {**torchvision_state_dict((8, 8, 16, 16, 32)), "classifier.0.weight": torch.zeros(2, 2)}
    loss = PerceptualLoss.from_torchvision_state_dict(state_dict)
    assert loss.features[28].out_channels == 32 and len(loss.features) == TAPS[-1] + 1
    assert loss(images(0, side=32), images(1, side=32)).item() > 0  # no upsampling at 32 px


def test_missing_conv_weight_is_named():
    state_dict = torchvision_state_dict()
    del state_dict["features.10.weight"]
    with pytest.raises(KeyError, match="features.10.weight"):
        PerceptualLoss.from_torchvision_state_dict(state_dict)
