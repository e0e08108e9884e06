"""Device and precision choice."""

from __future__ import annotations

import pytest
import torch

from training import runtime


@pytest.mark.parametrize(("amx", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_precision_on_cpu_is_bf16_only_with_amx(monkeypatch, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert runtime.pick_dtype(torch.device("cpu"), "auto") == expected


def test_auto_precision_on_cuda_is_fp16_and_explicit_choices_stand():
    assert runtime.pick_dtype(torch.device("cuda"), "auto") == torch.float16
    assert runtime.pick_dtype(torch.device("cpu"), "bf16") == torch.bfloat16
    assert runtime.pick_dtype(torch.device("cpu"), "fp16") == torch.float16
    with pytest.raises(ValueError, match="precision must be one of"):
        runtime.pick_dtype(torch.device("cpu"), "int8")
