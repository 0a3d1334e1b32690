"""The attention figure: one tile per word, heat where the map peaks."""
import io

import numpy as np
from PIL import Image

from model.figure import LABEL_HEIGHT, TILE, attention_figure


def test_figure_has_the_photo_and_one_tile_per_word_with_heat_on_the_attended_cell():
    photo = Image.new("RGB", (300, 300), (128, 128, 128))
    tokens = ["a", "red", "circle"]
    alphas = np.zeros((3, 7, 7))
    alphas[0, 0, 0] = alphas[1, 6, 6] = alphas[2, 3, 3] = 1.0
    figure = Image.open(io.BytesIO(attention_figure(photo, tokens, alphas)))
    assert figure.format == "PNG"
    assert figure.size == ((1 + len(tokens)) * TILE, TILE + LABEL_HEIGHT)
    pixels = np.asarray(figure.convert("RGB"), dtype=int)
    cell = TILE / 7

    def redness(tile, row, col):
        y, x = int((row + 0.5) * cell), int(tile * TILE + (col + 0.5) * cell)
        r, g, b = pixels[y, x]
        return r - b

    # In each word's tile the attended cell is warmer than the opposite corner.
    assert redness(1, 0, 0) > redness(1, 6, 6) + 40
    assert redness(2, 6, 6) > redness(2, 0, 0) + 40
    assert redness(3, 3, 3) > redness(3, 0, 0) + 40
    assert np.abs(pixels[: TILE, 5: TILE - 5] - 128).max() <= 2      # the first tile is the photo itself


def test_figure_rejects_mismatched_maps():
    import pytest

    with pytest.raises(ValueError, match="2 tokens but 1"):
        attention_figure(Image.new("RGB", (10, 10)), ["a", "b"], np.ones((1, 7, 7)))
