"""The tokenizer interface both kinds share, and the factory that builds one from a config dict.

A checkpoint stores ``{"kind": tokenizer.kind, "config": tokenizer.config_dict()}`` (or
similar); ``build_tokenizer(kind, config)`` rebuilds the same architecture from it.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from models.codebook import QuantizerOutput
from models.config_dict import config_from_dict
from models.msvq import MSVQConfig, MSVQTokenizer
from models.vq import VQConfig, VQTokenizer

TOKENIZER_KINDS = {"vq": (VQConfig, VQTokenizer), "msvq": (MSVQConfig, MSVQTokenizer)}


class Tokenizer(Protocol):
    """What stages may rely on, whatever the kind."""

    kind: str
    seq_len: int
    codebook_size: int
    token_layout: dict[str, Any]

    def encode(self, images_BCHW: torch.Tensor) -> torch.Tensor: ...

    def decode(self, tokens_BL: torch.Tensor) -> torch.Tensor: ...

    def forward(self, images_BCHW: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]: ...

    def update_codebook(
        self, counts: torch.Tensor, candidates: list[torch.Tensor], generator: torch.Generator
    ) -> torch.Tensor: ...

    def codebook_usage(self) -> dict[str, float]: ...

    def config_dict(self) -> dict[str, Any]: ...


def tokenizer_config(kind: str, config: dict[str, Any]) -> VQConfig | MSVQConfig:
    """Strictly parse a config dict for ``kind``: unknown kinds, keys and types fail by name."""
    if kind not in TOKENIZER_KINDS:
        raise ValueError(
            f"unknown tokenizer kind {kind!r}; expected one of {', '.join(repr(k) for k in sorted(TOKENIZER_KINDS))}"
        )
    config_class, _ = TOKENIZER_KINDS[kind]
    return config_from_dict(config_class, config, f"{kind} tokenizer config")


def build_tokenizer(kind: str, config: dict[str, Any]) -> VQTokenizer | MSVQTokenizer:
    """``kind`` in {"vq", "msvq"}; ``config`` holds any subset of that kind's config fields."""
    parsed = tokenizer_config(kind, config)
    _, module_class = TOKENIZER_KINDS[kind]
    return module_class(parsed)
