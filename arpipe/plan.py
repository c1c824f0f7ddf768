"""``arpipe plan``: what the params ask of the hardware, before anything runs.

For the tokenizer, the AR model (pretrain) and the evalnet, built on PyTorch's meta device (shapes
only: no memory, no weights), it reports the parameter count, the training FLOPs per optimizer
step and the expected GPU memory per device. Assumptions (also in ``arpipe plan --help``):

- FLOPs per step: the AR model's own ``flops_per_token()`` (PaLM's 6·N per token, N the
  non-embedding parameters, plus 12·depth·width·L for the attention matmuls) × batch_size × L;
  for the conv nets 3 × the forward FLOPs counted by ``torch.utils.flop_counter`` (backward ≈ 2×
  forward). The tokenizer's discriminator and perceptual loss are not counted.
- Memory per GPU: 16 bytes per parameter (fp32 weights 4, gradients 4, AdamW's two moments 8;
  FSDP divides this by the GPU count) + activations: the tensors autograd saves for backward in
  a meta-device forward at the per-GPU micro-batch (batch_size / gpus / grad_accum), in fp32,
  halved under bf16 mixed precision, without the attention score matrices (flash /
  memory-efficient attention on GPU does not store them). No activation checkpointing; CUDA
  context, allocator fragmentation and the data loader come on top (budget ~10-20%).

A released tokenizer or model (``init_from: released``) is sized from the ``model`` params, which
restate its architecture (the import refuses a file that differs); with ``steps: 0`` the stage
only imports, and the row's per-step figures are what fine-tuning it (or a post-training step
on it) costs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

BYTES_PER_PARAM = 16  # fp32 weights + grads + AdamW exp_avg + exp_avg_sq


@dataclass(frozen=True)
class ModelPlan:
    name: str
    params: int
    flops_per_step: float
    micro_batch: int
    state_bytes: float
    activation_bytes: float

    @property
    def total_bytes(self) -> float:
        return self.state_bytes + self.activation_bytes


def _saved_bytes(run_forward, skip_square: int | None = None) -> tuple[float, float]:
    """(bytes of activations autograd saves, forward FLOPs) of ``run_forward()`` on meta tensors.

    Parameters (and views of them) are weights, not activations; square ``skip_square``² trailing
    blocks are attention scores, which GPU attention kernels do not keep."""
    from torch.utils.flop_counter import FlopCounterMode

    total = [0]

    def pack(t: torch.Tensor):
        base = t._base if t._base is not None else t
        if isinstance(base, torch.nn.Parameter):
            return t
        if skip_square and t.dim() >= 2 and t.shape[-1] == t.shape[-2] == skip_square:
            return t
        total[0] += t.numel() * t.element_size()
        return t

    with FlopCounterMode(display=False) as counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run_forward()
    return float(total[0]), float(counter.get_total_flops())


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _per_gpu(batch_size: int, gpus: int, grad_accum: int = 1) -> int:
    return max(batch_size // (gpus * grad_accum), 1)


def _precision_factor(mixed_precision: str) -> float:
    return 0.5 if mixed_precision in ("bf16", "fp16") else 1.0


def meta_models(params: dict[str, Any], num_classes: int) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """(tokenizer, AR model, evalnet) of ``params`` on the meta device (shapes only, no memory);
    the AR model gets the keys the token cache would fix (sequence length, vocabulary, classes)."""
    from core.config import load_section
    from models.ar import build_ar
    from models.evalnet import build_evalnet
    from models.tokenizers import build_tokenizer
    from stages import pretrain, train_evalnet, train_tokenizer

    tok_cfg = load_section(params, "train_tokenizer", train_tokenizer.Config)
    ar_cfg = load_section(params, "pretrain", pretrain.Config)
    eval_cfg = load_section(params, "train_evalnet", train_evalnet.Config)
    image_size = params["shard"]["image_size"]
    for section, cfg in (("train_tokenizer", tok_cfg), ("pretrain", ar_cfg)):
        if cfg.init_from == "released" and not cfg.model:
            raise ValueError(f"{section}.model is empty: restate the released architecture there to plan it")
    with torch.device("meta"):
        tokenizer = build_tokenizer(tok_cfg.kind, {**tok_cfg.model, "image_size": image_size})
        arch_config = pretrain.model_config(
            ar_cfg, {"class_names": [""] * num_classes, "model": tokenizer.config_dict()}, tokenizer.token_layout,
            tokenizer.codebook_size, tokenizer.seq_len,
        )  # fmt: skip
        model = build_ar(ar_cfg.arch, arch_config, tokenizer.quantizer if ar_cfg.arch == "var" else None)
        evalnet = build_evalnet({**eval_cfg.model, "image_size": image_size, "num_classes": num_classes})
    return tokenizer, model, evalnet


def plan_models(params: dict[str, Any], *, gpus: int = 1, num_classes: int) -> list[ModelPlan]:
    """The three trained models of ``params`` (already strictly loaded section by section)."""
    from core.config import load_section
    from stages import pretrain, train_evalnet, train_tokenizer

    tok_cfg = load_section(params, "train_tokenizer", train_tokenizer.Config)
    ar_cfg = load_section(params, "pretrain", pretrain.Config)
    eval_cfg = load_section(params, "train_evalnet", train_evalnet.Config)
    image_size = params["shard"]["image_size"]
    rows = []
    with torch.device("meta"):
        tokenizer, model, evalnet = meta_models(params, num_classes)
        # 1. tokenizer: encoder + decoder (the quantizer's lookups are small next to them)
        micro = _per_gpu(tok_cfg.batch_size, gpus)
        images = torch.zeros(micro, 3, image_size, image_size)
        saved, flops = _saved_bytes(lambda: tokenizer.decode_latent(tokenizer.encode_latent(images)).square().mean())
        name = f"tokenizer ({tok_cfg.kind}{_released(tok_cfg)})"
        rows.append(ModelPlan(name, _count(tokenizer), 3 * flops * tok_cfg.batch_size / micro,
                              micro, BYTES_PER_PARAM * _count(tokenizer),
                              saved * _precision_factor(tok_cfg.mixed_precision)))  # fmt: skip

        # 2. the AR model
        seq_len = tokenizer.seq_len
        micro = _per_gpu(ar_cfg.batch_size, gpus, ar_cfg.grad_accum)
        tokens = torch.zeros(micro, seq_len, dtype=torch.long)
        labels = torch.zeros(micro, dtype=torch.long)

        def ar_step():
            logits = model(tokens, labels, label_dropout=False)
            return F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())

        saved, _ = _saved_bytes(ar_step, skip_square=seq_len)
        rows.append(ModelPlan(f"pretrain ({ar_cfg.arch}, L={seq_len}{_released(ar_cfg)})", _count(model),
                              model.flops_per_token() * ar_cfg.batch_size * seq_len, micro,
                              BYTES_PER_PARAM * _count(model),
                              saved * _precision_factor(ar_cfg.mixed_precision)))  # fmt: skip

        # 3. the evaluation classifier
        micro = _per_gpu(eval_cfg.batch_size, gpus)
        images = torch.zeros(micro, 3, image_size, image_size)
        saved, flops = _saved_bytes(lambda: evalnet(images).logsumexp(-1).mean())
        rows.append(ModelPlan("evalnet", _count(evalnet), 3 * flops * eval_cfg.batch_size / micro, micro,
                              BYTES_PER_PARAM * _count(evalnet),
                              saved * _precision_factor(eval_cfg.mixed_precision)))  # fmt: skip
    return rows


def _released(cfg) -> str:
    """The row-name suffix of a released start: ``; released GPT-B, import only``."""
    if cfg.init_from != "released":
        return ""
    name = cfg.released.model or cfg.released.format
    return f"; released {name}, " + ("import only" if cfg.steps == 0 else f"fine-tuned {cfg.steps} steps")


def human_units(value: float, unit: str) -> str:
    for scale, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}{unit}"
    return f"{value:.0f} {unit}"


def format_plan(rows: list[ModelPlan], gpus: int) -> str:
    lines = [
        "| model | params | train FLOPs/step | per-GPU batch | weights+grads+AdamW | activations "
        f"| total per GPU ({gpus} GPU) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gib = 1024**3
        lines.append(
            f"| {r.name} | {r.params / 1e6:.1f}M | {human_units(r.flops_per_step, 'FLOP')} | {r.micro_batch} | "
            f"{r.state_bytes / gib:.2f} GiB | {r.activation_bytes / gib:.2f} GiB | {r.total_bytes / gib:.2f} GiB |"
        )
    return "\n".join(lines) + "\n"
