"""Where the face's features are: a per-pixel loss weight from the five CelebA landmarks, and the region an edit
of an attribute may change.

Eyes and mouth are a few pixels at 64x64 and carry the attributes users ask for (a smile lives in the mouth
corners); a plain L1 spreads its gradient over background and cheeks. ``landmark_weights`` raises the weight of
the pixels around each landmark and around the mouth's centre, the mouth more on faces where it barely stands out
from the skin (``contrast_boost``: a thin dark stroke on dark skin costs a plain L1 little when blurred away, and it
is the smile). ``edit_mask`` marks an attribute's region
(``config.EDIT_REGIONS``) so that an edit leaves the rest of the face as it was.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

# An edit region's soft edge: full inside its ellipse, fading linearly to 0 at this multiple of its radii.
EDGE_REACH = 1.5


MOUTH_BUMPS = slice(3, 6)  # of :func:`feature_bumps`: the two mouth corners and the mouth's centre


def feature_bumps(landmarks: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """``landmarks float [N, 5, 2]`` (x, y pixels: eyes, nose, mouth corners) -> ``[N, 6, size, size]`` in [0, 1]:
    a Gaussian bump ``exp(-|p - c_k|^2 / (2 (sigma * size)^2))`` on each landmark and on the mouth centre (the mean
    of the corners, where an open or curved smile sits), in that order."""
    centres = torch.cat([landmarks, landmarks[:, 3:5].mean(dim=1, keepdim=True)], dim=1)  # [N, 6, 2]
    axis = torch.arange(size, dtype=torch.float32, device=landmarks.device)
    dx = axis.view(1, 1, 1, size) - centres[..., 0, None, None]  # [N, 6, 1, size]
    dy = axis.view(1, 1, size, 1) - centres[..., 1, None, None]  # [N, 6, size, 1]
    return torch.exp(-(dx.square() + dy.square()) / (2 * (sigma * size) ** 2))


def landmark_weights(landmarks: torch.Tensor, size: int, sigma: float, gain: float,
                     mouth_boost: torch.Tensor | None = None) -> torch.Tensor:
    """``landmarks float [N, 5, 2]`` -> weights ``[N, 1, size, size]`` in ``[1, 1 + gain * max(1, mouth_boost)]``:
    ``1 + gain * max_k bump_k`` over :func:`feature_bumps`, the mouth's bumps multiplied per image by
    ``mouth_boost [N]`` (>= 1, e.g. :func:`contrast_boost`) when given."""
    bumps = feature_bumps(landmarks, size, sigma)
    if mouth_boost is not None:
        bumps[:, MOUTH_BUMPS] *= mouth_boost.view(-1, 1, 1, 1).to(bumps)
    return 1 + gain * bumps.amax(dim=1, keepdim=True)


def contrast_boost(images: torch.Tensor, landmarks: torch.Tensor, sigma: float, reference: float, cap: float
                   ) -> torch.Tensor:
    """How much more the mouth of each face should weigh: ``images [N, 3, S, S]`` in [-1, 1] and their
    ``landmarks [N, 5, 2]`` -> ``[N]`` in ``[1, cap]``, ``reference / c`` where ``c`` is the standard deviation of
    the image's luminance (Rec. 601, in the images' units) under its mouth bumps: 1 for a mouth that stands out by
    ``reference`` or more, 3 for one at a third of it."""
    bumps = feature_bumps(landmarks, images.shape[-1], sigma)[:, MOUTH_BUMPS].amax(dim=1, keepdim=True)
    share = bumps / bumps.sum(dim=(2, 3), keepdim=True)
    luminance = (images * images.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    mean = (luminance * share).sum(dim=(2, 3), keepdim=True)
    contrast = ((luminance - mean).square() * share).sum(dim=(1, 2, 3)).sqrt()
    return (reference / contrast.clamp_min(1e-8)).clamp(1, cap)


def weighted_l1(reconstruction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean ``|reconstruction - target|`` over ``[N, C, H, W]``, each pixel counted ``weights [N, 1, H, W]`` times
    (normalised by the weights' mean, so a uniform weight gives the plain L1)."""
    error = (reconstruction - target).abs()
    if weights is None:
        return error.mean()
    return (error * weights).mean() / weights.mean()


def edit_mask(targets: torch.Tensor, attributes: Sequence[str], null: float,
              regions: Mapping[str, tuple[float, float, float, float]], size: tuple[int, int]) -> torch.Tensor:
    """Where each edit may change its image: ``targets [N, A]`` (the null label where an attribute is left open) ->
    ``float32 [N, 1, h, w]`` in [0, 1] for a grid of ``size = (h, w)``: the union of the set attributes' ``regions``
    (ellipses ``(cx, cy, rx, ry)`` in fractions of the side, soft to ``EDGE_REACH`` times their radii); all ones for
    a row that sets an attribute with no region (or sets none)."""
    h, w = size
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    masks = []
    for row in targets.cpu():
        chosen = [name for name, value in zip(attributes, row.tolist(), strict=True) if value != null]
        if not chosen or any(name not in regions for name in chosen):
            masks.append(torch.ones(h, w))
            continue
        union = torch.zeros(h, w)
        for name in chosen:
            cx, cy, rx, ry = regions[name]
            distance = (((xs.view(1, w) - cx) / rx).square() + ((ys.view(h, 1) - cy) / ry).square()).sqrt()
            union = torch.maximum(union, ((EDGE_REACH - distance) / (EDGE_REACH - 1)).clamp(0, 1))
        masks.append(union)
    return torch.stack(masks).unsqueeze(1).to(targets.device)
