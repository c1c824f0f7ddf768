"""Pure sampling functions shared by the AR models: guidance, temperature, top-k, top-p, draw.

Classifier-free guidance convention (the same for GPT and VAR):
    logits = u + scale·(c − u)
where c are the logits given the class and u the logits given the null class. ``scale = 1.0`` is
guidance-free (exactly the conditional logits), ``scale = 0.0`` is unconditional, ``scale > 1``
pushes samples towards the class. A run may change the scale per step (``guidance_schedule``);
``linear_guidance_ramp`` gives VAR's ramp from 1 (no guidance) at the first step to the full
scale at the last.

Filtering order, as in LlamaGen: divide by the temperature, keep the top-k, keep the top-p
nucleus, softmax, draw with ``torch.multinomial`` (reproducible with a ``torch.Generator``).
The "off" values are ``top_k = 0`` and ``top_p = 1.0``.

Each family samples the way its authors do (``FAMILY_SAMPLING``): LlamaGen (``gpt``) guides with
a constant scale and reports FID without top-k/top-p; VAR (``var``) ramps the guidance linearly
over the scales and filters with top-k 900 / top-p 0.96. Stages take ``guidance_schedule``
("auto" = the family's), ``top_k`` and ``top_p`` ("auto" = the family's) and resolve them here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch

GuidanceSchedule = float | Sequence[float] | torch.Tensor | Callable[[int], float]
TokenDraw = Callable[[int, torch.Tensor], torch.Tensor]
"""``draw(step, guided fp32 logits (..., V)) -> tokens (...)``: a model's ``generate`` calls it in
place of ``sample_tokens`` when given one (e.g. the deterministic flow-matching map of models/dd.py)."""


def classifier_free_guidance(cond_logits: torch.Tensor, uncond_logits: torch.Tensor, scale: float) -> torch.Tensor:
    """``u + scale·(c − u)``; ``scale == 1`` returns the conditional logits unchanged (bit-exact)."""
    if scale == 1.0:
        return cond_logits
    return uncond_logits + scale * (cond_logits - uncond_logits)


def guidance_schedule(cfg_scale: GuidanceSchedule, steps: int) -> list[float]:
    """One guidance scale per sampling step from a constant, a per-step sequence or tensor, or a
    callable ``step_index -> scale``."""
    if isinstance(cfg_scale, int | float):
        return [float(cfg_scale)] * steps
    if callable(cfg_scale):
        return [float(cfg_scale(step)) for step in range(steps)]
    scales = cfg_scale.tolist() if isinstance(cfg_scale, torch.Tensor) else [float(s) for s in cfg_scale]
    if len(scales) != steps:
        raise ValueError(f"guidance schedule has {len(scales)} scales for {steps} steps")
    return scales


def linear_guidance_ramp(final_scale: float, steps: int) -> list[float]:
    """Scales rising linearly from 1.0 (guidance-free) at step 0 to ``final_scale`` at the last step.
    VAR's own ``cfg=x`` ramp is ``linear_guidance_ramp(1 + x, steps)`` in this convention."""
    if steps == 1:
        return [float(final_scale)]
    return [1.0 + (final_scale - 1.0) * step / (steps - 1) for step in range(steps)]


GuidanceScheduleName = Literal["auto", "constant", "linear"]
"""How a run's guidance scale is spread over its sampling steps: ``constant`` (LlamaGen: the scale at
every step), ``linear`` (VAR: ``linear_guidance_ramp``, 1.0 at the first step rising to the scale
at the last, so VAR's ``cfg = x`` is scale ``1 + x``), ``auto`` (the model family's, below)."""

FAMILY_SAMPLING = {
    "gpt": {"guidance_schedule": "constant", "top_k": 0, "top_p": 1.0},
    "var": {"guidance_schedule": "linear", "top_k": 900, "top_p": 0.96},
}
"""The authors' sampling protocol per family (LlamaGen's FID settings; VAR's README FID settings)."""


def guidance_per_step(scale: float, schedule: str, *, arch: str, steps: int) -> float | list[float]:
    """The ``cfg_scale`` to give ``generate`` for a run at guidance ``scale`` (its strongest step) under
    ``schedule``: a float for a constant scale (the per-step path is then not taken at all), else
    one scale per step. ``arch`` ("gpt" / "var") picks the schedule for ``auto``."""
    if schedule == "auto":
        schedule = FAMILY_SAMPLING[arch]["guidance_schedule"]
    if schedule == "constant" or scale == 1.0:
        return float(scale)
    if schedule == "linear":
        return linear_guidance_ramp(scale, steps)
    raise ValueError(f"unknown guidance schedule {schedule!r}: expected auto, constant or linear")


def family_filters(top_k: int | str, top_p: float | str, *, arch: str, vocab_size: int) -> tuple[int, float]:
    """(top_k, top_p) with ``"auto"`` replaced by the family's (VAR: 900 / 0.96, top-k capped at the
    vocabulary; GPT: both off)."""
    if top_k == "auto":
        top_k = min(FAMILY_SAMPLING[arch]["top_k"], vocab_size)
    if top_p == "auto":
        top_p = FAMILY_SAMPLING[arch]["top_p"]
    return int(top_k), float(top_p)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the ``k`` largest logits of the last dim (ties broken by ``torch.topk``), set the
    rest to -inf. ``k <= 0`` or ``k >= vocabulary`` leaves the logits unchanged."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    values, indices = logits.topk(k, dim=-1)
    return torch.full_like(logits, float("-inf")).scatter(-1, indices, values)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability mass is ≥ ``p``
    (always at least the argmax), set the rest to -inf. ``p >= 1`` leaves the logits unchanged."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    sorted_probs = sorted_logits.float().softmax(dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    # a token is dropped once the more likely tokens already reach p; the argmax never is
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def filter_logits(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """Temperature, then top-k, then top-p, in fp32. ``temperature`` must be > 0."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 here, got {temperature}")
    logits = logits.float() / temperature
    return top_p_filter(top_k_filter(logits, top_k), top_p)


def sample_tokens(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one token per row of ``logits`` (..., V) -> (...) int64. ``temperature == 0`` is greedy
    (argmax); otherwise the filtered softmax is sampled with ``torch.multinomial(generator=...)``."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p).softmax(dim=-1)
    flat = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
    return flat.view(probs.shape[:-1])
