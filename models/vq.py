"""Single-scale VQ tokenizer (LlamaGen-style): one token per latent position, row-major.

encoder -> 1x1 quant_conv to a low-dim code space -> cosine lookup in an L2-normalised codebook
-> 1x1 post_quant_conv -> decoder. Low-dim, normalised codes are what LlamaGen credits for its
high codebook usage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from models.codebook import CodebookUsage, QuantizerOutput, entropy_penalty, full_precision, used_codes
from models.config_dict import config_to_dict, require
from models.conv_autoencoder import ConvBackboneConfig, Decoder, Encoder, check_images


@dataclass(frozen=True, kw_only=True)
class VQConfig(ConvBackboneConfig):
    """Single-scale tokenizer. Defaults: 16x16 RGB -> 4x4 = 16 tokens, about 1.1M params."""

    codebook_size: int = 512
    """Number of codes V (the token vocabulary)."""
    codebook_dim: int = 8
    """Dimension D of the code space that quant_conv maps ``z_channels`` into."""
    commitment_weight: float = 0.25
    """β in codebook_loss + β·commitment_loss."""
    entropy_weight: float = 0.0
    """Weight of the MaskGIT entropy penalty (0 disables it; 0.01-0.1 if usage is low)."""
    entropy_temperature: float = 0.01
    """Softmax temperature over negative code distances for the entropy penalty."""
    usage_momentum: float = 0.99
    """EMA momentum of per-update code hit counts."""
    dead_code_threshold: float = 0.1
    """A code is dead below this fraction of the uniform share of EMA hits (see codebook.py)."""
    restart_every: int = 100
    """Re-seed dead codes every this many ``update_codebook`` calls (0 = never)."""
    candidate_buffer_size: int = 2048
    """Recent latent vectors kept to draw re-seeded codes from."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.codebook_size > 1, "codebook_size", "must be at least 2")
        require(self.codebook_dim > 0, "codebook_dim", "must be positive")
        require(self.commitment_weight >= 0, "commitment_weight", "must be >= 0")
        require(self.entropy_weight >= 0, "entropy_weight", "must be >= 0")
        require(self.entropy_temperature > 0, "entropy_temperature", "must be positive")
        require(0 <= self.usage_momentum < 1, "usage_momentum", "must be in [0, 1)")
        require(self.dead_code_threshold >= 0, "dead_code_threshold", "must be >= 0")
        require(self.restart_every >= 0, "restart_every", "must be >= 0")
        require(self.candidate_buffer_size > 0, "candidate_buffer_size", "must be positive")


class CosineVectorQuantizer(nn.Module):
    """Nearest code by cosine similarity; latents and codes are compared after L2 normalising."""

    def __init__(self, config: VQConfig):
        super().__init__()
        self.commitment_weight = config.commitment_weight
        self.entropy_weight = config.entropy_weight
        self.entropy_temperature = config.entropy_temperature
        self.codebook = nn.Embedding(config.codebook_size, config.codebook_dim)
        nn.init.uniform_(self.codebook.weight, -1 / config.codebook_size, 1 / config.codebook_size)
        with torch.no_grad():
            self.codebook.weight.copy_(F.normalize(self.codebook.weight, dim=-1))
        self.usage = CodebookUsage(
            num_scales=1,
            codebook_size=config.codebook_size,
            dim=config.codebook_dim,
            momentum=config.usage_momentum,
            dead_code_threshold=config.dead_code_threshold,
            restart_every=config.restart_every,
            candidate_buffer_size=config.candidate_buffer_size,
        )

    @property
    def codebook_size(self) -> int:
        return self.codebook.num_embeddings

    def normalized_codebook_VD(self) -> torch.Tensor:
        return F.normalize(self.codebook.weight, dim=-1)

    def lookup(self, tokens_BL: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """tokens_BL -> normalised codes z_BDhw (the decoder-side path of ``forward``)."""
        codes_BLD = F.embedding(tokens_BL, self.normalized_codebook_VD())
        return rearrange(codes_BLD, "b (h w) d -> b d h w", h=height, w=width)

    def forward(self, z_BDhw: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        """z_BDhw -> (quantised z_BDhw with straight-through gradient, losses and statistics)."""
        batch, _, height, width = z_BDhw.shape
        with full_precision(z_BDhw.device):
            z_ND = F.normalize(rearrange(z_BDhw.float(), "b d h w -> (b h w) d"), dim=-1)
            codebook_VD = self.normalized_codebook_VD()
            # Both sides have unit norm, so the nearest code is the one of largest cosine.
            similarity_NV = z_ND.detach() @ codebook_VD.detach().T
            tokens_N = similarity_NV.argmax(dim=-1)
            codes_ND = F.embedding(tokens_N, codebook_VD)

            codebook_loss = F.mse_loss(codes_ND, z_ND.detach())
            commit_loss = self.commitment_weight * F.mse_loss(codes_ND.detach(), z_ND)
            if self.entropy_weight > 0:
                # -squared distance = 2·cosine - 2; the constant does not change the softmax.
                affinity_NV = 2 * z_ND @ codebook_VD.T
                entropy_loss = self.entropy_weight * entropy_penalty(affinity_NV, self.entropy_temperature)
            else:
                entropy_loss = z_ND.new_zeros(())
            if z_ND.requires_grad:  # straight-through: forward uses the codes, backward skips them
                codes_ND = z_ND + (codes_ND - z_ND).detach()
        quantized_BDhw = rearrange(codes_ND, "(b h w) d -> b d h w", b=batch, h=height, w=width)
        out = QuantizerOutput(
            codebook_loss=codebook_loss,
            commit_loss=commit_loss,
            entropy_loss=entropy_loss,
            scale_losses_K=(codebook_loss + commit_loss).detach().reshape(1),
            tokens_BL=tokens_N.view(batch, height * width),
            counts=torch.bincount(tokens_N, minlength=self.codebook_size).float(),
            candidates=[z_ND.detach()],
        )
        return quantized_BDhw.to(z_BDhw.dtype), out

    def update_codebook(
        self,
        counts_V: torch.Tensor,
        candidates: list[torch.Tensor],
        generator: torch.Generator,
        allow_restart: bool = True,
    ) -> torch.Tensor:
        """Fold in all-reduced hit counts; on restart updates re-seed dead codes.

        Pass the same (gathered) candidates and generator state on every process so every
        replica re-seeds identically. ``allow_restart=False`` skips a due restart (the trainer's
        last updates, so no code ends training re-seeded but untrained). Returns the re-seeded
        code indices.
        """
        self.usage.observe(counts_V.reshape(1, -1), candidates)
        if not (allow_restart and self.usage.restart_due()):
            return torch.zeros(0, dtype=torch.int64, device=counts_V.device)
        return self.usage.restart(self.codebook.weight.data, generator)


class VQTokenizer(nn.Module):
    """images_BCHW in [-1, 1] <-> tokens_BL (B, h*w), row-major over the latent grid."""

    kind = "vq"

    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_dim, 1)
        self.quantizer = CosineVectorQuantizer(config)
        self.post_quant_conv = nn.Conv2d(config.codebook_dim, config.z_channels, 1)
        self.decoder = Decoder(config)

    # -- layout ---------------------------------------------------------------------------
    @property
    def seq_len(self) -> int:
        return self.config.latent_side**2

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def token_layout(self) -> dict:
        side = self.config.latent_side
        return {"kind": self.kind, "grid": [side, side]}

    def config_dict(self) -> dict:
        return config_to_dict(self.config)

    # -- encode / decode (token caching, sampling, evaluation) ----------------------------
    def encode_latent(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """images -> pre-quantisation latents z_BDhw."""
        check_images(images_BCHW, self.config)
        return self.quant_conv(self.encoder(images_BCHW))

    def decode_latent(self, z_BDhw: torch.Tensor) -> torch.Tensor:
        """Quantised latents -> images (unclamped, so training sees true errors)."""
        return self.decoder(self.post_quant_conv(z_BDhw))

    def encode(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return self.quantizer(self.encode_latent(images_BCHW))[1].tokens_BL

    def decode(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        side = self.config.latent_side
        return self.decode_latent(self.quantizer.lookup(tokens_BL, side, side)).clamp(-1, 1)

    # -- training -------------------------------------------------------------------------
    def forward(self, images_BCHW: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        """images -> (reconstruction, VQ losses and statistics); recon is not clamped."""
        quantized_BDhw, out = self.quantizer(self.encode_latent(images_BCHW))
        return self.decode_latent(quantized_BDhw), out

    def update_codebook(
        self,
        counts_V: torch.Tensor,
        candidates: list[torch.Tensor],
        generator: torch.Generator,
        allow_restart: bool = True,
    ) -> torch.Tensor:
        return self.quantizer.update_codebook(counts_V, candidates, generator, allow_restart)

    def codebook_usage(self) -> dict[str, float]:
        """{"overall": fraction of codes whose EMA hits reach the usage threshold}."""
        return {"overall": self.quantizer.usage.usage()[0]}

    def data_usage(self, tokens_BL: torch.Tensor) -> dict[str, float]:
        """``codebook_usage``'s rule counted over ``tokens_BL`` (e.g. the whole train set)."""
        hits_1V = torch.bincount(tokens_BL.reshape(-1), minlength=self.codebook_size).float()[None]
        return {"overall": used_codes(hits_1V, self.config.dead_code_threshold).float().mean().item()}
