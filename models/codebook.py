"""What both quantizers share: their forward output and codebook-usage bookkeeping.

Usage is an EMA of per-update code hit counts, one row per scale (one row for the single-scale
tokenizer). The training loop sums the hit counts over processes, gathers the candidate vectors,
and calls the quantizer's ``update_codebook``; this module never talks to other processes.

A code is *used* at a scale when its EMA hits reach ``dead_code_threshold`` times that scale's
uniform share (EMA vectors per update / codebook size); VAR's monitor uses the same rule with
0.08. Two restart rules:

- *dead* (single-scale vq, and msvq with ``per_scale=False``): only codes used at no scale are
  re-seeded, dealt round-robin to the scales' candidate buffers. In a shared multi-scale codebook
  the fine scales keep almost every code alive, so the coarse scales stay collapsed.
- *per scale*: a code unused at scale k is re-seeded from scale k's buffer when its total usage,
  summed over scales in uniform shares, is below ``max_total_share`` (1.0: it does less work in
  the whole codebook than one code's fair share at one scale). Codes busy elsewhere are not
  stolen; codes dead everywhere (total 0) are always taken, coarse scales first.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn


def full_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """Quantisation runs in fp32 whatever autocast the caller uses (as VAR does): bf16 distances
    pick wrong codes and bf16 residual sums drift. (Meta tensors, used to size models without
    memory, have no autocast at all.)"""
    if device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def entropy_penalty(affinity_NV: torch.Tensor, temperature: float) -> torch.Tensor:
    """MaskGIT: mean per-vector entropy minus the entropy of the mean assignment.

    Minimising it makes each vector confident while spreading the batch over many codes.
    """
    logits_NV = affinity_NV / temperature
    probs_NV = logits_NV.softmax(dim=-1)
    sample_entropy = -(probs_NV * logits_NV.log_softmax(dim=-1)).sum(dim=-1).mean()
    mean_probs_V = probs_NV.mean(dim=0)
    batch_entropy = -(mean_probs_V * torch.log(mean_probs_V + 1e-5)).sum()
    return sample_entropy - batch_entropy


def uniform_shares(hits_KV: torch.Tensor) -> torch.Tensor:
    """(K, V) hit counts -> each code's hits in units of its scale's uniform share (hits / V)."""
    uniform_K1 = hits_KV.sum(dim=1, keepdim=True) / hits_KV.shape[1]
    return hits_KV / uniform_K1.clamp_min(torch.finfo(uniform_K1.dtype).tiny)


def used_codes(hits_KV: torch.Tensor, threshold: float) -> torch.Tensor:
    """bool (K, V): code v is used at scale k when hit at least ``threshold`` uniform shares.

    The one rule for the training EMA (``CodebookUsage``) and for counts over a whole data set.
    """
    return (hits_KV > 0) & (uniform_shares(hits_KV) >= threshold)


@dataclass
class QuantizerOutput:
    """What a tokenizer's forward returns beside the reconstruction."""

    codebook_loss: torch.Tensor
    """Scalar; pulls codes (and φ convs) toward the stopped-gradient latents."""
    commit_loss: torch.Tensor
    """Scalar, already multiplied by β; pulls the encoder toward the stopped-gradient codes."""
    entropy_loss: torch.Tensor
    """Scalar, already weighted; zero when the entropy weight is 0."""
    scale_losses_K: torch.Tensor
    """(K,) codebook + commitment loss of each scale before averaging (K = 1 for vq)."""
    tokens_BL: torch.Tensor
    """int64 token indices, the same as ``encode`` gives."""
    counts: torch.Tensor
    """float hit counts of this process's batch: counts_V (vq) or counts_KV (msvq)."""
    candidates: list[torch.Tensor]
    """Per scale, the detached (N_k, D) vectors that were quantised: restart candidates."""

    @property
    def loss(self) -> torch.Tensor:
        return self.codebook_loss + self.commit_loss + self.entropy_loss


class CodebookUsage(nn.Module):
    """EMA hit counts per scale, a ring buffer of recent candidates per scale, dead-code restart.

    The buffers are persistent so a resumed run restarts the same codes as an uninterrupted one.
    """

    def __init__(
        self,
        *,
        num_scales: int,
        codebook_size: int,
        dim: int,
        momentum: float,
        dead_code_threshold: float,
        restart_every: int,
        candidate_buffer_size: int,
        per_scale: bool = False,
        max_total_share: float = 1.0,
    ):
        super().__init__()
        self.per_scale = per_scale
        self.max_total_share = max_total_share
        self.momentum = momentum
        self.dead_code_threshold = dead_code_threshold
        self.restart_every = restart_every
        self.register_buffer("hits_ema_KV", torch.zeros(num_scales, codebook_size))
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64))
        self.register_buffer("candidates_KND", torch.zeros(num_scales, candidate_buffer_size, dim))
        # Rows of candidates_KND filled so far and where the next write goes, per scale.
        self.register_buffer("filled_K", torch.zeros(num_scales, dtype=torch.int64))
        self.register_buffer("write_at_K", torch.zeros(num_scales, dtype=torch.int64))

    @property
    def num_scales(self) -> int:
        return self.hits_ema_KV.shape[0]

    @torch.no_grad()
    def observe(self, counts_KV: torch.Tensor, candidates: list[torch.Tensor]) -> None:
        """Fold one update's (all-reduced) hit counts into the EMA and remember candidates."""
        if counts_KV.shape != self.hits_ema_KV.shape:
            raise ValueError(f"counts must have shape {tuple(self.hits_ema_KV.shape)}, got {tuple(counts_KV.shape)}")
        if len(candidates) != self.num_scales:
            raise ValueError(f"need one candidate tensor per scale ({self.num_scales}), got {len(candidates)}")
        # Until 1 / (1 - momentum) updates have been seen the EMA is the plain running mean,
        # so early usage is not biased toward zero.
        step = int(self.updates.item())
        momentum = min(self.momentum, step / (step + 1))
        self.hits_ema_KV.mul_(momentum).add_(counts_KV.to(self.hits_ema_KV), alpha=1 - momentum)
        self.updates.add_(1)
        for k, vectors_ND in enumerate(candidates):
            self._remember(k, vectors_ND.detach().to(self.candidates_KND))

    def _remember(self, k: int, vectors_ND: torch.Tensor) -> None:
        capacity = self.candidates_KND.shape[1]
        vectors_ND = vectors_ND[-capacity:]
        rows = self.write_at_K[k] + torch.arange(len(vectors_ND), device=vectors_ND.device)
        self.candidates_KND[k, rows % capacity] = vectors_ND
        self.write_at_K[k] = (self.write_at_K[k] + len(vectors_ND)) % capacity
        self.filled_K[k] = torch.clamp(self.filled_K[k] + len(vectors_ND), max=capacity)

    def shares_KV(self) -> torch.Tensor:
        """(K, V): each code's EMA hits at each scale in units of that scale's uniform share."""
        return uniform_shares(self.hits_ema_KV)

    def used_KV(self) -> torch.Tensor:
        """bool (K, V): code v reaches the usage threshold at scale k."""
        return used_codes(self.hits_ema_KV, self.dead_code_threshold)

    def usage(self) -> tuple[float, list[float]]:
        """(fraction of codes used at any scale, fraction used at each scale)."""
        used_KV = self.used_KV()
        overall = used_KV.any(dim=0).float().mean().item()
        return overall, used_KV.float().mean(dim=1).tolist()

    def restart_due(self) -> bool:
        step = int(self.updates.item())
        return self.restart_every > 0 and step > 0 and step % self.restart_every == 0

    @torch.no_grad()
    def restart(self, codebook_VD: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Re-seed codes of ``codebook_VD`` in place from remembered candidates (see the module
        docstring for which codes). Each scale's codes are drawn from that scale's own recent
        vectors, so coarse scales get codes that lie where their vectors are. Re-seeded codes'
        EMA is zeroed: they must earn hits before the next restart to count as used.
        Returns the re-seeded code indices (int64, ascending).
        """
        codes_per_scale = self._per_scale_codes() if self.per_scale else self._dead_codes_dealt()
        for k, codes in codes_per_scale.items():
            filled = int(self.filled_K[k])
            if filled >= len(codes):  # distinct candidates, so re-seeded codes differ
                rows = torch.randperm(filled, generator=generator, device=generator.device)
                rows = rows[: len(codes)]
            else:
                rows = torch.randint(filled, (len(codes),), generator=generator, device=generator.device)
            picked_ND = self.candidates_KND[k, rows.to(self.candidates_KND.device)]
            codebook_VD[codes.to(codebook_VD.device)] = picked_ND.to(codebook_VD)
        if not codes_per_scale:
            return torch.zeros(0, dtype=torch.int64, device=codebook_VD.device)
        restarted = torch.cat(list(codes_per_scale.values())).sort().values
        self.hits_ema_KV[:, restarted] = 0.0
        return restarted.to(codebook_VD.device)

    def _dead_codes_dealt(self) -> dict[int, torch.Tensor]:
        """Codes used at no scale, in index order, dealt round-robin to scales with candidates."""
        dead = (~self.used_KV().any(dim=0)).nonzero().squeeze(1)
        scales = [k for k in range(self.num_scales) if self.filled_K[k] > 0]
        dealt = {k: dead[slot :: len(scales)] for slot, k in enumerate(scales)}
        return {k: codes for k, codes in dealt.items() if len(codes) > 0}

    def _per_scale_codes(self) -> dict[int, torch.Tensor]:
        """For each scale, coarse to fine: codes unused there whose total share is below
        ``max_total_share`` and not yet taken by a coarser scale in this restart."""
        used_KV = self.used_KV()
        cheap_V = self.shares_KV().sum(dim=0) < self.max_total_share
        taken_V = torch.zeros_like(cheap_V)
        chosen = {}
        for k in range(self.num_scales):
            if self.filled_K[k] == 0:
                continue
            codes = (~used_KV[k] & cheap_V & ~taken_V).nonzero().squeeze(1)
            if len(codes) > 0:
                chosen[k] = codes
                taken_V[codes] = True
        return chosen
