"""DD1 students: one- and two-step generators initialised from an AR teacher (GPT or VAR).

The teacher through the flow-matching map (models/dd.py) is a deterministic function
(label, ε_1..ε_L) -> (q_1..q_L). A student learns to jump from any intermediate state of that
trajectory, ``X_t = (q_1..q_{t−1}, ε_t..ε_L)`` (a data prefix, then the ORIGINAL noise), straight to
the end (q_1..q_L). t counts AR steps (tokens for GPT, scales for VAR).

Student = the teacher's weights plus:
- a noise/data flag embedding (2 × width) added to every input position;
- GPT: a new Linear(D -> width) for noise vectors (data positions keep the teacher's token
  embedding); the sequence is ``[class, x_1..x_L]`` with ordinary causal attention, so the output at
  x_i sees the class, the prefix and its own noise and predicts q_i;
- VAR: the teacher's ``word_embed`` on codeword / noise vectors, an extra start position in front
  (class + a start embedding initialised from the teacher's), and attention to the start, to
  strictly coarser scales and to itself (positions of one scale are conditionally independent);
- heads: the teacher's logits head for positions of the first ``split`` AR steps, a continuous head
  (DD's FinalLayer: LayerNorm without affine, adaLN shift/scale from the class, Linear -> D) for
  the rest, whose vectors are decoded unquantised.

Sampling (``sample``): 1 step predicts everything from pure noise; 2 steps keep the first
``two_step_at`` AR steps of that prediction as data and predict again from the SAME noise for the
rest (fresh noise would leave the trajectory). Data positions are never re-predicted (DD forces
their logits to a one-hot). The student is conditional-only: guidance is baked in by the pairs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.dd import decode_vectors, nearest_codewords, tokens_per_step
from models.transformer_blocks import ClassConditionalAR, scale_levels


@dataclass(frozen=True)
class DDConfig:
    """What a student adds to its teacher's architecture."""

    code_dim: int
    """D of the codebook-embedding space the noise lives in."""
    split: int
    """AR steps whose positions use the logits head; later ones use the continuous head."""
    two_step_at: int
    """AR steps of the first prediction kept as data before the second step (≤ split); 0 = a
    one-step-only model (DD2's generator: split 0, every position continuous)."""

    def check(self, steps: int) -> None:
        if self.code_dim < 1:
            raise ValueError(f"code_dim must be >= 1, got {self.code_dim}")
        if not 0 <= self.split <= steps:
            raise ValueError(f"split must be in [0, {steps}] AR steps, got {self.split}")
        if not (1 <= self.two_step_at <= self.split or self.two_step_at == 0):
            raise ValueError(
                f"two_step_at must be in [1, split={self.split}] AR steps (the kept prefix is tokens) or 0 "
                f"(one-step only), got {self.two_step_at}"
            )


class ContinuousHead(nn.Module):
    """DD's FinalLayer: ``Linear(LN(h)·(1 + scale) + shift)`` with (scale, shift) from the class;
    the projections start at zero, so the first outputs are the zero vector."""

    def __init__(self, width: int, code_dim: int, norm_eps: float = 1e-6):
        super().__init__()
        self.width = width
        self.norm = nn.LayerNorm(width, eps=norm_eps, elementwise_affine=False)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, code_dim)
        for linear in (self.modulation[-1], self.out):
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, h_BLC: torch.Tensor, cond_BC: torch.Tensor) -> torch.Tensor:
        scale_B1C, shift_B1C = self.modulation(cond_BC).view(-1, 1, 2, self.width).unbind(2)
        return self.out(self.norm(h_BLC) * (1 + scale_B1C) + shift_B1C)


class DistilledDecoder(nn.Module):
    """What both students share: heads, the split, one- and two-step sampling. Subclasses give
    ``hidden(noise, tokens, data, labels) -> (h_BLC, cond_BC)`` and ``logits(h, cond)``."""

    def __init__(self, teacher: nn.Module, dd: DDConfig, codebook_VD: torch.Tensor):
        super().__init__()
        self.step_sizes = tokens_per_step(teacher)
        dd.check(len(self.step_sizes))
        if codebook_VD.shape != (teacher.config.vocab_size, dd.code_dim):
            raise ValueError(f"codebook {tuple(codebook_VD.shape)} is not (vocab_size, code_dim)")
        self.dd = dd
        self.backbone = teacher.train(False)
        width = teacher.config.model_width
        # 1. new inputs and head; the codebook is the tokenizer's (not part of the state_dict)
        self.flag_embedding = nn.Embedding(2, width)  # row 0: noise, row 1: data
        nn.init.normal_(self.flag_embedding.weight, std=0.02)
        self.continuous_head = ContinuousHead(width, dd.code_dim)
        self.register_buffer("codebook_VD", codebook_VD.detach().float().clone(), persistent=False)
        positions_L = torch.arange(self.seq_len)
        self.register_buffer("logit_positions_L", positions_L < self.prefix_positions(dd.split), persistent=False)

    # -- interface facts ------------------------------------------------------------------------

    @property
    def seq_len(self) -> int:
        return sum(self.step_sizes)

    @property
    def num_classes(self) -> int:
        return self.backbone.num_classes

    def prefix_positions(self, steps: int) -> int:
        """Token positions covered by the first ``steps`` AR steps."""
        return sum(self.step_sizes[:steps])

    def config_dict(self) -> dict:
        return dataclasses.asdict(self.dd)

    param_groups = ClassConditionalAR.param_groups

    # -- training phase -------------------------------------------------------------------------

    def forward(self, noise_BLD, tokens_BL, data_BL, labels_B) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits_BLV, continuous_BLD) at every position of the state ``where(data, tokens, noise)``."""
        h_BLC, cond_BC = self.hidden(noise_BLD, tokens_BL, data_BL, labels_B)
        return self.logits(h_BLC, cond_BC), self.continuous_head(h_BLC, cond_BC)

    def loss(self, logits_BLV, continuous_BLD, tokens_BL, data_BL, continuous_weight: float = 1.0):
        """(loss, monitors): cross-entropy on noise positions of the logits head, mean squared error
        to the codeword on noise positions of the continuous head (data positions are given)."""
        noise_BL = ~data_BL
        logit_BL = noise_BL & self.logit_positions_L
        continuous_BL = noise_BL & ~self.logit_positions_L
        target_BLD = self.codebook_VD[tokens_BL]
        zero = logits_BLV.new_zeros((), dtype=torch.float32)
        logit_targets, continuous_targets = tokens_BL[logit_BL], tokens_BL[continuous_BL]
        logits_NV, continuous_ND = logits_BLV[logit_BL].float(), continuous_BLD[continuous_BL].float()
        ce = F.cross_entropy(logits_NV, logit_targets) if len(logit_targets) else zero
        mse = F.mse_loss(continuous_ND, target_BLD[continuous_BL]) if len(continuous_targets) else zero
        with torch.no_grad():
            token_acc = (logits_NV.argmax(-1) == logit_targets).float().mean() if len(logit_targets) else zero
            nearest = nearest_codewords(continuous_ND, self.codebook_VD)
            code_acc = (nearest == continuous_targets).float().mean() if len(continuous_targets) else zero
        monitors = {"ce": float(ce.detach()), "mse": float(mse.detach()), "token_acc": float(token_acc),
                    "code_acc": float(code_acc)}  # fmt: skip
        return ce + continuous_weight * mse, monitors

    # -- sampling phase -------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, noise_BLD, labels_B, tokens_BL=None, data_BL=None) -> tuple[torch.Tensor, torch.Tensor]:
        """One student step: (tokens_BL, vectors_BLD). Logits-head positions take the argmax codeword,
        continuous-head positions their vector (and its nearest codeword as the token); data
        positions keep their given tokens."""
        B, L = noise_BLD.shape[:2]
        if data_BL is None:
            data_BL = torch.zeros(B, L, dtype=torch.bool, device=noise_BLD.device)
            tokens_BL = torch.zeros(B, L, dtype=torch.long, device=noise_BLD.device)
        logits_BLV, continuous_BLD = self(noise_BLD, tokens_BL, data_BL, labels_B)
        argmax_BL = logits_BLV.argmax(-1)
        continuous_BLD = continuous_BLD.float()
        nearest_BL = nearest_codewords(continuous_BLD.reshape(B * L, -1), self.codebook_VD).view(B, L)
        head_BL = self.logit_positions_L.expand(B, L)
        out_tokens_BL = torch.where(data_BL, tokens_BL, torch.where(head_BL, argmax_BL, nearest_BL))
        vectors_BLD = torch.where((data_BL | head_BL)[..., None], self.codebook_VD[out_tokens_BL], continuous_BLD)
        return out_tokens_BL, vectors_BLD

    @torch.no_grad()
    def sample(self, noise_BLD: torch.Tensor, labels_B: torch.Tensor, steps: int = 1):
        """(tokens_BL, vectors_BLD) from noise in ``steps`` (1 or 2) sequential forward passes."""
        was_training = self.training
        self.eval()
        try:
            tokens_BL, vectors_BLD = self.predict(noise_BLD, labels_B)
            if steps == 2 and self.dd.two_step_at == 0:
                raise ValueError("this student samples in 1 step only (two_step_at 0)")
            if steps == 2:
                kept = self.prefix_positions(self.dd.two_step_at)
                data_BL = (torch.arange(self.seq_len, device=noise_BLD.device) < kept).expand_as(tokens_BL)
                # the same ε: the not-yet-fixed positions stay on the trajectory the student learned
                tokens_BL, vectors_BLD = self.predict(noise_BLD, labels_B, tokens_BL, data_BL)
            elif steps != 1:
                raise ValueError(f"a DD1 student samples in 1 or 2 steps, got {steps}")
        finally:
            self.train(was_training)
        return tokens_BL, vectors_BLD


class DistilledGPT(DistilledDecoder):
    def __init__(self, teacher: nn.Module, dd: DDConfig, codebook_VD: torch.Tensor):
        super().__init__(teacher, dd, codebook_VD)
        self.noise_embedding = nn.Linear(dd.code_dim, teacher.config.model_width, bias=False)
        nn.init.normal_(self.noise_embedding.weight, std=teacher.config.init_std)

    def hidden(self, noise_BLD, tokens_BL, data_BL, labels_B):
        g = self.backbone
        cond_BC = g.class_embedding(labels_B)
        noise_BLC = self.noise_embedding(noise_BLD.to(self.noise_embedding.weight.dtype))
        x_BLC = torch.where(data_BL[..., None], g.token_embedding(tokens_BL), noise_BLC)
        x_BLC = torch.cat([cond_BC[:, None], x_BLC + self.flag_embedding(data_BL.long())], dim=1)
        x_BLC = g.token_dropout(x_BLC)
        rotation = g._rotation(x_BLC.shape[1], x_BLC.device)  # class prefix + every grid position
        for block in g.blocks:
            x_BLC = block(x_BLC, rotation, is_causal=True)
        return x_BLC[:, 1:], cond_BC

    def logits(self, h_BLC, cond_BC):
        return self.backbone.head(self.backbone.final_norm(h_BLC))


def start_and_coarser_mask(sides: tuple[int, ...]) -> torch.Tensor:
    """(1 + L, 1 + L) bool, True = attend: the start position sees itself; position i sees the
    start, every position of a strictly coarser scale, and itself."""
    levels_L = scale_levels(sides)
    L = len(levels_L)
    mask = torch.zeros(1 + L, 1 + L, dtype=torch.bool)
    mask[:, 0] = True
    mask[1:, 1:] = (levels_L[None, :] < levels_L[:, None]) | torch.eye(L, dtype=torch.bool)
    return mask


class DistilledVAR(DistilledDecoder):
    def __init__(self, teacher: nn.Module, dd: DDConfig, codebook_VD: torch.Tensor):
        super().__init__(teacher, dd, codebook_VD)
        with torch.no_grad():  # the teacher's first start position, level and position embeddings
            start_C = teacher.start_position[0] + teacher._level_position(0, 1)[0]
        self.start_embedding = nn.Parameter(start_C.detach().clone())
        self.register_buffer("attn_mask", start_and_coarser_mask(teacher.config.scales), persistent=False)

    def hidden(self, noise_BLD, tokens_BL, data_BL, labels_B):
        g = self.backbone
        cond_BC = g.class_embedding(labels_B)
        vectors_BLD = torch.where(data_BL[..., None], self.codebook_VD[tokens_BL], noise_BLD.float())
        x_BLC = g.word_embed(vectors_BLD.to(g.word_embed.weight.dtype)) + g._level_position(0, self.seq_len)
        x_BLC = x_BLC + self.flag_embedding(data_BL.long())
        x_BLC = torch.cat([(cond_BC + self.start_embedding)[:, None], x_BLC], dim=1)
        for block in g.blocks:
            x_BLC = block(x_BLC, cond_BC, attn_mask=self.attn_mask)
        return x_BLC[:, 1:], cond_BC

    def logits(self, h_BLC, cond_BC):
        return self.backbone.head(self.backbone.final_norm(h_BLC, cond_BC))


STUDENTS = {"gpt": DistilledGPT, "var": DistilledVAR}


def student_from_teacher(arch: str, teacher: nn.Module, dd: DDConfig, codebook_VD: torch.Tensor) -> DistilledDecoder:
    """A new student holding ``teacher``'s module (and so its weights) as its backbone."""
    if arch not in STUDENTS:
        raise ValueError(f"unknown arch {arch!r}: expected one of {', '.join(STUDENTS)}")
    return STUDENTS[arch](teacher, dd, codebook_VD)


def student_from_state(state_dict: dict, config: dict, tokenizer: nn.Module) -> DistilledDecoder:
    """A student from a ``distill`` checkpoint's weights and config.json (``arch``, ``model``,
    ``dd``), eval mode; ``tokenizer`` gives the codebook space (and VAR's quantizer)."""
    from models.ar import build_ar
    from models.dd import code_space

    if "dd2" in config:  # a DD2 one-step generator (stages/distill2.py): same interface, 1 step
        from models.dd2 import generator_from_state

        return generator_from_state(state_dict, config, tokenizer)
    teacher = build_ar(config["arch"], config["model"], tokenizer.quantizer if config["arch"] == "var" else None)
    codebook_VD, _ = code_space(tokenizer)
    student = student_from_teacher(config["arch"], teacher, DDConfig(**config["dd"]), codebook_VD)
    student.load_state_dict(state_dict)
    return student.eval()


@torch.no_grad()
def sample_distilled_images(
    student: DistilledDecoder,
    tokenizer: nn.Module,
    labels_N: torch.Tensor,
    *,
    steps: int = 1,
    seed: int = 0,
    batch_size: int = 256,
    first_batch: int = 0,
) -> torch.Tensor:
    """One image per label from the student in ``steps`` passes: uint8 (N, H, W, C) on the CPU.
    Batch b's noise comes from a CPU generator seeded ``seed·1_000_003 + first_batch + b``
    (device-independent; ``first_batch`` continues a longer run chunk by chunk)."""
    from models.dd import code_space

    device = student.codebook_VD.device
    _, factor = code_space(tokenizer)
    images = []
    for b, start in enumerate(range(0, len(labels_N), batch_size)):
        labels_B = labels_N[start : start + batch_size]
        generator = torch.Generator().manual_seed(seed * 1_000_003 + first_batch + b)
        noise_BLD = torch.randn(len(labels_B), student.seq_len, student.dd.code_dim, generator=generator)
        _, vectors_BLD = student.sample(noise_BLD.to(device), labels_B.to(device), steps=steps)
        x_BCHW = decode_vectors(tokenizer, vectors_BLD, factor)
        images.append(((x_BCHW + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu())
    return torch.cat(images)


@torch.no_grad()
def token_latency_ms(
    model: nn.Module,
    labels_N: torch.Tensor,
    *,
    steps: int | None = None,
    cfg_scale: float | list[float] = 1.0,
    seed: int = 0,
) -> float:
    """Mean milliseconds to generate ONE image's tokens, one label at a time (batch 1), decode
    excluded: an AR teacher's KV-cached ``generate`` at guidance ``cfg_scale`` (``steps`` None), or a
    student's ``sample`` in ``steps`` passes, its noise drawn inside the timed call. The decoder
    is the same for both, so this is the part a distilled student changes. Latency rather than
    throughput is where the cut in sequential passes shows: on a GPU each small pass is
    latency-bound; on a CPU the FLOPs of the student's all-token pass still count. One untimed
    call first (warm-up)."""
    import time

    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)

    def one(label_1: torch.Tensor) -> None:
        if steps is None:
            model.generate(label_1, cfg_scale=cfg_scale, generator=torch.Generator(device=device).manual_seed(seed))
        else:
            noise_1LD = torch.randn(1, model.seq_len, model.dd.code_dim, generator=generator)
            model.sample(noise_1LD.to(device), label_1, steps=steps)

    labels_N = labels_N.to(device)
    one(labels_N[:1])
    start = time.perf_counter()
    for i in range(len(labels_N)):
        one(labels_N[i : i + 1])
    return 1e3 * (time.perf_counter() - start) / len(labels_N)
