"""The engine on a tiny checkpoint: seed-exact images whatever the batching, true reverse trajectories."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.diffusion.samplers import trajectory_indices
from worker.engine import Engine, ImageRequest, OutOfMemory


@pytest.fixture(scope="module")
def engine(tiny_checkpoints: Path) -> Engine:
    return Engine(tiny_checkpoints, "latest", device="cpu", precision="auto", max_batch=64)


def run(engine: Engine, requests: list[ImageRequest], max_batch: int, steps: int = 6, sampler: str = "dpmpp"):
    engine.max_batch = max_batch
    outputs, stats = engine.run(requests, sampler, steps, 3.0)
    return outputs, stats


def test_same_seed_same_pixels_whatever_count_chunking_or_company(engine: Engine) -> None:
    alone, _ = run(engine, [ImageRequest("a", {"Smiling": True}, seed=42, count=1)], max_batch=64)
    bigger, stats = run(engine, [ImageRequest("x", {"Smiling": False}, seed=1, count=3),
                                 ImageRequest("b", {"Smiling": True}, seed=42, count=4)], max_batch=3)
    assert stats.chunks == 3 and stats.images == 7
    assert torch.equal(alone["a"].images[0], bigger["b"].images[0])
    assert not torch.equal(bigger["b"].images[0], bigger["b"].images[1])  # image index changes the noise
    assert bigger["x"].images.shape == (3, 3, 64, 64) and bigger["x"].images.dtype == torch.uint8


def test_label_changes_the_image(engine: Engine) -> None:
    out, _ = run(engine, [ImageRequest("s", {"Smiling": True}, 7, 1), ImageRequest("n", {"Smiling": False}, 7, 1)], 64)
    assert not torch.equal(out["s"].images, out["n"].images)


@pytest.mark.parametrize(("steps", "frames", "expected"), [(20, 5, [0, 6, 13, 19]), (3, 16, [0, 1, 2]),
                                                             (10, 2, [9]), (1, 4, [0])])
def test_trajectory_indices(steps: int, frames: int, expected: list[int]) -> None:
    assert trajectory_indices(steps, frames) == expected


def high_frequency(images: torch.Tensor) -> float:
    """Mean absolute difference between neighbouring pixels (noise is rough, faces are smooth)."""
    x = images.float()
    return float((x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean())


def test_trajectory_starts_from_noise_and_ends_at_the_sample(engine: Engine) -> None:
    out, _ = run(engine, [ImageRequest("g", {"Smiling": True}, 3, 2, frames=5),
                          ImageRequest("p", {"Smiling": True}, 4, 1)], max_batch=64, steps=12)
    frames = out["g"].frames
    assert len(frames) == 5 and all(f.shape == (2, 3, 64, 64) for f in frames)
    assert torch.equal(frames[-1], out["g"].images)
    assert high_frequency(frames[0]) > high_frequency(frames[-1])
    assert out["p"].frames == []


def test_unknown_attribute_is_refused(engine: Engine) -> None:
    with pytest.raises(ValueError, match="unknown attribute"):
        run(engine, [ImageRequest("z", {"Wearing_Hat": True}, 1, 1)], 64)


def test_out_of_memory_splits_the_batch_and_keeps_images(engine: Engine, monkeypatch) -> None:
    expected, _ = run(engine, [ImageRequest("m", {"Smiling": True}, 9, 4)], max_batch=64)
    real = engine.model.sample_latents

    def tight_memory(labels, *args, **kwargs):  # fault injection: a device that fits one image at a time
        if labels.shape[0] > 1:
            raise torch.OutOfMemoryError("simulated")
        return real(labels, *args, **kwargs)

    monkeypatch.setattr(engine.model, "sample_latents", tight_memory)
    split, _ = run(engine, [ImageRequest("m", {"Smiling": True}, 9, 4)], max_batch=64)
    assert torch.equal(split["m"].images, expected["m"].images)
    monkeypatch.setattr(engine.model, "sample_latents", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError()))
    with pytest.raises(OutOfMemory, match="single image"):
        run(engine, [ImageRequest("m", {"Smiling": True}, 9, 1)], max_batch=64)


def test_non_finite_decode_falls_back_to_a_wider_dtype(engine: Engine, monkeypatch) -> None:
    real = engine.model.decode
    dtypes: list[torch.dtype | None] = []

    def flaky_decode(latents, dtype=None):  # fault injection: the fast dtype overflows
        dtypes.append(dtype)
        images = real(latents, dtype)
        return images * float("nan") if dtype is None else images

    monkeypatch.setattr(engine.model, "decode", flaky_decode)
    out, stats = run(engine, [ImageRequest("f", {"Smiling": True}, 1, 2)], max_batch=64)
    assert stats.precision_fallbacks == 1 and dtypes == [None, torch.float32]
    assert out["f"].images.shape == (2, 3, 64, 64)


@pytest.mark.timeout(600)
def test_compiled_unet_gives_the_eager_images(tiny_checkpoints: Path, engine: Engine) -> None:
    """COMPILE=default (inductor with frozen, pre-packed weights on CPU) changes speed, not pictures."""
    compiled = Engine(tiny_checkpoints, "latest", device="cpu", precision="auto", max_batch=4, compile_mode="default")
    requests = [ImageRequest("a", {"Smiling": True}, seed=3, count=2), ImageRequest("b", {"Smiling": False}, 4, 2)]
    fast, _ = run(compiled, requests, max_batch=4)
    eager, _ = run(engine, requests, max_batch=4)
    for key in ("a", "b"):
        difference = (fast[key].images.int() - eager[key].images.int()).abs().float()
        assert difference.mean() < 2.0, difference.mean()  # bf16 rounding differs; the image does not
    assert not torch.equal(fast["a"].images, fast["b"].images)
