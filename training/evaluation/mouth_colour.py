"""Colour fidelity of the mouth: how often a face's mouth shows colours that real mouths of its label do not.

**Where the mouth is.** The synthetic generator draws a mouth between its two corners, at most
``-NEUTRAL_DROOP[0]`` mouth widths above the corners' line (a frown's middle) and ``SMILE_DEPTH[1]`` below it (an
open smile's lower lip), on a head rolled by at most ``MAX_ROLL`` degrees. :func:`mouth_masks` takes that box from
a mouth's centre and width, as the identity regressor reads them (``training.evaluation.identity.GEOMETRY``), so
every image is measured alike, generated ones included.

**How likely a colour is.** :meth:`MouthColour.fit` counts the colours of real mouths of one label (a reference
set) in a ``LEVELS``-level RGB grid, smooths the counts by a Gaussian of ``KERNEL_SIGMA`` cells (a colour next to
real ones is not foreign) and keeps each cell's surprisal, ``-log10`` of its share (at most ``-log10 FLOOR``).
Images are blurred by ``SMOOTHING`` pixels first: the colour of a region counts, not one noisy pixel.

**Outside.** A face's score is the mean surprisal of its ``TOP_K`` most surprising mouth pixels (a patch the size
of a few teeth, at 64x64): one odd pixel does not make a face odd, a tinted set of teeth does. The threshold is the
``OUTSIDE_QUANTILE`` quantile of the score over other real mouths of the label (a calibration set), so about 1% of
real mouths lie outside by construction; a face is *outside* when its score is above it. Both sets are real faces of
a split no report is taken on, and the constants were set on real faces (validation split, with tints, blur and
noise as in ``tests/training/test_mouth_colour.py``) before any edit was measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from training.data.synthetic import MAX_ROLL, NEUTRAL_DROOP, SMILE_DEPTH
from training.evaluation.judge import gaussian_blur

# how far a mouth reaches above and below its corners' line, in mouth widths (a roll tilts the line by at most
# half a width times sin(MAX_ROLL))
REACH_ABOVE = -NEUTRAL_DROOP[0] + math.sin(math.radians(MAX_ROLL)) / 2
REACH_BELOW = SMILE_DEPTH[1] + math.sin(math.radians(MAX_ROLL)) / 2
LEVELS = 16  # per RGB channel
KERNEL_SIGMA = 0.7  # cells
FLOOR = 1e-8  # the least share a colour cell is given
SMOOTHING = 0.5  # pixels at 64x64
TOP_K = 8  # pixels at 64x64
OUTSIDE_QUANTILE = 0.99


def mouth_masks(geometry: torch.Tensor, size: int) -> torch.Tensor:
    """``bool [N, S, S]``: the pixels (by their centres) of each face's mouth box, from ``geometry float [N, 3]``
    (the mouth's centre x, y and its width, in pixels of the ``S x S`` image; see the module's docstring)."""
    x, y, width = geometry.float().unbind(dim=1)
    centres = torch.arange(size, dtype=torch.float32) + 0.5
    columns = (centres >= (x - width / 2)[:, None]) & (centres <= (x + width / 2)[:, None])  # [N, S]
    rows = (centres >= (y - REACH_ABOVE * width)[:, None]) & (centres <= (y + REACH_BELOW * width)[:, None])
    return rows[:, :, None] & columns[:, None, :]


def colour_cells(images: torch.Tensor) -> torch.Tensor:
    """``uint8 [N, 3, S, S]`` -> ``int64 [N, S, S]``: each pixel's cell of the ``LEVELS^3`` RGB grid, after a
    Gaussian blur of ``SMOOTHING`` pixels at 64x64."""
    sigma = torch.full((len(images),), SMOOTHING * images.shape[-1] / 64)
    levels = (gaussian_blur(images.float() / 255, sigma) * LEVELS).long().clamp(0, LEVELS - 1)
    r, g, b = levels.unbind(dim=1)
    return (r * LEVELS + g) * LEVELS + b


def surprisal(counts: torch.Tensor) -> torch.Tensor:
    """``float32 [LEVELS^3]``: ``-log10`` of each cell's share after Gaussian smoothing of ``counts [LEVELS^3]``
    over the grid (``KERNEL_SIGMA`` cells; shares floored at ``FLOOR``)."""
    radius = max(1, math.ceil(3 * KERNEL_SIGMA))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-offsets.square() / (2 * KERNEL_SIGMA**2))
    kernel = kernel / kernel.sum()
    density = counts.float().reshape(1, 1, LEVELS, LEVELS, LEVELS)
    for shape in ((-1, 1, 1), (1, -1, 1), (1, 1, -1)):  # separable, zero outside the grid
        pad = [radius if size == -1 else 0 for size in reversed(shape) for _ in range(2)]
        density = F.conv3d(F.pad(density, pad), kernel.reshape(1, 1, *shape))
    share = density.flatten() / density.sum()
    return -torch.log10(share.clamp_min(FLOOR))


@dataclass(frozen=True)
class MouthColour:
    """Real mouths' colours of one label: each colour cell's ``surprisal float32 [LEVELS^3]`` and the score above
    which a mouth is outside."""

    surprisal: torch.Tensor
    threshold: float
    reference_faces: int
    calibration_faces: int

    @classmethod
    def fit(cls, reference: torch.Tensor, reference_geometry: torch.Tensor, calibration: torch.Tensor,
            calibration_geometry: torch.Tensor) -> MouthColour:
        """From real faces ``uint8 [N, 3, S, S]`` of one label and their mouths' ``geometry [N, 3]``: the colour
        surprisal from ``reference``, the threshold from ``calibration`` (see the module's docstring)."""
        cells = colour_cells(reference)[mouth_masks(reference_geometry, reference.shape[-1])]
        unfitted = cls(surprisal(torch.bincount(cells, minlength=LEVELS**3)), math.inf, len(reference),
                       len(calibration))
        scores = unfitted.scores(calibration, calibration_geometry)
        threshold = float(torch.quantile(scores, OUTSIDE_QUANTILE, interpolation="higher"))
        return cls(unfitted.surprisal, threshold, len(reference), len(calibration))

    def scores(self, images: torch.Tensor, geometry: torch.Tensor) -> torch.Tensor:
        """``float32 [N]``: the mean surprisal of each face's ``TOP_K`` most surprising mouth pixels (all of them
        when its mouth box has fewer)."""
        size = images.shape[-1]
        masks = mouth_masks(geometry, size).flatten(1)
        pixels = self.surprisal[colour_cells(images).flatten(1)].masked_fill(~masks, -math.inf)
        k = min(max(1, round(TOP_K * (size / 64) ** 2)), pixels.shape[1])
        top = pixels.topk(k, dim=1).values
        counted = top.isfinite()
        return top.where(counted, torch.zeros_like(top)).sum(dim=1) / counted.sum(dim=1).clamp_min(1)

    def outside(self, images: torch.Tensor, geometry: torch.Tensor) -> torch.Tensor:
        """``bool [N]``: which faces' mouths score above the real mouths' threshold."""
        return self.scores(images, geometry) > self.threshold
