"""What a job costs a worker, in *work units*: the currency of the per-request cap (``MAX_REQUEST_UNITS``) and of
each API key's quota (``QUOTA_QUEUED_UNITS``) and rate (``QUOTA_UNITS_PER_MINUTE``).

Work is first counted in **UNet rows** (one image through the denoiser at one timestep), as the worker runs a job
(worker/engine.py, facegen/model/pipeline.py):

- a generation runs ``chains x steps x rows``: ``chains`` = ``count`` (times ``transition_frames`` for a
  transition: each frame is a full chain), ``steps`` the resolved steps (every step of DDPM, DDIM and
  DPM-Solver++(2M) is one network evaluation), ``rows`` = 2 with classifier-free guidance (the conditional and the
  reference rows share one batch), 1 when ``guidance_scale`` is 0 or 1 (one pass); a request that leaves guidance to
  the model counts 2 (the served models guide); the distilled student (sampler ``student``) runs 1 row per step
  whatever the guidance (the scale is an input of its network), in the steps it resolves to (a request that leaves
  them out counts ``DEFAULT_STEPS[student]``, whatever its manifest's default);
- an edit inverts through ``depth = round(strength x steps)`` DDIM steps, each ``INVERSION_ROWS_PER_STEP`` unguided
  rows (the step and its fixed-point refinement), then regenerates the same ``depth`` steps with guidance rows, and
  VAE-encodes its upload once;
- the VAE decodes each chain's image once, and every frame of a GIF: ``min(animation_frames, steps + 1)`` per image
  for a denoising trajectory (the noise, then the x0 predictions), ``min(animation_frames, depth + 1) - 1`` for an
  edit's path (its first frame is the upload itself).

VAE work is weighted against a UNet row by its measured time: ``python -m bench.cost_weights --device cpu`` on the
served model (64 px images, 4x16x16 latents; fp32 on a 2-core AMD EPYC without native bf16; medians of 5 and 7
runs after a warm-up) took 15 ms per UNet row, 32 ms per decode and 14 ms per encode at batch 32 (decode 2.2 rows,
encode 0.95; at batch 8: 1.8 and 0.84), hence ``DECODE_ROWS = 2`` and ``ENCODE_ROWS = 1``.

Not counted: live previews (decoded only while a client watches the event stream), the reading of attributes an
edit leaves open on a multi-attribute model (2 x 16 rows per open attribute; none when the edit sets every
attribute, as on the served one-attribute model) and the reader's hold step after each regeneration step.

**Units** are rows scaled so that a default ``POST /generate`` (``DEFAULT_COUNT`` = 4 images, DPM-Solver++ at its
20 steps, guided, no GIF: 4 x 20 x 2 + 4 decodes x 2 = 168 rows) costs ``DEFAULT_REQUEST_UNITS`` = 100, rounded
up to whole units (one unit = 1.68 rows). A default edit costs 74 units, 64 images of 1000 guided steps with a
64-frame trajectory 81,143. Torch-free: the API computes a job's cost from its spec before it queues it.
"""

from __future__ import annotations

from facegen.contract.fields import DEFAULT_COUNT
from facegen.contract.spec import (
    DEFAULT_EDIT_GUIDANCE,
    DEFAULT_SAMPLER,
    DEFAULT_STEPS,
    EditParameters,
    JobSpec,
    Sampler,
)

# UNet rows per denoising step with classifier-free guidance on: the conditional and the reference pass.
GUIDED_ROWS = 2
# UNet rows per DDIM inversion step: the step and 1 fixed-point refinement
# (facegen.model.diffusion.inversion.DEFAULT_REFINEMENTS, which tests/worker/test_cost.py checks this agrees with).
INVERSION_ROWS_PER_STEP = 2
# One VAE decode (one image or GIF frame) and one VAE encode (an edit's upload), in UNet rows (measured: see above).
DECODE_ROWS = 2
ENCODE_ROWS = 1
# What a default POST /generate costs, in units.
DEFAULT_REQUEST_UNITS = 100


def rows_per_step(sampler: Sampler, guidance_scale: float | None) -> int:
    """UNet rows of one denoising step per image: 1 for the student (its network takes the guidance scale) and
    when guidance is off (0: the reference pass alone; 1: the conditional pass alone), else ``GUIDED_ROWS``;
    ``None`` (the model's default) counts as guided."""
    return 1 if sampler == Sampler.student or guidance_scale in (0.0, 1.0) else GUIDED_ROWS


def edit_depth(strength: float, steps: int) -> int:
    """DDIM steps an edit of ``strength`` in [0, 1] inverts, and then regenerates, out of ``steps``: the rule of
    facegen.model.diffusion.inversion.inversion_depth, repeated here because this module stays torch-free
    (tests/worker/test_cost.py checks the two agree)."""
    return round(strength * steps)


def generate_rows(count: int, steps: int, rows: int, chains: int, trajectory_frames: int) -> int:
    """UNet rows of a generation: ``chains`` chains of ``steps`` steps of ``rows`` rows, one decode per chain, and
    ``trajectory_frames`` (0 = no trajectory GIF) decoded frames per image of ``count``."""
    frames = min(trajectory_frames, steps + 1) if trajectory_frames else 0
    return chains * steps * rows + DECODE_ROWS * (chains + count * frames)


def job_rows(job: JobSpec) -> int:
    """The work of ``job`` (a generation, or an edit's parameters or spec) in UNet rows, as the worker does it."""
    steps = job.resolved_steps()
    if isinstance(job, EditParameters):
        depth = edit_depth(job.strength, steps)
        guidance = job.guidance_scale if job.guidance_scale is not None else DEFAULT_EDIT_GUIDANCE
        path_frames = max(min(job.animation_frames, depth + 1) - 1, 0) if job.animation else 0
        return (depth * (INVERSION_ROWS_PER_STEP + rows_per_step(job.sampler, guidance)) + ENCODE_ROWS
                + DECODE_ROWS * (1 + path_frames))
    return generate_rows(job.count, steps, rows_per_step(job.sampler, job.guidance_scale), job.chains(),
                         job.animation_frames if job.animation else 0)


# A default POST /generate in UNet rows: the denominator of the units.
DEFAULT_REQUEST_ROWS = generate_rows(DEFAULT_COUNT, DEFAULT_STEPS[DEFAULT_SAMPLER], GUIDED_ROWS, DEFAULT_COUNT, 0)


def job_units(job: JobSpec) -> int:
    """The cost of ``job`` in units (>= 1): its rows scaled so that a default POST /generate costs
    ``DEFAULT_REQUEST_UNITS``, rounded up."""
    return -(-job_rows(job) * DEFAULT_REQUEST_UNITS // DEFAULT_REQUEST_ROWS)


def cost_fields(job: JobSpec) -> tuple[str, ...]:
    """The request fields that set ``job``'s cost, for an answer that refuses it: an edit's ``steps`` and
    ``strength``; a generation's ``count`` and ``steps``, with ``transition_frames`` or ``animation_frames``
    when it asks for that GIF."""
    if isinstance(job, EditParameters):
        return ("steps", "strength")
    frames = ("transition_frames",) if job.transition else ("animation_frames",) if job.animation else ()
    return ("count", "steps", *frames)
