"""The attention figure: where the attention decoder looked while it wrote each word.

    [ photo ][ "a"    ][ "red"   ][ "circle" ]
    [ "to"  ][ "the"  ][ "left"  ][ "of"     ]
    ...

A grid of at most `MAX_COLUMNS` columns, read like text: the first tile is the photo; every
other tile is the photo dimmed where the word's attention was low and warmed (a heat colour)
where it was high, with the word written underneath. The map of the 14x14 grid is upsampled to
the tile with bicubic interpolation and smoothed with a Gaussian so it reads as a region rather
than as blocks. The CLI writes it to disk; the bot sends the same bytes (a JPEG).

Sized for a phone: tiles of `TILE` px (at least the encoder's 224) with words `FONT_SIZE` px
high, and as many columns as keep the figure between 1:2 and 2:1 (a strip of 21 tiles was
4704x188 px, which Telegram showed 40 px tall). The longest caption, MAX_LEN words, makes a
4 x 6 grid of 984 x 1744 px, well inside sendPhoto's limits (width + height <= 10000, ratio <= 20).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from functools import lru_cache
from typing import cast

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont

TILE = 240  # width and height of every picture tile, px
LABEL_HEIGHT = 44  # the strip under each tile that carries its word
FONT_SIZE = (
    32  # px; Pillow's bundled TrueType font (Aileron): lowercase words stand about 26 px high
)
GAP = 8  # white space between tiles
MAX_COLUMNS = 4
MAX_ASPECT = 2.0  # the figure's longer side over its shorter one
GAP_COLOUR = (255, 255, 255)
# The figure is a JPEG at quality 90 with full-resolution colour (4:4:4, so the words' edges and
# the heat's reds stay crisp). Telegram re-encodes every sendPhoto as JPEG anyway. Measured for
# 20 words (984 x 1744 px) on the 2-core EPYC: 7 ms and 0.3 MB, where the PNG (deflate level 1,
# run-length matching) took 90 ms and 1.6 MB, four fifths of the figure's time.
JPEG_QUALITY = 90


@lru_cache(maxsize=8)
def _font(size: int = FONT_SIZE) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled TrueType font at `size` px: present wherever Pillow >= 10.1 is (no system
    fonts needed)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the small bitmap font
        return ImageFont.load_default()


def layout(tiles: int) -> tuple[int, int]:
    """(columns, rows) for `tiles` tiles: of the column counts (up to MAX_COLUMNS) that keep the
    figure within MAX_ASPECT either way, the fewest rows, then the fewest columns that give them
    (4 tiles make 2x2, not 3+1); long captions grow downwards."""
    cell_w, cell_h = TILE + GAP, TILE + LABEL_HEIGHT + GAP

    def aspect(columns: int) -> float:
        return columns * cell_w / (math.ceil(tiles / columns) * cell_h)

    fitting = [
        c
        for c in range(1, min(MAX_COLUMNS, max(tiles, 1)) + 1)
        if 1 / MAX_ASPECT <= aspect(c) <= MAX_ASPECT
    ]
    columns = (
        min(fitting, key=lambda c: (math.ceil(tiles / c), c))
        if fitting
        else min(MAX_COLUMNS, max(tiles, 1))
    )
    return columns, math.ceil(tiles / columns)


def figure_size(words: int) -> tuple[int, int]:
    """(width, height) in px of the figure of a caption of `words` words."""
    columns, rows = layout(1 + words)
    return columns * (TILE + GAP) - GAP, rows * (TILE + LABEL_HEIGHT + GAP) - GAP


# The blend, per level a of the smoothed map (0..255 for 0..1), as lookup tables: the photo dimmed
# where attention is low, out = photo * DIM[a] / 255 + (HEAT_RED[a], HEAT_GREEN[a], 0), warming to
# red and then yellow where it is high. In PIL's uint8 operations a tile takes a fraction of a ms.
_A = np.arange(256) / 255
DIM = ((0.3 + 0.7 * _A) * (1 - 0.45 * _A) * 255).round().astype(int).tolist()
HEAT_RED = (255 * 0.45 * _A).round().astype(int).tolist()
HEAT_GREEN = (255 * 0.45 * _A * _A).round().astype(int).tolist()


def heat_overlay(photo: Image.Image, levels: Image.Image) -> Image.Image:
    """An RGB tile and its attention levels ("L", same size) -> the tile dimmed and warmed."""
    dim = levels.point(DIM)
    dimmed = ImageChops.multiply(photo, Image.merge("RGB", (dim, dim, dim)))
    heat = Image.merge(
        "RGB", (levels.point(HEAT_RED), levels.point(HEAT_GREEN), Image.new("L", levels.size))
    )
    return ImageChops.add(dimmed, heat)


def upsample_map(alpha: np.ndarray, size: int) -> Image.Image:
    """(rows, cols) attention -> a (size, size) "L" map, smooth, its peak at 255. Smoothed at a
    quarter of the size (a Gaussian of a twentieth of the side), then enlarged: the same look for
    a sixteenth of the blurring."""
    alpha = np.asarray(alpha, dtype=np.float32)
    peak = float(alpha.max())
    levels = (
        (alpha / peak * 255).round().astype(np.uint8)
        if peak > 0
        else np.zeros(alpha.shape, np.uint8)
    )
    small = max(size // 4, 1)
    smooth = (
        Image.fromarray(levels, mode="L")
        .resize((small, small), Image.Resampling.BICUBIC)
        .filter(ImageFilter.GaussianBlur(radius=small / 20))
        .resize((size, size), Image.Resampling.BILINEAR)
    )
    _, top = cast(tuple[int, int], smooth.getextrema())  # an "L" image: (lowest, highest)
    return smooth.point(lambda v: v * 255 // top) if 0 < top < 255 else smooth


def _label(draw: ImageDraw.ImageDraw, centre: tuple[float, float], word: str, colour) -> None:
    font = _font()
    if draw.textlength(word, font=font) > TILE - 8:  # a long word: smaller rather than clipped
        font = _font(max(12, int(FONT_SIZE * (TILE - 8) / draw.textlength(word, font=font))))
    draw.text(centre, word, fill=colour, font=font, anchor="mm")


def attention_figure(image: Image.Image, tokens: Sequence[str], alphas) -> bytes:
    """JPEG bytes: the photo and one tile per token, in a grid of figure_size(len(tokens)) px."""
    alphas = np.asarray(alphas, dtype=np.float32)
    if len(tokens) != len(alphas):
        raise ValueError(f"{len(tokens)} tokens but {len(alphas)} attention maps")
    photo = image.convert("RGB").resize((TILE, TILE), Image.Resampling.BICUBIC, reducing_gap=2.0)
    columns, _ = layout(1 + len(tokens))
    canvas = Image.new("RGB", figure_size(len(tokens)), GAP_COLOUR)
    draw = ImageDraw.Draw(canvas)
    tiles = [(photo, "image", (90, 90, 90))]
    tiles += [
        (heat_overlay(photo, upsample_map(alpha, TILE)), word, (0, 0, 0))
        for word, alpha in zip(tokens, alphas)
    ]
    for index, (tile, word, colour) in enumerate(tiles):
        row, column = divmod(index, columns)
        x, y = column * (TILE + GAP), row * (TILE + LABEL_HEIGHT + GAP)
        canvas.paste(tile, (x, y))
        _label(draw, (x + TILE / 2, y + TILE + LABEL_HEIGHT / 2), word, colour)
    buffer = io.BytesIO()
    canvas.save(buffer, "JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buffer.getvalue()
