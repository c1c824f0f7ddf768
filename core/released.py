"""Reading a released checkpoint file (LlamaGen, VAR): everything but the conversion.

``load_released(path)`` reads the file with ``torch.load(weights_only=True)`` (memory-mapped) and
unwraps the training wrapper (``model`` / ``module`` / ``state_dict`` / ``ema``) and the DDP /
compile key prefixes; ``source_entry`` is what a converted checkpoint records about the file
(name, sha256, format, model name, wrapper, keys not copied). The pure conversion and the
model-tokenizer pairing checks are ``models.released`` (this module imports no models); the
callers, ``arpipe import`` and the ``train_tokenizer`` / ``pretrain`` stages with ``init_from:
released``, glue the two and write the folder with ``core.checkpoint.write_checkpoint``. Every
failure is one ``ImportFailed`` line naming the file and the key.
"""

from __future__ import annotations

import argparse
import hashlib
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

WRAPPERS = ("model", "module", "state_dict", "ema")
"""Keys under which training scripts store the weights (LlamaGen: ``model``; DeepSpeed:
``module``; Lightning: ``state_dict``; EMA copies: ``ema``), tried in this order."""
KEY_PREFIXES = ("module.", "_orig_mod.")
"""Prefixes DDP and torch.compile put on every key; stripped when every key has one."""
SAFE_GLOBALS = [argparse.Namespace]
"""Besides tensors and containers, the one class the loader admits: the training ``args`` that
LlamaGen's training scripts save beside the weights (plain data, not code)."""


class ImportFailed(ValueError):
    """One line naming the file and what is wrong with it."""


@dataclass(frozen=True, kw_only=True)
class ReleasedFile:
    """params.yaml ``<stage>.released``: the released file a stage imports (``init_from: released``)."""

    format: str = ""
    """A format of ``models.released.FORMATS``: llamagen-vq, llamagen-gpt, var-vqvae, var."""
    file: str = ""
    """The file, relative to ``paths.released`` (a DVC dependency of the stage: replacing it re-runs
    the stage and what follows)."""
    model: str = ""
    """The released model's name where shapes cannot tell (GPT-B, d16, VQ-16); "" = from shapes."""

    def path(self, root: str | Path, key: str) -> Path:
        """The file under ``root``; fails, naming ``key`` and the path, when it is not there."""
        path = Path(root) / self.file
        if not self.file or not path.is_file():
            raise FileNotFoundError(
                f"{key}.file: no released file at {path} (put the released checkpoint under paths.released "
                f"{root!s}, e.g. with `dvc add`, or fix the name)"
            )
        return path


@dataclass(frozen=True, kw_only=True)
class ReleasedModel(ReleasedFile):
    """params.yaml ``pretrain.released``: a released AR model file."""

    heads: int = 0
    """Attention heads, where ``model`` does not name them (heads are in no tensor); 0 = from ``model``."""


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


def source_entry(file: Path, format_name: str, model: str | None, found: dict[str, Any], rebuilt) -> dict[str, Any]:
    """config.json's ``source``: which file (name and content hash) and how it was read."""
    return {
        "file": file.name,
        "sha256": sha256_of(file),
        "format": format_name,
        "model": model,
        "not_copied": list(rebuilt),
        **found,
    }


def merge_model(params_model: dict[str, Any], file_model: dict[str, Any], overridable, key: str, file: Path) -> dict:
    """The imported architecture ``file_model`` with the fine-tuning knobs of ``params_model``
    (keys in ``overridable``: dropouts, codebook upkeep) applied. Every other key params.yaml sets
    must equal the file's value, so params.yaml states the architecture it gets (``arpipe plan``
    sizes it from there) and a wrong one fails here, naming the key."""
    for name, value in params_model.items():
        if name not in overridable and _plain(value) != _plain(file_model.get(name)):
            raise ValueError(
                f"{key}.{name} is {value!r}, but {file.name} has {file_model.get(name)!r}: with init_from: "
                f"released, {key} may only restate the released architecture (or leave the key out) and "
                f"change {', '.join(sorted(overridable))}"
            )
    return {**file_model, **{name: value for name, value in params_model.items() if name in overridable}}


def _plain(value: Any) -> Any:
    """Tuples as lists and ints as floats, so YAML and config.json values compare equal."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value
