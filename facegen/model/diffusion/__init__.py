"""Diffusion math, with the network passed in as an argument: schedule, noising, losses, samplers."""
