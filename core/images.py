"""Decode, normalise and resize one image; runs in the shard stage's worker processes.

``prepare_image`` never raises for bad input: it returns ``Prepared`` or ``Rejected`` with a reason
a user can act on, so the caller can record every input (seen = accepted + rejected + duplicates).
Output pixels are RGB PNG bytes at ``size``×``size``, encoded deterministically (same bytes for the
same input on any worker count).
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tiff", ".tif")

# A truncated file must be rejected, not padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass(frozen=True)
class Item:
    """One input: either raw bytes (Parquet, tar, embedded) or a file path read by the worker."""

    source: str
    label: int
    data: bytes | None = None
    path: str | None = None


@dataclass(frozen=True)
class Prepared:
    source: str
    label: int
    sha256: str
    width: int
    height: int
    png: bytes


@dataclass(frozen=True)
class Rejected:
    source: str
    reason: str
    sha256: str | None = None


def prepare_image(item: Item, size: int, max_pixels: int) -> Prepared | Rejected:
    try:
        data = item.data if item.data is not None else Path(item.path).read_bytes()
    except OSError as exc:
        return Rejected(item.source, f"unreadable file: {exc.strerror or exc}")
    if len(data) == 0:
        return Rejected(item.source, "empty file (0 bytes)")
    sha = hashlib.sha256(data).hexdigest()
    try:
        with warnings.catch_warnings():
            # We enforce our own pixel limit below; PIL's own warning is noise here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                return Rejected(
                    item.source,
                    f"too many pixels: {width}x{height} = {width * height} > max_pixels={max_pixels}"
                    " (possible decompression bomb)",
                    sha,
                )
            image.load()
            rgb = to_rgb(image)
    except UnidentifiedImageError:
        return Rejected(item.source, "not an image: format not recognised", sha)
    except Image.DecompressionBombError as exc:
        return Rejected(item.source, f"too many pixels: {exc}", sha)
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        return Rejected(item.source, f"truncated or corrupt image: {exc}", sha)
    resized = center_crop_resize(rgb, size)
    return Prepared(item.source, item.label, sha, width, height, encode_png(resized))


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB view of any PIL mode: EXIF rotation applied, alpha composited on white, 16-bit scaled."""
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # Convert("L") would clip 16-bit values at 255; scale the full range instead.
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
        mode = "L"
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """ADM-style center crop: box-halve while far too large, bicubic to the short side, crop."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(max(size, round(s * scale)) for s in image.size), resample=Image.Resampling.BICUBIC)
    left = (image.size[0] - size) // 2
    top = (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> uint8 HWC RGB array."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def image_grid(images_NHWC: np.ndarray, columns: int, *, pad: int = 1, min_cell: int = 32) -> np.ndarray:
    """Tile uint8 images row-major into a grid with ``columns`` per row and ``pad`` white pixels
    between cells; tiny images are upscaled (nearest) so a cell is at least ``min_cell`` px."""
    count, height, width, channels = images_NHWC.shape
    scale = max(1, -(-min_cell // height))
    images_NHWC = images_NHWC.repeat(scale, 1).repeat(scale, 2)
    height, width = height * scale, width * scale
    rows = -(-count // columns)
    grid = np.full((rows * (height + pad) + pad, columns * (width + pad) + pad, channels), 255, np.uint8)
    for i, image in enumerate(images_NHWC):
        r, c = divmod(i, columns)
        top, left = pad + r * (height + pad), pad + c * (width + pad)
        grid[top : top + height, left : left + width] = image
    return grid


def labelled_grid(
    images_NHWC: np.ndarray,
    columns: int,
    row_labels: list[str],
    column_labels: list[str],
    *,
    pad: int = 1,
    min_cell: int = 32,
    font_size: int = 12,
) -> np.ndarray:
    """``image_grid`` with a label left of each row and one above each group of columns
    (``column_labels`` split the columns evenly, e.g. one class name over its samples). Text in
    PIL's built-in font (nothing downloaded); the same inputs give the same pixels."""
    from PIL import ImageDraw, ImageFont

    grid = image_grid(images_NHWC, columns, pad=pad, min_cell=min_cell)
    _, height, width, _ = images_NHWC.shape
    scale = max(1, -(-min_cell // height))
    cell_h, cell_w = height * scale, width * scale
    font = ImageFont.load_default(size=font_size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def size(text: str) -> tuple[int, int]:
        left, top, right, bottom = measure.textbbox((0, 0), text, font=font)
        return right - left, bottom - top

    left_margin = max((size(t)[0] for t in row_labels), default=0) + 8
    top_margin = max((size(t)[1] for t in column_labels), default=0) + 8
    canvas = Image.new("RGB", (left_margin + grid.shape[1], top_margin + grid.shape[0]), "white")
    canvas.paste(Image.fromarray(grid), (left_margin, top_margin))
    draw = ImageDraw.Draw(canvas)
    for r, text in enumerate(row_labels):
        y = top_margin + pad + r * (cell_h + pad) + cell_h // 2
        draw.text((left_margin - 4, y), text, fill="black", font=font, anchor="rm")
    span = columns / max(1, len(column_labels))
    for c, text in enumerate(column_labels):
        x = left_margin + pad + round((c + 0.5) * span * (cell_w + pad))
        draw.text((x, top_margin - 4), text, fill="black", font=font, anchor="mb")
    return np.asarray(canvas)


def save_png(image_HWC: np.ndarray, path: str | Path) -> None:
    """Write a uint8 image as PNG (deterministic bytes for the same pixels)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_HWC).save(path, format="PNG")


def guidance_grid(images_by_scale: list[np.ndarray], per_class: int, gap: int = 8) -> np.ndarray:
    """The stages' ``samples.png``: one ``image_grid`` of ``per_class`` columns (one row per class)
    for each guidance scale's samples, side by side with ``gap`` white pixels between them."""
    blocks = [image_grid(images, per_class) for images in images_by_scale]
    spacer = np.full((blocks[0].shape[0], gap, blocks[0].shape[2]), 255, np.uint8)
    return np.concatenate([part for block in blocks for part in (block, spacer)][:-1], axis=1)
