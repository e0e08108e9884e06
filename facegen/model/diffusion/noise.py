"""Per-image random streams: image ``i`` of a request with seed ``s`` draws all its noise from its own
generator seeded by ``(s, i)``, so an image never depends on the batch it was computed in."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch

# On CUDA, how many successive draws (x_T, then one per stochastic step) are drawn ahead into one pinned block and
# copied to the device with one non-blocking transfer.
DRAWS_AHEAD = 32


def image_seed(seed: int, index: int) -> int:
    """A 63-bit seed for image ``index`` of a request with ``seed`` (sha256 of both, well mixed)."""
    digest = hashlib.sha256(f"facegen:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


class ImageNoise:
    """Gaussian draws for a batch whose rows belong to ``(seed, index)`` pairs; always drawn on the CPU in
    float32 (identical on every device), then moved to ``device``.

    ``ahead`` draws at a time are drawn into one (pinned, on CUDA) host block and sent with one non-blocking copy,
    so a sampling loop never waits on a pageable host-to-device copy; each generator draws its values in the same
    order whatever ``ahead`` is, so the values do not depend on it. By default ``DRAWS_AHEAD`` on CUDA, 1 elsewhere.
    """

    def __init__(self, pairs: list[tuple[int, int]], device: torch.device | str = "cpu", ahead: int | None = None):
        self.generators = [torch.Generator().manual_seed(image_seed(s, i)) for s, i in pairs]
        self.device = torch.device(device)
        self.ahead = ahead or (DRAWS_AHEAD if self.device.type == "cuda" else 1)

    def __len__(self) -> int:
        return len(self.generators)

    def draw(self, shape: tuple[int, ...]) -> torch.Tensor:
        """``[N, *shape]`` standard normal, row ``k`` from generator ``k``."""
        return next(self.draws(shape, 1))

    def draws(self, shape: tuple[int, ...], count: int) -> Iterator[torch.Tensor]:
        """``count`` successive :meth:`draw` results ``[N, *shape]`` (float32 on ``device``), drawn ``ahead`` at a
        time; the generators advance exactly ``count`` draws."""
        for start in range(0, count, self.ahead):
            block = self._block(shape, min(self.ahead, count - start))
            yield from block.unbind(0)

    def _block(self, shape: tuple[int, ...], draws: int) -> torch.Tensor:
        """``[draws, N, *shape]`` on ``device``: draw ``j`` of row ``k`` is generator ``k``'s ``j``-th next draw."""
        pinned = self.device.type == "cuda"
        host = torch.empty((draws, len(self.generators), *shape), pin_memory=pinned)
        for k, generator in enumerate(self.generators):
            for j in range(draws):
                torch.randn(shape, generator=generator, out=host[j, k])
        return host.to(self.device, non_blocking=pinned)
