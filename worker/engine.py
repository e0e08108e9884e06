"""The loaded model and how it turns a batch of requests into images.

One :class:`Engine` per worker process: networks loaded once, on one device, in one precision (fp16 on CUDA,
bf16 on CPU by default). :meth:`Engine.run` takes the requests of several compatible jobs, lays their images
out as rows (row of image ``i`` of a request with seed ``s`` draws its noise from stream ``(s, i)``), runs the
chain in chunks of at most ``max_batch`` images, and returns each request's images and, when asked, its
trajectory frames. Beside the served model it loads that version's distilled student, when the checkpoints hold one
(``facegen.model.checkpoints.served_versions``): the student sampler runs it, every other sampler the served model;
both decode with the one VAE.

Non-finite guard: a row whose latents (checked before decoding) or decoded pixels (checked before any clamp) hold
NaN/Inf is redone alone in each wider dtype in turn (bf16 where the device runs it, then fp32), counted per stage in
``RunStats.precision_fallbacks``; if fp32 still gives NaN/Inf the run raises :class:`NonFiniteOutput`, so a job
never finishes with undefined pixels. A redone row's pixels depend only on its own request, not on its batch.

Compiled UNet (``compile_mode`` other than ``off``): every UNet call is padded to a fixed bucket of rows (powers of
two up to ``2 * max_batch``, the rows of a guided chunk) and sliced back, so each bucket compiles once, all of them
in :meth:`Engine.warm_up`, instead of once per batch size inside jobs.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from facegen.contract.spec import PREVIEW_SIDE, StudentInfo
from facegen.model.checkpoints import served_versions
from facegen.model.device import pick_device, pick_dtype
from facegen.model.diffusion.inversion import inversion_depth
from facegen.model.diffusion.noise import ImageNoise
from facegen.model.diffusion.samplers import STUDENT_SAMPLER, trajectory_indices
from facegen.model.imaging import to_float, to_uint8
from facegen.model.pipeline import LatentDiffusion

log = logging.getLogger(__name__)

FALLBACK_STAGES = ("unet", "decoder")  # where a non-finite batch is caught (the label of precision_fallbacks)


class OutOfMemory(RuntimeError):
    """Even one image does not fit on the device."""


class NonFiniteOutput(RuntimeError):
    """The chain gave NaN/Inf even in float32: the job fails instead of finishing with undefined pixels."""


class CompileUnsupported(RuntimeError):
    """``torch.compile`` cannot work on this machine (no Triton, no C/C++ compiler)."""


class NoStudent(ValueError):
    """The student sampler was asked of an engine whose model has no distilled student."""


@dataclass(frozen=True)
class ImageRequest:
    """One job's share of a batch."""

    key: str  # the job id
    attributes: dict[str, float]  # True/False, or a value in between (a transition frame)
    seed: int
    count: int
    frames: int = 0  # trajectory frames wanted (0 = no animation)
    first_index: int = 0  # image k draws from noise stream (seed, first_index + k)


@dataclass(frozen=True)
class EditRequest:
    """One edit job's share of a batch: its face, cropped like training, and the condition to regenerate it under."""

    key: str  # the job id
    attributes: dict[str, bool]
    seed: int
    image: torch.Tensor  # uint8 [3, H, W] at the model's resolution
    frames: int = 0  # animation frames wanted (0 = no animation)


@dataclass
class RequestOutput:
    images: torch.Tensor  # uint8 [count, 3, H, W]
    frames: list[torch.Tensor] = field(default_factory=list)  # each uint8 [count, 3, H, W], noise first
    source: torch.Tensor | None = None  # an edit's input, uint8 [1, 3, H, W]


@dataclass
class RunStats:
    images: int = 0
    chunks: int = 0
    sampling_s: float = 0.0
    decoding_s: float = 0.0
    # redos in a wider dtype after NaN/Inf, by stage ("unet": latents, "decoder": pixels)
    precision_fallbacks: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FALLBACK_STAGES, 0))
    denoiser_steps: int = 0


ProgressFn = Callable[[int, int], None]  # (steps done, total steps) across chunks; may raise to abort


class PreviewSink(Protocol):
    """Where :meth:`Engine.run` puts previews of the x0 prediction (the event stream's, worker/jobs.py)."""

    def due(self) -> frozenset[str]:
        """Request keys that want a preview now (empty most steps: previews are throttled)."""

    def put(self, step: int, key: str, image: torch.Tensor) -> None:
        """The preview of request ``key`` after ``step``: ``uint8 [3, h, w]`` on the CPU, at most
        ``PREVIEW_SIDE`` pixels a side."""


def check_compile_supported(device: torch.device) -> None:
    """Raise :class:`CompileUnsupported` with one line saying what is missing when ``torch.compile``'s inductor
    cannot build kernels here: Triton and a C compiler (for Triton's launchers) on CUDA, a C++ compiler on CPU."""
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            raise CompileUnsupported("COMPILE needs Triton on CUDA and it is not installed; set COMPILE=off")
        compilers, variable = ("gcc", "clang"), "CC"  # what Triton looks for
    else:
        compilers, variable = ("g++",), "CXX"  # what inductor's C++ backend looks for
    if not os.environ.get(variable) and not any(shutil.which(name) for name in compilers):
        raise CompileUnsupported(f"COMPILE needs a {'C' if variable == 'CC' else 'C++'} compiler ({' / '.join(compilers)}"
                                 f" or ${variable}) and this machine has none; install one or set COMPILE=off")


def bucket_sizes(max_batch: int) -> list[int]:
    """UNet row counts a compiled engine pads to: powers of two up to the first at least ``2 * max_batch`` (a
    chunk of ``max_batch`` images with guidance is ``2 * max_batch`` rows)."""
    return [2**k for k in range(math.ceil(math.log2(2 * max_batch)) + 1)]


def compile_for_inference(module: nn.Module, mode: str, device: torch.device, shapes: int = 1) -> nn.Module:
    """``torch.compile`` for fixed-shape inference of ``shapes`` input shapes (each compiles once; dynamo's
    recompile limit is raised by as many, as every network compiled in the process shares the UNet's code object,
    past which it would silently run eager); on CPU with inductor's freezing, which folds the weights in as
    constants and pre-packs them for oneDNN (the speed-up is in BENCHMARKS.md)."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit += shapes
    if device.type == "cpu":
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
    return torch.compile(module, mode=mode, dynamic=False)


class Bucketed(nn.Module):
    """The UNet with its rows padded to the next bucket size and sliced back: ``(x [n, C, h, w], t [n],
    labels [n, A], guidance [n] (a student's only)) -> [n, C, h, w]``. Padding rows repeat row 0; each row is
    computed on its own (per-sample normalisation and attention), so real rows do not depend on them."""

    def __init__(self, unet: nn.Module, buckets: list[int]):
        super().__init__()
        self.unet = unet
        self.buckets = buckets

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
                guidance: torch.Tensor | None = None) -> torch.Tensor:
        n = x.shape[0]
        size = next((b for b in self.buckets if b >= n), n)

        def pad(v: torch.Tensor) -> torch.Tensor:
            return v if size == n else torch.cat([v, v[:1].expand(size - n, *v.shape[1:])])

        student = {} if guidance is None else {"guidance": pad(guidance)}
        return self.unet(pad(x), pad(t), pad(labels), **student)[:n]


def non_finite_rows(x: torch.Tensor) -> torch.Tensor:
    """``bool [N]`` on the CPU: rows of ``x [N, ...]`` holding any NaN/Inf (one host sync)."""
    return (~torch.isfinite(x.flatten(1)).all(1)).cpu()


class Engine:
    def __init__(self, checkpoints: Path, version: str, device: str = "auto", precision: str = "auto",
                 max_batch: int = 32, compile_mode: str = "off"):
        """``compile_mode``: ``off``, or a ``torch.compile`` mode for the UNet (``default``, ``reduce-overhead``
        = CUDA graphs, ``max-autotune``); raises :class:`CompileUnsupported` when it cannot work here."""
        self.device = pick_device(device)
        self.dtype = pick_dtype(self.device, precision)
        self.max_batch = max_batch
        if compile_mode != "off":
            check_compile_supported(self.device)  # before loading anything: refused at once
        served, student = served_versions(checkpoints, version)
        self.model = LatentDiffusion.load(checkpoints, served, self.device, self.dtype)
        # the served version's distilled student (the student sampler's model), sharing the served model's VAE
        self.student: LatentDiffusion | None = None
        if student is not None:
            self.student = LatentDiffusion.load(checkpoints, student, self.device, self.dtype, share_vae=self.model)
        self.buckets: list[int] = []  # UNet row counts every call is padded to (compiled engines only)
        # what the chains evaluate in the engine's dtype: the served model's UNet, and the student's
        self.denoiser: nn.Module = self.model.unet
        self.student_denoiser: nn.Module | None = None if self.student is None else self.student.unet
        if compile_mode != "off":
            self.buckets = bucket_sizes(max_batch)

            def bucketed(unet: nn.Module) -> Bucketed:
                return Bucketed(compile_for_inference(unet, compile_mode, self.device, len(self.buckets)), self.buckets)

            self.denoiser = bucketed(self.denoiser)
            if self.student_denoiser is not None:
                self.student_denoiser = bucketed(self.student_denoiser)

    @property
    def version(self) -> str:
        return self.model.version

    def denoisers(self) -> list[tuple[nn.Module, bool]]:
        """``(denoiser, is the student's)`` of each loaded network: the served model's, then its student's."""
        return [(self.denoiser, False)] + ([] if self.student_denoiser is None else [(self.student_denoiser, True)])

    def student_info(self) -> StudentInfo | None:
        """The student as the model registry describes it, ``None`` without one."""
        if self.student is None:
            return None
        sampling = self.student.manifest.distillation.sampling
        low, high = sampling.guidance_range
        return StudentInfo(version=self.student.version, max_steps=sampling.max_steps,
                           default_steps=sampling.default_steps, guidance_range=(low, high))

    def served(self, sampler: str) -> tuple[LatentDiffusion, nn.Module]:
        """The model that runs ``sampler`` and what its chains evaluate: the student for the student sampler, the
        served model for the others. Raises :class:`NoStudent` for the student sampler without a student."""
        if sampler != STUDENT_SAMPLER:
            return self.model, self.denoiser
        if self.student is None or self.student_denoiser is None:
            raise NoStudent(f"model {self.version} has no distilled student in the worker's checkpoints: the "
                            f"{STUDENT_SAMPLER!r} sampler is not served")
        return self.student, self.student_denoiser

    @torch.no_grad()
    def warm_up(self, on_bucket: Callable[[int, float], None] | None = None) -> dict[int, float]:
        """Run each denoiser (the served model's, the student's) twice at every bucket size (the first compiles;
        with CUDA graphs the second records the graph); nothing without buckets. Returns ``{rows: seconds}`` and
        calls ``on_bucket(rows, seconds)`` after each bucket (e.g. to heartbeat)."""
        seconds: dict[int, float] = {}
        config = self.model.unet.config
        for rows in self.buckets:
            start = time.perf_counter()
            x = torch.zeros(rows, *self.model.latent_shape, device=self.device, dtype=self.dtype)
            t = torch.full((rows,), self.model.schedule.timesteps - 1, device=self.device)
            labels = torch.full((rows, config.num_attributes), float(config.null_label), device=self.device)
            for denoiser, student in self.denoisers():
                extra = {"guidance": torch.ones(rows, device=self.device)} if student else {}
                for _ in range(2):
                    denoiser(x, t, labels, **extra)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds[rows] = time.perf_counter() - start
            if on_bucket is not None:
                on_bucket(rows, seconds[rows])
        return seconds

    def fallback_dtypes(self) -> list[torch.dtype]:
        """The wider dtypes a non-finite row is redone in, in order: bf16 (fp32's range; where the device runs
        it) after fp16, then fp32."""
        wider = []
        if self.dtype == torch.float16 and (self.device.type != "cuda" or torch.cuda.is_bf16_supported()):
            wider.append(torch.bfloat16)
        if self.dtype != torch.float32:
            wider.append(torch.float32)
        return wider

    def _redo_non_finite(self, result: torch.Tensor, redo: Callable[[list[int], torch.dtype], torch.Tensor],
                         stage: str, stats: RunStats) -> torch.Tensor:
        """``result [n, ...]`` with its NaN/Inf rows replaced by ``redo(rows, dtype)`` in each wider dtype in turn.

        Raises :class:`NonFiniteOutput` when rows are still NaN/Inf in float32."""
        bad = non_finite_rows(result)
        for dtype in self.fallback_dtypes():
            if not bool(bad.any()):
                break
            rows = bad.nonzero().flatten().tolist()
            stats.precision_fallbacks[stage] += 1
            log.warning("%s gave NaN/Inf in %s for %d of %d rows; redoing them in %s", stage, self.dtype, len(rows),
                        len(bad), dtype)
            result[rows] = redo(rows, dtype).to(result.dtype)
            bad = non_finite_rows(result)
        if bool(bad.any()):
            raise NonFiniteOutput(f"the {stage} gave NaN/Inf for {int(bad.sum())} of {len(bad)} images even in "
                                  "float32; no image was produced")
        return result

    def decode(self, latents: torch.Tensor, stats: RunStats) -> torch.Tensor:
        """Scaled latents ``[N, C, h, w]`` -> ``uint8 [N, 3, H, W]``; pixels are checked for NaN/Inf before they
        are clamped, and non-finite rows decoded again in a wider dtype."""
        images = self.model.decode(latents, clamp=False)
        images = self._redo_non_finite(images, lambda rows, dtype: self.model.decode(latents[rows], dtype, clamp=False),
                                       "decoder", stats)
        return to_uint8(images.clamp(-1, 1))

    def run(self, requests: list[ImageRequest], sampler: str, steps: int, guidance_scale: float,
            progress: ProgressFn | None = None, previews: PreviewSink | None = None
            ) -> tuple[dict[str, RequestOutput], RunStats]:
        """Generate every request's images (and trajectory frames where asked); ``previews`` gets a preview of
        the first image of each request it asks for, when it asks.

        ``sampler``: a name of ``SAMPLERS``; the student sampler runs the student (:meth:`served`).

        Raises ``ValueError`` for an attribute the model does not know (:class:`NoStudent` for the student sampler
        without a student), :class:`OutOfMemory` when a single image does not fit, :class:`NonFiniteOutput` when even float32 gives NaN/Inf, and whatever ``progress``
        raises (e.g. to cancel).
        """
        self.served(sampler)  # refuses the student sampler without a student before any work
        # One row per image: (index of its request, index of the image within the request).
        rows = [(r, i) for r, request in enumerate(requests) for i in range(request.count)]
        request_labels = torch.stack([self.model.labels_for(request.attributes) for request in requests])
        chain = Chain(request_labels[[r for r, _ in rows]],
                      [(requests[r].seed, requests[r].first_index + i) for r, i in rows],
                      torch.tensor([requests[r].frames > 0 for r, _ in rows]), sampler, steps, guidance_scale,
                      sorted({i for request in requests for i in trajectory_indices(steps, request.frames)}))
        chunks = [list(range(start, min(start + self.max_batch, len(rows))))
                  for start in range(0, len(rows), self.max_batch)]
        total = steps * len(chunks)
        stats = RunStats(images=len(rows))
        images: list[torch.Tensor] = []
        noise_frames: list[torch.Tensor] = []  # decoded x_T of the rows that want frames, chunk by chunk
        step_frames: dict[int, list[torch.Tensor]] = {i: [] for i in chain.frame_steps}
        for number, chunk in enumerate(chunks):
            def on_step(i: int, x0: torch.Tensor, base: int = number * steps,
                        keys: tuple[str, ...] = tuple(requests[rows[k][0]].key for k in chunk)) -> None:
                if previews is not None and len(x0) == len(keys):  # not while a chunk is split for memory
                    self._preview(previews, base + i + 1, x0, keys)
                if progress is not None:
                    progress(base + i + 1, total)

            t0 = time.perf_counter()
            part = chain.part(chunk)
            latents, x0_at_step = self._sample_checked(part, on_step, stats)
            t1 = time.perf_counter()
            images.append(self.decode(latents, stats))
            if bool(part.wants_frames.any()):
                wanting = [s for s, w in zip(part.noise_streams, part.wants_frames.tolist(), strict=True) if w]
                noise_frames.append(self.decode(ImageNoise(wanting).draw(self.model.latent_shape), stats))
                for i in chain.frame_steps:
                    step_frames[i].append(self.decode(x0_at_step[i], stats))
            stats.chunks += 1
            stats.denoiser_steps += steps
            stats.sampling_s += t1 - t0
            stats.decoding_s += time.perf_counter() - t1
        return outputs_per_request(requests, rows, chain, torch.cat(images), noise_frames, step_frames), stats

    def edit(self, requests: list[EditRequest], steps: int, guidance_scale: float, strength: float,
             progress: ProgressFn | None = None) -> tuple[dict[str, RequestOutput], RunStats]:
        """Edit every request's face in one batch: VAE-encode it, invert it by DDIM through ``strength`` of the
        ``steps`` DDIM steps and regenerate it under its attributes with guidance
        (:meth:`~facegen.model.pipeline.LatentDiffusion.edit_latents`, the evaluation's path too). Each
        output's image is the edit, its ``source`` the input, its frames go from the input to the edit (the x0
        predictions of the regeneration). Progress counts inversion and regeneration steps; latent rows with NaN/Inf
        are redone in a wider dtype, as in :meth:`run`."""
        depth = inversion_depth(strength, steps)
        first, total = steps - depth, 2 * depth
        images = torch.stack([request.image for request in requests])
        targets = torch.stack([self.model.labels_for(request.attributes) for request in requests])
        frame_steps = {first + i for request in requests for i in trajectory_indices(depth, request.frames)}
        x0_at_step: dict[int, torch.Tensor] = {}

        def report(done: int) -> None:
            if progress is not None:
                progress(done, total)

        def on_step(i: int, x: torch.Tensor, x0: torch.Tensor) -> None:
            if i in frame_steps:
                x0_at_step[i] = x0
            report(depth + i - first + 1)

        def edit_rows(rows: list[int], unet: nn.Module, watch: bool) -> torch.Tensor:
            noise = ImageNoise([(requests[k].seed, 0) for k in rows], self.device)  # unused by DDIM with eta 0
            return self.model.edit_latents(self.model.encode(to_float(images[rows])), targets[rows], steps, depth,
                                           guidance_scale, noise,
                                           invert_callback=(lambda done, _: report(done)) if watch else None,
                                           callback=on_step if watch else None, unet=unet)

        stats = RunStats(images=len(requests), chunks=1, denoiser_steps=total)
        t0 = time.perf_counter()
        rows = list(range(len(requests)))
        edited = self._redo_non_finite(edit_rows(rows, self.denoiser, True), lambda redo, dtype: edit_rows(
            redo, self.model.in_dtype("unet", dtype), False), "unet", stats)
        t1 = time.perf_counter()
        edits = self.decode(edited, stats)
        frames = {i: self.decode(x0, stats) for i, x0 in x0_at_step.items()}
        stats.sampling_s, stats.decoding_s = t1 - t0, time.perf_counter() - t1
        outputs = {}
        for k, request in enumerate(requests):
            output = RequestOutput(edits[k:k + 1], source=images[k:k + 1])
            if request.frames > 0:
                path = [frames[first + i][k:k + 1] for i in trajectory_indices(depth, request.frames)]
                output.frames = [output.source, *(path or [output.images])]
            outputs[request.key] = output
        return outputs, stats

    def _preview(self, previews: PreviewSink, step: int, x0: torch.Tensor, keys: tuple[str, ...]) -> None:
        """Decode the x0 prediction ``x0 [n, C, h, w]`` (scaled latents; row ``k`` belongs to request
        ``keys[k]``) of the first row of each request ``previews`` wants now, shrunk to ``PREVIEW_SIDE``."""
        for key in previews.due() & set(keys):
            image = self.model.decode(x0[keys.index(key)][None])  # float32 [1, 3, H, W] in [-1, 1]
            if max(image.shape[-2:]) > PREVIEW_SIDE:
                scale = PREVIEW_SIDE / max(image.shape[-2:])
                image = nn.functional.interpolate(image, scale_factor=scale, mode="area")
            previews.put(step, key, to_uint8(image)[0].cpu())

    def _sample_checked(self, chain: Chain, on_step: Callable[[int, torch.Tensor], None], stats: RunStats
                        ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """:meth:`_sample` in the engine's dtype; latent rows with NaN/Inf (an overflow in the UNet) are sampled
        again alone in a wider dtype (no progress reported for the redo), their frames replaced too."""
        model, denoiser = self.served(chain.sampler)
        latents, x0_at_step = self._sample(chain, on_step, denoiser)
        frame_position = chain.frame_positions()

        def redo(rows: list[int], dtype: torch.dtype) -> torch.Tensor:
            redone, redone_frames = self._sample(chain.part(rows), lambda i, x0: None, model.in_dtype("unet", dtype))
            positions = [frame_position[k] for k in rows if chain.wants_frames[k]]
            for i, x0 in redone_frames.items():
                x0_at_step[i][positions] = x0.to(x0_at_step[i].dtype)
            return redone

        return self._redo_non_finite(latents, redo, "unet", stats), x0_at_step

    def _sample(self, chain: Chain, on_step: Callable[[int, torch.Tensor], None], unet: nn.Module
                ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """One chain over ``chain.labels [n, A]`` evaluated with ``unet`` (the network of the model that runs
        ``chain.sampler``, or a copy of it): final latents ``[n, C, h, w]`` and the
        x0 predictions at the ``frame_steps`` step indices for the rows in ``wants_frames`` (kept on the device: no
        copy inside the loop). On device OOM it empties the cache and runs the two halves separately (fresh noise
        streams give the same images)."""
        x0_at_step: dict[int, torch.Tensor] = {}
        keep = chain.wants_frames.nonzero().flatten().to(self.device)
        any_wanted = bool(chain.wants_frames.any())

        def callback(i: int, x: torch.Tensor, x0: torch.Tensor) -> None:
            if any_wanted and i in chain.frame_steps:
                x0_at_step[i] = x0.index_select(0, keep)
            on_step(i, x0)

        n = len(chain.noise_streams)
        try:
            model, _ = self.served(chain.sampler)
            latents = model.sample_latents(chain.labels, ImageNoise(chain.noise_streams, self.device), chain.sampler,
                                           chain.steps, chain.guidance, callback, unet)
            return latents, x0_at_step
        except torch.OutOfMemoryError:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if n == 1:
                raise OutOfMemory("out of device memory for a single image; lower the resolution or use a "
                                  "larger device") from None
            log.warning("out of device memory for %d images; splitting the batch", n)
        first = self._sample(chain.part(list(range(n // 2))), on_step, unet)
        second = self._sample(chain.part(list(range(n // 2, n))), on_step, unet)
        merged = {i: torch.cat([first[1][i], second[1][i]]) for i in first[1].keys() & second[1].keys()}
        merged |= {i: v for part in (first[1], second[1]) for i, v in part.items() if i not in merged}
        return torch.cat([first[0], second[0]]), merged


@dataclass(frozen=True)
class Chain:
    """The rows of one sampling chain and its settings."""

    labels: torch.Tensor  # float32 [n, A] (see LatentDiffusion.labels_for)
    noise_streams: list[tuple[int, int]]  # (seed, index) of each row
    wants_frames: torch.Tensor  # bool [n]: the row's request wants trajectory frames
    sampler: str
    steps: int
    guidance: float
    frame_steps: list[int]  # step indices whose x0 becomes a frame (any request's)

    def frame_positions(self) -> list[int]:
        """Row -> its index among the rows that want frames (meaningful for those rows only)."""
        return (torch.cumsum(self.wants_frames.long(), 0) - 1).tolist()

    def part(self, rows: list[int]) -> Chain:
        return Chain(self.labels[rows], [self.noise_streams[k] for k in rows], self.wants_frames[rows], self.sampler,
                     self.steps, self.guidance, self.frame_steps)


def outputs_per_request(requests: list[ImageRequest], rows: list[tuple[int, int]], chain: Chain,
                        images: torch.Tensor, noise_frames: list[torch.Tensor],
                        step_frames: dict[int, list[torch.Tensor]]) -> dict[str, RequestOutput]:
    """Each request's rows of ``images uint8 [rows, 3, H, W]`` and of the frames (decoded noise, then each frame
    step's x0, over the rows that want frames)."""
    frame_position = chain.frame_positions()
    all_noise = torch.cat(noise_frames) if noise_frames else None
    all_steps = {i: torch.cat(parts) for i, parts in step_frames.items()}
    outputs: dict[str, RequestOutput] = {}
    for r, request in enumerate(requests):
        request_rows = [k for k, (row_request, _) in enumerate(rows) if row_request == r]
        output = RequestOutput(images[request_rows])
        if request.frames > 0 and all_noise is not None:
            positions = [frame_position[k] for k in request_rows]
            output.frames = [all_noise[positions]] + [all_steps[i][positions]
                                                      for i in trajectory_indices(chain.steps, request.frames)]
        outputs[request.key] = output
    return outputs
