"""Train the attention VAE on a CelebA-layout folder and write a ``vae`` checkpoint version.

Loss: ``L1_w(x, x') + perceptual_weight * P(x, x') + kl_weight * KL`` (+ ``adversarial_weight`` times the
hinge generator loss of a PatchGAN once ``adversarial_start`` is reached). ``L1_w`` weighs the pixels around eyes
and mouth ``1 + landmark_weight`` times as much when the folder has CelebA's landmark file (plain L1 without it).
``--init-from`` warm-starts from an exported version (its architecture, its weights) and records the lineage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .checkpoints import save_checkpoint, warm_start
from .config import DataConfig, VAEConfig, VAETrainConfig, asdict, from_dict
from .data.celeba import fingerprint, load_landmarks, load_split, to_float
from .models.discriminator import PatchDiscriminator, hinge_discriminator_loss, hinge_generator_loss
from .models.vae import VAE, kl_divergence
from .perceptual import PerceptualLoss
from .regions import landmark_weights, weighted_l1
from .runtime import (
    BatchStream,
    Log,
    autocast,
    gather_per_rank,
    load_state,
    optimizer_step,
    save_state,
    start_run,
    unwrap,
)


@dataclass(frozen=True)
class RunOptions:
    """Where and how a training run happens (not part of the model)."""

    data: Path
    checkpoints: Path
    run_dir: Path
    device: str = "auto"
    precision: str = "auto"
    export_dtype: str = "fp32"
    limit: int | None = None  # use only the first N training images (tests, quick trials)
    perceptual_weights: Path | None = None
    threads: int | None = None
    init_from: str | None = None  # exported version whose weights start the run (architecture taken from it)


def flip_batch(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror a random half of ``x [N, 3, H, W]`` left-right."""
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    return torch.where(flip[:, None, None, None].to(x.device), x.flip(-1), x)


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = (x.float().clamp(-1, 1) - y.float()).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
    return float((10 * torch.log10(4.0 / mse)).mean())


@torch.no_grad()
def reconstruct(vae: VAE, images: torch.Tensor, device: torch.device, dtype: torch.dtype,
                batch: int = 128) -> torch.Tensor:
    """Encode (posterior mean) and decode ``uint8 [N, 3, H, W]``; returns float ``[N, 3, H, W]`` in [-1, 1]."""
    out = []
    for chunk in images.split(batch):
        with autocast(device, dtype):
            mean, _ = vae.encode(to_float(chunk).to(device))
            out.append(vae.decode(mean).float().clamp(-1, 1).cpu())
    return torch.cat(out)


def train_vae(data_cfg: DataConfig, vae_cfg: VAEConfig, cfg: VAETrainConfig, opts: RunOptions) -> Path | None:
    """Train (or resume from ``opts.run_dir/state.pt``); returns the new checkpoint folder on the main rank."""
    device, dtype, ddp = start_run(opts.device, opts.precision, opts.threads, cfg.seed)

    images, _ = load_split(opts.data, "train", data_cfg, limit=opts.limit)
    landmarks = load_landmarks(opts.data, "train", data_cfg, limit=opts.limit)
    val_images, _ = load_split(opts.data, "val", data_cfg, limit=256)
    parent = lineage = None
    if opts.init_from:
        parent, lineage = warm_start(opts.checkpoints, "vae", opts.init_from)
        vae_cfg = from_dict(VAEConfig, parent.manifest["model"])
    vae = VAE(vae_cfg).to(device)
    if parent is not None:
        vae.load_state_dict(parent.state_dict)
    model = DistributedDataParallel(vae) if ddp.world > 1 else vae
    perceptual = PerceptualLoss(opts.perceptual_weights).to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, betas=(0.5, 0.9), weight_decay=0.0)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    disc = disc_opt = None
    if cfg.adversarial_weight > 0:
        disc = PatchDiscriminator().to(device)
        disc = DistributedDataParallel(disc) if ddp.world > 1 else disc
        disc_opt = torch.optim.AdamW(disc.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
    stream = BatchStream(len(images), cfg.batch_size, cfg.seed, ddp)
    flips = torch.Generator().manual_seed(cfg.seed * 1000 + 7 + ddp.rank)

    state_path = opts.run_dir / "state.pt"
    start = 0
    if state_path.is_file():
        state = load_state(state_path)
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        stream.load(state["stream"])
        flips.set_state(state["flips"])
        torch.set_rng_state(state["torch_rng"][ddp.rank])
        if disc is not None and "disc" in state:
            unwrap(disc).load_state_dict(state["disc"])
            disc_opt.load_state_dict(state["disc_optimizer"])
        start = state["step"]
    log = Log(opts.run_dir / "log.jsonl" if ddp.is_main else None)

    progress = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not ddp.is_main, desc="vae")
    use_landmarks = landmarks is not None and cfg.landmark_weight > 0
    for step in progress:
        index = next(stream)
        x = to_float(images[index])
        if use_landmarks:  # the weight map travels with the image through the flip: channel 3
            x = torch.cat([x, landmark_weights(landmarks[index], data_cfg.image_size, cfg.landmark_sigma,
                                               cfg.landmark_weight)], dim=1)
        x = (flip_batch(x, flips) if data_cfg.hflip else x).to(device)
        x, weights = (x[:, :3], x[:, 3:]) if use_landmarks else (x, None)
        with autocast(device, dtype):
            recon, mean, logvar = model(x)
            recon = recon.float()
            rec_loss = weighted_l1(recon, x, weights)
            perc_loss = perceptual(recon, x)
            kl = kl_divergence(mean.float(), logvar.float())
            loss = rec_loss + cfg.perceptual_weight * perc_loss + cfg.kl_weight * kl
            adversarial = disc is not None and step >= cfg.adversarial_start
            if adversarial:
                loss = loss + cfg.adversarial_weight * hinge_generator_loss(disc(recon).float())
        optimizer_step(loss, optimizer, scaler, vae.parameters(), cfg.grad_clip)
        if adversarial:
            with autocast(device, dtype):
                d_loss = hinge_discriminator_loss(disc(x).float(), disc(recon.detach()).float())
            disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            disc_opt.step()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"VAE loss became {loss.item()} at step {step}")
        if ddp.is_main and (step + 1) % cfg.log_every == 0:
            record = {"step": step + 1, "loss": loss.item(), "l1": rec_loss.item(), "perceptual": perc_loss.item(),
                      "kl": kl.item()}
            log.write(**record)
            progress.set_postfix(l1=f"{rec_loss.item():.4f}", kl=f"{kl.item():.3f}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            rng_states = gather_per_rank(torch.get_rng_state(), ddp)
            if ddp.is_main:
                state = {"step": step + 1, "model": vae.state_dict(),
                         "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "stream": stream.state(),
                         "flips": flips.get_state(), "torch_rng": rng_states}
                if disc is not None:
                    state |= {"disc": unwrap(disc).state_dict(), "disc_optimizer": disc_opt.state_dict()}
                save_state(state_path, state)

    result = None
    if ddp.is_main:
        vae.eval()
        val_psnr = psnr(reconstruct(vae, val_images, device, dtype), to_float(val_images))
        log.write(step=cfg.steps, val_psnr_db=val_psnr)
        manifest = {
            "model": asdict(vae_cfg), "data": asdict(data_cfg), "attributes": list(data_cfg.attributes),
            "dataset_fingerprint": fingerprint(opts.data),
            "training": {"config": asdict(cfg), "steps": cfg.steps, "train_images": len(images),
                         "precision": str(dtype).removeprefix("torch."), "world_size": ddp.world,
                         "device": device.type, "landmarks": use_landmarks, "init_from": lineage},
            "metrics": {"val_psnr_db": round(val_psnr, 3)},
        }
        export = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}[opts.export_dtype]
        result = save_checkpoint(opts.checkpoints, "vae", vae.state_dict(), manifest, dtype=export)
        print(f"vae checkpoint: {result} (val PSNR {val_psnr:.2f} dB)")
    ddp.close()
    return result
