"""Command-line PATH arguments to the list of images to classify: files, folders, globs and standard input."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["IMAGE_EXTENSIONS", "STDIN", "Failure", "ImageInput", "expand_arguments", "group_inputs", "read_input"]

STDIN = "-"
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
_GLOB_CHARACTERS = frozenset("*?[")


@dataclass(frozen=True)
class Failure:
    """Why one input got no labels: a gRPC status code name (NOT_FOUND for a missing file too) and a message."""

    code: str
    message: str


@dataclass(frozen=True)
class ImageInput:
    """One image to classify, named as the output will name it."""

    name: str
    path: Path | None = None  # None: standard input
    failure: Failure | None = None  # set when the argument itself was unusable; nothing is sent for it


def _is_image_file(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _folder_images(folder: str) -> list[ImageInput]:
    """Image files below ``folder``, by extension, sorted; hidden files and folders are skipped."""
    found = []
    for parent, folders, files in os.walk(folder):
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        for name in sorted(files):
            if _is_image_file(name):
                path = os.path.join(parent, name)
                found.append(ImageInput(path, Path(path)))
    return found


def _expand_one(argument: str) -> list[ImageInput]:
    if os.path.isdir(argument):
        images = _folder_images(argument)
        extensions = ", ".join(sorted(extension[1:] for extension in IMAGE_EXTENSIONS))
        return images or [ImageInput(argument, failure=Failure("NOT_FOUND", f"no image files ({extensions}) here"))]
    if os.path.lexists(argument):  # a file, named explicitly: sent whatever its extension, the server judges it
        return [ImageInput(argument, Path(argument))]
    return [ImageInput(argument, failure=Failure("NOT_FOUND", "no such file or folder"))]


def expand_arguments(arguments: Sequence[str]) -> list[ImageInput]:
    """The images the arguments name, in argument order.

    ``-`` is standard input; a folder gives its image files, recursively, by extension; an argument that
    does not exist but holds ``*``, ``?`` or ``[`` is a glob (``**`` spans folders) whose matches are taken
    as if a shell had expanded it. A missing path, an empty folder or a glob without matches gives one input
    with a ``failure``, so it is reported in its place.
    """
    expanded: list[ImageInput] = []
    for argument in arguments:
        if argument == STDIN:
            expanded.append(ImageInput(STDIN))
        elif not os.path.lexists(argument) and _GLOB_CHARACTERS.intersection(argument):
            matches = sorted(glob.glob(argument, recursive=True))
            if not matches:
                expanded.append(ImageInput(argument, failure=Failure("NOT_FOUND", "no file matches this pattern")))
            for match in matches:
                expanded.extend(_expand_one(match))
        else:
            expanded.extend(_expand_one(argument))
    return expanded


def _size(image: ImageInput) -> int:
    if image.path is None:
        return 0
    try:
        return image.path.stat().st_size
    except OSError:
        return 0  # reading it will fail and say why


def group_inputs(
    inputs: Sequence[ImageInput], max_images: int, max_bytes: int
) -> Iterator[list[tuple[int, ImageInput]]]:
    """Consecutive sendable inputs, with their positions, in groups of at most ``max_images`` and about ``max_bytes``.

    A file larger than ``max_bytes`` goes alone; inputs with a ``failure`` are left out.
    """
    group: list[tuple[int, ImageInput]] = []
    group_bytes = 0
    for index, image in enumerate(inputs):
        if image.failure is not None:
            continue
        size = _size(image)
        if group and (len(group) == max_images or group_bytes + size > max_bytes):
            yield group
            group, group_bytes = [], 0
        group.append((index, image))
        group_bytes += size
    if group:
        yield group


def read_input(image: ImageInput, stdin: bytes) -> bytes | Failure:
    """The file's bytes (``stdin`` for standard input), or why they cannot be read."""
    if image.path is None:
        return stdin
    try:
        return image.path.read_bytes()
    except FileNotFoundError:
        return Failure("NOT_FOUND", "no such file or folder")
    except PermissionError:
        return Failure("PERMISSION_DENIED", "cannot read it: permission denied")
    except OSError as exc:
        return Failure("UNKNOWN", f"cannot read it: {exc.strerror or exc}")
