"""Training-time augmentation: small affine warps for digits (batched, on the device), crops/flips/colour for photos."""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image, ImageEnhance
from torch.nn import functional as F

__all__ = ["random_affine_digits", "random_photo_view"]


def random_affine_digits(
    images: torch.Tensor,
    max_degrees: float = 10.0,
    max_shift: float = 0.1,
    scale: tuple[float, float] = (0.9, 1.1),
) -> torch.Tensor:
    """Rotate, scale and shift a batch of uint8 ``[N, H, W, 1]`` digits by small random amounts.

    The result stays uint8, so the network trains on exactly the kind of input the server feeds it.
    """
    n = images.shape[0]
    device = images.device
    angle = torch.empty(n, device=device).uniform_(-max_degrees, max_degrees) * (math.pi / 180)
    zoom = torch.empty(n, device=device).uniform_(*scale)
    shift = torch.empty(n, 2, device=device).uniform_(-2 * max_shift, 2 * max_shift)  # grid coords span [-1, 1]
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    x = images.permute(0, 3, 1, 2).float()  # [N, 1, H, W]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return warped.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def random_photo_view(
    image: Image.Image, size: int, scale: tuple[float, float] = (0.5, 1.0), jitter: float = 0.25
) -> np.ndarray:
    """A random-resized crop (area ``scale``, aspect 3/4..4/3), a coin-flip mirror and colour jitter.

    Uses Python's ``random``, which the data loader seeds per worker. Returns uint8 ``[size, size, 3]``.
    """
    width, height = image.size
    for _ in range(10):
        area = width * height * random.uniform(*scale)
        aspect = math.exp(random.uniform(math.log(3 / 4), math.log(4 / 3)))
        crop_w, crop_h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if crop_w <= width and crop_h <= height:
            break
    else:
        crop_w = crop_h = min(width, height)
    left, top = random.randint(0, width - crop_w), random.randint(0, height - crop_h)
    view = image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + crop_w, top + crop_h))
    if random.random() < 0.5:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        view = enhancer(view).enhance(random.uniform(1 - jitter, 1 + jitter))
    return np.array(view, dtype=np.uint8)  # a writable copy: torch warns on read-only arrays
