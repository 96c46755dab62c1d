"""Network definitions: the ImageNet weights really load into our Lite0 and see cats; shapes and the pixel adapter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from training.nets import DigitNet, DigitNetConfig, EfficientNetLite0, NormalizeImage, imagenet_state_dict
from training.photos import PhotoSet, decode_photo, resize_center_crop
from training.tasks import TASKS

IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
IMAGENET_DOGS = range(151, 269)  # the dog breeds, Chihuahua .. Mexican hairless
# On the first 20 validation photos of each class the ImageNet model gets 19 right (one cat is called a
# Norwich terrier, one dog a tabby). 17 leaves room for numeric drift across torch versions. Measured: no
# normalisation, or dropping the residual connections, scores 0; subtle slips (BatchNorm eps 1e-5, BGR
# input, ReLU for ReLU6) still score 17 to 20, so this test catches gross mismatches, not every detail.
MIN_CORRECT_OF_20 = 17


@pytest.fixture(scope="module")
def imagenet_lite0() -> nn.Module:
    """The published ImageNet classifier in our module definition, fed raw uint8 NHWC pixels like the server."""
    net = EfficientNetLite0()
    net.load_state_dict(imagenet_state_dict(), strict=True)
    return nn.Sequential(NormalizeImage(127.0, 128.0), net).eval()


def _imagenet_top1(model: nn.Module, photo_set: PhotoSet, prefix: str, count: int) -> list[int]:
    photos = [photo for photo in photo_set.splits["val"] if photo.name.startswith(prefix)][:count]
    assert len(photos) == count
    pixels = np.stack([np.asarray(resize_center_crop(decode_photo(photo.data), 224)) for photo in photos])
    with torch.no_grad():
        logits = model(torch.from_numpy(pixels))  # [20, 224, 224, 3] uint8 -> [20, 1000]
    assert logits.shape == (count, 1000)
    return logits.argmax(1).tolist()


def test_imagenet_weights_cover_every_parameter() -> None:
    """Every published tensor must map onto one of ours and vice versa, or fine-tuning starts half-random."""
    net = EfficientNetLite0()
    result = net.load_state_dict(imagenet_state_dict(), strict=True)
    assert result.missing_keys == []
    assert result.unexpected_keys == []


def test_imagenet_lite0_recognises_cats(imagenet_lite0: nn.Module, photo_set: PhotoSet) -> None:
    """Strict loading only proves names and shapes; real cat photos landing on ImageNet cat classes shows the
    wiring (block order, skip connections, activations) and the input scaling are what the weights expect."""
    top1 = _imagenet_top1(imagenet_lite0, photo_set, "val/cat/", 20)
    assert sum(label in IMAGENET_CATS for label in top1) >= MIN_CORRECT_OF_20, top1


def test_imagenet_lite0_recognises_dogs(imagenet_lite0: nn.Module, photo_set: PhotoSet) -> None:
    """The counterpart: a model that called everything a cat would pass the cat test alone."""
    top1 = _imagenet_top1(imagenet_lite0, photo_set, "val/dog/", 20)
    assert sum(label in IMAGENET_DOGS for label in top1) >= MIN_CORRECT_OF_20, top1


def test_catdog_task_scales_pixels_as_the_weights_expect() -> None:
    """Fine-tuning and serving must feed the backbone the (x - 127) / 128 scaling checked above."""
    assert TASKS["catdog"].normalize == (127.0, 128.0)


def test_lite0_replace_classifier() -> None:
    """Fine-tuning swaps the 1000-way head for a 2-way one named ``fc`` (the loop gives ``fc`` its own rate)."""
    net = EfficientNetLite0()
    net.replace_classifier(2)
    assert isinstance(net.fc, nn.Linear)
    assert (net.fc.in_features, net.fc.out_features) == (1280, 2)
    with torch.no_grad():
        assert net.eval()(torch.zeros(3, 3, 224, 224)).shape == (3, 2)


@pytest.mark.parametrize("batch", [1, 5])
def test_digit_net_output_shape(batch: int) -> None:
    """DigitNet maps [N, 1, 28, 28] to [N, 10] logits for any batch size, including 1."""
    net = DigitNet(DigitNetConfig()).eval()
    with torch.no_grad():
        logits = net(torch.randn(batch, 1, 28, 28))
    assert logits.shape == (batch, 10)
    assert logits.dtype == torch.float32


def test_digit_net_takes_raw_pixels_behind_normalize() -> None:
    """As served: uint8 [N, 28, 28, 1] pixels through NormalizeImage into DigitNet."""
    model = nn.Sequential(NormalizeImage(33.3, 78.6), DigitNet(DigitNetConfig(num_classes=10))).eval()
    with torch.no_grad():
        assert model(torch.zeros(4, 28, 28, 1, dtype=torch.uint8)).shape == (4, 10)


def test_normalize_image_maps_uint8_nhwc_to_float_nchw() -> None:
    """The exported graph takes uint8 NHWC; the nets want normalised float NCHW. Values and layout both matter."""
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, size=(2, 5, 7, 3), dtype=np.uint8))
    out = NormalizeImage(127.0, 128.0)(pixels)
    assert out.dtype == torch.float32
    assert out.shape == (2, 3, 5, 7)
    expected = (pixels.numpy().astype(np.float32).transpose(0, 3, 1, 2) - 127.0) / 128.0
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-6)
    assert out[1, 2, 4, 6].item() == pytest.approx((int(pixels[1, 4, 6, 2]) - 127.0) / 128.0)


def test_normalize_image_extremes() -> None:
    """0 and 255 must not wrap around (uint8 arithmetic would): they map to the ends of the float range."""
    pixels = torch.tensor([[[[0, 255, 127]]]], dtype=torch.uint8)  # [1, 1, 1, 3]
    out = NormalizeImage(127.0, 128.0)(pixels)
    assert out.flatten().tolist() == pytest.approx([-127 / 128, 1.0, 0.0])
