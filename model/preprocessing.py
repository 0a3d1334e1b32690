"""The encoder's configuration and its input preprocessing, in numpy and PIL only.

Kept apart from model/encoder.py (the torch modules) so that the serving path — the ONNX Runtime
encoder of the serving bundle (model/bundle.py) — never imports torch: `import torch` alone costs
about 500 MB of resident memory. model/encoder.py re-exports both names, and its torch
`preprocess` is this one's output as a tensor, so training, the feature cache and the bot feed
the encoder the very same numbers.

    image (any size, any mode) --preprocess_array--> (3, S, S) float32, normalised
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
from PIL import Image


@dataclass
class EncoderConfig:
    backbone: str = "efficientnet_lite0"  # or one of model.encoder.TORCHVISION_BACKBONES
    colour_stats: bool = True
    hue_bins: int = 12
    # Side of a grid cell in input pixels (EfficientNet-Lite0 only). 16 gives the 14x14 grid of
    # the original Show-Attend-Tell: a small object (34..63 px at 224) then has cells of its own,
    # where at 32 px (7x7) a cell often held parts of two neighbouring objects and the decoder
    # swapped their colours and shapes.
    cell_px: int = 16

    @property
    def image_size(self) -> int:
        return 299 if self.backbone == "inception_v3" else 224

    @property
    def normalisation(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        if self.backbone == "efficientnet_lite0":
            return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # TF-Lite convention: pixels in [-1, 1]
        return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    @property
    def grid(self) -> tuple[int, int]:
        """The encoder's grid of cells (rows, cols)."""
        if self.backbone == "efficientnet_lite0":
            side = self.image_size // self.cell_px
            return side, side
        return (8, 8) if self.backbone == "inception_v3" else (7, 7)

    @property
    def feature_dim(self) -> int:
        """Features per grid cell: the CNN's taps, then the colour statistics."""
        cnn = 40 + 112 + 320 if self.backbone == "efficientnet_lite0" else 2048
        return cnn + (self.hue_bins + 4 if self.colour_stats else 0)

    def to_dict(self) -> dict:
        return asdict(self)


def resized_rgb(image: Image.Image, size: int) -> Image.Image:
    """The picture as 8-bit RGB, squashed to size x size."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (size, size):
        # The whole picture is squashed to a square rather than cropped: a caption must not
        # miss an object that sat near an edge. reducing_gap makes huge inputs cheap to shrink.
        image = image.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)
    return image


@lru_cache(maxsize=4)
def _pixel_table(normalisation: tuple[tuple[float, ...], tuple[float, ...]]) -> np.ndarray:
    """(3, 256) float32: every 8-bit value of each channel, normalised."""
    mean, std = (np.asarray(v, dtype=np.float32).reshape(3, 1) for v in normalisation)
    return (np.arange(256, dtype=np.float32)[None, :] / np.float32(255.0) - mean) / std


def preprocess_array(
    image: Image.Image, config: EncoderConfig | None = None, out: np.ndarray | None = None
) -> np.ndarray:
    """Any PIL image -> (3, S, S) float32, normalised for the backbone.

    The same numbers as the torch version this replaced (pixels / 255, minus the mean, over the
    deviation, in float32: tests/test_encoder.py checks they are equal), read from a table of the
    256 values per channel: 0.17 ms for a 224 px picture, where the arithmetic took 0.6 ms in numpy
    and 0.28 in torch.
    """
    config = config or EncoderConfig()
    pixels = np.asarray(resized_rgb(image, config.image_size), dtype=np.uint8)
    table = _pixel_table(config.normalisation)
    if out is None:
        out = np.empty((3, *pixels.shape[:2]), dtype=np.float32)
    for channel in range(3):
        np.take(table[channel], pixels[:, :, channel], out=out[channel])
    return out


def preprocess_batch(
    images: Sequence[Image.Image], config: EncoderConfig | None = None
) -> np.ndarray:
    """Pictures -> (B, 3, S, S) float32, contiguous: the encoder's input."""
    config = config or EncoderConfig()
    size = config.image_size
    batch = np.empty((len(images), 3, size, size), dtype=np.float32)
    for image, out in zip(images, batch):
        preprocess_array(image, config, out)
    return batch


def colour_statistics_array(images: np.ndarray, config: EncoderConfig | None = None) -> np.ndarray:
    """Per-cell colour summary of normalised pixels (B, 3, S, S) -> (B, rows*cols, hue_bins + 4):
    a chroma-weighted soft hue histogram (grey pixels have no hue, so they add nothing), the
    cell's mean RGB and mean chroma. model.encoder.colour_statistics in numpy (the same numbers
    to about 1e-6, tests/test_encoder.py), for the serving encoder (model/onnx_encoder.py).

    Why not in the ONNX graph: there the triangular binning ran over a (B, bins, S, S) tensor and
    the nested `where`s of the hue were slow, 1.7 ms of the encoder's 6.6 ms per image (EPYC, one
    thread); here each pixel adds to its two nearest bins by `bincount`, 0.9 ms, and it can run
    beside the graph.
    """
    config = config or EncoderConfig()
    bins = config.hue_bins
    (mean, *_), (std, *_) = config.normalisation
    if config.normalisation != ((mean,) * 3, (std,) * 3):  # per-channel: the general form
        m, s = (np.asarray(v, dtype=np.float32).reshape(1, 3, 1, 1) for v in config.normalisation)
        pixels = images * s + m
    else:
        pixels = images * np.float32(std)
        pixels += np.float32(mean)
    np.clip(pixels, 0, 1, out=pixels)
    batch, _, height, width = images.shape
    rows, cols = config.grid
    cell_h, cell_w = height // rows, width // cols
    r, g, b = pixels[:, 0], pixels[:, 1], pixels[:, 2]
    max_c = np.maximum(np.maximum(r, g), b)
    chroma = max_c - np.minimum(np.minimum(r, g), b)
    # Hue in [0, 6) by the usual hexcone formula.
    is_r, is_g = max_c == r, max_c == g
    numerator = np.where(is_r, g - b, np.where(is_g, b - r, r - g))
    offset = np.where(is_r, np.float32(0), np.where(is_g, np.float32(2), np.float32(4)))
    hue6 = numerator / np.maximum(chroma, np.float32(1e-6)) + offset
    hue6[hue6 < 0] += np.float32(6)
    # Triangular soft binning: the bins' centres are k / bins of the circle, so a pixel at
    # position p (in bins) gives 1 - frac(p) of its chroma to bin floor(p), frac(p) to the next.
    position = hue6 * np.float32(bins / 6)
    low = position.astype(np.int32)  # floor: position >= 0
    share = position - low
    low %= bins
    cell = (np.arange(height, dtype=np.int32)[:, None] // cell_h) * cols + (
        np.arange(width, dtype=np.int32)[None, :] // cell_w
    )
    base = np.arange(batch, dtype=np.int32)[:, None, None] * (rows * cols) + cell
    base *= bins
    high = share * chroma
    size = batch * rows * cols * bins
    sums = np.bincount((base + low).ravel(), (chroma - high).ravel(), size)
    sums += np.bincount((base + (low + 1) % bins).ravel(), high.ravel(), size)
    histogram = sums.reshape(batch, rows * cols, bins).astype(np.float32)
    histogram /= np.float32(cell_h * cell_w)
    rest = np.concatenate([pixels, chroma[:, None]], 1)  # (B, 4, H, W)
    # Cell means: the sum along each row of a cell first (contiguous), then down the cell.
    rest = rest.reshape(batch, 4, rows, cell_h, cols, cell_w).sum(5).sum(3)
    rest = (rest / np.float32(cell_h * cell_w)).reshape(batch, 4, rows * cols).transpose(0, 2, 1)
    return np.concatenate([histogram, rest], 2)
