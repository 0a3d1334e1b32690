"""The attention figure: a grid of tiles readable on a phone, heat where the map peaks."""

import io

import numpy as np
import pytest
from PIL import Image

from model.captioner import MAX_LEN
from model.figure import (
    FONT_SIZE,
    GAP,
    LABEL_HEIGHT,
    MAX_COLUMNS,
    TILE,
    _font,
    attention_figure,
    layout,
)


def figure_of(words: int, side: int = 7) -> Image.Image:
    alphas = np.random.default_rng(words).random((words, side, side))
    return Image.open(
        io.BytesIO(
            attention_figure(
                Image.new("RGB", (300, 200), (90, 120, 150)),
                [f"w{i}" for i in range(words)],
                alphas,
            )
        )
    )


@pytest.mark.parametrize(
    "words", [1, 3, 7, 11, MAX_LEN]
)  # one word, a one-object and a three-object caption, the longest
def test_figure_is_a_grid_of_big_tiles_within_aspect_and_telegram_limits(words):
    figure = figure_of(words)
    columns, rows = layout(1 + words)
    assert columns <= MAX_COLUMNS and columns * rows >= 1 + words > columns * (rows - 1)
    assert figure.size == (columns * (TILE + GAP) - GAP, rows * (TILE + LABEL_HEIGHT + GAP) - GAP)
    width, height = figure.size
    assert 0.5 <= width / height <= 2.0
    assert width + height <= 10_000 and max(width, height) / min(width, height) <= 20  # sendPhoto
    assert TILE >= 224


def test_word_labels_are_at_least_24_px_high():
    font = _font()
    assert font.size == FONT_SIZE  # a TrueType font at its real size, not the 11 px bitmap
    _, top, _, bottom = font.getbbox("circle")
    assert bottom - top >= 24
    _, top, _, bottom = font.getbbox("a")  # even a lone x-height word is legible
    assert bottom - top >= 16


def test_the_longest_word_fits_its_tile():
    figure = figure_of(1)
    long_word = attention_figure(
        Image.new("RGB", (50, 50)), ["incomprehensibilities"], np.ones((1, 7, 7))
    )
    label = np.asarray(Image.open(io.BytesIO(long_word)).convert("L"))[
        TILE : TILE + LABEL_HEIGHT, TILE + GAP :
    ]
    ink = np.flatnonzero((label < 128).any(axis=0))
    assert figure.width == Image.open(io.BytesIO(long_word)).width
    assert ink.size and ink.min() > 0 and ink.max() < TILE - 1  # shrunk to fit, not clipped


def test_the_photo_comes_first_and_each_word_tile_is_warm_where_its_map_peaks():
    photo = Image.new("RGB", (300, 300), (128, 128, 128))
    tokens = ["a", "red", "circle"]
    alphas = np.zeros((3, 7, 7))
    alphas[0, 0, 0] = alphas[1, 6, 6] = alphas[2, 3, 3] = 1.0
    figure = Image.open(io.BytesIO(attention_figure(photo, tokens, alphas)))
    assert figure.format == "JPEG"
    columns, _ = layout(4)
    pixels = np.asarray(figure.convert("RGB"), dtype=int)
    cell = TILE / 7

    def redness(tile, row, col):
        top = (tile // columns) * (TILE + LABEL_HEIGHT + GAP)
        left = (tile % columns) * (TILE + GAP)
        r, g, b = pixels[int(top + (row + 0.5) * cell), int(left + (col + 0.5) * cell)]
        return r - b

    assert redness(1, 0, 0) > redness(1, 6, 6) + 40
    assert redness(2, 6, 6) > redness(2, 0, 0) + 40
    assert redness(3, 3, 3) > redness(3, 0, 0) + 40
    assert (
        np.abs(pixels[:TILE, 5 : TILE - 5] - 128).max() <= 2
    )  # the first tile is the photo itself


def test_figure_rejects_mismatched_maps():
    with pytest.raises(ValueError, match="2 tokens but 1"):
        attention_figure(Image.new("RGB", (10, 10)), ["a", "b"], np.ones((1, 7, 7)))
