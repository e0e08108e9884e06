"""Precision choice (why the CPU default is bf16 where native) and each rank's device under torchrun."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from facegen.model import device
from training import runtime


def first_image_alone_and_in_a_batch(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(32, 4, 3, 3, generator=generator).to(dtype)
    images = torch.randn(7, 4, 16, 16, generator=generator).to(dtype)
    return F.conv2d(images[:1], weight, padding=1), F.conv2d(images, weight, padding=1)[:1]


@pytest.mark.parametrize("native", [True, False])
def test_auto_on_cpu_is_bf16_where_it_is_native_else_fp32(monkeypatch, native: bool):
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: native)
    assert device.pick_dtype(torch.device("cpu"), "auto") == (torch.bfloat16 if native else torch.float32)


@pytest.mark.skipif(not device.cpu_has_native_bf16(), reason="this CPU emulates bf16")
def test_native_bf16_is_the_batch_invariant_precision():
    assert torch.equal(*first_image_alone_and_in_a_batch(torch.bfloat16))


def test_auto_is_fp16_on_cuda_and_explicit_choices_stand():
    assert device.pick_dtype(torch.device("cuda"), "auto") == torch.float16
    assert device.pick_dtype(torch.device("cpu"), "fp32") == torch.float32
    assert device.pick_dtype(torch.device("cpu"), "fp16") == torch.float16


@pytest.mark.parametrize("local_rank", [0, 1])
def test_each_rank_makes_its_own_gpu_current_before_joining_the_group(monkeypatch, local_rank: int) -> None:
    """torchrun on N GPUs: rank r works on cuda:LOCAL_RANK and binds the NCCL group to it (patched torch.cuda)."""
    calls: list[tuple] = []
    for name, value in {"WORLD_SIZE": "2", "RANK": str(local_rank), "LOCAL_RANK": str(local_rank)}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: None)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group",
                        lambda backend, device_id=None: calls.append(("init_process_group", backend, device_id)))
    monkeypatch.setattr(dist, "get_rank", lambda: local_rank)
    run_device, dtype, ddp = runtime.start_run("cuda", "auto", None, seed=0)
    own = torch.device("cuda", local_rank)
    assert calls == [("set_device", own), ("init_process_group", "nccl", own)]
    assert run_device == own and dtype == torch.float16 and (ddp.rank, ddp.world, ddp.local_rank) == (local_rank, 2, local_rank)


def test_cpu_ranks_join_gloo_without_a_device(monkeypatch) -> None:
    calls: list[tuple] = []
    for name, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group",
                        lambda backend, device_id=None: calls.append(("init_process_group", backend, device_id)))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    assert runtime.Distributed.from_env("cpu") == runtime.Distributed(1, 2, 1)
    assert calls == [("init_process_group", "gloo", None)]


def test_a_plain_run_joins_no_group(monkeypatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("joined a process group"))
    assert runtime.Distributed.from_env("cuda") == runtime.Distributed()
