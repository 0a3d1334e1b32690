"""Pictures that are not shape scenes, available offline: what the domain check must reject.

- every photo scikit-image bundles (its test extra; `skimage.data`), the colour ones also
  converted to greyscale, as a phone's black-and-white filter would;
- generated pictures: a page of text, a bar chart and a pie chart drawn with PIL, and noise.

Used by the domain check's calibration report (model/domain.py), its tests and the benchmark.
None of them is used to fit the check.
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# skimage.data entries that are not single pictures (volumes, stacks, file names, helpers).
_NOT_PICTURES = {
    "data_dir",
    "download_all",
    "file_hash",
    "lbp_frontal_face_cascade_filename",
    "lfw_subset",
    "cells3d",
    "brain",
    "kidney",
    "human_mitosis",
    "nickel_solidification",
    "protein_transport",
    "vortex",
    "binary_blobs",
    "cat",
}  # cat: the same photo as chelsea


def _as_image(array: np.ndarray) -> Image.Image | None:
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        low, high = float(array.min()), float(array.max())
        array = ((array - low) / max(high - low, 1e-9) * 255).round().astype(np.uint8)
    if array.ndim == 2:
        return Image.fromarray(array, "L")
    if array.ndim == 3 and array.shape[2] in (3, 4):
        image = Image.fromarray(array, "RGBA" if array.shape[2] == 4 else "RGB")
        if image.mode == "RGBA":  # as the bot's loader does: transparency onto white
            background = Image.new("RGB", image.size, (255, 255, 255))
            background.paste(image, mask=image.getchannel("A"))
            image = background
        return image
    return None


def skimage_photos() -> dict[str, Image.Image]:
    """name -> picture for every skimage.data photo present offline, plus `<name> (grey)` for
    colour ones. Empty when scikit-image is not installed."""
    try:
        import skimage.data as data
    except ImportError:
        return {}
    photos = {}
    for name in sorted(set(data.__all__) - _NOT_PICTURES):
        try:
            loaded = getattr(data, name)()
        except (KeyboardInterrupt, SystemExit):
            raise
        except (
            BaseException
        ):  # needs a download, absent offline (under pytest skimage raises pytest's Skipped)
            continue
        arrays = (
            loaded[:2] if isinstance(loaded, tuple) else (loaded,)
        )  # stereo_motorcycle: left, right
        for index, array in enumerate(arrays):
            image = _as_image(array)
            if image is None:
                continue
            key = name if len(arrays) == 1 else f"{name} {('left', 'right')[index]}"
            photos[key] = image.convert("RGB")
            if image.mode != "L":
                photos[f"{key} (grey)"] = image.convert("L").convert("RGB")
    return photos


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def text_page(side: int = 600, seed: int = 0) -> Image.Image:
    rng = random.Random(seed)
    words = [
        "the",
        "model",
        "reads",
        "a",
        "picture",
        "and",
        "writes",
        "what",
        "it",
        "sees",
        "in",
        "words",
        "one",
        "after",
        "another",
    ]
    page = Image.new("RGB", (side, int(side * 1.3)), (250, 250, 245))
    draw, font = ImageDraw.Draw(page), _font(18)
    for y in range(30, page.height - 30, 26):
        draw.text(
            (30, y), " ".join(rng.choice(words) for _ in range(9)), fill=(20, 20, 20), font=font
        )
    return page


def bar_chart(side: int = 500, seed: int = 0) -> Image.Image:
    rng = random.Random(seed)
    chart = Image.new("RGB", (side, side), (255, 255, 255))
    draw, font = ImageDraw.Draw(chart), _font(14)
    left, bottom = 60, side - 50
    draw.line([(left, 30), (left, bottom), (side - 20, bottom)], fill=(0, 0, 0), width=2)
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
    width = (side - left - 40) // 10
    for i in range(10):
        height = rng.randint(40, bottom - 60)
        x = left + 10 + i * width
        draw.rectangle([x, bottom - height, x + width - 8, bottom], fill=colours[i % len(colours)])
        draw.text((x, bottom + 8), f"Q{i + 1}", fill=(0, 0, 0), font=font)
    for tick in range(5):
        y = bottom - tick * (bottom - 40) // 4
        draw.text((10, y - 8), f"{tick * 25}", fill=(0, 0, 0), font=font)
        draw.line([(left - 5, y), (left, y)], fill=(0, 0, 0))
    draw.text((left + 10, 5), "Sales by quarter", fill=(0, 0, 0), font=_font(18))
    return chart


def pie_chart(side: int = 500, seed: int = 0) -> Image.Image:
    rng = random.Random(seed)
    chart = Image.new("RGB", (side, side), (255, 255, 255))
    draw = ImageDraw.Draw(chart)
    shares = [rng.random() + 0.2 for _ in range(6)]
    start = 0.0
    colours = [
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
    ]
    for share, colour in zip(shares, colours):
        end = start + 360 * share / sum(shares)
        draw.pieslice(
            [50, 50, side - 150, side - 150], start, end, fill=colour, outline=(255, 255, 255)
        )
        start = end
    for i, colour in enumerate(colours):
        draw.rectangle([side - 130, 60 + 30 * i, side - 115, 75 + 30 * i], fill=colour)
        draw.text((side - 105, 58 + 30 * i), f"part {i + 1}", fill=(0, 0, 0), font=_font(16))
    return chart


def noise(side: int = 300, seed: int = 0, grey: bool = False) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (side, side, 1 if grey else 3), dtype=np.uint8)
    return Image.fromarray(pixels.repeat(3, axis=2) if grey else pixels, "RGB")


def generated_nonscenes() -> dict[str, Image.Image]:
    return {
        "page of text": text_page(),
        "bar chart": bar_chart(),
        "pie chart": pie_chart(),
        "colour noise": noise(),
        "grey noise": noise(grey=True, seed=1),
    }


def nonscenes() -> dict[str, Image.Image]:
    return {**skimage_photos(), **generated_nonscenes()}
