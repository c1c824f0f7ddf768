"""Small builders shared by tests."""

import io
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def png_bytes(array: np.ndarray, mode: str | None = None, **save) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG", **save)
    return buffer.getvalue()


def random_rgb(seed: int, size: int = 24) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


# Tiny tokenizer configs for stage tests: 8x8 images, 32 codes, a few seconds of training.
TINY_MSVQ = {
    "image_size": 8,
    "base_channels": 8,
    "channel_multipliers": [1, 2],
    "attention": False,
    "z_channels": 8,
    "codebook_size": 32,
    "scales": [1, 2, 4],
    "candidate_buffer_size": 64,
    "restart_every": 4,
}
TINY_VQ = {k: v for k, v in TINY_MSVQ.items() if k != "scales"}
TINY_TOKENIZERS = {"msvq": TINY_MSVQ, "vq": TINY_VQ}
