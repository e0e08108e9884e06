"""Guidance that leaves colour to the conditional prediction (facegen/model/chroma.py): the decoder's colour
Jacobian, the projection that splits a latent change into its chroma part and the rest, and the guided output."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from facegen.model.chroma import YCBCR, chroma_projector, colour_jacobian
from facegen.model.diffusion.guidance import guided
from facegen.model.diffusion.noise import ImageNoise
from facegen.model.pipeline import LatentDiffusion

CHANNELS = 4


def linear_decoder(weight: torch.Tensor) -> nn.Module:
    """A decoder whose every latent position decodes to the 4x4 pixels ``weight [3, C] @ latent``."""
    conv = nn.Conv2d(weight.shape[1], 3, 1, bias=True)
    with torch.no_grad():
        conv.weight.copy_(weight[:, :, None, None])
        conv.bias.fill_(0.25)
    return nn.Sequential(conv, nn.Upsample(scale_factor=4)).requires_grad_(False)


def test_the_colour_jacobian_of_a_linear_decoder_is_its_colour_map() -> None:
    weight = torch.randn(3, CHANNELS, generator=torch.Generator().manual_seed(1))
    jacobian = colour_jacobian(linear_decoder(weight), (CHANNELS, 4, 4), latent_scale=2.0)
    assert torch.allclose(jacobian, YCBCR @ weight / 2.0, atol=1e-5)


def test_the_chroma_projection_splits_a_change_into_its_chroma_and_its_luminance() -> None:
    generator = torch.Generator().manual_seed(2)
    jacobian = torch.randn(3, CHANNELS, generator=generator)
    projector = chroma_projector(jacobian)
    change = torch.randn(CHANNELS, 10, generator=generator)
    colour = projector @ change
    assert torch.allclose(projector @ projector, projector, atol=1e-5)  # a projection
    assert torch.allclose(jacobian @ colour, torch.cat([torch.zeros(1, 10), (jacobian @ change)[1:]]), atol=1e-5)
    assert torch.allclose((jacobian @ (change - colour))[1:], torch.zeros(2, 10), atol=1e-5)
    assert torch.allclose((jacobian @ (change - colour))[0], (jacobian @ change)[0], atol=1e-5)


def test_guidance_with_the_projector_extrapolates_luminance_and_keeps_the_conditional_chroma() -> None:
    generator = torch.Generator().manual_seed(3)
    jacobian = torch.randn(3, CHANNELS, generator=generator)
    outputs = {0.0: torch.randn(1, CHANNELS, 2, 2, generator=generator),  # the reference (null label 0)
               1.0: torch.randn(1, CHANNELS, 2, 2, generator=generator)}  # the condition
    denoiser = lambda x, t, labels: torch.cat([outputs[float(v)] for v in labels[:, 0]])  # noqa: E731
    x, t, labels = torch.zeros(1, CHANNELS, 2, 2), torch.zeros(1, dtype=torch.long), torch.ones(1, 1)
    scale = 3.0
    out = guided(denoiser, labels, scale, null_label=0, chroma_projector=chroma_projector(jacobian))(x, t)
    plain = guided(denoiser, labels, scale, null_label=0)(x, t)
    colour_of = lambda latents: torch.einsum("kc,nchw->nkhw", jacobian, latents)  # noqa: E731
    difference = colour_of(outputs[1.0] - outputs[0.0])
    assert torch.allclose(colour_of(out - outputs[0.0])[:, 0], scale * difference[:, 0], atol=1e-5)
    assert torch.allclose(colour_of(out - outputs[0.0])[:, 1:], difference[:, 1:], atol=1e-5)
    assert torch.allclose(colour_of(plain - outputs[0.0]), scale * difference, atol=1e-5)


def test_a_version_retuned_to_leave_chroma_unguided_samples_with_the_projector(tiny_checkpoints: Path,
                                                                              tmp_path: Path) -> None:
    """``retune --guide-chroma false``: the version loads with its decoder's chroma projector; at guidance 1 it draws
    the plain version's latents, above 1 others."""
    from training.__main__ import main

    root = tmp_path / "checkpoints"
    shutil.copytree(tiny_checkpoints, root)
    plain = LatentDiffusion.load(root)
    assert plain.chroma_projector is None
    assert main(["retune", "--checkpoints", str(root), "--guide-chroma", "false"]) == 0
    unguided_chroma = LatentDiffusion.load(root)
    assert unguided_chroma.version != plain.version and not unguided_chroma.sampling.guide_chroma
    assert unguided_chroma.chroma_projector is not None and unguided_chroma.chroma_projector.shape == (
        plain.latent_shape[0], plain.latent_shape[0])
    labels = plain.labels_for({plain.attributes[0]: True}).expand(2, -1)

    def draw(model: LatentDiffusion, scale: float) -> torch.Tensor:
        return model.sample_latents(labels, ImageNoise([(5, 0), (5, 1)], model.device), "ddim", 4, scale)

    assert torch.equal(draw(unguided_chroma, 1.0), draw(plain, 1.0))
    assert not torch.allclose(draw(unguided_chroma, 3.0), draw(plain, 3.0), atol=1e-4)
