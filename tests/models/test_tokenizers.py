"""Behaviour both tokenizer kinds share: interface, straight-through, overfitting, determinism."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from models.codebook import QuantizerOutput
from models.tokenizers import build_tokenizer

KINDS = ["vq", "msvq"]

# 8x8 images, f=2 -> 4x4 latent: 16 vq tokens, 30 msvq tokens; a few thousand parameters.
TINY_BACKBONE = {"image_size": 8, "base_channels": 8, "channel_multipliers": [1, 2], "norm_groups": 4}
TINY_CONFIGS = {
    "vq": {**TINY_BACKBONE, "z_channels": 16, "codebook_dim": 4, "codebook_size": 32},
    "msvq": {**TINY_BACKBONE, "z_channels": 8, "codebook_size": 32, "scales": [1, 2, 3, 4]},
}


def tiny_tokenizer(kind: str, seed: int = 0, **overrides):
    """A freshly seeded tiny tokenizer."""
    torch.manual_seed(seed)
    return build_tokenizer(kind, {**TINY_CONFIGS[kind], **overrides})


def blob_images(count: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    """Coloured discs on a contrasting background, in [-1, 1]: structure a tokenizer can learn."""
    generator = torch.Generator().manual_seed(seed)
    axis = torch.linspace(-1, 1, size)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    images = []
    for _ in range(count):
        cx, cy = (torch.rand(2, generator=generator) * 1.2 - 0.6).tolist()
        colour = torch.rand(3, 1, 1, generator=generator) * 2 - 1
        inside = ((x - cx) ** 2 + (y - cy) ** 2).sqrt() < 0.5
        images.append(torch.where(inside, colour, -0.5 * colour))
    return torch.stack(images)


@pytest.mark.parametrize("kind", KINDS)
def test_encode_decode_shapes_dtypes_and_layout(kind):
    tokenizer = tiny_tokenizer(kind).eval()
    x = blob_images(3)
    tokens_BL = tokenizer.encode(x)
    assert tokens_BL.dtype == torch.int64
    assert tokens_BL.shape == (3, tokenizer.seq_len)
    assert 0 <= tokens_BL.min() and tokens_BL.max() < tokenizer.codebook_size
    decoded = tokenizer.decode(tokens_BL)
    assert decoded.shape == x.shape and decoded.dtype == torch.float32
    assert decoded.min() >= -1 and decoded.max() <= 1

    layout = json.loads(json.dumps(tokenizer.token_layout))
    assert layout["kind"] == kind
    if kind == "vq":
        assert layout["grid"] == [4, 4] and tokenizer.seq_len == 16
    else:
        assert layout["scales"] == [1, 2, 3, 4] and tokenizer.seq_len == 1 + 4 + 9 + 16


@pytest.mark.parametrize("kind", KINDS)
def test_forward_output_holds_losses_counts_and_candidates(kind):
    tokenizer = tiny_tokenizer(kind)
    recon, out = tokenizer(blob_images(3))
    assert isinstance(out, QuantizerOutput)
    assert recon.shape == (3, 3, 8, 8)
    scales = [16] if kind == "vq" else [1, 4, 9, 16]
    counts = out.counts if kind == "msvq" else out.counts.unsqueeze(0)
    assert counts.shape == (len(scales), 32)
    # Every quantised vector is counted once, at its scale.
    assert counts.sum(dim=1).tolist() == [3.0 * n for n in scales]
    assert [len(c) for c in out.candidates] == [3 * n for n in scales]
    assert all(not c.requires_grad for c in out.candidates)
    assert out.loss.requires_grad and out.loss.item() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_straight_through_sends_reconstruction_gradient_to_encoder_only(kind):
    tokenizer = tiny_tokenizer(kind)
    x = blob_images(2)
    recon, _ = tokenizer(x)
    F.mse_loss(recon, x).backward()
    encoder_grad = sum(p.grad.abs().sum() for p in tokenizer.encoder.parameters())
    assert encoder_grad > 0
    assert tokenizer.quant_conv.weight.grad.abs().sum() > 0
    # The reconstruction skips the codebook: codes learn only from the VQ loss terms.
    codebook_grad = tokenizer.quantizer.codebook.weight.grad
    assert codebook_grad is None or codebook_grad.abs().sum() == 0


@pytest.mark.parametrize("kind", KINDS)
def test_vq_loss_trains_the_codebook(kind):
    tokenizer = tiny_tokenizer(kind)
    _, out = tokenizer(blob_images(2))
    out.loss.backward()
    assert tokenizer.quantizer.codebook.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_decode_of_encode_equals_forward_reconstruction_in_eval(kind):
    tokenizer = tiny_tokenizer(kind).eval()
    x = blob_images(4)
    with torch.no_grad():
        recon, out = tokenizer(x)
        tokens_BL = tokenizer.encode(x)
        assert torch.equal(tokens_BL, out.tokens_BL)
        assert torch.equal(tokenizer.decode(tokens_BL), recon.clamp(-1, 1))


def _overfit(tokenizer, x, steps):
    optimizer = torch.optim.Adam(tokenizer.parameters(), lr=2e-3, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        recon, out = tokenizer(x)
        reconstruction = F.mse_loss(recon, x)
        optimizer.zero_grad()
        (reconstruction + out.loss).backward()
        optimizer.step()
        tokenizer.update_codebook(out.counts, out.candidates, generator)
        losses.append(reconstruction.item())
    return losses


@pytest.mark.parametrize("kind", KINDS)
def test_overfits_a_handful_of_images(kind):
    tokenizer = tiny_tokenizer(kind, base_channels=16, restart_every=20)
    x = blob_images(6, size=8)
    losses = _overfit(tokenizer, x, steps=120)
    tokenizer.eval()
    with torch.no_grad():
        final = F.mse_loss(tokenizer.decode(tokenizer.encode(x)), x).item()
    # Typically 30-300x lower; the margins leave room for other seeds and platforms.
    assert final < 0.1 * losses[0], (losses[0], final)
    assert final < 0.2 * x.var().item()


@pytest.mark.parametrize("kind", KINDS)
def test_identical_seeded_runs_give_identical_weights(kind):
    x = blob_images(4)
    runs = []
    for _ in range(2):
        tokenizer = tiny_tokenizer(kind, seed=3, restart_every=2)
        losses = _overfit(tokenizer, x, steps=5)
        runs.append((losses, tokenizer.state_dict()))
    (losses_a, state_a), (losses_b, state_b) = runs
    assert losses_a == losses_b
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name


@pytest.mark.parametrize("kind", KINDS)
def test_config_dict_rebuilds_the_same_architecture(kind):
    tokenizer = tiny_tokenizer(kind)
    config = json.loads(json.dumps(tokenizer.config_dict()))
    rebuilt = build_tokenizer(tokenizer.kind, config)
    assert rebuilt.config == tokenizer.config
    rebuilt.load_state_dict(tokenizer.state_dict(), strict=True)


@pytest.mark.parametrize("kind", KINDS)
def test_factory_rejects_unknown_and_mistyped_keys_by_name(kind):
    with pytest.raises(ValueError, match="codebook_sise"):
        build_tokenizer(kind, {"codebook_sise": 64})
    with pytest.raises(ValueError, match="base_channels"):
        build_tokenizer(kind, {"base_channels": "32"})
    with pytest.raises(ValueError, match="channel_multipliers"):
        build_tokenizer(kind, {"channel_multipliers": 2})
    with pytest.raises(ValueError, match="norm_groups"):
        build_tokenizer(kind, {"base_channels": 12, "norm_groups": 8})


def test_factory_rejects_unknown_kind():
    with pytest.raises(ValueError, match="'rqvae'.*'msvq', 'vq'"):
        build_tokenizer("rqvae", {})


def test_default_configs_fit_16px_rgb_in_about_a_million_parameters():
    for kind, tokens in [("vq", 16), ("msvq", 30)]:
        tokenizer = build_tokenizer(kind, {})
        parameters = sum(p.numel() for p in tokenizer.parameters())
        assert 0.8e6 < parameters < 1.3e6, (kind, parameters)
        assert tokenizer.seq_len == tokens
        assert tokenizer.encode(torch.zeros(1, 3, 16, 16)).shape == (1, tokens)


@pytest.mark.parametrize("kind", KINDS)
def test_wrong_image_size_fails_clearly(kind):
    with pytest.raises(ValueError, match=r"images must be \(B, 3, 8, 8\)"):
        tiny_tokenizer(kind).encode(torch.zeros(1, 3, 16, 16))
