"""open_image: every odd or hostile file becomes RGB or a clear ImageError."""

import io
import struct
import subprocess
import sys
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from model.images import DECODE_SIDE, DECODERS, REDUCED_SIDE, ImageError, open_image


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny, valid-looking PNG whose header claims width x height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("fmt", DECODERS)  # every decoder an untrusted file may reach
def test_common_formats_open_as_rgb(fmt):
    image = open_image(encoded(Image.new("RGB", (64, 48), (200, 30, 30)), fmt))
    assert image.mode == "RGB" and image.size == (64, 48)
    r, g, b = image.getpixel((32, 24))
    assert r > 150 and g < 90 and b < 90


def test_not_an_image():
    with pytest.raises(ImageError, match="not an image"):
        open_image(b"%PDF-1.4 this is a document, not a picture")


def test_empty_file():
    with pytest.raises(ImageError, match="empty"):
        open_image(b"")


def test_truncated_jpeg():
    data = encoded(
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)),
        "JPEG",
    )
    with pytest.raises(ImageError, match="corrupt or truncated"):
        open_image(data[: len(data) // 2])


def test_corrupt_png_body():
    data = bytearray(encoded(Image.new("RGB", (64, 64), (10, 200, 10)), "PNG"))
    data[60:80] = b"\xff" * 20
    with pytest.raises(ImageError, match="corrupt or truncated"):
        open_image(bytes(data))


def test_decompression_bomb_is_refused_from_its_header():
    with pytest.raises(ImageError, match="too large"):
        open_image(png_claiming(60_000, 60_000))  # 3.6 gigapixels in a 100-byte file


def test_pixel_limit_is_configurable():
    data = encoded(Image.new("RGB", (300, 300)), "PNG")
    assert open_image(data, max_pixels=90_000).size == (300, 300)
    with pytest.raises(ImageError, match="too large"):
        open_image(data, max_pixels=89_999)


def test_byte_limit():
    with pytest.raises(ImageError, match="too large"):
        open_image(encoded(Image.new("RGB", (64, 64)), "PNG"), max_bytes=10)


def test_cmyk_jpeg():
    image = open_image(
        encoded(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG")
    )  # pure red in CMYK
    assert image.mode == "RGB"
    r, g, b = image.getpixel((16, 16))
    assert r > 200 and g < 60 and b < 60


def test_sixteen_bit_png_is_scaled_not_clipped():
    values = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    image = open_image(encoded(Image.fromarray(values), "PNG"))
    assert image.mode == "RGB"
    assert image.getpixel((0, 0))[0] < 10 and image.getpixel((63, 63))[0] > 245


def test_palette_with_transparency_goes_onto_white():
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.info["transparency"] = 0
    image = open_image(encoded(palette, "PNG", transparency=0))
    assert image.getpixel((8, 8)) == (255, 255, 255)


def test_alpha_channel_goes_onto_white():
    rgba = Image.new("RGBA", (16, 16), (0, 0, 255, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    image = open_image(encoded(rgba, "PNG"))
    assert image.getpixel((8, 8)) == (255, 255, 255) and image.getpixel((0, 0)) == (0, 0, 255)


def test_exif_orientation_is_applied():
    wide = Image.new("RGB", (80, 40), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image = open_image(encoded(wide, "JPEG", exif=exif.tobytes()))
    assert image.size == (40, 80)


def test_an_iphone_heic_is_turned_once():
    """An iPhone's HEIC says how to turn it; libheif turns it on opening and clears the EXIF
    orientation, so that exif_transpose does not turn it a second time."""
    wide = Image.new("RGB", (80, 40), (0, 0, 0))
    wide.paste((255, 0, 0), (0, 0, 40, 40))  # red on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image = open_image(encoded(wide, "HEIF", exif=exif.tobytes(), quality=95))
    assert image.size == (40, 80)
    top, bottom = image.getpixel((20, 10)), image.getpixel((20, 70))
    assert top[0] > 200 > bottom[0]  # turned clockwise: the left half on top


def test_model_images_reads_heic_by_itself(tmp_path):
    """In a process that imports nothing else (the bot's worker, a Redis worker), not only where
    the emulator has registered the HEIF opener too."""
    path = tmp_path / "IMG_0001.HEIC"
    path.write_bytes(encoded(Image.new("RGB", (64, 48), (200, 30, 30)), "HEIF"))
    code = f"from model.images import open_image; print(open_image({str(path)!r}).size)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "(64, 48)"


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_a_heic_or_avif_bomb_is_refused_from_its_header(fmt):
    data = encoded(Image.new("RGB", (400, 300)), fmt)
    assert open_image(data, max_pixels=120_000).size == (400, 300)
    with pytest.raises(ImageError, match="too large: 400x300 pixels"):
        open_image(data, max_pixels=119_999)


def test_truncated_heic():
    noise = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    data = encoded(Image.fromarray(noise), "HEIF")
    with pytest.raises(ImageError, match="corrupt or truncated"):
        open_image(data[: len(data) // 2])


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (20, 20), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    image = open_image(data)
    r, g, b = image.getpixel((10, 10))
    assert r > 200 and b < 50


def test_big_jpeg_is_decoded_at_reduced_scale_but_keeps_its_content():
    big = Image.new("RGB", (2400, 1800), (30, 30, 200))
    image = open_image(encoded(big, "JPEG", quality=80))
    assert DECODE_SIDE <= min(image.size) < 1800 // 2 and image.size[0] / image.size[
        1
    ] == pytest.approx(4 / 3, rel=0.02)
    assert image.getpixel((10, 10))[2] > 150


def test_a_camera_jpeg_with_several_pictures_opens_as_a_jpeg_does():
    """Pillow opens a JPEG that carries more pictures (MPO: an Android Ultra HDR photo's gain map,
    a portrait's depth map, a stereo pair) as MPO, not JPEG: it is still decoded at a reduced
    scale (90 against 27 ms for 12 megapixels), and its first picture is the one captioned."""
    photo = Image.new("RGB", (2400, 1800), (30, 30, 200))
    gain_map = Image.new("RGB", (600, 450), (250, 250, 250))
    data = encoded(photo, "MPO", save_all=True, append_images=[gain_map], quality=80)
    assert Image.open(io.BytesIO(data)).format == "MPO"
    image = open_image(data)
    assert DECODE_SIDE <= min(image.size) < 1800 // 2
    r, g, b = image.getpixel((10, 10))
    assert b > 150 and r < 80


# Formats Pillow reads and writes, none of which a person sends as a photo.
OTHER_FORMATS = ["PCX", "TGA", "SGI", "PPM", "QOI", "DDS", "ICNS", "JPEG2000", "EPS"]


@pytest.mark.parametrize("fmt", OTHER_FORMATS)
def test_formats_not_offered_never_reach_their_decoders(fmt):
    """Only the formats the bot names are decoded: Pillow's other decoders (and Ghostscript,
    which it runs for EPS) are never handed a stranger's file."""
    picture = Image.new("RGB", (64, 48), (200, 30, 30))
    data = encoded(picture, fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # Pillow itself would take it
    with pytest.raises(ImageError, match="not an image I can read"):
        open_image(data)


LOSSLESS = {"WEBP": {"lossless": True}}


def halves(size: tuple[int, int], left, right, mode: str = "RGB") -> Image.Image:
    """A picture whose left half is one colour and right half another."""
    picture = Image.new(mode, size, left)
    picture.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return picture


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "I;16", "F"])
def test_a_big_picture_in_any_format_is_reduced_as_soon_as_it_is_decoded(mode):
    """A small file can hold a big picture (a 176 KB PNG of 39 megapixels cost 743 MB when it
    was converted at full size): the picture is box-reduced, in the mode it decoded to, to a
    shorter side of REDUCED_SIDE..2x, its aspect and its content kept."""
    size = (3 * REDUCED_SIDE + 100, 2 * REDUCED_SIDE + 50)  # reduced by 2
    if mode in ("I;16", "F"):
        dark, light = (1000, 60000) if mode == "I;16" else (-3.5, 7.25)
        picture = halves(size, dark, light, mode)
    else:
        picture = halves(size, (200, 30, 30), (30, 30, 200))
        if mode == "RGBA":  # the right half half-transparent: onto white, it turns pale
            picture.putalpha(halves(size, 255, 128, "L"))
        elif mode == "P":
            picture = picture.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    image = open_image(encoded(picture, "TIFF" if mode == "F" else "PNG"))
    assert image.mode == "RGB" and image.size == (size[0] // 2, size[1] // 2)
    left, right = image.getpixel((10, 10)), image.getpixel((image.width - 10, 10))
    if mode in ("I;16", "F"):
        assert left[0] < 5 and right[0] > 250
    elif mode == "RGBA":
        assert left == (200, 30, 30) and right[2] > 200 and 130 < right[0] < 150
    else:
        assert left == (200, 30, 30) and right == (30, 30, 200)


def test_a_picture_under_twice_the_reduced_side_is_not_touched():
    size = (2 * REDUCED_SIDE + 300, 2 * REDUCED_SIDE - 1)
    assert open_image(encoded(Image.new("RGB", size, (9, 9, 9)), "PNG")).size == size


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "WEBP"])
def test_a_big_picture_is_turned_once_and_reduced(fmt):
    """The orientation is read from the file before its picture is reduced: a reduced copy keeps
    no TIFF tags."""
    wide = halves((4 * REDUCED_SIDE, 2 * REDUCED_SIDE), (0, 0, 0), (255, 255, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the left (black) half goes to the top
    image = open_image(encoded(wide, fmt, exif=exif.tobytes(), **LOSSLESS.get(fmt, {})))
    top, bottom = image.getpixel((10, 10)), image.getpixel((10, image.height - 10))
    assert image.size == (REDUCED_SIDE, 2 * REDUCED_SIDE)
    assert top == (0, 0, 0) and bottom == (255, 255, 255)


def test_float_samples_that_are_not_numbers_go_to_the_ends():
    values = np.array([[np.nan, 0.0, 1.0], [2.0, np.inf, -np.inf]], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "invalid value encountered in cast"
        image = open_image(encoded(Image.fromarray(values), "TIFF"))
    row = [image.getpixel((x, 0))[0] for x in range(3)] + [
        image.getpixel((x, 1))[0] for x in range(3)
    ]
    assert row == [0, 0, 127, 255, 255, 0]


def test_missing_path():
    with pytest.raises(ImageError, match="cannot read"):
        open_image("/nonexistent/picture.png")


def test_a_bomb_below_pillows_own_limit_is_refused_by_ours():
    """49 MP: over MAX_IMAGE_PIXELS (40 MP) but under Pillow's ~179 MP refusal, so only the
    project's header check stands between it and a decode (which would call it corrupt)."""
    with pytest.raises(ImageError, match="too large"):
        open_image(png_claiming(7000, 7000))
    with pytest.raises(ImageError, match="corrupt or truncated"):  # the same junk, when allowed
        open_image(png_claiming(7000, 7000), max_pixels=50_000_000)


def test_every_file_the_bot_takes_as_an_image_opens():
    """The bot's list of image files (bot/photos.py) and what open_image reads agree."""
    from bot.photos import IMAGE_EXTENSIONS, SUPPORTED_FORMATS
    from model.images import FORMATS

    assert SUPPORTED_FORMATS == FORMATS
    writers = Image.registered_extensions()
    for extension in sorted(IMAGE_EXTENSIONS):
        data = encoded(Image.new("RGB", (32, 24), (10, 20, 200)), writers[extension])
        assert open_image(data).size == (32, 24), extension
