"""Single-scale cosine quantizer: nearest code, loss terms, entropy penalty."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.vq import CosineVectorQuantizer, VQConfig, entropy_penalty


def make_quantizer(codebook_size=6, dim=3, seed=0, **overrides):
    torch.manual_seed(seed)
    quantizer = CosineVectorQuantizer(VQConfig(codebook_size=codebook_size, codebook_dim=dim, **overrides))
    with torch.no_grad():
        quantizer.codebook.weight.normal_()
    return quantizer


def test_picks_the_nearest_normalised_code():
    quantizer = make_quantizer()
    z_BDhw = torch.randn(2, 3, 4, 5)
    quantized, out = quantizer(z_BDhw)
    z_ND = F.normalize(z_BDhw.permute(0, 2, 3, 1).reshape(-1, 3), dim=-1)
    codes_VD = F.normalize(quantizer.codebook.weight.detach(), dim=-1)
    brute_force = ((z_ND[:, None] - codes_VD[None]) ** 2).sum(-1).argmin(-1)
    assert out.tokens_BL.shape == (2, 20)
    assert torch.equal(out.tokens_BL.reshape(-1), brute_force)
    # The quantised map holds the chosen unit-norm codes, row-major per image.
    assert torch.allclose(quantized.permute(0, 2, 3, 1).reshape(-1, 3), codes_VD[brute_force])
    assert torch.allclose(quantizer.lookup(out.tokens_BL, 4, 5), quantized)


def test_latent_scale_does_not_change_the_code():
    quantizer = make_quantizer()
    z_BDhw = torch.randn(1, 3, 2, 2)
    assert torch.equal(quantizer(z_BDhw)[1].tokens_BL, quantizer(7.0 * z_BDhw)[1].tokens_BL)


def test_loss_terms_match_their_definitions():
    quantizer = make_quantizer(commitment_weight=0.5)
    z_BDhw = torch.randn(2, 3, 2, 2)
    quantized, out = quantizer(z_BDhw)
    z_ND = F.normalize(z_BDhw.permute(0, 2, 3, 1).reshape(-1, 3), dim=-1)
    squared_error = F.mse_loss(quantized.permute(0, 2, 3, 1).reshape(-1, 3), z_ND)
    assert torch.allclose(out.codebook_loss, squared_error)
    assert torch.allclose(out.commit_loss, 0.5 * squared_error)
    assert out.entropy_loss == 0
    assert torch.allclose(out.scale_losses_K, (1.5 * squared_error).reshape(1))


def test_entropy_penalty_prefers_confident_spread_assignments():
    confident_spread = torch.eye(4) * 30
    confident_collapsed = torch.zeros(4, 4)
    confident_collapsed[:, 0] = 30
    uniform = torch.zeros(4, 4)
    spread = entropy_penalty(confident_spread, temperature=1.0)
    assert spread < entropy_penalty(confident_collapsed, 1.0)
    assert spread < entropy_penalty(uniform, 1.0)
    assert spread == pytest.approx(-torch.log(torch.tensor(4.0)).item(), abs=1e-3)


def test_entropy_weight_adds_a_differentiable_term():
    quantizer = make_quantizer(entropy_weight=0.1)
    z_BDhw = torch.randn(2, 3, 2, 2, requires_grad=True)
    _, out = quantizer(z_BDhw)
    assert out.entropy_loss != 0
    out.entropy_loss.backward()
    assert z_BDhw.grad.abs().sum() > 0
