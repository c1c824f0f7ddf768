"""The frozen AR teacher as DD2 reads it, and how far a generator's tokens agree with it.

``TeacherSampler`` holds the teacher's sampling distribution (guidance per position, temperature,
top-k/p: distill_pairs' settings) and its code space: ``log_probs`` at every position of a token
sequence (one teacher-forced pass, two with guidance) and ``denoise``, the exact denoiser of the
noised next-token mixture at those positions (models/dd2.py). ``agreement`` measures a one-step
generator against it: the teacher's NLL of the generated tokens given their own prefix, against
the teacher's entropy there (equal in expectation when the tokens follow the teacher; below it
means mode seeking), the share of tokens outside the teacher's top-k/top-p support, codes used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.dd2 import teacher_denoiser, teacher_log_probs


@dataclass
class TeacherSampler:
    model: nn.Module
    guidance_L: torch.Tensor
    """Guidance scale per position (1 everywhere: no null-class pass)."""
    temperature: float
    top_k: int
    top_p: float
    codebook_VD: torch.Tensor
    chunk: int = 4096
    """Rows of the V-wide posterior computed at a time."""

    def log_probs(self, tokens_BL, labels_B) -> torch.Tensor:
        return teacher_log_probs(self.model, tokens_BL, labels_B, self.guidance_L, temperature=self.temperature,
                                 top_k=self.top_k, top_p=self.top_p)  # fmt: skip

    def denoise(self, x_BLD, t_BL, log_probs_BLV) -> torch.Tensor:
        """D_T at every position (B, L, D), differentiable in ``x_BLD``."""
        B, L, D = x_BLD.shape
        x0_ND = teacher_denoiser(x_BLD.reshape(-1, D), t_BL.reshape(-1), log_probs_BLV.reshape(B * L, -1),
                                 self.codebook_VD, self.chunk)  # fmt: skip
        return x0_ND.view(B, L, D)


def noised(x0_BLD, t_min: float, t_max: float, generator: torch.Generator):
    """(x_t, t_BL): one t ~ U[t_min, t_max] per position and fresh noise, both from ``generator``
    (CPU, so a resumed run draws the same numbers), ``x_t = (1 − t)x_0 + tε``."""
    t_BL = t_min + (t_max - t_min) * torch.rand(x0_BLD.shape[:2], generator=generator)
    noise = torch.randn(x0_BLD.shape, generator=generator)
    t_BL, noise = t_BL.to(x0_BLD.device), noise.to(x0_BLD.device)
    return (1 - t_BL[..., None]) * x0_BLD + t_BL[..., None] * noise, t_BL


@torch.no_grad()
def token_statistics(log_probs_BLV, tokens_BL) -> tuple[float, int, float]:
    """(summed teacher NLL of the tokens its filter keeps, how many it keeps, summed teacher
    entropy): a token outside the teacher's top-k/top-p support has NLL inf, counted apart."""
    nll_BL = -log_probs_BLV.gather(-1, tokens_BL[..., None]).squeeze(-1)
    inside = torch.isfinite(nll_BL)
    entropy = -(log_probs_BLV.exp() * log_probs_BLV.nan_to_num(neginf=0.0)).sum()
    return float(nll_BL[inside].sum()), int(inside.sum()), float(entropy)


@torch.no_grad()
def agreement(generator: nn.Module, teacher: TeacherSampler, count: int, seed: int, batch_size: int = 250) -> dict:
    """The generator's ``count`` samples (labels round-robin, noise seeded per batch) under the
    teacher: NLL per token inside its support, its entropy per token, the share outside its
    support, codes used, mean distance of the vectors to their nearest codeword."""
    device = teacher.codebook_VD.device
    nll = entropy = distance = 0.0
    inside = 0
    counts = torch.zeros(teacher.codebook_VD.shape[0], dtype=torch.long)
    for b, start in enumerate(range(0, count, batch_size)):
        n = min(batch_size, count - start)
        noise_generator = torch.Generator().manual_seed(seed * 1_000_003 + 7919 + b)
        labels_B = (torch.arange(start, start + n) % generator.num_classes).to(device)
        noise_BLD = torch.randn(n, generator.seq_len, generator.dd.code_dim, generator=noise_generator).to(device)
        tokens_BL, vectors_BLD = generator.sample(noise_BLD, labels_B)
        batch_nll, batch_inside, batch_entropy = token_statistics(teacher.log_probs(tokens_BL, labels_B), tokens_BL)
        nll, inside, entropy = nll + batch_nll, inside + batch_inside, entropy + batch_entropy
        distance += float((vectors_BLD - teacher.codebook_VD[tokens_BL]).norm(dim=-1).sum())
        counts += torch.bincount(tokens_BL.reshape(-1).cpu(), minlength=len(counts))
    tokens = count * generator.seq_len
    return {"gen_nll_per_token": nll / max(inside, 1), "teacher_entropy_per_token": entropy / tokens,
            "outside_teacher_support": 1 - inside / tokens, "codes_used": int((counts > 0).sum()),
            "codeword_distance": distance / tokens}  # fmt: skip
