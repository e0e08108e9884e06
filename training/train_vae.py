"""Train the attention VAE on a CelebA-layout folder and write a ``vae`` checkpoint version.

Loss: ``L1_w(x, x') + perceptual_weight * P(x, x') + kl_weight * KL`` (+ ``adversarial_weight`` times the
hinge generator loss of a PatchGAN once ``adversarial_start`` is reached). ``L1_w`` weighs the pixels around eyes
and mouth ``1 + landmark_weight`` times as much when the folder has CelebA's landmark file (plain L1 without it),
the mouth more where it barely stands out from the skin with ``mouth_contrast`` (and such faces drawn more often
with ``contrast_sampling``).
``--init-from`` warm-starts from an exported version (its architecture, its weights) and records the lineage.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from facegen.model.checkpoints import save_checkpoint, warm_start
from facegen.model.config import DataConfig, VAEConfig, VAETrainConfig
from facegen.model.device import DTYPES, autocast
from facegen.model.imaging import to_float
from facegen.model.manifest import TrainingRun, VAEManifest
from facegen.model.networks.vae import VAE, kl_divergence
from facegen.model.regions import contrast_boost, landmark_weights, weighted_l1
from training.data.celeba import fingerprint, load_landmarks, load_split
from training.discriminator import PatchDiscriminator, hinge_discriminator_loss, hinge_generator_loss
from training.runtime import BatchStream, start_run

from .perceptual import PerceptualLoss
from .trainer import RunOptions, Trainer


def flip_batch(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror a random half of ``x [N, C, H, W]`` left-right."""
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    return torch.where(flip[:, None, None, None].to(x.device), x.flip(-1), x)


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = (x.float().clamp(-1, 1) - y.float()).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
    return float((10 * torch.log10(4.0 / mse)).mean())


@torch.no_grad()
def reconstruct_images(vae: VAE, images: torch.Tensor, device: torch.device, dtype: torch.dtype,
                batch: int = 128) -> torch.Tensor:
    """Encode (posterior mean) and decode ``uint8 [N, 3, H, W]``; returns float ``[N, 3, H, W]`` in [-1, 1]."""
    out = []
    for chunk in images.split(batch):
        with autocast(device, dtype):
            mean, _ = vae.encode(to_float(chunk).to(device))
            out.append(vae.decode(mean).float().clamp(-1, 1).cpu())
    return torch.cat(out)


def face_contrast_boosts(images: torch.Tensor, landmarks: torch.Tensor, cfg: VAETrainConfig,
                         chunk: int = 1024) -> torch.Tensor:
    """Every face's mouth contrast boost (:func:`regions.contrast_boost` with ``cfg``'s reference and cap):
    ``images uint8 [N, 3, S, S]``, ``landmarks [N, 5, 2]`` -> ``float32 [N]`` in ``[1, mouth_contrast_cap]``."""
    return torch.cat([contrast_boost(to_float(faces), marks, cfg.landmark_sigma, cfg.mouth_contrast,
                                     cfg.mouth_contrast_cap)
                      for faces, marks in zip(images.split(chunk), landmarks.split(chunk), strict=True)])


class VAEStep:
    """One optimisation step of the VAE (and of its discriminator once the adversarial loss is on)."""

    def __init__(self, vae: VAE, images: torch.Tensor, landmarks: torch.Tensor | None, boosts: torch.Tensor | None,
                 perceptual: PerceptualLoss, data_cfg: DataConfig, cfg: VAETrainConfig, trainer: Trainer,
                 dtype: torch.dtype):
        """``images uint8 [N, 3, S, S]``; ``landmarks [N, 5, 2]`` pixels, or None for the plain L1; ``boosts [N]``:
        each face's mouth weight factor (:func:`face_contrast_boosts`), or None for none."""
        self.vae, self.images, self.landmarks, self.boosts, self.perceptual = vae, images, landmarks, boosts, perceptual
        self.cfg, self.data_cfg, self.trainer, self.dtype = cfg, data_cfg, trainer, dtype

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images ``[B, 3, S, S]`` in [-1, 1] on the device, mirrored at random, and their loss weights."""
        x = to_float(self.images[index])
        if self.landmarks is not None:  # the weight map travels with the image through the flip: channel 3
            landmarks, cfg = self.landmarks[index], self.cfg
            boost = self.boosts[index] if self.boosts is not None else None
            weights = landmark_weights(landmarks, self.data_cfg.image_size, cfg.landmark_sigma, cfg.landmark_weight,
                                       boost)
            x = torch.cat([x, weights], dim=1)
        if self.data_cfg.hflip:
            x = flip_batch(x, self.trainer.generators["flips"])
        x = x.to(self.trainer.device)
        return (x[:, :3], x[:, 3:]) if self.landmarks is not None else (x, None)

    def __call__(self, step: int) -> dict[str, float]:
        trainer, cfg, device = self.trainer, self.cfg, self.trainer.device
        x, weights = self.batch(next(trainer.stream))
        disc = trainer.modules.get("disc")
        adversarial = disc is not None and step >= cfg.adversarial_start
        with autocast(device, self.dtype):
            recon, mean, logvar = trainer.modules["model"](x)
            recon = recon.float()
            rec_loss = weighted_l1(recon, x, weights)
            perc_loss = self.perceptual(recon, x) if cfg.perceptual_weight > 0 else recon.new_zeros(())
            kl = kl_divergence(mean.float(), logvar.float())
            loss = rec_loss + cfg.perceptual_weight * perc_loss + cfg.kl_weight * kl
            if adversarial:
                loss = loss + cfg.adversarial_weight * hinge_generator_loss(disc(recon).float())
        trainer.optimizer_step("model", loss, self.vae.parameters(), cfg.grad_clip)
        if adversarial:
            with autocast(device, self.dtype):
                d_loss = hinge_discriminator_loss(disc(x).float(), disc(recon.detach()).float())
            trainer.optimizer_step("disc", d_loss, disc.parameters(), math.inf)  # loss-scaled too; never clipped
        return {"loss": loss.item(), "l1": rec_loss.item(), "perceptual": perc_loss.item(), "kl": kl.item()}


def train_vae(data_cfg: DataConfig, vae_cfg: VAEConfig, cfg: VAETrainConfig, opts: RunOptions) -> Path | None:
    """Train (or resume from ``opts.run_dir/state.pt``); returns the new checkpoint folder on the main rank."""
    if not (cfg.train_encoder or cfg.train_decoder):
        raise ValueError("train_encoder and train_decoder are both off: nothing to train")
    if cfg.contrast_sampling and not (cfg.mouth_contrast > 0 and cfg.landmark_weight > 0):
        raise ValueError("contrast_sampling draws faces by their mouth's contrast boost: it needs mouth_contrast > 0 "
                         "and landmark_weight > 0")
    device, dtype, ddp = start_run(opts.device, opts.precision, opts.threads, cfg.seed)
    parent = lineage = None
    if opts.init_from:
        parent, lineage = warm_start(opts.checkpoints, "vae", opts.init_from)
        vae_cfg = parent.manifest.model
    vae = VAE(vae_cfg).to(device)
    if parent is not None:
        vae.load_state_dict(parent.state_dict)
    vae.encoder.requires_grad_(cfg.train_encoder)  # before DDP wraps it: DDP reduces what requires grad then
    vae.decoder.requires_grad_(cfg.train_decoder)
    modules: dict[str, torch.nn.Module] = {"model": DistributedDataParallel(vae) if ddp.world > 1 else vae}
    trained = [p for p in vae.parameters() if p.requires_grad]
    optimizers = {"model": torch.optim.AdamW(trained, lr=cfg.lr, betas=(0.5, 0.9), weight_decay=0.0)}
    if cfg.adversarial_weight > 0:
        disc = PatchDiscriminator().to(device)
        modules["disc"] = DistributedDataParallel(disc) if ddp.world > 1 else disc
        optimizers["disc"] = torch.optim.AdamW(disc.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
    images, _ = load_split(opts.data, "train", data_cfg, limit=opts.limit)
    landmarks = load_landmarks(opts.data, "train", data_cfg, limit=opts.limit) if cfg.landmark_weight > 0 else None
    if cfg.contrast_sampling and landmarks is None:
        raise ValueError(f"contrast_sampling needs landmarks, and {opts.data} has no landmark file")
    # one boost per face, computed once: it weighs the face's mouth and, with contrast_sampling, how often it is drawn
    boosts = face_contrast_boosts(images, landmarks, cfg) if landmarks is not None and cfg.mouth_contrast > 0 else None
    trainer = Trainer(opts.run_dir, cfg.steps, cfg.log_every, cfg.save_every, ddp, device, modules, optimizers,
                      dtype == torch.float16,
                      BatchStream(len(images), cfg.batch_size, cfg.seed, ddp, boosts if cfg.contrast_sampling else None),
                      {"flips": torch.Generator().manual_seed(cfg.seed * 1000 + 7 + ddp.rank)})
    perceptual = PerceptualLoss(opts.perceptual_weights).to(device)
    trainer.run(VAEStep(vae, images, landmarks, boosts, perceptual, data_cfg, cfg, trainer, dtype), "vae")

    result = None
    if ddp.is_main:
        vae.eval()
        val_images, _ = load_split(opts.data, "val", data_cfg, limit=256)
        val_psnr = psnr(reconstruct_images(vae, val_images, device, dtype), to_float(val_images))
        manifest = VAEManifest(
            model=vae_cfg, data=data_cfg, attributes=data_cfg.attributes, dataset_fingerprint=fingerprint(opts.data),
            training=TrainingRun(cfg, cfg.steps, len(images), str(dtype).removeprefix("torch."), ddp.world,
                                 device.type, landmarks=landmarks is not None, init_from=lineage),
            metrics={"val_psnr_db": round(val_psnr, 3)})
        result = save_checkpoint(opts.checkpoints, vae.state_dict(), manifest, dtype=DTYPES[opts.export_dtype])
        print(f"vae checkpoint: {result} (val PSNR {val_psnr:.2f} dB)")
    ddp.close()
    return result
