"""Multi-scale residual quantizer (VAR-style): one shared Euclidean codebook over a scale schedule.

Encoding f_BChw (h = w = the last scale's side): starting from f_rest = f and f_hat = 0, each
scale k area-downsamples f_rest to side s_k (the last scale uses f_rest as is), picks the nearest
codes, bicubic-upsamples their embeddings back to h×w, refines them with φ_k, adds the result to
f_hat and subtracts it from f_rest. Tokens are the scales' indices concatenated coarse -> fine,
each row-major: L = Σ s_k².

With ``scale_normalization`` each scale quantises its residual centred and scaled to unit RMS by
running per-scale statistics (μ_k, σ_k), and a code c contributes σ_k·c + μ_k: one shared codebook
then serves coarse area means and small fine residuals alike instead of splitting into
per-scale groups of codes. The statistics are EMAs updated in ``update_codebook`` (never in
``forward``), so every replica updates them identically and evaluation does not move them.

The next-scale transformer sees, at scale k+1, the reconstruction accumulated over scales 0..k
area-downsampled to s_{k+1} (``teacher_forcing_input`` for training, ``next_scale_input`` for
sampling); that is what VAR feeds it, not the previous tokens.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from models.codebook import CodebookUsage, QuantizerOutput, entropy_penalty, full_precision


class Phi(nn.Module):
    """φ(h) = (1 − r)·h + r·conv3x3(h): a residual refinement of upsampled codes."""

    def __init__(self, dim: int, ratio: float):
        super().__init__()
        self.ratio = ratio
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, h_BChw: torch.Tensor) -> torch.Tensor:
        return h_BChw * (1 - self.ratio) + self.conv(h_BChw) * self.ratio


def phi_for_scales(num_scales: int, num_phis: int) -> tuple[int, ...]:
    """Which φ each scale uses: the φ whose tick in (0, 1) is nearest to the scale's position.

    Ticks and positions follow VAR's PhiPartiallyShared (including its 1/(3K) margin for K=4),
    so a schedule maps scales to φ convs as VAR does.
    """
    margin = 1 / (3 * num_phis) if num_phis == 4 else 1 / (2 * num_phis)
    ticks = np.linspace(margin, 1 - margin, num_phis)
    positions = np.arange(num_scales) / max(num_scales - 1, 1)
    return tuple(int(np.argmin(np.abs(ticks - p))) for p in positions)


class MultiScaleResidualQuantizer(nn.Module):
    """f_BChw <-> multi-scale tokens; owns the codebook, the φ convs and usage statistics."""

    def __init__(
        self,
        *,
        codebook_size: int,
        dim: int,
        scales: tuple[int, ...],
        commitment_weight: float,
        quant_resi: float,
        share_quant_resi: int,
        usage_momentum: float,
        dead_code_threshold: float,
        restart_every: int,
        candidate_buffer_size: int,
        scale_normalization: bool,
        normalization_momentum: float,
        restart_per_scale: bool,
        restart_max_total_share: float,
        entropy_weight: float = 0.0,
        entropy_temperature: float = 1.0,
    ):
        super().__init__()
        self.scales = tuple(scales)
        self.commitment_weight = commitment_weight
        self.entropy_weight = entropy_weight
        self.entropy_temperature = entropy_temperature
        self.scale_normalization = scale_normalization
        self.normalization_momentum = normalization_momentum
        # 1. shared Euclidean codebook; small init so early residuals are not swamped
        self.codebook = nn.Embedding(codebook_size, dim)
        nn.init.uniform_(self.codebook.weight, -1 / codebook_size, 1 / codebook_size)
        # 2. φ refinements: share_quant_resi convs spread over the scales, 0 = one per scale
        num_phis = share_quant_resi or len(self.scales)
        self.phis = nn.ModuleList(Phi(dim, quant_resi) for _ in range(num_phis))
        self.phi_of_scale = phi_for_scales(len(self.scales), num_phis)
        # 3. usage EMA per scale and restart candidates
        self.usage = CodebookUsage(
            num_scales=len(self.scales),
            codebook_size=codebook_size,
            dim=dim,
            momentum=usage_momentum,
            dead_code_threshold=dead_code_threshold,
            restart_every=restart_every,
            candidate_buffer_size=candidate_buffer_size,
            per_scale=restart_per_scale,
            max_total_share=restart_max_total_share,
        )
        # 4. per-scale residual statistics: quantised vector = (residual − μ_k) / σ_k; identity
        #    until the first update (and for good without scale_normalization)
        self.register_buffer("center_KC", torch.zeros(len(self.scales), dim))
        self.register_buffer("spread_K", torch.ones(len(self.scales)))
        self.register_buffer("normalization_updates", torch.zeros((), dtype=torch.int64))

    # -- layout ---------------------------------------------------------------------------
    @property
    def codebook_size(self) -> int:
        return self.codebook.num_embeddings

    @property
    def embed_dim(self) -> int:
        return self.codebook.embedding_dim

    @property
    def latent_side(self) -> int:
        return self.scales[-1]

    @property
    def seq_len(self) -> int:
        return sum(side * side for side in self.scales)

    @property
    def first_scale_tokens(self) -> int:
        return self.scales[0] ** 2

    def split_scales(self, tokens_BL: torch.Tensor) -> list[torch.Tensor]:
        """tokens_BL -> per scale (B, s_k²), coarse to fine."""
        if tokens_BL.shape[1] != self.seq_len:
            raise ValueError(f"expected {self.seq_len} tokens per row, got {tokens_BL.shape[1]}")
        return list(tokens_BL.split([side * side for side in self.scales], dim=1))

    # -- shared steps ---------------------------------------------------------------------
    def nearest_codes(self, vectors_NC: torch.Tensor) -> torch.Tensor:
        """Index of the Euclidean-nearest code for each row."""
        codebook_VC = self.codebook.weight.detach().float()
        distance_NV = (
            vectors_NC.pow(2).sum(1, keepdim=True) + codebook_VC.pow(2).sum(1) - 2 * vectors_NC @ codebook_VC.T
        )
        return distance_NV.argmin(dim=1)

    def normalize(self, rest_NC: torch.Tensor, scale_index: int) -> torch.Tensor:
        """Scale k's residual vectors -> the space the codebook lives in."""
        return (rest_NC - self.center_KC[scale_index]) / self.spread_K[scale_index]

    def scale_contribution(self, tokens_B_l: torch.Tensor, scale_index: int) -> torch.Tensor:
        """Scale k's tokens -> φ_k(bicubic_up(σ_k·codes + μ_k)) at latent size, the term added
        to f_hat."""
        return self.code_contribution(self.codebook(tokens_B_l.reshape(len(tokens_B_l), -1)).float(), scale_index)

    def code_contribution(self, codes_BLC: torch.Tensor, scale_index: int) -> torch.Tensor:
        """``scale_contribution`` from scale k's code vectors (B, s_k², C) in the codebook's space,
        which need not be codewords (a distilled model's continuous outputs)."""
        side = self.scales[scale_index]
        codes_BLC = codes_BLC.float() * self.spread_K[scale_index] + self.center_KC[scale_index]
        codes_BChw = rearrange(codes_BLC, "b (h w) c -> b c h w", h=side, w=side)
        if scale_index != len(self.scales) - 1:
            codes_BChw = F.interpolate(codes_BChw, size=(self.latent_side, self.latent_side), mode="bicubic")
        return self.phis[self.phi_of_scale[scale_index]](codes_BChw)

    def empty_f_hat(self, batch_size: int) -> torch.Tensor:
        """The accumulated reconstruction before any scale: zeros (B, C, h, w), fp32."""
        weight = self.codebook.weight
        return weight.new_zeros(batch_size, self.embed_dim, self.latent_side, self.latent_side, dtype=torch.float32)

    # -- training (tokenizer) -------------------------------------------------------------
    def forward(self, f_BChw: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        """f -> (f_hat with VAR's straight-through gradient, losses and statistics)."""
        batch, _, height, width = f_BChw.shape
        if (height, width) != (self.latent_side, self.latent_side):
            raise ValueError(f"latent must be {self.latent_side}x{self.latent_side}, got {height}x{width}")
        last = len(self.scales) - 1
        with full_precision(f_BChw.device):
            f = f_BChw.float()
            f_rest = f.detach().clone()
            f_hat = torch.zeros_like(f_rest)
            tokens, counts, candidates, codebook_terms, commit_terms, entropy_terms = [], [], [], [], [], []
            for k, side in enumerate(self.scales):
                rest_BChw = f_rest if k == last else F.interpolate(f_rest, size=(side, side), mode="area")
                rest_NC = self.normalize(rearrange(rest_BChw, "b c h w -> (b h w) c"), k)
                tokens_N = self.nearest_codes(rest_NC)
                if self.entropy_weight > 0:
                    entropy_terms.append(self.scale_entropy(f_rest + (f - f.detach()), k))
                h_BChw = self.scale_contribution(tokens_N.view(batch, side * side), k)
                f_hat = f_hat + h_BChw
                f_rest = f_rest - h_BChw.detach()
                # Every prefix f_hat_k is pulled toward f: coarse scales must reconstruct alone.
                codebook_terms.append(F.mse_loss(f_hat, f.detach()))
                commit_terms.append(F.mse_loss(f_hat.detach(), f))
                tokens.append(tokens_N.view(batch, side * side))
                counts.append(torch.bincount(tokens_N, minlength=self.codebook_size).float())
                candidates.append(rest_NC)  # normalised, like the codes they may replace
            codebook_K = torch.stack(codebook_terms)
            commit_K = self.commitment_weight * torch.stack(commit_terms)
            if f.requires_grad:  # decoder gradients reach the encoder through f unchanged
                f_hat = f_hat.detach() - f.detach() + f
        out = QuantizerOutput(
            codebook_loss=codebook_K.mean(),
            commit_loss=commit_K.mean(),
            entropy_loss=self.entropy_weight * torch.stack(entropy_terms).mean() if entropy_terms else f.new_zeros(()),
            scale_losses_K=(codebook_K + commit_K).detach(),
            tokens_BL=torch.cat(tokens, dim=1),
            counts=torch.stack(counts),
            candidates=candidates,
        )
        return f_hat.to(f_BChw.dtype), out

    def scale_entropy(self, live_rest_BChw: torch.Tensor, scale_index: int) -> torch.Tensor:
        """The entropy penalty (models/codebook.py) of scale k's soft assignment, taken per scale
        so the fine scales' many vectors cannot hide a collapsed coarse scale.

        ``live_rest_BChw`` is f_rest with the gradient of f: the penalty moves the encoder and the
        codes. Affinity is −‖x − c‖² in the normalised space (unit RMS per channel, so squared
        distances grow with the dimension C); ``entropy_temperature`` is in those units.
        """
        side = self.scales[scale_index]
        if side != self.latent_side:
            live_rest_BChw = F.interpolate(live_rest_BChw, size=(side, side), mode="area")
        rest_NC = self.normalize(rearrange(live_rest_BChw, "b c h w -> (b h w) c"), scale_index)
        codebook_VC = self.codebook.weight.float()
        affinity_NV = 2 * rest_NC @ codebook_VC.T - codebook_VC.pow(2).sum(1)  # −‖x − c‖² + ‖x‖²
        return entropy_penalty(affinity_NV, self.entropy_temperature)

    def update_codebook(
        self,
        counts_KV: torch.Tensor,
        candidates: list[torch.Tensor],
        generator: torch.Generator,
        allow_restart: bool = True,
    ) -> torch.Tensor:
        """Fold in all-reduced per-scale hit counts and residual statistics; on restart
        updates re-seed dead codes.

        Pass the same (gathered) candidates and generator state on every process so every
        replica updates identically. ``allow_restart=False`` skips a due restart (the trainer's
        last updates, so no code ends training re-seeded but untrained). Returns the re-seeded
        code indices.
        """
        self.usage.observe(counts_KV, candidates)
        if self.scale_normalization:
            self._update_statistics(candidates)
        if not (allow_restart and self.usage.restart_due()):
            return torch.zeros(0, dtype=torch.int64, device=counts_KV.device)
        return self.usage.restart(self.codebook.weight.data, generator)

    @torch.no_grad()
    def _update_statistics(self, candidates: list[torch.Tensor]) -> None:
        """EMA of each scale's residual mean μ_k (C,) and RMS spread σ_k about it (a scalar, so
        channels keep their relative weight in the nearest-code distance)."""
        step = int(self.normalization_updates.item())
        momentum = min(self.normalization_momentum, step / (step + 1))  # running mean at first
        for k, normalized_NC in enumerate(candidates):
            if len(normalized_NC) == 0:
                continue
            # Candidates were normalised with the current statistics; undo that exactly.
            rest_NC = normalized_NC.float() * self.spread_K[k] + self.center_KC[k]
            center_C = rest_NC.mean(dim=0)
            spread = (rest_NC - center_C).pow(2).mean().sqrt().clamp_min(1e-6)
            self.center_KC[k].mul_(momentum).add_(center_C, alpha=1 - momentum)
            self.spread_K[k].mul_(momentum).add_(spread, alpha=1 - momentum)
        self.normalization_updates.add_(1)

    # -- decoding and the next-scale model's input ----------------------------------------
    def tokens_to_f_hat(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        """tokens_BL -> final f_hat (B, C, h, w), the same sum ``forward`` builds."""
        f_hat = self.empty_f_hat(len(tokens_BL))
        with full_precision(f_hat.device):
            for k, tokens_B_l in enumerate(self.split_scales(tokens_BL)):
                f_hat = f_hat + self.scale_contribution(tokens_B_l, k)
        return f_hat

    def codes_to_f_hat(self, codes_BLC: torch.Tensor) -> torch.Tensor:
        """Code vectors (B, L, C) of every position -> final f_hat, like ``tokens_to_f_hat``."""
        f_hat = self.empty_f_hat(len(codes_BLC))
        with full_precision(f_hat.device):
            for k, codes_BlC in enumerate(codes_BLC.split([side * side for side in self.scales], dim=1)):
                f_hat = f_hat + self.code_contribution(codes_BlC, k)
        return f_hat

    def teacher_forcing_input(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        """Ground-truth tokens -> x_BLC, (B, L − first_scale_tokens, C), fp32.

        Rows for scale k+1 hold area_down(f_hat after scales 0..k, s_{k+1}), row-major.
        Built from all scales at once (a cumulative sum) rather than through
        ``next_scale_input``; a test checks the two agree.
        """
        per_scale = self.split_scales(tokens_BL)[:-1]
        if not per_scale:  # a single scale has no next-scale input
            return self.empty_f_hat(len(tokens_BL)).new_zeros(len(tokens_BL), 0, self.embed_dim)
        with full_precision(tokens_BL.device):
            contributions_KBChw = torch.stack(
                [self.scale_contribution(tokens_B_l, k) for k, tokens_B_l in enumerate(per_scale)]
            )
            prefixes_KBChw = contributions_KBChw.cumsum(dim=0)
            inputs = [
                rearrange(F.interpolate(f_hat_BChw, size=(side, side), mode="area"), "b c h w -> b (h w) c")
                for f_hat_BChw, side in zip(prefixes_KBChw, self.scales[1:], strict=True)
            ]
        return torch.cat(inputs, dim=1)

    def next_scale_input(
        self, f_hat_BChw: torch.Tensor, scale_index: int, tokens_B_l: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One sampling step: add scale k's tokens to f_hat and build scale k+1's input.

        Start from ``empty_f_hat(B)``. Returns (new f_hat, x_B_l_C for scale k+1) or
        (new f_hat, None) after the last scale; decode the final f_hat to get the image.
        """
        with full_precision(f_hat_BChw.device):
            f_hat_BChw = f_hat_BChw.float() + self.scale_contribution(tokens_B_l, scale_index)
            if scale_index == len(self.scales) - 1:
                return f_hat_BChw, None
            side = self.scales[scale_index + 1]
            next_BChw = F.interpolate(f_hat_BChw, size=(side, side), mode="area")
        return f_hat_BChw, rearrange(next_BChw, "b c h w -> b (h w) c")
