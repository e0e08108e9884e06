"""``python -m training reader``: give a diffusion version a latent attribute reader.

The reader (``facegen.model.networks.reader``) learns the attributes of the train split from their latents, sampled as the
diffusion trainer samples them (``z = scale * (mean + exp(logvar / 2) * eps)``, mirror images included) plus
Gaussian noise, with a binary cross-entropy per attribute. The result is a new diffusion version: the source's
weights bit for bit (so it samples exactly as before), with ``reader.safetensors`` and the reader's accuracy on the
validation split in its manifest. Edits then hold the attributes they leave open by the reader's gradient
(``LatentDiffusion.hold_step``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from facegen.model.checkpoints import READER_FILE, derive_checkpoint, read_manifest, resolve_version
from facegen.model.config import DataConfig, ReaderConfig, ReaderTrainConfig
from facegen.model.device import pick_device
from facegen.model.imaging import to_float
from facegen.model.networks.reader import LatentReader
from training.data.celeba import fingerprint, load_split
from training.stats import rate

from .train_diffusion import load_vae, sample_posterior, training_latents
from .trainer import RunOptions


def train_reader(version: str, attributes: tuple[str, ...] | None, cfg: ReaderTrainConfig, opts: RunOptions) -> Path:
    """Train a reader of ``attributes`` (default: the version's own) on the latents of ``version``'s VAE and write
    the derived version; returns its folder."""
    device = pick_device(opts.device)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    manifest = read_manifest(resolve_version(opts.checkpoints, "diffusion", version))  # derive_checkpoint loads weights
    vae, vae_manifest = load_vae(opts.checkpoints, manifest.vae_version, device)
    data_cfg = dataclasses.replace(manifest.data, attributes=attributes or manifest.data.attributes)
    means, logvars, labels = training_latents(vae, vae_manifest.version, fingerprint(opts.data), data_cfg, opts,
                                              device, show_progress=True)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    reader = LatentReader(ReaderConfig(attributes=data_cfg.attributes, in_channels=means.shape[1])).to(device)
    optimizer = torch.optim.AdamW(reader.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=max(cfg.steps, 1))
    reader.train()
    for _ in tqdm(range(cfg.steps), desc="reader", mininterval=10):
        index = torch.randint(0, len(means), (cfg.batch_size,), generator=generator)
        z = manifest.latent_scale * sample_posterior(means[index], logvars[index], generator)
        z = z + cfg.latent_noise * torch.randn(z.shape, generator=generator)
        loss = F.binary_cross_entropy_with_logits(reader(z.to(device)), labels[index].float().to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    reader.eval()
    accuracy = validation_accuracy(reader, vae, manifest.latent_scale, opts, data_cfg, device)
    print({name: round(entry["rate"], 4) for name, entry in accuracy.items()}, flush=True)
    return derive_checkpoint(opts.checkpoints, "diffusion", manifest.version, parts={READER_FILE: reader.state_dict()},
                             reader=reader.config, metrics={**manifest.metrics, "reader_val_accuracy": accuracy})


@torch.no_grad()
def validation_accuracy(reader: LatentReader, vae: torch.nn.Module, latent_scale: float, opts: RunOptions,
                        data_cfg: DataConfig, device: torch.device) -> dict[str, dict[str, Any]]:
    """The reader's accuracy per attribute (with 95% Wilson intervals) on the validation split's posterior means."""
    images, labels = load_split(opts.data, "val", data_cfg, limit=opts.limit)
    logits = torch.cat([reader(latent_scale * vae.encode(to_float(chunk).to(device))[0]).cpu()
                        for chunk in images.split(256)])
    return {name: rate((logits[:, k] > 0).long() == labels[:, k]) for k, name in enumerate(data_cfg.attributes)}
