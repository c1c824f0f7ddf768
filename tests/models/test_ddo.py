"""The DDO objective on tiny known distributions: value at the reference, direction, optimum, masking."""

import math

import pytest
import torch

from models.ddo import ddo_labels, ddo_loss, sample_fakes, tokenizer_round_trip


def log_sigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z))


@pytest.mark.parametrize("alpha", [0.0, 1.0, 3.0, 10.0])
def test_loss_at_the_reference_is_one_plus_alpha_log2(alpha):
    logp_real, logp_fake = torch.tensor([-3.0, -7.0, -1.0]), torch.tensor([-2.0, -9.0, -4.0, -5.0])
    loss, monitors = ddo_loss(logp_real, logp_real, logp_fake, logp_fake, alpha=alpha, beta=0.3)
    assert float(loss) == pytest.approx((1 + alpha) * math.log(2), rel=1e-6)
    assert monitors["sigmoid_real"] == monitors["sigmoid_fake"] == 0.5
    assert monitors["margin"] == 0.0 and monitors["accuracy"] == 0.0


def test_loss_matches_a_hand_computation():
    logp_real, ref_real = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    logp_fake, ref_fake = torch.tensor([-3.0, -2.0, -1.0]), torch.tensor([-2.0, -2.5, -1.0])
    conditional = torch.tensor([True, True, False])
    loss, monitors = ddo_loss(logp_real, ref_real, logp_fake, ref_fake, alpha=4.0, beta=0.5,
                              fake_conditional_B=conditional)  # fmt: skip
    # βΔ_real = (0.25, −0.5); βΔ_fake = (−0.5, 0.25, 0) with the last row unconditional (no term)
    real_term = -(log_sigmoid(0.25) + log_sigmoid(-0.5)) / 2
    fake_term = -(log_sigmoid(0.5) + log_sigmoid(-0.25) + 0.0) / 3
    assert float(loss) == pytest.approx(real_term + 4.0 * fake_term, rel=1e-6)
    sig = torch.sigmoid
    assert monitors["sigmoid_real"] == pytest.approx(float(sig(torch.tensor([0.25, -0.5])).mean()))
    assert monitors["sigmoid_fake"] == pytest.approx(float(sig(torch.tensor([-0.5, 0.25])).mean()))
    assert monitors["reward_real"] == pytest.approx(-0.125) and monitors["reward_fake"] == pytest.approx(-0.125)
    assert monitors["margin"] == pytest.approx(0.0)
    # reals with Δ > 0: 1 of 2; conditional fakes with Δ < 0: 1 of 2
    assert monitors["accuracy"] == pytest.approx(0.5)


def test_unconditional_fake_rows_get_no_gradient_and_real_rows_always_do():
    logp_real = torch.zeros(3, requires_grad=True)
    logp_fake = torch.zeros(4, requires_grad=True)
    conditional = torch.tensor([True, False, True, False])
    loss, _ = ddo_loss(logp_real, torch.zeros(3), logp_fake, torch.zeros(4), alpha=2.0, beta=1.0,
                       fake_conditional_B=conditional)  # fmt: skip
    loss.backward()
    assert (logp_fake.grad[~conditional] == 0).all() and (logp_fake.grad[conditional] > 0).all()
    assert (logp_real.grad < 0).all()  # descending the loss raises the real log-probs
    # the masked rows' share of the fake term is gone: (1 + α·share)·log 2 at the reference
    assert float(loss.detach()) == pytest.approx((1 + 2.0 * 0.5) * math.log(2), rel=1e-6)


def test_label_dropout_nulls_both_halves_and_masks_only_the_nulled_fakes():
    real, fake = torch.arange(10).repeat(1000), torch.arange(10).repeat(1000).flip(0)
    real_out, fake_out, conditional = ddo_labels(real, fake, 10, uncond_ratio=0.1,
                                                 generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert (real_out == 10).float().mean().item() == pytest.approx(0.1, abs=0.015)
    assert (fake_out == 10).float().mean().item() == pytest.approx(0.1, abs=0.015)
    assert (conditional == (fake_out != 10)).all()
    assert (real_out[real_out != 10] == real[real_out != 10]).all()
    assert not torch.equal(real_out == 10, fake_out == 10), "the halves are nulled independently"
    same, _, all_conditional = ddo_labels(real, fake, 10)
    assert torch.equal(same, real) and all_conditional.all()


class ToyCategorical(torch.nn.Module):
    """p(x|c) = softmax(W[c]) over V outcomes: a one-token 'sequence model' with exact log-probs."""

    def __init__(self, weights: torch.Tensor):
        super().__init__()
        self.weights = torch.nn.Parameter(weights.clone())

    def log_prob(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.weights[c].log_softmax(-1).gather(-1, x[:, None]).squeeze(-1)


def test_a_few_steps_raise_the_real_log_ratio_and_lower_the_fake_one():
    torch.manual_seed(0)
    classes, outcomes = 3, 6
    data = torch.randn(classes, outcomes) * 2  # p_data(x|c) = softmax(data[c])
    reference = ToyCategorical(torch.randn(classes, outcomes)).requires_grad_(False)
    policy = ToyCategorical(reference.weights.detach())
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.5)
    generator = torch.Generator().manual_seed(1)
    c = torch.arange(classes).repeat(200)
    x_real = torch.multinomial(data[c].softmax(-1), 1, generator=generator).squeeze(-1)
    x_fake = torch.multinomial(reference.weights[c].softmax(-1), 1, generator=generator).squeeze(-1)
    for _ in range(5):
        loss, monitors = ddo_loss(
            policy.log_prob(x_real, c), reference.log_prob(x_real, c),
            policy.log_prob(x_fake, c), reference.log_prob(x_fake, c), alpha=1.0, beta=1.0,
        )  # fmt: skip
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        delta_real = (policy.log_prob(x_real, c) - reference.log_prob(x_real, c)).mean()
        delta_fake = (policy.log_prob(x_fake, c) - reference.log_prob(x_fake, c)).mean()
    assert delta_real > 0 > delta_fake
    assert monitors["sigmoid_real"] > 0.5 > monitors["sigmoid_fake"] and monitors["accuracy"] > 0.5
    assert reference.weights.grad is None


def test_the_exact_optimum_at_alpha_beta_one_is_the_data_distribution():
    """Minimising the expected loss (sums over all outcomes, no sampling) moves p_θ from the
    reference onto p_data: the implicit discriminator σ(Δ) = p_data / (p_data + p_ref) is optimal."""
    torch.manual_seed(0)
    p_data = torch.randn(5).softmax(-1)
    ref_logits = torch.randn(5)
    logits = torch.nn.Parameter(ref_logits.clone())
    optimizer = torch.optim.Adam([logits], lr=0.05)
    log_ref = ref_logits.log_softmax(-1)
    for _ in range(2000):
        delta = logits.log_softmax(-1) - log_ref
        loss = (p_data * torch.nn.functional.softplus(-delta)).sum() + (
            log_ref.exp() * torch.nn.functional.softplus(delta)
        ).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.allclose(logits.softmax(-1), p_data, atol=1e-3)


class FixedSampler(torch.nn.Module):
    """A 'reference' whose generate draws uniform tokens from the generator it is given."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.calls = []

    def generate(self, labels_B, *, cfg_scale, temperature, top_k, top_p, generator):
        self.calls.append({"cfg_scale": cfg_scale, "temperature": temperature, "top_k": top_k, "top_p": top_p})
        return torch.randint(0, 8, (len(labels_B), 3), generator=generator)


def test_fakes_are_plain_samples_seeded_per_batch():
    sampler = FixedSampler()
    labels = torch.arange(10)
    first = sample_fakes(sampler, labels, seed=4, batch_size=4)
    assert first.shape == (10, 3)
    assert all(call == {"cfg_scale": 1.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0} for call in sampler.calls)
    assert torch.equal(first, sample_fakes(sampler, labels, seed=4, batch_size=4))
    assert not torch.equal(first, sample_fakes(sampler, labels, seed=5, batch_size=4))
    # batch b's draws do not depend on the batches after it
    assert torch.equal(first[:8], sample_fakes(sampler, labels[:8], seed=4, batch_size=4))


class PixelTokenizer(torch.nn.Module):
    """Token t of ``codes`` <-> a 1x1 gray pixel of brightness t/(codes−1) in [-1, 1] space."""

    def __init__(self, codes: int):
        super().__init__()
        self.top = codes - 1

    def decode(self, tokens_BL):
        return (tokens_BL.double() / self.top * 2 - 1)[:, None, :, None]

    def encode(self, images_BCHW):
        return ((images_BCHW[:, 0, :, 0].double() + 1) / 2 * self.top).round().long()


def test_round_trip_goes_through_8_bit_pixels():
    tokens = torch.arange(1024)[None]
    # 8 codes survive 8-bit pixels; 1024 cannot: each comes back as the code of its 8-bit pixel
    assert torch.equal(tokenizer_round_trip(PixelTokenizer(8), tokens % 8), tokens % 8)
    back = tokenizer_round_trip(PixelTokenizer(1024), tokens)
    pixel = (tokens.double() / 1023 * 255).round()
    assert torch.equal(back, (pixel / 255 * 1023).round().long())
    assert (back != tokens).float().mean() > 0.5
    sampler = FixedSampler()
    plain = sample_fakes(sampler, torch.arange(4), seed=0)
    assert torch.equal(sample_fakes(sampler, torch.arange(4), seed=0, tokenizer=PixelTokenizer(8)), plain)
