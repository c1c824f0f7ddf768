"""Distilled Decoding (DD1; Liu et al., ICLR'25): the per-token flow-matching map noise -> tokens.

Sampling one token from a categorical ``p`` over codewords ``c_1..c_V`` (R^D) can be written as a
deterministic ODE that carries Gaussian noise in the codebook-embedding space onto the mixture of
Diracs ``Σ_k p_k δ(c_k)``. With the rectified-flow path ``x_t = (1 − t)·x_0 + t·ε`` (t = 1 noise,
t = 0 data) the posterior over codewords, the denoised mean and the marginal velocity are closed
form:

    w_k(x, t) = softmax_k( log p_k − ‖x − (1 − t)·c_k‖² / (2t²) )
    x̂_0(x, t) = Σ_k w_k c_k
    dx/dt     = (x − x̂_0(x, t)) / t

Integrated from ``x = ε`` at t = 1 down to ``t_min > 0`` (the 1/t and 1/t² terms forbid t = 0),
the point has collapsed onto one codeword and the token is ``argmax_k w_k``. The ODE transports
marginals, so ``ε ~ N(0, I)`` gives tokens distributed as ``p`` (up to the discretisation), and the
same ε always gives the same token. An Euler step of this ODE from t to t' is
``x' = x̂_0 + (t'/t)·(x − x̂_0)``, which is also the DDIM step of this path: exact whenever the
posterior does not move within the step, so a few dozen steps on a geometric grid suffice.

Replacing every sampling step of an AR teacher by this map (``map_teacher``: one map per token for
GPT, all positions of a scale in parallel with that scale's probabilities for VAR) turns generation
into a deterministic function (label, ε_1..ε_L) -> (q_1..q_L) whose output distribution is the
teacher's, including its guidance. The distillation stages learn that function (models/dd_student.py).

Codebook-embedding space (``code_space``): GPT's cosine VQ codebook L2-normalised (what its decoder
looks up, as in LlamaGen); VAR's Euclidean codebook divided by its RMS codeword norm, so that in
both families codewords have norm ≈ 1 against noise of norm ≈ √D. ``decode_vectors`` maps vectors of
that space (codewords or a student's off-codebook outputs) back through the tokenizer's decoder.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from einops import rearrange
from torch import nn

from models.sampling import GuidanceSchedule, TokenDraw, filter_logits

Spacing = Literal["geometric", "linear"]


# -- the map ------------------------------------------------------------------------------------


def ode_grid(steps: int, t_min: float, spacing: Spacing = "geometric") -> torch.Tensor:
    """Times 1 = t_0 > t_1 > … > t_steps = t_min, fp64 (steps + 1,). ``geometric`` spaces them
    evenly in log t (dense near 0, where the posterior sharpens); ``linear`` evenly in t."""
    if steps < 1:
        raise ValueError(f"the ODE needs at least 1 step, got {steps}")
    if not 0.0 < t_min < 1.0:
        raise ValueError(f"t_min must be in (0, 1), got {t_min}")
    if spacing == "geometric":
        return torch.logspace(0.0, math.log10(t_min), steps + 1, dtype=torch.float64)
    if spacing == "linear":
        return torch.linspace(1.0, t_min, steps + 1, dtype=torch.float64)
    raise ValueError(f"unknown ODE spacing {spacing!r}: expected 'geometric' or 'linear'")


def posterior_logits(x_ND: torch.Tensor, t: float, log_probs_NV: torch.Tensor, codebook_VD: torch.Tensor):
    """Unnormalised log w_k(x, t), fp32 (N, V): ``log p_k − ‖x − (1−t)c_k‖² / (2t²)`` without the
    ``‖x‖²`` term (the same for every k, so the softmax ignores it)."""
    a = 1.0 - t
    cross_NV = x_ND @ codebook_VD.T
    norms_V = codebook_VD.square().sum(dim=1)
    return log_probs_NV + (a * cross_NV - 0.5 * a * a * norms_V) / (t * t)


def flow_map(
    noise_ND: torch.Tensor, log_probs_NV: torch.Tensor, codebook_VD: torch.Tensor, grid: torch.Tensor
) -> torch.Tensor:
    """Tokens (N,) int64: each row's noise carried by the flow-matching ODE onto the categorical
    ``exp(log_probs_NV)`` over the codewords ``codebook_VD``, in fp32, along ``grid`` (``ode_grid``).
    Rows of ``log_probs_NV`` may hold -inf (filtered tokens: never chosen)."""
    x_ND = noise_ND.float()
    log_probs_NV = log_probs_NV.float()
    codebook_VD = codebook_VD.float()
    times = grid.tolist()
    for t, t_next in zip(times[:-1], times[1:], strict=True):
        weights_NV = posterior_logits(x_ND, t, log_probs_NV, codebook_VD).softmax(dim=-1)  # log-sum-exp inside
        denoised_ND = weights_NV @ codebook_VD
        x_ND = denoised_ND + (t_next / t) * (x_ND - denoised_ND)
    return posterior_logits(x_ND, times[-1], log_probs_NV, codebook_VD).argmax(dim=-1)


# -- the teacher through the map ----------------------------------------------------------------


def tokens_per_step(model: nn.Module) -> list[int]:
    """Positions one sampling step of ``model`` fixes: 1 per token (GPT), s_k² per scale (VAR)."""
    scales = getattr(model.config, "scales", None)
    return [side * side for side in scales] if scales is not None else [1] * model.config.seq_len


def flow_draw(
    noise_BLD: torch.Tensor,
    codebook_VD: torch.Tensor,
    grid: torch.Tensor,
    step_sizes: list[int],
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    statistics: dict[str, torch.Tensor] | None = None,
) -> TokenDraw:
    """A ``draw(step, logits)`` for a model's ``generate``: step s maps the noise of its positions
    (a slice of ``noise_BLD``) through ``flow_map`` with the step's filtered, guided probabilities.

    ``statistics`` (optional) accumulates, per row, the teacher's entropy of each step's
    distribution (``entropy_B``) and the negative log-probability of the chosen tokens
    (``nll_B``): their means agree when the mapped tokens follow the teacher."""
    starts = [0]
    for size in step_sizes:
        starts.append(starts[-1] + size)
    if starts[-1] != noise_BLD.shape[1]:
        raise ValueError(f"noise has {noise_BLD.shape[1]} positions, the model samples {starts[-1]}")

    def draw(step: int, logits: torch.Tensor) -> torch.Tensor:
        B, V = logits.shape[0], logits.shape[-1]
        logits_BlV = logits.reshape(B, -1, V)
        log_probs_BlV = filter_logits(logits_BlV, temperature=temperature, top_k=top_k, top_p=top_p).log_softmax(-1)
        noise_BlD = noise_BLD[:, starts[step] : starts[step + 1]]
        tokens_N = flow_map(noise_BlD.reshape(-1, noise_BlD.shape[-1]), log_probs_BlV.reshape(-1, V), codebook_VD, grid)
        tokens_Bl = tokens_N.view(B, -1)
        if statistics is not None:
            probs_BlV = log_probs_BlV.exp()
            entropy_Bl = -(probs_BlV * log_probs_BlV.nan_to_num(neginf=0.0)).sum(-1)
            nll_Bl = -log_probs_BlV.gather(-1, tokens_Bl[..., None]).squeeze(-1)
            statistics["entropy_B"] = statistics.get("entropy_B", 0) + entropy_Bl.sum(1)
            statistics["nll_B"] = statistics.get("nll_B", 0) + nll_Bl.sum(1)
        return tokens_Bl.reshape(logits.shape[:-1])

    return draw


@torch.no_grad()
def map_teacher(
    model: nn.Module,
    labels_B: torch.Tensor,
    noise_BLD: torch.Tensor,
    codebook_VD: torch.Tensor,
    grid: torch.Tensor,
    *,
    cfg_scale: GuidanceSchedule = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    statistics: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The teacher's deterministic (label, noise) -> tokens_BL: its KV-cached ``generate`` with
    every draw replaced by the flow-matching map (guidance ``cfg_scale`` as in models/sampling.py)."""
    draw = flow_draw(noise_BLD, codebook_VD, grid, tokens_per_step(model), temperature=temperature,
                     top_k=top_k, top_p=top_p, statistics=statistics)  # fmt: skip
    return model.generate(labels_B, cfg_scale=cfg_scale, draw=draw)


# -- the codebook-embedding space ---------------------------------------------------------------


@torch.no_grad()
def code_space(tokenizer: nn.Module) -> tuple[torch.Tensor, float]:
    """(codebook_VD fp32 in the map's space, factor from that space back to the tokenizer's code
    space). ``vq``: the L2-normalised codebook, factor 1; ``msvq``: the codebook over its RMS
    codeword norm, factor = that norm."""
    if tokenizer.kind == "vq":
        return tokenizer.quantizer.normalized_codebook_VD().float().clone(), 1.0
    if tokenizer.kind == "msvq":
        codebook_VD = tokenizer.quantizer.codebook.weight.float()
        rms = float(codebook_VD.square().sum(dim=1).mean().sqrt().clamp_min(1e-12))
        return codebook_VD / rms, rms
    raise ValueError(f"unknown tokenizer kind {tokenizer.kind!r}")


@torch.no_grad()
def decode_vectors(tokenizer: nn.Module, vectors_BLD: torch.Tensor, factor: float) -> torch.Tensor:
    """Images in [-1, 1] (B, C, H, W) from vectors of the map's space at every position, codewords
    or not (they are decoded unquantised, as DD decodes its continuous outputs)."""
    codes_BLD = vectors_BLD.float() * factor
    if tokenizer.kind == "vq":
        height, width = tokenizer.token_layout["grid"]
        z_BDhw = rearrange(codes_BLD, "b (h w) d -> b d h w", h=height, w=width)
        return tokenizer.decode_latent(z_BDhw).clamp(-1, 1)
    return tokenizer.decode_latent(tokenizer.quantizer.codes_to_f_hat(codes_BLD)).clamp(-1, 1)


def nearest_codewords(vectors_ND: torch.Tensor, codebook_VD: torch.Tensor) -> torch.Tensor:
    """Index of the Euclidean-nearest codeword of each row (N,) int64."""
    distance_NV = -2 * vectors_ND.float() @ codebook_VD.T + codebook_VD.square().sum(dim=1)
    return distance_NV.argmin(dim=-1)


def chi_square_statistic(counts_V: torch.Tensor, probs_V: torch.Tensor) -> float:
    """Pearson's χ² of observed ``counts_V`` against expected ``probs_V·Σcounts`` (bins with zero
    expectation must have zero counts)."""
    expected_V = probs_V.double() * counts_V.sum()
    keep = expected_V > 0
    if bool((counts_V[~keep] > 0).any()):
        return float("inf")
    return float(((counts_V[keep] - expected_V[keep]) ** 2 / expected_V[keep]).sum())
