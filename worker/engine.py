"""The loaded model and how it turns a batch of requests into images.

One :class:`Engine` per worker process: networks loaded once, on one device, in one precision (fp16 on CUDA,
bf16 on CPU by default). :meth:`Engine.run` takes the requests of several compatible jobs, lays their images
out as rows (row of image ``i`` of a request with seed ``s`` draws its noise from stream ``(s, i)``), runs the
chain in chunks of at most ``max_batch`` images, and returns each request's images and, when asked, its
trajectory frames.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from training.diffusion.noise import ImageNoise
from training.diffusion.samplers import trajectory_indices
from training.imaging import to_uint8
from training.pipeline import LatentDiffusion
from training.runtime import pick_device, pick_dtype

log = logging.getLogger(__name__)


class OutOfMemory(RuntimeError):
    """Even one image does not fit on the device."""


@dataclass(frozen=True)
class ImageRequest:
    """One job's share of a batch."""

    key: str  # the job id
    attributes: dict[str, bool]
    seed: int
    count: int
    frames: int = 0  # trajectory frames wanted (0 = no animation)


@dataclass
class RequestOutput:
    images: torch.Tensor  # uint8 [count, 3, H, W]
    frames: list[torch.Tensor] = field(default_factory=list)  # each uint8 [count, 3, H, W], noise first


@dataclass
class RunStats:
    images: int = 0
    chunks: int = 0
    sampling_s: float = 0.0
    decoding_s: float = 0.0
    precision_fallbacks: int = 0
    denoiser_steps: int = 0


ProgressFn = Callable[[int, int], None]  # (steps done, total steps) across chunks; may raise to abort


def compile_for_inference(module: torch.nn.Module, mode: str, device: torch.device) -> torch.nn.Module:
    """``torch.compile`` for fixed-shape inference; on CPU with inductor's freezing, which folds the weights in
    as constants and pre-packs them for oneDNN (the speed-up over eager is in BENCHMARKS.md)."""
    if device.type == "cpu":
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
    return torch.compile(module, mode=mode, dynamic=False)


class Engine:
    def __init__(self, checkpoints: Path, version: str, device: str = "auto", precision: str = "auto",
                 max_batch: int = 32, compile_mode: str = "off"):
        """``compile_mode``: ``off``, or a ``torch.compile`` mode for the UNet (``default``, ``reduce-overhead``
        = CUDA graphs, ``max-autotune``); each new batch shape compiles once."""
        self.device = pick_device(device)
        self.dtype = pick_dtype(self.device, precision)
        self.max_batch = max_batch
        self.model = LatentDiffusion.load(checkpoints, version, self.device, self.dtype)
        if compile_mode != "off":
            self.model.unet = compile_for_inference(self.model.unet, compile_mode, self.device)

    @property
    def version(self) -> str:
        return self.model.version

    def _fallback_dtype(self) -> torch.dtype:
        if self.dtype == torch.float16 and self.device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32

    def decode(self, latents: torch.Tensor, stats: RunStats) -> torch.Tensor:
        """Scaled latents -> ``uint8 [N, 3, H, W]``; a non-finite fp16 decode is redone in bf16, then fp32."""
        images = self.model.decode(latents)
        for dtype in (self._fallback_dtype(), torch.float32):
            if bool(torch.isfinite(images).all()) or dtype == self.dtype:
                break
            stats.precision_fallbacks += 1
            log.warning("decoder produced NaN/Inf in %s; decoding this batch again in %s", self.dtype, dtype)
            images = self.model.decode(latents, dtype)
        return to_uint8(images)

    def run(self, requests: list[ImageRequest], sampler: str, steps: int, guidance_scale: float,
            progress: ProgressFn | None = None) -> tuple[dict[str, RequestOutput], RunStats]:
        """Generate every request's images (and trajectory frames where asked).

        Raises ``ValueError`` for an attribute the model does not know, :class:`OutOfMemory` when a single
        image does not fit, and whatever ``progress`` raises (e.g. to cancel).
        """
        # One row per image: (index of its request, index of the image within the request).
        rows = [(r, i) for r, request in enumerate(requests) for i in range(request.count)]
        request_labels = torch.stack([self.model.labels_for(request.attributes) for request in requests])
        labels = request_labels[[r for r, _ in rows]]
        noise_streams = [(requests[r].seed, i) for r, i in rows]
        row_wants_frames = torch.tensor([requests[r].frames > 0 for r, _ in rows])
        request_frame_steps = [trajectory_indices(steps, request.frames) for request in requests]
        frame_steps = sorted({i for indices in request_frame_steps for i in indices})  # any request's
        chunks = [list(range(start, min(start + self.max_batch, len(rows))))
                  for start in range(0, len(rows), self.max_batch)]
        total = steps * len(chunks)
        stats = RunStats(images=len(rows))
        images: list[torch.Tensor] = []
        noise_frames: list[torch.Tensor] = []  # decoded x_T of the rows that want frames, chunk by chunk
        step_frames: dict[int, list[torch.Tensor]] = {i: [] for i in frame_steps}
        for number, chunk in enumerate(chunks):
            def on_step(i: int, base: int = number * steps) -> None:
                if progress is not None:
                    progress(base + i + 1, total)

            chunk_wants_frames = row_wants_frames[chunk]
            t0 = time.perf_counter()
            latents, x0_at_step = self._sample(labels[chunk], [noise_streams[k] for k in chunk], chunk_wants_frames,
                                               sampler, steps, guidance_scale, frame_steps, on_step)
            t1 = time.perf_counter()
            images.append(self.decode(latents, stats))
            if bool(chunk_wants_frames.any()):
                wanting = [noise_streams[k] for k, w in zip(chunk, chunk_wants_frames.tolist(), strict=True) if w]
                noise_frames.append(self.decode(ImageNoise(wanting).draw(self.model.latent_shape), stats))
                for i in frame_steps:
                    step_frames[i].append(self.decode(x0_at_step[i], stats))
            stats.chunks += 1
            stats.denoiser_steps += steps
            stats.sampling_s += t1 - t0
            stats.decoding_s += time.perf_counter() - t1

        all_images = torch.cat(images)
        frame_position = (torch.cumsum(row_wants_frames.long(), 0) - 1).tolist()  # row -> index among frame rows
        all_noise = torch.cat(noise_frames) if noise_frames else None
        all_steps = {i: torch.cat(parts) for i, parts in step_frames.items()}
        outputs: dict[str, RequestOutput] = {}
        for r, request in enumerate(requests):
            request_rows = [k for k, (row_request, _) in enumerate(rows) if row_request == r]
            output = RequestOutput(all_images[request_rows])
            if request.frames > 0 and all_noise is not None:
                positions = [frame_position[k] for k in request_rows]
                output.frames = [all_noise[positions]] + [all_steps[i][positions] for i in request_frame_steps[r]]
            outputs[request.key] = output
        return outputs, stats

    def _sample(self, labels: torch.Tensor, noise_streams: list[tuple[int, int]], wants_frames: torch.Tensor,
                sampler: str, steps: int, guidance: float, frame_steps: list[int], on_step: Callable[[int], None]
                ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """One chain over ``labels [n, A]``: final latents ``[n, C, h, w]`` and the x0 predictions at the
        ``frame_steps`` step indices for the rows in ``wants_frames``. On device OOM it empties the cache and runs
        the two halves separately (fresh noise streams give the same images)."""
        x0_at_step: dict[int, torch.Tensor] = {}
        keep = wants_frames.to(self.device)
        any_wanted = bool(wants_frames.any())

        def callback(i: int, x: torch.Tensor, x0: torch.Tensor) -> None:
            if any_wanted and i in frame_steps:
                x0_at_step[i] = x0[keep].cpu()
            on_step(i)

        try:
            latents = self.model.sample_latents(labels, ImageNoise(noise_streams, self.device), sampler, steps,
                                                guidance, callback)
            return latents, x0_at_step
        except torch.OutOfMemoryError:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(noise_streams) == 1:
                raise OutOfMemory("out of device memory for a single image; lower the resolution or use a "
                                  "larger device") from None
            log.warning("out of device memory for %d images; splitting the batch", len(noise_streams))
        half = len(noise_streams) // 2
        first = self._sample(labels[:half], noise_streams[:half], wants_frames[:half], sampler, steps, guidance,
                             frame_steps, on_step)
        second = self._sample(labels[half:], noise_streams[half:], wants_frames[half:], sampler, steps, guidance,
                              frame_steps, on_step)
        merged = {i: torch.cat([first[1][i], second[1][i]]) for i in first[1].keys() & second[1].keys()}
        merged |= {i: v for part in (first[1], second[1]) for i, v in part.items() if i not in merged}
        return torch.cat([first[0], second[0]]), merged
