"""Jump students: the network takes where its step lands, learns the x0 whose DDIM step reaches the teacher's chain
there, and the served sampler steps deterministically along its jumps."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from facegen.model.checkpoints import load_checkpoint
from facegen.model.config import ConsistencyConfig, DistillConfig, InvalidConfig, ScheduleConfig
from facegen.model.diffusion.consistency import ConsistencySampler, jump_steps
from facegen.model.diffusion.noise import ImageNoise
from facegen.model.diffusion.schedule import NoiseSchedule, eps_from_x0
from facegen.model.pipeline import LatentDiffusion
from tests.training.test_distill import SHAPE, noisy_teacher
from training.distill import DistillError, distill, student_from_teacher
from training.trainer import RunOptions
from training.trajectories import (
    TrajectoryStep,
    bank_folder,
    fill_bank,
    fill_rollouts,
    landing_x0,
    teacher_trajectories,
)

JUMPS = ConsistencyConfig(skeleton_steps=20, max_steps=4, default_steps=4, fresh_noise=0.0, jumps=True)


def ddim_to(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor, s: torch.Tensor
            ) -> torch.Tensor:
    """The DDIM (eta 0) step from ``x_t`` at ``t`` to ``s`` on the prediction ``x0``."""
    abar_s = schedule.abar(s, x_t)
    return abar_s.sqrt() * x0 + (1 - abar_s).sqrt() * eps_from_x0(x_t, x0, schedule.abar(t, x_t))


def test_the_landing_x0_steps_onto_the_state_and_is_the_end_itself_at_the_end() -> None:
    schedule, generator = NoiseSchedule(ScheduleConfig()), torch.Generator().manual_seed(0)
    x_t, x_s = torch.randn((4, *SHAPE), generator=generator), torch.randn((4, *SHAPE), generator=generator)
    t, s = torch.tensor([999, 749, 499, 249]), torch.tensor([749, 499, 249, -1])
    x0 = landing_x0(schedule, x_t, t, x_s, s)
    assert torch.allclose(ddim_to(schedule, x_t[:3], t[:3], x0[:3], s[:3]), x_s[:3], atol=1e-4)
    assert torch.allclose(x0[3], x_s[3]) and not torch.allclose(x0[:3], x_s[:3], atol=0.1)


def test_a_jump_sampler_names_where_each_step_lands_and_never_draws_noise() -> None:
    sampler = ConsistencySampler(NoiseSchedule(ScheduleConfig()), JUMPS, 2.0)
    for steps, landing in [(1, [-1]), (2, [499, -1]), (4, [749, 499, 249, -1])]:
        sampler.set_timesteps(steps)
        assert sampler.landing_timesteps(torch.tensor(sampler.timesteps)).tolist() == landing
    assert not sampler.stochastic
    assert jump_steps(20, 2) == [(1, 19, -1), (2, 19, 9), (2, 9, -1)]
    with pytest.raises(InvalidConfig, match="fresh_noise"):
        ConsistencyConfig(jumps=True)


def test_a_jump_student_starts_as_the_plain_student_whatever_its_target() -> None:
    teacher = noisy_teacher()
    plain, jumper = student_from_teacher(teacher).eval(), student_from_teacher(teacher, jumps=True).eval()
    x, t, labels, w = torch.randn(3, *SHAPE), torch.tensor([999, 500, 40]), torch.tensor([[1], [0], [2]]), torch.ones(3)
    with torch.no_grad():
        expected = plain(x, t, labels, guidance=w)
        for target in ([-1, -1, -1], [749, 250, 0]):
            assert torch.equal(jumper(x, t, labels, guidance=w, target=torch.tensor(target)), expected)
    jumper(x, t, labels, guidance=w, target=torch.tensor([749, 250, 0])).square().mean().backward()
    assert jumper.target_mlp[-1].weight.grad.abs().sum() > 0  # it learns to use the target
    with pytest.raises(ValueError, match="target"):
        jumper(x, t, labels, guidance=w)
    with pytest.raises(ValueError, match="target"):
        plain(x, t, labels, guidance=w, target=torch.tensor([-1, -1, -1]))


def test_a_jump_batch_draws_the_samplers_steps_and_targets_what_lands_on_the_chain() -> None:
    schedule, chains = NoiseSchedule(ScheduleConfig()), 5
    timesteps = torch.arange(999, 0, -50)
    generator = torch.Generator().manual_seed(1)
    x0, eps = torch.randn((chains, *SHAPE), generator=generator), torch.randn((chains, *SHAPE), generator=generator)
    # chains along DDIM lines of a fixed x0: every jump's landing x0 is that x0
    states = torch.stack([schedule.q_sample(x0, torch.full((chains,), int(t)), eps) for t in timesteps], 1)
    bank = {"states": states.half(), "x0": x0, "labels": torch.zeros(chains, 1, dtype=torch.long),
            "guidance": torch.ones(chains), "timesteps": timesteps}
    trainer = SimpleNamespace(stream=iter([torch.arange(chains).repeat(400)]),
                              generators={"noise": torch.Generator().manual_seed(0)})
    manifest = SimpleNamespace(schedule=ScheduleConfig())
    step = TrajectoryStep(noisy_teacher(), bank, manifest, JUMPS, DistillConfig(trajectories=chains), trainer,
                          torch.float32)
    rows = step.batch()
    drawn = {(int(k), int(j)) for k, j in zip(rows["index"], rows["landing"], strict=True)}
    expected = {(19 - start, 20 if end < 0 else 19 - end) for _, start, end in jump_steps(20, 4)}
    assert drawn == expected
    assert torch.allclose(rows["x0"], x0[torch.arange(chains).repeat(400)], atol=0.05)  # fp16 states
    # each step count is drawn as often: every n starts at T - 1, with weight 1/n (1 + 1/2 + 1/3 + 1/4 of 4), and
    # from there n = 1 lands on the end
    from_the_start = rows["index"] == 0
    assert abs(float(from_the_start.float().mean()) - 25 / 48) < 0.06
    assert abs(float((rows["landing"][from_the_start] == 20).float().mean()) - 12 / 25) < 0.08


def test_a_rollout_is_the_students_own_state_and_targets_where_the_teacher_goes_from_there(
        tiny_checkpoints: Path, tmp_path: Path) -> None:
    ck = load_checkpoint(tiny_checkpoints, "diffusion", "latest")
    teacher, manifest, cpu = noisy_teacher(), ck.manifest, torch.device("cpu")
    student = student_from_teacher(teacher, jumps=True)
    torch.nn.init.normal_(student.target_mlp[-1].weight, std=0.05)  # a student whose jumps differ
    cfg = DistillConfig(trajectories=10, trajectory_chunk=8, rollouts=10)
    folder = bank_folder(tmp_path, ck.version, cfg, JUMPS)
    bank = fill_bank(folder, teacher, manifest, cfg, JUMPS, cpu, torch.float32, show_progress=False)
    rollouts = fill_rollouts(folder, bank, teacher, student.eval(), "S", manifest, cfg, JUMPS, cpu, torch.float32,
                             show_progress=False)
    # the 4-step chain's states after its first three steps (749, 499, 249), each landing on the next or the end
    assert len(rollouts["x0"]) == 30 and sorted(path.name for path in folder.glob("rollout-*")) == [
        "rollout-S-8-00000-8.pt", "rollout-S-8-00001-2.pt"]
    assert sorted(set(zip(rollouts["index"].tolist(), rollouts["landing"].tolist(), strict=True))) == [
        (5, 10), (10, 15), (15, 20)]
    schedule, sampler = NoiseSchedule(manifest.schedule), ConsistencySampler(NoiseSchedule(manifest.schedule), JUMPS,
                                                                              manifest.latent_clip)
    sampler.set_timesteps(4)
    rows = slice(0, 8)  # the first chunk: its first step's rows, in chain order
    x_t, labels, w = bank["states"][rows, 0].float(), bank["labels"][rows], bank["guidance"][rows]
    with torch.no_grad():
        output = student(x_t, torch.full((8,), 999), labels, guidance=w, target=torch.full((8,), 749))
        state = sampler.step(output, 0, x_t).prev_sample
        assert torch.allclose(rollouts["states"][:8].float(), state, atol=1e-2)  # the served sampler's own state
        assert not torch.allclose(state, bank["states"][rows, 5].float(), atol=1e-2)  # not the teacher's
        states, _ = teacher_trajectories(teacher, schedule, bank["timesteps"].tolist(), state, labels, w,
                                         manifest.latent_clip, first=5)
    landed = ddim_to(schedule, state, torch.full((8,), 749), rollouts["x0"][:8], torch.full((8,), 499))
    assert torch.allclose(landed, states[:, 5], atol=1e-3)  # the target's DDIM step lands where the teacher goes
    refused_run = RunOptions(tmp_path / "no-data", tiny_checkpoints, tmp_path / "run")
    with pytest.raises(DistillError, match="rollouts"):
        distill(ck.version, DistillConfig(method="trajectory-consistency", rollouts=1), JUMPS, refused_run)
    with pytest.raises(DistillError, match="default-steps-share"):
        distill(ck.version, DistillConfig(method="trajectory-consistency", default_steps_share=0.5),
                ConsistencyConfig(skeleton_steps=20, max_steps=4), refused_run)


def test_distill_writes_a_jump_student_that_samples_deterministically(tiny_checkpoints: Path, tmp_path: Path
                                                                     ) -> None:
    root = tmp_path / "ck"
    shutil.copytree(tiny_checkpoints, root)
    teacher = load_checkpoint(root, "diffusion", "latest")
    cfg = DistillConfig(method="trajectory-consistency", trajectories=8, trajectory_chunk=8, steps=2, batch_size=8,
                        warmup=1, log_every=1, lr=1e-3)
    opts = RunOptions(tmp_path / "no-data", root, tmp_path / "run", precision="fp32", threads=1,
                      latent_cache=tmp_path / "cache")
    folder = distill(teacher.version, cfg, JUMPS, opts)
    manifest = load_checkpoint(root, "diffusion", folder.name).manifest
    assert manifest.distillation.sampling.jumps and manifest.model.target_embedding
    pipeline = LatentDiffusion.load(root, folder.name)

    def sample(pairs: list[tuple[int, int]], steps: int) -> torch.Tensor:
        return pipeline.sample_latents(torch.tensor([[1]] * len(pairs)), ImageNoise(pairs), "student", steps, 3.0)

    for steps in (1, 2, 4):
        batch = sample([(9, 0), (9, 1)], steps)
        assert torch.isfinite(batch).all() and torch.allclose(sample([(9, 1)], steps)[0], batch[1], atol=1e-5)
    assert not torch.allclose(sample([(9, 0)], 1), sample([(9, 0)], 4), atol=1e-4)
    with pytest.raises(DistillError, match="jump"):
        distill(teacher.version, DistillConfig(steps=1), JUMPS, opts)
