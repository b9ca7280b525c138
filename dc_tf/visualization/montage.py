"""Montages: uint8 images tiled into grids, captioned with PIL, saved as PNG or to TensorBoard."""

import math
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dc_core import fileio

BACKGROUND = 255  # white, between cells and behind captions
CAPTION_HEIGHT = 14  # pixels of one line of PIL's default font (10 px) plus a margin


def to_rgb(images: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, 1 or 3] -> uint8 [..., H, W, 3] (grayscale repeated)."""
    if images.shape[-1] == 3:
        return images
    if images.shape[-1] != 1:
        raise ValueError(f"images with {images.shape[-1]} channels; expected 1 or 3")
    return np.repeat(images, 3, axis=-1)


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """float pixels in [0, 255] (any shape) -> uint8, rounded and clipped."""
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def enlarge(images: np.ndarray, min_size: int) -> np.ndarray:
    """uint8 [N, H, W, C] -> uint8 [N, f·H, f·W, C], f the smallest integer with f·H >= min_size.

    Nearest-neighbour repetition, so 28-px Fashion-MNIST stays sharp and readable in a montage.
    """
    factor = max(1, math.ceil(min_size / images.shape[1]))
    return np.repeat(np.repeat(images, factor, axis=1), factor, axis=2)


def grid(images: np.ndarray, columns: int, pad: int = 2, cells: Optional[int] = None
         ) -> np.ndarray:
    """Tiles images row by row into a grid.

    Args:
      images: uint8 [N, H, W, C], all of one size.
      columns: cells per row.
      pad: background pixels between cells and around the grid.
      cells: total number of cells (>= N; the rest stay background); default N.
    Returns:
      uint8 [rows·(H + pad) + pad, columns·(W + pad) + pad, C], rows = ceil(cells / columns).
    """
    n, h, w, c = images.shape
    cells = n if cells is None else cells
    if cells < n or columns < 1:
        raise ValueError(f"{n} images do not fit {cells} cells in {columns} columns")
    rows = max(1, math.ceil(cells / columns))
    out = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), BACKGROUND, np.uint8)
    for i in range(n):
        top, left = pad + (i // columns) * (h + pad), pad + (i % columns) * (w + pad)
        out[top:top + h, left:left + w] = images[i]
    return out


def stack(blocks: Sequence[np.ndarray]) -> np.ndarray:
    """Stacks uint8 [H_i, W_i, C] images vertically, left-aligned, widths padded to the widest."""
    width = max(b.shape[1] for b in blocks)
    padded = [np.pad(b, ((0, 0), (0, width - b.shape[1]), (0, 0)), constant_values=BACKGROUND)
              for b in blocks]
    return np.concatenate(padded, axis=0)


def same_size(images: Sequence[np.ndarray]) -> list:
    """uint8 [H_i, W_i, C] images padded at the bottom and right to the largest H and W."""
    h, w = max(i.shape[0] for i in images), max(i.shape[1] for i in images)
    return [np.pad(i, ((0, h - i.shape[0]), (0, w - i.shape[1]), (0, 0)),
                   constant_values=BACKGROUND) for i in images]


def caption(image: np.ndarray, text: str) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [CAPTION_HEIGHT + H, W', 3]: one line of black text above it.

    W' is W, or wider when the text needs it (the image is left-aligned).
    """
    font = ImageFont.load_default()
    text_width = int(math.ceil(font.getlength(text))) + 4
    band = Image.new("RGB", (max(image.shape[1], text_width), CAPTION_HEIGHT),
                     (BACKGROUND,) * 3)
    ImageDraw.Draw(band).text((2, 1), text, fill=(0, 0, 0), font=font)
    return stack([np.asarray(band), to_rgb(image)])


def save_png(path: str, image: np.ndarray) -> str:
    """Writes uint8 [H, W, 1 or 3] as PNG, atomically (folders created); returns the path."""
    with fileio.atomic_open(path, "wb") as f:
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(f, format="PNG")
    return path


def write_images(writer, tag: str, images: Sequence[np.ndarray], step: int,
                 description: str = "") -> None:
    """Writes uint8 [H, W, C] images of one size as one image summary of a tf.summary writer."""
    import tensorflow as tf  # here, so that montages alone do not load TensorFlow
    with writer.as_default(step=step):
        tf.summary.image(tag, np.stack(images), max_outputs=len(images), description=description)
    writer.flush()
