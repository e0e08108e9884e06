"""The VAE weights of the cost unit (facegen/contract/cost.py): seconds of one VAE decode and one VAE encode per
image, each divided by the seconds of one UNet row (one image through the denoiser at one timestep), on the served
model in the worker's precision for the device. Batches of ``--batch`` rows or images, the median of ``--repeat``
runs after a warm-up; the weights are the ratios.

    python -m bench.cost_weights --device cpu --batch 32
"""

from __future__ import annotations

import argparse

from bench.common import markdown_table, model_arguments, save, timed


def measure(checkpoints: str, version: str, device_name: str, batch: int, repeat: int) -> dict[str, float]:
    """Seconds per UNet row, per decode and per encode (one image each), and the two ratios."""
    import torch

    from facegen.model.device import pick_device, pick_dtype
    from facegen.model.pipeline import LatentDiffusion

    device = pick_device(device_name)
    model = LatentDiffusion.load(checkpoints, version, device, pick_dtype(device, "auto"))
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn((batch, *model.latent_shape), generator=generator).to(device)
    images = torch.rand((batch, 3, model.image_size, model.image_size), generator=generator).to(device) * 2 - 1
    t = torch.full((batch,), model.schedule.timesteps // 2, device=device)
    labels = torch.ones((batch, len(model.attributes)), device=device)

    with torch.no_grad():
        unet_s = timed(lambda: model.unet(latents.to(model.dtype), t, labels), device, repeat) / batch
        decode_s = timed(lambda: model.decode(latents), device, repeat) / batch
        encode_s = timed(lambda: model.encode(images), device, repeat) / batch
    return {"unet_row_ms": unet_s * 1e3, "decode_ms": decode_s * 1e3, "encode_ms": encode_s * 1e3,
            "decode_rows": decode_s / unet_s, "encode_rows": encode_s / unet_s, "dtype": str(model.dtype),
            "batch": batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model_arguments(parser)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    result = measure(args.checkpoints, args.model, args.device, args.batch, args.repeat)
    save("cost_weights", {"device": args.device, "result": result},
         markdown_table(["measure", "value"], list(result.items())))


if __name__ == "__main__":
    main()
