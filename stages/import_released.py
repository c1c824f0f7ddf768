"""Import a released checkpoint file (LlamaGen, VAR) as an arpipe checkpoint folder, offline.

``import_released(format, file, out, ...)`` reads the file with ``torch.load(weights_only=True)``
(memory-mapped), unwraps the training wrapper (``model`` / ``module`` / ``state_dict`` / ``ema``),
converts the tensors with ``models.released.converter(format)``, checks an AR model against its
imported tokenizer, and writes ``model.safetensors`` + ``config.json`` exactly as
``train_tokenizer`` (tokenizer formats) or ``pretrain`` (AR formats) would, plus ``stage:
"import"`` and a ``source`` entry (file name, sha256, format, model name, wrapper, keys not
copied). Every check runs before anything is written; each failure is one ``ImportFailed`` line
naming the file and the key. ``arpipe import`` is the command line over this; a DVC stage that
imports the released models named in params.yaml can call it too (stages cannot import the CLI).
"""

from __future__ import annotations

import argparse
import hashlib
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from core.checkpoint import read_checkpoint, write_checkpoint
from models.released import ReleasedFormatError, converter

STAGE = "import"
WRAPPERS = ("model", "module", "state_dict", "ema")
"""Keys under which training scripts store the weights (LlamaGen: ``model``; DeepSpeed:
``module``; Lightning: ``state_dict``; EMA copies: ``ema``), tried in this order."""
KEY_PREFIXES = ("module.", "_orig_mod.")
"""Prefixes DDP and torch.compile put on every key; stripped when every key has one."""
SAFE_GLOBALS = [argparse.Namespace]
"""Besides tensors and containers, the one class the loader admits: the training ``args`` that
LlamaGen's training scripts save beside the weights (plain data, not code)."""
IMAGENET_CLASSES = [str(i) for i in range(1000)]


class ImportFailed(ValueError):
    """One line naming the file and what is wrong with it."""


def load_released(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, how it was found: wrapper, stripped prefix, other top-level entries)."""
    try:
        obj = _torch_load(path)
    except pickle.UnpicklingError as exc:
        # a global the weights-only unpickler will not build (a class, a function) means code
        needs = re.search(r"Unsupported (?:global|class):? (?:GLOBAL )?([\w.]+)", str(exc))
        if needs:
            raise ImportFailed(f"{path}: refused: the pickle needs more than tensors ({needs.group(1)})") from None
        raise ImportFailed(f"{path}: not a readable PyTorch checkpoint, truncated? ({_first_line(exc)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ImportFailed(f"{path}: not a readable PyTorch checkpoint, truncated? ({_first_line(exc)})") from None
    if not isinstance(obj, dict):
        raise ImportFailed(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    found: dict[str, Any] = {"wrapper": None}
    state = obj
    if not _all_tensors(obj):
        for key in WRAPPERS:
            if isinstance(obj.get(key), dict) and _all_tensors(obj[key]):
                state, found["wrapper"] = obj[key], key
                found["other_entries"] = sorted(str(k) for k in obj if k != key)
                break
        else:
            keys = ", ".join(repr(k) for k in list(obj)[:6])
            raise ImportFailed(f"{path}: no state dict: the top-level keys are {keys}, and none of "
                               f"{', '.join(WRAPPERS)} holds only tensors")  # fmt: skip
    for prefix in KEY_PREFIXES:
        if state and all(str(k).startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
            found["stripped_prefix"] = prefix
    return state, found


def _torch_load(path: Path):
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        try:  # memory-mapped: the tensors are read from the file as the converter touches them
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):  # a legacy (pre-zip) file cannot be mapped: read it whole
                raise
            return torch.load(path, map_location="cpu", weights_only=True)


def _all_tensors(d: dict) -> bool:
    return bool(d) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def read_class_names(path: Path) -> list[str]:
    """One class name per line (blank lines ignored); names must be unique."""
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if not names or duplicates:
        raise ImportFailed(f"{path}: " + (f"class name {duplicates[0]!r} repeats" if duplicates else "no class names"))
    return names


def image_size_in_name(file_name: str) -> int | None:
    """The resolution a released file's name states (``c2i_B_384.pt`` -> 384), or None."""
    match = re.search(r"_(256|384|448|512)(?=[._]|$)", file_name)
    return int(match.group(1)) if match else None


def _check_pairing(model: dict, tokenizer: dict | None, class_names, file: Path, tokenizer_dir) -> list[str]:
    """An AR model against its tokenizer (whatever its converter checked): vocabulary = codebook,
    one class name per class. Returns the class names (``--class-names``, else the tokenizer's)."""
    if tokenizer is None:
        raise ImportFailed(f"{file}: an AR model needs --tokenizer (the imported tokenizer it samples with)")
    if model["vocab_size"] != tokenizer["codebook_size"]:
        raise ImportFailed(
            f"{file}: the model's vocabulary is {model['vocab_size']} tokens, tokenizer {tokenizer_dir} has "
            f"{tokenizer['codebook_size']} codes"
        )
    given = "--class-names" if class_names else "the tokenizer"
    class_names = class_names or tokenizer["class_names"]
    if len(class_names) != model["num_classes"]:
        raise ImportFailed(
            f"{file}: the model has {model['num_classes']} classes, but {len(class_names)} class names were given "
            f"({given}'s): pass --class-names with {model['num_classes']}"
        )
    return class_names


def import_released(
    format_name: str,
    file: str | Path,
    out: str | Path,
    *,
    model: str | None = None,
    tokenizer_dir: str | Path | None = None,
    heads: int | None = None,
    image_size: int | None = None,
    class_names_file: str | Path | None = None,
) -> dict[str, Any]:
    """Convert ``file`` and write the checkpoint folder ``out``; return its config.json."""
    file = Path(file)
    try:
        convert = converter(format_name)
    except ReleasedFormatError as exc:
        raise ImportFailed(str(exc)) from None
    tokenizer = None
    if tokenizer_dir is not None:
        try:
            tokenizer = read_checkpoint(tokenizer_dir, stage="arpipe import (a tokenizer format)")[1]
        except (FileNotFoundError, ValueError) as exc:
            raise ImportFailed(f"--tokenizer: {exc}") from None
        if "kind" not in tokenizer:
            raise ImportFailed(f"--tokenizer {tokenizer_dir}: not a tokenizer checkpoint (no 'kind' in config.json)")
        named = image_size_in_name(file.name)
        if named and named != tokenizer["image_size"]:
            raise ImportFailed(
                f"{file}: the name says {named} px, but tokenizer {tokenizer_dir} was imported for "
                f"{tokenizer['image_size']} px: import the tokenizer with --image-size {named}"
            )
    class_names = read_class_names(Path(class_names_file)) if class_names_file else None

    released, found = load_released(file)
    try:
        converted = convert(released, model=model, tokenizer=tokenizer, heads=heads, image_size=image_size)
    except ReleasedFormatError as exc:
        raise ImportFailed(f"{file}: {exc}") from None

    is_ar = "arch" in converted.config
    if is_ar:
        class_names = _check_pairing(converted.config["model"], tokenizer, class_names, file, tokenizer_dir)
    class_names = class_names or IMAGENET_CLASSES

    source = {
        "file": file.name,
        "sha256": sha256_of(file),
        "format": format_name,
        "model": model,
        "not_copied": list(converted.rebuilt),
        **found,
    }
    config = {**converted.config, "class_names": class_names, "stage": STAGE, "source": source}
    if is_ar:
        config.update(
            tokenizer_fingerprint=tokenizer["fingerprint"],
            token_layout=tokenizer["token_layout"],
            image_size=tokenizer["image_size"],
            weights="released",
        )
    state_dict = {k: v.float() if v.is_floating_point() else v for k, v in converted.state_dict.items()}
    config["fingerprint"] = write_checkpoint(out, state_dict, config)
    return config
