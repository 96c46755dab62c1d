"""Turn a client's image (encoded bytes or a raw uint8 tensor) into the model's uint8 input array.

Models normalise inside their graphs, so this is the server's only preprocessing: decode, turn upright by
the EXIF orientation, convert to grayscale or RGB, resize to the input's dims. Whatever is wrong with a
client's bytes ends as ``InvalidArgument`` saying what was wrong and what is accepted, never a traceback.
"""

from __future__ import annotations

import enum
import io
import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from serving.errors import InvalidArgument

__all__ = [
    "ImageLimits",
    "InputSpec",
    "ResizeMode",
    "decode_image",
    "raw_image",
    "resize_for",
]

_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")  # Pillow's names of the formats we accept
_ACCEPTED = "PNG, JPEG, BMP, GIF, WebP or TIFF"
_FORMAT_NAMES = {"WEBP": "WebP", "MPO": "JPEG"}  # MPO: a multi-picture JPEG (phone cameras), named apart by Pillow
# What Pillow raises for damaged data, depending on the format and where the damage is (UnidentifiedImageError,
# "no format I know", is an OSError); anything else is a bug and must propagate. Its complaints about damaged
# TIFF tags and EXIF are UserWarnings: exceptions where the warning filters say "error", as under pytest.
_DAMAGED = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error, UserWarning)
# Pillow warns between MAX_IMAGE_PIXELS and twice that, and raises above; a warning arrives as an exception
# only where the filters say "error" (as under pytest), but then it must be mapped like the error.
_TOO_LARGE = (Image.DecompressionBombError, Image.DecompressionBombWarning)
# How the accepted formats begin, only to name the format of a header Pillow rejects (WebP: "RIFF", size, "WEBP").
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"BM", "BMP"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),  # BigTIFF
    (b"MM\x00+", "TIFF"),
)
_MODES = {1: "L", 3: "RGB"}
_SWAPS_AXES = frozenset({5, 6, 7, 8})  # EXIF orientations that turn the picture by 90 degrees
_WIDE_GRAY_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})  # 16-bit grayscale (and 32-bit "I")
_WHITE = (255, 255, 255, 255)


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on one client image, checked before the expensive work they guard against."""

    max_encoded_bytes: int = 16 * 1024 * 1024  # per image, checked before Pillow sees the bytes
    # Decoded width * height, checked from the header before any pixel is decoded: a decompression-bomb guard.
    # At most Pillow's Image.MAX_IMAGE_PIXELS (about 89.5 million), above which Pillow warns and then refuses.
    max_pixels: int = 50_000_000

    def __post_init__(self) -> None:
        if self.max_encoded_bytes < 1:
            raise ValueError(f"max_encoded_bytes must be >= 1, got {self.max_encoded_bytes}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {self.max_pixels}")
        if Image.MAX_IMAGE_PIXELS is not None and self.max_pixels > Image.MAX_IMAGE_PIXELS:
            raise ValueError(
                f"max_pixels {self.max_pixels} is over Pillow's Image.MAX_IMAGE_PIXELS {Image.MAX_IMAGE_PIXELS}"
            )


class ResizeMode(enum.Enum):
    """How an image of another size or aspect ratio becomes the model's height x width."""

    # Resize the shorter side to the target (keeping the aspect ratio), cut the centre: what the cat/dog model
    # was trained and evaluated with (training.photos.resize_center_crop).
    CENTER_CROP = "center_crop"
    # Plain resize to (height, width), ignoring the aspect ratio: what MNIST-like inputs want.
    STRETCH = "stretch"


@dataclass(frozen=True)
class InputSpec:
    """The model input an image must become: uint8 ``[height, width, channels]``, and how to get there."""

    height: int
    width: int
    channels: int  # 1 -> grayscale ("L"), 3 -> RGB
    resize: ResizeMode

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise ValueError(f"height and width must be >= 1, got {self.height}x{self.width}")
        if self.channels not in _MODES:
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {self.channels}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(height, width, channels)``: one image's array shape."""
        return self.height, self.width, self.channels


def resize_for(channels: int) -> ResizeMode:
    """How a model's input is filled: small grayscale inputs (digits) are whole images squeezed to size;
    photos keep their aspect and are cropped, as the cat/dog model was trained."""
    return ResizeMode.STRETCH if channels == 1 else ResizeMode.CENTER_CROP


def decode_image(data: bytes, spec: InputSpec, limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """Decode a client's encoded image into the model's input, rejecting bombs before decoding any pixel.

    Args:
        data: PNG, JPEG, BMP, GIF (first frame), WebP or TIFF (first page) bytes.
        spec: the model input to produce.
        limits: bounds on the encoded size and the decoded pixel count.

    Returns:
        A C-contiguous, read-only uint8 array of shape ``spec.shape``.

    Raises:
        InvalidArgument: the bytes are empty, too many, not an accepted format, damaged, or too many pixels.
    """
    if not data:
        raise InvalidArgument(f"empty image: 0 bytes; send {_ACCEPTED} bytes")
    if len(data) > limits.max_encoded_bytes:
        raise InvalidArgument(f"image is {len(data):,} bytes, over the limit of {limits.max_encoded_bytes:,} bytes")
    try:
        image = Image.open(io.BytesIO(data), formats=_FORMATS)  # reads the header only
    except _TOO_LARGE:
        raise _too_many_pixels(limits) from None
    except _DAMAGED as exc:  # UnidentifiedImageError included
        raise _unreadable_header(data, exc) from None
    with image:
        width, height = image.size
        if width * height > limits.max_pixels:
            raise _too_many_pixels(limits, f"{width}x{height} = {width * height:,} pixels")
        try:
            return _to_array(image, spec)
        except _TOO_LARGE:  # a GIF frame or TIFF tile may claim more than the header did
            raise _too_many_pixels(limits) from None
        except _DAMAGED as exc:
            name = _FORMAT_NAMES.get(image.format or "", image.format)
            raise InvalidArgument(f"truncated or corrupt {name}: {_reason(exc)}") from None


def raw_image(data: bytes, shape: Sequence[int], spec: InputSpec) -> np.ndarray:
    """Take a client's raw uint8 HWC tensor as it is: no copy, the model input is exactly those bytes.

    Args:
        data: the tensor's bytes, row-major.
        shape: the shape the client declared.
        spec: the model input; ``shape`` must equal ``spec.shape``.

    Returns:
        A read-only uint8 view of ``data`` (``np.frombuffer``) of shape ``spec.shape``.

    Raises:
        InvalidArgument: the shape is not ``spec.shape`` or the byte count does not match it.
    """
    declared = [int(dim) for dim in shape]
    if declared != list(spec.shape):
        raise InvalidArgument(f"raw image shape {declared} must be {list(spec.shape)} (height, width, channels)")
    needed = math.prod(spec.shape)
    if len(data) != needed:
        raise InvalidArgument(f"raw image has {len(data):,} bytes, shape {declared} needs {needed:,}")
    return np.frombuffer(data, dtype=np.uint8).reshape(spec.shape)  # read-only: bytes are immutable


def _to_array(image: Image.Image, spec: InputSpec) -> np.ndarray:
    """Decode (JPEG: downscaled by 2, 4 or 8 in the decoder where that stays >= the target), orient, convert, resize."""
    mode = _MODES[spec.channels]
    # The draft request is in stored orientation: an image stored on its side gets width and height swapped.
    stored_width, stored_height = image.size
    upright = image.getexif().get(ExifTags.Base.Orientation, 1) not in _SWAPS_AXES
    if upright:
        image.draft(mode, _resized_size((stored_width, stored_height), spec))  # a no-op for all but JPEG
    else:
        width, height = _resized_size((stored_height, stored_width), spec)
        image.draft(mode, (height, width))
    ImageOps.exif_transpose(image, in_place=True)  # decodes the pixels
    image = _resize(_convert(image, mode), spec)
    return np.asarray(image).reshape(spec.shape)  # asarray copies Pillow's buffer once: read-only, C-contiguous


def _convert(image: Image.Image, mode: str) -> Image.Image:
    """Convert to ``mode``: transparency composited onto white, 16-bit grayscale scaled (Pillow would clip)."""
    if image.mode in _WIDE_GRAY_MODES:
        wide = np.clip(np.asarray(image), 0, 65535).astype(np.uint32)
        image = Image.fromarray(((wide + 128) // 257).astype(np.uint8))  # round(value / 257): 65535 -> 255
    elif image.has_transparency_data:
        image = Image.alpha_composite(Image.new("RGBA", image.size, _WHITE), image.convert("RGBA"))
    return image if image.mode == mode else image.convert(mode)


def _resized_size(size: tuple[int, int], spec: InputSpec) -> tuple[int, int]:
    """(width, height) to resize an upright image of ``size`` to, before any centre crop."""
    if spec.resize is ResizeMode.STRETCH:
        return spec.width, spec.height
    # For a square target this is training.photos.resize_center_crop's arithmetic, float for float: the scale
    # that makes the shorter side the target; for other targets, the smallest scale that covers both sides.
    width, height = size
    scale = max(spec.width / width, spec.height / height)
    return max(spec.width, round(width * scale)), max(spec.height, round(height * scale))


def _resize(image: Image.Image, spec: InputSpec) -> Image.Image:
    """Resize as ``spec.resize`` says (not at all if already that size), then cut the centre to the target."""
    size = _resized_size(image.size, spec)
    if image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR)  # as in training: no reducing_gap, bit for bit
    if size != (spec.width, spec.height):
        left, top = (size[0] - spec.width) // 2, (size[1] - spec.height) // 2
        image = image.crop((left, top, left + spec.width, top + spec.height))
    return image


def _unreadable_header(data: bytes, exc: Exception) -> InvalidArgument:
    """The error for bytes Pillow could not open: a damaged header if they start like an accepted format."""
    name = next((name for magic, name in _MAGIC if data.startswith(magic)), None)
    if name is None and data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        name = "WebP"
    if name is None:
        return InvalidArgument(
            f"unrecognised image data ({len(data):,} bytes starting {data[:8]!r}): send {_ACCEPTED} bytes"
        )
    # Pillow's UnidentifiedImageError says only "cannot identify image file <_io.BytesIO object at 0x...>".
    reason = "header cannot be read" if isinstance(exc, UnidentifiedImageError) else _reason(exc)
    return InvalidArgument(f"truncated or corrupt {name}: {reason}")


def _too_many_pixels(limits: ImageLimits, found: str = "") -> InvalidArgument:
    """The error for an image over ``limits.max_pixels``; ``found`` is its size where known."""
    return InvalidArgument(
        f"image is {found + ', ' if found else ''}over the limit of {limits.max_pixels:,} pixels (width x height)"
    )


def _reason(exc: Exception) -> str:
    """Pillow's message for a damaged file, or the exception's name where it has none (EOFError())."""
    return str(exc) or type(exc).__name__
