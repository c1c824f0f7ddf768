"""Encoder/decoder shapes, widths and config validation."""

from __future__ import annotations

import pytest
import torch

from models.conv_autoencoder import AttentionBlock, ConvBackboneConfig, Decoder, Encoder


@pytest.mark.parametrize(("multipliers", "side"), [((1,), 16), ((1, 2), 8), ((1, 2, 2), 4)])
def test_encoder_downsamples_by_two_per_extra_level(multipliers, side):
    config = ConvBackboneConfig(base_channels=8, channel_multipliers=multipliers, norm_groups=4, z_channels=6)
    assert config.latent_side == side
    z = Encoder(config)(torch.zeros(2, 3, 16, 16))
    assert z.shape == (2, 6, side, side)
    assert Decoder(config)(z).shape == (2, 3, 16, 16)


def test_decoder_has_one_more_res_block_per_level_and_attention_only_at_lowest_resolution():
    config = ConvBackboneConfig(base_channels=8, channel_multipliers=(1, 2), res_blocks=2, norm_groups=4)
    encoder, decoder = Encoder(config), Decoder(config)
    # levels = [level 0, downsample, level 1] / [level 1, upsample, level 0]
    assert len(encoder.levels[0]) == 2 and len(encoder.levels[2]) == 2 * 2  # res + attn pairs
    assert len(decoder.levels[0]) == 3 * 2 and len(decoder.levels[2]) == 3
    for module in (encoder, decoder):
        attention = [m for m in module.modules() if isinstance(m, AttentionBlock)]
        assert len(attention) == (2 if module is encoder else 3) + 1  # + the mid block's
    no_attention = ConvBackboneConfig(base_channels=8, channel_multipliers=(1, 2), norm_groups=4, attention=False)
    assert sum(isinstance(m, AttentionBlock) for m in Encoder(no_attention).modules()) == 1


def test_attention_mixes_positions():
    torch.manual_seed(0)
    block = AttentionBlock(8, groups=4)
    x = torch.randn(1, 8, 3, 3)
    changed = x.clone()
    changed[..., 0, 0] += 1.0
    # Changing one position changes the output elsewhere too.
    assert not torch.allclose(block(x)[..., 2, 2], block(changed)[..., 2, 2])


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"base_channels": 12, "norm_groups": 8}, "norm_groups"),
        ({"image_size": 18, "channel_multipliers": (1, 2, 2)}, "image_size"),
        ({"channel_multipliers": ()}, "channel_multipliers"),
        ({"res_blocks": 0}, "res_blocks"),
    ],
)
def test_invalid_backbone_configs_name_the_key(overrides, key):
    with pytest.raises(ValueError, match=f"'{key}'"):
        ConvBackboneConfig(**overrides)
