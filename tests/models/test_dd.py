"""DD1's flow-matching map: tokens follow the categorical, determinism, the teacher through the map."""

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chi2

from models.dd import (
    chi_square_statistic,
    code_space,
    decode_vectors,
    flow_map,
    map_teacher,
    nearest_codewords,
    ode_grid,
    tokens_per_step,
)

TOY_PROBS = torch.tensor([0.4, 0.25, 0.2, 0.1, 0.05])


def toy_codebook(vocab: int = 5, dim: int = 4, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(vocab, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def noise(rows: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed))


def test_ode_grid_runs_from_one_down_to_t_min():
    for spacing in ("geometric", "linear"):
        grid = ode_grid(10, 0.01, spacing)
        assert grid.shape == (11,) and grid[0] == 1.0 and abs(float(grid[-1]) - 0.01) < 1e-12
        assert bool((grid[1:] < grid[:-1]).all())
    with pytest.raises(ValueError, match="t_min"):
        ode_grid(10, 0.0)
    with pytest.raises(ValueError, match="spacing"):
        ode_grid(10, 0.01, "cosine")


@pytest.mark.parametrize("seed", [1, 2])
def test_mapped_tokens_follow_the_categorical_chi_square(seed):
    """4,000 noise draws through the map: Pearson's χ² against the toy categorical stays below the
    0.999 quantile (4 degrees of freedom); a deliberately wrong categorical is rejected."""
    draws = 4000
    codebook = toy_codebook()
    log_probs = TOY_PROBS.log().expand(draws, -1)
    tokens = flow_map(noise(draws, 4, seed), log_probs, codebook, ode_grid(64, 0.01))
    counts = torch.bincount(tokens, minlength=5)
    critical = chi2.ppf(0.999, df=4)
    assert chi_square_statistic(counts, TOY_PROBS) < critical
    assert chi_square_statistic(counts, torch.full((5,), 0.2)) > critical


def test_filtered_codewords_are_never_chosen_and_tiny_grids_still_snap_to_codewords():
    draws = 2000
    probs = torch.tensor([0.5, 0.0, 0.3, 0.0, 0.2])
    tokens = flow_map(noise(draws, 4, 3), probs.log().expand(draws, -1), toy_codebook(), ode_grid(4, 0.05))
    counts = torch.bincount(tokens, minlength=5)
    assert counts[1] == 0 and counts[3] == 0 and counts.sum() == draws


def test_the_map_is_deterministic_and_depends_on_the_noise():
    codebook, log_probs = toy_codebook(), TOY_PROBS.log().expand(500, -1)
    grid = ode_grid(32, 0.01)
    first = flow_map(noise(500, 4, 7), log_probs, codebook, grid)
    assert torch.equal(first, flow_map(noise(500, 4, 7), log_probs, codebook, grid))
    assert not torch.equal(first, flow_map(noise(500, 4, 8), log_probs, codebook, grid))
    assert first.dtype == torch.int64 and first.shape == (500,)


def test_a_near_certain_categorical_maps_every_noise_to_its_mode():
    probs = torch.tensor([1e-6, 1.0 - 4e-6, 1e-6, 1e-6, 1e-6])
    tokens = flow_map(noise(300, 4, 0), probs.log().expand(300, -1), toy_codebook(), ode_grid(32, 0.01))
    assert bool((tokens == 1).all())


# -- the teacher through the map ----------------------------------------------------------------


def tiny_gpt():
    from models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=16, seq_len=9, num_classes=3, depth=1, width=32, heads=2, init_std=0.3))
    torch.nn.init.normal_(model.head.weight, std=0.3)  # a non-uniform teacher
    return model.eval()


def tiny_var():
    from models.residual_quantizer import MultiScaleResidualQuantizer
    from models.var import VAR, VARConfig

    torch.manual_seed(0)
    quantizer = MultiScaleResidualQuantizer(
        codebook_size=16, dim=4, scales=(1, 2, 3), commitment_weight=0.25, quant_resi=0.5, share_quant_resi=3,
        usage_momentum=0.99, dead_code_threshold=0.1, restart_every=0, candidate_buffer_size=16,
        scale_normalization=False, normalization_momentum=0.99, restart_per_scale=True, restart_max_total_share=1.0,
    )  # fmt: skip
    config = VARConfig(vocab_size=16, scales=(1, 2, 3), embed_dim=4, num_classes=3, depth=1, width=32, heads=2,
                       init_head=1.0, init_adaln_gamma=1.0, drop_path=0.0)  # fmt: skip
    return VAR(config, quantizer).eval()


@pytest.mark.parametrize("family", ["gpt", "var"])
def test_teacher_through_the_map_is_deterministic_and_follows_its_probabilities(family):
    model = tiny_gpt() if family == "gpt" else tiny_var()
    L = model.config.seq_len
    codebook = toy_codebook(16, 4, seed=1)
    labels = torch.arange(300) % 3
    eps = torch.randn(300, L, 4, generator=torch.Generator().manual_seed(0))
    statistics: dict = {}
    grid = ode_grid(48, 0.01)
    tokens = map_teacher(model, labels, eps, codebook, grid, cfg_scale=2.0, statistics=statistics)
    assert tokens.shape == (300, L) and tokens.dtype == torch.int64
    assert torch.equal(tokens, map_teacher(model, labels, eps, codebook, grid, cfg_scale=2.0))
    # E[−log p(q)] = H(p) when q ~ p: the mean NLL of the mapped tokens matches the mean entropy
    entropy, nll = float(statistics["entropy_B"].mean()), float(statistics["nll_B"].mean())
    assert abs(nll - entropy) < 0.05 * entropy, (nll, entropy)
    assert not torch.equal(tokens, map_teacher(model, labels, eps.roll(1, dims=0), codebook, grid, cfg_scale=2.0))


def test_var_maps_a_whole_scale_per_step_from_each_positions_own_noise():
    model = tiny_var()
    assert tokens_per_step(model) == [1, 4, 9] and tokens_per_step(tiny_gpt()) == [1] * 9
    codebook = toy_codebook(16, 4, seed=1)
    labels = torch.tensor([0, 1])
    eps = torch.randn(2, 14, 4, generator=torch.Generator().manual_seed(0))
    calls = []
    original = model.generate

    def counting_generate(*args, draw, **kwargs):
        def counted(step, logits):
            calls.append((step, tuple(logits.shape)))
            return draw(step, logits)

        return original(*args, draw=counted, **kwargs)

    model.generate = counting_generate
    before = map_teacher(model, labels, eps, codebook, ode_grid(32, 0.01))
    assert calls == [(0, (2, 1, 16)), (1, (2, 4, 16)), (2, (2, 9, 16))]
    changed = eps.clone()
    changed[:, 4] = torch.randn(2, 4, generator=torch.Generator().manual_seed(5)) * 3  # last position of scale 1
    after = map_teacher(model, labels, changed, codebook, ode_grid(32, 0.01))
    assert torch.equal(before[:, :4], after[:, :4]), "scale 0 and the other positions of scale 1 keep their tokens"


@pytest.mark.parametrize("kind", ["vq", "msvq"])
def test_code_space_decodes_codewords_exactly_like_the_tokens(kind):
    from helpers import TINY_TOKENIZERS

    from models.tokenizers import build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer(kind, {**TINY_TOKENIZERS[kind], "image_size": 8}).eval()
    with torch.no_grad():
        if kind == "msvq":
            tokenizer.quantizer.codebook.weight.normal_()
    codebook, factor = code_space(tokenizer)
    assert codebook.shape == (32, tokenizer.quantizer.codebook.weight.shape[1])
    assert abs(float(codebook.square().sum(1).mean()) - 1.0) < 1e-4
    tokens = torch.randint(0, 32, (3, tokenizer.seq_len), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(decode_vectors(tokenizer, codebook[tokens], factor), tokenizer.decode(tokens))
    assert torch.equal(nearest_codewords(codebook[tokens].flatten(0, 1) * 1.01, codebook), tokens.flatten())
