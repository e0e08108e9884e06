"""The one training loop both models share: resume, the step loop, logging, resumable state, RNG per rank.

A trainer owns what has state (modules, optimizers, the loss scaler, the batch stream, the named generators
and the EMA) and calls the model's ``step(step) -> {"loss": ..., ...}`` for each step. Everything it saves in
``run_dir/state.pt`` it restores, on every rank: torch's global RNG and each named generator per rank, CUDA's
RNG per rank on GPUs, so a resumed run continues exactly where it stopped.

A ``deadline`` (``time.monotonic()`` value) stops the loop after the first step that ends past it, with its state
saved, as if ``steps`` ended there; a later run from the same ``run_dir`` goes on from that step.

A step whose gradients hold NaN/Inf (in fp16, also a loss-scale overflow) changes no weight and is counted as
skipped; only ``nonfinite_patience`` skipped steps in a row stop the run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from .runtime import (
    EMA,
    BatchStream,
    Distributed,
    Log,
    gather_per_rank,
    load_state,
    optimizer_step,
    save_state,
    unwrap,
)


@dataclass(frozen=True)
class RunOptions:
    """Where and how a training run happens (not part of the model)."""

    data: Path
    checkpoints: Path
    run_dir: Path
    device: str = "auto"
    precision: str = "auto"
    export_dtype: str = "fp32"
    limit: int | None = None  # use only the first N training images (tests, quick trials)
    perceptual_weights: Path | None = None
    threads: int | None = None
    init_from: str | None = None  # exported version whose weights start the run (architecture taken from it)
    latent_cache: Path | None = None  # diffusion: folder of encoded training latents, reused across runs


StepFn = Callable[[int], dict[str, float]]  # step index -> scalars to log; "loss" is required


@dataclass
class Trainer:
    run_dir: Path
    steps: int
    log_every: int
    save_every: int
    ddp: Distributed
    device: torch.device
    modules: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    loss_scaling: bool  # fp16: each optimizer's loss is scaled by its own GradScaler
    stream: BatchStream
    generators: dict[str, torch.Generator] = field(default_factory=dict)  # per-rank streams (noise, flips)
    ema: EMA | None = None
    nonfinite_patience: int = 20  # skipped (NaN/Inf) steps in a row before the run fails
    deadline: float | None = None  # time.monotonic() after which the loop saves its state and stops

    def __post_init__(self) -> None:
        self.scalers = {name: torch.amp.GradScaler(self.device.type, enabled=self.loss_scaling)
                        for name in self.optimizers}
        self.skipped = 0  # steps skipped for NaN/Inf gradients, over the whole run
        self._skipped_now = False  # whether an optimizer skipped during the current step
        self.completed = 0  # steps done so far, resumed ones included (set by ``run``)

    def optimizer_step(self, name: str, loss: torch.Tensor, parameters: Iterator[nn.Parameter], clip: float) -> None:
        """Scaled backward and step of optimizer ``name`` (:func:`training.runtime.optimizer_step`); a skip is
        remembered for the current step."""
        if not optimizer_step(loss, self.optimizers[name], self.scalers[name], parameters, clip):
            self._skipped_now = True

    @property
    def state_path(self) -> Path:
        return self.run_dir / "state.pt"

    def _rng_states(self) -> dict[str, list[torch.Tensor]]:
        """Every RNG state of this rank, gathered from all ranks (collective: every rank calls it)."""
        states = {"torch": torch.get_rng_state(), **{k: g.get_state() for k, g in self.generators.items()}}
        if self.device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(self.device)
        return {name: gather_per_rank(state, self.ddp) for name, state in states.items()}

    def save(self, step: int) -> None:
        rng = self._rng_states()
        if not self.ddp.is_main:
            return
        save_state(self.state_path, {
            "step": step, "rng": rng, "stream": self.stream.state(), "skipped": self.skipped,
            "scalers": {k: scaler.state_dict() for k, scaler in self.scalers.items()},
            "modules": {k: unwrap(m).state_dict() for k, m in self.modules.items()},
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "ema": self.ema.model.state_dict() if self.ema else None})

    def resume(self) -> int:
        """Restore ``state.pt`` when the run directory has one; returns the step to start from."""
        if not self.state_path.is_file():
            return 0
        state = load_state(self.state_path)
        for name, module in self.modules.items():
            unwrap(module).load_state_dict(state["modules"][name])
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
        scalers = state["scalers"] if "scalers" in state else {"model": state["scaler"]}  # one scaler before
        for name, scaler in self.scalers.items():
            if name in scalers:
                scaler.load_state_dict(scalers[name])
        self.skipped = int(state.get("skipped", 0))
        self.stream.load(state["stream"])
        rank = self.ddp.rank
        torch.set_rng_state(state["rng"]["torch"][rank])
        for name, generator in self.generators.items():
            generator.set_state(state["rng"][name][rank])
        if self.device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"][rank], self.device)
        if self.ema is not None:
            self.ema.model.load_state_dict(state["ema"])
            self.ema.updates = state["step"] - self.skipped  # skipped steps update no EMA
        return int(state["step"])

    def _out_of_time(self) -> bool:
        """Whether the deadline has passed, on any rank (collective under DDP: every rank stops at the same step)."""
        if self.deadline is None:
            return False
        late = torch.tensor([float(time.monotonic() >= self.deadline)], device=self.device)
        if dist.is_initialized():
            dist.all_reduce(late, op=dist.ReduceOp.MAX)
        return bool(late.item())

    def run(self, step_fn: StepFn, desc: str) -> dict[str, Any]:
        """Resume, then run ``step_fn`` up to ``steps`` or the deadline; logs every ``log_every`` steps (main
        rank), saves every ``save_every`` and at the end. Returns the last logged scalars (empty when nothing was
        left to run); ``completed`` then holds the steps done."""
        start = self.completed = self.resume()
        log = Log(self.run_dir / "log.jsonl" if self.ddp.is_main else None)
        progress = tqdm(range(start, self.steps), initial=start, total=self.steps, disable=not self.ddp.is_main,
                        desc=desc)
        last: dict[str, Any] = {}
        in_a_row = 0
        for step in progress:
            self._skipped_now = False
            scalars = step_fn(step)
            in_a_row = in_a_row + 1 if self._skipped_now else 0
            self.skipped += self._skipped_now
            if in_a_row >= self.nonfinite_patience:
                raise FloatingPointError(f"{desc}: {in_a_row} steps in a row had NaN/Inf gradients (loss "
                                         f"{scalars['loss']}) up to step {step}; {self.skipped} skipped in all")
            if self.ema is not None and not self._skipped_now:
                self.ema.update(unwrap(self.modules["model"]))
            if (step + 1) % self.log_every == 0:
                last = {"step": step + 1, **scalars, "skipped_steps": self.skipped}
                log.write(**last)
                progress.set_postfix(loss=f"{scalars['loss']:.4f}")
            self.completed = step + 1
            out_of_time = self._out_of_time()
            if (step + 1) % self.save_every == 0 or step + 1 == self.steps or out_of_time:
                self.save(step + 1)
            if out_of_time:
                break
        return last
