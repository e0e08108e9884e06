"""A loaded latent diffusion model: UNet + VAE decoder + schedule, rebuilt from checkpoint manifests alone.

This is the one sampling path: the worker's engine and the evaluation tool both call
:meth:`LatentDiffusion.sample_latents` and :meth:`LatentDiffusion.decode`. A distilled student (its manifest's
``distillation``) loads as a version of its own and samples with the student sampler only, one network row per step
with the guidance scale as its network's input; a plain version samples with every sampler but that one.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from facegen.model.networks.reader import LatentReader
from facegen.model.networks.unet import UNet
from facegen.model.networks.vae import VAE

from .checkpoints import READER_FILE, load_checkpoint, load_part
from .chroma import chroma_part, decoder_chroma_projector
from .config import (
    ATTRIBUTE_READ_SPAN,
    ATTRIBUTE_READ_TRIALS,
    EDIT_FOCUS_THRESHOLD,
    EDIT_FOCUS_TIME,
    EDIT_FOCUS_TRIALS,
    EDIT_HOLD_GUIDANCE,
    EDIT_REFERENCE,
    EDIT_REFERENCES,
    EDIT_REGIONS,
    EDIT_SCOPE,
    EDIT_SCOPES,
    SamplingConfig,
)
from .diffusion.guidance import distilled_guidance, guided, null_labels
from .diffusion.inversion import InversionCallback, ddim_invert
from .diffusion.noise import ImageNoise
from .diffusion.samplers import (
    STUDENT_SAMPLER,
    DDIMSampler,
    ModelFn,
    Sampler,
    StepCallback,
    StepConstraint,
    make_sampler,
    run_chain,
)
from .diffusion.schedule import NoiseSchedule
from .manifest import DiffusionManifest, VAEManifest
from .regions import edit_mask


@dataclass
class LatentDiffusion:
    unet: UNet
    vae: VAE
    schedule: NoiseSchedule
    sampling: SamplingConfig
    manifest: DiffusionManifest
    vae_manifest: VAEManifest
    device: torch.device
    dtype: torch.dtype  # compute dtype of the UNet and decoder weights
    reader: LatentReader | None = None  # float32; the version's latent attribute reader, when it has one
    # [C, C] on the device: the chroma part of a guidance difference, taken unguided (sampling.guide_chroma False)
    chroma_projector: torch.Tensor | None = None
    _copies: dict[tuple[str, torch.dtype], torch.nn.Module] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, checkpoints: str | Path, version: str = "latest", device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32, share_vae: LatentDiffusion | None = None) -> LatentDiffusion:
        """Verify and load a diffusion checkpoint and the VAE version its manifest names; ``share_vae``: a loaded
        model (on the same device, in the same dtype) whose VAE is that version, used instead of loading it again
        (a student decodes with its teacher's VAE)."""
        device = torch.device(device)
        diffusion = load_checkpoint(checkpoints, "diffusion", version)
        unet = UNet(diffusion.manifest.model)
        unet.load_state_dict(diffusion.state_dict)
        if share_vae is not None and share_vae.vae_manifest.version == diffusion.manifest.vae_version:
            vae, vae_manifest = share_vae.vae, share_vae.vae_manifest
        else:
            vae_checkpoint = load_checkpoint(checkpoints, "vae", diffusion.manifest.vae_version)
            vae, vae_manifest = VAE(vae_checkpoint.manifest.model), vae_checkpoint.manifest
            vae.load_state_dict(vae_checkpoint.state_dict)
        reader = None
        if diffusion.manifest.reader is not None:
            reader = LatentReader(diffusion.manifest.reader)
            reader.load_state_dict(load_part(diffusion, READER_FILE))
            reader = reader.to(device).eval().requires_grad_(False)
        projector = None
        if not diffusion.manifest.sampling.guide_chroma and diffusion.manifest.distillation is None:
            manifest = diffusion.manifest
            projector = decoder_chroma_projector(vae.decoder, manifest.latent_shape, manifest.latent_scale).to(device)
        return cls(unet.to(device, dtype).eval().requires_grad_(False),
                   vae.to(device, dtype).eval().requires_grad_(False),
                   NoiseSchedule(diffusion.manifest.schedule), diffusion.manifest.sampling,
                   diffusion.manifest, vae_manifest, device, dtype, reader, projector)

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def attributes(self) -> list[str]:
        return list(self.manifest.attributes)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.manifest.latent_shape

    @property
    def image_size(self) -> int:
        return self.manifest.image_size

    @property
    def is_student(self) -> bool:
        """A distilled student: it samples with ``STUDENT_SAMPLER`` only."""
        return self.manifest.distillation is not None

    def sampler(self, name: str) -> Sampler:
        """The sampler ``name`` set up for this version; raises ``ValueError`` for the student sampler on a plain
        version and for any other on a student (each runs the other's network wrongly)."""
        distillation = self.manifest.distillation
        if distillation is not None and name != STUDENT_SAMPLER:
            raise ValueError(f"version {self.version} is a distilled student: it samples with the {STUDENT_SAMPLER!r}"
                             f" sampler only, not {name!r}")
        if distillation is None and name == STUDENT_SAMPLER:
            raise ValueError(f"the {STUDENT_SAMPLER!r} sampler runs a distilled student's network; version "
                             f"{self.version} is a plain model")
        return make_sampler(name, self.schedule, self.manifest.latent_clip, self.sampling.ddim_eta,
                            distillation.sampling if distillation is not None else None)

    def labels_for(self, attributes: Mapping[str, float]) -> torch.Tensor:
        """``float32 [A]``: each given attribute's value (1/0 for True/False; a value in between blends the two,
        see :class:`~facegen.model.networks.unet.AttributeEmbedding`), the null label for the model's others.

        Raises ``ValueError`` naming the valid attributes when one is unknown."""
        unknown = sorted(set(attributes) - set(self.attributes))
        if unknown:
            raise ValueError(f"unknown attribute(s) {unknown}; this model knows {self.attributes}")
        null = self.unet.config.null_label
        return torch.tensor([float(attributes.get(name, null)) for name in self.attributes])

    def in_dtype(self, part: str, dtype: torch.dtype) -> torch.nn.Module:
        """The ``"unet"`` or the ``"decoder"`` with weights in ``dtype``: the loaded module in the model's dtype,
        else a copy made once and cached (the precision fallback)."""
        module = self.unet if part == "unet" else self.vae.decoder
        if dtype == self.dtype:
            return module
        if (part, dtype) not in self._copies:
            self._copies[(part, dtype)] = copy.deepcopy(module).to(dtype)
        return self._copies[(part, dtype)]

    @torch.no_grad()
    def sample_latents(self, labels: torch.Tensor, noise: ImageNoise, sampler: str, steps: int,
                       guidance_scale: float, callback: StepCallback | None = None,
                       unet: torch.nn.Module | None = None,
                       start: tuple[int, torch.Tensor] | None = None,
                       reference: torch.Tensor | None = None,
                       constraint: StepConstraint | None = None) -> torch.Tensor:
        """Scaled latents ``[N, C, h, w]`` (float32) for ``labels [N, A]``; row ``k`` draws its noise from stream ``k``.
        ``sampler``: a name of ``SAMPLERS`` this version samples with (:meth:`sampler`); a student evaluates its
        network once per step and image with ``guidance_scale`` as its input (``distilled_guidance``).
        ``start = (i, x)``: continue from the latents ``x`` at step ``i`` (see ``run_chain``) instead of from noise.
        ``reference [N, A]``: the labels guidance pushes away from (default: the null labels, see ``guided``; a
        student's is always the null labels).
        ``constraint``: replaces the latents after each step (``run_chain``; single-step samplers only).

        ``unet``: the network to evaluate (default: the loaded UNet; e.g. a compiled one, or a copy in another
        dtype, whose inputs are cast to its weights' dtype). A row whose denoiser output was NaN/Inf at any step
        comes back all NaN, so the samplers' x0 clamp cannot turn an overflow into finite junk; the check stays on
        the device (no host sync per step)."""
        unet = self.unet if unet is None else unet
        dtype = next(unet.parameters()).dtype
        chosen = self.sampler(sampler)
        guided_unet = self._guided(unet, labels.to(self.device), guidance_scale,
                                   None if reference is None else reference.to(self.device), chosen)
        finite = torch.ones(labels.shape[0], dtype=torch.bool, device=self.device)

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            output = guided_unet(x.to(dtype), t)
            finite.logical_and_(torch.isfinite(output).flatten(1).all(1))
            return output

        latents = run_chain(model_fn, chosen, steps, noise, self.latent_shape, callback, start, constraint)
        return torch.where(finite.view(-1, 1, 1, 1), latents, torch.nan)

    def _guided(self, unet: torch.nn.Module, labels: torch.Tensor, guidance_scale: float,
                reference: torch.Tensor | None, sampler: Sampler) -> ModelFn:
        """The model function of ``unet`` (this version's network) under ``labels [N, A]`` at ``guidance_scale``
        for the chains of ``sampler`` (a jump student's network takes where each of its steps lands)."""
        null = self.unet.config.null_label
        distillation = self.manifest.distillation
        if distillation is None:
            return guided(unet, labels, guidance_scale, null, reference, self.chroma_projector)
        if reference is not None:
            raise ValueError(f"version {self.version} is a distilled student: it guides against the null labels only")
        landing = sampler.landing_timesteps if distillation.sampling.jumps else None
        return distilled_guidance(unet, labels, guidance_scale, null, distillation.sampling.guidance_range, landing)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[N, 3, H, W]`` in [-1, 1] -> scaled latents ``float32 [N, C, h, w]``: the VAE posterior's mean
        times the latent scale (what :meth:`decode` and the denoiser take)."""
        mean = self.vae.encode(images.to(self.device, self.dtype))[0].float()
        return mean * self.manifest.latent_scale

    @torch.no_grad()
    def invert_latents(self, latents: torch.Tensor, labels: torch.Tensor, steps: int, depth: int,
                       callback: InversionCallback | None = None,
                       unet: torch.nn.Module | None = None) -> torch.Tensor:
        """DDIM inversion (``facegen.model.diffusion.inversion``) of scaled latents ``[N, C, h, w]`` under ``labels
        [N, A]`` (unguided; the null label = unconditional) through ``depth`` of ``steps`` DDIM steps: the latents
        (float32) from which ``sample_latents(..., "ddim", steps, ..., start=(steps - depth, x))`` regenerates."""
        unet = self.unet if unet is None else unet
        dtype = next(unet.parameters()).dtype
        labels = labels.to(self.device)
        sampler = DDIMSampler(self.schedule, self.manifest.latent_clip)
        sampler.set_timesteps(steps)
        return ddim_invert(lambda x, t: unet(x.to(dtype), t, labels), sampler, latents.to(self.device).float(),
                           depth, callback)

    @torch.no_grad()
    def read_open_attributes(self, latents: torch.Tensor, labels: torch.Tensor, unet: torch.nn.Module | None = None,
                             trials: int = ATTRIBUTE_READ_TRIALS) -> torch.Tensor:
        """``labels [N, A]`` with each open (null) entry set to what the model reads in the scaled latents ``[N, C, h,
        w]``: 0 or 1, whichever value the model denoises them better under (mean squared error of its prediction over
        ``trials`` fixed pairs of timestep, spread over ``ATTRIBUTE_READ_SPAN``, and noise, the same for both values):
        the diffusion model as its own classifier. Each open attribute is read with the given ones set and the other
        open ones null; given entries come back unchanged. 2 x ``trials`` network rows per row and open attribute."""
        null = self.unet.config.null_label
        labels = labels.to(self.device)
        open_columns = [a for a in range(labels.shape[1]) if (labels[:, a] == null).any()]
        if not open_columns:
            return labels
        unet = self.unet if unet is None else unet
        dtype = next(unet.parameters()).dtype
        n, last = len(latents), self.schedule.timesteps - 1
        t = torch.linspace(ATTRIBUTE_READ_SPAN[0] * last, ATTRIBUTE_READ_SPAN[1] * last, trials).round().long()
        x0, t, noise, x_t = self.fixed_noisings(latents, t)
        target = self.schedule.target(x0, noise, t)
        read = labels.clone()
        for a in open_columns:
            errors = []
            for value in (0.0, 1.0):
                trial = labels.clone()
                trial[:, a] = torch.where(labels[:, a] == null, value, labels[:, a])
                output = unet(x_t.to(dtype), t, trial.repeat_interleave(trials, 0)).float()
                errors.append((output - target).square().flatten(1).mean(1).view(n, trials).mean(1))
            read[:, a] = torch.where(labels[:, a] == null, (errors[1] < errors[0]).float(), labels[:, a])
        return read

    def fixed_noisings(self, latents: torch.Tensor, timesteps: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each row of scaled latents ``[N, C, h, w]`` noised at each of ``timesteps int64 [K]`` with the K fixed
        noises of seed 0 (the same for every row, so a row's result does not depend on its batch): ``(x0, t, noise,
        x_t)``, each ``N * K`` long, row-major (the K noisings of row 0 first), float32 on the model's device."""
        trials, n = len(timesteps), len(latents)
        noise = torch.randn((trials, *latents.shape[1:]), generator=torch.Generator().manual_seed(0)).to(self.device)
        x0 = latents.to(self.device).float().repeat_interleave(trials, 0)
        t, noise = timesteps.to(self.device).repeat(n), noise.repeat(n, 1, 1, 1)
        return x0, t, noise, self.schedule.q_sample(x0, t, noise)

    @torch.no_grad()
    def focus_mask(self, latents: torch.Tensor, sources: torch.Tensor, targets: torch.Tensor,
                   threshold: float = EDIT_FOCUS_THRESHOLD, unet: torch.nn.Module | None = None,
                   trials: int = EDIT_FOCUS_TRIALS) -> torch.Tensor:
        """Where the model itself says an edit from ``sources`` to ``targets`` (labels ``[N, A]``) changes scaled
        latents ``[N, C, h, w]`` (DiffEdit's mask, Couairon et al. 2022): the network's outputs under the two labels
        at ``trials`` fixed noises at ``EDIT_FOCUS_TIME`` of the schedule (the same for every row, so a row's mask
        does not depend on its batch), their absolute difference summed over channels and averaged over the noises,
        divided by each face's largest -> ``float32 [N, 1, h, w]`` in [0, 1]: 1 where it reaches ``threshold``,
        fading linearly to 0 at half of it, then grown by one latent cell (3x3 max) so a feature's edge stays in."""
        unet = self.unet if unet is None else unet
        dtype = next(unet.parameters()).dtype
        n = len(latents)
        timestep = round(EDIT_FOCUS_TIME * (self.schedule.timesteps - 1))
        _, t, _, x_t = self.fixed_noisings(latents, torch.full((trials,), timestep))
        x_t = x_t.to(dtype)
        outputs = [unet(x_t, t, labels.to(self.device).repeat_interleave(trials, 0)).float()
                   for labels in (sources, targets)]
        difference = (outputs[1] - outputs[0]).abs().sum(1, keepdim=True).view(n, trials, 1, *latents.shape[2:])
        difference = difference.mean(1)
        share = difference / difference.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
        focus = ((share - threshold / 2) / (threshold / 2)).clamp(0, 1)
        return F.max_pool2d(focus, 3, stride=1, padding=1)

    def source_labels(self, targets: torch.Tensor) -> torch.Tensor:
        """An edit's targets ``[N, A]`` -> the labels it starts from: each given value flipped (``1 - v``; an edit to
        *smiling* starts from *not smiling*), the null label kept where the target leaves an attribute open."""
        null = self.unet.config.null_label
        return torch.where(targets == null, targets, 1 - targets)

    @torch.no_grad()
    def edit_latents(self, latents: torch.Tensor, targets: torch.Tensor, steps: int, depth: int,
                     guidance_scale: float, noise: ImageNoise, reference: str = EDIT_REFERENCE,
                     scope: str = EDIT_SCOPE, invert_callback: InversionCallback | None = None,
                     callback: StepCallback | None = None, unet: torch.nn.Module | None = None,
                     hold_guidance: float = EDIT_HOLD_GUIDANCE,
                     focus_threshold: float = EDIT_FOCUS_THRESHOLD) -> torch.Tensor:
        """Edit scaled latents ``[N, C, h, w]`` toward ``targets [N, A]``: DDIM inversion through ``depth`` of
        ``steps`` steps, then DDIM regeneration with guidance from that depth; float32 latents ``[N, C, h, w]``.

        ``reference`` (one of ``EDIT_REFERENCES``) is the condition the inversion runs under and guidance pushes
        away from: ``"source"`` (:meth:`source_labels`: guidance moves along the source-to-target difference only)
        or ``"null"`` (the unconditional model). Attributes the targets leave open are held at the input's values
        (:meth:`read_open_attributes`, read under the source labels) in both.

        ``scope`` (one of ``EDIT_SCOPES``): with ``"region"``, after each regeneration step the latents (and the x0
        prediction ``callback`` sees) outside the region of the attributes the targets set
        (:func:`~facegen.model.regions.edit_mask`) are put back on the input's inversion path, so the rest of the face
        stays the input's; ``"focused"`` does the same with that region narrowed to :meth:`focus_mask` (at
        ``focus_threshold``); ``"image"`` lets everything change. ``noise``: per-row streams, drawn only by a DDIM
        with eta > 0. ``hold_guidance``: the step size of :meth:`hold_step` (used when the version has a reader)."""
        if reference not in EDIT_REFERENCES:
            raise ValueError(f"edit reference must be one of {EDIT_REFERENCES}, got {reference!r}")
        if scope not in EDIT_SCOPES:
            raise ValueError(f"edit scope must be one of {EDIT_SCOPES}, got {scope!r}")
        null = self.unet.config.null_label
        edited, latents = targets.to(self.device), latents.to(self.device).float()
        sources = self.read_open_attributes(latents, self.source_labels(edited), unet)
        targets = torch.where(edited == null, sources, edited)  # open ones held as read
        references = sources if reference == "source" else null_labels(targets, null)
        path = {steps: latents}  # level -> the input's latents there (level ``steps`` is clean)

        def record(done: int, x: torch.Tensor) -> None:
            path[steps - done] = x
            if invert_callback is not None:
                invert_callback(done, x)

        inverted = self.invert_latents(latents, references, steps, depth, record, unet)
        region = scope != "image"
        mask = edit_mask(edited, self.attributes, null, EDIT_REGIONS if region else {}, tuple(self.latent_shape[1:]))
        if scope == "focused":
            mask = mask * self.focus_mask(latents, sources, targets, focus_threshold, unet)
        hold = self.reader is not None and hold_guidance > 0
        constraint = None
        if region or hold:
            held = self.held_readings(latents, edited) if hold else None  # (readings, which to hold)
            step_size = hold_guidance * mask
            ddim = DDIMSampler(self.schedule, self.manifest.latent_clip)  # the regeneration's timesteps
            ddim.set_timesteps(steps)

            def constraint(i: int, x: torch.Tensor, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                if region:
                    x, x0 = torch.lerp(path[i + 1], x, mask), torch.lerp(latents, x0, mask)
                if held is not None:
                    x, x0 = self.hold_step(x, x0, *held, step_size, ddim.abar_at(i + 1))
                return x, x0

        return self.sample_latents(targets, noise, "ddim", steps, guidance_scale, callback, unet,
                                   start=(steps - depth, inverted), reference=references, constraint=constraint)

    @torch.no_grad()
    def held_readings(self, latents: torch.Tensor, edited: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What an edit toward ``edited [N, A]`` holds: the reader's readings ``[N, R]`` (0/1) of the input's scaled
        latents ``[N, C, h, w]``, and which of them to hold, ``[N, R]`` (1 for each reader attribute the row does
        not set)."""
        assert self.reader is not None
        null = self.unet.config.null_label
        readings = (self.reader(latents.float()) > 0).float()
        columns = torch.ones_like(readings)
        for k, name in enumerate(self.reader.config.attributes):
            if name in self.attributes:
                columns[:, k] = (edited[:, self.attributes.index(name)] == null).float()
        return readings, columns

    def hold_step(self, x: torch.Tensor, x0: torch.Tensor, held: torch.Tensor, columns: torch.Tensor,
                  step_size: torch.Tensor, abar_next: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of reader guidance after a DDIM step: the x0 prediction ``[N, C, h, w]`` moves by ``-step_size *
        grad`` of the reader's summed binary cross-entropy against ``held [N, R]`` (over the ``columns [N, R]``
        held), and the latents ``x``, now at the timestep whose ``abar`` is ``abar_next`` (1 after the last step),
        by ``sqrt(abar_next)`` times that, so that they keep the DDIM relation ``x = sqrt(abar) x0 + sqrt(1 - abar)
        eps`` with the same ``eps``. ``step_size``: ``[N or 1, 1, h, w]`` (the region's mask times the scale)."""
        assert self.reader is not None
        with torch.enable_grad():
            probe = x0.detach().float().requires_grad_(True)
            loss = (F.binary_cross_entropy_with_logits(self.reader(probe), held, reduction="none") * columns).sum()
            (gradient,) = torch.autograd.grad(loss, probe)
        if self.chroma_projector is not None:  # the hold, as guidance, leaves colour to the conditional prediction
            gradient = gradient - chroma_part(self.chroma_projector, gradient)
        shift = -step_size * gradient
        return x + math.sqrt(abar_next) * shift, x0 + shift

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, dtype: torch.dtype | None = None, clamp: bool = True) -> torch.Tensor:
        """Scaled latents ``[N, C, h, w]`` -> images ``float32 [N, 3, H, W]``, in [-1, 1] with ``clamp``, else the
        decoder's raw output (which may hold NaN/Inf: check before clamping). Un-scales first: the decoder was
        trained on raw VAE latents. ``dtype``: the decoder's weights' dtype (default: the model's)."""
        dtype = dtype or self.dtype
        images = self.in_dtype("decoder", dtype)((latents / self.manifest.latent_scale).to(self.device, dtype)).float()
        return images.clamp(-1, 1) if clamp else images
