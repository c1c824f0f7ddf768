"""Multi-scale residual VQ tokenizer (VAR-style).

encoder -> 3x3 quant_conv -> multi-scale residual quantizer (models/residual_quantizer.py)
-> 3x3 post_quant_conv -> decoder. Tokens are the scales concatenated coarse -> fine, each
row-major; the next-scale model's inputs come from ``teacher_forcing_input`` /
``next_scale_input`` (VAR also takes ``quantizer`` itself at construction).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.codebook import QuantizerOutput, used_codes
from models.config_dict import config_to_dict, require
from models.conv_autoencoder import ConvBackboneConfig, Decoder, Encoder, check_images
from models.residual_quantizer import MultiScaleResidualQuantizer


@dataclass(frozen=True, kw_only=True)
class MSVQConfig(ConvBackboneConfig):
    """Multi-scale tokenizer. Defaults: 16x16 RGB -> 4x4 latent, scales (1,2,3,4) = 30 tokens,
    about 1.1M params. ``z_channels`` is also the codebook dimension (VAR's Cvae)."""

    z_channels: int = 16
    """Encoder output channels = codebook vector dimension C."""
    codebook_size: int = 512
    """Number of codes V, shared by all scales."""
    scales: tuple[int, ...] = (1, 2, 3, 4)
    """Side of each scale's token grid, increasing; the last equals the latent side."""
    commitment_weight: float = 0.25
    """β in mean_k [β·mse(sg(f_hat_k), f) + mse(f_hat_k, sg(f))]."""
    quant_resi: float = 0.5
    """r in φ(h) = (1 − r)·h + r·conv3x3(h); 0 makes φ the identity."""
    share_quant_resi: int = 4
    """Number of φ convs spread over the scales (VAR's default); 0 = one per scale."""
    scale_normalization: bool = True
    """Quantise each scale's residual centred and scaled to unit RMS by running per-scale
    statistics (μ_k, σ_k); a code c then contributes σ_k·c + μ_k. Coarse area means and fine
    residuals differ in norm and offset, so in one raw Euclidean codebook codes specialise per
    scale and the coarse scales share a handful; normalised, every scale's vectors overlap
    (on the digits: 1x1 usage 16% -> 54% on its own, and +0.1 dB val PSNR)."""
    normalization_momentum: float = 0.99
    """EMA momentum of the per-scale statistics (a running mean over the first updates)."""
    usage_momentum: float = 0.99
    """EMA momentum of per-update code hit counts (per scale)."""
    dead_code_threshold: float = 0.1
    """A code is unused at a scale below this fraction of that scale's uniform share of EMA
    hits (VAR's monitor uses 0.08)."""
    restart_every: int = 100
    """Re-seed unused codes every this many ``update_codebook`` calls (0 = never)."""
    restart_per_scale: bool = True
    """Re-seed a code unused at scale k from scale k's candidates (coarse scales first), so a
    collapsed coarse scale is revived even while the fine scales keep every code alive; False
    re-seeds only codes unused at every scale (models/codebook.py)."""
    restart_max_total_share: float = 1.0
    """Per-scale restarts take only codes whose usage summed over all scales, in uniform shares,
    is below this (1.0: codes that do less than one fair share of work anywhere). Larger steals
    busier codes from other scales for the scale that lacks them. On the digits (scales
    1,2,3,4, 1000 steps) 1x1 EMA usage is 77% at 2.0, 88-94% at 4.0 and 91-96% at 16.0 over
    seeds, with no val PSNR cost; at 2000 steps and 16.0, 96-98% (README's msvq recipe)."""
    candidate_buffer_size: int = 1024
    """Recent (normalised) residual vectors kept per scale to re-seed codes from (coarse scales
    see B vectors per batch, so they need a memory longer than one batch)."""
    entropy_weight: float = 0.0
    """Weight of the MaskGIT entropy penalty, computed on each scale's soft assignment and
    averaged over scales (0 disables it). It moves the encoder and the codes; on the digits it
    hurt (weight 0.01, temperature 0.1: 1x1 usage 20%, val PSNR 25.2 dB vs 28.1), so it is off."""
    entropy_temperature: float = 1.0
    """Softmax temperature over −squared distances in the normalised residual space (unit RMS
    per channel: nearest-code squared distances are ~2-4 at C = 16, the runner-up ~0.7 further)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.codebook_size > 1, "codebook_size", "must be at least 2")
        require(
            len(self.scales) > 0 and all(s > 0 for s in self.scales),
            "scales",
            "must be a non-empty list of positive sides",
        )
        require(
            all(a < b for a, b in zip(self.scales, self.scales[1:], strict=False)),
            "scales",
            "must be strictly increasing",
        )
        require(
            self.scales[-1] == self.latent_side,
            "scales",
            f"must end at the latent side {self.latent_side} "
            f"(image_size {self.image_size} / downsample factor {self.downsample_factor})",
        )
        require(self.commitment_weight >= 0, "commitment_weight", "must be >= 0")
        require(0 <= self.quant_resi <= 1, "quant_resi", "must be in [0, 1]")
        require(self.share_quant_resi >= 0, "share_quant_resi", "must be >= 0")
        require(0 <= self.usage_momentum < 1, "usage_momentum", "must be in [0, 1)")
        require(self.dead_code_threshold >= 0, "dead_code_threshold", "must be >= 0")
        require(self.restart_every >= 0, "restart_every", "must be >= 0")
        require(0 <= self.normalization_momentum < 1, "normalization_momentum", "must be in [0, 1)")
        require(self.restart_max_total_share > 0, "restart_max_total_share", "must be > 0")
        require(self.candidate_buffer_size > 0, "candidate_buffer_size", "must be positive")
        require(self.entropy_weight >= 0, "entropy_weight", "must be >= 0")
        require(self.entropy_temperature > 0, "entropy_temperature", "must be positive")


class MSVQTokenizer(nn.Module):
    """images_BCHW in [-1, 1] <-> tokens_BL (B, Σ s_k²), scales coarse -> fine, row-major."""

    kind = "msvq"

    def __init__(self, config: MSVQConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.z_channels, 3, padding=1)
        self.quantizer = MultiScaleResidualQuantizer(
            codebook_size=config.codebook_size,
            dim=config.z_channels,
            scales=config.scales,
            commitment_weight=config.commitment_weight,
            quant_resi=config.quant_resi,
            share_quant_resi=config.share_quant_resi,
            usage_momentum=config.usage_momentum,
            dead_code_threshold=config.dead_code_threshold,
            restart_every=config.restart_every,
            candidate_buffer_size=config.candidate_buffer_size,
            scale_normalization=config.scale_normalization,
            normalization_momentum=config.normalization_momentum,
            restart_per_scale=config.restart_per_scale,
            restart_max_total_share=config.restart_max_total_share,
            entropy_weight=config.entropy_weight,
            entropy_temperature=config.entropy_temperature,
        )
        self.post_quant_conv = nn.Conv2d(config.z_channels, config.z_channels, 3, padding=1)
        self.decoder = Decoder(config)

    # -- layout ---------------------------------------------------------------------------
    @property
    def seq_len(self) -> int:
        return self.quantizer.seq_len

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def token_layout(self) -> dict:
        return {"kind": self.kind, "scales": list(self.config.scales)}

    def config_dict(self) -> dict:
        return config_to_dict(self.config)

    # -- encode / decode (token caching, sampling, evaluation) ----------------------------
    def encode_latent(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """images -> pre-quantisation latents f_BChw."""
        check_images(images_BCHW, self.config)
        return self.quant_conv(self.encoder(images_BCHW))

    def decode_latent(self, f_hat_BChw: torch.Tensor) -> torch.Tensor:
        """Accumulated f_hat -> images (unclamped, so training sees true errors)."""
        return self.decoder(self.post_quant_conv(f_hat_BChw))

    def encode(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return self.quantizer(self.encode_latent(images_BCHW))[1].tokens_BL

    def decode(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        return self.decode_latent(self.quantizer.tokens_to_f_hat(tokens_BL)).clamp(-1, 1)

    # -- next-scale model inputs (pretraining, SAR, sampling) -----------------------------
    def teacher_forcing_input(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        return self.quantizer.teacher_forcing_input(tokens_BL)

    def next_scale_input(
        self, f_hat_BChw: torch.Tensor, scale_index: int, tokens_B_l: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.quantizer.next_scale_input(f_hat_BChw, scale_index, tokens_B_l)

    # -- training -------------------------------------------------------------------------
    def forward(self, images_BCHW: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        """images -> (reconstruction, VQ losses and statistics); recon is not clamped."""
        f_hat_BChw, out = self.quantizer(self.encode_latent(images_BCHW))
        return self.decode_latent(f_hat_BChw), out

    def update_codebook(
        self,
        counts_KV: torch.Tensor,
        candidates: list[torch.Tensor],
        generator: torch.Generator,
        allow_restart: bool = True,
    ) -> torch.Tensor:
        return self.quantizer.update_codebook(counts_KV, candidates, generator, allow_restart)

    def codebook_usage(self) -> dict[str, float]:
        """Fraction of codes used at any scale ("overall") and at each scale ("4x4", ...)."""
        overall, per_scale = self.quantizer.usage.usage()
        usage = {"overall": overall}
        usage.update({f"{side}x{side}": u for side, u in zip(self.config.scales, per_scale, strict=True)})
        return usage

    def data_usage(self, tokens_BL: torch.Tensor) -> dict[str, float]:
        """``codebook_usage``'s keys and rule (``dead_code_threshold`` uniform shares), counted
        over ``tokens_BL`` (e.g. the whole train set) instead of the training EMA."""
        per_scale = self.quantizer.split_scales(tokens_BL)
        hits_KV = torch.stack([torch.bincount(t.reshape(-1), minlength=self.codebook_size) for t in per_scale])
        used_KV = used_codes(hits_KV.float(), self.config.dead_code_threshold)
        usage = {"overall": used_KV.any(dim=0).float().mean().item()}
        fractions = used_KV.float().mean(dim=1).tolist()
        usage.update({f"{side}x{side}": u for side, u in zip(self.config.scales, fractions, strict=True)})
        return usage
