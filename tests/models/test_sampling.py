import math

import pytest
import torch

from models.sampling import (
    classifier_free_guidance,
    filter_logits,
    guidance_schedule,
    linear_guidance_ramp,
    sample_tokens,
    top_k_filter,
    top_p_filter,
)


def random_logits(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# -- guidance ----------------------------------------------------------------------------------


def test_guidance_combines_as_u_plus_scale_times_c_minus_u():
    cond, uncond = random_logits(4, 10, seed=1), random_logits(4, 10, seed=2)
    for scale in (0.0, 0.5, 2.0, 4.0):
        expected = uncond + scale * (cond - uncond)
        torch.testing.assert_close(classifier_free_guidance(cond, uncond, scale), expected)
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 0.0), uncond)


def test_guidance_scale_one_is_exactly_the_conditional_logits():
    cond, uncond = random_logits(4, 10, seed=1), random_logits(4, 10, seed=2)
    assert torch.equal(classifier_free_guidance(cond, uncond, 1.0), cond)


def test_guidance_schedule_accepts_constant_sequence_tensor_and_callable():
    assert guidance_schedule(2.0, 3) == [2.0, 2.0, 2.0]
    assert guidance_schedule([1.0, 1.5, 2.0], 3) == [1.0, 1.5, 2.0]
    assert guidance_schedule(torch.tensor([1.0, 3.0]), 2) == [1.0, 3.0]
    assert guidance_schedule(lambda step: 1.0 + step, 3) == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="2 scales for 3 steps"):
        guidance_schedule([1.0, 2.0], 3)


def test_linear_ramp_goes_from_guidance_free_to_the_final_scale():
    ramp = linear_guidance_ramp(3.0, 5)
    assert ramp[0] == 1.0 and ramp[-1] == 3.0
    assert ramp == sorted(ramp) and len(ramp) == 5
    assert linear_guidance_ramp(2.0, 1) == [2.0]


# -- filters -----------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 7])
def test_top_k_keeps_exactly_the_k_largest(k):
    logits = random_logits(5, 20)
    filtered = top_k_filter(logits, k)
    kept = torch.isfinite(filtered)
    assert (kept.sum(dim=-1) == k).all()
    # the kept ones are the k largest, unchanged
    threshold = logits.topk(k, dim=-1).values[:, -1:]
    assert torch.equal(kept, logits >= threshold)
    assert torch.equal(filtered[kept], logits[kept])


def test_top_k_keeps_exactly_k_even_with_ties():
    logits = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0]])
    assert torch.isfinite(top_k_filter(logits, 2)).sum() == 2


def test_top_k_off_values_leave_logits_unchanged():
    logits = random_logits(3, 8)
    assert torch.equal(top_k_filter(logits, 0), logits)
    assert torch.equal(top_k_filter(logits, 8), logits)


def test_top_p_keeps_the_smallest_set_with_enough_mass():
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15]])
    logits = probs.log()
    for p, expected_kept in [(0.5, [0]), (0.6, [0, 2]), (0.8, [0, 2]), (0.81, [0, 2, 3]), (0.99, [0, 1, 2, 3])]:
        kept = torch.isfinite(top_p_filter(logits, p))[0].nonzero().flatten().tolist()
        assert kept == expected_kept, p
        assert probs[0, kept].sum() >= p - 1e-6


def test_top_p_always_keeps_the_argmax_and_off_value_is_one():
    logits = random_logits(6, 30)
    filtered = top_p_filter(logits, 1e-6)
    assert torch.equal(torch.isfinite(filtered).sum(dim=-1), torch.ones(6, dtype=torch.long))
    assert torch.equal(filtered.argmax(dim=-1), logits.argmax(dim=-1))
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_top_p_property_on_random_rows():
    logits = random_logits(50, 40, seed=3) * 2
    for p in (0.3, 0.7, 0.95):
        kept = torch.isfinite(top_p_filter(logits, p))
        probs = logits.softmax(dim=-1)
        mass = (probs * kept).sum(dim=-1)
        assert (mass >= p - 1e-5).all()
        # minimal: dropping the least likely kept token falls below p
        smallest_kept = torch.where(kept, probs, torch.inf).min(dim=-1).values
        assert (mass - smallest_kept < p).all()


def test_temperature_scales_logits_before_filtering():
    logits = random_logits(2, 9)
    torch.testing.assert_close(filter_logits(logits, temperature=0.5), logits * 2)
    with pytest.raises(ValueError):
        filter_logits(logits, temperature=-1.0)


# -- drawing -----------------------------------------------------------------------------------


def test_greedy_and_top_k_one_pick_the_argmax():
    logits = random_logits(16, 50)
    assert torch.equal(sample_tokens(logits, temperature=0.0), logits.argmax(dim=-1))
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(sample_tokens(logits, top_k=1, generator=gen), logits.argmax(dim=-1))


def test_sampling_is_reproducible_with_a_generator_and_keeps_leading_shape():
    logits = random_logits(3, 4, 50)
    first = sample_tokens(logits, generator=torch.Generator().manual_seed(7))
    again = sample_tokens(logits, generator=torch.Generator().manual_seed(7))
    other = sample_tokens(logits, generator=torch.Generator().manual_seed(8))
    assert first.shape == (3, 4) and first.dtype == torch.long
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_samples_follow_the_filtered_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -5.0])
    draws = sample_tokens(logits.expand(20000, -1), top_k=3, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=5).float() / draws.numel()
    expected = torch.zeros(5)
    expected[:3] = logits[:3].softmax(dim=0)
    assert counts[3:].sum() == 0
    # binomial std at n=20000 is ≤ 0.0036: 4 sigma
    assert (counts - expected).abs().max() < 0.015, (counts, expected)
    assert math.isclose(counts.sum().item(), 1.0)
