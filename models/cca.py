"""Condition Contrastive Alignment (CCA; Chen et al., ICLR'25): guidance-free sampling by finetuning.

A positive pair is a data sequence with its own label, a negative pair the same sequence with a
mismatched label. The implicit reward is the whole-sequence log-likelihood ratio of the policy θ to
a frozen copy φ of the pretrained model, ``Δ = log p_θ(x|c) − log p_φ(x|c)``. With ``w_i = λ`` and
``s_i = −1`` on true negatives (``w_i = 1``, ``s_i = +1`` on rows whose negative half counts as a
second positive, see ``cca_labels``), the loss of thu-ml/CCA ``LlamaGen_finetune.py`` is

    L = ( mean_i softplus(−β·Δ⁺_i) + mean_i w_i·softplus(−s_i·β·Δ⁻_i) ) / max(λ, 1)

(``softplus(−z) = −log σ(z)``). Its NCE optimum tilts p_φ by the class PMI, the target classifier-
free guidance samples from; β is the inverse tilt temperature and λ the guidance-strength knob.
Dividing by max(λ, 1) keeps the step size of the negative term ≈1 whatever λ.

Pure functions of tensors: the stage (stages/cca.py) feeds them log-probs from
``sequence_log_prob``-style forwards of both families.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

NegativeMode = Literal["roll", "resample"]


def negative_labels(
    labels_B: torch.Tensor, num_classes: int, mode: NegativeMode = "roll", generator: torch.Generator | None = None
) -> torch.Tensor:
    """Mismatched labels for the negative half of a batch of real-class labels.

    ``roll``: the reference's ``labels.roll(-1)`` (a cyclic shift; its code comment says a randperm
    is biased on small batches). It keeps the true label wherever two neighbours share a class
    (≈1/num_classes of the rows with balanced classes); the reference does not redraw those rows
    but treats them as positives (``cca_labels`` does the same). ``resample``: a label drawn
    uniformly from the other ``num_classes − 1`` classes, never the true one (``generator`` on the
    CPU, so a draw depends only on the generator's seed)."""
    if mode == "roll":
        return labels_B.roll(-1, dims=0)
    if mode == "resample":
        if num_classes < 2:
            raise ValueError("resampled negatives need at least 2 classes")
        offset_B = torch.randint(1, num_classes, labels_B.shape, generator=generator).to(labels_B.device)
        return (labels_B + offset_B) % num_classes
    raise ValueError(f"unknown negative mode {mode!r}: expected 'roll' or 'resample'")


def cca_labels(
    labels_B: torch.Tensor,
    num_classes: int,
    *,
    mode: NegativeMode = "roll",
    uncond_ratio: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(positive labels, negative labels, as_positive_B) for one batch, as the reference builds them.

    Negatives come from ``negative_labels``. Then a fraction ``uncond_ratio`` of the rows (each
    Bernoulli(ρ), from ``generator``) get the null class ``num_classes`` on *both* halves: their
    negative half becomes a second positive, which keeps p(x|∅) trained on data so CFG still works
    after CCA. ``as_positive_B`` marks those rows and label collisions (``c⁻ == c``)."""
    negatives_B = negative_labels(labels_B, num_classes, mode, generator)
    uncond_B = (torch.rand(labels_B.shape, generator=generator) < uncond_ratio).to(labels_B.device)
    as_positive_B = uncond_B | (negatives_B == labels_B)
    positives_B = labels_B.masked_fill(uncond_B, num_classes)
    negatives_B = negatives_B.masked_fill(uncond_B, num_classes)
    return positives_B, negatives_B, as_positive_B


def cca_loss(
    logp_pos_B: torch.Tensor,
    ref_logp_pos_B: torch.Tensor,
    logp_neg_B: torch.Tensor,
    ref_logp_neg_B: torch.Tensor,
    *,
    beta: float,
    lam: float,
    as_positive_B: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The CCA loss (module docstring) and its monitors, from fp32 whole-sequence log-probs (B,).

    ``as_positive_B`` (bool, B): rows whose negative half is a positive (unconditional rows, label
    collisions); None = every negative is a true negative. The reference log-probs are treated as
    constants. Monitors, over the true-negative rows where they concern negatives (0 when there
    are none): ``sigmoid_pos`` / ``sigmoid_neg`` = mean σ(β·Δ) (0.5 at init; the positive one
    rises, the negative one falls), ``reward_pos`` / ``reward_neg`` = mean β·Δ, ``margin`` = mean
    β·(Δ⁺ − Δ⁻), ``accuracy`` = fraction with Δ⁺ > Δ⁻."""
    if as_positive_B is None:
        as_positive_B = torch.zeros_like(logp_pos_B, dtype=torch.bool)
    reward_pos_B = beta * (logp_pos_B.float() - ref_logp_pos_B.float().detach())
    reward_neg_B = beta * (logp_neg_B.float() - ref_logp_neg_B.float().detach())
    sign_B = torch.where(as_positive_B, 1.0, -1.0)
    weight_B = torch.where(as_positive_B, 1.0, float(lam))
    loss = (F.softplus(-reward_pos_B).mean() + (weight_B * F.softplus(-sign_B * reward_neg_B)).mean()) / max(lam, 1.0)

    with torch.no_grad():
        negative_B = (~as_positive_B).float()
        count = max(float(negative_B.sum()), 1.0)

        def over_negatives(values_B: torch.Tensor) -> float:
            return float((values_B.float() * negative_B).sum()) / count

        monitors = {
            "sigmoid_pos": float(torch.sigmoid(reward_pos_B).mean()),
            "sigmoid_neg": over_negatives(torch.sigmoid(reward_neg_B)),
            "reward_pos": float(reward_pos_B.mean()),
            "reward_neg": over_negatives(reward_neg_B),
            "margin": over_negatives(reward_pos_B - reward_neg_B),
            "accuracy": over_negatives(reward_pos_B > reward_neg_B),
        }
    return loss, monitors


def sequence_log_prob(logits_BLV: torch.Tensor, tokens_BL: torch.Tensor) -> torch.Tensor:
    """Sum of token log-probs per row, fp32 (B,): the models' ``sequence_log_prob`` from logits a
    stage already has (a wrapped model's forward, so data-parallel gradient sync sees the call)."""
    nll_BL = F.cross_entropy(logits_BLV.float().transpose(1, 2), tokens_BL, reduction="none")
    return -nll_BL.sum(dim=1)
