"""The attribute judge of ``python -m training evaluate``: a small CNN trained to survive a generator's failures.

A classifier trained on sharp photographs only is out of its distribution on soft generated faces, and its
verdicts there say little. This one trains on images degraded the way a generator degrades them (Gaussian blur
of random strength, down/up-sampling, noise, colour jitter, small shifts, mirror images), and
:func:`robustness` reports its accuracy on the sharp test split, on a blurred copy and on the VAE's
reconstructions, so every number it judges comes with the evidence that it can judge it.

``evaluate`` judges with a :class:`JudgePanel`: several such classifiers, trained alike from consecutive seeds, whose
verdict is their mean probability. One classifier's decision boundary depends on its seed, and a faint stroke near
it is read one way or the other by chance: two judges differing only in their seed measured the same VAE's round trip
at 97.1% and 97.9%. The panel's verdict varies less, and every rate it reports comes
with each member's own rate, so the seeds' spread stays in view.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from facegen.model.config import DataConfig
from facegen.model.imaging import to_float, to_uint8
from training.data.celeba import fingerprint, load_split
from training.evaluation.protocol import JUDGE_PANEL_SIZE, REPORT_SPLIT
from training.runtime import cached_tensors
from training.stats import rate

# the accuracies of the robustness check may differ by this much before the report warns
ROBUSTNESS_TOLERANCE = 0.02
TEST_BLUR_SIGMA = 1.2  # pixels at 64x64: the fixed blur of the "blurred" test copy
TRAINING_BATCH = 64  # images per training step of a judge


@dataclass(frozen=True)
class Augmentation:
    """Degradations drawn per training image, each applied with ``probability``; pixel sizes are at 64x64 and
    scale with the image size."""

    probability: float = 0.5
    max_blur_sigma: float = 2.0  # Gaussian blur, sigma uniform in [0, max]
    resample_factors: tuple[float, ...] = (1.5, 2.0, 3.0)  # downsample by one, upsample back (bilinear)
    max_noise_std: float = 0.08  # additive Gaussian noise in [-1, 1] units
    brightness: float = 0.1  # additive, in [-1, 1] units
    contrast: float = 0.2  # multiplicative around each image's mean, 1 +- this
    saturation: float = 0.3  # blend towards grey, 1 +- this
    max_shift: float = 3.0  # pixels, each axis


NO_AUGMENTATION = Augmentation(probability=0.0)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image of ``x [N, C, H, W]`` with its own ``sigma [N]`` (pixels; 0 leaves it unchanged)."""
    n, c, h, w = x.shape
    radius = max(1, int(float(sigma.max()) * 3 + 0.5))
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-offsets.square() / (2 * sigma.clamp_min(1e-3).to(x.dtype)[:, None] ** 2))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # [N*C, 2r+1]
    flat = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=n * c)
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=n * c)
    return flat.reshape(n, c, h, w)


def degrade(x: torch.Tensor, aug: Augmentation, generator: torch.Generator) -> torch.Tensor:
    """``x [N, 3, S, S]`` in [-1, 1] -> the same batch, each image degraded by its own random draw (clamped)."""
    n, _, size, _ = x.shape
    scale = size / 64

    def chosen() -> torch.Tensor:
        return (torch.rand(n, generator=generator) < aug.probability)[:, None, None, None]

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator)

    sigma = uniform(0, aug.max_blur_sigma * scale) * chosen().flatten()
    x = gaussian_blur(x, sigma)
    factor_index = torch.randint(len(aug.resample_factors), (n,), generator=generator)
    resample = chosen().flatten()
    for k, factor in enumerate(aug.resample_factors):
        rows = resample & (factor_index == k)
        if rows.any():
            small = F.interpolate(x[rows], size=max(4, round(size / factor)), mode="bilinear", antialias=True)
            x[rows] = F.interpolate(small, size=size, mode="bilinear")
    x = x + chosen() * uniform(0, aug.max_noise_std)[:, None, None, None] * torch.randn(x.shape, generator=generator)
    grey = x.mean(dim=1, keepdim=True)
    x = torch.where(chosen(), grey + uniform(1 - aug.saturation, 1 + aug.saturation)[:, None, None, None] * (x - grey), x)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = torch.where(chosen(), mean + uniform(1 - aug.contrast, 1 + aug.contrast)[:, None, None, None] * (x - mean), x)
    x = x + chosen() * uniform(-aug.brightness, aug.brightness)[:, None, None, None]
    shift = uniform(-aug.max_shift, aug.max_shift) * scale, uniform(-aug.max_shift, aug.max_shift) * scale
    moved = chosen().flatten()
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 2] = torch.where(moved, 2 * shift[0].round() / size, 0)
    theta[:, 1, 2] = torch.where(moved, 2 * shift[1].round() / size, 0)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return x.clamp(-1, 1)


FEATURE_CHANNELS = 128  # channels of strided_features' output


def strided_features() -> nn.Sequential:
    """``[N, 3, S, S]`` -> ``[N, FEATURE_CHANNELS, S/16, S/16]``: four stride-2 3x3 convolutions (32, 64, 128, 128
    channels), each with GroupNorm and SiLU."""
    layers: list[nn.Module] = []
    channels = 3
    for width in (32, 64, 128, FEATURE_CHANNELS):
        layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.GroupNorm(8, width), nn.SiLU()]
        channels = width
    return nn.Sequential(*layers)


class AttributeClassifier(nn.Module):
    """``[N, 3, S, S]`` in [-1, 1] -> logits ``[N, A]``: four stride-2 convolutions, then a linear layer over the
    whole ``S/16 x S/16`` feature map (where a feature is, the mouth, matters)."""

    def __init__(self, attributes: int, image_size: int):
        super().__init__()
        self.features = strided_features()
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2),
                                  nn.Linear(FEATURE_CHANNELS * (image_size // 16) ** 2, attributes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @torch.no_grad()
    def logits(self, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
        """``uint8 [N, 3, H, W]`` -> ``float32 [N, A]``: each attribute's logit (> 0: present)."""
        self.eval()
        return torch.cat([self(to_float(chunk)) for chunk in images.split(batch)])

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """``uint8 [N, 3, H, W]`` -> ``int64 [N, A]`` in {0, 1}."""
        return (self.logits(images) > 0).long()


@dataclass(frozen=True)
class Verdicts:
    """A panel's reading of one attribute on ``N`` images: ``panel int64 [N]`` in {0, 1} (the members' mean
    probability > 0.5) and ``members int64 [K, N]`` (each member's own reading)."""

    panel: torch.Tensor
    members: torch.Tensor

    def hits(self, expected: Verdicts | torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        """Where these verdicts equal ``expected`` (the images' labels ``int64 [N]``, one value for every image, or
        the panel's verdicts on other images, compared member by member): the panel's ``bool [N]`` and the
        members' ``bool [K, N]``; hits of several checks combine with ``&`` before :func:`panel_rate`."""
        panel, members = (expected.panel, expected.members) if isinstance(expected, Verdicts) else (expected, expected)
        return self.panel == panel, self.members == members

    def rate_of(self, expected: Verdicts | torch.Tensor | int) -> dict[str, Any]:
        """How often these verdicts equal ``expected`` (as in :meth:`hits`): :func:`rate` of the panel, plus
        ``members``: each member's rate."""
        return panel_rate(*self.hits(expected))


def panel_rate(panel_hits: torch.Tensor, member_hits: torch.Tensor) -> dict[str, Any]:
    """:func:`rate` of the panel's hits ``bool [N]``, plus ``members``: each member's rate from ``bool [K, N]``."""
    return rate(panel_hits) | {"members": member_hits.float().mean(dim=1).tolist()}


class JudgePanel:
    """Classifiers trained alike from different seeds, judging together (see the module's docstring)."""

    def __init__(self, members: list[AttributeClassifier], seeds: list[int]):
        self.members = members
        self.seeds = seeds  # each member's training seed

    def read(self, images: torch.Tensor, attribute: int = 0) -> Verdicts:
        """``uint8 [N, 3, H, W]`` -> the panel's and each member's verdicts on ``attribute`` (a column of the
        members' data config; 0: the first)."""
        logits = torch.stack([member.logits(images)[:, attribute] for member in self.members])  # [K, N]
        return Verdicts(panel=(torch.sigmoid(logits).mean(dim=0) > 0.5).long(), members=(logits > 0).long())


def first_attribute_only(data_cfg: DataConfig) -> DataConfig:
    """``data_cfg`` with its first attribute alone: what ``evaluate`` and ``transitions`` judge, so that one- and
    multi-attribute models sharing that attribute are judged by the same judge (the same cached weights)."""
    return dataclasses.replace(data_cfg, attributes=data_cfg.attributes[:1])


def train_classifier(data: Path, data_cfg: DataConfig, steps: int, seed: int, augmentation: Augmentation = Augmentation(),
                     batch: int = TRAINING_BATCH, train_limit: int | None = None, cache: Path | None = None
                     ) -> tuple[AttributeClassifier, torch.Tensor, torch.Tensor]:
    """Train on the train split (its first ``train_limit`` images, default all) with ``augmentation`` (plus mirror
    images); returns the classifier, the test images ``uint8 [N, 3, S, S]`` and their labels ``int64 [N, A]``.

    ``cache``: a folder keeping the trained weights under a name made of everything they depend on (the data's
    fingerprint, ``data_cfg``, ``steps``, ``seed``, ``augmentation``, ``batch``, ``train_limit``); a later call with
    the same inputs reads them instead of training (training is deterministic on one machine)."""
    (classifier,) = _classifiers(data, data_cfg, steps, [seed], augmentation, batch, train_limit, cache)
    return classifier, *load_split(data, "test", data_cfg)


def train_panel(data: Path, data_cfg: DataConfig, steps: int, seed: int, size: int = JUDGE_PANEL_SIZE,
                cache: Path | None = None, split: str = REPORT_SPLIT, train_limit: int | None = None
                ) -> tuple[JudgePanel, torch.Tensor, torch.Tensor]:
    """``size`` classifiers of :func:`train_classifier` (seeds ``seed`` .. ``seed + size - 1``, each cached apart;
    trained on the first ``train_limit`` training images, default all) as one :class:`JudgePanel`; with the
    held-out images of ``split`` ("test", or "val" to choose without looking at the test split) ``uint8 [N, 3, S,
    S]`` and their labels ``int64 [N, A]``."""
    if size < 1:
        raise ValueError(f"a judge panel needs at least one member, got {size}")
    seeds = [seed + k for k in range(size)]
    members = _classifiers(data, data_cfg, steps, seeds, Augmentation(), TRAINING_BATCH, train_limit, cache)
    return JudgePanel(members, seeds), *load_split(data, split, data_cfg)


def _classifiers(data: Path, data_cfg: DataConfig, steps: int, seeds: list[int], augmentation: Augmentation,
                 batch: int, train_limit: int | None, cache: Path | None) -> list[AttributeClassifier]:
    """One classifier per seed, read from ``cache`` or trained (see :func:`train_classifier`); the data's
    fingerprint and the train split are read at most once for all of them."""
    data_key = fingerprint(data) if cache is not None else None  # reads every image's size: only for a cache
    train_split = functools.cache(lambda: load_split(data, "train", data_cfg, train_limit))  # by the first to train

    def fit(seed: int) -> dict[str, torch.Tensor]:
        return _fit(*train_split(), data_cfg.image_size, steps, seed, augmentation, batch)

    classifiers = []
    for seed in seeds:
        path = None
        if cache is not None:
            inputs = repr((data_key, data_cfg, steps, seed, augmentation, batch, train_limit))
            path = cache / f"judge-{hashlib.sha256(inputs.encode()).hexdigest()[:32]}.pt"
        classifier = AttributeClassifier(len(data_cfg.attributes), data_cfg.image_size)
        classifier.load_state_dict(cached_tensors(path, functools.partial(fit, seed)))
        classifiers.append(classifier)
    return classifiers


def _fit(images: torch.Tensor, labels: torch.Tensor, image_size: int, steps: int, seed: int,
         augmentation: Augmentation, batch: int) -> dict[str, torch.Tensor]:
    """The trained weights of a classifier on ``images uint8 [N, 3, S, S]`` and ``labels int64 [N, A]``
    (initialised and trained from ``seed`` alone)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    classifier = AttributeClassifier(labels.shape[1], image_size)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=1e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=max(steps, 1))
    classifier.train()
    for _ in range(steps):
        index = torch.randint(0, len(images), (batch,), generator=generator)
        x = to_float(images[index])
        flip = torch.rand(batch, generator=generator) < 0.5
        x = degrade(torch.where(flip[:, None, None, None], x.flip(-1), x), augmentation, generator)
        loss = F.binary_cross_entropy_with_logits(classifier(x), labels[index].float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return classifier.state_dict()


def blurred(images: torch.Tensor, sigma_at_64: float = TEST_BLUR_SIGMA) -> torch.Tensor:
    """``uint8 [N, 3, S, S]`` blurred with one Gaussian (``sigma`` pixels at 64x64, scaled with ``S``)."""
    sigma = torch.full((len(images),), sigma_at_64 * images.shape[-1] / 64)
    return to_uint8(gaussian_blur(to_float(images), sigma))


def members_range(rates: list[float]) -> str:
    """The range of a panel's members' own rates ("" for a panel of one)."""
    return f"members {100 * min(rates):.1f}–{100 * max(rates):.1f}%" if len(rates) > 1 else ""


def format_rate(entry: dict[str, Any]) -> str:
    """A judged rate, its interval and n, and the range of the panel members' own rates."""
    spread = members_range(entry["members"])
    return (f"{100 * entry['rate']:.1f}% [{100 * entry['low']:.1f}, {100 * entry['high']:.1f}] "
            f"(n={entry['n']}{'; ' + spread if spread else ''})")


def describe_panel(seeds: list[int]) -> str:
    """The judge panel in words."""
    if len(seeds) == 1:
        return f"judge: one classifier (seed {seeds[0]})"
    return (f"judge: a panel of {len(seeds)} classifiers (seeds {seeds[0]}–{seeds[-1]}), verdict = their mean "
            "probability; ranges are the members' own rates")


def robustness(judge: JudgePanel, images: torch.Tensor, labels: torch.Tensor, sharp: Verdicts,
               reconstructed: Verdicts | None) -> dict[str, Any]:
    """The judge's accuracy on the first attribute: held-out ``images uint8 [N, 3, S, S]`` (the test split, or the
    validation split when choosing; ``sharp``: the judge's reading of them), a blurred copy, and (when given, as the
    judge's reading) the VAE's reconstructions of the same images, each judged against the true ``labels int64 [N,
    A]`` (with each member's accuracy); ``warning`` when the panel's accuracies differ by more than
    ``ROBUSTNESS_TOLERANCE``."""
    truth = labels[:, 0]
    readings = {"sharp": sharp, "blurred": judge.read(blurred(images))}
    if reconstructed is not None:
        readings["reconstructed"] = reconstructed
    report: dict[str, Any] = {name: verdicts.rate_of(truth) for name, verdicts in readings.items()}
    rates = [entry["rate"] for entry in report.values()]
    spread = max(rates) - min(rates)
    report["spread"] = spread
    report["warning"] = (f"the judge's accuracy differs by {100 * spread:.1f} points between sharp, blurred and "
                         "reconstructed held-out images: its verdicts on generated images are less certain"
                         if spread > ROBUSTNESS_TOLERANCE else None)
    return report
