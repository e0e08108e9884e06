"""The engine serving a version with its distilled student (a tiny one, 2 distillation iterations): which versions
it serves, one student row per step, seed streams, trajectories, transitions, and the samplers keeping to their own
networks."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from facegen.contract.spec import JobSpec
from facegen.model.checkpoints import (
    LATEST,
    CheckpointError,
    derive_checkpoint,
    list_versions,
    load_checkpoint,
    served_versions,
)
from facegen.model.device import cpu_has_native_bf16
from facegen.model.diffusion.noise import ImageNoise
from worker.engine import Bucketed, Engine, ImageRequest, NoStudent, bucket_sizes
from worker.transition import transition_output, transition_requests

STEPS = 4
GUIDANCE = 3.0


@pytest.fixture(scope="module")
def engine(tiny_student_checkpoints: Path) -> Engine:
    return Engine(tiny_student_checkpoints, LATEST, device="cpu", precision="auto", max_batch=64)


def assert_same_picture(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bit-identical where the engine is batch-invariant (README "Same seed, same pixels"), else within rounding."""
    assert torch.equal(a, b) or (not cpu_has_native_bf16() and (a.float() - b.float()).abs().mean() < 1.0)


def student_images(engine: Engine, *requests: ImageRequest, steps: int = STEPS, guidance: float = GUIDANCE):
    outputs, stats = engine.run(list(requests), "student", steps, guidance)
    return outputs, stats


def test_latest_serves_the_newest_plain_version_beside_its_newest_student(tiny_student_checkpoints: Path,
                                                                          tiny_checkpoints: Path,
                                                                          engine: Engine, tmp_path: Path) -> None:
    newest = list_versions(tiny_student_checkpoints, "diffusion")[-1]  # exported after its teacher
    assert newest.distillation is not None and newest.distillation.teacher == engine.version
    # `latest` is the teacher for the trainers too: a student is named, or served beside it
    assert load_checkpoint(tiny_student_checkpoints, "diffusion", LATEST).version == engine.version
    assert engine.student.version == newest.version and not engine.model.is_student and engine.student.is_student
    assert engine.student.vae is engine.model.vae  # one VAE decodes both
    assert served_versions(tiny_student_checkpoints, engine.version) == (engine.version, newest.version)
    assert served_versions(tiny_checkpoints, LATEST)[1] is None  # no student: none served (other tests train more)
    with pytest.raises(CheckpointError, match=f"is a distilled student: serve its teacher {engine.version}"):
        served_versions(tiny_student_checkpoints, newest.version)

    root = tmp_path / "ck"
    shutil.copytree(tiny_student_checkpoints, root)
    newer = derive_checkpoint(root, "diffusion", newest.version).name  # a second student of the same teacher
    assert served_versions(root, LATEST) == (engine.version, newer)
    info = Engine(root, LATEST, device="cpu").student_info()
    assert info.version == newer and (info.max_steps, info.default_steps, info.guidance_range) == (8, 4, (1.0, 8.0))


def test_the_student_sampler_runs_the_student_and_the_others_the_served_model(engine: Engine,
                                                                             tiny_checkpoints: Path) -> None:
    request = ImageRequest("a", {"Smiling": True}, seed=3, count=2)
    student, stats = student_images(engine, request)
    plain, _ = engine.run([request], "dpmpp", STEPS, GUIDANCE)
    assert student["a"].images.shape == (2, 3, 64, 64) and stats.denoiser_steps == STEPS
    assert not torch.equal(student["a"].images, plain["a"].images)

    labels, noise = torch.ones(1, 1), ImageNoise([(3, 0)])
    with pytest.raises(ValueError, match="is a distilled student: it samples with the 'student' sampler only"):
        engine.student.sample_latents(labels, noise, "dpmpp", STEPS, GUIDANCE)
    with pytest.raises(ValueError, match="runs a distilled student's network; version .* is a plain model"):
        engine.model.sample_latents(labels, noise, "student", STEPS, GUIDANCE)
    with pytest.raises(NoStudent, match="has no distilled student in the worker's checkpoints"):
        Engine(tiny_checkpoints, LATEST, device="cpu").run([request], "student", STEPS, GUIDANCE)


def test_same_seed_same_pixels_at_any_batch_and_steps_change_the_picture(engine: Engine) -> None:
    alone, _ = student_images(engine, ImageRequest("a", {"Smiling": True}, seed=42, count=1))
    engine.max_batch = 2
    try:
        shared, stats = student_images(engine, ImageRequest("x", {"Smiling": False}, seed=1, count=3),
                                       ImageRequest("b", {"Smiling": True}, seed=42, count=2))
    finally:
        engine.max_batch = 64
    assert stats.chunks == 3
    assert_same_picture(alone["a"].images[0], shared["b"].images[0])
    assert not torch.equal(shared["b"].images[0], shared["b"].images[1])
    two_steps, _ = student_images(engine, ImageRequest("a", {"Smiling": True}, seed=42, count=1), steps=2)
    assert not torch.equal(two_steps["a"].images, alone["a"].images)


def test_guidance_zero_is_the_students_unconditional_output(engine: Engine) -> None:
    smiling, not_smiling = (ImageRequest(key, {"Smiling": wanted}, seed=8, count=1)
                            for key, wanted in (("s", True), ("n", False)))
    unconditional, _ = student_images(engine, smiling, not_smiling, guidance=0.0)
    assert torch.equal(unconditional["s"].images, unconditional["n"].images)  # the same rows: null labels
    guided, _ = student_images(engine, smiling, not_smiling)
    assert not torch.equal(guided["s"].images, guided["n"].images)


def test_an_animation_has_the_noise_then_every_steps_prediction(engine: Engine) -> None:
    outputs, _ = student_images(engine, ImageRequest("a", {"Smiling": True}, seed=5, count=2, frames=16),
                                ImageRequest("b", {"Smiling": True}, seed=6, count=1))
    frames = outputs["a"].frames
    assert len(frames) == STEPS + 1 and all(frame.shape == (2, 3, 64, 64) for frame in frames)
    assert torch.equal(frames[-1], outputs["a"].images)  # the last step's prediction is the sample
    plain, _ = engine.run([ImageRequest("p", {"Smiling": True}, seed=5, count=2, frames=16)], "ddpm", STEPS, GUIDANCE)
    assert torch.equal(frames[0], plain["p"].frames[0])  # the same x_T as any sampler's, decoded
    assert len({frame.numpy().tobytes() for frame in frames}) == STEPS + 1
    assert outputs["b"].frames == []


def test_a_transition_ends_on_the_students_image(engine: Engine) -> None:
    spec = JobSpec(attributes={"Smiling": True}, seed=11, count=2, sampler="student", transition=True,
                   transition_frames=3)
    outputs, stats = student_images(engine, *transition_requests("t", spec))
    output = transition_output(outputs, "t", spec)
    assert stats.images == 6 and len(output.frames) == 3
    alone, _ = student_images(engine, ImageRequest("i", {"Smiling": True}, seed=11, count=2))
    assert_same_picture(output.images, alone["i"].images)
    assert not torch.equal(output.frames[0], output.frames[-1])


class RowRecorder(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet
        self.rows: list[tuple[int, bool]] = []  # (rows, given a guidance scale)

    def forward(self, x, t, labels, guidance=None):
        self.rows.append((x.shape[0], guidance is not None))
        return self.unet(x, t, labels, guidance=guidance)


def test_padded_buckets_pad_the_guidance_input_and_warm_up_runs_the_student(engine: Engine, monkeypatch) -> None:
    requests = [ImageRequest("a", {"Smiling": True}, 11, 3), ImageRequest("b", {"Smiling": False}, 12, 2)]
    plain, _ = student_images(engine, *requests)
    recorder = RowRecorder(engine.student.unet)
    monkeypatch.setattr(engine, "buckets", bucket_sizes(3))
    monkeypatch.setattr(engine, "student_denoiser", Bucketed(recorder, engine.buckets))
    padded, _ = student_images(engine, *requests)  # 5 rows (one per image) -> 8
    assert set(recorder.rows) == {(8, True)}
    for key in ("a", "b"):
        assert_same_picture(padded[key].images, plain[key].images)
    recorder.rows.clear()
    seconds = engine.warm_up()
    assert list(seconds) == [1, 2, 4, 8] and [rows for rows, _ in recorder.rows] == [1, 1, 2, 2, 4, 4, 8, 8]


@pytest.mark.slow  # inductor compiles both networks
@pytest.mark.timeout(900)
def test_a_compiled_student_gives_the_eager_images(tiny_student_checkpoints: Path, engine: Engine) -> None:
    """COMPILE=default compiles the student beside the served model; its chunks (2 images, then 1) compile the
    buckets they use (warming every bucket up is tested above, eagerly)."""
    compiled = Engine(tiny_student_checkpoints, LATEST, device="cpu", precision="auto", max_batch=2,
                      compile_mode="default")
    assert isinstance(compiled.student_denoiser, Bucketed)
    requests = [ImageRequest("a", {"Smiling": True}, seed=3, count=2), ImageRequest("b", {"Smiling": False}, 4, 1)]
    fast, _ = student_images(compiled, *requests)
    eager, _ = student_images(engine, *requests)
    for key in ("a", "b"):
        difference = (fast[key].images.int() - eager[key].images.int()).abs().float()
        assert difference.mean() < 2.0, difference.mean()  # bf16 rounding differs; the image does not
