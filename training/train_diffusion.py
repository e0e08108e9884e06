"""Train the class-conditional latent diffusion UNet on a VAE checkpoint's latents; write a ``diffusion``
checkpoint version whose manifest names its parent VAE and the measured latent scale and range.

Latents are encoded once (posterior mean and log-variance of each training image and of its mirror image) and
sampled every step: ``z = scale * (mean + exp(logvar / 2) * eps)``, with ``scale = 1 / std(z)`` measured here.
The loss is ``w(t) || unet(x_t, t, labels) - target ||^2`` (target per the schedule's prediction type, ``w`` the
Min-SNR-gamma weight), labels replaced by the null label with probability ``label_dropout`` (classifier-free
guidance). ``--init-from`` warm-starts from an exported diffusion version (its UNet and schedule, its EMA weights),
also on the latents of a newer VAE, and records the lineage in the manifest.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .checkpoints import load_checkpoint, save_checkpoint, warm_start
from .config import (
    DataConfig,
    DiffusionTrainConfig,
    SamplingConfig,
    ScheduleConfig,
    UNetConfig,
    VAEConfig,
    asdict,
    from_dict,
)
from .data.celeba import fingerprint, load_split, to_float
from .diffusion.schedule import NoiseSchedule
from .models.unet import UNet
from .models.vae import VAE
from .runtime import (
    EMA,
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
from .train_vae import RunOptions


def load_vae(checkpoints: Path, version: str, device: torch.device) -> tuple[VAE, dict]:
    """The VAE of a checkpoint version in float32, eval mode, plus its manifest."""
    checkpoint = load_checkpoint(checkpoints, "vae", version)
    vae = VAE(from_dict(VAEConfig, checkpoint.manifest["model"]))
    vae.load_state_dict({k: v.float() for k, v in checkpoint.state_dict.items()})
    return vae.to(device).eval().requires_grad_(False), checkpoint.manifest


@torch.no_grad()
def encode_dataset(vae: VAE, images: torch.Tensor, device: torch.device, mirrors: bool, batch: int = 128
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior ``(mean, logvar)`` for ``uint8 [N, 3, H, W]`` images, each ``[N, L, h, w]`` float32 on the CPU;
    with ``mirrors`` also for the mirrored images (``[2N, ...]``, rows ``N..2N-1`` mirrored)."""
    means, logvars = [], []
    for flipped in (False, True) if mirrors else (False,):
        for chunk in images.split(batch):
            x = to_float(chunk).to(device)
            mean, logvar = vae.encode(x.flip(-1) if flipped else x)
            means.append(mean.float().cpu())
            logvars.append(logvar.float().cpu())
    return torch.cat(means), torch.cat(logvars)


def latent_statistics(means: torch.Tensor, logvars: torch.Tensor, seed: int) -> tuple[float, float]:
    """``(scale, clip)``: ``scale = 1 / std`` of sampled latents; ``clip = max |scale * z|`` over them (the range
    the samplers clamp their x0 predictions to)."""
    generator = torch.Generator().manual_seed(seed)
    z = means + torch.exp(0.5 * logvars) * torch.randn(means.shape, generator=generator)
    scale = 1.0 / float(z.std())
    return scale, float((z * scale).abs().max())


def learning_rate(step: int, cfg: DiffusionTrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of ``cfg.lr``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_diffusion(vae_version: str, unet_cfg: UNetConfig, schedule_cfg: ScheduleConfig,
                    sampling_cfg: SamplingConfig, cfg: DiffusionTrainConfig, opts: RunOptions) -> Path | None:
    """Train (or resume from ``opts.run_dir/state.pt``); returns the new checkpoint folder on the main rank."""
    device, dtype, ddp = start_run(opts.device, opts.precision, opts.threads, cfg.seed)

    vae, vae_manifest = load_vae(opts.checkpoints, vae_version, device)
    data_cfg = from_dict(DataConfig, vae_manifest["data"])
    images, labels = load_split(opts.data, "train", data_cfg, limit=opts.limit)
    means, logvars = encode_dataset(vae, images, device, mirrors=data_cfg.hflip)
    if data_cfg.hflip:
        labels = torch.cat([labels, labels])  # the mirrored half keeps its labels
    scale, clip = latent_statistics(means, logvars, cfg.seed)
    del vae, images

    parent = lineage = None
    if opts.init_from:
        parent, lineage = warm_start(opts.checkpoints, "diffusion", opts.init_from)
        unet_cfg = from_dict(UNetConfig, parent.manifest["model"])
        schedule_cfg = from_dict(ScheduleConfig, parent.manifest["schedule"])
        if (unet_cfg.in_channels, unet_cfg.num_attributes) != (means.shape[1], labels.shape[1]):
            raise ValueError(f"--init-from {opts.init_from}: its UNet takes {unet_cfg.in_channels} latent channels and "
                             f"{unet_cfg.num_attributes} attributes, the data gives {means.shape[1]} and {labels.shape[1]}")
    unet_cfg = UNetConfig(**{**asdict(unet_cfg), "in_channels": means.shape[1], "num_attributes": labels.shape[1]})
    schedule = NoiseSchedule(schedule_cfg)
    unet = UNet(unet_cfg).to(device)
    if parent is not None:
        unet.load_state_dict(parent.state_dict)
    model = DistributedDataParallel(unet) if ddp.world > 1 else unet
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    ema = EMA(unet, cfg.ema_decay)
    stream = BatchStream(len(means), cfg.batch_size, cfg.seed, ddp)
    noise_gen = torch.Generator().manual_seed(cfg.seed * 1000 + 11 + ddp.rank)

    state_path = opts.run_dir / "state.pt"
    start = 0
    if state_path.is_file():
        state = load_state(state_path)
        unet.load_state_dict(state["model"])
        ema.model.load_state_dict(state["ema"])
        ema.updates = state["step"]
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        stream.load(state["stream"])
        noise_gen.set_state(state["noise"][ddp.rank])
        start = state["step"]
    log = Log(opts.run_dir / "log.jsonl" if ddp.is_main else None)

    progress = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not ddp.is_main,
                    desc="diffusion")
    loss_avg = None
    for step in progress:
        index = next(stream)
        n = len(index)
        eps_latent = torch.randn(means[index].shape, generator=noise_gen)
        z0 = scale * (means[index] + torch.exp(0.5 * logvars[index]) * eps_latent)
        y = labels[index].clone()
        drop = torch.rand(n, generator=noise_gen) < cfg.label_dropout
        y[drop] = unet_cfg.null_label
        t = torch.randint(0, schedule.timesteps, (n,), generator=noise_gen)
        noise = torch.randn(z0.shape, generator=noise_gen)
        z0, y, t, noise = z0.to(device), y.to(device), t.to(device), noise.to(device)
        x_t = schedule.q_sample(z0, t, noise)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)
        with autocast(device, dtype):
            error = (model(x_t, t, y).float() - schedule.target(z0, noise, t)).pow(2)
            loss = (schedule.min_snr_weight(t, cfg.min_snr_gamma, error) * error).mean()
        optimizer_step(loss, optimizer, scaler, unet.parameters(), cfg.grad_clip)
        ema.update(unet)
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"diffusion loss became {value} at step {step}")
        loss_avg = value if loss_avg is None else 0.98 * loss_avg + 0.02 * value
        if ddp.is_main and (step + 1) % cfg.log_every == 0:
            log.write(step=step + 1, loss=value, loss_avg=loss_avg, lr=learning_rate(step, cfg))
            progress.set_postfix(loss=f"{loss_avg:.4f}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            noise_states = gather_per_rank(noise_gen.get_state(), ddp)
            if ddp.is_main:
                save_state(state_path, {"step": step + 1, "model": unet.state_dict(), "ema": ema.model.state_dict(),
                                        "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                                        "stream": stream.state(), "noise": noise_states})

    result = None
    if ddp.is_main:
        manifest = {
            "model": asdict(unet_cfg), "schedule": asdict(schedule_cfg), "sampling": asdict(sampling_cfg),
            "vae_version": vae_manifest["version"], "latent_scale": scale, "latent_clip": clip,
            "latent_shape": list(means.shape[1:]), "image_size": data_cfg.image_size,
            "attributes": list(data_cfg.attributes), "data": asdict(data_cfg),
            "dataset_fingerprint": fingerprint(opts.data),
            "training": {"config": asdict(cfg), "steps": cfg.steps, "train_latents": len(means),
                         "precision": str(dtype).removeprefix("torch."), "world_size": ddp.world,
                         "device": device.type, "weights": "ema", "init_from": lineage},
            "metrics": {"train_loss_ema": round(loss_avg, 5) if loss_avg is not None else None},
        }
        export = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}[opts.export_dtype]
        result = save_checkpoint(opts.checkpoints, "diffusion", unwrap(ema.model).state_dict(), manifest, dtype=export)
        print(f"diffusion checkpoint: {result} (latent scale {scale:.4f}, clip {clip:.2f})")
    ddp.close()
    return result
