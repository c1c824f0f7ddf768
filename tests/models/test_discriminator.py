"""PatchGAN discriminator and hinge losses."""

from __future__ import annotations

import pytest
import torch

from models.discriminator import (
    DiscriminatorConfig,
    PatchDiscriminator,
    hinge_d_loss,
    hinge_g_loss,
)


@pytest.mark.parametrize(("layers", "side"), [(1, 6), (2, 2)])
@pytest.mark.parametrize("norm", ["group", "none"])
def test_patch_logits_shape(layers, side, norm):
    discriminator = PatchDiscriminator(DiscriminatorConfig(layers=layers, norm=norm, base_channels=8, norm_groups=4))
    assert discriminator(torch.zeros(2, 3, 16, 16)).shape == (2, 1, side, side)


def test_conv_weights_start_as_n_0_002():
    torch.manual_seed(0)
    discriminator = PatchDiscriminator(DiscriminatorConfig())
    weights = torch.cat([m.weight.flatten() for m in discriminator.modules() if isinstance(m, torch.nn.Conv2d)])
    assert abs(weights.mean().item()) < 2e-3
    assert weights.std().item() == pytest.approx(0.02, rel=0.05)


def test_hinge_losses():
    plus, minus = torch.full((2, 1, 2, 2), 2.0), torch.full((2, 1, 2, 2), -2.0)
    assert hinge_d_loss(plus, minus) == 0  # both beyond the margin
    assert hinge_d_loss(torch.zeros(4), torch.zeros(4)) == 1.0
    assert hinge_d_loss(minus, plus) == 3.0
    assert hinge_g_loss(plus) == -2.0


def test_discriminator_step_separates_real_from_fake():
    torch.manual_seed(0)
    discriminator = PatchDiscriminator(DiscriminatorConfig(base_channels=8, norm_groups=4))
    optimizer = torch.optim.Adam(discriminator.parameters(), lr=1e-3)
    real, fake = torch.ones(4, 3, 16, 16) * 0.5, -torch.ones(4, 3, 16, 16) * 0.5
    first = hinge_d_loss(discriminator(real), discriminator(fake)).item()
    for _ in range(20):
        loss = hinge_d_loss(discriminator(real), discriminator(fake))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first


def test_invalid_norm_is_named():
    with pytest.raises(ValueError, match="'norm'"):
        DiscriminatorConfig(norm="batch")
