"""``arpipe import``: a released checkpoint file (LlamaGen, VAR) -> an arpipe checkpoint folder, offline.

Glue over ``core.released`` (read the file with ``weights_only=True``, unwrap, hash) and
``models.released`` (convert, pair an AR model with its tokenizer): the folder is
``model.safetensors`` + ``config.json`` exactly as ``train_tokenizer`` (tokenizer formats) or
``pretrain`` (AR formats) write it, plus ``stage: "import"`` and a ``source`` entry. Every check
runs before anything is written; each failure is one ``ImportFailed`` line naming the file and
the key. The pipeline imports the same way inside ``train_tokenizer`` / ``pretrain`` with
``init_from: released``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.checkpoint import read_checkpoint, write_checkpoint
from core.released import ImportFailed, image_size_in_name, load_released, read_class_names, source_entry
from models.released import ReleasedFormatError, converter, released_checkpoint

STAGE = "import"


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
        converter(format_name)
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
        state_dict, config, rebuilt = released_checkpoint(
            format_name, released, model=model, tokenizer=tokenizer, heads=heads, image_size=image_size,
            class_names=class_names,
        )  # fmt: skip
    except ReleasedFormatError as exc:
        hint = "" if tokenizer is not None or "needs its tokenizer" not in str(exc) else " (pass --tokenizer)"
        raise ImportFailed(f"{file}: {exc}{hint}") from None
    config.update(stage=STAGE, source=source_entry(file, format_name, model, found, rebuilt))
    config["fingerprint"] = write_checkpoint(out, state_dict, config)
    return config
