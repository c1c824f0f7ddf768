"""Class-conditional next-token image transformer (LlamaGen-style GPT).

The sequence is ``[class, t_0, …, t_{L-2}]`` and position i predicts token ``t_i`` (raster order
over the h×w token grid). Pre-norm blocks with RMSNorm, SwiGLU, fused qkv and causal
``scaled_dot_product_attention``; 2D rotary positions over the grid (half of each head's dims
rotate with the row, half with the column; the class prefix is not rotated, or with
``prefix_rotation="zero"`` has its queries and keys zeroed as in LlamaGen); N(0, init_std) init
with a zero output head, so an untrained model predicts the uniform distribution.

Label ``num_classes`` is the null (unconditional) class. In training mode labels are replaced by
it with probability ``class_dropout``, which is what classifier-free guidance needs at sampling.

Shared AR interface (DESIGN.md §5, the same for ``models/var.py``):
    forward(tokens_BL, labels_B) -> logits_BLV        teacher-forced
    sequence_log_prob(tokens_BL, labels_B) -> logp_B  fp32 sum of token log-probs
    generate(labels_B, *, cfg_scale, temperature, top_k, top_p, generator) -> tokens_BL
    steps, num_classes, null_class, config_dict()
Guidance convention (models/sampling.py): logits = u + cfg_scale·(c − u); ``cfg_scale = 1.0`` is guidance-free.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from models.sampling import (
    GuidanceSchedule,
    TokenDraw,
    classifier_free_guidance,
    guidance_schedule,
    sample_tokens,
)
from models.transformer_blocks import (
    ClassConditionalAR,
    DepthScaled,
    Dropout,
    KVCache,
    RMSNorm,
    StaticKVCache,
    TransformerBlock,
    grid_rotation,
    swiglu_hidden_width,
)

PREFIX_ROTATIONS = ("identity", "zero")
# fields added after checkpoints existed: left out of config_dict() at their default, so the
# config.json (and the fingerprint) of a model that does not use them is what it always was
_OMITTED_AT_DEFAULT = {"prefix_rotation": "identity"}


@dataclass(frozen=True)
class GPTConfig(DepthScaled):
    """Architecture of a ``GPT``; ``GPT(GPTConfig(**model.config_dict()))`` rebuilds a model."""

    vocab_size: int
    """Token vocabulary (the tokenizer's codebook size)."""
    seq_len: int
    """Tokens per image, = grid height · grid width."""
    num_classes: int
    """Real classes; label ``num_classes`` is the extra null class used for guidance."""
    grid: tuple[int, int] | None = None
    """Token grid (height, width) for the 2D rotary positions; None: square, √seq_len per side."""
    depth: int = 4
    """Number of transformer blocks: the one scale knob that width and heads derive from."""
    width: int | None = None
    """Embedding width; None: 64·depth."""
    heads: int | None = None
    """Attention heads; None: depth (head_dim 64 with the default width)."""
    mlp_ratio: float = 4.0
    """SwiGLU hidden width is 2/3 of mlp_ratio·width (the cost of a plain MLP with this ratio)..."""
    multiple_of: int = 32
    """...rounded up to a multiple of this (LlamaGen's 256 inflates small models)."""
    class_dropout: float = 0.1
    """Probability that a training label is replaced by the null class."""
    token_dropout: float = 0.1
    """Dropout on the input embeddings (class token included)."""
    resid_dropout: float = 0.1
    """Dropout on each attention output before the residual add."""
    ffn_dropout: float = 0.1
    """Dropout on each FFN output before the residual add."""
    rope_base: float = 10000.0
    """Rotary base: the slowest pair turns by base^(-(1 - 4/head_dim)) radians per row or column."""
    init_std: float = 0.02
    """Std of the normal init of every Linear and Embedding (the output head starts at zero)."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    prefix_rotation: str = "identity"
    """Rotary table row of the class prefix: "identity" (not rotated) or "zero" (LlamaGen's
    released models: cos = sin = 0 zeroes the class token's queries and keys)."""

    def __post_init__(self):
        self.resolve_depth_scaling()
        if self.grid is None:
            side = math.isqrt(self.seq_len)
            if side * side != self.seq_len:
                raise ValueError(f"seq_len {self.seq_len} is not square: give grid=(height, width)")
            object.__setattr__(self, "grid", (side, side))
        else:
            object.__setattr__(self, "grid", tuple(int(n) for n in self.grid))
        if len(self.grid) != 2 or self.grid[0] * self.grid[1] != self.seq_len:
            raise ValueError(f"grid {self.grid} does not hold seq_len {self.seq_len} tokens")
        for name in ("vocab_size", "num_classes", "depth", "model_width", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.model_width % self.num_heads or self.head_dim % 4:
            raise ValueError(
                f"width {self.model_width} / heads {self.num_heads} must give a head_dim divisible by 4 "
                "(2D rotary positions rotate pairs along two axes)"
            )
        if self.prefix_rotation not in PREFIX_ROTATIONS:
            raise ValueError(f"prefix_rotation must be one of {PREFIX_ROTATIONS}, got {self.prefix_rotation!r}")
        for name in ("class_dropout", "token_dropout", "resid_dropout", "ffn_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")

    @property
    def ffn_hidden(self) -> int:
        return swiglu_hidden_width(self.model_width, self.mlp_ratio, self.multiple_of)


class GPT(ClassConditionalAR, nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        width = config.model_width
        # 1. inputs: class prefix (num_classes + 1 rows, the last one is the null class) and tokens
        self.class_embedding = nn.Embedding(config.num_classes + 1, width)
        self.token_embedding = nn.Embedding(config.vocab_size, width)
        self.token_dropout = Dropout(config.token_dropout)
        # 2. blocks
        self.blocks = nn.ModuleList(
            TransformerBlock(
                width,
                config.num_heads,
                config.ffn_hidden,
                resid_dropout=config.resid_dropout,
                ffn_dropout=config.ffn_dropout,
                norm_eps=config.norm_eps,
            )
            for _ in range(config.depth)
        )
        # 3. output
        self.final_norm = RMSNorm(width, config.norm_eps)
        self.head = nn.Linear(width, config.vocab_size, bias=False)
        self._init_weights()

    def _init_weights(self):
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=self.config.init_std)
        # zero head: the untrained model predicts uniform tokens, so the first loss is exactly log V
        nn.init.zeros_(self.head.weight)

    # -- interface facts ------------------------------------------------------------------------

    @property
    def steps(self) -> int:
        """Sequential forward passes one sample needs: one per token."""
        return self.config.seq_len

    def config_dict(self) -> dict:
        """JSON-serialisable architecture; ``GPT(GPTConfig(**d))`` rebuilds this model."""
        d = dataclasses.asdict(self.config)
        d["grid"] = list(self.config.grid)
        for name, default in _OMITTED_AT_DEFAULT.items():
            if d[name] == default:
                del d[name]
        return d

    def _rotation(self, length: int, device: torch.device) -> torch.Tensor:
        # rebuilt per call (a few tiny ops) rather than kept as a buffer: a complex buffer would be
        # truncated to real by model.to(dtype)
        config = self.config
        zero_prefix = config.prefix_rotation == "zero"
        return grid_rotation(
            config.grid, config.head_dim, config.rope_base, prefix=1, device=device, zero_prefix=zero_prefix
        )[:length]

    # -- training phase ---------------------------------------------------------------------------

    def forward(
        self,
        tokens_BL: torch.Tensor,
        labels_B: torch.Tensor,
        *,
        label_dropout: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Teacher-forced logits_BLV: position i sees the class and tokens < i and predicts token i.

        In training mode (and with ``label_dropout``) labels are dropped to the null class with
        probability ``class_dropout``, drawn from ``generator`` (torch's global RNG when None).
        ``tokens_BL`` may be a prefix of the full sequence (L ≤ seq_len).
        """
        return self.head(self.hidden(tokens_BL, labels_B, label_dropout=label_dropout, generator=generator))

    def hidden(
        self,
        tokens_BL: torch.Tensor,
        labels_B: torch.Tensor,
        *,
        label_dropout: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The trunk's output h_BLC before the logits head (after the final norm): ``forward`` is
        ``head(hidden(...))``; DD2's score heads read it."""
        L = tokens_BL.shape[1]
        if L > self.config.seq_len:
            raise ValueError(f"got {L} tokens, the model holds {self.config.seq_len}")
        if label_dropout and self.training and self.config.class_dropout > 0:
            labels_B = self.drop_labels(labels_B, generator)
        x_BLC = torch.cat([self.class_embedding(labels_B)[:, None], self.token_embedding(tokens_BL[:, :-1])], dim=1)
        x_BLC = self.token_dropout(x_BLC)
        rotation = self._rotation(L, tokens_BL.device)
        for block in self.blocks:
            x_BLC = block(x_BLC, rotation, is_causal=True)
        return self.final_norm(x_BLC)

    # -- sampling phase ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        labels_B: torch.Tensor,
        *,
        cfg_scale: GuidanceSchedule = 1.0,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        draw: TokenDraw | None = None,
        compiled: bool | str | Callable = False,
    ) -> torch.Tensor:
        """Sample tokens_BL (int64) for ``labels_B`` one token per step with a preallocated KV cache.

        ``cfg_scale``: guidance scale, logits = u + cfg_scale·(c − u) with c conditional and u null-class
        logits. ``1.0`` is guidance-free and runs only the conditional batch; any other value (or
        a per-step list/tensor/callable ``step -> scale``, see ``sampling.guidance_schedule``)
        runs conditional and null class together as one batch of 2B, and the token drawn from the
        guided logits is fed to both halves. ``temperature`` (0 = greedy), ``top_k`` (0 = off),
        ``top_p`` (1.0 = off) filter the logits; tokens are drawn with ``torch.multinomial`` from
        ``generator``. ``draw(step, guided fp32 logits (B, V)) -> tokens`` replaces that draw
        (the temperature and filters are then the callable's; models/dd.py's flow-matching map is
        one). Dropout is off while sampling; the train/eval mode is restored afterwards.
        ``compiled``: run each one-token step through ``torch.compile`` over a static KV cache
        (``transformer_blocks.StaticKVCache``), compiled once per model and batch shape, not per
        length (True: Inductor; else the ``torch.compile`` backend given); the drawing stays
        eager, so the same ``generator`` draws the same way.
        """
        scales = guidance_schedule(cfg_scale, self.steps)
        guided = any(scale != 1.0 for scale in scales)
        B, L = labels_B.shape[0], self.config.seq_len
        if guided:
            labels_B = torch.cat([labels_B, torch.full_like(labels_B, self.null_class)])
        param = self.head.weight
        shape = dict(batch=labels_B.shape[0], heads=self.config.num_heads, max_len=L, head_dim=self.config.head_dim,
                     dtype=param.dtype, device=param.device)  # fmt: skip
        if compiled:
            position_1 = torch.zeros(1, dtype=torch.long, device=param.device)
            caches = [StaticKVCache(**shape, position=position_1) for _ in self.blocks]
            decode = functools.partial(compiled_decode_step("inductor" if compiled is True else compiled), self)
        else:
            caches = [KVCache(**shape) for _ in self.blocks]
            decode = self.decode_step
        rotation = self._rotation(L, param.device)
        tokens_BL = torch.empty(B, L, dtype=torch.long, device=param.device)
        x_B1C = self.class_embedding(labels_B)[:, None]
        was_training = self.training
        self.eval()
        try:
            for step in range(L):
                if compiled:
                    position_1.fill_(step)
                logits_BV = decode(x_B1C, rotation[step : step + 1], caches)
                if guided:
                    cond_BV, uncond_BV = logits_BV.chunk(2)
                    logits_BV = classifier_free_guidance(cond_BV, uncond_BV, scales[step])
                if draw is not None:
                    next_B = draw(step, logits_BV)
                else:
                    next_B = sample_tokens(
                        logits_BV, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
                    )
                tokens_BL[:, step] = next_B
                x_B1C = self.token_embedding(next_B.repeat(2) if guided else next_B)[:, None]
        finally:
            self.train(was_training)
        return tokens_BL

    def decode_step(
        self, x_B1C: torch.Tensor, rotation_1: torch.Tensor, caches: list[KVCache] | list[StaticKVCache]
    ) -> torch.Tensor:
        """One sampling step: the new position's input x_B1C through every block (appending to
        ``caches``) -> fp32 logits_BV. With static caches every cached slot is attended to under
        their mask."""
        mask = caches[0].mask() if isinstance(caches[0], StaticKVCache) else None
        for block, cache in zip(self.blocks, caches, strict=True):
            x_B1C = block(x_B1C, rotation_1, cache=cache, attn_mask=mask)
        return self.head(self.final_norm(x_B1C[:, 0])).float()

    # -- optimisation helpers ---------------------------------------------------------------------

    def num_params(self, *, embeddings: bool = True) -> int:
        """Parameter count; ``embeddings=False`` leaves out the class and token tables (lookups)."""
        skip = set() if embeddings else {id(self.class_embedding.weight), id(self.token_embedding.weight)}
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward) for MFU, PaLM's estimate:
        ``6·N + 12·depth·width·seq_len`` where N counts non-embedding parameters (output head
        included) and the second term is the QKᵀ and AV matmuls (not halved for causality).
        Multiply by B·seq_len tokens for a step."""
        config = self.config
        attention = 12 * config.depth * config.model_width * config.seq_len
        return 6 * self.num_params(embeddings=False) + attention


_COMPILED_STEPS: dict[str | Callable, Callable] = {}


def compiled_decode_step(backend: str | Callable = "inductor") -> Callable:
    """``GPT.decode_step`` (unbound: call it with the model first) through ``torch.compile`` with
    ``backend`` and static shapes, built once per backend. Unbound, one compiled step serves every
    GPT of the same structure and keeps none of them alive; torch recompiles only for another
    structure, batch size or dtype."""
    if backend not in _COMPILED_STEPS:
        _COMPILED_STEPS[backend] = torch.compile(GPT.decode_step, dynamic=False, backend=backend)
    return _COMPILED_STEPS[backend]
