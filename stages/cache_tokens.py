"""cache_tokens: shard images + the trained tokenizer -> token sequences in Parquet.

Encodes every accepted image once with the tokenizer in ``paths.tokenizer``: train images as stored
(view 0) and, with ``hflip``, once more horizontally flipped (view 1); val images once (view 0). Writes
``paths.tokens/{train,val}.parquet`` and a memory-mappable ``{train,val}.arrow`` twin (key, label,
view, tokens as a fixed-length uint16 list, or int32 above 65,536 codes) with the token layout,
seq_len, vocabulary size and tokenizer fingerprint in the schema metadata (read them with
``core.token_store.load_tokens``), and ``metrics/cache_tokens.json``. Batched and deterministic; run by DVC as
``python -m stages.cache_tokens``.

Launched on several processes (``accelerate launch --config_file accelerate/<profile>.yaml -m
stages.cache_tokens``), each process encodes a contiguous slice of every split and rank 0 gathers
the slices in rank order and writes the same files, byte for byte, as one process.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from accelerate import PartialState

from core.checkpoint import read_checkpoint
from core.config import Paths
from core.metrics import flatten_metrics
from core.progress import progress as progress_iter
from core.shards import load_split
from core.stage import stage_main
from core.token_store import token_dtype, write_tokens
from core.training import deterministic_kernels, process_state
from models.ar import tokenizer_from_state

STAGE = "cache_tokens"


@dataclass(frozen=True, kw_only=True)
class Config:
    batch_size: int = 256
    """Images encoded per forward pass; outs do not depend on it."""
    hflip: bool = False
    """Add each train image's horizontal mirror as a second row (view 1). Right where a mirrored image
    is still an image of its class (natural photos: LlamaGen and VAR train with flips); for digits and
    text the models then learn to draw mirrored glyphs that evaluate's real images never show, so it is
    off for the digits default (README, *cache_tokens*: the GPT's FID ~11.5 -> ~3.7); presets for
    photos turn it on."""

    def views(self) -> dict[str, tuple[int, ...]]:
        """The views encoded per split: 0 = as stored, 1 = horizontally flipped."""
        return {"train": (0, 1) if self.hflip else (0,), "val": (0,)}

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def load_tokenizer(model_dir: str | Path):
    """The tokenizer of a ``train_tokenizer`` out, in eval mode, and its config.json."""
    state_dict, config = read_checkpoint(model_dir, stage="train_tokenizer")
    return tokenizer_from_state(state_dict, config), config


@torch.no_grad()
def encode_images(
    model, images_NHWC: np.ndarray, flip: bool, batch_size: int, desc: str, progress: bool = True
) -> np.ndarray:
    """uint8 NHWC images -> int64 (N, L) tokens; ``flip`` encodes the horizontal mirror."""
    device = next(model.parameters()).device
    out = [np.zeros((0, model.seq_len), dtype=np.int64)]  # a process may get no images
    for i in progress_iter(range(0, len(images_NHWC), batch_size), desc=desc, unit="batch", disable=not progress):
        x = torch.from_numpy(images_NHWC[i : i + batch_size]).permute(0, 3, 1, 2).float().div(127.5).sub(1)
        if flip:
            x = x.flip(-1)
        out.append(model.encode(x.to(device)).cpu().numpy())
    return np.concatenate(out)


def encode_split(model, state: PartialState, images_NHWC: np.ndarray, views, cfg: Config, dtype, desc: str):
    """(N, len(views), L) tokens of every image on the main process (None elsewhere).

    Each process encodes a contiguous slice (``split_between_processes``); the main process
    concatenates the slices in rank order, so the rows do not depend on the number of processes.
    """
    with state.split_between_processes(torch.from_numpy(images_NHWC)) as mine_NHWC:
        mine = mine_NHWC.numpy()
        progress = state.is_main_process
        per_view = [encode_images(model, mine, v == 1, cfg.batch_size, f"{desc} view {v}", progress) for v in views]
    # Cast to the cache's dtype before gathering: a quarter of int64's bytes on the wire.
    local_NVL = np.stack(per_view, axis=1).astype(dtype)
    if state.num_processes == 1:
        return local_NVL
    gathered = [None] * state.num_processes if state.is_main_process else None
    dist.gather_object(local_NVL, gathered, dst=0)  # CPU gloo or GPU nccl, rank order
    return np.concatenate(gathered) if state.is_main_process else None


def run(cfg: Config, paths: Paths, tracker) -> dict:
    """Encode every split; the main process writes the outs and returns the metrics."""
    deterministic_kernels()
    state = process_state()
    model, config = load_tokenizer(paths.tokenizer)
    model = model.to(state.device)
    meta = {
        "token_layout": config["token_layout"],
        "seq_len": config["seq_len"],
        "vocab_size": config["codebook_size"],
        "fingerprint": config["fingerprint"],
    }
    dtype = token_dtype(config["codebook_size"]).to_pandas_dtype()
    out_dir = Path(paths.tokens)
    partial = out_dir.with_name(out_dir.name + ".partial")
    if state.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    metrics: dict = {"seq_len": config["seq_len"], "vocab_size": config["codebook_size"]}
    used = np.zeros(config["codebook_size"], dtype=bool)
    for split, views in cfg.views().items():
        data = load_split(paths.shards, split)
        tokens_NVL = encode_split(model, state, data.images_NHWC, views, cfg, dtype, split)
        if not state.is_main_process:
            continue
        # Rows grouped by image: (image 0, view 0), (image 0, view 1), (image 1, view 0), ...
        tokens_NL = tokens_NVL.reshape(len(data) * len(views), -1)
        rows = {
            "key": [k for k in data.keys for _ in views],
            "label": np.repeat(data.labels_N, len(views)),
            "view": np.tile(np.array(views, dtype=np.uint8), len(data)),
        }
        write_tokens(partial / f"{split}.parquet", rows, tokens_NL, meta)
        used[np.unique(tokens_NL)] = True
        metrics[split] = {
            "rows": len(tokens_NL),
            "images": len(data),
            "distinct_tokens": int(len(np.unique(tokens_NL))),
        }
    if not state.is_main_process:
        return {}
    shutil.rmtree(out_dir, ignore_errors=True)
    partial.rename(out_dir)
    metrics["distinct_tokens"] = int(used.sum())
    metrics["codebook_used_fraction"] = float(used.mean())
    tracker.log_metrics(flatten_metrics(metrics))
    print(
        f"{STAGE}: {metrics['train']['rows']} train + {metrics['val']['rows']} val rows of {config['seq_len']} "
        f"tokens, {metrics['distinct_tokens']}/{config['codebook_size']} codes used on {state.num_processes} "
        f"process(es) -> {out_dir}"
    )
    return metrics


def main() -> None:
    stage_main(STAGE, Config, run, is_main_process=process_state().is_main_process)


if __name__ == "__main__":
    main()
