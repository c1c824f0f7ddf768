"""cache_tokens: shard images + the trained tokenizer -> token sequences in Parquet.

Encodes every accepted image once with the tokenizer in ``paths.tokenizer``: train images twice
(view 0 = as stored, view 1 = horizontally flipped), val images once (view 0). Writes
``paths.tokens/{train,val}.parquet`` (key, label, view, tokens as a fixed-length uint16 list, or
int32 above 65,536 codes) with the token layout, seq_len, vocabulary size and tokenizer
fingerprint in the schema metadata (read them with ``core.token_store.load_tokens``), and
``metrics/cache_tokens.json``. Batched and deterministic; run by DVC as
``python -m stages.cache_tokens``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from core.checkpoint import read_checkpoint
from core.config import Paths
from core.metrics import flatten_metrics
from core.shards import load_split
from core.stage import stage_main
from core.token_store import write_tokens
from models.tokenizers import build_tokenizer

STAGE = "cache_tokens"
VIEWS = {"train": (0, 1), "val": (0,)}


@dataclass(frozen=True, kw_only=True)
class Config:
    batch_size: int = 256
    """Images encoded per forward pass; outs do not depend on it."""

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def load_tokenizer(model_dir: str | Path):
    """The tokenizer of a ``train_tokenizer`` out, in eval mode, and its config.json."""
    state_dict, config = read_checkpoint(model_dir, stage="train_tokenizer")
    model = build_tokenizer(config["kind"], config["model"])
    model.load_state_dict(state_dict)
    return model.eval(), config


@torch.no_grad()
def encode_images(model, images_NHWC: np.ndarray, flip: bool, batch_size: int, desc: str) -> np.ndarray:
    """uint8 NHWC images -> int64 (N, L) tokens; ``flip`` encodes the horizontal mirror."""
    device = next(model.parameters()).device
    out = []
    for i in tqdm(range(0, len(images_NHWC), batch_size), desc=desc, unit="batch"):
        x = torch.from_numpy(images_NHWC[i : i + batch_size]).permute(0, 3, 1, 2).float().div(127.5).sub(1)
        if flip:
            x = x.flip(-1)
        out.append(model.encode(x.to(device)).cpu().numpy())
    return np.concatenate(out)


def run(cfg: Config, paths: Paths, tracker) -> dict:
    torch.use_deterministic_algorithms(True)
    model, config = load_tokenizer(paths.tokenizer)
    if torch.cuda.is_available():
        model = model.cuda()
    meta = {
        "token_layout": config["token_layout"],
        "seq_len": config["seq_len"],
        "vocab_size": config["codebook_size"],
        "fingerprint": config["fingerprint"],
    }
    out_dir = Path(paths.tokens)
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    metrics: dict = {"seq_len": config["seq_len"], "vocab_size": config["codebook_size"]}
    used = np.zeros(config["codebook_size"], dtype=bool)
    for split, views in VIEWS.items():
        data = load_split(paths.shards, split)
        per_view = [encode_images(model, data.images_NHWC, v == 1, cfg.batch_size, f"{split} view {v}") for v in views]
        # Rows grouped by image: (image 0, view 0), (image 0, view 1), (image 1, view 0), ...
        tokens_NL = np.stack(per_view, axis=1).reshape(len(data) * len(views), -1)
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
    shutil.rmtree(out_dir, ignore_errors=True)
    partial.rename(out_dir)
    metrics["distinct_tokens"] = int(used.sum())
    metrics["codebook_used_fraction"] = float(used.mean())
    tracker.log_metrics(flatten_metrics(metrics))
    print(
        f"{STAGE}: {metrics['train']['rows']} train + {metrics['val']['rows']} val rows of {config['seq_len']} "
        f"tokens, {metrics['distinct_tokens']}/{config['codebook_size']} codes used -> {out_dir}"
    )
    return metrics


def main() -> None:
    stage_main(STAGE, Config, run)


if __name__ == "__main__":
    main()
