"""Training package: CelebA-layout data, the attention VAE, the latent diffusion UNet, samplers, checkpoints.

The worker imports networks, samplers and the checkpoint loader from here; nothing here imports the worker.
"""
