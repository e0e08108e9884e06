"""Attribute transitions and first_index on the engine with a tiny checkpoint: the frames share the noise, run
from the opposite condition to the requested one in order, and end on the job's image bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from facegen.contract.spec import MAX_TRANSITION_CHAINS, JobSpec
from facegen.model.device import cpu_has_native_bf16
from facegen.model.transitions import frame_weights
from training.evaluation.transitions import sample_transition
from worker.engine import Engine, ImageRequest
from worker.transition import transition_output, transition_requests

STEPS = 5


@pytest.fixture(scope="module")
def engine(tiny_checkpoints: Path) -> Engine:
    return Engine(tiny_checkpoints, "latest", device="cpu", precision="auto", max_batch=64)


def assert_same_picture(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bit-identical where the engine is batch-invariant (README "Same seed, same pixels"), else within rounding."""
    assert torch.equal(a, b) or (not cpu_has_native_bf16() and (a.float() - b.float()).abs().mean() < 1.0)


def images(engine: Engine, request: ImageRequest) -> torch.Tensor:
    outputs, _ = engine.run([request], "dpmpp", STEPS, 3.0)
    return outputs[request.key].images


def test_integral_float_labels_embed_exactly_as_integer_labels(engine: Engine) -> None:
    embedding = engine.model.unet.label_embedding
    labels = torch.tensor([[0], [1], [2]])
    assert torch.equal(embedding(labels), embedding(labels.float()))
    halfway = embedding(torch.tensor([[0.5]]))
    expected = (embedding(torch.tensor([[0]])).float() + embedding(torch.tensor([[1]])).float()) / 2
    # the engine's precision (bf16 on a CPU with native bf16) rounds the blend once: ~0.4% of a value
    tolerance = {"rtol": 1e-2, "atol": 1e-2} if halfway.dtype == torch.bfloat16 else {}
    torch.testing.assert_close(halfway.float(), expected, **tolerance)


@pytest.mark.parametrize("wanted", [True, False])
def test_frames_go_from_the_opposite_condition_to_the_image_in_order(engine: Engine, wanted: bool) -> None:
    spec = JobSpec(attributes={"Smiling": wanted}, seed=11, count=2, transition=True, transition_frames=4)
    outputs, stats = engine.run(transition_requests("t", spec), "dpmpp", STEPS, 3.0)
    output = transition_output(outputs, "t", spec)
    assert stats.images == 8 and len(output.frames) == 4
    assert all(frame.shape == (2, 3, 64, 64) and frame.dtype == torch.uint8 for frame in output.frames)
    assert torch.equal(output.images, output.frames[-1])
    assert_same_picture(output.images, images(engine, ImageRequest("p", {"Smiling": wanted}, 11, 2)))
    assert_same_picture(output.frames[0], images(engine, ImageRequest("o", {"Smiling": not wanted}, 11, 2)))
    third = 2 / 3 if wanted else 1 - 2 / 3  # frame 2 of 4 is two thirds of the way to the target
    assert_same_picture(output.frames[2], images(engine, ImageRequest("m", {"Smiling": third}, 11, 2)))
    assert not torch.equal(output.frames[0], output.frames[-1])


def test_the_evaluation_samples_the_frames_the_worker_serves(engine: Engine) -> None:
    spec = JobSpec(attributes={"Smiling": True}, seed=4, count=2, transition=True, transition_frames=3)
    outputs, _ = engine.run(transition_requests("t", spec), "dpmpp", STEPS, 3.0)
    served = transition_output(outputs, "t", spec).frames
    measured = sample_transition(engine.model, spec.attributes, [(4, 0), (4, 1)], 3, "dpmpp", STEPS, 3.0)
    assert measured.shape == (3, 2, 3, 64, 64)
    for frame in range(3):
        assert_same_picture(measured[frame], served[frame])


def test_frame_weights_are_even_and_exact_at_both_ends() -> None:
    assert frame_weights(2) == [0.0, 1.0]
    assert frame_weights(5) == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_first_index_selects_one_image_of_a_grid(engine: Engine) -> None:
    grid = images(engine, ImageRequest("g", {"Smiling": True}, 21, 4))
    alone = images(engine, ImageRequest("a", {"Smiling": True}, 21, 1, first_index=2))
    assert_same_picture(alone[0], grid[2])
    assert not torch.equal(alone[0], grid[0])


def test_the_spec_refuses_a_transition_with_an_animation_or_too_many_chains() -> None:
    with pytest.raises(ValidationError, match="transition and animation are exclusive"):
        JobSpec(attributes={"Smiling": True}, seed=1, transition=True, animation=True)
    with pytest.raises(ValidationError, match="transition_frames"):
        JobSpec(attributes={"Smiling": True}, seed=1, count=MAX_TRANSITION_CHAINS, transition=True)
    assert JobSpec(attributes={"Smiling": True}, seed=1, count=4, transition=True, transition_frames=16).chains() == 64
