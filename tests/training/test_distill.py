"""The few-step student: its guidance input starts silent, its sampler's math, and `python -m training distill`
(a version naming its teacher, exact resume, a time budget, refusals)."""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from facegen.contract.spec import LATEST
from facegen.model.checkpoints import BUNDLED_CHECKPOINTS, load_checkpoint, served_versions
from facegen.model.config import ConsistencyConfig, DistillConfig, InvalidConfig, ScheduleConfig, UNetConfig
from facegen.model.diffusion.consistency import ConsistencySampler, boundary_scalings, skeleton_timesteps
from facegen.model.diffusion.noise import ImageNoise
from facegen.model.diffusion.samplers import run_chain
from facegen.model.diffusion.schedule import NoiseSchedule, eps_from_x0
from facegen.model.manifest import parse_manifest
from facegen.model.networks.unet import UNet
from facegen.model.pipeline import LatentDiffusion
from tests.conftest import TINY_UNET, distill_tiny
from training.__main__ import main
from training.distill import DistillError, distill, pseudo_huber, student_from_earlier, student_from_teacher
from training.runtime import load_state
from training.trainer import RunOptions

SERVED = served_versions(BUNDLED_CHECKPOINTS, "latest")[0]  # the plain version a worker serves
DATA_STD = 0.5
SHAPE = (4, 4, 4)


def noisy_teacher(seed: int = 0) -> UNet:
    """A tiny UNet whose output layer is not zero (a fresh UNet outputs zeros everywhere)."""
    torch.manual_seed(seed)
    teacher = UNet(UNetConfig(**TINY_UNET)).eval()
    torch.nn.init.normal_(teacher.out[-1].weight, std=0.05)
    return teacher


def test_a_student_starts_as_its_teachers_conditional_branch_and_can_learn_the_guidance_scale() -> None:
    teacher = noisy_teacher()
    student = student_from_teacher(teacher).eval()
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t, labels = torch.tensor([19, 500, 999]), torch.tensor([[1], [0], [2]])
    expected = teacher(x, t, labels)
    for w in (1.0, 5.0, 8.0):
        assert torch.equal(student(x, t, labels, guidance=torch.full((3,), w)), expected)
    assert not any(name.startswith("guidance_mlp.") for name in teacher.state_dict())  # the teacher as it was

    student.train()
    student(x, t, labels, guidance=torch.tensor([1.0, 4.0, 8.0])).square().mean().backward()
    assert student.guidance_mlp[-1].weight.grad.abs().sum() > 0  # the zero projection gets a gradient at once

    with pytest.raises(ValueError, match="guidance"):
        student(x, t, labels)
    with pytest.raises(ValueError, match="guidance"):
        teacher(x, t, labels, guidance=torch.ones(3))


def test_the_skeleton_and_the_boundary_condition() -> None:
    assert skeleton_timesteps(1000, 50)[:3] == [19, 39, 59] and skeleton_timesteps(1000, 50)[-1] == 999
    with pytest.raises(ValueError, match="skeleton_steps"):
        skeleton_timesteps(1000, 30)
    config = ConsistencyConfig()
    assert boundary_scalings(0.0, config) == (1.0, 0.0)
    c_skip, c_out = boundary_scalings(19.0, config)
    assert c_skip < 1e-5 and c_out > 1 - 1e-5
    for bad in ({"guidance_range": (8.0, 1.0)}, {"guidance_range": (1.0,)}, {"default_steps": 9}):
        with pytest.raises(InvalidConfig):
            ConsistencyConfig(**bad)


def test_the_pseudo_huber_loss_is_quadratic_near_the_target_and_a_distance_far_from_it() -> None:
    target = torch.randn(3, *SHAPE)
    direction = torch.randn(3, *SHAPE)
    direction /= direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1)  # each row a unit vector
    c = 0.03
    assert float(pseudo_huber(target, target, c)) == 0.0
    near = float(pseudo_huber(target + 1e-3 * direction, target, c))
    far = float(pseudo_huber(target + 5 * direction, target, c))
    assert near == pytest.approx(1e-6 / (2 * c), rel=1e-2)  # ||r||^2 / 2c within c
    assert far == pytest.approx(5 - c, rel=1e-4)  # ||r|| - c beyond it: an outlier pulls linearly, not squared
    scales = torch.tensor([0.5, 2.0, 4.0]).view(-1, 1, 1, 1)  # rows at distances 0.5, 2 and 4: the mean of rows
    expected = sum(math.sqrt(d * d + c * c) - c for d in (0.5, 2.0, 4.0)) / 3
    assert float(pseudo_huber(target + scales * direction, target, c)) == pytest.approx(expected, rel=1e-5)


def ode_map_output(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The v output of a perfect student for Gaussian data ``N(0, DATA_STD^2 I)``: its x0 is the probability-flow ODE's
    end point from ``(x_t, t)``, ``DATA_STD x_t / sqrt(abar DATA_STD^2 + 1 - abar)``."""
    a = schedule.abar(t, x_t)
    x0 = DATA_STD * x_t / (a * DATA_STD**2 + 1 - a).sqrt()
    return (a.sqrt() * x_t - x0) / (1 - a).sqrt()


class TestConsistencySampler:
    schedule = NoiseSchedule(ScheduleConfig())

    def run(self, steps: int, pairs: list[tuple[int, int]] | ImageNoise, calls: list[int] | None = None,
            fresh_noise: float = 1.0) -> torch.Tensor:
        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if calls is not None:
                calls.append(int(t[0]))
            return ode_map_output(self.schedule, x, t)

        sampler = ConsistencySampler(self.schedule, ConsistencyConfig(fresh_noise=fresh_noise), x0_clip=None)
        noise = pairs if isinstance(pairs, ImageNoise) else ImageNoise(pairs)
        return run_chain(model_fn, sampler, steps, noise, SHAPE)

    def test_one_call_per_step_on_the_skeleton_from_pure_noise(self) -> None:
        for steps, expected in ((1, [999]), (2, [999, 499]), (4, [999, 759, 499, 239])):
            calls: list[int] = []
            self.run(steps, [(0, 0)], calls)
            assert calls == expected
        for bad in (0, 9):
            with pytest.raises(ValueError, match="steps must be in 1..8"):
                self.run(bad, [(0, 0)])

    @pytest.mark.parametrize("steps", [1, 2, 4, 8])
    def test_a_perfect_student_gives_the_datas_spread_at_every_step_count(self, steps: int) -> None:
        samples = self.run(steps, [(5, i) for i in range(200)])
        assert torch.isfinite(samples).all()
        assert abs(float(samples.std()) - DATA_STD) < 0.05 * DATA_STD

    def test_same_seed_same_sample_at_any_batch(self) -> None:
        batch = self.run(4, [(7, i) for i in range(6)])
        alone = self.run(4, [(7, 3)])
        assert torch.equal(self.run(4, [(7, i) for i in range(6)]), batch)
        assert torch.allclose(batch[3], alone[0], atol=1e-6)
        assert not torch.allclose(self.run(4, [(8, 3)])[0], alone[0])

    @pytest.mark.parametrize("fresh_noise", [0.0, 0.3, 1.0])
    def test_a_step_keeps_the_noise_left_in_the_state_but_the_fresh_share(self, fresh_noise: float) -> None:
        """The next state's noise (what is left once its sample is taken out) is ``sqrt(1 - r)`` times the noise
        left in this state plus ``sqrt(r)`` times the fresh draw."""
        sampler = ConsistencySampler(self.schedule, ConsistencyConfig(fresh_noise=fresh_noise), x0_clip=None)
        sampler.set_timesteps(4)
        generator = torch.Generator().manual_seed(0)
        x, output, fresh = (torch.randn((3, *SHAPE), generator=generator, dtype=torch.float64) for _ in range(3))
        step = sampler.step(output, 1, x, fresh)
        left = eps_from_x0(x, step.pred_x0, sampler.abar_at(1))
        carried = eps_from_x0(step.prev_sample, step.pred_x0, sampler.abar_at(2))
        expected = (1 - fresh_noise) ** 0.5 * left + fresh_noise**0.5 * fresh
        assert torch.allclose(carried, expected, atol=1e-9)
        assert sampler.stochastic == (fresh_noise > 0)

    def test_only_fresh_noise_keeps_a_perfect_students_spread(self) -> None:
        """A perfect student's sample is a function of the state, so the noise it leaves there adds up with it
        coherently: kept noise widens the samples, the more steps the more."""
        pairs = [(5, i) for i in range(400)]
        spread = {r: float(self.run(4, pairs, fresh_noise=r).std()) / DATA_STD for r in (0.0, 0.5, 1.0)}
        assert abs(spread[1.0] - 1) < 0.05
        assert spread[0.0] > spread[0.5] > 1.3

    def test_without_fresh_noise_a_chain_draws_its_start_alone(self) -> None:
        """At ``fresh_noise = 0`` the sample depends on the row's first draw only: the stream advances once, and
        one step and several start from the same noise."""
        noise = ImageNoise([(3, 0), (3, 1)])
        deterministic = self.run(4, noise, fresh_noise=0.0)
        after = ImageNoise([(3, 0), (3, 1)])
        after.draw(SHAPE)
        assert torch.equal(noise.draw(SHAPE), after.draw(SHAPE))  # one draw taken: x_T
        assert torch.equal(self.run(4, [(3, 0), (3, 1)], fresh_noise=0.0), deterministic)
        assert not torch.allclose(self.run(4, [(3, 0), (3, 1)]), deterministic)
        assert torch.equal(self.run(1, [(3, 0)], fresh_noise=0.0), self.run(1, [(3, 0)]))


def test_the_served_teachers_student_samples_finite_latents_deterministically() -> None:
    teacher = LatentDiffusion.load(BUNDLED_CHECKPOINTS, SERVED)
    student = student_from_teacher(teacher.unet.float()).eval()
    labels, w = torch.tensor([[1.0], [0.0], [2.0]]), torch.full((3,), 5.0)

    def sample() -> torch.Tensor:
        sampler = ConsistencySampler(teacher.schedule, ConsistencyConfig(), teacher.manifest.latent_clip)
        with torch.no_grad():
            return run_chain(lambda x, t: student(x, t, labels, guidance=w), sampler, 2,
                             ImageNoise([(11, i) for i in range(3)]), teacher.latent_shape)

    first = sample()
    assert first.shape == (3, 4, 16, 16) and torch.isfinite(first).all()
    assert first.abs().max() <= teacher.manifest.latent_clip + 1e-4
    assert torch.equal(sample(), first)


@pytest.mark.slow  # three distillation runs
def test_distill_writes_a_student_that_names_its_teacher_and_resumes_exactly(tiny_checkpoints: Path, synth_dir: Path,
                                                                             tmp_path: Path) -> None:
    root = tmp_path / "ck"
    shutil.copytree(tiny_checkpoints, root)
    teacher = load_checkpoint(root, "diffusion", "latest")
    run = tmp_path / "run"
    assert main(["distill", "--data", str(synth_dir), "--checkpoints", str(root), "--run-dir", str(run),
                 "--teacher", teacher.version, "--steps", "2", "--batch-size", "8", "--warmup", "1", "--lr", "1e-3",
                 "--log-every", "1", "--save-every", "2", "--precision", "fp32", "--threads", "1",
                 "--latent-cache", str(tmp_path / "latents")]) == 0
    first = load_checkpoint(root, "diffusion", served_versions(root, LATEST)[1])
    manifest = first.manifest
    assert manifest.distillation is not None and manifest.distillation.teacher == teacher.version
    assert manifest.distillation.method == "latent-consistency"
    assert manifest.distillation.sampling == ConsistencyConfig() and manifest.distillation.sampling.max_steps == 8
    assert manifest.model == dataclasses.replace(teacher.manifest.model, guidance_embedding=True)
    assert manifest.training.init_from.version == teacher.version and manifest.training.steps == 2
    assert manifest.vae_version == teacher.manifest.vae_version
    assert manifest.latent_scale == teacher.manifest.latent_scale
    assert isinstance(manifest.training.config, DistillConfig)
    assert parse_manifest(manifest.to_dict()) == manifest  # the JSON form reads back the same

    # without --resume a folder with a run is refused; with it, the run goes on to 4 exactly as a 4-step run
    with pytest.raises(SystemExit, match="--resume"):
        main(["distill", "--data", str(synth_dir), "--checkpoints", str(root), "--run-dir", str(run),
              "--teacher", teacher.version, "--steps", "4"])
    resumed = distill_tiny(root, synth_dir, run, teacher.version, 4, resume=True)
    straight = distill_tiny(root, synth_dir, tmp_path / "straight", teacher.version, 4)
    a, b = (load_checkpoint(root, "diffusion", p.name) for p in (resumed, straight))
    assert a.manifest.training.steps == b.manifest.training.steps == 4
    assert all(torch.equal(a.state_dict[name], b.state_dict[name]) for name in a.state_dict)
    assert any(not torch.equal(a.state_dict[name], first.state_dict[name]) for name in a.state_dict)

    # a new run goes on from an exported student (its run folder gone): its weights, the lineage through it
    student, _ = student_from_earlier(tmp_path / "elsewhere", str(resumed), teacher.version,  # by its folder's path
                                      ConsistencyConfig(default_steps=2))
    assert all(torch.equal(student.state_dict()[name], a.state_dict[name].float()) for name in a.state_dict)
    following = distill_tiny(root, synth_dir, tmp_path / "following", teacher.version, 2, init_from=resumed.name)
    manifest = load_checkpoint(root, "diffusion", following.name).manifest
    assert manifest.training.init_from.lineage[-2:] == (teacher.version, resumed.name)
    assert manifest.distillation.teacher == teacher.version and manifest.training.steps == 2

    # the student samples: one row per step, finite latents of the version's shape, the same for the same seed
    student = LatentDiffusion.load(root, resumed.name)
    labels, w = torch.tensor([[1.0], [0.0]]), torch.full((2,), 5.0)

    def sample() -> torch.Tensor:
        sampler = ConsistencySampler(student.schedule, student.manifest.distillation.sampling,
                                     student.manifest.latent_clip)
        with torch.no_grad():
            return run_chain(lambda x, t: student.unet(x, t, labels, guidance=w), sampler, 4,
                             ImageNoise([(3, 0), (3, 1)]), student.latent_shape)

    latents = sample()
    assert latents.shape == (2, *student.latent_shape) and torch.isfinite(latents).all()
    assert torch.equal(sample(), latents)


def test_a_time_budget_stops_saves_and_exports_and_a_student_is_no_teacher(tiny_checkpoints: Path, synth_dir: Path,
                                                                           tmp_path: Path) -> None:
    root = tmp_path / "ck"
    shutil.copytree(tiny_checkpoints, root)
    run, teacher = tmp_path / "run", load_checkpoint(root, "diffusion", "latest").version
    folder = distill_tiny(root, synth_dir, run, teacher, 50, minutes=0.0)  # out of time after the first iteration
    assert load_checkpoint(root, "diffusion", folder.name).manifest.training.steps == 1
    assert load_state(run / "state.pt")["step"] == 1
    assert math.isfinite(load_checkpoint(root, "diffusion", folder.name).manifest.metrics["train_loss_ema"])

    assert load_checkpoint(root, "diffusion", "latest").version == teacher  # a student is no newer model
    with pytest.raises(DistillError, match="itself a distilled student"):
        distill_tiny(root, synth_dir, tmp_path / "again", folder.name, 2)
    with pytest.raises(DistillError, match="no state.pt"):
        distill_tiny(root, synth_dir, tmp_path / "empty", teacher, 2, resume=True)
    with pytest.raises(DistillError, match="no student of"):  # a new run starts from a student, not a teacher
        distill_tiny(root, synth_dir, tmp_path / "again", teacher, 2, init_from=teacher)
    with pytest.raises(DistillError, match="distilled with"):  # nor from a student of another sampling
        distill(teacher, DistillConfig(steps=2), ConsistencyConfig(max_steps=4),
                RunOptions(synth_dir, root, tmp_path / "again", precision="fp32", threads=1), init_from=folder.name)
    with pytest.raises(DistillError, match="distils"):  # another student config than the run's
        distill(teacher, DistillConfig(steps=2), ConsistencyConfig(max_steps=4),
                RunOptions(synth_dir, root, run, precision="fp32", threads=1), resume=True)


def test_retune_sets_a_students_sampling_and_refuses_what_it_cannot(tiny_student_checkpoints: Path,
                                                                     tmp_path: Path) -> None:
    """The step count and fresh-noise share chosen on the validation split become a new student version's
    defaults: same weights, same teacher, and the newest student of that teacher (the one workers serve beside
    it)."""
    root = Path(shutil.copytree(tiny_student_checkpoints, tmp_path / "ck"))
    teacher, student = served_versions(root, LATEST)
    assert main(["retune", "--checkpoints", str(root), "--diffusion", student, "--student-default-steps", "2",
                 "--student-fresh-noise", "0.25"]) == 0
    derived = served_versions(root, LATEST)[1]
    manifest, source = (load_checkpoint(root, "diffusion", v).manifest for v in (derived, student))
    assert derived != student and manifest.derived_from == student and manifest.files == source.files
    assert manifest.distillation == dataclasses.replace(source.distillation, sampling=dataclasses.replace(
        source.distillation.sampling, default_steps=2, fresh_noise=0.25))
    assert served_versions(root, LATEST)[0] == teacher

    with pytest.raises(SystemExit, match="not a distilled student"):
        main(["retune", "--checkpoints", str(root), "--diffusion", teacher, "--student-default-steps", "2"])
    with pytest.raises(SystemExit, match="default_steps must be in 1..max_steps"):
        main(["retune", "--checkpoints", str(root), "--diffusion", student, "--student-default-steps", "9"])
    with pytest.raises(SystemExit, match="--student-fresh-noise: fresh_noise must be in"):
        main(["retune", "--checkpoints", str(root), "--diffusion", student, "--student-fresh-noise", "1.5"])


@pytest.mark.slow  # a distillation run through the script
@pytest.mark.parametrize("given", [True, False], ids=["INIT_FROM", "the folder's student"])
def test_the_gpu_distill_script_goes_on_from_a_student(tiny_checkpoints: Path, tiny_student_checkpoints: Path,
                                                       synth_dir: Path, tmp_path: Path, given: bool) -> None:
    """``scripts/gpu_distill.sh`` (the device's one prepared call) on the CPU: it exports a student that goes on from
    ``INIT_FROM`` (a student's folder elsewhere) or, unset, from the student the checkpoints folder serves beside
    its model, and leaves it in ``$OUT/diffusion/VERSION``."""
    root = tmp_path / "checkpoints"
    shutil.copytree(tiny_checkpoints if given else tiny_student_checkpoints, root)
    teacher, earlier = served_versions(tiny_student_checkpoints, LATEST)
    assert served_versions(root, LATEST)[0] == teacher
    env = {**os.environ, "PYTHON": sys.executable, "CHECKPOINTS": str(root), "DEVICE": "cpu", "MINUTES": "0",
           "BATCH": "8", "DATA": str(synth_dir), "WORK": str(tmp_path / "work"), "OUT": str(tmp_path / "out"),
           "OMP_NUM_THREADS": "1"}
    env.pop("INIT_FROM", None)
    if given:
        env["INIT_FROM"] = str(tiny_student_checkpoints / "diffusion" / earlier)
    done = subprocess.run([str(Path(__file__).parents[2] / "scripts" / "gpu_distill.sh")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    (exported,) = (tmp_path / "out" / "diffusion").iterdir()
    manifest = load_checkpoint(tmp_path / "out", "diffusion", exported.name).manifest
    assert exported.name != earlier
    assert manifest.distillation.teacher == teacher and manifest.training.init_from.version == earlier
    assert (tmp_path / "out" / "distill.log").is_file()


@pytest.mark.slow  # three distillation runs through the script
def test_the_gpu_distill_script_rolls_out_each_student_it_exports(tiny_checkpoints: Path, synth_dir: Path,
                                                                 tmp_path: Path) -> None:
    """With ``ROUNDS=2`` and ``INIT_FROM`` empty, ``scripts/gpu_distill.sh`` distils a jump student from the teacher,
    then twice goes on from the student before, learning its rollouts, and leaves all three in ``$OUT``."""
    env = {**os.environ, "PYTHON": sys.executable, "CHECKPOINTS": str(tiny_checkpoints), "DEVICE": "cpu",
           "MINUTES": "0", "BATCH": "8", "DATA": str(synth_dir), "WORK": str(tmp_path / "work"),
           "OUT": str(tmp_path / "out"), "OMP_NUM_THREADS": "1", "INIT_FROM": "", "ROUNDS": "2", "ROLLOUTS": "4"}
    jumps = ["--method", "trajectory-consistency", "--student-skeleton-steps", "20", "--student-jumps", "true",
             "--student-fresh-noise", "0", "--student-max-steps", "4", "--trajectories", "8", "--trajectory-chunk", "8"]
    done = subprocess.run([str(Path(__file__).parents[2] / "scripts" / "gpu_distill.sh"), *jumps], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    out = tmp_path / "out"
    manifests = [load_checkpoint(out, "diffusion", folder.name).manifest
                 for folder in sorted((out / "diffusion").iterdir())]
    teacher = served_versions(tiny_checkpoints, LATEST)[0]
    assert [m.training.init_from.version for m in manifests] == [teacher] + [m.version for m in manifests[:2]]
    assert all(m.distillation.sampling.jumps for m in manifests)
    bank = next((tmp_path / "work" / "latents" / "trajectories").iterdir())
    for rolled_out in manifests[:2]:  # each round learnt the rollouts of the student it went on from
        assert any(bank.glob(f"rollout-{rolled_out.version}-*.pt"))


def test_a_teacher_that_leaves_chroma_unguided_teaches_its_own_guided_step(tiny_checkpoints: Path, synth_dir: Path,
                                                                          tmp_path: Path) -> None:
    """The teacher's DDIM step is its served guidance: with ``guide_chroma`` false the chroma part of the guidance
    difference is taken once (``guided`` with the projector), which moves the step; distillation from such a
    teacher runs and exports."""
    from facegen.model.chroma import chroma_projector
    from facegen.model.diffusion.guidance import guided
    from training.distill import guided_ddim_step

    teacher, schedule = noisy_teacher(), NoiseSchedule(ScheduleConfig())
    projector = chroma_projector(torch.randn(3, 4, generator=torch.Generator().manual_seed(4)))
    x_t = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(5))
    t, t_prev, labels, w = torch.tensor([499, 299]), torch.tensor([479, 279]), torch.tensor([[1.0], [0.0]]), \
        torch.tensor([4.0, 4.0])
    with torch.no_grad():
        plain = guided_ddim_step(teacher, schedule, x_t, t, t_prev, labels, w, 10.0)
        unguided_chroma = guided_ddim_step(teacher, schedule, x_t, t, t_prev, labels, w, 10.0, projector)
        v = guided(teacher, labels, w, teacher.config.null_label, chroma_projector=projector)(x_t, t)
    abar, abar_prev = schedule.abar(t, x_t), schedule.abar(t_prev, x_t)
    x0, eps = schedule.split(v, x_t, abar)
    assert torch.allclose(unguided_chroma, abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * eps, atol=1e-5)
    assert not torch.allclose(unguided_chroma, plain, atol=1e-5)

    root = tmp_path / "ck"
    shutil.copytree(tiny_checkpoints, root)
    assert main(["retune", "--checkpoints", str(root), "--guide-chroma", "false"]) == 0
    chroma_teacher = load_checkpoint(root, "diffusion", "latest").version
    folder = distill_tiny(root, synth_dir, tmp_path / "run", chroma_teacher, 2)
    assert load_checkpoint(root, "diffusion", folder.name).manifest.distillation.teacher == chroma_teacher
