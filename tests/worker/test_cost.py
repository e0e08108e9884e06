"""The torch-free cost of a job (facegen.contract.cost) counts the work the engine really does: UNet rows, VAE
decodes and encodes, counted by hooks on a tiny engine's networks while it runs jobs the way the worker does."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from facegen.contract import cost
from facegen.contract.spec import DEFAULT_EDIT_GUIDANCE, EditParameters, JobSpec, Sampler
from facegen.model.diffusion.inversion import DEFAULT_REFINEMENTS, inversion_depth
from worker.batch import image_requests
from worker.edit import edit_request
from worker.engine import Engine

SMILING = {"Smiling": True}


@pytest.fixture(scope="module")
def engine(tiny_checkpoints: Path) -> Engine:
    return Engine(tiny_checkpoints, "latest", device="cpu", precision="fp32", max_batch=8)


@pytest.fixture(scope="module")
def student_engine(tiny_student_checkpoints: Path) -> Engine:
    """The same model, served with its distilled student."""
    return Engine(tiny_student_checkpoints, "latest", device="cpu", precision="fp32", max_batch=8)


def counted_work(engine: Engine, run) -> Counter:
    """Rows through the UNets (the served model's, its student's), the VAE decoder and the VAE encoder while
    ``run()`` runs."""
    work: Counter = Counter()
    vae = engine.model.vae
    unets = [("unet", model.unet) for model in (engine.model, engine.student) if model is not None]
    hooks = [module.register_forward_hook(lambda _m, inputs, _o, name=name: work.update({name: len(inputs[0])}))
             for name, module in (*unets, ("decode", vae.decoder), ("encode", vae.encoder))]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return work


def rows_of(work: Counter) -> int:
    return work["unet"] + cost.DECODE_ROWS * work["decode"] + cost.ENCODE_ROWS * work["encode"]


def resolved_guidance(engine: Engine, job: JobSpec) -> float:
    return job.guidance_scale if job.guidance_scale is not None else engine.model.sampling.guidance_scale


@pytest.mark.parametrize("fields", [
    {},
    {"count": 3, "sampler": "ddpm", "steps": 5},
    {"count": 2, "steps": 4, "sampler": "ddim", "guidance_scale": 1.0},
    {"count": 2, "steps": 3, "guidance_scale": 0.0, "animation": True, "animation_frames": 16},
    {"count": 9, "steps": 6, "animation": True, "animation_frames": 4},  # two chunks of max_batch
    {"count": 2, "steps": 3, "transition": True, "transition_frames": 3},
], ids=["default", "ddpm", "ddim-unguided", "trajectory", "chunks", "transition"])
def test_a_generations_rows_are_what_the_engine_evaluates(engine: Engine, fields: dict) -> None:
    job = JobSpec(attributes=SMILING, seed=3, steps=fields.pop("steps", 2), **fields)
    assert engine.model.sampling.guidance_scale not in (0.0, 1.0)  # the model's default guides, as counted

    work = counted_work(engine, lambda: engine.run(image_requests("job", job), job.sampler.value,
                                                   job.resolved_steps(), resolved_guidance(engine, job)))
    assert rows_of(work) == cost.job_rows(job), work


@pytest.mark.parametrize("fields", [
    {"count": 3, "steps": 4},
    {"count": 2, "steps": None},  # the student's default steps
    {"count": 2, "steps": 1, "guidance_scale": 0.0},
    {"count": 9, "steps": 2, "animation": True, "animation_frames": 16},  # two chunks; every step a frame
    {"count": 2, "steps": 2, "transition": True, "transition_frames": 3},
], ids=["steps", "default-steps", "unconditional", "trajectory", "transition"])
def test_a_student_jobs_rows_are_one_per_step_and_image(student_engine: Engine, fields: dict) -> None:
    job = JobSpec(attributes=SMILING, seed=3, sampler=Sampler.student, **fields)
    steps = job.resolved_steps()
    assert job.steps is not None or student_engine.student_info().default_steps == steps  # as the worker resolves

    work = counted_work(student_engine, lambda: student_engine.run(image_requests("job", job), "student", steps,
                                                                   resolved_guidance(student_engine, job)))
    assert work["unet"] == job.chains() * steps  # no guidance rows: the scale is the student's input
    assert rows_of(work) == cost.job_rows(job), work


@pytest.mark.parametrize(("strength", "steps", "animation"), [(0.6, 5, False), (1.0, 4, True), (0.0, 4, True)])
def test_an_edits_rows_are_what_the_engine_evaluates(engine: Engine, strength: float, steps: int,
                                                     animation: bool) -> None:
    job = EditParameters(attributes=SMILING, seed=1, steps=steps, strength=strength, animation=animation,
                         animation_frames=3)
    face = torch.randint(0, 256, (3, engine.model.image_size, engine.model.image_size), dtype=torch.uint8)

    work = counted_work(engine, lambda: engine.edit([edit_request("job", job, face)], steps, DEFAULT_EDIT_GUIDANCE,
                                                    strength))
    assert rows_of(work) == cost.job_rows(job), work
    assert work["encode"] == 1


def test_the_contract_repeats_the_inversion_rules() -> None:
    assert cost.INVERSION_ROWS_PER_STEP == 1 + DEFAULT_REFINEMENTS
    for steps in (1, 7, 50, 1000):
        for strength in (0.0, 0.25, 0.5, 0.6, 0.75, 1.0):
            assert cost.edit_depth(strength, steps) == inversion_depth(strength, steps)
