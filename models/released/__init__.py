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

``released_checkpoint`` is what every caller uses (``arpipe import``, ``train_tokenizer`` and
``pretrain`` with ``init_from: released``): convert, then check an AR model against its tokenizer
and the class names, and return the weights and config.json body of an ordinary arpipe checkpoint.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

IMAGENET_CLASSES = [str(i) for i in range(1000)]
"""Class names of an imported tokenizer when none are given: ImageNet's 1000 by index."""

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


def released_checkpoint(
    format_name: str,
    released: dict[str, torch.Tensor],
    *,
    model: str | None = None,
    tokenizer: dict | None = None,
    heads: int | None = None,
    image_size: int | None = None,
    class_names: list[str] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any], tuple[str, ...]]:
    """(fp32 state dict, config.json body, released keys not copied) of ``released``.

    A tokenizer format gets ``class_names`` (default: ImageNet's 1000 by index). An AR format needs
    ``tokenizer`` (the config.json of the tokenizer it samples with): its vocabulary must be the
    codebook, it gets the class names given or else the tokenizer's (one per class), and the
    tokenizer's fingerprint, token layout and image size. Raises ReleasedFormatError."""
    converted = converter(format_name)(released, model=model, tokenizer=tokenizer, heads=heads, image_size=image_size)
    config = dict(converted.config)
    if "arch" in config:
        config["class_names"] = _paired_class_names(config["model"], tokenizer, class_names)
        config.update(
            tokenizer_fingerprint=tokenizer["fingerprint"],
            token_layout=tokenizer["token_layout"],
            image_size=tokenizer["image_size"],
            weights="released",
        )
    else:
        config["class_names"] = list(class_names or IMAGENET_CLASSES)
    state_dict = {k: v.float() if v.is_floating_point() else v for k, v in converted.state_dict.items()}
    return state_dict, config, converted.rebuilt


def _paired_class_names(model: dict[str, Any], tokenizer: dict | None, class_names: list[str] | None) -> list[str]:
    """An AR model against its tokenizer (whatever its converter checked): vocabulary = codebook,
    one class name per class. Returns the class names given, else the tokenizer's."""
    if tokenizer is None:
        raise ReleasedFormatError("an AR model needs its tokenizer (the imported tokenizer it samples with)")
    if model["vocab_size"] != tokenizer["codebook_size"]:
        raise ReleasedFormatError(
            f"the model's vocabulary is {model['vocab_size']} tokens, the tokenizer has "
            f"{tokenizer['codebook_size']} codes"
        )
    given = "the class names given" if class_names else "the tokenizer's"
    class_names = list(class_names or tokenizer["class_names"])
    if len(class_names) != model["num_classes"]:
        raise ReleasedFormatError(
            f"the model has {model['num_classes']} classes, but {len(class_names)} class names were given "
            f"({given}): it needs {model['num_classes']}"
        )
    return class_names
