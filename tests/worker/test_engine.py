"""The engine on a tiny checkpoint: seed-exact images whatever the batching, true reverse trajectories."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from facegen.model.device import cpu_has_native_bf16
from facegen.model.diffusion.samplers import trajectory_indices
from worker.engine import (
    Bucketed,
    CompileUnsupported,
    Engine,
    ImageRequest,
    NonFiniteOutput,
    OutOfMemory,
    bucket_sizes,
    check_compile_supported,
)
from worker.metrics import WorkerMetrics


@pytest.fixture(scope="module")
def engine(tiny_checkpoints: Path) -> Engine:
    return Engine(tiny_checkpoints, "latest", device="cpu", precision="auto", max_batch=64)


@pytest.fixture(scope="module")
def bf16_engine(tiny_checkpoints: Path) -> Engine:
    """An engine in a precision narrower than fp32 on every CPU (emulated where the CPU lacks bf16), so that its
    non-finite rows have a wider dtype to be redone in (``precision=auto`` is fp32 on CPUs without native bf16)."""
    return Engine(tiny_checkpoints, "latest", device="cpu", precision="bf16", max_batch=64)


def assert_same_images(first: torch.Tensor, second: torch.Tensor) -> None:
    """``uint8 [N, 3, H, W]`` computed in different batches: bit-identical where the engine's CPU precision is
    batch-invariant (native bf16, ``facegen.model.device.pick_dtype``); elsewhere oneDNN's fp32 kernels change with the
    batch size, and the pictures agree to within rounding."""
    if cpu_has_native_bf16():
        assert torch.equal(first, second)
    else:
        assert (first.float() - second.float()).abs().mean() < 1.0


def run(engine: Engine, requests: list[ImageRequest], max_batch: int, steps: int = 6, sampler: str = "dpmpp"):
    engine.max_batch = max_batch
    outputs, stats = engine.run(requests, sampler, steps, 3.0)
    return outputs, stats


def test_same_seed_same_pixels_whatever_count_chunking_or_company(engine: Engine) -> None:
    alone, _ = run(engine, [ImageRequest("a", {"Smiling": True}, seed=42, count=1)], max_batch=64)
    bigger, stats = run(engine, [ImageRequest("x", {"Smiling": False}, seed=1, count=3),
                                 ImageRequest("b", {"Smiling": True}, seed=42, count=4)], max_batch=3)
    assert stats.chunks == 3 and stats.images == 7
    assert_same_images(alone["a"].images[0], bigger["b"].images[0])
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
    assert_same_images(split["m"].images, expected["m"].images)
    monkeypatch.setattr(engine.model, "sample_latents", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError()))
    with pytest.raises(OutOfMemory, match="single image"):
        run(engine, [ImageRequest("m", {"Smiling": True}, 9, 1)], max_batch=64)


class BadRow(torch.nn.Module):
    """Fault injection: a UNet whose output row 0 (image 0's conditional row) overflows to ``value``."""

    def __init__(self, unet: torch.nn.Module, value: float):
        super().__init__()
        self.unet, self.value = unet, value

    def forward(self, x, t, labels):
        out = self.unet(x, t, labels).clone()
        out[0] = self.value
        return out


@pytest.mark.parametrize("value", [float("nan"), float("inf")])  # Inf: the samplers' x0 clamp must not hide it
def test_unet_overflow_in_one_row_redoes_that_row_in_a_wider_dtype(bf16_engine: Engine, monkeypatch,
                                                                  value: float) -> None:
    requests = [ImageRequest("o", {"Smiling": True}, 5, 3, frames=3)]
    clean, _ = run(bf16_engine, requests, max_batch=64)
    monkeypatch.setattr(bf16_engine, "denoiser", BadRow(bf16_engine.model.unet, value))
    out, stats = run(bf16_engine, requests, max_batch=64)
    assert stats.precision_fallbacks == {"unet": 1, "decoder": 0}
    assert torch.equal(out["o"].images[1:], clean["o"].images[1:])  # only the overflowing row is redone
    redone = out["o"].images[0].float()
    assert (redone - clean["o"].images[0].float()).abs().mean() < 8  # fp32 of the same image, not junk
    assert torch.equal(out["o"].frames[-1], out["o"].images)  # its trajectory was redone with it
    assert not torch.equal(out["o"].frames[0][0], out["o"].frames[1][0])


def test_a_row_that_stays_non_finite_fails_the_run(bf16_engine: Engine, monkeypatch) -> None:
    wider = bf16_engine.model.in_dtype
    monkeypatch.setattr(bf16_engine, "denoiser", BadRow(bf16_engine.model.unet, float("nan")))
    monkeypatch.setattr(bf16_engine.model, "in_dtype", lambda part, dtype: BadRow(wider(part, dtype), float("nan")))
    with pytest.raises(NonFiniteOutput, match="unet gave NaN/Inf for 1 of 2 images even in float32"):
        run(bf16_engine, [ImageRequest("n", {"Smiling": True}, 1, 2)], max_batch=64)


def test_non_finite_pixels_are_caught_before_the_clamp_and_decoded_again(bf16_engine: Engine, monkeypatch) -> None:
    real = bf16_engine.model.decode
    calls: list[tuple[torch.dtype | None, int, bool]] = []

    def overflowing_decode(latents, dtype=None, clamp=True):  # fault injection: the fast dtype overflows in row 1
        calls.append((dtype, latents.shape[0], clamp))
        images = real(latents, dtype, clamp)
        if dtype is None:
            images[1] = float("inf")  # a clamp would make this a white image
        return images

    expected, _ = run(bf16_engine, [ImageRequest("f", {"Smiling": True}, 1, 3)], max_batch=64)
    monkeypatch.setattr(bf16_engine.model, "decode", overflowing_decode)
    out, stats = run(bf16_engine, [ImageRequest("f", {"Smiling": True}, 1, 3)], max_batch=64)
    assert stats.precision_fallbacks == {"unet": 0, "decoder": 1}
    assert calls == [(None, 3, False), (torch.float32, 1, False)]  # only the bad row, in fp32
    assert torch.equal(out["f"].images[[0, 2]], expected["f"].images[[0, 2]])
    assert (out["f"].images[1].float() - expected["f"].images[1].float()).abs().mean() < 8
    assert bf16_engine.fallback_dtypes() == [torch.float32]


class RowRecorder(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet, self.rows = unet, []

    def forward(self, x, t, labels):
        self.rows.append(x.shape[0])
        return self.unet(x, t, labels)


def test_padded_buckets_give_the_unpadded_images_and_warm_up_runs_every_bucket(engine: Engine,
                                                                               monkeypatch) -> None:
    requests = [ImageRequest("a", {"Smiling": True}, 11, 3), ImageRequest("b", {"Smiling": False}, 12, 2)]
    plain, _ = run(engine, requests, max_batch=4)  # chunks of 4 and 1 images: 8 and 2 guided UNet rows
    recorder = RowRecorder(engine.model.unet)
    monkeypatch.setattr(engine, "buckets", bucket_sizes(3))
    monkeypatch.setattr(engine, "denoiser", Bucketed(recorder, engine.buckets))
    padded, _ = run(engine, requests, max_batch=3)  # chunks of 3 and 2 images: 6 -> 8 and 4 rows
    assert engine.buckets == [1, 2, 4, 8] and set(recorder.rows) == {8, 4}
    for key in ("a", "b"):
        assert_same_images(padded[key].images, plain[key].images)
    recorder.rows.clear()
    warmed: list[int] = []
    seconds = engine.warm_up(lambda rows, s: warmed.append(rows))
    assert warmed == list(seconds) == [1, 2, 4, 8] and recorder.rows == [1, 1, 2, 2, 4, 4, 8, 8]


def test_compile_is_refused_in_one_line_without_its_toolchain(tiny_checkpoints: Path, monkeypatch) -> None:
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(CompileUnsupported, match=r"COMPILE needs a C\+\+ compiler .* set COMPILE=off"):
        Engine(tiny_checkpoints, "latest", device="cpu", compile_mode="default")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CompileUnsupported, match="needs Triton"):
        check_compile_supported(torch.device("cuda"))
    monkeypatch.setenv("CXX", "/opt/my-g++")
    check_compile_supported(torch.device("cpu"))  # an explicit compiler is enough


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


def test_precision_fallbacks_are_counted_by_stage() -> None:
    metrics = WorkerMetrics()
    metrics.count_precision_fallbacks({"unet": 2, "decoder": 0})
    metrics.count_precision_fallbacks({"unet": 0, "decoder": 1})
    value = metrics.registry.get_sample_value
    assert value("facegen_worker_precision_fallbacks_total", {"stage": "unet"}) == 2
    assert value("facegen_worker_precision_fallbacks_total", {"stage": "decoder"}) == 1
