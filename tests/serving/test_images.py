"""Client images to model inputs: every accepted format decodes right, every bad input is a clear InvalidArgument."""

from __future__ import annotations

import io
import random
import re
import struct
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from serving.errors import InvalidArgument
from serving.images import ImageLimits, InputSpec, ResizeMode, decode_image, raw_image
from training.mnist import MnistSplit
from training.photos import decode_photo, resize_center_crop

DIGITS = InputSpec(height=28, width=28, channels=1, resize=ResizeMode.STRETCH)
CATDOG = InputSpec(height=224, width=224, channels=3, resize=ResizeMode.CENTER_CROP)
FORMATS = ["PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF"]
NAMES = {"WEBP": "WebP"}  # how messages spell Pillow's format names
SEND = "send PNG, JPEG, BMP, GIF, WebP or TIFF bytes"
PIXEL_LIMIT = "over the limit of 50,000,000 pixels (width x height)"
# Mean absolute difference from the uncompressed reference allowed per format: lossless ones must match exactly;
# GIF quantises RGB to 256 colours (grayscale fits its palette exactly).
TOLERANCE = {"PNG": 0.0, "BMP": 0.0, "TIFF": 0.0, "JPEG": 4.0, "WEBP": 4.0, "GIF": 6.0}
RED, BLUE, GREEN, YELLOW = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 0)


def _encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _scene(width: int, height: int) -> Image.Image:
    """A deterministic RGB picture with smooth gradients and hard edges, so resizing and compression both show."""
    y, x = np.mgrid[0:height, 0:width]
    checks = ((x // 16 + y // 16) % 2) * 200 + 20
    rgb = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), checks], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


def _noise(width: int, height: int) -> Image.Image:
    """Random RGB pixels: they barely compress, so a file cut in half loses half of its pixel data."""
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _reference(image: Image.Image, spec: InputSpec) -> np.ndarray:
    """What decode_image must produce from an uncompressed image, done the plain way (training's for the crop)."""
    if spec.resize is ResizeMode.CENTER_CROP:
        assert spec.height == spec.width
        converted = resize_center_crop(image.convert("RGB"), spec.height)
    else:
        mode = "L" if spec.channels == 1 else "RGB"
        converted = image.convert(mode).resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    return np.asarray(converted).reshape(spec.shape)


def _mean_abs_diff(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(got.astype(np.int16) - expected.astype(np.int16)).mean())


def _blank_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG written row by row: 20000x20000 is about 50 KB and never a 400 MB canvas."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    compressor = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)  # filter type 0, then the packed bits
    pixels = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, grayscale, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def _gif_claiming(width: int, height: int) -> bytes:
    """A 1x1 GIF whose logical screen claims ``width`` x ``height``."""
    data = bytearray(_encode(Image.new("L", (1, 1)), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG whose frame header claims ``width`` x ``height``."""
    data = bytearray(_encode(_scene(32, 32), "JPEG"))
    frame = data.find(b"\xff\xc0")  # SOF0: marker, length(2), precision(1), height(2), width(2)
    data[frame + 5 : frame + 9] = struct.pack(">HH", height, width)
    return bytes(data)


# --- every format, both specs ---


@pytest.mark.parametrize("spec", [DIGITS, CATDOG], ids=["digits", "catdog"])
@pytest.mark.parametrize("source_mode", ["L", "RGB"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_decodes_to_the_model_input(fmt: str, source_mode: str, spec: InputSpec) -> None:
    """Grayscale and colour files of each format become C-contiguous uint8 [H, W, C], matching a plain resize."""
    source = _scene(320, 240).convert(source_mode)
    got = decode_image(_encode(source, fmt), spec)
    assert got.shape == spec.shape
    assert got.dtype == np.uint8
    assert got.flags.c_contiguous
    tolerance = 0.0 if fmt == "GIF" and source_mode == "L" else TOLERANCE[fmt]
    assert _mean_abs_diff(got, _reference(source, spec)) <= tolerance


@pytest.mark.parametrize("size", [(320, 240), (240, 320), (500, 375), (224, 224), (225, 224), (150, 100), (97, 301)])
def test_center_crop_matches_training_bit_for_bit(size: tuple[int, int]) -> None:
    """The cat/dog model saw training.photos' resize and crop; serving must give it the very same pixels."""
    data = _encode(_scene(*size), "PNG")
    expected = np.asarray(resize_center_crop(decode_photo(data), 224))
    np.testing.assert_array_equal(decode_image(data, CATDOG), expected)


def test_center_crop_to_a_non_square_target_covers_it_then_cuts_the_centre() -> None:
    """A 300x300 image to 200 wide x 100 high: scaled to 200x200 (the smallest cover), rows 50..150 kept."""
    source = _scene(300, 300)
    spec = InputSpec(height=100, width=200, channels=3, resize=ResizeMode.CENTER_CROP)
    expected = source.resize((200, 200), Image.Resampling.BILINEAR).crop((0, 50, 200, 150))
    np.testing.assert_array_equal(decode_image(_encode(source, "PNG"), spec), np.asarray(expected))


def test_stretch_ignores_the_aspect_ratio() -> None:
    """A wide image squeezed into a square, as MNIST-like models want: no crop, every column kept."""
    source = _scene(120, 30).convert("L")
    expected = np.asarray(source.resize((28, 28), Image.Resampling.BILINEAR))[:, :, None]
    np.testing.assert_array_equal(decode_image(_encode(source, "PNG"), DIGITS), expected)


@pytest.mark.parametrize(("spec", "size", "mode"), [(DIGITS, (28, 28), "L"), (CATDOG, (224, 224), "RGB")])
def test_image_already_at_the_target_size_is_not_resized(
    monkeypatch: pytest.MonkeyPatch, spec: InputSpec, size: tuple[int, int], mode: str
) -> None:
    """No resampling at all for an exact fit: the pixels come through unchanged."""
    source = _scene(*size).convert(mode)

    def no_resize(*args: object, **kwargs: object) -> Image.Image:
        raise AssertionError("resize called for an image already at the target size")

    monkeypatch.setattr(Image.Image, "resize", no_resize)
    np.testing.assert_array_equal(decode_image(_encode(source, "PNG"), spec), np.asarray(source).reshape(spec.shape))


# --- orientation, transparency, bit depth ---


def _quadrants() -> np.ndarray:
    """A 40-high, 80-wide picture with a different colour in each quadrant, so every turn and flip shows."""
    picture = np.zeros((40, 80, 3), dtype=np.uint8)
    picture[:20, :40], picture[:20, 40:], picture[20:, :40], picture[20:, 40:] = RED, BLUE, GREEN, YELLOW
    return picture


def _quadrant_colours(picture: np.ndarray) -> np.ndarray:
    """The mean colour of each quadrant, [2, 2, 3]: robust to JPEG's blur at the edges between them."""
    height, width, channels = picture.shape
    return picture.reshape(2, height // 2, 2, width // 2, channels).mean(axis=(1, 3))


# EXIF orientation -> how the stored picture must be turned to be upright (6: 90 degrees clockwise, 8: counter).
UPRIGHT = {
    2: np.fliplr,
    3: lambda picture: np.rot90(picture, 2),
    6: lambda picture: np.rot90(picture, -1),
    8: lambda picture: np.rot90(picture, 1),
}


@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_exif_orientation_is_applied(fmt: str, orientation: int) -> None:
    """Phone photos are stored sideways with an orientation tag; the model must see them upright."""
    stored = _quadrants()
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(Image.fromarray(stored), fmt, exif=exif, quality=95)
    expected = UPRIGHT[orientation](stored)
    spec = InputSpec(height=expected.shape[0], width=expected.shape[1], channels=3, resize=ResizeMode.STRETCH)
    got = decode_image(data, spec)
    # JPEG's chroma subsampling smears colour edges by a few levels; a wrong turn or flip is off by about 255.
    assert np.abs(_quadrant_colours(got) - _quadrant_colours(expected)).max() < 16.0


def test_transparent_pixels_become_white() -> None:
    """RGBA: transparent -> white, opaque kept, half-transparent black -> mid grey (not the hidden colour)."""
    rgba = np.zeros((28, 28, 4), dtype=np.uint8)  # transparent black
    rgba[:, 10:20] = (255, 0, 0, 255)
    rgba[:, 20:] = (0, 0, 0, 128)
    for fmt, params in [("PNG", {}), ("WEBP", {"lossless": True}), ("TIFF", {})]:
        got = decode_image(_encode(Image.fromarray(rgba), fmt, **params), InputSpec(28, 28, 3, ResizeMode.STRETCH))
        assert (got[:, :10] == 255).all(), fmt
        assert (got[:, 10:20] == RED).all(), fmt
        assert (np.abs(got[:, 20:].astype(int) - 127) <= 1).all(), fmt


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_transparent_palette_entry_becomes_white(fmt: str) -> None:
    """A palette image whose index 0 is transparent (typical of GIFs): those pixels are white, the rest kept."""
    palette = Image.new("P", (28, 28), 0)
    palette.putpalette([0, 0, 0, 0, 0, 255])  # 0: black but transparent, 1: blue
    palette.paste(1, (14, 0, 28, 28))
    got = decode_image(_encode(palette, fmt, transparency=0), InputSpec(28, 28, 3, ResizeMode.STRETCH))
    assert (got[:, :14] == 255).all()
    assert (got[:, 14:] == BLUE).all()


def test_transparent_grayscale_becomes_white_for_a_grayscale_model() -> None:
    """LA input to a 1-channel model: transparent -> 255, opaque grey kept."""
    la = np.zeros((28, 28, 2), dtype=np.uint8)
    la[:, 14:] = (60, 255)
    got = decode_image(_encode(Image.fromarray(la, "LA"), "PNG"), DIGITS)
    assert (got[:, :14] == 255).all()
    assert (got[:, 14:] == 60).all()


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_sixteen_bit_grayscale_is_scaled_to_eight_bits(fmt: str, channels: int) -> None:
    """Medical and scientific images are 16-bit: 0..65535 maps to 0..255 (Pillow alone would clip at 255)."""
    wide = np.linspace(0, 65535, 28 * 28).round().astype(np.uint16).reshape(28, 28)
    wide[0, :4] = (0, 128, 129, 65535)
    image = Image.fromarray(wide)
    assert image.mode == "I;16"
    got = decode_image(_encode(image, fmt), InputSpec(28, 28, channels, ResizeMode.STRETCH))
    expected = ((wide.astype(np.uint32) + 128) // 257).astype(np.uint8)
    assert list(got[0, :4, 0]) == [0, 0, 1, 255]
    np.testing.assert_array_equal(got, np.repeat(expected[:, :, None], channels, axis=2))


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG", "TIFF"])
def test_animations_and_multi_page_files_give_their_first_frame(fmt: str) -> None:
    """Animated GIF, WebP and PNG, and multi-page TIFF: the first frame (red), never a later one (blue)."""
    frames = [Image.new("RGB", (28, 28), colour) for colour in (RED, BLUE)]
    lossless = {"lossless": True} if fmt == "WEBP" else {}
    data = _encode(frames[0], fmt, save_all=True, append_images=frames[1:], **lossless)
    assert (decode_image(data, InputSpec(28, 28, 3, ResizeMode.STRETCH)) == RED).all()


def test_cmyk_jpeg_becomes_rgb() -> None:
    """Print-workflow JPEGs are CMYK; the model gets RGB."""
    data = _encode(Image.new("CMYK", (300, 225), (0, 255, 255, 0)), "JPEG")
    assert (decode_image(data, CATDOG) == RED).all()


# --- JPEG draft: the decoder downscales by 2, 4 or 8 where the result stays at least the target size ---


@pytest.fixture
def drafted_sizes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The stored (width, height) each JPEG is decoded at once decode_image has asked for a draft."""
    sizes: list[tuple[int, int]] = []
    draft = JpegImagePlugin.JpegImageFile.draft

    def recording_draft(
        image: JpegImagePlugin.JpegImageFile, mode: str | None, size: tuple[int, int] | None
    ) -> tuple[str, tuple[int, int, float, float]] | None:
        result = draft(image, mode, size)
        sizes.append(image.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", recording_draft)
    return sizes


def test_large_jpeg_is_drafted_and_close_to_a_full_decode(drafted_sizes: list[tuple[int, int]]) -> None:
    """1600x1200 -> decoded at 400x300 (>= 299x224), then resized; pixels stay close to the full-size path."""
    data = _encode(_scene(1600, 1200), "JPEG", quality=90)
    got = decode_image(data, CATDOG)
    assert drafted_sizes == [(400, 300)]
    assert got.shape == (224, 224, 3)
    assert _mean_abs_diff(got, np.asarray(resize_center_crop(decode_photo(data), 224))) < 2.0


@pytest.mark.parametrize(("orientation", "drafted"), [(1, (1200, 400)), (6, (300, 100))])
def test_draft_request_follows_exif_orientation(
    drafted_sizes: list[tuple[int, int]], orientation: int, drafted: tuple[int, int]
) -> None:
    """Stored 1200x400 to 100 wide x 300 high: upright (orientation 1) no draft fits; on its side (6) 1/4 does."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(_scene(1200, 400), "JPEG", exif=exif)
    got = decode_image(data, InputSpec(height=300, width=100, channels=3, resize=ResizeMode.STRETCH))
    assert drafted_sizes == [drafted]
    assert got.shape == (300, 100, 3)


# --- bad input: always InvalidArgument, saying what was wrong ---


def test_empty_bytes() -> None:
    with pytest.raises(InvalidArgument) as caught:
        decode_image(b"", DIGITS)
    assert str(caught.value) == f"empty image: 0 bytes; {SEND}"


def test_too_many_bytes() -> None:
    data = _encode(_noise(40, 40), "PNG")
    with pytest.raises(InvalidArgument) as caught:
        decode_image(data, DIGITS, ImageLimits(max_encoded_bytes=1000))
    assert str(caught.value) == f"image is {len(data):,} bytes, over the limit of 1,000 bytes"


def test_text_file() -> None:
    """What the client sees when it sends a text file: the format list, and how its bytes start."""
    with pytest.raises(InvalidArgument) as caught:
        decode_image(b"photographer: unknown\nlicence: CC-BY\n", DIGITS)
    assert str(caught.value) == f"unrecognised image data (37 bytes starting b'photogra'): {SEND}"


@pytest.mark.parametrize(
    "data",
    [
        bytes(random.Random(0).randrange(1, 256) for _ in range(1000)),
        b"P5\n2 2\n255\n\x00\x01\x02\x03",  # PGM: Pillow reads it, we do not accept it
        _encode(Image.new("RGB", (16, 16)), "ICO"),  # likewise
        b'{"image": "aGVsbG8="}',
    ],
    ids=["garbage", "pgm", "ico", "json"],
)
def test_unrecognised_bytes(data: bytes) -> None:
    """Not one of the accepted formats, even where Pillow could read it: the message lists the accepted ones."""
    with pytest.raises(InvalidArgument) as caught:
        decode_image(data, DIGITS)
    assert str(caught.value) == f"unrecognised image data ({len(data):,} bytes starting {data[:8]!r}): {SEND}"


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_file(fmt: str) -> None:
    """Cut at 60%: the header is intact, the pixel data is not."""
    data = _encode(_noise(200, 150), fmt)
    with pytest.raises(InvalidArgument, match=rf"^truncated or corrupt {NAMES.get(fmt, fmt)}: \S"):
        decode_image(data[: len(data) * 6 // 10], CATDOG)


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_header(fmt: str) -> None:
    """Only the first 20 bytes: the format is known from its signature, the rest is missing."""
    data = _encode(_noise(200, 150), fmt)[:20]
    with pytest.raises(InvalidArgument, match=rf"^truncated or corrupt {NAMES.get(fmt, fmt)}: \S"):
        decode_image(data, CATDOG)


def test_truncated_png_and_jpeg_messages() -> None:
    """Pillow's own reason is passed on after the format."""
    png, jpeg = _encode(_noise(200, 150), "PNG"), _encode(_noise(200, 150), "JPEG")
    with pytest.raises(InvalidArgument) as caught:
        decode_image(png[: len(png) // 2], CATDOG)
    assert str(caught.value) == "truncated or corrupt PNG: image file is truncated"
    with pytest.raises(InvalidArgument, match=r"^truncated or corrupt JPEG: image file is truncated \(\d+ bytes"):
        decode_image(jpeg[: len(jpeg) // 2], CATDOG)


@pytest.mark.parametrize(
    "bomb",
    ["png-20000x20000", "png-10000x10000", "gif-65535x65535", "jpeg-60000x60000"],
)
def test_decompression_bomb_is_rejected_from_its_header(bomb: str) -> None:
    """Small files claiming huge canvases: refused before any pixel is decoded (10000x10000 is in the band where
    Pillow only warns, and a warning is an error here, as pytest runs; it must not escape as one)."""
    kind, size = bomb.split("-")
    width, height = (int(side) for side in size.split("x"))
    data = {"png": _blank_png, "gif": _gif_claiming, "jpeg": _jpeg_claiming}[kind](width, height)
    assert len(data) < 64 * 1024
    with pytest.raises(InvalidArgument) as caught:
        decode_image(data, CATDOG)
    assert str(caught.value) == f"image is {PIXEL_LIMIT}"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_in_pillows_warning_band_is_rejected_when_the_warning_is_ignored() -> None:
    """Where Pillow's warning is only a warning (production filters), our own pixel check still refuses."""
    with pytest.raises(InvalidArgument) as caught:
        decode_image(_blank_png(10000, 10000), CATDOG)
    assert str(caught.value) == f"image is 10000x10000 = 100,000,000 pixels, {PIXEL_LIMIT}"


def test_image_over_our_pixel_limit_but_under_pillows() -> None:
    """8000x8000 passes Pillow's checks silently; ours names the size and the limit."""
    with pytest.raises(InvalidArgument) as caught:
        decode_image(_blank_png(8000, 8000), CATDOG)
    assert str(caught.value) == f"image is 8000x8000 = 64,000,000 pixels, {PIXEL_LIMIT}"


def test_pixel_limit_is_configurable() -> None:
    data = _encode(Image.new("L", (11, 10)), "PNG")
    with pytest.raises(InvalidArgument) as caught:
        decode_image(data, DIGITS, ImageLimits(max_pixels=100))
    assert str(caught.value) == "image is 11x10 = 110 pixels, over the limit of 100 pixels (width x height)"
    assert decode_image(data, DIGITS, ImageLimits(max_pixels=110)).shape == (28, 28, 1)


def test_blank_png_helper_writes_a_valid_png() -> None:
    """The bomb builder makes real PNGs: a small one decodes to black."""
    assert (decode_image(_blank_png(30, 20), DIGITS) == 0).all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_damaged_files_never_escape_as_anything_but_invalid_argument(fmt: str) -> None:
    """Random byte flips and cuts (seeded): Pillow raises many exception types; the client only ever sees ours."""
    original = _encode(_scene(40, 30), fmt)
    rng = random.Random(fmt)
    rejected = 0
    for _ in range(150):
        data = bytearray(original)
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.5:
            data = data[: rng.randrange(1, len(data))]
        try:
            assert decode_image(bytes(data), DIGITS).shape == DIGITS.shape
        except InvalidArgument:
            rejected += 1
    assert rejected > 0


# --- raw tensors ---


def test_raw_image_is_a_read_only_view_of_the_request_bytes() -> None:
    data = bytes(range(256)) * 3 + bytes(16)
    array = raw_image(data, [28, 28, 1], DIGITS)
    assert array.shape == (28, 28, 1)
    assert array.dtype == np.uint8
    assert np.shares_memory(array, np.frombuffer(data, dtype=np.uint8))
    assert not array.flags.writeable
    assert array.tobytes() == data


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ([28, 28], "raw image shape [28, 28] must be [28, 28, 1] (height, width, channels)"),
        ([28, 28, 3], "raw image shape [28, 28, 3] must be [28, 28, 1] (height, width, channels)"),
        ([1, 28, 28, 1], "raw image shape [1, 28, 28, 1] must be [28, 28, 1] (height, width, channels)"),
        ([784], "raw image shape [784] must be [28, 28, 1] (height, width, channels)"),
    ],
)
def test_raw_image_wrong_shape(shape: list[int], message: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        raw_image(bytes(784), shape, DIGITS)
    assert str(caught.value) == message


@pytest.mark.parametrize("size", [783, 785, 0])
def test_raw_image_wrong_byte_count(size: int) -> None:
    with pytest.raises(InvalidArgument) as caught:
        raw_image(bytes(size), [28, 28, 1], DIGITS)
    assert str(caught.value) == f"raw image has {size} bytes, shape [28, 28, 1] needs 784"


# --- configuration mistakes are the operator's, not the client's ---


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: InputSpec(28, 28, 2, ResizeMode.STRETCH), "channels must be 1 (grayscale) or 3 (RGB), got 2"),
        (lambda: InputSpec(0, 28, 1, ResizeMode.STRETCH), "height and width must be >= 1, got 0x28"),
        (lambda: ImageLimits(max_encoded_bytes=0), "max_encoded_bytes must be >= 1, got 0"),
        (lambda: ImageLimits(max_pixels=0), "max_pixels must be >= 1, got 0"),
        (lambda: ImageLimits(max_pixels=10**9), "max_pixels 1000000000 is over Pillow's Image.MAX_IMAGE_PIXELS"),
    ],
)
def test_bad_configuration_is_a_value_error(build: Callable[[], object], message: str) -> None:
    """An impossible spec or limit is the operator's mistake, found when the model is configured."""
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        build()


# --- the real data ---


def test_real_cat_dog_photos_decode_as_in_training(photo_zip: Path) -> None:
    """Every 20th photo of the real set: (224, 224, 3), bit for bit what training fed the model."""
    with zipfile.ZipFile(photo_zip) as archive:
        names = sorted(name for name in archive.namelist() if name.endswith(".jpg"))[::20]
        assert len(names) > 100
        for name in names:
            data = archive.read(name)
            got = decode_image(data, CATDOG)
            np.testing.assert_array_equal(got, np.asarray(resize_center_crop(decode_photo(data), 224)), err_msg=name)


def test_real_mnist_digits_round_trip(mnist_test_split: MnistSplit) -> None:
    """MNIST test digits as PNG files and as raw tensors both reach the model unchanged."""
    for digit in mnist_test_split.images[:200]:
        expected = digit[:, :, None]
        np.testing.assert_array_equal(decode_image(_encode(Image.fromarray(digit), "PNG"), DIGITS), expected)
        np.testing.assert_array_equal(raw_image(digit.tobytes(), [28, 28, 1], DIGITS), expected)
