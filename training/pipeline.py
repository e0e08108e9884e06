"""A loaded latent diffusion model: UNet + VAE decoder + schedule, rebuilt from checkpoint manifests alone.

This is the one sampling path: the worker's engine and the evaluation tool both call
:meth:`LatentDiffusion.sample_latents` and :meth:`LatentDiffusion.decode`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoints import load_checkpoint
from .config import SamplingConfig
from .diffusion.guidance import guided
from .diffusion.noise import ImageNoise
from .diffusion.samplers import StepCallback, make_sampler, run_chain
from .diffusion.schedule import NoiseSchedule
from .manifest import DiffusionManifest, VAEManifest
from .models.unet import UNet
from .models.vae import VAE


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
    _decoders: dict[torch.dtype, torch.nn.Module] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, checkpoints: str | Path, version: str = "latest", device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> LatentDiffusion:
        """Verify and load a diffusion checkpoint and the VAE version its manifest names."""
        device = torch.device(device)
        diffusion = load_checkpoint(checkpoints, "diffusion", version)
        vae_checkpoint = load_checkpoint(checkpoints, "vae", diffusion.manifest.vae_version)
        unet = UNet(diffusion.manifest.model)
        unet.load_state_dict(diffusion.state_dict)
        vae = VAE(vae_checkpoint.manifest.model)
        vae.load_state_dict(vae_checkpoint.state_dict)
        return cls(unet.to(device, dtype).eval().requires_grad_(False),
                   vae.to(device, dtype).eval().requires_grad_(False),
                   NoiseSchedule(diffusion.manifest.schedule), diffusion.manifest.sampling,
                   diffusion.manifest, vae_checkpoint.manifest, device, dtype)

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

    def labels_for(self, attributes: dict[str, bool]) -> torch.Tensor:
        """``int64 [A]``: 1/0 for each given attribute, the null label for the model's others.

        Raises ``ValueError`` naming the valid attributes when one is unknown."""
        unknown = sorted(set(attributes) - set(self.attributes))
        if unknown:
            raise ValueError(f"unknown attribute(s) {unknown}; this model knows {self.attributes}")
        null = self.unet.config.null_label
        return torch.tensor([int(attributes[name]) if name in attributes else null for name in self.attributes])

    @torch.no_grad()
    def sample_latents(self, labels: torch.Tensor, noise: ImageNoise, sampler: str, steps: int,
                       guidance_scale: float, callback: StepCallback | None = None) -> torch.Tensor:
        """Scaled latents ``[N, C, h, w]`` (float32) for ``labels [N, A]``; row ``k`` draws its noise from stream ``k``."""
        chosen = make_sampler(sampler, self.schedule, self.manifest.latent_clip, self.sampling.ddim_eta)
        guided_unet = guided(self.unet, labels.to(self.device), guidance_scale, self.unet.config.null_label)

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return guided_unet(x.to(self.dtype), t)

        return run_chain(model_fn, chosen, steps, noise, self.latent_shape, callback)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Scaled latents ``[N, C, h, w]`` -> images ``float32 [N, 3, H, W]`` in [-1, 1] (un-scaling first: the
        decoder was trained on raw VAE latents). ``dtype`` other than the model's uses a cached copy of the
        decoder in that dtype (the precision fallback)."""
        dtype = dtype or self.dtype
        if dtype == self.dtype:
            decoder = self.vae.decoder
        else:
            if dtype not in self._decoders:
                self._decoders[dtype] = copy.deepcopy(self.vae.decoder).to(dtype)
            decoder = self._decoders[dtype]
        images = decoder((latents / self.manifest.latent_scale).to(self.device, dtype)).float()
        return images.clamp(-1, 1)
