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


def msvq_quantizer(restart_every=1, codebook_size=12, collapsed=False):
    torch.manual_seed(0)
    quantizer = MultiScaleResidualQuantizer(
        codebook_size=codebook_size,
        dim=2,
        scales=(1, 2, 4),
        commitment_weight=0.25,
        quant_resi=0.5,
        share_quant_resi=0,
        usage_momentum=0.99,
        dead_code_threshold=0.1,
        restart_every=restart_every,
        candidate_buffer_size=32,
    )
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
