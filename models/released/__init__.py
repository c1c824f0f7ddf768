"""Released LlamaGen and VAR checkpoints -> arpipe checkpoints: pure state-dict mappings.

One converter per released format, each a pure function of the loaded tensors (no file I/O: the
caller, ``arpipe import``, reads the file with ``weights_only=True`` and writes the checkpoint
folder). A converter returns the arpipe module's ``state_dict`` and the body of its
``config.json``; names, splits, reshapes and every size come from the tensors' shapes (heads, which
no shape holds, from the model name). Keys are accounted for exactly: a missing, unexpected or
mis-shaped key raises ``ReleasedFormatError`` naming it; derived buffers that the arpipe module
rebuilds (and so are not copied) are returned in ``rebuilt``.

    FORMATS[name] -> "module:function"; ``converter(name)`` imports it.
    converter(released: dict[str, Tensor], *, model: str | None = None, tokenizer: dict | None = None,
              heads: int | None = None, image_size: int | None = None) -> Converted
        ``model``: the released model's name where shapes cannot tell (GPT-B, d16, VQ-16 ...);
        ``tokenizer``: the config.json of the imported tokenizer an AR model is paired with;
        ``heads``: attention heads where the name does not fix them (``arpipe import --heads``);
        ``image_size``: a tokenizer's image side in pixels (``--image-size``); an AR converter
        may check it against ``tokenizer["image_size"]``. Every converter accepts all four
        keywords (``arpipe import`` passes them all) and refuses, with ReleasedFormatError, the
        ones that make no sense for its format.

Shared helpers in ``models.released.common``: ``KeyLedger`` (take each released key with its
expected shape, ``skip`` the ones not copied, ``finish`` fails on leftovers) and
``check_against_module`` (converted keys and shapes == the arpipe module's, built on the meta
device). Converters must also work on meta tensors (the official-size tests convert shape-only
state dicts).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

FORMATS = {
    "llamagen-vq": "models.released.llamagen:convert_vq",
    "llamagen-gpt": "models.released.llamagen:convert_gpt",
    "var-vqvae": "models.released.var:convert_vqvae",
    "var": "models.released.var:convert_var",
}


class ReleasedFormatError(ValueError):
    """The tensors are not the released format asked for; the message names the key."""


@dataclass(frozen=True)
class Converted:
    config: dict[str, Any]
    """config.json body: a tokenizer's {"kind", "model", "token_layout", "codebook_size", "seq_len",
    "image_size", ...} as train_tokenizer writes it, or an AR model's {"arch", "model", ...} as
    pretrain writes it (the caller adds class names, the tokenizer fingerprint and the source)."""
    state_dict: dict[str, torch.Tensor]
    """Loads strictly into the arpipe module that ``config`` builds."""
    rebuilt: tuple[str, ...] = field(default=())
    """Released keys not copied because the arpipe module derives them (e.g. VAR's attention mask,
    LlamaGen's rotary table) or keeps its own kind of them (LlamaGen's usage ring buffer); each
    converter's docstring lists its own. ``arpipe import`` records them in config.json."""


def converter(format_name: str) -> Callable[..., Converted]:
    if format_name not in FORMATS:
        raise ReleasedFormatError(f"unknown released format {format_name!r}; expected one of {', '.join(FORMATS)}")
    module_name, function = FORMATS[format_name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise ReleasedFormatError(f"released format {format_name!r} is not available: no {module_name}") from None
    return getattr(module, function)
