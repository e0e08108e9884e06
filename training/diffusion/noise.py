"""Per-image random streams: image ``i`` of a request with seed ``s`` draws all its noise from its own
generator seeded by ``(s, i)``, so an image never depends on the batch it was computed in."""

from __future__ import annotations

import hashlib

import torch


def image_seed(seed: int, index: int) -> int:
    """A 63-bit seed for image ``index`` of a request with ``seed`` (sha256 of both, well mixed)."""
    digest = hashlib.sha256(f"facegen:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


class ImageNoise:
    """Gaussian draws for a batch whose rows belong to ``(seed, index)`` pairs; always drawn on the CPU in
    float32 (identical on every device), then moved to ``device``."""

    def __init__(self, pairs: list[tuple[int, int]], device: torch.device | str = "cpu"):
        self.generators = [torch.Generator().manual_seed(image_seed(s, i)) for s, i in pairs]
        self.device = torch.device(device)

    def __len__(self) -> int:
        return len(self.generators)

    def draw(self, shape: tuple[int, ...]) -> torch.Tensor:
        """``[N, *shape]`` standard normal, row ``k`` from generator ``k``."""
        rows = [torch.randn(shape, generator=g) for g in self.generators]
        return torch.stack(rows).to(self.device)

    def subset(self, rows: list[int]) -> ImageNoise:
        """The streams of some rows (used when a batch is split), continuing where they were."""
        part = ImageNoise([], self.device)
        part.generators = [self.generators[r] for r in rows]
        return part
