"""Train the class-conditional latent diffusion UNet on a VAE checkpoint's latents; write a ``diffusion``
checkpoint version whose manifest names its parent VAE and the measured latent scale and range.

Latents are encoded once (posterior mean and log-variance of each training image and of its mirror image) and
sampled every step: ``z = scale * (mean + exp(logvar / 2) * eps)``, with ``scale = 1 / std(z)`` measured here.
The loss is ``w(t) || unet(x_t, t, labels) - target ||^2`` (target per the schedule's prediction type, ``w`` the
Min-SNR-gamma weight), labels replaced by the null label with probability ``label_dropout`` (classifier-free
guidance) and, each attribute alone, ``attribute_dropout``. ``--init-from`` warm-starts from an exported diffusion
version (its UNet and schedule, its EMA weights), also on the latents of a newer VAE or with more attributes than
the parent knew (see ``grown_attribute_table``: labels leaving them open start as the parent's), and records the
lineage.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from facegen.model.checkpoints import load_checkpoint, save_checkpoint, warm_start
from facegen.model.config import DataConfig, DiffusionTrainConfig, SamplingConfig, ScheduleConfig, UNetConfig
from facegen.model.device import DTYPES, autocast
from facegen.model.diffusion.schedule import NoiseSchedule
from facegen.model.imaging import to_float
from facegen.model.manifest import DiffusionManifest, TrainingRun, VAEManifest
from facegen.model.networks.unet import EMBEDDING_TABLE, UNet, grown_attribute_table
from facegen.model.networks.vae import VAE
from training.data.celeba import fingerprint, load_split, load_split_labels
from training.runtime import EMA, BatchStream, cached_tensors, start_run, unwrap

from .trainer import RunOptions, Trainer


def load_vae(checkpoints: Path, version: str, device: torch.device) -> tuple[VAE, VAEManifest]:
    """The VAE of a checkpoint version in float32, eval mode, plus its manifest."""
    checkpoint = load_checkpoint(checkpoints, "vae", version)
    vae = VAE(checkpoint.manifest.model)
    vae.load_state_dict({k: v.float() for k, v in checkpoint.state_dict.items()})
    return vae.to(device).eval().requires_grad_(False), checkpoint.manifest


@torch.no_grad()
def encode_dataset(vae: VAE, images: torch.Tensor, device: torch.device, mirrors: bool, batch: int = 128,
                   show_progress: bool = True) -> dict[str, torch.Tensor]:
    """Posterior ``{"means", "logvars"}`` for ``uint8 [N, 3, H, W]`` images, each ``[N, L, h, w]`` float32 on the
    CPU; with ``mirrors`` also for the mirrored images (``[2N, ...]``, rows ``N..2N-1`` mirrored). ``show_progress``:
    a progress bar (off on all but one process of a distributed run)."""
    means, logvars = [], []
    passes = (False, True) if mirrors else (False,)
    progress = tqdm(total=len(passes) * len(images), desc="encoding latents", unit="img", mininterval=10,
                    disable=not show_progress)
    for flipped in passes:
        for chunk in images.split(batch):
            x = to_float(chunk).to(device)
            mean, logvar = vae.encode(x.flip(-1) if flipped else x)
            means.append(mean.float().cpu())
            logvars.append(logvar.float().cpu())
            progress.update(len(chunk))
    progress.close()
    return {"means": torch.cat(means), "logvars": torch.cat(logvars)}


def encode_training_images(vae: VAE, data: Path, data_cfg: DataConfig, limit: int | None, device: torch.device,
                           show_progress: bool) -> dict[str, torch.Tensor]:
    """:func:`encode_dataset` of the train split's images (decoded here: a latent cache hit never decodes them)."""
    images, _ = load_split(data, "train", data_cfg, limit=limit)
    return encode_dataset(vae, images, device, mirrors=data_cfg.hflip, show_progress=show_progress)


def training_latents(vae: VAE, vae_version: str, data_fingerprint: str, data_cfg: DataConfig, opts: RunOptions,
                     device: torch.device, show_progress: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The train split's posterior ``means`` and ``logvars`` (``float32 [M, C, h, w]``, M = N or 2N with mirror
    images) and labels ``int64 [M, A]``, read from ``opts.latent_cache`` when that VAE encoded these data before."""
    labels = load_split_labels(opts.data, "train", data_cfg, limit=opts.limit)
    cache_key = f"{vae_version}-{data_fingerprint[:16]}-{opts.limit or 'all'}{'-mirrored' if data_cfg.hflip else ''}"
    cache = opts.latent_cache / f"{cache_key}.pt" if opts.latent_cache is not None else None
    latents = cached_tensors(cache, partial(encode_training_images, vae, opts.data, data_cfg, opts.limit, device,
                                            show_progress))
    if data_cfg.hflip:
        labels = torch.cat([labels, labels])  # the mirrored half keeps its labels
    return latents["means"], latents["logvars"], labels


def sample_posterior(means: torch.Tensor, logvars: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Raw VAE latents drawn from the posteriors ``N(means, exp(logvars))`` (both ``[N, C, h, w]``), one
    ``generator`` draw of their shape."""
    return means + torch.exp(0.5 * logvars) * torch.randn(means.shape, generator=generator)


def latent_statistics(means: torch.Tensor, logvars: torch.Tensor, seed: int) -> tuple[float, float]:
    """``(scale, clip)``: ``scale = 1 / std`` of sampled latents; ``clip = max |scale * z|`` over them (the range
    the samplers clamp their x0 predictions to)."""
    z = sample_posterior(means, logvars, torch.Generator().manual_seed(seed))
    scale = 1.0 / float(z.std())
    return scale, float((z * scale).abs().max())


def learning_rate(step: int, cfg: DiffusionTrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of ``cfg.lr``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class DiffusionStep:
    """One optimisation step of the UNet on a batch of freshly sampled latents."""

    def __init__(self, unet: UNet, latents: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor, scale: float,
                 schedule: NoiseSchedule, cfg: DiffusionTrainConfig, trainer: Trainer, dtype: torch.dtype):
        """``latents = (means, logvars)``, each ``[M, L, h, w]``; ``labels int64 [M, A]`` in {0, 1}."""
        self.unet, self.means, self.logvars, self.labels = unet, latents[0], latents[1], labels
        self.scale, self.schedule, self.cfg, self.trainer, self.dtype = scale, schedule, cfg, trainer, dtype
        self.loss_avg: float | None = None

    def __call__(self, step: int) -> dict[str, float]:
        trainer, cfg, noise_gen = self.trainer, self.cfg, self.trainer.generators["noise"]
        index = next(trainer.stream)
        n = len(index)
        z0 = self.scale * sample_posterior(self.means[index], self.logvars[index], noise_gen)
        y = self.labels[index].clone()
        null = self.unet.config.null_label
        if cfg.attribute_dropout > 0:  # no draw otherwise: single-attribute runs keep their random stream
            y[torch.rand(y.shape, generator=noise_gen) < cfg.attribute_dropout] = null
        y[torch.rand(n, generator=noise_gen) < cfg.label_dropout] = null
        t = torch.randint(0, self.schedule.timesteps, (n,), generator=noise_gen)
        noise = torch.randn(z0.shape, generator=noise_gen)
        z0, y, t, noise = (v.to(trainer.device) for v in (z0, y, t, noise))
        x_t = self.schedule.q_sample(z0, t, noise)
        for group in trainer.optimizers["model"].param_groups:
            group["lr"] = learning_rate(step, cfg)
        with autocast(trainer.device, self.dtype):
            error = (trainer.modules["model"](x_t, t, y).float() - self.schedule.target(z0, noise, t)).pow(2)
            loss = (self.schedule.min_snr_weight(t, cfg.min_snr_gamma, error) * error).mean()
        trainer.optimizer_step("model", loss, self.unet.parameters(), cfg.grad_clip)
        value = loss.item()
        self.loss_avg = value if self.loss_avg is None else 0.98 * self.loss_avg + 0.02 * value
        return {"loss": value, "loss_avg": self.loss_avg, "lr": learning_rate(step, cfg)}


def train_diffusion(vae_version: str, unet_cfg: UNetConfig, schedule_cfg: ScheduleConfig,
                    sampling_cfg: SamplingConfig, cfg: DiffusionTrainConfig, opts: RunOptions,
                    attributes: tuple[str, ...] | None = None) -> Path | None:
    """Train (or resume from ``opts.run_dir/state.pt``); returns the new checkpoint folder on the main rank.
    ``attributes``: the conditioning attributes (default: those of the VAE's data config)."""
    device, dtype, ddp = start_run(opts.device, opts.precision, opts.threads, cfg.seed)

    vae, vae_manifest = load_vae(opts.checkpoints, vae_version, device)
    data_cfg = dataclasses.replace(vae_manifest.data, attributes=attributes or vae_manifest.data.attributes)
    data_fingerprint = fingerprint(opts.data)
    means, logvars, labels = training_latents(vae, vae_manifest.version, data_fingerprint, data_cfg, opts, device,
                                              ddp.is_main)
    scale, clip = latent_statistics(means, logvars, cfg.seed)
    del vae

    parent = lineage = None
    if opts.init_from:
        parent, lineage = warm_start(opts.checkpoints, "diffusion", opts.init_from)
        unet_cfg, schedule_cfg = parent.manifest.model, parent.manifest.schedule
        if unet_cfg.in_channels != means.shape[1]:
            raise ValueError(f"--init-from {opts.init_from}: its UNet takes {unet_cfg.in_channels} latent channels, "
                             f"the VAE gives {means.shape[1]}")
        parent.state_dict[EMBEDDING_TABLE] = grown_attribute_table(
            parent.state_dict[EMBEDDING_TABLE], parent.manifest.attributes, data_cfg.attributes, unet_cfg.null_label,
            torch.Generator().manual_seed(cfg.seed))
    unet_cfg = dataclasses.replace(unet_cfg, in_channels=means.shape[1], num_attributes=labels.shape[1])
    unet = UNet(unet_cfg).to(device)
    if parent is not None:
        unet.load_state_dict(parent.state_dict)
    model = DistributedDataParallel(unet) if ddp.world > 1 else unet
    ema = EMA(unet, cfg.ema_decay)
    trainer = Trainer(opts.run_dir, cfg.steps, cfg.log_every, cfg.save_every, ddp, device, {"model": model},
                      {"model": torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)},
                      dtype == torch.float16, BatchStream(len(means), cfg.batch_size, cfg.seed, ddp),
                      {"noise": torch.Generator().manual_seed(cfg.seed * 1000 + 11 + ddp.rank)}, ema)
    step = DiffusionStep(unet, (means, logvars), labels, scale, NoiseSchedule(schedule_cfg), cfg, trainer, dtype)
    trainer.run(step, "diffusion")

    result = None
    if ddp.is_main:
        manifest = DiffusionManifest(
            model=unet_cfg, schedule=schedule_cfg, sampling=sampling_cfg, vae_version=vae_manifest.version,
            latent_scale=scale, latent_clip=clip, latent_shape=tuple(means.shape[1:]), image_size=data_cfg.image_size,
            attributes=data_cfg.attributes, data=data_cfg, dataset_fingerprint=data_fingerprint,
            training=TrainingRun(cfg, cfg.steps, len(means), str(dtype).removeprefix("torch."), ddp.world, device.type,
                                 weights="ema", init_from=lineage),
            metrics={"train_loss_ema": round(step.loss_avg, 5) if step.loss_avg is not None else None})
        result = save_checkpoint(opts.checkpoints, unwrap(ema.model).state_dict(), manifest,
                                 dtype=DTYPES[opts.export_dtype])
        print(f"diffusion checkpoint: {result} (latent scale {scale:.4f}, clip {clip:.2f})")
    ddp.close()
    return result
