"""The encoder's configuration and its input preprocessing, in numpy and PIL only.

Kept apart from model/encoder.py (the torch modules) so that the serving path — the ONNX Runtime
encoder of the serving bundle (model/bundle.py) — never imports torch: `import torch` alone costs
about 500 MB of resident memory. model/encoder.py re-exports both names, and its torch
`preprocess` is this one's output as a tensor, so training, the feature cache and the bot feed
the encoder the very same numbers.

    image (any size, any mode) --preprocess_array--> (3, S, S) float32, normalised
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

# EfficientNet-Lite0's taps on the grid, in this order: blocks 2, 4 and 6 (strides 8, 16, 32)
LITE0_TAP_CHANNELS = (40, 112, 320)
LITE0_TAP_STRIDES = (8, 16, 32)


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
    # Input side in pixels (EfficientNet-Lite0 only; a multiple of 32, and of cell_px). Weights
    # saved before this field existed were trained at 224, hence the default.
    input_px: int = 224

    @property
    def image_size(self) -> int:
        if self.backbone == "inception_v3":
            return 299
        return self.input_px if self.backbone == "efficientnet_lite0" else 224

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
    def block4_on_grid(self) -> bool:
        """Whether the grid keeps EfficientNet-Lite0's block-4 map cell for cell (16 px cells,
        at any input side): what the ImageNet labels and the tunable encoder top read."""
        return self.backbone == "efficientnet_lite0" and self.cell_px == 16

    @property
    def feature_dim(self) -> int:
        """Features per grid cell: the CNN's taps, then the colour statistics."""
        cnn = sum(LITE0_TAP_CHANNELS) if self.backbone == "efficientnet_lite0" else 2048
        return cnn + (self.hue_bins + 4 if self.colour_stats else 0)

    @property
    def repeated_columns(self) -> tuple[int, int, int] | None:
        """(first, end, k): the grid's columns first..end-1 hold the coarsest tap, a map
        coarser than the grid repeated over k x k blocks of cells (the block-6 tap at 16 px
        cells: 7x7 onto 14x14, k = 2), so a product reading them needs one cell per block; None
        if no tap is coarser than the grid."""
        if self.backbone != "efficientnet_lite0":
            return None
        stride, channels = LITE0_TAP_STRIDES[-1], LITE0_TAP_CHANNELS[-1]
        if stride <= self.cell_px or stride % self.cell_px:
            return None
        first = sum(LITE0_TAP_CHANNELS[:-1])
        return first, first + channels, stride // self.cell_px

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def of_weights(cls, weights_dir: str | Path) -> EncoderConfig:
        """The config saved beside a weights directory's decoders (encoder.json)."""
        return cls(**json.loads((Path(weights_dir) / "encoder.json").read_text()))


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
    256 values per channel: for a 224 px picture 0.06 ms in one pass compiled by numba, 0.14 ms by
    numpy's `take` a channel at a time (a lone photo's encoding and captions 1.9 % faster with the
    first, paired medians of 600), where the arithmetic took 0.6 ms in numpy and 0.28 in torch.
    """
    config = config or EncoderConfig()
    pixels = np.asarray(resized_rgb(image, config.image_size), dtype=np.uint8)
    table = _pixel_table(config.normalisation)
    if out is None:
        out = np.empty((3, *pixels.shape[:2]), dtype=np.float32)
    kernels = _compiled()
    if kernels is not None:  # 3 lookups a pixel in one pass, not 3 strided passes of np.take
        kernels.normalised(pixels, table, out)
        return out
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
    cell's mean RGB and mean chroma. model.encoder.colour_statistics without torch (the same
    numbers to about 1e-6, tests/test_encoder.py), for the serving encoder (model/onnx_encoder.py):
    in one pass over the pixels (`_colour_cells`, compiled by numba) where numba is installed and
    the cells tile the picture, else in numpy (`colour_statistics_numpy`).

    Why one compiled pass: numpy makes about 30 passes over the picture, each allocating a
    picture-sized array. Measured for a lone 224 px photo on the 2-core AMD EPYC (AVX-512) of
    issue 13, within the whole photo (encoding, both greedy captions and 5 samples): 0.97 ms in
    numpy, and the whole photo 6.9 % faster with the compiled pass (paired medians of 600); alone
    0.24 against 0.68-0.98 ms (0.62 ms on uniform noise, whose hues defeat branch prediction)."""
    config = config or EncoderConfig()
    rows, cols = config.grid
    height, width = images.shape[2:]
    kernels = _compiled() if height % rows == 0 and width % cols == 0 else None
    if kernels is None:
        return colour_statistics_numpy(images, config)
    mean, std = _normalisation_arrays(config.normalisation)
    pixels = np.ascontiguousarray(images, np.float32)
    return kernels.colour_cells(pixels, mean, std, config.hue_bins, rows, cols)


@lru_cache(maxsize=4)
def _normalisation_arrays(
    normalisation: tuple[tuple[float, ...], tuple[float, ...]],
) -> tuple[np.ndarray, np.ndarray]:
    """The per-channel mean and deviation as float32 arrays (3,), made once."""
    mean, std = (np.asarray(v, dtype=np.float32) for v in normalisation)
    return mean, std


def colour_statistics_numpy(images: np.ndarray, config: EncoderConfig | None = None) -> np.ndarray:
    """colour_statistics_array in numpy.

    Why not in the ONNX graph: there the triangular binning ran over a (B, bins, S, S) tensor and
    the nested `where`s of the hue were slow, 1.7 ms of the encoder's 6.6 ms per image (EPYC, one
    thread); here each pixel adds to its two nearest bins by `bincount`. Measured per 224 px image
    on the same EPYC: 1.1 ms (2.3 ms on a noisy photo before the hue's branches became 0/1
    factors; see `_hue6`), of which 0.25 ms `bincount`.
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
    # Triangular soft binning: the bins' centres are k / bins of the circle, so a pixel at
    # position p (in bins) gives 1 - frac(p) of its chroma to bin floor(p), frac(p) to the next.
    position = _hue6(r, g, b, max_c, chroma)
    position *= np.float32(bins / 6)
    low = position.astype(np.intp)  # floor: position >= 0; intp, as bincount wants it
    share = position - low
    low -= bins * (low >= bins)
    cell = (np.arange(height, dtype=np.intp)[:, None] // cell_h) * cols + (
        np.arange(width, dtype=np.intp)[None, :] // cell_w
    )
    index = np.arange(batch, dtype=np.intp)[:, None, None] * (rows * cols) + cell
    index *= bins
    index += low  # each pixel's lower bin ...
    high = share * chroma
    size = batch * rows * cols * bins
    sums = np.bincount(index.ravel(), (chroma - high).ravel(), size)
    index += 1 - bins * (low == bins - 1)  # ... and the next one, round the circle
    sums += np.bincount(index.ravel(), high.ravel(), size)
    histogram = sums.reshape(batch, rows * cols, bins).astype(np.float32)
    histogram /= np.float32(cell_h * cell_w)
    rest = np.concatenate([pixels, chroma[:, None]], 1)  # (B, 4, H, W)
    # Cell sums as two products with 0/1 pooling matrices: 0.11 ms against 0.23 ms for
    # reshape + sum over the cells' short axes.
    down = (np.arange(height)[None, :] // cell_h == np.arange(rows)[:, None]).astype(np.float32)
    across = (np.arange(width)[:, None] // cell_w == np.arange(cols)[None, :]).astype(np.float32)
    rest = down @ (rest @ across)  # (B, 4, rows, cols)
    rest = (rest / np.float32(cell_h * cell_w)).reshape(batch, 4, rows * cols).transpose(0, 2, 1)
    return np.concatenate([histogram, rest], 2)


def _colour_cells(images, mean, std, bins, rows, cols):  # pragma: no cover (compiled by numba)
    """colour_statistics_numpy's numbers, cell by cell in one pass: each pixel's hue (the hexcone
    formula, red winning ties as in `_hue6`) gives 1 - frac of its chroma to its lower bin and frac
    to the next round the circle; sums in float32 over a cell's pixels (numpy's are float64: the
    two differ by under 3e-6). The channel and chroma sums stay in registers and grey pixels
    (no chroma, nothing to the bins) skip the hue: 0.21-0.23 against 0.29 ms for a scene or a photo
    (uniform noise, whose hues defeat branch prediction, 0.63 either way)."""
    batch, _, height, width = images.shape
    cell_h, cell_w = height // rows, width // cols
    out = np.empty((batch, rows * cols, bins + 4), np.float32)
    histogram = np.zeros(bins + 1, np.float32)  # the cell's hue bins; the last one wraps to 0
    zero, one = np.float32(0), np.float32(1)
    per_bin, area = np.float32(bins / 6), np.float32(cell_h * cell_w)
    for n in range(batch):
        red, green, blue = images[n, 0], images[n, 1], images[n, 2]
        for cell in range(rows * cols):
            top, left = (cell // cols) * cell_h, (cell % cols) * cell_w
            histogram[:] = 0
            sum_r, sum_g, sum_b, sum_chroma = zero, zero, zero, zero
            for y in range(top, top + cell_h):
                for x in range(left, left + cell_w):
                    r = min(max(red[y, x] * std[0] + mean[0], zero), one)
                    g = min(max(green[y, x] * std[1] + mean[1], zero), one)
                    b = min(max(blue[y, x] * std[2] + mean[2], zero), one)
                    largest = max(max(r, g), b)
                    chroma = largest - min(min(r, g), b)
                    sum_r, sum_g, sum_b = sum_r + r, sum_g + g, sum_b + b
                    sum_chroma += chroma
                    if chroma == zero:
                        continue
                    if largest == r:
                        hue = (g - b) / chroma
                    elif largest == g:
                        hue = (b - r) / chroma + np.float32(2)
                    else:
                        hue = (r - g) / chroma + np.float32(4)
                    if hue < zero:
                        hue += np.float32(6)
                    position = hue * per_bin
                    low = np.int64(position)
                    high = (position - np.float32(low)) * chroma  # the next bin's share
                    low = low - bins if low >= bins else low
                    histogram[low] += chroma - high
                    histogram[low + 1] += high
            histogram[0] += histogram[bins]
            for k in range(bins):
                out[n, cell, k] = histogram[k] / area
            for k, total in enumerate((sum_r, sum_g, sum_b, sum_chroma)):
                out[n, cell, bins + k] = total / area
    return out


def _normalised(pixels, table, out):  # pragma: no cover (compiled by numba)
    """out[c, y, x] = table[c, pixels[y, x, c]]: preprocess_array's lookup in one pass."""
    height, width, _ = pixels.shape
    for y in range(height):
        for x in range(width):
            for c in range(3):
                out[c, y, x] = table[c, pixels[y, x, c]]


@lru_cache(maxsize=1)
def _compiled() -> SimpleNamespace | None:
    """`_normalised` and `_colour_cells` compiled by numba (model/compiled.py), or None: numpy
    does their work."""
    from model.compiled import compile_kernels

    kernels = {"normalised": _normalised, "colour_cells": _colour_cells}
    return compile_kernels("preprocessing", kernels, _warm_up)


def _warm_up(kernels: SimpleNamespace) -> None:
    """Compile (or load) both kernels for the argument types of real calls, on a 2x2 picture."""
    table = _pixel_table(((0.5,) * 3, (0.5,) * 3))
    pixels = np.empty((1, 3, 2, 2), np.float32)
    kernels.normalised(np.zeros((2, 2, 3), np.uint8), table, pixels[0])
    mean, std = np.zeros(3, np.float32), np.ones(3, np.float32)
    kernels.colour_cells(pixels, mean, std, 2, 1, 1)


def _hue6(r: np.ndarray, g: np.ndarray, b: np.ndarray, max_c: np.ndarray, chroma: np.ndarray):
    """Hue in [0, 6) by the usual hexcone formula, with 0/1 factors for "which channel is the
    largest" instead of nested `np.where`s: products and sums with them are exact, and
    `np.where` branches per pixel, 0.4 ms for each of the two on a noisy photo's 50,176 pixels."""
    is_r = (max_c == r).astype(np.float32)
    is_g = (max_c == g).astype(np.float32)
    is_g -= is_g * is_r  # red wins a tie
    is_b = np.float32(1) - is_r - is_g
    numerator = (g - b) * is_r
    numerator += (b - r) * is_g
    numerator += (r - g) * is_b
    hue6 = numerator / np.maximum(chroma, np.float32(1e-6))
    hue6 += is_g * np.float32(2)
    hue6 += is_b * np.float32(4)
    hue6 += (hue6 < 0) * np.float32(6)
    return hue6
