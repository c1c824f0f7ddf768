"""Codebook usage EMA and dead-code restart, for both quantizers."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.codebook import CodebookUsage
from models.residual_quantizer import MultiScaleResidualQuantizer
from models.vq import CosineVectorQuantizer, VQConfig


def make_usage(num_scales=1, codebook_size=8, dim=2, buffer=16, restart_every=1):
    return CodebookUsage(
        num_scales=num_scales,
        codebook_size=codebook_size,
        dim=dim,
        momentum=0.99,
        dead_code_threshold=0.1,
        restart_every=restart_every,
        candidate_buffer_size=buffer,
    )


def test_ema_starts_as_the_running_mean_and_threshold_is_relative_to_uniform():
    usage = make_usage(codebook_size=4)
    usage.observe(torch.tensor([[8.0, 0.0, 4.0, 0.0]]), [torch.zeros(0, 2)])
    assert torch.equal(usage.hits_ema_KV, torch.tensor([[8.0, 0.0, 4.0, 0.0]]))
    usage.observe(torch.tensor([[0.0, 0.2, 4.0, 0.0]]), [torch.zeros(0, 2)])
    assert torch.allclose(usage.hits_ema_KV, torch.tensor([[4.0, 0.1, 4.0, 0.0]]))
    # Uniform share = 8.1 / 4 hits; code 1 (0.1) is below 10% of it, so 2 of 4 codes are used.
    assert usage.used_KV().tolist() == [[True, False, True, False]]
    assert usage.usage() == (0.5, [0.5])


def test_candidate_ring_buffer_keeps_the_latest_vectors():
    usage = make_usage(buffer=4)
    counts = torch.zeros(1, 8)
    usage.observe(counts, [torch.arange(6.0).repeat(2, 1).T])  # rows 0..5
    usage.observe(counts, [torch.tensor([[6.0, 6.0]])])
    kept = sorted(usage.candidates_KND[0, :, 0].tolist())
    assert kept == [3.0, 4.0, 5.0, 6.0]
    assert int(usage.filled_K[0]) == 4


def vq_quantizer(codebook_size=8, dim=2, restart_every=1, buffer=64):
    torch.manual_seed(0)
    return CosineVectorQuantizer(
        VQConfig(
            codebook_size=codebook_size, codebook_dim=dim, restart_every=restart_every, candidate_buffer_size=buffer
        )
    )


def test_restart_reseeds_exactly_the_dead_codes_from_candidates():
    quantizer = vq_quantizer()
    before = quantizer.codebook.weight.detach().clone()
    counts_V = torch.tensor([5.0, 0, 3, 0, 0, 2, 1, 0])
    candidates = [torch.tensor([[10.0, 0.0], [11.0, 0.0], [12.0, 0.0], [13.0, 0.0]])]
    restarted = quantizer.update_codebook(counts_V, candidates, torch.Generator().manual_seed(0))
    assert restarted.tolist() == [1, 3, 4, 7]
    after = quantizer.codebook.weight.detach()
    alive = torch.tensor([0, 2, 5, 6])
    assert torch.equal(after[alive], before[alive])
    # Each re-seeded code is a distinct candidate, and its EMA starts again from zero.
    reseeded = sorted(after[restarted, 0].tolist())
    assert reseeded == [10.0, 11.0, 12.0, 13.0]
    assert torch.all(quantizer.usage.hits_ema_KV[0, restarted] == 0)


def test_restart_is_deterministic_given_the_generator():
    codebooks = []
    for seed in (0, 0, 1):
        quantizer = vq_quantizer(codebook_size=16)
        counts_V = torch.zeros(16)
        counts_V[:2] = 10.0
        candidates = [torch.randn(40, 2, generator=torch.Generator().manual_seed(9))]
        quantizer.update_codebook(counts_V, candidates, torch.Generator().manual_seed(seed))
        codebooks.append(quantizer.codebook.weight.detach().clone())
    assert torch.equal(codebooks[0], codebooks[1])
    assert not torch.equal(codebooks[0], codebooks[2])


def test_restart_waits_for_its_interval():
    quantizer = vq_quantizer(restart_every=3)
    generator = torch.Generator().manual_seed(0)
    counts_V = torch.tensor([8.0, 0, 0, 0, 0, 0, 0, 0])
    candidates = [torch.randn(8, 2)]
    assert len(quantizer.update_codebook(counts_V, candidates, generator)) == 0
    assert len(quantizer.update_codebook(counts_V, candidates, generator)) == 0
    assert len(quantizer.update_codebook(counts_V, candidates, generator)) == 7


def test_a_due_restart_is_skipped_when_not_allowed_but_usage_still_updates():
    # The trainer forbids restarts in its last window: no code may end training re-seeded but untrained.
    quantizer = msvq_quantizer(restart_every=1, collapsed=True)
    before = quantizer.codebook.weight.detach().clone()
    f = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    _, out = quantizer(f)
    restarted = quantizer.update_codebook(out.counts, out.candidates, torch.Generator().manual_seed(0), False)
    assert len(restarted) == 0 and torch.equal(quantizer.codebook.weight, before)
    assert int(quantizer.usage.updates) == 1 and quantizer.usage.hits_ema_KV[:, 0].sum() > 0
    assert len(quantizer.update_codebook(out.counts, out.candidates, torch.Generator().manual_seed(0))) == 11


def test_restarts_bring_vq_usage_to_all_codes_on_a_toy_problem():
    quantizer = vq_quantizer(codebook_size=16, dim=4, restart_every=5, buffer=256)
    data = F.normalize(torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    data[:, 0] = data[:, 0].abs()  # every latent points into the x0 > 0 half-space
    with torch.no_grad():  # collapse: code 0 along +x0, the other 15 near -x0, far from all data
        weight = quantizer.codebook.weight
        weight.copy_(-torch.eye(4)[0] + 0.01 * torch.randn_like(weight))
        weight[0] = torch.eye(4)[0]
    generator = torch.Generator().manual_seed(0)
    assert quantizer(data)[1].tokens_BL.unique().tolist() == [0]
    for _ in range(40):
        _, out = quantizer(data)
        quantizer.update_codebook(out.counts, out.candidates, generator)
    assert quantizer.usage.usage()[0] == 1.0
    assert len(quantizer(data)[1].tokens_BL.unique()) == 16


def msvq_quantizer(restart_every=1, codebook_size=12, collapsed=False, per_scale=False, **overrides):
    torch.manual_seed(0)
    settings = {
        "codebook_size": codebook_size,
        "dim": 2,
        "scales": (1, 2, 4),
        "commitment_weight": 0.25,
        "quant_resi": 0.5,
        "share_quant_resi": 0,
        "usage_momentum": 0.99,
        "dead_code_threshold": 0.1,
        "restart_every": restart_every,
        "candidate_buffer_size": 32,
        "scale_normalization": False,
        "normalization_momentum": 0.99,
        "restart_per_scale": per_scale,
        "restart_max_total_share": 1.0,
    }
    quantizer = MultiScaleResidualQuantizer(**{**settings, **overrides})
    if collapsed:  # code 0 at the origin, the others far from any residual: only 0 is ever hit
        with torch.no_grad():
            weight = quantizer.codebook.weight
            weight.copy_(100.0 + torch.randn_like(weight))
            weight[0] = 0.0
    return quantizer


def test_msvq_keeps_codes_used_at_any_scale_and_deals_dead_ones_to_every_scale():
    quantizer = msvq_quantizer()
    before = quantizer.codebook.weight.detach().clone()
    counts_KV = torch.zeros(3, 12)
    counts_KV[0, 0] = 2.0  # code 0 only at 1x1
    counts_KV[2, 1] = 30.0  # code 1 only at 4x4
    counts_KV[1, 2] = 8.0  # code 2 only at 2x2
    # Scale k's candidates all equal 100·(k + 1), so a re-seeded code tells where it came from.
    candidates = [torch.full((n, 2), 100.0 * (k + 1)) for k, n in enumerate((2, 8, 32))]
    restarted = quantizer.update_codebook(counts_KV, candidates, torch.Generator().manual_seed(0))
    assert restarted.tolist() == list(range(3, 12))
    after = quantizer.codebook.weight.detach()
    assert torch.equal(after[:3], before[:3])
    # Round-robin over scales: dead codes 3, 6, 9 from 1x1; 4, 7, 10 from 2x2; 5, 8, 11 from 4x4.
    assert after[3:, 0].tolist() == [100.0, 200.0, 300.0] * 3


def test_msvq_restart_draws_from_a_memory_of_earlier_batches():
    quantizer = msvq_quantizer(restart_every=4, codebook_size=24, collapsed=True)
    generator = torch.Generator().manual_seed(0)
    seen_at_1x1 = []
    for step in range(4):
        f = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(step))
        _, out = quantizer(f)
        seen_at_1x1.append(out.candidates[0])
        restarted = quantizer.update_codebook(out.counts, out.candidates, generator)
    # 23 dead codes, every third from 1x1: the 1x1 scale saw only 2 vectors per batch, and its
    # 8 re-seeded codes are exactly the 8 vectors it saw over the last 4 batches.
    assert restarted.tolist() == list(range(1, 24))
    from_1x1 = quantizer.codebook.weight.detach()[restarted[::3]]
    seen = torch.cat(seen_at_1x1)
    assert sorted(map(tuple, from_1x1.tolist())) == sorted(map(tuple, seen.tolist()))


def test_msvq_restarts_bring_overall_usage_to_all_codes_on_a_toy_problem():
    quantizer = msvq_quantizer(restart_every=5, codebook_size=16, collapsed=True)
    f = torch.randn(8, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(0)
    first_usage = None
    for _ in range(60):
        _, out = quantizer(f)
        quantizer.update_codebook(out.counts, out.candidates, generator)
        first_usage = first_usage or quantizer.usage.usage()
    overall, per_scale = quantizer.usage.usage()
    assert first_usage[0] == 1 / 16
    assert overall == 1.0
    assert per_scale[0] > first_usage[1][0]  # the 1x1 scale uses more than its collapsed code


def test_per_scale_restart_takes_codes_unused_at_a_scale_but_not_busy_ones():
    quantizer = msvq_quantizer(codebook_size=8, per_scale=True)
    before = quantizer.codebook.weight.detach().clone()
    counts_KV = torch.zeros(3, 8)
    counts_KV[0, 0] = 2.0  # 1x1 collapsed onto code 0 (uniform share 0.25 hits)
    counts_KV[2] = torch.tensor([10.0, 10, 10, 10, 10, 1, 1, 1])  # 4x4 keeps codes 0..7 alive
    counts_KV[1, 1] = 8.0  # 2x2 collapsed onto code 1 (uniform share 1 hit)
    candidates = [torch.full((n, 2), 100.0 * (k + 1)) for k, n in enumerate((2, 8, 32))]
    # The dead-everywhere rule finds nothing: every code is used at 4x4.
    dead_rule = msvq_quantizer(codebook_size=8)
    assert dead_rule.update_codebook(counts_KV, candidates, torch.Generator().manual_seed(0)).numel() == 0
    restarted = quantizer.update_codebook(counts_KV, candidates, torch.Generator().manual_seed(0))
    # 4x4's uniform share is 53 / 8 hits: codes 5..7 (0.15 shares) do under one share in all;
    # codes 2..4 (1.5 shares each) are busy at 4x4 and kept. Coarse scales pick first, so 1x1
    # takes all three.
    assert restarted.tolist() == [5, 6, 7]
    after = quantizer.codebook.weight.detach()
    assert torch.equal(after[:5], before[:5])
    assert after[5:, 0].tolist() == [100.0] * 3
    assert torch.all(quantizer.usage.hits_ema_KV[:, restarted] == 0)


def collapsed_coarse_scale(per_scale: bool) -> tuple[MultiScaleResidualQuantizer, torch.Tensor]:
    """1x1 vectors sit near (6, 0), far from every code but code 0; the finer residuals
    spread over all 16 codes, so every code is alive at 4x4 and none is dead everywhere."""
    quantizer = msvq_quantizer(restart_every=5, codebook_size=16, per_scale=per_scale, quant_resi=0.0)
    generator = torch.Generator().manual_seed(3)
    f = torch.randn(16, 2, 4, 4, generator=generator)
    f = f + torch.tensor([6.0, 0.0]).view(1, 2, 1, 1) + 0.5 * torch.randn(16, 2, 1, 1, generator=generator)
    with torch.no_grad():
        weight = quantizer.codebook.weight
        weight.copy_(torch.randn(16, 2, generator=generator))
        weight[0] = torch.tensor([6.0, 0.0])
    return quantizer, f


def test_per_scale_restart_revives_a_collapsed_coarse_scale():
    results = {}
    for per_scale in (False, True):
        quantizer, f = collapsed_coarse_scale(per_scale)
        assert quantizer(f)[1].tokens_BL[:, 0].unique().tolist() == [0]
        generator = torch.Generator().manual_seed(0)
        for _ in range(60):
            _, out = quantizer(f)
            quantizer.update_codebook(out.counts, out.candidates, generator)
        _, out = quantizer(f)
        results[per_scale] = (quantizer.usage.usage(), len(out.tokens_BL[:, 0].unique()))
    (overall, per_scale_usage), coarse_codes = results[False]
    assert coarse_codes == 1 and per_scale_usage[0] == 1 / 16  # the old rule leaves 1x1 collapsed
    (overall, per_scale_usage), coarse_codes = results[True]
    assert coarse_codes >= 4 and per_scale_usage[0] >= 4 / 16
    assert overall == 1.0 and per_scale_usage[2] >= 0.75  # not bought by emptying the 4x4 scale


def test_data_usage_counts_tokens_with_the_ema_rule_per_scale():
    from models.msvq import MSVQConfig, MSVQTokenizer

    tokenizer = MSVQTokenizer(MSVQConfig(codebook_size=16, scales=(1, 2, 3, 4)))
    generator = torch.Generator().manual_seed(0)
    per_scale = [
        torch.zeros(40, 1, dtype=torch.int64),  # 1x1 collapsed onto code 0
        torch.arange(16).repeat(10)[:, None].reshape(40, 4),  # 2x2: every code 10 times
        torch.randint(0, 8, (40, 9), generator=generator),  # 3x3: codes 0..7 only
        torch.arange(16).repeat(40)[:640].reshape(40, 16),  # 4x4: uniform
    ]
    usage = tokenizer.data_usage(torch.cat(per_scale, dim=1))
    assert usage == {"overall": 1.0, "1x1": 1 / 16, "2x2": 1.0, "3x3": 0.5, "4x4": 1.0}
    # The same rule as the training EMA: one update of these counts gives the same usage.
    counts_KV = torch.stack([torch.bincount(t.reshape(-1), minlength=16) for t in per_scale]).float()
    tokenizer.quantizer.usage.observe(counts_KV, [torch.zeros(0, 16)] * 4)
    assert tokenizer.codebook_usage() == usage
    # Hit once among 320 tokens is 0.05 of a uniform share (20 hits): below the 0.1 threshold.
    coarse_B1 = torch.cat([torch.zeros(305, dtype=torch.int64), torch.arange(1, 16)])[:, None]
    rare = torch.cat([coarse_B1, torch.zeros(320, 29, dtype=torch.int64)], dim=1)
    assert tokenizer.data_usage(rare)["1x1"] == 1 / 16
    assert tokenizer.data_usage(rare[160:])["1x1"] == 1.0  # once among 160: exactly 0.1 shares
