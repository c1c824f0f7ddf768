"""Distilled Decoding 2 (DD2; Liu et al., NeurIPS'25): conditional score distillation of an AR teacher.

At position i, with prefix q_<i and class y, the teacher's sampling distribution p_i over the
codewords c_1..c_V (``dd.code_space``) noised along ``x_t = (1 − t)·x_0 + t·ε`` is the Gaussian
mixture ``Σ_k p_k N((1 − t)c_k, t²I)``, whose denoiser and score are closed form:

    w_k   = softmax_k( log p_k − ‖x − (1 − t)c_k‖² / 2t² )        (dd.posterior_logits)
    D_T   = Σ_k w_k c_k,      s_T = −(x − (1 − t)·D_T) / t²
    ∂D_T/∂x = (1 − t)/t² · Cov_w(c)                               (symmetric: used for the VJP)

Everything here works in x0 (denoiser) terms: score differences are ``(1 − t)/t²`` times denoiser
differences, and x0 regression has no 1/t² blow-up near t = 0.

Pieces (the stage ``stages/distill2.py`` wires them):
- ``teacher_denoiser``: D_T in row chunks with an analytic backward (no V-wide graph is kept);
- ``teacher_log_probs``: the teacher's sampling distribution at every position for a given token
  sequence (guidance per position, temperature, top-k/p), one teacher-forced pass (two when guided);
- ``ScoreHead``: MAR-style MLP with AdaLN over (x_t, t) conditioned on the trunk's hidden state,
  predicting x0; ``ARDiffusion`` = an AR trunk + that head (the GTS model and the fake score);
- the losses: ``gts_loss`` (regress D_T), ``fcs_loss`` (denoising on generator samples),
  ``csd_sid_loss`` (SiD form) and ``csd_dmd_loss`` (DMD gradient, the fallback);
- ``OneStepGenerator``: a DD1 student trunk (all positions noise, ``dd_student``) whose output head
  is a ScoreHead evaluated at (t_gen·ε_i, t_gen): initialised from the GTS model, one forward pass.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from models.dd import nearest_codewords, posterior_logits
from models.dd_student import DDConfig, DistilledDecoder, DistilledVAR, student_from_teacher
from models.sampling import filter_logits
from models.transformer_blocks import ClassConditionalAR

# -- the teacher's conditional denoiser ---------------------------------------------------------


class _TeacherDenoiser(torch.autograd.Function):
    """D_T(x, t) in row chunks; backward g ↦ (1 − t)/t² · (Σ_k w_k (c_k·g) c_k − (D·g) D)."""

    @staticmethod
    def forward(ctx, x_ND, t_N1, log_probs_NV, codebook_VD, chunk):
        out_ND = torch.empty_like(x_ND)
        for s in range(0, len(x_ND), chunk):
            w_nV = posterior_logits(x_ND[s : s + chunk], t_N1[s : s + chunk], log_probs_NV[s : s + chunk],
                                    codebook_VD).softmax(-1)  # fmt: skip
            out_ND[s : s + chunk] = w_nV @ codebook_VD
        ctx.save_for_backward(x_ND, t_N1, log_probs_NV, codebook_VD)
        ctx.chunk = chunk
        return out_ND

    @staticmethod
    def backward(ctx, grad_ND):
        x_ND, t_N1, log_probs_NV, codebook_VD = ctx.saved_tensors
        grad_x_ND = torch.empty_like(x_ND)
        for s in range(0, len(x_ND), ctx.chunk):
            t_n1, g_nD = t_N1[s : s + ctx.chunk], grad_ND[s : s + ctx.chunk]
            w_nV = posterior_logits(x_ND[s : s + ctx.chunk], t_n1, log_probs_NV[s : s + ctx.chunk],
                                    codebook_VD).softmax(-1)  # fmt: skip
            d_nD = w_nV @ codebook_VD
            second_nD = (w_nV * (g_nD @ codebook_VD.T)) @ codebook_VD
            cov_g_nD = second_nD - (d_nD * g_nD).sum(-1, keepdim=True) * d_nD
            grad_x_ND[s : s + ctx.chunk] = (1 - t_n1) / (t_n1 * t_n1) * cov_g_nD
        return grad_x_ND, None, None, None, None


def teacher_denoiser(x_ND, t_N, log_probs_NV, codebook_VD, chunk: int = 4096) -> torch.Tensor:
    """E[x_0 | x_t = x] under ``Σ_k p_k δ(c_k)`` (fp32, (N, D)), differentiable in ``x`` only.
    ``log_probs_NV`` may hold -inf (filtered codes); ``chunk`` rows are computed at a time, so
    the V-wide posterior never exists for all N rows at once (16384 codes × 8192 rows is 0.5 GB)."""
    t_N1 = t_N.float().reshape(-1, 1).expand(len(x_ND), 1).contiguous()
    return _TeacherDenoiser.apply(x_ND.float(), t_N1, log_probs_NV.float().detach(), codebook_VD.float(), chunk)


def teacher_score(x_ND, t_N, log_probs_NV, codebook_VD) -> torch.Tensor:
    """s_T = ∇_x log p_t(x) = −(x − (1 − t)·D_T) / t² (fp32, (N, D))."""
    t_N1 = t_N.float().reshape(-1, 1)
    return -(x_ND.float() - (1 - t_N1) * teacher_denoiser(x_ND, t_N, log_probs_NV, codebook_VD)) / (t_N1 * t_N1)


def per_position(per_step: float | list[float], step_sizes: list[int]) -> torch.Tensor:
    """A per-step value (guidance scale) repeated over each step's positions: fp32 (L,)."""
    values = [float(per_step)] * len(step_sizes) if isinstance(per_step, int | float) else list(per_step)
    return torch.tensor(values, dtype=torch.float32).repeat_interleave(torch.tensor(step_sizes))


@torch.no_grad()
def teacher_log_probs(teacher, tokens_BL, labels_B, guidance_L, *, temperature=1.0, top_k=0, top_p=1.0):
    """The teacher's sampling log-probabilities at every position given the prefix ``tokens_BL``
    (fp32, (B, L, V); -inf where filtered): teacher-forced logits, guidance ``u + g·(c − u)`` with
    ``guidance_L`` per position (all 1: no null-class pass), then temperature, top-k, top-p."""
    logits_BLV = teacher(tokens_BL, labels_B, label_dropout=False).float()
    if bool((guidance_L != 1).any()):
        null_B = torch.full_like(labels_B, teacher.null_class)
        uncond_BLV = teacher(tokens_BL, null_B, label_dropout=False).float()
        logits_BLV = uncond_BLV + guidance_L.to(logits_BLV.device)[:, None] * (logits_BLV - uncond_BLV)
    return filter_logits(logits_BLV, temperature=temperature, top_k=top_k, top_p=top_p).log_softmax(-1)


# -- the score head and the AR-diffusion model --------------------------------------------------


def timestep_embedding(t_N: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of 1000·t (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t_N.device, dtype=torch.float32) / half)
    angles = 1000.0 * t_N.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class AdaLNResBlock(nn.Module):
    """MAR's ResBlock: ``x + gate·MLP(LN(x)·(1 + scale) + shift)``, modulation from the condition."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))
        nn.init.zeros_(self.modulation[-1].weight)
        nn.init.zeros_(self.modulation[-1].bias)

    def forward(self, x_NC, c_NC):
        shift, scale, gate = self.modulation(c_NC).chunk(3, dim=-1)
        return x_NC + gate * self.mlp(self.norm(x_NC) * (1 + scale) + shift)


class ScoreHead(nn.Module):
    """x0-prediction ``D_ψ(x_t, t | h)``: x_t in, AdaLN resblocks conditioned on t + h, x0 out.
    The output layer starts at zero (its first predictions are the origin)."""

    def __init__(self, cond_width: int, code_dim: int, width: int = 256, depth: int = 3):
        super().__init__()
        self.width, self.code_dim = width, code_dim
        self.x_in = nn.Linear(code_dim, width)
        self.t_in = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.cond_in = nn.Linear(cond_width, width)
        self.blocks = nn.ModuleList(AdaLNResBlock(width) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, eps=1e-6, elementwise_affine=False)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, code_dim)
        for linear in (self.final_modulation[-1], self.out):
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, x_BLD, t_BL, h_BLC) -> torch.Tensor:
        shape = x_BLD.shape
        dtype = self.x_in.weight.dtype
        x_NC = self.x_in(x_BLD.reshape(-1, shape[-1]).to(dtype))
        c_NC = self.t_in(timestep_embedding(t_BL.reshape(-1), self.width).to(dtype))
        c_NC = c_NC + self.cond_in(h_BLC.reshape(-1, h_BLC.shape[-1]).to(dtype))
        for block in self.blocks:
            x_NC = block(x_NC, c_NC)
        shift, scale = self.final_modulation(c_NC).chunk(2, dim=-1)
        return self.out(self.final_norm(x_NC) * (1 + scale) + shift).float().view(shape)

    def config_dict(self) -> dict:
        return {"width": self.width, "depth": len(self.blocks)}


class ARDiffusion(nn.Module):
    """An AR trunk (GPT or VAR, its logits head unused and frozen) + a ``ScoreHead``: the GTS
    model and DD2's fake-score ("guidance") network. ``hidden`` sees the class and q_<i."""

    def __init__(self, trunk: nn.Module, head: ScoreHead):
        super().__init__()
        self.trunk = trunk
        self.trunk.head.requires_grad_(False)  # never used: keeps DDP from waiting for its grads
        self.head = head

    param_groups = ClassConditionalAR.param_groups

    def hidden(self, tokens_BL, labels_B) -> torch.Tensor:
        return self.trunk.hidden(tokens_BL, labels_B, label_dropout=False)

    def forward(self, x_BLD, t_BL, tokens_BL, labels_B) -> torch.Tensor:
        return self.head(x_BLD, t_BL, self.hidden(tokens_BL, labels_B))


def ar_diffusion_from_teacher(teacher: nn.Module, code_dim: int, width: int, depth: int) -> ARDiffusion:
    """A trainable copy of ``teacher`` with a new score head (the GTS model before training)."""
    trunk = copy.deepcopy(teacher).requires_grad_(True)
    return ARDiffusion(trunk, ScoreHead(teacher.config.model_width, code_dim, width, depth))


# -- losses -------------------------------------------------------------------------------------


def gts_loss(pred_x0_ND, teacher_x0_ND) -> torch.Tensor:
    """Ground-truth score loss in x0 terms: ‖D_ψ − D_T‖² (summed over D, mean over rows); the score
    form ‖S_ψ − s_T‖² is this weighted by ((1 − t)/t²)²."""
    return (pred_x0_ND.float() - teacher_x0_ND.float()).square().sum(-1).mean()


def fcs_loss(pred_x0_ND, sample_x0_ND) -> torch.Tensor:
    """Fake conditional score loss: denoising on the generator's own (detached) samples."""
    return (pred_x0_ND.float() - sample_x0_ND.detach().float()).square().sum(-1).mean()


def _sample_weight(sample, real_x0):
    """SiD/DMD's normaliser ω = 1/sg(mean |x̂ − f_r|) per sample (first dim: a sequence, all its
    positions together, as SiD normalises per image), shaped to broadcast."""
    dims = tuple(range(1, sample.dim()))
    return 1.0 / (sample - real_x0).abs().mean(dim=dims, keepdim=True).detach().clamp_min(1e-5)


def csd_sid_loss(sample, real_x0, fake_x0, alpha: float = 1.2) -> torch.Tensor:
    """CSD generator loss, SiD form in x0 terms (SiD's released ``sid_loss.py``):
    ``ω·[(f_r − f_f)·(f_f − x̂) + (1 − α)‖f_r − f_f‖²]``, ω per sample (``_sample_weight``). Inputs
    (B, L, D) or (N, D); both denoisers frozen but differentiable in x_t (hence in x̂). Summed
    over D, mean over positions and samples."""
    diff = real_x0 - fake_x0
    per_position = (diff * (fake_x0 - sample)).sum(-1, keepdim=True) + (1 - alpha) * diff.square().sum(-1, keepdim=True)
    return (_sample_weight(sample, real_x0) * per_position).mean()


def csd_dmd_loss(sample, real_x0, fake_x0) -> torch.Tensor:
    """Fallback (DMD): ``½‖x̂ − sg(x̂ − g)‖²`` whose gradient in x̂ is ``g = ω·(f_f − f_r)`` (the
    reverse-KL direction; ``s_f − s_r = (1 − t)/t²·(f_f − f_r)``), ω per sample as in SiD."""
    with torch.no_grad():
        target = sample - _sample_weight(sample, real_x0) * (fake_x0 - real_x0)
    return 0.5 * (sample - target).square().sum(-1).mean()


CSD_LOSSES = {"sid": csd_sid_loss, "dmd": csd_dmd_loss}


# -- the one-step generator ---------------------------------------------------------------------


class OneStepGenerator(nn.Module):
    """All positions in one pass: ``x̂_i = head(t_gen·ε_i, t_gen | h_i)`` with h_i from a DD1
    student trunk over the noise (GPT: ε_≤i; VAR: coarser scales' noise and its own). Trunk and
    head start as the GTS model's. Exposes the DD1 student's sampling interface (1 step only)."""

    def __init__(self, student: DistilledDecoder, head: ScoreHead, t_gen: float):
        super().__init__()
        if not 0.0 < t_gen <= 1.0:
            raise ValueError(f"t_gen must be in (0, 1], got {t_gen}")
        del student.continuous_head  # DD2's output head is the score head
        self.student, self.head, self.t_gen = student, head, float(t_gen)

    @property
    def seq_len(self) -> int:
        return self.student.seq_len

    @property
    def dd(self) -> DDConfig:
        return self.student.dd

    @property
    def codebook_VD(self) -> torch.Tensor:
        return self.student.codebook_VD

    @property
    def num_classes(self) -> int:
        return self.student.num_classes

    @property
    def step_sizes(self) -> list[int]:
        return self.student.step_sizes

    param_groups = ClassConditionalAR.param_groups

    def config_dict(self) -> dict:
        return {"head": self.head.config_dict(), "t_gen": self.t_gen}

    def forward(self, noise_BLD, labels_B) -> torch.Tensor:
        B, L = noise_BLD.shape[:2]
        data_BL = torch.zeros(B, L, dtype=torch.bool, device=noise_BLD.device)
        h_BLC, cond_BC = self.student.hidden(noise_BLD, data_BL.long(), data_BL, labels_B)
        norm = self.student.backbone.final_norm
        h_BLC = norm(h_BLC, cond_BC) if isinstance(self.student, DistilledVAR) else norm(h_BLC)
        t_BL = torch.full((B, L), self.t_gen, device=noise_BLD.device)
        return self.head(self.t_gen * noise_BLD.float(), t_BL, h_BLC)

    @torch.no_grad()
    def sample(self, noise_BLD, labels_B, steps: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens_BL = nearest codewords, vectors_BLD, decoded unquantised as in DD1)."""
        if steps != 1:
            raise ValueError(f"a DD2 generator samples in 1 step, got {steps}")
        was_training = self.training
        self.eval()
        try:
            vectors_BLD = self(noise_BLD, labels_B).float()
        finally:
            self.train(was_training)
        B, L, D = vectors_BLD.shape
        tokens_BL = nearest_codewords(vectors_BLD.reshape(B * L, D), self.codebook_VD).view(B, L)
        return tokens_BL, vectors_BLD


def generator_from_gts(arch: str, gts: ARDiffusion, codebook_VD: torch.Tensor, t_gen: float) -> OneStepGenerator:
    """The generator initialised from the GTS model: its trunk (DD1 student plumbing: noise inputs,
    flag embedding) and a copy of its score head."""
    dd = DDConfig(code_dim=codebook_VD.shape[1], split=0, two_step_at=0)
    trunk = copy.deepcopy(gts.trunk)
    student = student_from_teacher(arch, trunk, dd, codebook_VD)
    student.backbone.head.requires_grad_(False)  # the logits head is not used by a DD2 generator
    return OneStepGenerator(student, copy.deepcopy(gts.head), t_gen)


def generator_from_state(state_dict: dict, config: dict, tokenizer: nn.Module) -> OneStepGenerator:
    """A DD2 generator from a ``distill2`` checkpoint (``arch``, ``model``, ``dd``, ``dd2``), eval mode."""
    from models.ar import build_ar
    from models.dd import code_space

    teacher = build_ar(config["arch"], config["model"], tokenizer.quantizer if config["arch"] == "var" else None)
    codebook_VD, _ = code_space(tokenizer)
    student = student_from_teacher(config["arch"], teacher, DDConfig(**config["dd"]), codebook_VD)
    head_config = config["dd2"]["head"]
    head = ScoreHead(teacher.config.model_width, codebook_VD.shape[1], head_config["width"], head_config["depth"])
    generator = OneStepGenerator(student, head, config["dd2"]["t_gen"])
    generator.load_state_dict(state_dict)
    return generator.eval()
