"""One sampling interface for every checkpoint: AR models and distilled students alike.

``sampler_from_state(state_dict, config, tokenizer, settings)`` reads a checkpoint's config.json and
builds the sampler that fits it; a caller loops over ``sampler.modes`` and draws with
``sampler.sample(labels_N, mode, seed=..., batch_size=...)`` without knowing which kind it holds.

- An AR model (``ARSampler``): one mode per guidance scale in ``settings.guidance`` (its name is the
  caller's, e.g. ``cfg1``), each spread over the sampling steps by ``settings.guidance_schedule``,
  with the family's top-k / top-p where ``auto``; every mode takes ``model.steps`` sequential passes.
- A distilled student (``StudentSampler``; config.json ``distilled``, from ``distill`` or
  ``distill2``): its guidance is baked in by the pairs, so its modes are step counts, ``1step`` and
  (a DD1 student with a kept prefix) ``2step``; it knows its ``teacher`` (config.json's record:
  name, distillation guidance ``cfg_scale`` and ``guidance_schedule``) for the comparisons made after
  sampling.

Both give uint8 (N, H, W, C) images on the CPU, batch b drawn from its own generator seeded
``seed·1_000_003 + b``, and measure latency the same way (``token_latency_ms``: one image's tokens
at a time, decode excluded).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import nn

from models.ar import ar_from_state, sample_images
from models.dd_student import sample_distilled_images, student_from_state, token_latency_ms
from models.sampling import GuidanceScheduleName, family_filters, guidance_per_step

STEP_MODES = {"1step": 1, "2step": 2}
"""A student's modes: sequential forward passes per image."""


@dataclass(frozen=True)
class SamplingSettings:
    """How an AR model is sampled; a student ignores them (its guidance is baked in)."""

    guidance: dict[str, float] = field(default_factory=lambda: {"cfg1": 1.0})
    """Mode name -> guidance scale (logits = u + cfg_scale·(c − u); 1.0 = guidance-free), in order."""
    guidance_schedule: GuidanceScheduleName = "auto"
    """How each scale is spread over the steps (``models.sampling.guidance_per_step``)."""
    temperature: float = 1.0
    top_k: int | Literal["auto"] = "auto"
    """0 = off; ``auto``: the family's (``models.sampling.family_filters``)."""
    top_p: float | Literal["auto"] = "auto"
    """1.0 = off; ``auto``: the family's."""
    compile: bool = False
    """Sample through ``torch.compile``d decoding steps (``GPT/VAR.generate(compiled=True)``)."""


class Sampler(Protocol):
    """What every evaluated checkpoint offers."""

    arch: str
    """The AR family underneath (``gpt`` | ``var``)."""
    modes: tuple[str, ...]
    """The ways it samples, in order: guidance scales (AR) or step counts (students)."""
    steps_per_image: int | None
    """Sequential forward passes per image when every mode takes the same (AR: tokens or
    scales); None when the mode sets them (students: ``passes(mode)``)."""
    teacher: dict[str, Any] | None
    """The AR checkpoint it was distilled from (config.json ``teacher``); None for AR models."""
    registrable: bool
    """Whether the registry's sampler (``arpipe/pyfunc_model.py``, AR models only) can serve it."""

    def passes(self, mode: str) -> int: ...

    def sample(self, labels_N: torch.Tensor, mode: str, *, seed: int, batch_size: int) -> torch.Tensor: ...

    def token_latency_ms(self, labels_N: torch.Tensor, mode: str, *, seed: int) -> float: ...


class ARSampler:
    """An AR model (GPT or VAR) and its tokenizer, one mode per guidance scale."""

    teacher = None
    registrable = True

    def __init__(self, model: nn.Module, tokenizer: nn.Module, arch: str, guidance: dict[str, tuple[float, str]],
                 *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, compiled: bool = False):  # fmt: skip
        """``guidance``: mode name -> (scale, schedule); ``top_k``, ``top_p`` resolved (no ``auto``)."""
        self.model, self.tokenizer, self.arch = model, tokenizer, arch
        self.temperature, self.top_k, self.top_p, self.compiled = temperature, top_k, top_p, compiled
        self._per_step = {name: guidance_per_step(scale, schedule, arch=arch, steps=model.steps)
                          for name, (scale, schedule) in guidance.items()}  # fmt: skip

    @classmethod
    def from_settings(cls, model: nn.Module, tokenizer: nn.Module, arch: str, settings: SamplingSettings):
        top_k, top_p = family_filters(settings.top_k, settings.top_p, arch=arch, vocab_size=model.config.vocab_size)
        guidance = {name: (scale, settings.guidance_schedule) for name, scale in settings.guidance.items()}
        return cls(model, tokenizer, arch, guidance, temperature=settings.temperature, top_k=top_k, top_p=top_p,
                   compiled=settings.compile)  # fmt: skip

    def with_guidance(self, guidance: dict[str, tuple[float, str]]) -> ARSampler:
        """The same model and filters with other modes, ``{name: (scale, schedule)}`` (e.g. a
        teacher at the guidance and schedule its student was distilled at)."""
        return ARSampler(self.model, self.tokenizer, self.arch, guidance, temperature=self.temperature,
                         top_k=self.top_k, top_p=self.top_p, compiled=self.compiled)  # fmt: skip

    @property
    def modes(self) -> tuple[str, ...]:
        return tuple(self._per_step)

    @property
    def steps_per_image(self) -> int:
        return self.model.steps

    def passes(self, mode: str) -> int:
        return self.model.steps

    def sample(self, labels_N: torch.Tensor, mode: str, *, seed: int, batch_size: int) -> torch.Tensor:
        return sample_images(self.model, self.tokenizer, labels_N, cfg_scale=self._per_step[mode],
                             temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=seed,
                             batch_size=batch_size, compiled=self.compiled)  # fmt: skip

    def token_latency_ms(self, labels_N: torch.Tensor, mode: str, *, seed: int) -> float:
        return token_latency_ms(self.model, labels_N, cfg_scale=self._per_step[mode], seed=seed)


class StudentSampler:
    """A distilled student (DD1) or one-step generator (DD2); modes are step counts."""

    steps_per_image = None
    registrable = False

    def __init__(self, student: nn.Module, tokenizer: nn.Module, arch: str, teacher: dict[str, Any]):
        self.student, self.tokenizer, self.arch, self.teacher = student, tokenizer, arch, teacher
        # a student without a kept prefix (DD2's generator: two_step_at 0) has no second step
        self.modes = ("1step",) if student.dd.two_step_at == 0 else tuple(STEP_MODES)

    def passes(self, mode: str) -> int:
        return STEP_MODES[mode]

    def sample(self, labels_N: torch.Tensor, mode: str, *, seed: int, batch_size: int) -> torch.Tensor:
        return sample_distilled_images(self.student, self.tokenizer, labels_N, steps=self.passes(mode), seed=seed,
                                       batch_size=batch_size)  # fmt: skip

    def token_latency_ms(self, labels_N: torch.Tensor, mode: str, *, seed: int) -> float:
        return token_latency_ms(self.student, labels_N, steps=self.passes(mode), seed=seed)


def sampler_from_state(state_dict: dict, config: dict[str, Any], tokenizer: nn.Module,
                       settings: SamplingSettings) -> Sampler:  # fmt: skip
    """The sampler of a checkpoint's weights and config.json, eval mode; ``tokenizer`` is the one
    it was trained on."""
    if config.get("distilled"):
        return StudentSampler(student_from_state(state_dict, config, tokenizer), tokenizer, config["arch"],
                              config["teacher"])  # fmt: skip
    return ARSampler.from_settings(ar_from_state(state_dict, config, tokenizer), tokenizer, config["arch"], settings)
