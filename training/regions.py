"""Where the face's features are: a per-pixel loss weight from the five CelebA landmarks.

Eyes and mouth are a few pixels at 64x64 and carry the attributes users ask for (a smile lives in the mouth
corners); a plain L1 spreads its gradient over background and cheeks. ``landmark_weights`` raises the weight of
the pixels around each landmark and around the mouth's centre.
"""

from __future__ import annotations

import torch


def landmark_weights(landmarks: torch.Tensor, size: int, sigma: float, gain: float) -> torch.Tensor:
    """``landmarks float [N, 5, 2]`` (x, y pixels: eyes, nose, mouth corners) -> weights ``[N, 1, size, size]`` in
    ``[1, 1 + gain]``: ``1 + gain * max_k exp(-|p - c_k|^2 / (2 (sigma * size)^2))`` over the landmarks and the mouth
    centre (the mean of the corners, where an open or curved smile sits)."""
    centres = torch.cat([landmarks, landmarks[:, 3:5].mean(dim=1, keepdim=True)], dim=1)  # [N, 6, 2]
    axis = torch.arange(size, dtype=torch.float32, device=landmarks.device)
    dx = axis.view(1, 1, 1, size) - centres[..., 0, None, None]  # [N, 6, 1, size]
    dy = axis.view(1, 1, size, 1) - centres[..., 1, None, None]  # [N, 6, size, 1]
    bumps = torch.exp(-(dx.square() + dy.square()) / (2 * (sigma * size) ** 2))  # [N, 6, size, size]
    return 1 + gain * bumps.amax(dim=1, keepdim=True)


def weighted_l1(reconstruction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean ``|reconstruction - target|`` over ``[N, C, H, W]``, each pixel counted ``weights [N, 1, H, W]`` times
    (normalised by the weights' mean, so a uniform weight gives the plain L1)."""
    error = (reconstruction - target).abs()
    if weights is None:
        return error.mean()
    return (error * weights).mean() / weights.mean()
