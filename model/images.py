"""Opening untrusted image files safely.

Every image that reaches the model — from the CLI, a test or a chat — comes through
`open_image`, which either returns a plain 8-bit RGB picture or raises `ImageError` with a short
reason a person can act on. It reads the header before any pixels, so a decompression bomb
(a small file that claims gigapixels) is refused before it can allocate.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pillow_heif
from PIL import Image, ImageOps
from PIL.JpegImagePlugin import JpegImageFile

# HEIC (iPhones' photos, as sent as a file) through libheif; it applies the file's rotation on
# opening and clears the EXIF orientation, so exif_transpose does not turn the picture twice.
# It has no reduced-scale decoding like JPEG's draft mode: a 12-megapixel HEIC took 250-390 ms
# to open (a JPEG of it 12 ms), off the event loop, on the worker's encoding thread.
pillow_heif.register_heif_opener()

FORMATS = "JPEG, PNG, WebP, HEIC, AVIF, TIFF, BMP or GIF"  # what open_image reads
# Pillow's names of those formats: the only decoders an untrusted file reaches. Pillow can read
# thirty more (PCX, TGA, SGI, ICNS, DDS, JPEG 2000, PSD, FITS; EPS through Ghostscript, a
# program of its own), formats nobody sends as a photo, whose decoders have had most of Pillow's
# security fixes. Pillow's JPEG opener also gives camera JPEGs with several pictures (MPO: Ultra
# HDR gain maps, depth maps, stereo pairs) as MPO.
DECODERS = ("JPEG", "PNG", "WEBP", "HEIF", "AVIF", "TIFF", "BMP", "GIF")
DEFAULT_MAX_PIXELS = 40_000_000  # 40 megapixels: any phone photo, no bomb
DEFAULT_MAX_BYTES = 20 * 1024 * 1024  # the Bot API's download limit
# JPEGs are decoded at a 1/2..1/8 scale (PIL's draft mode: the DCT skips the detail) that keeps
# both sides at least this: the encoder's input side. Measured against 448 (twice it): a 1024 px
# scene opens and preprocesses in 1.4 ms instead of 16 ms, a 4000x3000 photo in 13 ms instead of
# 28, and 300 held-out scenes rendered at 1024 px as JPEG q70 caption as well (attention exact
# match 0.967 both ways; baseline 0.863 -> 0.870).
DECODE_SIDE = 224
# Other formats decode at full size, and a small file can hold a big picture: a 176 KB PNG of
# 39 megapixels with transparency took 743 MB to open, and its 117 MB of RGB stayed while the
# worker's batch (up to BATCH_MAX pictures) waited for the encoder. So such a picture is
# box-reduced as soon as it is decoded, in the mode it decoded to, to a shorter side of at least
# this: that PNG now takes 300 MB to open and keeps 1.8 MB (an RGB one 298 -> 152 MB; a lossless
# WebP of 8 KB still 597 MB, in Pillow's WebP decoder). The encoder's resize
# (model/preprocessing.py, `reducing_gap` 3) box-reduces to this side itself before its bicubic
# step, so it sees nearly the same pixels, and a picture under twice this side is not touched.
REDUCED_SIDE = 3 * DECODE_SIDE
# Modes Pillow's reduce averages correctly (RGBA and LA through premultiplied alpha); palette
# and 16-bit modes are converted to one of these first.
REDUCIBLE = ("L", "LA", "RGB", "RGBA", "RGBX", "CMYK", "I", "F")


class ImageError(ValueError):
    """The file cannot be used as an image; str(error) says why, in words for a person."""


def open_image(
    source: bytes | str | Path,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Image.Image:
    data = source if isinstance(source, (bytes, bytearray)) else _read(Path(source), max_bytes)
    if len(data) > max_bytes:
        raise ImageError(
            f"the file is too large: {len(data) / 2**20:.1f} MB (limit {max_bytes / 2**20:.0f} MB)"
        )
    if not data:
        raise ImageError("the file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data), formats=DECODERS)
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(
                    f"the image is too large: {width}x{height} pixels "
                    f"({width * height / 1e6:.0f} megapixels, limit {max_pixels / 1e6:.0f})"
                )
            if isinstance(image, JpegImageFile):  # MPO too: decode at 1/2..1/8 scale
                image.draft("RGB", (DECODE_SIDE, DECODE_SIDE))
            image.seek(0)  # the first frame of an animation
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # a full-size copy only to turn it
            return _to_rgb(image)
    except ImageError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageError(f"this file is not an image I can read ({FORMATS})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError("the image is too large (it claims more pixels than I accept)") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError):
        raise ImageError("the image is corrupt or truncated") from None


def _read(path: Path, max_bytes: int) -> bytes:
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise ImageError(
                f"the file is too large: {size / 2**20:.1f} MB (limit {max_bytes / 2**20:.0f} MB)"
            )
        return path.read_bytes()
    except ImageError:
        raise
    except OSError as error:
        raise ImageError(
            f"cannot read the file ({error.strerror or error.__class__.__name__})"
        ) from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """Normalise every mode to 8-bit RGB, reduced if big (`_reduced`): 16-bit and float scaled,
    transparency onto white."""
    if image.mode.startswith("I;16"):
        image = image.convert("I")
    elif image.mode == "1":
        image = image.convert("L")
    elif image.mode in ("P", "PA"):
        image = image.convert(
            "RGBA" if image.mode == "PA" or "transparency" in image.info else "RGB"
        )
    image = _reduced(image)
    if image.mode in ("I", "F"):
        image = _scaled(np.asarray(image, dtype=np.float32))
    if image.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB") if image.mode != "RGB" else image


def _reduced(image: Image.Image) -> Image.Image:
    """The picture box-reduced by a whole factor to a shorter side of REDUCED_SIDE to twice it,
    its aspect kept; one under twice REDUCED_SIDE or in another mode as it is."""
    factor = min(image.size) // REDUCED_SIDE
    return image.reduce(factor) if factor > 1 and image.mode in REDUCIBLE else image


def _scaled(values: np.ndarray) -> Image.Image:
    """16-bit or float samples stretched over 0..255 as grey; NaN and infinities at the ends."""
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
    scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return Image.fromarray(scaled.astype(np.uint8), "L")
