"""Build either AR family from its saved architecture: ``build_ar(arch, model_config, quantizer)``.

Checkpoints of the pretrain / post-train / distill stages store ``arch`` ("gpt" or "var") and the
model's ``config_dict()``; this is the one place that maps them back to a module. VAR also needs
the frozen multi-scale quantizer of its tokenizer (it is not part of VAR's weights).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from models.sampling import GuidanceSchedule

ARCHS = ("gpt", "var")


def build_ar(arch: str, model_config: dict[str, Any], quantizer: nn.Module | None = None) -> nn.Module:
    """A freshly initialised model of ``arch`` with ``model_config`` (load weights afterwards)."""
    if arch == "gpt":
        from models.gpt import GPT, GPTConfig

        return GPT(GPTConfig(**model_config))
    if arch == "var":
        from models.var import VAR, VARConfig

        if quantizer is None:
            raise ValueError("arch 'var' needs the multi-scale quantizer of its msvq tokenizer")
        return VAR(VARConfig(**model_config), quantizer)
    raise ValueError(f"unknown arch {arch!r}: expected one of {', '.join(ARCHS)}")


def tokenizer_from_state(state_dict: dict, config: dict[str, Any]) -> nn.Module:
    """A tokenizer from a ``train_tokenizer`` checkpoint's weights and config.json, frozen, eval mode."""
    from models.tokenizers import build_tokenizer

    tokenizer = build_tokenizer(config["kind"], config["model"])
    tokenizer.load_state_dict(state_dict)
    return tokenizer.eval().requires_grad_(False)


def ar_from_state(state_dict: dict, config: dict[str, Any], tokenizer: nn.Module) -> nn.Module:
    """An AR model from a checkpoint's weights and config.json (``arch``, ``model``), eval mode.

    ``tokenizer`` is the one the checkpoint was trained on (VAR takes its quantizer)."""
    quantizer = tokenizer.quantizer if config["arch"] == "var" else None
    model = build_ar(config["arch"], config["model"], quantizer)
    model.load_state_dict(state_dict)
    return model.eval()


@torch.no_grad()
def sample_images(
    model: nn.Module,
    tokenizer: nn.Module,
    labels_N: torch.Tensor,
    *,
    cfg_scale: GuidanceSchedule = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 256,
    first_batch: int = 0,
    compiled: bool = False,
) -> torch.Tensor:
    """Sample one image per label: uint8 (N, H, W, C) on the CPU.

    Batch b draws from its own generator seeded ``seed·1_000_003 + first_batch + b``, so samples
    are not repeated across batches, a batch's images do not depend on how many batches come after,
    and a long run split into chunks (``first_batch`` = the chunk's first batch) draws the same.
    ``cfg_scale``: a guidance scale or one per step (``sampling.guidance_per_step``); ``compiled``:
    ``generate(compiled=True)`` (the same draws; a last, smaller batch compiles once more)."""
    device = next(model.parameters()).device
    images = []
    for b, start in enumerate(range(0, len(labels_N), batch_size)):
        generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + first_batch + b)
        labels_B = labels_N[start : start + batch_size].to(device)
        tokens_BL = model.generate(labels_B, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                                   generator=generator, compiled=compiled)  # fmt: skip
        x_BCHW = tokenizer.decode(tokens_BL)
        images.append(((x_BCHW + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu())
    return torch.cat(images)


def sample_per_guidance(
    model: nn.Module, tokenizer: nn.Module, arch: str, per_class: int, scales: list[float], seed: int = 0
) -> list[np.ndarray]:
    """The stages' sample grids: for each guidance scale, ``per_class`` samples of every class (class
    by class), drawn as the family's authors sample (``sampling.FAMILY_SAMPLING``: LlamaGen's
    constant guidance; VAR's linear ramp with top-k 900 / top-p 0.96)."""
    from models.sampling import family_filters, guidance_per_step

    labels = torch.arange(model.num_classes).repeat_interleave(per_class)
    top_k, top_p = family_filters("auto", "auto", arch=arch, vocab_size=model.config.vocab_size)
    return [
        sample_images(model, tokenizer, labels, top_k=top_k, top_p=top_p, seed=seed,
                      cfg_scale=guidance_per_step(scale, "auto", arch=arch, steps=model.steps)).numpy()
        for scale in scales
    ]  # fmt: skip
