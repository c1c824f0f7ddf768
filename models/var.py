"""Class-conditional next-scale image transformer (VAR-style).

Tokens come from the multi-scale residual quantizer (models/residual_quantizer.py): scales
s_0 < … < s_{K-1}, concatenated coarse -> fine, each row-major, L = Σ s_k². Position i predicts
token i, and one sampling step predicts a whole scale (l = s_k² positions at once).

The transformer never sees token indices. Its input is ``[start ; word_embed(teacher_forcing_input)]``:
the s_0² start positions hold the class embedding plus a learned start-position embedding, and
the positions of scale k+1 hold the quantizer's reconstruction after scales 0..k area-downsampled
to s_{k+1} (a Linear C_vae -> width). A learned absolute position embedding over all L positions
and a level (scale-index) embedding are added. Blocks are VAR's AdaLN blocks (LayerNorm without
affine, modulated per sample by the class embedding), the final norm is AdaLN too; attention is
block-causal (full within a scale, causal across scales), a KV cache makes it implicit when
sampling. Init follows VAR's ``init_weights``: trunc-normal √(1/(3·width)), head ×0.02, AdaLN
shift/scale ×0.5 and gates ×``init_adaln_gamma``, so the untrained model predicts ≈ uniform.

The frozen quantizer is given at construction and held outside the module tree: it is not in
``parameters()`` or ``state_dict()`` (DDP/FSDP wrap only the transformer; a checkpoint is the
transformer's weights, the quantizer comes from the tokenizer's own checkpoint), yet ``.to(device)``
moves it along (device only: the quantizer always computes in fp32).

Label ``num_classes`` is the null (unconditional) class. In training mode labels are replaced by
it with probability ``class_dropout``, which is what classifier-free guidance needs at sampling.

Shared AR interface (DESIGN.md §5, the same as ``models/gpt.py``):
    forward(tokens_BL, labels_B) -> logits_BLV        teacher-forced
    sequence_log_prob(tokens_BL, labels_B) -> logp_B  fp32 sum of token log-probs
    generate(labels_B, *, cfg_scale, temperature, top_k, top_p, generator) -> tokens_BL
    steps, num_classes, null_class, config_dict()
plus ``teacher_forcing_input(tokens_BL)`` and ``forward_from_inputs`` (student-forced rollouts).
Guidance convention (models/sampling.py): logits = u + cfg_scale·(c − u); ``cfg_scale = 1.0`` is guidance-free;
VAR's ramp over scales is ``cfg_scale=sampling.linear_guidance_ramp(scale, model.steps)``.
Shape letter l: the s_k² positions of one scale.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.residual_quantizer import MultiScaleResidualQuantizer
from models.sampling import (
    GuidanceSchedule,
    TokenDraw,
    classifier_free_guidance,
    guidance_schedule,
    sample_tokens,
)
from models.transformer_blocks import (
    AdaLNBeforeHead,
    AdaLNBlock,
    ClassConditionalAR,
    DepthScaled,
    KVCache,
    block_causal_mask,
    scale_levels,
)


@dataclass(frozen=True)
class VARConfig(DepthScaled):
    """Architecture of a ``VAR``; ``VAR(VARConfig(**model.config_dict()), quantizer)`` rebuilds it."""

    vocab_size: int
    """Token vocabulary (the quantizer's codebook size)."""
    scales: tuple[int, ...]
    """Side of each scale's token grid, coarse -> fine (the quantizer's schedule)."""
    embed_dim: int
    """Width C of the quantizer's codes: the teacher-forcing input width."""
    num_classes: int
    """Real classes; label ``num_classes`` is the extra null class used for guidance."""
    depth: int = 4
    """Number of transformer blocks: the one scale knob that width and heads derive from."""
    width: int | None = None
    """Embedding width; None: 64·depth."""
    heads: int | None = None
    """Attention heads; None: depth (head_dim 64 with the default width)."""
    mlp_ratio: float = 4.0
    """GELU MLP hidden width = round(mlp_ratio·width)."""
    class_dropout: float = 0.1
    """Probability that a training label is replaced by the null class."""
    drop_path: float | None = None
    """Stochastic-depth rate of the last block, rising linearly from 0 at the first; None: VAR's
    0.1·depth/24."""
    resid_dropout: float = 0.0
    """Dropout on each attention output before the gate and residual add (VAR: 0)."""
    ffn_dropout: float = 0.0
    """Dropout on each MLP output before the gate and residual add (VAR: 0)."""
    attn_l2_norm: bool = False
    """Cosine attention with a learnable per-head temperature (VAR's fp16 stabiliser); off:
    dot-product attention with VAR's softmax scale 0.25/√head_dim."""
    init_std: float | None = None
    """Std of the trunc-normal init of every Linear, Embedding and position table; None:
    VAR's √(1/(3·width))."""
    init_head: float = 0.02
    """Output head weights are multiplied by this after init (bias zero): near-uniform logits."""
    init_adaln: float = 0.5
    """AdaLN shift/scale projection weights are multiplied by this after init."""
    init_adaln_gamma: float = 1e-3
    """AdaLN gate (γ) projection weights are multiplied by this: residual branches start near 0
    (VAR: 1e-3 for d16/d20 down to 1e-5 for d30)."""
    norm_eps: float = 1e-6
    """LayerNorm epsilon."""

    def __post_init__(self):
        self.resolve_depth_scaling()
        object.__setattr__(self, "scales", tuple(int(side) for side in self.scales))
        if not self.scales or min(self.scales) < 1:
            raise ValueError(f"scales must be a non-empty list of positive sides, got {list(self.scales)}")
        for name in ("vocab_size", "embed_dim", "num_classes", "depth", "model_width", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.model_width % self.num_heads:
            raise ValueError(f"width {self.model_width} is not divisible by heads {self.num_heads}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        for name in ("class_dropout", "drop_path_rate", "resid_dropout", "ffn_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name.removesuffix('_rate')} must be in [0, 1], got {getattr(self, name)}")
        if self.weight_std <= 0:
            raise ValueError(f"init_std must be > 0, got {self.init_std}")

    @property
    def ffn_hidden(self) -> int:
        return round(self.model_width * self.mlp_ratio)

    @property
    def drop_path_rate(self) -> float:
        return self.drop_path if self.drop_path is not None else 0.1 * self.depth / 24

    @property
    def weight_std(self) -> float:
        return self.init_std if self.init_std is not None else math.sqrt(1 / (3 * self.model_width))

    @property
    def seq_len(self) -> int:
        return sum(side * side for side in self.scales)

    @property
    def first_scale_tokens(self) -> int:
        return self.scales[0] ** 2


class VAR(ClassConditionalAR, nn.Module):
    def __init__(self, config: VARConfig, quantizer: MultiScaleResidualQuantizer):
        super().__init__()
        found = (tuple(quantizer.scales), quantizer.codebook_size, quantizer.embed_dim)
        if found != (config.scales, config.vocab_size, config.embed_dim):
            raise ValueError(
                f"quantizer (scales, codebook_size, embed_dim) = {found} does not match the config's "
                f"(scales, vocab_size, embed_dim) = {(config.scales, config.vocab_size, config.embed_dim)}"
            )
        self.config = config
        width = config.model_width
        # 0. the frozen quantizer, in a tuple so nn.Module does not register it (see _apply)
        self._frozen_quantizer = (quantizer.requires_grad_(False).eval(),)
        # 1. inputs: class (num_classes + 1 rows, the last is null) as start token and condition
        self.class_embedding = nn.Embedding(config.num_classes + 1, width)
        self.start_position = nn.Parameter(torch.empty(config.first_scale_tokens, width))
        self.word_embed = nn.Linear(config.embed_dim, width)
        self.position_embedding = nn.Parameter(torch.empty(config.seq_len, width))
        self.level_embedding = nn.Embedding(len(config.scales), width)
        self.register_buffer("levels_L", scale_levels(config.scales), persistent=False)
        self.register_buffer("attn_mask_LL", block_causal_mask(config.scales), persistent=False)
        # 2. blocks, stochastic depth rising linearly to drop_path_rate
        drop_rates = [config.drop_path_rate * i / max(config.depth - 1, 1) for i in range(config.depth)]
        self.blocks = nn.ModuleList(
            AdaLNBlock(
                width, width, config.num_heads, config.ffn_hidden,
                drop_path=rate, resid_dropout=config.resid_dropout, ffn_dropout=config.ffn_dropout,
                attn_l2_norm=config.attn_l2_norm, norm_eps=config.norm_eps,
            )
            for rate in drop_rates
        )  # fmt: skip
        # 3. output
        self.final_norm = AdaLNBeforeHead(width, width, config.norm_eps)
        self.head = nn.Linear(width, config.vocab_size)
        self._init_weights()

    def _init_weights(self):
        """VAR's ``init_weights``: trunc-normal everything, then scale the head, the AdaLN
        projections and the residual output projections (1/√(2·depth))."""
        config, width = self.config, self.config.model_width
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.trunc_normal_(module.weight, std=config.weight_std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.start_position, std=config.weight_std)
        nn.init.trunc_normal_(self.position_embedding, std=config.weight_std)
        with torch.no_grad():
            self.head.weight.mul_(config.init_head)
            self.final_norm.modulation[-1].weight.mul_(config.init_adaln)
            for block in self.blocks:
                block.attn.proj.weight.div_(math.sqrt(2 * config.depth))
                block.ffn.fc2.weight.div_(math.sqrt(2 * config.depth))
                modulation = block.modulation[-1].weight
                modulation[: 2 * width].mul_(config.init_adaln_gamma)  # γ1, γ2
                modulation[2 * width :].mul_(config.init_adaln)  # scales and shifts

    def _apply(self, fn, recurse=True):
        # .to(device) / .cuda() / .cpu() also move the unregistered quantizer, device only: it
        # computes in fp32 whatever dtype the transformer is cast to
        super()._apply(fn, recurse)
        device = fn(torch.empty(0, device=self.quantizer.codebook.weight.device)).device
        self.quantizer.to(device)
        return self

    # -- interface facts ------------------------------------------------------------------------

    @property
    def quantizer(self) -> MultiScaleResidualQuantizer:
        """The frozen multi-scale quantizer (not a submodule, not in the state_dict)."""
        return self._frozen_quantizer[0]

    @property
    def steps(self) -> int:
        """Sequential forward passes one sample needs: one per scale."""
        return len(self.config.scales)

    @property
    def seq_len(self) -> int:
        return self.config.seq_len

    def config_dict(self) -> dict:
        """JSON-serialisable architecture; ``VAR(VARConfig(**d), quantizer)`` rebuilds this model."""
        d = dataclasses.asdict(self.config)
        d["scales"] = list(self.config.scales)
        return d

    def _level_position(self, start: int, end: int) -> torch.Tensor:
        """Level + absolute position embeddings of positions [start, end), (end − start, C)."""
        return self.level_embedding(self.levels_L[start:end]) + self.position_embedding[start:end]

    def _start_tokens(self, cond_BC: torch.Tensor) -> torch.Tensor:
        """The first scale's input: class embedding broadcast over its s_0² positions."""
        first = self.config.first_scale_tokens
        return cond_BC[:, None] + self.start_position + self._level_position(0, first)

    # -- training phase ---------------------------------------------------------------------------

    @torch.no_grad()
    def teacher_forcing_input(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        """tokens_BL -> (B, L − s_0², embed_dim) fp32 next-scale inputs (the quantizer's)."""
        return self.quantizer.teacher_forcing_input(tokens_BL)

    def forward(
        self,
        tokens_BL: torch.Tensor,
        labels_B: torch.Tensor,
        *,
        label_dropout: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Teacher-forced logits_BLV over all L = Σ s_k² positions: position i (scale k) sees the
        class and the reconstruction from scales < k, and predicts token i.

        In training mode (and with ``label_dropout``) labels are dropped to the null class with
        probability ``class_dropout``, drawn from ``generator`` (torch's global RNG when None).
        """
        inputs = self.teacher_forcing_input(tokens_BL)
        return self.forward_from_inputs(inputs, labels_B, label_dropout=label_dropout, generator=generator)

    def forward_from_inputs(
        self,
        inputs_BLC: torch.Tensor,
        labels_B: torch.Tensor,
        *,
        label_dropout: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``forward`` from next-scale inputs (B, L − s_0², embed_dim), e.g. built from the model's
        own samples (student forcing) rather than from ground-truth tokens."""
        return self.head(self.hidden_from_inputs(inputs_BLC, labels_B, label_dropout=label_dropout,
                                                 generator=generator))  # fmt: skip

    def hidden(
        self,
        tokens_BL: torch.Tensor,
        labels_B: torch.Tensor,
        *,
        label_dropout: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The trunk's output h_BLC before the logits head (after the final AdaLN): ``forward`` is
        ``head(hidden(...))``; DD2's score heads read it."""
        inputs = self.teacher_forcing_input(tokens_BL)
        return self.hidden_from_inputs(inputs, labels_B, label_dropout=label_dropout, generator=generator)

    def hidden_from_inputs(
        self,
        inputs_BLC: torch.Tensor,
        labels_B: torch.Tensor,
        *,
        label_dropout: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``hidden`` from next-scale inputs (see ``forward_from_inputs``)."""
        expected = self.seq_len - self.config.first_scale_tokens
        if inputs_BLC.shape[1:] != (expected, self.config.embed_dim):
            raise ValueError(f"inputs must be (B, {expected}, {self.config.embed_dim}), got {tuple(inputs_BLC.shape)}")
        if label_dropout and self.training and self.config.class_dropout > 0:
            labels_B = self.drop_labels(labels_B, generator)
        cond_BC = self.class_embedding(labels_B)
        words_BLC = self.word_embed(inputs_BLC.to(self.word_embed.weight.dtype))
        first = self.config.first_scale_tokens
        x_BLC = torch.cat([self._start_tokens(cond_BC), words_BLC + self._level_position(first, self.seq_len)], dim=1)
        for block in self.blocks:
            x_BLC = block(x_BLC, cond_BC, attn_mask=self.attn_mask_LL)
        return self.final_norm(x_BLC, cond_BC)

    def scale_losses(self, logits_BLV: torch.Tensor, tokens_BL: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy per scale, (K,) fp32, coarse -> fine (for logging; VAR's training
        loss is the plain mean over all L positions)."""
        nll_BL = F.cross_entropy(logits_BLV.float().transpose(1, 2), tokens_BL, reduction="none")
        sizes = [side * side for side in self.config.scales]
        return torch.stack([nll_Bl.mean() for nll_Bl in nll_BL.split(sizes, dim=1)])

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
        """Sample tokens_BL (int64) for ``labels_B``, one whole scale per step, with a KV cache.

        ``cfg_scale``: guidance scale, logits = u + cfg_scale·(c − u) with c conditional and u null-class
        logits. ``1.0`` is guidance-free and runs only the conditional batch; any other value (or
        a per-scale list/tensor/callable ``step -> scale``, e.g. ``sampling.linear_guidance_ramp``)
        runs conditional and null class together as one batch of 2B, and the tokens drawn from the
        guided logits build the next scale's input for both halves. ``temperature`` (0 = greedy),
        ``top_k`` (0 = off), ``top_p`` (1.0 = off) filter the logits; every position of a scale is
        drawn with ``torch.multinomial`` from ``generator``. ``draw(step, guided fp32 logits
        (B, l, V)) -> tokens`` replaces that draw (the temperature and filters are then the
        callable's; models/dd.py's flow-matching map is one). Dropout is off while sampling; the
        train/eval mode is restored afterwards. ``compiled``: each scale's step (blocks and head)
        through ``torch.compile``, one graph per scale, built once per model and batch shape (True:
        Inductor; else the ``torch.compile`` backend given); the drawing and the next scale's input
        stay eager.
        """
        scales = guidance_schedule(cfg_scale, self.steps)
        guided = any(scale != 1.0 for scale in scales)
        B, config = labels_B.shape[0], self.config
        if guided:
            labels_B = torch.cat([labels_B, torch.full_like(labels_B, self.null_class)])
        param = self.head.weight
        caches = [
            KVCache(labels_B.shape[0], config.num_heads, self.seq_len, config.head_dim,
                    dtype=param.dtype, device=param.device)
            for _ in self.blocks
        ]  # fmt: skip
        tokens_BL = torch.empty(B, self.seq_len, dtype=torch.long, device=param.device)
        f_hat_BChw = self.quantizer.empty_f_hat(B)
        was_training = self.training
        self.eval()
        try:
            cond_BC = self.class_embedding(labels_B)
            x_BlC = self._start_tokens(cond_BC)
            start = 0
            backend = "inductor" if compiled is True else compiled
            decode = functools.partial(compiled_decode_step(backend), self) if compiled else self.decode_step
            for step, side in enumerate(config.scales):
                end = start + side * side
                logits_BlV = decode(x_BlC, cond_BC, caches)
                if guided:
                    cond_BlV, uncond_BlV = logits_BlV.chunk(2)
                    logits_BlV = classifier_free_guidance(cond_BlV, uncond_BlV, scales[step])
                if draw is not None:
                    tokens_Bl = draw(step, logits_BlV)
                else:
                    tokens_Bl = sample_tokens(
                        logits_BlV, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
                    )
                tokens_BL[:, start:end] = tokens_Bl
                f_hat_BChw, inputs_BlC = self.quantizer.next_scale_input(f_hat_BChw, step, tokens_Bl)
                if inputs_BlC is not None:
                    next_end = end + config.scales[step + 1] ** 2
                    x_BlC = self.word_embed(inputs_BlC.to(param.dtype)) + self._level_position(end, next_end)
                    x_BlC = x_BlC.repeat(2, 1, 1) if guided else x_BlC
                start = end
        finally:
            self.train(was_training)
        return tokens_BL

    def decode_step(self, x_BlC: torch.Tensor, cond_BC: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        """One sampling step: a whole scale's inputs x_BlC through every block (appending to
        ``caches``) -> fp32 logits_BlV."""
        for block, cache in zip(self.blocks, caches, strict=True):
            x_BlC = block(x_BlC, cond_BC, cache=cache)
        return self.head(self.final_norm(x_BlC, cond_BC)).float()

    # -- optimisation helpers ---------------------------------------------------------------------

    def _embedding_params(self) -> list[nn.Parameter]:
        return [self.class_embedding.weight, self.level_embedding.weight, self.start_position, self.position_embedding]

    def num_params(self, *, embeddings: bool = True) -> int:
        """Parameter count (the quantizer is not included); ``embeddings=False`` leaves out the
        class, level, position and start-position tables (lookups and adds, no matmuls)."""
        skip = set() if embeddings else {id(p) for p in self._embedding_params()}
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward) for MFU, PaLM's estimate:
        ``6·N + 12·depth·width·seq_len`` where N counts non-embedding parameters (word embedding
        and output head included) and the second term is the QKᵀ and AV matmuls (not halved for
        the block-causal mask). The AdaLN projections run once per sample, not per token, so
        their share of N is divided by seq_len. Multiply by B·seq_len tokens for a step."""
        config = self.config
        modulations = [block.modulation for block in self.blocks] + [self.final_norm.modulation]
        per_sample = sum(p.numel() for module in modulations for p in module.parameters())
        per_token = self.num_params(embeddings=False) - per_sample
        attention = 12 * config.depth * config.model_width * config.seq_len
        return 6 * per_token + 6 * per_sample / config.seq_len + attention


_COMPILED_STEPS: dict[str | Callable, Callable] = {}


def _one_graph_per_scale(num_scales: int):
    """Let torch.compile keep a graph per scale (VAR-d16 has 10, over dynamo's default limit of 8)."""
    return torch._dynamo.config.patch(recompile_limit=max(torch._dynamo.config.recompile_limit, num_scales + 2))


def compiled_decode_step(backend: str | Callable = "inductor") -> Callable:
    """``VAR.decode_step`` (unbound: call it with the model first) through ``torch.compile`` with
    ``backend`` and static shapes (one graph per scale: the KV cache's length is fixed at each),
    built once per backend. Unbound, the graphs serve every VAR of the same structure and keep
    none of them alive."""
    if backend not in _COMPILED_STEPS:
        compiled = torch.compile(VAR.decode_step, dynamic=False, backend=backend)

        def step(model: VAR, x_BlC: torch.Tensor, cond_BC: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
            with _one_graph_per_scale(len(model.config.scales)):
                return compiled(model, x_BlC, cond_BC, caches)

        _COMPILED_STEPS[backend] = step
    return _COMPILED_STEPS[backend]
