"""Trajectory-consistency distillation: the teacher's chains are its served sampler's, their draws are fixed per
chunk whatever fills the bank, and `distill --method trajectory-consistency` writes a student that names its
method, learns on the chains alone and resumes only the run it started."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from facegen.model.checkpoints import load_checkpoint, served_versions
from facegen.model.config import ConsistencyConfig, DistillConfig, InvalidConfig, ScheduleConfig
from facegen.model.diffusion.consistency import jump_steps
from facegen.model.diffusion.guidance import guided
from facegen.model.diffusion.noise import ImageNoise
from facegen.model.diffusion.samplers import DPMSolverPP2MSampler, run_chain
from facegen.model.diffusion.schedule import NoiseSchedule
from facegen.model.pipeline import LatentDiffusion
from tests.training.test_distill import SHAPE, noisy_teacher
from training.distill import DistillError, distill
from training.runtime import load_state
from training.trainer import RunOptions
from training.trajectories import (
    TrajectoryStep,
    bank_folder,
    bank_jumps,
    chain_draws,
    fill_bank,
    fill_restarts,
    jump_weights,
    teacher_trajectories,
)

TRAJECTORY = "trajectory-consistency"


def test_a_chain_is_the_served_sampler_and_records_each_state() -> None:
    teacher, schedule = noisy_teacher(), NoiseSchedule(ScheduleConfig())
    noise, labels = ImageNoise([(4, i) for i in range(3)]), torch.tensor([[1], [0], [2]])
    timesteps = list(range(999, 0, -50))
    served = run_chain(guided(teacher, labels, 3.0, teacher.config.null_label), DPMSolverPP2MSampler(schedule, 2.0),
                       len(timesteps), noise, SHAPE)
    x_start = ImageNoise([(4, i) for i in range(3)]).draw(SHAPE)
    with torch.no_grad():
        states, x0 = teacher_trajectories(teacher, schedule, timesteps, x_start, labels, torch.full((3,), 3.0), 2.0)
    assert states.shape == (3, 20, *SHAPE) and torch.equal(states[:, 0], x_start)
    assert torch.allclose(x0, served, atol=1e-5)
    assert x0.abs().max() <= 2.0 + 1e-5 and not torch.allclose(states[:, -1], x0)
    with torch.no_grad(), pytest.raises(ValueError, match="not"):  # only the served sampler's own timesteps
        teacher_trajectories(teacher, schedule, [999, 500], x_start, labels, torch.full((3,), 3.0), 2.0)


def test_chain_draws_keep_their_shares_and_ranges() -> None:
    cfg, consistency = DistillConfig(label_dropout=0.2, served_guidance_share=0.5), ConsistencyConfig()
    x, labels, w = chain_draws(4000, torch.Generator().manual_seed(0), SHAPE, 1, 2, cfg, consistency, 3.0)
    assert x.shape == (4000, *SHAPE) and abs(float(x.std()) - 1) < 0.01
    assert set(labels.unique().tolist()) == {0, 1, 2}
    assert 0.17 < float((labels == 2).float().mean()) < 0.23
    served = w == 3.0
    assert 0.46 < float(served.float().mean()) < 0.54
    assert float(w[~served].min()) >= 1.0 and float(w[~served].max()) <= 8.0 and float(w[~served].std()) > 1.5
    with pytest.raises(InvalidConfig, match="method"):
        DistillConfig(method="progressive")
    with pytest.raises(InvalidConfig, match="served_guidance_share"):
        DistillConfig(served_guidance_share=1.5)


def test_a_bank_is_the_same_however_it_was_filled(tiny_checkpoints: Path, tmp_path: Path) -> None:
    ck = load_checkpoint(tiny_checkpoints, "diffusion", "latest")
    teacher = noisy_teacher()
    consistency = ConsistencyConfig(skeleton_steps=20)
    manifest = ck.manifest

    def fill(folder: Path, count: int) -> dict[str, torch.Tensor]:
        cfg = DistillConfig(trajectories=count, trajectory_chunk=8)
        return fill_bank(bank_folder(folder, ck.version, cfg, consistency), teacher, manifest, cfg, consistency,
                         torch.device("cpu"), torch.float32, show_progress=False)

    small = fill(tmp_path / "a", 10)
    assert small["states"].shape == (10, 20, *manifest.latent_shape) and small["states"].dtype == torch.float16
    assert small["timesteps"].tolist() == list(range(999, 0, -50))
    large = fill(tmp_path / "a", 13)  # the first chunk is read back, the second computed
    again = fill(tmp_path / "b", 13)  # all computed afresh elsewhere
    assert torch.equal(large["timesteps"], small["timesteps"])
    for name in ("states", "x0", "labels", "guidance"):
        assert torch.equal(large[name][:10], small[name]) and torch.equal(large[name], again[name])
    assert len(list(bank_folder(tmp_path / "a", ck.version, DistillConfig(), consistency).glob("*.pt"))) == 2
    other = bank_folder(tmp_path, ck.version, DistillConfig(seed=1), consistency)
    assert other != bank_folder(tmp_path, ck.version, DistillConfig(trajectories=9), consistency)


def test_a_restart_is_a_chains_sample_noised_afresh_and_finished_by_the_served_sampler(tiny_checkpoints: Path,
                                                                                       tmp_path: Path) -> None:
    ck = load_checkpoint(tiny_checkpoints, "diffusion", "latest")
    teacher, manifest, consistency = noisy_teacher(), ck.manifest, ConsistencyConfig(skeleton_steps=20)
    cfg = DistillConfig(trajectories=12, trajectory_chunk=8, restarts=11)
    folder = bank_folder(tmp_path, ck.version, cfg, consistency)
    cpu = torch.device("cpu")
    bank = fill_bank(folder, teacher, manifest, cfg, consistency, cpu, torch.float32, show_progress=False)
    restarts = fill_restarts(folder, bank, teacher, manifest, cfg, cpu, torch.float32, show_progress=False)
    assert restarts["states"].shape == (11, *manifest.latent_shape) and restarts["states"].dtype == torch.float16
    assert restarts["index"].tolist() == [1 + j % 19 for j in range(11)]  # every timestep below T - 1 in turn
    assert torch.equal(restarts["labels"], bank["labels"][:11])
    schedule = NoiseSchedule(manifest.schedule)
    for j in (0, 9):  # the teacher's served sampler, run from the restart's timestep, ends where the bank says
        first, state = int(restarts["index"][j]), restarts["states"][j:j + 1].float()
        model_fn = guided(teacher, bank["labels"][j:j + 1], bank["guidance"][j:j + 1], teacher.config.null_label)
        with torch.no_grad():
            end = run_chain(model_fn, DPMSolverPP2MSampler(schedule, manifest.latent_clip), 20,
                            ImageNoise([(0, 0)]), manifest.latent_shape, start=(first, state))
        # (from the state as the bank stores it, in float16: close, not equal)
        assert float((end - restarts["x0"][j:j + 1]).abs().max()) < 0.02
        assert float((end - bank["x0"][j:j + 1]).abs().max()) > 0.2  # a new end, not the chain's own
    # the noise is fresh: the state is not the chain's state at that timestep, but holds its sample at that level
    t = bank["timesteps"][restarts["index"]]
    abar = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    noise = (restarts["states"].float() - abar.sqrt() * bank["x0"][:11]) / (1 - abar).sqrt()
    assert 0.8 < float(noise.std()) < 1.2
    assert not torch.allclose(restarts["states"][0], bank["states"][0, 1], atol=1e-2)
    again = fill_restarts(bank_folder(tmp_path / "b", ck.version, cfg, consistency), bank, teacher, manifest, cfg,
                          cpu, torch.float32, show_progress=False)
    assert all(torch.equal(again[name], restarts[name]) for name in restarts)
    # a larger bank: the whole first chunk is read back, the second (cut short at 12 chains before) computed anew
    larger = dataclasses.replace(cfg, trajectories=16, restarts=16)
    more = fill_restarts(folder, fill_bank(folder, teacher, manifest, larger, consistency, cpu, torch.float32,
                                           show_progress=False), teacher, manifest, larger, cpu, torch.float32,
                         show_progress=False)
    assert len(more["x0"]) == 16 and all(torch.equal(more[name][:11], restarts[name]) for name in restarts)
    assert sorted(path.name for path in folder.glob("restart-*.pt")) == [
        "restart-8-00000-8.pt", "restart-8-00001-4.pt", "restart-8-00001-8.pt"]
    with pytest.raises(InvalidConfig, match="restarts and rollouts must be in 0..trajectories"):
        DistillConfig(trajectories=12, restarts=13)


def hand_built_step(chains: int, rounds: int, consistency: ConsistencyConfig,
                    restarts: dict[str, torch.Tensor] | None = None) -> TrajectoryStep:
    """A ``TrajectoryStep`` over a bank of ``chains`` all-zero chains of 20 states whose one batch deals every chain
    ``rounds`` times."""
    step = TrajectoryStep.__new__(TrajectoryStep)
    step.bank = {"states": torch.zeros(chains, 20, *SHAPE, dtype=torch.float16), "x0": torch.zeros(chains, *SHAPE),
                 "labels": torch.zeros(chains, 1, dtype=torch.long), "guidance": torch.ones(chains),
                 "timesteps": torch.arange(999, 0, -50)}
    step.trainer = SimpleNamespace(stream=iter([torch.arange(chains).repeat(rounds)]),
                                   generators={"noise": torch.Generator().manual_seed(0)})
    step.restarts, step.consistency, step.schedule = restarts, consistency, NoiseSchedule(ScheduleConfig())
    return step


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_a_batch_takes_its_share_of_restarts(share: float) -> None:
    chains, count = 6, 40
    restarts = {"states": torch.ones(count, *SHAPE, dtype=torch.float16), "index": torch.full((count,), 7),
                "landing": torch.full((count,), 15),
                "x0": torch.ones(count, *SHAPE), "labels": torch.ones(count, 1, dtype=torch.long),
                "guidance": torch.full((count,), 2.0)}
    step = hand_built_step(chains, 100, ConsistencyConfig(), restarts)
    step.cfg = DistillConfig(trajectories=chains, restarts=chains, restart_share=share)
    bank, rows = step.bank, step.batch()
    taken = rows["x_t"].flatten(1).mean(1) == 1  # restart rows are ones, chain rows zeros, in every field alike
    for name in ("x0", "labels", "guidance"):
        assert torch.equal(rows[name].reshape(len(taken), -1)[:, 0] != bank[name].reshape(chains, -1)[0, 0], taken)
    assert bool(rows["index"][taken].eq(7).all()) and bool(rows["landing"][taken].eq(15).all())
    assert bool(rows["landing"][~taken].eq(20).all())  # a chain's state lands on its end
    assert abs(float(taken.float().mean()) - share) < 0.07


@pytest.mark.parametrize("share", [0.0, 0.6, 1.0])
def test_a_jump_students_batch_draws_the_served_chains_jumps_at_their_share(share: float) -> None:
    consistency = ConsistencyConfig(skeleton_steps=20, max_steps=4, default_steps=4, jumps=True, fresh_noise=0.0)
    steps = jump_steps(20, 4)
    weights = jump_weights(steps, consistency, share)
    per_count = [float(weights[[n == count for n, _, _ in steps]].sum()) for count in (1, 2, 3, 4)]
    assert per_count == pytest.approx([(1 - share) / 4] * 3 + [(1 - share) / 4 + share])
    chains, rows_drawn = 8, 4000
    step = hand_built_step(chains, rows_drawn // chains, consistency)
    step.jumps, step.jump_weights = bank_jumps(steps, 20), weights
    rows = step.batch()
    served = {tuple(pair) for pair, (n, _, _) in zip(step.jumps.tolist(), steps, strict=True) if n == 4}
    drawn = [(k, landing) in served for k, landing in zip(rows["index"].tolist(), rows["landing"].tolist(),
                                                           strict=True)]
    assert sum(drawn) / rows_drawn == pytest.approx(per_count[-1], abs=0.03)
    with pytest.raises(InvalidConfig, match="default_steps_share"):
        DistillConfig(default_steps_share=1.5)


def test_distill_by_trajectories_writes_a_student_of_its_teachers_chains(tiny_checkpoints: Path, tmp_path: Path
                                                                         ) -> None:
    root = tmp_path / "ck"
    shutil.copytree(tiny_checkpoints, root)
    teacher = load_checkpoint(root, "diffusion", "latest")
    consistency = ConsistencyConfig(skeleton_steps=20)
    cfg = DistillConfig(method=TRAJECTORY, trajectories=12, trajectory_chunk=8, steps=3, batch_size=8, warmup=1, log_every=1,
                        save_every=2, lr=1e-3)
    cache = tmp_path / "cache"

    def run(folder: str, **kwargs) -> Path:  # no data folder: the chains are all it learns from
        opts = RunOptions(tmp_path / "no-data", root, tmp_path / folder, precision="fp32", threads=1,
                          latent_cache=cache)
        return distill(teacher.version, kwargs.pop("cfg", cfg), consistency, opts, **kwargs)

    folder = run("run")
    student = load_checkpoint(root, "diffusion", folder.name)
    manifest = student.manifest
    assert manifest.distillation.method == TRAJECTORY and manifest.distillation.teacher == teacher.version
    assert manifest.distillation.sampling == consistency and manifest.training.steps == 3
    assert manifest.training.examples == 12 and manifest.dataset_fingerprint == teacher.manifest.dataset_fingerprint
    assert load_state(tmp_path / "run" / "state.pt")["step"] == 3
    bank = next((cache / "trajectories").iterdir())
    written = {path: path.stat().st_mtime_ns for path in bank.iterdir()}

    resumed = run("run", cfg=dataclasses.replace(cfg, steps=5), resume=True)
    assert load_checkpoint(root, "diffusion", resumed.name).manifest.training.steps == 5
    assert {path: path.stat().st_mtime_ns for path in bank.iterdir()} == written  # the bank was read, not redrawn
    with pytest.raises(DistillError, match="distils"):  # another bank is another run
        run("run", cfg=dataclasses.replace(cfg, trajectories=13), resume=True)
    with pytest.raises(DistillError, match="distils"):
        run("run", cfg=dataclasses.replace(cfg, method="latent-consistency"), resume=True)
    with pytest.raises(DistillError, match="distils"):  # restarts change what it learns from
        run("run", cfg=dataclasses.replace(cfg, steps=5, restarts=4), resume=True)
    restarted = run("restarted", cfg=dataclasses.replace(cfg, restarts=4, restart_share=0.5))
    assert load_checkpoint(root, "diffusion", restarted.name).manifest.training.config.restarts == 4
    assert len(list(bank.glob("restart-*.pt"))) == 1 and set(written) <= set(bank.iterdir())

    # it samples as a student does: one row per step, finite, the same for the same seed at any batch
    pipeline = LatentDiffusion.load(root, folder.name)
    assert folder.name not in served_versions(root, "latest")[:1]

    def sample(pairs: list[tuple[int, int]]) -> torch.Tensor:
        return pipeline.sample_latents(torch.tensor([[1]] * len(pairs)), ImageNoise(pairs), "student", 4, 3.0)

    batch = sample([(9, 0), (9, 1)])
    assert torch.isfinite(batch).all() and torch.allclose(sample([(9, 1)])[0], batch[1], atol=1e-5)
