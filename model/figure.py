"""The attention figure: where the attention decoder looked while it wrote each word.

    [ photo ][ "a" ][ "red" ][ "circle" ] ...

The first tile is the photo; every other tile is the photo dimmed where the word's attention was
low and warmed (a heat colour) where it was high, with the word written underneath. The map of
the 14x14 grid is upsampled to the tile with bicubic interpolation and smoothed with a Gaussian so it
reads as a region rather than as blocks. The CLI writes it to disk; the bot sends the same bytes.
"""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

TILE = 160          # width and height of every picture tile, px
LABEL_HEIGHT = 28   # the strip under each tile that carries its word
GAP_COLOUR = (255, 255, 255)


def _font(size: int = 16) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:   # Pillow < 10.1 has only the bitmap font
        return ImageFont.load_default()


def heat_overlay(tile: np.ndarray, attention: np.ndarray) -> np.ndarray:
    """tile (S, S, 3) float 0..255, attention (S, S) in 0..1 -> blended (S, S, 3)."""
    a = attention[..., None]
    heat = np.concatenate([np.ones_like(a), a, np.zeros_like(a)], axis=2) * 255   # red -> yellow
    dimmed = tile * (0.3 + 0.7 * a)
    return dimmed * (1 - 0.45 * a) + heat * (0.45 * a)


def upsample_map(alpha: np.ndarray, size: int) -> np.ndarray:
    """(rows, cols) attention -> (size, size) smooth map scaled to a peak of 1."""
    alpha = np.asarray(alpha, dtype=np.float32)
    peak = float(alpha.max())
    levels = (alpha / peak * 255).round().astype(np.uint8) if peak > 0 else np.zeros(alpha.shape, np.uint8)
    smooth = (Image.fromarray(levels, mode="L").resize((size, size), Image.BICUBIC)
              .filter(ImageFilter.GaussianBlur(radius=size / 20)))
    values = np.asarray(smooth, dtype=np.float32)
    return values / max(float(values.max()), 1.0)


def attention_figure(image: Image.Image, tokens: Sequence[str], alphas) -> bytes:
    """PNG bytes: the photo and one tile per token; width (1 + len(tokens)) * TILE."""
    alphas = np.asarray(alphas, dtype=np.float32)
    if len(tokens) != len(alphas):
        raise ValueError(f"{len(tokens)} tokens but {len(alphas)} attention maps")
    photo = image.convert("RGB").resize((TILE, TILE), Image.BICUBIC, reducing_gap=2.0)
    base = np.asarray(photo, dtype=np.float32)
    canvas = Image.new("RGB", ((1 + len(tokens)) * TILE, TILE + LABEL_HEIGHT), GAP_COLOUR)
    canvas.paste(photo, (0, 0))
    draw, font = ImageDraw.Draw(canvas), _font()
    draw.text((TILE / 2, TILE + LABEL_HEIGHT / 2), "image", fill=(90, 90, 90), font=font, anchor="mm")
    for i, (word, alpha) in enumerate(zip(tokens, alphas), start=1):
        tile = heat_overlay(base, upsample_map(alpha, TILE))
        canvas.paste(Image.fromarray(tile.clip(0, 255).astype(np.uint8)), (i * TILE, 0))
        draw.text((i * TILE + TILE / 2, TILE + LABEL_HEIGHT / 2), word, fill=(0, 0, 0), font=font, anchor="mm")
    for i in range(1, len(tokens) + 1):   # thin separators so neighbouring tiles do not merge
        draw.line([(i * TILE, 0), (i * TILE, TILE + LABEL_HEIGHT)], fill=GAP_COLOUR, width=2)
    buffer = io.BytesIO()
    canvas.save(buffer, "PNG", compress_level=1)   # speed over a few kB
    return buffer.getvalue()
