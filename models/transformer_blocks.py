"""Transformer pieces shared by the AR models (``gpt.py``, ``var.py``).

Pre-norm Llama-style parts, all bias-free:
- ``RMSNorm``: root-mean-square norm in (at least) fp32 with a hand-written backward.
- ``Dropout``: ``nn.Dropout`` with a cheaper mask on CPU.
- ``SwiGLU``: ``down(silu(gate(x)) * up(x))`` with gate and up fused into one matmul.
- ``SelfAttention``: fused qkv projection, optional rotary positions, ``F.scaled_dot_product_attention``
  (flash kernel on CPU and GPU), optional preallocated ``KVCache`` written in place for decoding.
- ``TransformerBlock``: ``h = x + drop(attn(norm(x)))``, ``out = h + drop(ffn(norm(h)))``.
- 2D rotary tables (``grid_rotation``) and ``apply_rotary``. Rotations are unit complex numbers
  ``exp(i·angle)`` of shape (L, head_dim/2): dims (2j, 2j+1) of each head form one complex number
  that is multiplied by entry j. A zero angle is the identity.

Next-scale (VAR) pieces, LayerNorm without affine and biased Linears as in VAR:
- ``scale_levels`` / ``block_causal_mask``: full attention within a scale, causal across scales.
- ``ScaleAttention``: query/value biases, optional cosine attention with a per-head temperature.
- ``AdaLNBlock`` / ``AdaLNBeforeHead``: norms modulated per sample by the class condition.
- ``GeluMLP``, ``DropPath``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def swiglu_hidden_width(width: int, mlp_ratio: float, multiple_of: int) -> int:
    """Hidden width of a SwiGLU FFN: 2/3 of ``mlp_ratio·width`` (so it costs what a plain MLP with
    ratio ``mlp_ratio`` costs), rounded up to a multiple of ``multiple_of`` for matmul-friendly sizes."""
    hidden = int(2 * mlp_ratio * width / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class DepthScaled:
    """Mixin for model configs with ``depth``, ``width`` and ``heads`` fields: the one ``depth`` knob
    sets width 64·depth and depth heads (head_dim 64), unless width / heads are given."""

    depth: int
    width: int | None
    heads: int | None

    @property
    def model_width(self) -> int:
        return self.width if self.width is not None else 64 * self.depth

    @property
    def num_heads(self) -> int:
        return self.heads if self.heads is not None else self.depth

    @property
    def head_dim(self) -> int:
        return self.model_width // self.num_heads

    def resolve_depth_scaling(self) -> None:
        """Fill in the derived width and heads (call first in ``__post_init__``), so the saved
        architecture records the sizes the model has, whichever of them params.yaml set."""
        object.__setattr__(self, "width", self.model_width)
        object.__setattr__(self, "heads", self.num_heads)


class ClassConditionalAR:
    """What GPT and VAR share beyond their layers: the null class for CFG, label dropout, the
    teacher-forced sequence log-prob and AdamW parameter groups. Needs ``self.config`` with
    ``num_classes`` and ``class_dropout``, and ``self.forward(tokens, labels, label_dropout=...)``."""

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def null_class(self) -> int:
        """The unconditional label, used for classifier-free guidance."""
        return self.config.num_classes

    def drop_labels(self, labels_B: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Replace each label by the null class with probability ``class_dropout``."""
        drop_B = torch.rand(labels_B.shape, generator=generator, device=labels_B.device)
        return labels_B.masked_fill(drop_B < self.config.class_dropout, self.null_class)

    def sequence_log_prob(self, tokens_BL: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
        """log p(tokens | label) summed over the sequence, fp32, shape (B,). Labels are never
        dropped here; dropout layers follow the module's train/eval mode."""
        logits_BLV = self.forward(tokens_BL, labels_B, label_dropout=False)
        # cross_entropy is a fused log_softmax + gather
        nll_BL = F.cross_entropy(logits_BLV.float().transpose(1, 2), tokens_BL, reduction="none")
        return -nll_BL.sum(dim=1)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay on matmul weights; none on norms, biases, embeddings and the other
        vector or table parameters (positions, temperatures)."""
        decay, no_decay = [], []
        for module in self.modules():
            for param in module.parameters(recurse=False):
                is_matmul = isinstance(module, nn.Linear) and param.ndim == 2
                (decay if is_matmul else no_decay).append(param)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class _RMSNormFunction(torch.autograd.Function):
    """RMS norm with a hand-written backward: 3 passes over the activations forward and 7 backward,
    against ~4 and ~11 for autograd through ``F.rms_norm``'s composite (the norm runs 2·depth + 1
    times per step, and on CPU these passes are a visible share of the step)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = _at_least_fp32(x)
        # 1/rms from one fused reduction: ||x||² / C is the mean square
        mean_square = torch.linalg.vector_norm(x32, dim=-1, keepdim=True).square_().div_(x.shape[-1])
        inv_rms = mean_square.add_(eps).rsqrt_()
        normed = x32 * inv_rms
        ctx.save_for_backward(normed, inv_rms, weight)
        ctx.input_dtype = x.dtype
        return (normed * _at_least_fp32(weight)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        normed, inv_rms, weight = ctx.saved_tensors
        grad_out = _at_least_fp32(grad_out)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_out * normed).flatten(0, -2).sum(0).to(weight.dtype)
        grad_normed = grad_out * _at_least_fp32(weight)
        # d normed / d x = (I - normed normedᵀ / C) / rms
        mean_dot = (grad_normed * normed).sum(dim=-1, keepdim=True).div_(normed.shape[-1])
        grad_x = torch.addcmul(grad_normed, normed, mean_dot, value=-1.0).mul_(inv_rms)
        return grad_x.to(ctx.input_dtype), grad_weight, None


class RMSNorm(nn.Module):
    """RMS norm with a learnable gain, computed in (at least) fp32 and cast back to the input dtype."""

    def __init__(self, width: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFunction.apply(x, self.weight, self.eps)


class Dropout(nn.Dropout):
    """``nn.Dropout`` with the same semantics; on CPU the keep-mask comes from ``torch.rand``, which
    is twice as fast as the single-threaded ``bernoulli_`` inside ``F.dropout`` (at 2 threads
    that kernel alone was ~7% of a small GPT's training step)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or self.p == 1.0 or x.device.type != "cpu":
            return super().forward(x)
        keep = torch.rand_like(x) >= self.p
        return x * keep.to(x.dtype).mul_(1.0 / (1.0 - self.p))


class SwiGLU(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        # gate and up are one Linear so the FFN's first matmul is a single, wider one
        self.gate_up = nn.Linear(width, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


# ---------------------------------------------------------------------------------------------
# rotary positions


def rotary_frequencies(num_pairs: int, base: float) -> torch.Tensor:
    """Angular frequencies ``base^(-j/num_pairs)``, j < num_pairs, in radians per position (fp32)."""
    return base ** (-torch.arange(num_pairs, dtype=torch.float32) / num_pairs)


def grid_rotation(
    grid: tuple[int, int],
    head_dim: int,
    base: float,
    prefix: int = 1,
    device: torch.device | None = None,
    *,
    zero_prefix: bool = False,
) -> torch.Tensor:
    """2D rotary table for ``prefix`` non-grid positions followed by an h×w grid in raster order.

    Returns complex64 of shape (prefix + h·w, head_dim/2). The first half of each head's pairs
    rotates with the row index, the second half with the column index, each half with frequencies
    ``base^(-2j/(head_dim/2))``. Prefix positions (e.g. a class token) get the identity rotation,
    or with ``zero_prefix`` the zero "rotation" of LlamaGen's table (cos = sin = 0), which zeroes
    the prefix's queries and keys: its attention logit is always 0 while its value still flows.
    """
    if head_dim % 4:
        raise ValueError(f"2D rotary positions need head_dim divisible by 4, got {head_dim}")
    height, width = grid
    freqs = rotary_frequencies(head_dim // 4, base).to(device)
    rows = torch.arange(height, device=device, dtype=torch.float32).repeat_interleave(width)
    cols = torch.arange(width, device=device, dtype=torch.float32).repeat(height)
    angles = torch.cat([torch.outer(rows, freqs), torch.outer(cols, freqs)], dim=1)
    angles = torch.cat([angles.new_zeros(prefix, angles.shape[1]), angles], dim=0)
    magnitude = torch.ones_like(angles)
    if zero_prefix:
        magnitude[:prefix] = 0.0
    return torch.polar(magnitude, angles)


def apply_rotary(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (2j, 2j+1) of the last dim of ``x`` by ``rotation`` (complex, broadcastable to
    x's shape with the last dim halved): one complex multiply on a view of x, no copies on the way
    in. Half precision is rotated in fp32 and cast back. Returns a new contiguous tensor."""
    pairs = torch.view_as_complex(_at_least_fp32(x).unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)


# ---------------------------------------------------------------------------------------------
# attention


class KVCache:
    """Keys and values of one attention layer for decoding, preallocated for ``max_len`` positions.

    ``append`` copies the new positions into the buffers in place and returns views over every
    position filled so far, so a decoding step costs O(new positions) in copies, not O(cache).
    """

    def __init__(
        self,
        batch: int,
        heads: int,
        max_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | None = None,
    ):
        self.keys_BHSD = torch.empty(batch, heads, max_len, head_dim, dtype=dtype, device=device)
        self.values_BHSD = torch.empty_like(self.keys_BHSD)
        self.length = 0  # positions filled

    def append(self, keys_BHTD: torch.Tensor, values_BHTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + keys_BHTD.shape[2]
        if end > self.keys_BHSD.shape[2]:
            raise ValueError(f"KV cache holds {self.keys_BHSD.shape[2]} positions, asked for {end}")
        self.keys_BHSD[:, :, self.length : end] = keys_BHTD
        self.values_BHSD[:, :, self.length : end] = values_BHTD
        self.length = end
        return self.keys_BHSD[:, :, :end], self.values_BHSD[:, :, :end]


class StaticKVCache(KVCache):
    """A ``KVCache`` of fixed shape for a compiled decoding step (gpt-fast's static cache).

    The position written is a tensor (``position``, int64 (1,), shared by every layer's cache and
    advanced by the caller in place), ``append`` writes there with ``index_copy_`` and returns the
    full ``max_len`` buffers, and ``mask`` hides the slots not written yet. Every step then has
    the same shapes, so ``torch.compile`` builds the step once for a whole sequence instead of
    once per length. Costs attention over all ``max_len`` slots at every step.
    """

    def __init__(self, *args, position: torch.Tensor, **kwargs):
        super().__init__(*args, **kwargs)
        # masked slots still enter the matmuls: zeros, never uninitialised memory (NaN * 0 = NaN)
        self.keys_BHSD.zero_()
        self.values_BHSD.zero_()
        self.slots_S = torch.arange(self.keys_BHSD.shape[2], device=self.keys_BHSD.device)
        self.position = position

    def append(self, keys_BH1D: torch.Tensor, values_BH1D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys_BHSD.index_copy_(2, self.position, keys_BH1D)
        self.values_BHSD.index_copy_(2, self.position, values_BH1D)
        return self.keys_BHSD, self.values_BHSD

    def mask(self) -> torch.Tensor:
        """bool (1, 1, 1, max_len): True where a position has been written (up to ``position``)."""
        return (self.slots_S <= self.position)[None, None, None]


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)

    def forward(
        self,
        x_BLC: torch.Tensor,
        rotation: torch.Tensor | None = None,
        *,
        cache: KVCache | StaticKVCache | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """``rotation`` (L, head_dim/2) complex rotates queries and keys (None: no rotary positions).

        With a ``cache`` the L new positions are appended and attend to every cached position plus
        themselves; ``attn_mask`` (broadcastable to (B, heads, L, cached + L), True = attend) then
        restricts that, and without one every new position sees all of them (one-token decoding,
        or VAR's whole-scale steps).
        """
        B, L, C = x_BLC.shape
        # one unbind (its backward is a single stack) rather than slices, whose backward
        # zero-fills and copies a full qkv-sized gradient per slice
        q_BLHD, k_BLHD, v_BLHD = self.qkv(x_BLC).view(B, L, 3, self.heads, C // self.heads).unbind(2)
        if rotation is not None:
            rotation_L1D = rotation[:, None]
            q_BLHD, k_BLHD = apply_rotary(q_BLHD, rotation_L1D), apply_rotary(k_BLHD, rotation_L1D)
        # (B, heads, L, head_dim) views: SDPA reads strided inputs without a copy
        q, k, v = (t.transpose(1, 2) for t in (q_BLHD, k_BLHD, v_BLHD))
        if cache is not None:
            k, v = cache.append(k, v)
        if cache is not None and L == 1 and attn_mask is None:
            # one query per row sees every cached key: two batched matmuls, no mask; on CPU this
            # beats the flash kernel, whose per-call setup dominates at one query
            weights_BH1S = (q @ k.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5).softmax(dim=-1)
            out_BHLD = weights_BH1S @ v
        else:
            out_BHLD = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.proj(out_BHLD.transpose(1, 2).reshape(B, L, C))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``h = x + drop(attn(norm(x)))``, ``out = h + drop(ffn(norm(h)))``."""

    def __init__(
        self,
        width: int,
        heads: int,
        ffn_hidden: int,
        *,
        resid_dropout: float = 0.0,
        ffn_dropout: float = 0.0,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.attn_norm = RMSNorm(width, norm_eps)
        self.attn = SelfAttention(width, heads)
        self.attn_dropout = Dropout(resid_dropout)
        self.ffn_norm = RMSNorm(width, norm_eps)
        self.ffn = SwiGLU(width, ffn_hidden)
        self.ffn_dropout = Dropout(ffn_dropout)

    def forward(
        self,
        x_BLC: torch.Tensor,
        rotation: torch.Tensor | None = None,
        *,
        cache: KVCache | StaticKVCache | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        attended = self.attn(self.attn_norm(x_BLC), rotation, cache=cache, attn_mask=attn_mask, is_causal=is_causal)
        h_BLC = x_BLC + self.attn_dropout(attended)
        return h_BLC + self.ffn_dropout(self.ffn(self.ffn_norm(h_BLC)))


# ---------------------------------------------------------------------------------------------
# next-scale (VAR) pieces: block-causal mask, AdaLN-conditioned blocks


def scale_levels(sides: tuple[int, ...], device: torch.device | None = None) -> torch.Tensor:
    """Scale index of every position of a coarse-to-fine token sequence, (Σ s_k²,) int64."""
    # built from a Python list: no data-dependent op, so it also works under a meta device
    return torch.tensor([level for level, side in enumerate(sides) for _ in range(side * side)], device=device)


def block_causal_mask(sides: tuple[int, ...], device: torch.device | None = None) -> torch.Tensor:
    """(L, L) bool, True = attend: position i sees j iff level(j) ≤ level(i), i.e. full attention
    within a scale and causal across scales (VAR's ``attn_bias_for_masking``)."""
    levels_L = scale_levels(sides, device)
    return levels_L[None, :] <= levels_L[:, None]


class DropPath(nn.Module):
    """Stochastic depth: zero a residual branch for a whole sample with probability ``p`` (training
    only), scaling kept samples by 1/(1 − p)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device) >= self.p
        return x * keep.to(x.dtype).div_(1.0 - self.p)


class GeluMLP(nn.Module):
    """VAR's FFN: ``fc2(gelu_tanh(fc1(x)))`` with biases."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class ScaleAttention(nn.Module):
    """VAR's self-attention: fused bias-free qkv plus learnable query and value biases (the key bias
    is zero: a key bias shifts every score of a query equally, so softmax ignores it), output
    projection with bias.

    ``l2_norm=False``: softmax scale 0.25/√head_dim (VAR's, 4× below the usual). ``l2_norm=True``:
    cosine attention, queries and keys L2-normalised per head and queries multiplied by a learnable
    per-head temperature exp(min(log_temperature, log 100)), initialised to 4; softmax scale 1.
    """

    def __init__(self, width: int, heads: int, *, l2_norm: bool = False):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads, self.l2_norm = heads, l2_norm
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.query_bias = nn.Parameter(torch.zeros(width))
        self.value_bias = nn.Parameter(torch.zeros(width))
        if l2_norm:
            self.log_temperature = nn.Parameter(torch.full((heads,), 4.0).log())
        self.proj = nn.Linear(width, width)

    def forward(
        self, x_BLC: torch.Tensor, *, cache: KVCache | None = None, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """With a ``cache`` the L new positions are appended and attend to every cached position
        plus themselves (one whole scale per decoding step); ``attn_mask`` (L, cached + L) bool,
        True = attend, restricts that (the block-causal mask in training)."""
        B, L, C = x_BLC.shape
        bias = torch.cat([self.query_bias, torch.zeros_like(self.query_bias), self.value_bias])
        qkv_BL3HD = F.linear(x_BLC, self.qkv.weight, bias).view(B, L, 3, self.heads, C // self.heads)
        q, k, v = (t.transpose(1, 2) for t in qkv_BL3HD.unbind(2))  # (B, heads, L, head_dim) views
        if self.l2_norm:
            temperature_H11 = self.log_temperature.clamp(max=math.log(100.0)).exp()[:, None, None]
            q, k = F.normalize(q, dim=-1) * temperature_H11, F.normalize(k, dim=-1)
            scale = 1.0
        else:
            scale = 0.25 / math.sqrt(C // self.heads)
        if cache is not None:
            k, v = cache.append(k, v)
        out_BHLD = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
        return self.proj(out_BHLD.transpose(1, 2).reshape(B, L, C))


class AdaLNBlock(nn.Module):
    """VAR's ``AdaLNSelfAttn``: a pre-norm block whose LayerNorms (no affine) are modulated per
    sample by the condition. ``SiLU → Linear(cond_width → 6·width)`` gives γ1, γ2, s1, s2, b1, b2:

        x = x + drop_path(drop(attn(LN(x)·(1 + s1) + b1)) · γ1)
        x = x + drop_path(drop(ffn(LN(x)·(1 + s2) + b2)) · γ2)

    The modulation rows are ordered γ1, γ2 (first 2·width), then s1, s2, b1, b2, as in VAR, so the
    γ part can be initialised near zero (adaLN-Zero-like residual branches).
    """

    def __init__(
        self,
        width: int,
        cond_width: int,
        heads: int,
        ffn_hidden: int,
        *,
        drop_path: float = 0.0,
        resid_dropout: float = 0.0,
        ffn_dropout: float = 0.0,
        attn_l2_norm: bool = False,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.width = width
        self.norm = nn.LayerNorm(width, eps=norm_eps, elementwise_affine=False)
        self.attn = ScaleAttention(width, heads, l2_norm=attn_l2_norm)
        self.attn_dropout = Dropout(resid_dropout)
        self.ffn = GeluMLP(width, ffn_hidden)
        self.ffn_dropout = Dropout(ffn_dropout)
        self.drop_path = DropPath(drop_path)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_width, 6 * width))

    def forward(
        self,
        x_BLC: torch.Tensor,
        cond_BC: torch.Tensor,
        *,
        cache: KVCache | StaticKVCache | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        modulation = self.modulation(cond_BC).view(-1, 1, 6, self.width).unbind(2)
        gamma1_B1C, gamma2_B1C, scale1_B1C, scale2_B1C, shift1_B1C, shift2_B1C = modulation
        h_BLC = self.norm(x_BLC) * (1 + scale1_B1C) + shift1_B1C
        attended = self.attn_dropout(self.attn(h_BLC, cache=cache, attn_mask=attn_mask))
        x_BLC = x_BLC + self.drop_path(attended * gamma1_B1C)
        h_BLC = self.norm(x_BLC) * (1 + scale2_B1C) + shift2_B1C
        return x_BLC + self.drop_path(self.ffn_dropout(self.ffn(h_BLC)) * gamma2_B1C)


class AdaLNBeforeHead(nn.Module):
    """VAR's final norm: ``LN(x)·(1 + scale) + shift`` with (scale, shift) from ``SiLU → Linear``
    of the condition."""

    def __init__(self, width: int, cond_width: int, norm_eps: float = 1e-6):
        super().__init__()
        self.width = width
        self.norm = nn.LayerNorm(width, eps=norm_eps, elementwise_affine=False)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_width, 2 * width))

    def forward(self, x_BLC: torch.Tensor, cond_BC: torch.Tensor) -> torch.Tensor:
        scale_B1C, shift_B1C = self.modulation(cond_BC).view(-1, 1, 2, self.width).unbind(2)
        return self.norm(x_BLC) * (1 + scale_B1C) + shift_B1C
