"""Precision choice: why the CPU default is bf16."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training import runtime


def first_image_alone_and_in_a_batch(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(32, 4, 3, 3, generator=generator).to(dtype)
    images = torch.randn(7, 4, 16, 16, generator=generator).to(dtype)
    return F.conv2d(images[:1], weight, padding=1), F.conv2d(images, weight, padding=1)[:1]


def test_auto_is_bf16_on_cpu_the_batch_invariant_precision():
    dtype = runtime.pick_dtype(torch.device("cpu"), "auto")
    assert dtype == torch.bfloat16
    assert torch.equal(*first_image_alone_and_in_a_batch(dtype))


def test_auto_is_fp16_on_cuda_and_explicit_choices_stand():
    assert runtime.pick_dtype(torch.device("cuda"), "auto") == torch.float16
    assert runtime.pick_dtype(torch.device("cpu"), "fp32") == torch.float32
    assert runtime.pick_dtype(torch.device("cpu"), "fp16") == torch.float16
