"""What both training loops share: device and precision, DDP under torchrun, EMA, resumable state, batches."""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from facegen.model.device import pick_device, pick_dtype


@dataclass
class Distributed:
    """Process-group facts; a plain run is rank 0 of 1."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device_type: str) -> Distributed:
        """Join the process group when launched by ``torchrun`` (gloo on CPU, nccl on CUDA; also with one process,
        so a one-GPU run takes the collective paths). On CUDA each process first makes its local rank's GPU current
        and binds the group to it (``device_id``), so collectives such as ``all_gather_object`` run on that GPU and
        not every rank on ``cuda:0``."""
        if "RANK" not in os.environ:
            return cls()
        world = int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device_id = None
        if device_type == "cuda":
            device_id = torch.device("cuda", local_rank)
            torch.cuda.set_device(device_id)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo", device_id=device_id)
        return cls(dist.get_rank(), world, local_rank)

    def close(self) -> None:
        """Leave the process group together: a barrier first, so that no rank tears down its side of the group and
        exits while another still exports (gloo aborts a process whose group dies under it)."""
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


class EMA:
    """Exponential moving average of a module's parameters: ``ema = d_k * ema + (1 - d_k) * param`` with the
    warm-up ``d_k = min(decay, (1 + k) / (10 + k))`` at update ``k``, so early random weights fade out fast."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        for ema_p, p in zip(self.model.parameters(), model.parameters(), strict=True):
            ema_p.lerp_(p.detach(), 1 - decay)


def start_run(device_name: str, precision: str, threads: int | None, seed: int
              ) -> tuple[torch.device, torch.dtype, Distributed]:
    """Device (this rank's GPU under torchrun), compute dtype and process group of a training run; seeds torch's
    global generator per rank."""
    device = pick_device(device_name)
    dtype = pick_dtype(device, precision)
    if threads:
        torch.set_num_threads(threads)
    ddp = Distributed.from_env(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", ddp.local_rank)
    torch.manual_seed(seed * 1000 + ddp.rank)
    return device, dtype, ddp


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   parameters: Iterator[nn.Parameter], clip: float) -> bool:
    """Backward through the (possibly loss-scaled) loss, unscale, clip the true gradient norm, step.

    Returns False when the step was skipped because the gradients hold NaN/Inf (a non-finite loss gives such
    gradients): the loss scaler, when on, skips it and lowers its scale; without one, the optimizer is not stepped.
    Under DDP the gradients are all-reduced first, so every rank decides the same."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones
    norm = torch.nn.utils.clip_grad_norm_(parameters, clip)
    if scaler.is_enabled():
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        return scaler.get_scale() >= scale  # the scale only drops after a skipped (overflowing) step
    if not bool(torch.isfinite(norm)):
        return False
    optimizer.step()
    return True


def gather_per_rank(value: Any, ddp: Distributed) -> list[Any]:
    """``value`` from every rank, in rank order (e.g. RNG states for an exact resume)."""
    if not dist.is_initialized():
        return [value]
    values: list[Any] = [None] * ddp.world
    dist.all_gather_object(values, value)
    return values


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@dataclass
class BatchStream:
    """Endless shuffled mini-batch indices over ``size`` items; each rank takes its slice of every global batch.

    Identical on every rank for a seed (the permutation generator is shared); its state resumes exactly.
    ``weights`` (``float [size]``, >= 0): each pass over the data draws its ``size`` indices with replacement in
    proportion to them (an item of weight 2 comes twice as often as one of weight 1) instead of a permutation.
    """

    size: int
    batch_size: int
    seed: int
    distributed: Distributed = field(default_factory=Distributed)
    weights: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.batch_size % self.distributed.world:
            raise ValueError(f"batch size {self.batch_size} is not divisible by {self.distributed.world} processes")
        if self.weights is not None and self.weights.shape != (self.size,):
            raise ValueError(f"weights of shape {tuple(self.weights.shape)} for {self.size} items")
        self.generator = torch.Generator().manual_seed(self.seed)
        self._order = self._draw()
        self._position = 0

    def _draw(self) -> torch.Tensor:
        """The next pass's order of indices ``int64 [size]``."""
        if self.weights is None:
            return torch.randperm(self.size, generator=self.generator)
        return torch.multinomial(self.weights.double(), self.size, replacement=True, generator=self.generator)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        if self._position + self.batch_size > self.size:
            self._order = self._draw()
            self._position = 0
        batch = self._order[self._position:self._position + self.batch_size]
        self._position += self.batch_size
        per_rank = self.batch_size // self.distributed.world
        return batch[self.distributed.rank * per_rank:(self.distributed.rank + 1) * per_rank]

    def state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "order": self._order, "position": self._position}

    def load(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self._order, self._position = state["order"], int(state["position"])


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Resumable training state (tensors and plain values only), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: Path) -> dict[str, Any]:
    """Read a state saved by :func:`save_state`; ``weights_only`` refuses anything but tensors and containers."""
    return torch.load(path, map_location="cpu", weights_only=True)


def cached_tensors(path: Path | None, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``compute()``'s named tensors, kept in the file ``path`` and read from there when it exists (work that later
    runs repeat on the same inputs: encoded training latents, Inception features of a fixed image set); ``path=None``:
    no cache. The caller's file name must identify the inputs."""
    if path is not None and path.is_file():
        print(f"read from the cache {path}", flush=True)
        return load_state(path)
    tensors = compute()
    if path is not None:
        save_state(path, tensors)  # atomic: a run killed mid-write leaves no half file under the real name
    return tensors


class Log:
    """JSON-lines training log (main rank only) with wall-clock time since start."""

    def __init__(self, path: Path | None):
        self.path = path
        self.start = time.monotonic()
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record: Any) -> None:
        if self.path:
            record = {"elapsed_s": round(time.monotonic() - self.start, 1), **record}
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
