"""Which part of a latent change colours the decoded image: the decoder's colour Jacobian and the projection that
splits a latent change into what changes chroma and what does not.

Classifier-free guidance extrapolates ``ref + w (cond - ref)``; where the two predictions differ in colour (a
smile's near-white teeth against a closed mouth's red), the extrapolation leaves every colour a real face has
(lavender or cyan teeth). The decoder maps a change ``d [C]`` of one latent position to a change of the luminance
and chroma (BT.601 Y, Cb, Cr) of the pixels it decodes to that is close to linear, ``J d``, and the same ``J [3, C]``
holds across positions and faces (its rows agree with each position's own to a cosine of 0.98 at the median on
generated faces). :func:`chroma_projector` then gives the part of a guidance difference that carries its chroma, so
that guidance can extrapolate the rest (shape, light and dark) and leave colour to the conditional prediction.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

# RGB -> (Y, Cb, Cr), ITU-R BT.601, for RGB in any linear range
YCBCR = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
JACOBIAN_LATENTS = 8  # standard-normal latents the Jacobian is averaged over
JACOBIAN_SEED = 0


def colour_jacobian(decoder: nn.Module, latent_shape: tuple[int, int, int], latent_scale: float) -> torch.Tensor:
    """``float32 [3, C]`` on the CPU: the mean change of the decoded image's (Y, Cb, Cr) per pixel (decoder output
    in [-1, 1]) over the pixels one latent position decodes to, per unit change of each scaled latent channel at
    that position; averaged over positions and ``JACOBIAN_LATENTS`` standard-normal scaled latents drawn from
    ``JACOBIAN_SEED``. ``decoder``: float32, takes raw latents (scaled latents / ``latent_scale``)."""
    device = next(decoder.parameters()).device
    generator = torch.Generator().manual_seed(JACOBIAN_SEED)
    latents = torch.randn(JACOBIAN_LATENTS, *latent_shape, generator=generator).to(device).requires_grad_(True)
    with torch.enable_grad():
        images = decoder(latents / latent_scale).float()
        colour = torch.einsum("kc,nchw->nkhw", YCBCR.to(device), images).sum((0, 2, 3))  # [3]
        rows = [torch.autograd.grad(colour[k], latents, retain_graph=k < 2)[0].sum((0, 2, 3)) for k in range(3)]
    pixels_per_position = images[0, 0].numel() / (latent_shape[1] * latent_shape[2])
    return torch.stack(rows).cpu() / (latents[:, 0].numel() * pixels_per_position)


def chroma_projector(jacobian: torch.Tensor) -> torch.Tensor:
    """``float32 [C, C]`` from a colour Jacobian ``[3, C]`` (:func:`colour_jacobian`): the projection ``P`` with
    ``J P d = (0, Cb(d), Cr(d))`` for any latent change ``d [C]``: ``P d`` changes chroma as ``d`` does and
    luminance not at all, ``d - P d`` changes luminance as ``d`` does and chroma not at all (the least change of
    ``d`` in norm that removes its chroma while keeping its luminance)."""
    keep_chroma = torch.diag(torch.tensor([0.0, 1.0, 1.0]))
    jacobian = jacobian.double()
    return (jacobian.T @ torch.linalg.inv(jacobian @ jacobian.T) @ keep_chroma.double() @ jacobian).float()


def chroma_part(projector: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
    """``P d`` at every position: the part of latent changes ``change [N, C, ...]`` that changes the decoded chroma
    (``projector [C, C]``, :func:`chroma_projector`), in ``change``'s dtype and shape."""
    return torch.einsum("dc,nc...->nd...", projector.to(change.dtype), change)


def decoder_chroma_projector(decoder: nn.Module, latent_shape: tuple[int, int, int], latent_scale: float
                             ) -> torch.Tensor:
    """``float32 [C, C]`` on ``decoder``'s device: :func:`chroma_projector` of a float32 copy of ``decoder`` (any
    dtype; it takes raw latents) for scaled latents of ``latent_shape``."""
    decoder = copy.deepcopy(decoder).float().requires_grad_(False)
    return chroma_projector(colour_jacobian(decoder, latent_shape, latent_scale)).to(next(decoder.parameters()).device)
