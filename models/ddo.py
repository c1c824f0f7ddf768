"""Direct Discriminative Optimization (DDO; Zheng et al., ICML'25): a GAN finetune without a discriminator.

The discriminator is implicit in the model itself: ``d_θ(x|c) = σ(β·Δ)`` with the log-likelihood
ratio ``Δ = log p_θ(x|c) − log p_ref(x|c)`` against a frozen reference (the model being
finetuned, as it was when the round began). Real sequences come from the data, fake ones are
sampled from the reference (no guidance, no top-k/top-p). The discriminator loss

    L = mean_real softplus(−β·Δ) + α · mean_fake m_i·softplus(β·Δ_i)

(``softplus(−z) = −log σ(z)``, ``softplus(z) = −log(1 − σ(z))``) is minimised over θ directly:
the gradient flows into the generator, no sampling is back-propagated. Pointwise its optimum is
``σ(β·Δ*) = p_data / (p_data + α·p_ref)``; at β = α = 1 that is ``p_θ = p_data``. β < 1 overshoots
past the data away from the reference, like guidance. Self-play: the finetuned model becomes the
next round's reference and the fakes are drawn again.

CFG-compatible variant (NVlabs/DDO issue #3): labels are still dropped to the null class with
probability ρ on both halves, and ``m_i = 0`` on the dropped fake rows, so the unconditional
branch never gets a fake term (it keeps learning the data; in CFG it already acts as the negative).

Pure functions of tensors: stages/ddo.py feeds them whole-sequence log-probs of both families.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.sampling import GuidanceSchedule


def ddo_labels(
    real_labels_B: torch.Tensor,
    fake_labels_B: torch.Tensor,
    null_class: int,
    *,
    uncond_ratio: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(real labels, fake labels, fake_conditional_B) after label dropout.

    Each row of either half is nulled with probability ``uncond_ratio`` (independent Bernoulli
    draws from ``generator``, real half first, on the CPU so a draw depends only on the seed).
    Nulled real rows stay positives: p(x|∅) keeps training on data. ``fake_conditional_B`` is
    False on nulled fake rows, which get no fake term in ``ddo_loss``."""
    drop_real_B = (torch.rand(real_labels_B.shape, generator=generator) < uncond_ratio).to(real_labels_B.device)
    drop_fake_B = (torch.rand(fake_labels_B.shape, generator=generator) < uncond_ratio).to(fake_labels_B.device)
    real_labels_B = real_labels_B.masked_fill(drop_real_B, null_class)
    return real_labels_B, fake_labels_B.masked_fill(drop_fake_B, null_class), ~drop_fake_B


def ddo_loss(
    logp_real_B: torch.Tensor,
    ref_logp_real_B: torch.Tensor,
    logp_fake_B: torch.Tensor,
    ref_logp_fake_B: torch.Tensor,
    *,
    alpha: float,
    beta: float,
    fake_conditional_B: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The DDO loss (module docstring) and its monitors, from fp32 whole-sequence log-probs.

    Real and fake rows are unpaired (their counts may differ). ``fake_conditional_B`` (bool): fake
    rows that get the fake term; None = all. The fake term is a mean over *all* fake rows with the
    unconditional ones contributing 0, so at p_θ = p_ref the loss is (1 + α·share)·log 2. The
    reference log-probs are constants. Monitors (fake ones over the conditional fake rows, 0 when
    there are none): ``sigmoid_real`` / ``sigmoid_fake`` = mean σ(β·Δ), the implicit
    discriminator's output (0.5 at the round's start; real rises, fake falls); ``reward_real`` /
    ``reward_fake`` = mean β·Δ; ``margin`` = their difference; ``accuracy`` = the discriminator's
    balanced accuracy at threshold 0.5: (share of reals with Δ > 0 + share of fakes with Δ < 0) / 2."""
    if fake_conditional_B is None:
        fake_conditional_B = torch.ones_like(logp_fake_B, dtype=torch.bool)
    reward_real_B = beta * (logp_real_B.float() - ref_logp_real_B.float().detach())
    reward_fake_B = beta * (logp_fake_B.float() - ref_logp_fake_B.float().detach())
    conditional_B = fake_conditional_B.float()
    loss = F.softplus(-reward_real_B).mean() + alpha * (conditional_B * F.softplus(reward_fake_B)).mean()

    with torch.no_grad():
        count = max(float(conditional_B.sum()), 1.0)

        def over_fakes(values_B: torch.Tensor) -> float:
            return float((values_B.float() * conditional_B).sum()) / count

        reward_real, reward_fake = float(reward_real_B.mean()), over_fakes(reward_fake_B)
        monitors = {
            "sigmoid_real": float(torch.sigmoid(reward_real_B).mean()),
            "sigmoid_fake": over_fakes(torch.sigmoid(reward_fake_B)),
            "reward_real": reward_real,
            "reward_fake": reward_fake,
            "margin": reward_real - reward_fake,
            "accuracy": (float((reward_real_B > 0).float().mean()) + over_fakes(reward_fake_B < 0)) / 2,
        }
    return loss, monitors


@torch.no_grad()
def tokenizer_round_trip(tokenizer, tokens_BL: torch.Tensor) -> torch.Tensor:
    """decode -> 8-bit pixels -> encode: fake tokens put through the path the real ones took (the
    cache encodes uint8 images), so the discriminator cannot tell them apart by tokenizer
    artefacts (NVlabs/DDO issue #5: "performs better empirically")."""
    images_BCHW = tokenizer.decode(tokens_BL)
    pixels_BCHW = ((images_BCHW.float() + 1) * 127.5).round().clamp(0, 255)
    return tokenizer.encode(pixels_BCHW / 127.5 - 1)


@torch.no_grad()
def sample_fakes(
    reference,
    labels_N: torch.Tensor,
    *,
    seed: int,
    batch_size: int = 256,
    tokenizer=None,
    cfg_scale: GuidanceSchedule = 1.0,
) -> torch.Tensor:
    """Fake sequences (N, L) int64 from the reference, one per label, on the reference's device:
    plain sampling (no guidance unless ``cfg_scale``, temperature 1, no top-k/top-p), then
    ``tokenizer_round_trip`` when a tokenizer is given. Batch b draws from its own generator seeded
    ``seed·1_000_003 + b``, so the fakes are a function of the reference's weights, the labels and
    the seed."""
    device = next(reference.parameters()).device
    out = []
    for b, start in enumerate(range(0, len(labels_N), batch_size)):
        generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + b)
        labels_B = labels_N[start : start + batch_size].to(device)
        tokens_BL = reference.generate(
            labels_B, cfg_scale=cfg_scale, temperature=1.0, top_k=0, top_p=1.0, generator=generator
        )
        out.append(tokenizer_round_trip(tokenizer, tokens_BL) if tokenizer is not None else tokens_BL)
    return torch.cat(out)
