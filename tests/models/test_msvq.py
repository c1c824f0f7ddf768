"""Multi-scale residual quantizer: nearest codes, cumulative loss, next-scale inputs, φ sharing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from models.msvq import MSVQConfig
from models.residual_quantizer import MultiScaleResidualQuantizer, phi_for_scales

SCALES = (1, 2, 3, 4)


def make_quantizer(scales=SCALES, dim=4, codebook_size=16, share_quant_resi=0, seed=0, **overrides):
    torch.manual_seed(seed)
    settings = {
        "codebook_size": codebook_size,
        "dim": dim,
        "scales": scales,
        "commitment_weight": 0.25,
        "quant_resi": 0.5,
        "share_quant_resi": share_quant_resi,
        "usage_momentum": 0.99,
        "dead_code_threshold": 0.1,
        "restart_every": 0,
        "candidate_buffer_size": 64,
        "scale_normalization": False,
        "normalization_momentum": 0.99,
        "restart_per_scale": True,
        "restart_max_total_share": 1.0,
    }
    quantizer = MultiScaleResidualQuantizer(**{**settings, **overrides})
    with torch.no_grad():  # codes on the data's scale, so every scale picks varied codes
        quantizer.codebook.weight.normal_()
    return quantizer


def prefixes(quantizer, tokens_BL):
    """f_hat after each scale, built one scale at a time."""
    f_hat = quantizer.empty_f_hat(len(tokens_BL))
    result = []
    for k, tokens_B_l in enumerate(quantizer.split_scales(tokens_BL)):
        f_hat, _ = quantizer.next_scale_input(f_hat, k, tokens_B_l)
        result.append(f_hat)
    return result


def test_each_scale_picks_the_nearest_code_to_its_downsampled_residual():
    quantizer = make_quantizer()
    f = torch.randn(3, 4, 4, 4)
    _, out = quantizer(f)
    f_hats = prefixes(quantizer, out.tokens_BL)
    codebook_VC = quantizer.codebook.weight.detach()
    for k, (side, tokens_B_l) in enumerate(zip(SCALES, quantizer.split_scales(out.tokens_BL), strict=True)):
        residual = f if k == 0 else f - f_hats[k - 1]
        residual_NC = rearrange(F.interpolate(residual, size=(side, side), mode="area"), "b c h w -> (b h w) c")
        brute_force = ((residual_NC[:, None, :] - codebook_VC[None]) ** 2).sum(-1).argmin(-1)
        assert torch.equal(tokens_B_l.reshape(-1), brute_force), f"scale {side}"
        assert torch.allclose(out.candidates[k], residual_NC, atol=1e-6)


def test_teacher_forcing_input_equals_scale_by_scale_inputs():
    quantizer = make_quantizer(share_quant_resi=2)
    tokens_BL = torch.randint(0, 16, (5, quantizer.seq_len), generator=torch.Generator().manual_seed(1))
    x_BLC = quantizer.teacher_forcing_input(tokens_BL)
    assert x_BLC.shape == (5, quantizer.seq_len - 1, 4)

    f_hat = quantizer.empty_f_hat(5)
    pieces = []
    for k, tokens_B_l in enumerate(quantizer.split_scales(tokens_BL)):
        f_hat, next_input = quantizer.next_scale_input(f_hat, k, tokens_B_l)
        if k < len(SCALES) - 1:
            assert next_input.shape == (5, SCALES[k + 1] ** 2, 4)
            pieces.append(next_input)
        else:
            assert next_input is None
    assert torch.allclose(x_BLC, torch.cat(pieces, dim=1), atol=1e-6, rtol=0)
    assert torch.equal(f_hat, quantizer.tokens_to_f_hat(tokens_BL))


def test_teacher_forcing_rows_are_the_downsampled_reconstruction_so_far():
    quantizer = make_quantizer()
    tokens_BL = torch.randint(0, 16, (2, quantizer.seq_len), generator=torch.Generator().manual_seed(2))
    x_BLC = quantizer.teacher_forcing_input(tokens_BL)
    f_hats = prefixes(quantizer, tokens_BL)
    # Scale 2 (3x3) rows: positions 1 + 4 = 5 .. 14 in the input, built from f_hat after 1x1, 2x2.
    expected = rearrange(F.interpolate(f_hats[1], size=(3, 3), mode="area"), "b c h w -> b (h w) c")
    assert torch.allclose(x_BLC[:, 4:13], expected, atol=1e-6)
    # The 4x4 input needs no resizing: it is f_hat after 3x3 itself.
    assert torch.allclose(x_BLC[:, 13:], rearrange(f_hats[2], "b c h w -> b (h w) c"), atol=1e-6)


def test_cumulative_loss_covers_every_scale():
    quantizer = make_quantizer()
    f = torch.randn(2, 4, 4, 4, requires_grad=True)
    _, out = quantizer(f)
    f_hats = prefixes(quantizer, out.tokens_BL)
    per_scale = torch.stack([F.mse_loss(f_hat, f.detach()) for f_hat in f_hats]).detach()
    assert out.scale_losses_K.shape == (4,)
    assert torch.allclose(out.scale_losses_K, 1.25 * per_scale, atol=1e-6)
    assert torch.allclose(out.codebook_loss, per_scale.mean(), atol=1e-6)
    assert torch.allclose(out.commit_loss, 0.25 * per_scale.mean(), atol=1e-6)
    # Residual quantisation refines: the full reconstruction is the best prefix.
    assert per_scale[-1] < per_scale[0]
    # Commitment reaches the encoder side; codebook and φ learn from the codebook term.
    out.loss.backward()
    assert f.grad.abs().sum() > 0
    assert all(phi.conv.weight.grad.abs().sum() > 0 for phi in quantizer.phis)


def test_forward_straight_through_value_is_the_reconstruction():
    quantizer = make_quantizer()
    f = torch.randn(2, 4, 4, 4, requires_grad=True)
    f_hat_out, out = quantizer(f)
    assert torch.allclose(f_hat_out, quantizer.tokens_to_f_hat(out.tokens_BL), atol=1e-5)
    f_hat_out.sum().backward()  # identity gradient to f
    assert torch.equal(f.grad, torch.ones_like(f))


def test_phi_selection_follows_var_ticks():
    assert phi_for_scales(4, 4) == (0, 1, 2, 3)
    assert phi_for_scales(4, 1) == (0, 0, 0, 0)
    assert phi_for_scales(6, 2) == (0, 0, 0, 1, 1, 1)
    assert phi_for_scales(1, 1) == (0,)
    assert len(make_quantizer(share_quant_resi=0).phis) == 4
    assert make_quantizer(share_quant_resi=2).phi_of_scale == (0, 0, 1, 1)


def test_zero_quant_resi_makes_phi_the_identity():
    quantizer = make_quantizer(quant_resi=0.0)
    tokens_BL = torch.zeros(1, quantizer.seq_len, dtype=torch.int64)
    f_hat = quantizer.tokens_to_f_hat(tokens_BL)
    # Every scale adds code 0 upsampled: a constant map of 4 times that code.
    expected = 4 * quantizer.codebook.weight[0].detach().view(1, 4, 1, 1).expand(1, 4, 4, 4)
    assert torch.allclose(f_hat, expected, atol=1e-5)


def test_config_requires_the_last_scale_to_be_the_latent_side():
    with pytest.raises(ValueError, match="scales"):
        MSVQConfig(scales=(1, 2, 3))
    with pytest.raises(ValueError, match="scales"):
        MSVQConfig(scales=(1, 3, 2, 4))
    assert MSVQConfig(image_size=32, scales=(1, 2, 4, 8)).latent_side == 8


def test_split_scales_rejects_wrong_length():
    with pytest.raises(ValueError, match="30 tokens"):
        make_quantizer().split_scales(torch.zeros(1, 29, dtype=torch.int64))


def test_scale_normalization_tracks_each_scale_and_decodes_consistently():
    quantizer = make_quantizer(scale_normalization=True)
    f = 3.0 + 5.0 * torch.randn(64, 4, 4, 4, generator=torch.Generator().manual_seed(4))
    _, out = quantizer(f)
    assert torch.equal(quantizer.center_KC, torch.zeros(4, 4))  # forward never moves statistics
    quantizer.update_codebook(out.counts, out.candidates, torch.Generator().manual_seed(0))
    # The first update is a plain mean: the 1x1 statistics are those of the area means.
    means_NC = f.mean(dim=(2, 3))
    assert torch.allclose(quantizer.center_KC[0], means_NC.mean(0), atol=1e-5)
    assert torch.allclose(quantizer.spread_K[0], (means_NC - means_NC.mean(0)).pow(2).mean().sqrt(), atol=1e-5)
    assert 4.0 < quantizer.spread_K[-1] < 6.0  # the finest residual keeps most of the noise
    # The 1x1 vectors quantised next are normalised (finer residuals depend on the codes picked
    # before them, so their statistics catch up over later updates).
    _, out = quantizer(f)
    assert torch.allclose(out.candidates[0].mean(0), torch.zeros(4), atol=1e-5)
    assert torch.allclose(out.candidates[0].pow(2).mean().sqrt(), torch.tensor(1.0), atol=1e-5)
    f_hat_out, out = quantizer(f)
    assert torch.allclose(f_hat_out, quantizer.tokens_to_f_hat(out.tokens_BL), atol=1e-4)
    x_BLC = quantizer.teacher_forcing_input(out.tokens_BL)
    f_hat = quantizer.empty_f_hat(64)
    pieces = []
    for k, tokens_B_l in enumerate(quantizer.split_scales(out.tokens_BL)):
        f_hat, next_input = quantizer.next_scale_input(f_hat, k, tokens_B_l)
        pieces.extend([] if next_input is None else [next_input])
    assert torch.allclose(x_BLC, torch.cat(pieces, dim=1), atol=1e-5)


def test_per_scale_entropy_term_spreads_a_collapsed_coarse_scale():
    quantizer = make_quantizer(entropy_weight=1.0, entropy_temperature=0.5)
    generator = torch.Generator().manual_seed(5)
    # Every image has (almost) the same mean latent: the 1x1 scale collapses onto one code
    # while the zero-mean detail keeps the finer scales busy.
    detail = torch.randn(32, 4, 4, 4, generator=generator)
    f = detail - detail.mean(dim=(2, 3), keepdim=True) + 0.01 * torch.randn(32, 4, 1, 1, generator=generator)
    f = f.requires_grad_(True)
    _, out = quantizer(f)
    assert len(out.tokens_BL[:, 0].unique()) == 1
    optimizer = torch.optim.Adam([f, *quantizer.codebook.parameters()], lr=0.05)
    first = None
    for _ in range(30):
        _, out = quantizer(f)
        first = float(out.entropy_loss.detach()) if first is None else first
        optimizer.zero_grad()
        out.entropy_loss.backward()
        optimizer.step()
    _, out = quantizer(f)
    assert float(out.entropy_loss.detach()) < first
    assert len(out.tokens_BL[:, 0].unique()) >= 8  # half the codebook, from one code


def test_entropy_term_is_off_by_default():
    quantizer = make_quantizer()
    f = torch.randn(4, 4, 4, 4, requires_grad=True)
    _, out = quantizer(f)
    assert float(out.entropy_loss) == 0.0
    assert out.entropy_loss.grad_fn is None
