"""Networks only: the attention VAE and the latent denoising UNet (no noise-schedule math here)."""
