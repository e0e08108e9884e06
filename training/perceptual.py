"""Perceptual distance without downloads: L1 between feature maps of a frozen convolutional network.

By default the network is a fixed random-weight conv stack generated from a seed (random deep features still
track perceptual similarity far better than pixels). With a local VGG16 ``features`` state dict
(torchvision key layout) it uses VGG16 instead. Images are ``[N, 3, H, W]`` in [-1, 1].
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512)
VGG16_TAPS = (3, 8, 15, 22)  # relu1_2, relu2_2, relu3_3, relu4_3
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _vgg_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = 3
    for item in VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(channels, item, 3, padding=1), nn.ReLU()]
            channels = item
    return nn.Sequential(*layers)


def _random_features(seed: int) -> tuple[nn.Sequential, tuple[int, ...]]:
    generator = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    channels, taps = 3, []
    for width, stride in ((48, 1), (48, 2), (96, 1), (96, 2), (192, 1)):
        conv = nn.Conv2d(channels, width, 3, stride=stride, padding=1)
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * (2.0 / (9 * channels)) ** 0.5)
            conv.bias.zero_()
        layers += [conv, nn.ReLU()]
        taps.append(len(layers) - 1)
        channels = width
    return nn.Sequential(*layers), tuple(taps)


class PerceptualLoss(nn.Module):
    def __init__(self, vgg_weights: str | Path | None = None, seed: int = 1234):
        super().__init__()
        if vgg_weights:
            self.features = _vgg_features()
            state = torch.load(vgg_weights, map_location="cpu", weights_only=True)
            state = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier")}
            self.features.load_state_dict(state)
            self.taps = VGG16_TAPS
            self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        else:
            self.features, self.taps = _random_features(seed)
            self.register_buffer("mean", torch.full((1, 3, 1, 1), 0.5))
            self.register_buffer("std", torch.full((1, 3, 1, 1), 0.5))
        self.requires_grad_(False)
        self.eval()

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = ((x + 1) / 2 - self.mean) / self.std
        out = []
        for index, layer in enumerate(self.features):
            h = layer(h)
            if index in self.taps:
                out.append(h)
            if index >= self.taps[-1]:
                break
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean over layers of ``mean |phi_l(x) - phi_l(y)|`` (features unit-normalised per position)."""
        total = x.new_zeros(())
        for fx, fy in zip(self._taps(x), self._taps(y), strict=True):
            total = total + (F.normalize(fx, dim=1) - F.normalize(fy, dim=1)).abs().mean()
        return total / len(self.taps)
