"""facegen's shared library: the wire contract between the API and the worker, and the served model.

- :mod:`facegen.contract` — torch-free: job specs and their field types, the Redis connection policy, the artifact
  store, the fair queue. The API, the webhook sender and the worker import it; it imports nothing else of ours.
- :mod:`facegen.model` — the served latent diffusion model: networks, diffusion math and samplers, the pipeline,
  checkpoints and their manifest, image helpers. The worker and the trainers import it; it imports nothing else of ours.
"""
