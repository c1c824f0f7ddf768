"""The CCA objective on tiny known distributions: values, gradient direction, labels, masking."""

import math

import pytest
import torch

from models.cca import cca_labels, cca_loss, negative_labels, sequence_log_prob


def log_sigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z))


def test_loss_matches_a_hand_computation():
    logp_pos, ref_pos = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    logp_neg, ref_neg = torch.tensor([-3.0, -2.0]), torch.tensor([-2.0, -2.5])
    beta, lam = 0.5, 4.0
    as_positive = torch.tensor([False, True])
    loss, monitors = cca_loss(logp_pos, ref_pos, logp_neg, ref_neg, beta=beta, lam=lam, as_positive_B=as_positive)
    # Δ⁺ = (0.5, −1.0), Δ⁻ = (−1.0, 0.5); row 0 a true negative (weight λ, sign −1), row 1 a positive
    pos_term = -(log_sigmoid(0.25) + log_sigmoid(-0.5)) / 2
    neg_term = -(lam * log_sigmoid(0.5) + log_sigmoid(0.25)) / 2
    assert float(loss) == pytest.approx((pos_term + neg_term) / lam, rel=1e-6)
    # monitors: positives over both rows, negatives over the true-negative row only
    assert monitors["sigmoid_pos"] == pytest.approx((torch.sigmoid(torch.tensor([0.25, -0.5]))).mean().item())
    assert monitors["sigmoid_neg"] == pytest.approx(torch.sigmoid(torch.tensor(-0.5)).item())
    assert monitors["margin"] == pytest.approx(0.25 - (-0.5))
    assert monitors["accuracy"] == 1.0


@pytest.mark.parametrize("lam", [0.5, 1.0, 10.0])
def test_loss_at_init_is_log2_weighted_by_the_formula(lam):
    logp = torch.tensor([-3.0, -7.0, -1.0, -4.0])
    as_positive = torch.tensor([False, False, False, True])
    loss, monitors = cca_loss(logp, logp, logp, logp, beta=0.1, lam=lam, as_positive_B=as_positive)
    # −log σ(0) = log 2 in every term; mean weight of the negative half = (3λ + 1) / 4
    expected = math.log(2) * (1 + (3 * lam + 1) / 4) / max(lam, 1.0)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert monitors["sigmoid_pos"] == monitors["sigmoid_neg"] == 0.5
    assert monitors["margin"] == 0.0 and monitors["accuracy"] == 0.0
    plain, _ = cca_loss(logp, logp, logp, logp, beta=0.1, lam=lam)
    assert float(plain) == pytest.approx(math.log(2) * (1 + lam) / max(lam, 1.0), rel=1e-6)


def test_gradient_raises_positives_and_lowers_negatives_against_the_reference():
    """A toy conditional categorical p(x|c) = softmax(W[c]) over 4 outcomes, 3 classes (+ null)."""
    torch.manual_seed(0)
    reference = torch.randn(4, 4)
    weights = torch.nn.Parameter(reference.clone())
    # each outcome belongs to one class, so no (x, c) pair is both a positive and a negative
    x = torch.tensor([0, 1, 2, 3])
    c = torch.tensor([0, 1, 2, 0])
    c, c_neg, as_positive = cca_labels(c, 3, mode="roll")  # the last row collides (0, 0): a positive
    optimizer = torch.optim.SGD([weights], lr=0.5)

    def log_prob(table, labels):
        return table[labels].log_softmax(-1).gather(-1, x[:, None]).squeeze(-1)

    for _ in range(20):
        loss, monitors = cca_loss(
            log_prob(weights, c), log_prob(reference, c), log_prob(weights, c_neg), log_prob(reference, c_neg),
            beta=1.0, lam=2.0, as_positive_B=as_positive,
        )  # fmt: skip
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        delta_pos = log_prob(weights, c) - log_prob(reference, c)
        delta_neg = log_prob(weights, c_neg) - log_prob(reference, c_neg)
    assert (delta_pos > 0).all() and (delta_neg[~as_positive] < 0).all() and (delta_neg[as_positive] > 0).all()
    assert monitors["sigmoid_pos"] > 0.5 > monitors["sigmoid_neg"] and monitors["accuracy"] == 1.0
    assert weights.grad is not None and reference.grad is None


def test_resampled_negatives_never_keep_the_true_label_and_cover_the_others():
    labels = torch.arange(10).repeat(200)
    negatives = negative_labels(labels, 10, "resample", torch.Generator().manual_seed(0))
    assert not (negatives == labels).any() and ((negatives >= 0) & (negatives < 10)).all()
    for c in range(10):
        assert set(negatives[labels == c].tolist()) == set(range(10)) - {c}


def test_roll_shifts_the_batch_and_keeps_collisions_which_count_as_positives():
    labels = torch.tensor([3, 3, 5, 1])
    assert negative_labels(labels, 10, "roll").tolist() == [3, 5, 1, 3]
    positives, negatives, as_positive = cca_labels(labels, 10, mode="roll")
    assert positives.tolist() == [3, 3, 5, 1] and negatives.tolist() == [3, 5, 1, 3]
    assert as_positive.tolist() == [True, False, False, False]


def test_unconditional_masking_nulls_both_halves_of_the_chosen_fraction():
    labels = torch.arange(10).repeat(1000)
    positives, negatives, as_positive = cca_labels(
        labels, 10, mode="resample", uncond_ratio=0.1, generator=torch.Generator().manual_seed(1)
    )
    nulled = positives == 10
    assert (nulled == (negatives == 10)).all(), "the null class goes on both halves of a row"
    assert nulled.float().mean().item() == pytest.approx(0.1, abs=0.015)
    assert (as_positive == nulled).all(), "resampled negatives never collide: only null rows are positives"
    assert (positives[~nulled] == labels[~nulled]).all()
    # the null rows' negative half is trained like a positive: its loss falls as Δ⁻ rises
    zeros = torch.zeros(len(labels))
    up = torch.full((len(labels),), 1.0)
    low, _ = cca_loss(zeros, zeros, up, zeros, beta=1.0, lam=1.0, as_positive_B=as_positive)
    high, _ = cca_loss(zeros, zeros, up, zeros, beta=1.0, lam=1.0, as_positive_B=torch.zeros_like(as_positive))
    assert float(low) < float(high)


def test_sequence_log_prob_sums_token_log_probs():
    logits = torch.randn(2, 3, 5)
    tokens = torch.tensor([[0, 1, 2], [4, 4, 0]])
    expected = logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1).sum(-1)
    assert torch.allclose(sequence_log_prob(logits, tokens), expected)
