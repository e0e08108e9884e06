"""Distil a served diffusion version into a few-step student, the guidance scale folded in as an input, by one of
``DISTILLATION_METHODS``: latent consistency distillation (Luo et al. 2023, Alg. 1), described here, or trajectory
consistency (``training.trajectories``), which regresses the student on the teacher's finished served chains.

Each latent-consistency iteration draws training latents ``z_0`` (the teacher's VAE and latent scale), a skeleton index ``n``
(``t_n = (n + 1) T / N - 1``, ``facegen.model.diffusion.consistency``), a guidance scale ``w`` uniform in the
student's ``guidance_range`` and noise, and forms ``x_{t_n}``. The frozen teacher takes one guided DDIM step to
``t_{n-1} = max(t_n - T / N, 0)`` (both of its rows, as the served sampler computes them: ``v = v_null + w (v_cond -
v_null)``, ``x0`` clamped to the latent clip); the loss is the pseudo-Huber distance (:func:`pseudo_huber`) between
``f_theta(x_{t_n}, t_n, w)`` and ``f_ema(x_{t_{n-1}}, t_{n-1}, w)``, with ``f`` the consistency parametrisation and
``f_ema`` the target network, an EMA of the student (``target_ema_decay``), exported at the end. The student is the teacher's UNet plus a zero-initialised guidance
embedding (:func:`student_from_teacher`): it starts as the teacher's conditional branch, or, with ``init_from``, as
an earlier student of the same teacher and sampling (a run that goes on where an exported one stopped, when its
run folder is gone: the weights carry over, the optimiser's moments and the iteration count start afresh).

The run resumes from ``run_dir/state.pt`` (``--resume``, the shared :class:`~training.trainer.Trainer`); ``minutes``
bounds the whole command (latent encoding included): the loop then stops, saves its state and exports the student
as it stands, recording the iterations done.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from facegen.model.checkpoints import READER_FILE, Checkpoint, load_part, save_checkpoint, warm_start
from facegen.model.chroma import decoder_chroma_projector
from facegen.model.config import (
    DISTILLATION_METHODS,
    STUDENT_SERVING_FIELDS,
    ConsistencyConfig,
    DistillConfig,
    asdict,
)
from facegen.model.device import DTYPES, autocast
from facegen.model.diffusion.consistency import consistency_output, skeleton_timesteps
from facegen.model.diffusion.guidance import guided
from facegen.model.diffusion.schedule import NoiseSchedule, eps_from_x0
from facegen.model.manifest import DiffusionManifest, Distillation, Parent, TrainingRun
from facegen.model.networks.unet import UNet
from training.data.celeba import fingerprint
from training.runtime import EMA, BatchStream, start_run, unwrap
from training.train_diffusion import load_vae, sample_posterior, training_latents

from .student_training import StudentStep, guidance_draws, open_labels, pseudo_huber
from .trainer import RunOptions, Trainer
from .trajectories import TrajectoryStep, bank_folder, fill_banks

CONSISTENCY_METHOD, TRAJECTORY_METHOD = DISTILLATION_METHODS
RUN_RECORD = "distill.json"  # the teacher and student config of a run folder, checked on --resume


class DistillError(ValueError):
    """A teacher, student config or run folder that a distillation cannot go on with (the message says which)."""


def student_from_teacher(teacher: UNet, jumps: bool = False) -> UNet:
    """A float32 copy of ``teacher`` (a plain UNet) that also takes the guidance scale (and, with ``jumps``, where
    its step lands): the teacher's weights, the new embeddings' last layers zero, so that it computes the teacher's
    conditional output for any ``w``."""
    student = UNet(dataclasses.replace(teacher.config, guidance_embedding=True, target_embedding=jumps))
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or any(not name.startswith(("guidance_mlp.", "target_mlp.")) for name in missing):
        raise ValueError(f"the teacher's weights do not fit its student: missing {missing}, unexpected {unexpected}")
    return student.float()


def student_from_earlier(root: Path, version: str, teacher: str, consistency: ConsistencyConfig
                         ) -> tuple[UNet, Parent]:
    """The float32 student ``version`` (a version under ``root``, or the path of a version folder
    ``.../diffusion/VERSION`` anywhere) and its lineage, checked to be a distillation of ``teacher`` with the
    sampling ``consistency`` (but for ``STUDENT_SERVING_FIELDS``, which ``retune`` sets after training)."""
    folder = Path(version)
    if folder.is_dir() and folder.parent.name == "diffusion":
        root, version = folder.parent.parent, folder.name
    earlier, lineage = warm_start(root, "diffusion", version)
    record = earlier.manifest.distillation
    if record is None or record.teacher != teacher:
        raise DistillError(f"--init-from {earlier.version} is no student of {teacher}: start from the teacher (no "
                           "--init-from) or name one of its students")
    serving = {name: getattr(consistency, name) for name in STUDENT_SERVING_FIELDS}
    if dataclasses.replace(record.sampling, **serving) != consistency:
        raise DistillError(f"--init-from {earlier.version} was distilled with {asdict(record.sampling)}, not "
                           f"{asdict(consistency)}")
    student = UNet(earlier.manifest.model)
    student.load_state_dict(earlier.state_dict)
    return student.float(), lineage


def teacher_chroma_projector(checkpoints: Path, manifest: DiffusionManifest, device: torch.device
                             ) -> torch.Tensor | None:
    """The ``[C, C]`` projector the teacher ``manifest`` guides with as it serves (its VAE's decoder, under
    ``checkpoints``, when its ``guide_chroma`` is false; ``facegen.model.chroma``), else None: plain guidance."""
    if manifest.sampling.guide_chroma:
        return None
    vae = load_vae(checkpoints, manifest.vae_version, device)[0]
    return decoder_chroma_projector(vae.decoder, manifest.latent_shape, manifest.latent_scale)


def guided_ddim_step(teacher: UNet, schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor,
                     t_prev: torch.Tensor, labels: torch.Tensor, guidance: torch.Tensor, x0_clip: float,
                     chroma_projector: torch.Tensor | None = None) -> torch.Tensor:
    """The teacher's classifier-free-guided DDIM (eta 0) step from ``x_t [N, C, H, W]`` at ``t [N]`` to ``t_prev
    [N]`` (float32): ``v = v_null + w (v_cond - v_null)`` with ``w = guidance [N]`` per row, ``x0`` clamped to
    ``[-x0_clip, x0_clip]``, ``eps`` consistent with it (as ``DDIMSampler.step`` with ``guided``); two teacher rows
    per row. ``labels [N, A]``: a row whose labels are all null gets the unconditional step whatever ``w``.
    ``chroma_projector [C, C]``: the teacher guides with its chroma left to the conditional prediction, as it
    serves (``guided``)."""
    v = guided(teacher, labels, guidance, teacher.config.null_label, chroma_projector=chroma_projector)(x_t, t).float()
    abar, abar_prev = schedule.abar(t, x_t), schedule.abar(t_prev, x_t)
    x0 = schedule.split(v, x_t, abar)[0].clamp(-x0_clip, x0_clip)
    return abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * eps_from_x0(x_t, x0, abar)


class DistillStep(StudentStep):
    """One consistency-distillation iteration on a batch of freshly sampled latents."""

    def __init__(self, student: UNet, teacher: UNet, latents: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor,
                 manifest: DiffusionManifest, consistency: ConsistencyConfig, cfg: DistillConfig, trainer: Trainer,
                 dtype: torch.dtype, chroma_projector: torch.Tensor | None = None):
        """``latents = (means, logvars)``, each ``[M, C, h, w]`` raw VAE units; ``labels int64 [M, A]`` in {0, 1};
        ``chroma_projector [C, C]``: the teacher's, when it leaves chroma unguided (``guided_ddim_step``)."""
        super().__init__(student, cfg, trainer)
        self.teacher, self.means, self.logvars, self.labels = teacher, *latents, labels
        self.manifest, self.consistency, self.dtype = manifest, consistency, dtype
        self.chroma_projector = chroma_projector
        self.schedule = NoiseSchedule(manifest.schedule)
        self.skeleton = torch.tensor(skeleton_timesteps(self.schedule.timesteps, consistency.skeleton_steps))
        self.stride = self.schedule.timesteps // consistency.skeleton_steps

    def draw(self) -> tuple[torch.Tensor, ...]:
        """``(z_0, labels, t, w, noise)`` of the next batch, on the trainer's device."""
        trainer, cfg, generator = self.trainer, self.cfg, self.trainer.generators["noise"]
        index = next(trainer.stream)
        n = len(index)
        z0 = self.manifest.latent_scale * sample_posterior(self.means[index], self.logvars[index], generator)
        y = open_labels(self.labels[index], self.teacher.config.null_label, cfg, generator)
        t = self.skeleton[torch.randint(0, len(self.skeleton), (n,), generator=generator)]
        w = guidance_draws(n, self.consistency, generator)
        noise = torch.randn(z0.shape, generator=generator)
        return tuple(v.to(trainer.device) for v in (z0, y, t, w, noise))

    def __call__(self, step: int) -> dict[str, float]:
        trainer, schedule, consistency = self.trainer, self.schedule, self.consistency
        z0, y, t, w, noise = self.draw()
        t_prev = (t - self.stride).clamp(min=0)
        x_t = schedule.q_sample(z0, t, noise)
        target_net = trainer.ema.model
        with torch.no_grad(), autocast(trainer.device, self.dtype):
            x_prev = guided_ddim_step(self.teacher, schedule, x_t, t, t_prev, y, w, self.manifest.latent_clip,
                                      self.chroma_projector)
            target = consistency_output(schedule, consistency, target_net(x_prev, t_prev, y, guidance=w).float(),
                                        x_prev, t_prev)
        with autocast(trainer.device, self.dtype):
            output = trainer.modules["model"](x_t, t, y, guidance=w).float()
            loss = pseudo_huber(consistency_output(schedule, consistency, output, x_t, t), target, self.cfg.huber_c)
        return self.update(step, loss)


def check_run_folder(run_dir: Path, record: dict, resume: bool, write: bool) -> None:
    """Refuse to go on with a run folder's state unless ``resume`` (and then only for the same teacher and student
    config), or to resume a folder that holds none; a new run's ``record`` goes to ``RUN_RECORD`` (with ``write``:
    the main rank)."""
    path, has_state = run_dir / RUN_RECORD, (run_dir / "state.pt").is_file()
    record = json.loads(json.dumps(record))  # as the file holds it (tuples as lists)
    if has_state and not resume:
        raise DistillError(f"{run_dir} holds a distillation run (state.pt): pass --resume to go on with it, or "
                         "choose another --run-dir")
    if resume and not has_state:
        raise DistillError(f"--resume: {run_dir} holds no state.pt to resume")
    if resume:
        earlier = json.loads(path.read_text()) if path.is_file() else None
        if earlier != record:
            raise DistillError(f"--resume: {run_dir} distils {earlier}, not {record}")
        return
    if write:
        run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, sort_keys=True) + "\n")


def check_jumps(cfg: DistillConfig, consistency: ConsistencyConfig, init_from: str | None) -> None:
    """A ``DistillError`` for a jump student of another method than trajectory consistency, for rollouts of no
    jump student to go on from (``init_from``), or for a step count weighting of a student without jumps."""
    if consistency.jumps and cfg.method != TRAJECTORY_METHOD:
        raise DistillError(f"a jump student (--student-jumps) learns from the teacher's chains: --method "
                           f"{TRAJECTORY_METHOD}, not {cfg.method}")
    if cfg.rollouts and (init_from is None or not consistency.jumps):
        raise DistillError("--rollouts rolls out the jump student a run goes on from: give --init-from a jump "
                           "student (--student-jumps true)")
    if cfg.default_steps_share and not consistency.jumps:
        raise DistillError("--default-steps-share weights the step counts of a jump student's chains: give "
                           "--student-jumps true")


def checked_teacher(root: Path, version: str, consistency: ConsistencyConfig) -> tuple[Checkpoint, Parent]:
    """The teacher ``version`` under ``root`` (``latest`` allowed) and its lineage; a ``DistillError`` for a
    student, or for a skeleton that does not divide its training timesteps."""
    teacher, lineage = warm_start(root, "diffusion", version)
    if teacher.manifest.distillation is not None:
        raise DistillError(f"{teacher.version} is itself a distilled student: distil a plain diffusion version")
    try:
        skeleton_timesteps(teacher.manifest.schedule.timesteps, consistency.skeleton_steps)
    except ValueError as exc:
        raise DistillError(str(exc)) from None
    return teacher, lineage


def distill(teacher_version: str, cfg: DistillConfig, consistency: ConsistencyConfig, opts: RunOptions,
            minutes: float | None = None, resume: bool = False, init_from: str | None = None) -> Path | None:
    """Distil ``teacher_version`` (a plain diffusion version; ``latest`` allowed) by ``cfg.method``; returns the
    student's version folder (main rank). Latent consistency learns on ``opts.data``'s training latents;
    trajectory consistency on the teacher's own chains, computed first into a bank under ``opts.latent_cache``
    (else ``opts.run_dir``) and reused by later runs. ``minutes``: stop the loop once this long has passed since
    the call began (encoding the latents or filling the bank included), save the state, export. ``resume``: go on
    from ``opts.run_dir/state.pt``. ``init_from``: start from this exported student of the teacher instead of the
    teacher's weights."""
    started = time.monotonic()
    check_jumps(cfg, consistency, init_from)
    teacher_ck, lineage = checked_teacher(opts.checkpoints, teacher_version, consistency)
    teacher_manifest = teacher_ck.manifest
    device, dtype, ddp = start_run(opts.device, opts.precision, opts.threads, cfg.seed)
    earlier = None
    if init_from is not None:  # checked before the latents are encoded
        earlier, lineage = student_from_earlier(opts.checkpoints, init_from, teacher_ck.version, consistency)
    record = {"teacher": teacher_ck.version, "student": asdict(consistency), "method": cfg.method}
    if cfg.method == TRAJECTORY_METHOD:
        bank_root = (opts.latent_cache if opts.latent_cache is not None else opts.run_dir) / "trajectories"
        bank_dir = bank_folder(bank_root, teacher_ck.version, cfg, consistency)
        record |= {"trajectories": cfg.trajectories, "trajectory_chunk": cfg.trajectory_chunk, "bank": bank_dir.name,
                   "restarts": cfg.restarts, "restart_share": cfg.restart_share, "rollouts": cfg.rollouts,
                   "rolled_out": lineage.version if cfg.rollouts else None,
                   "default_steps_share": cfg.default_steps_share}
    check_run_folder(opts.run_dir, record, resume, write=ddp.is_main)

    data_cfg = dataclasses.replace(teacher_manifest.data, attributes=teacher_manifest.attributes)
    data_fingerprint = teacher_manifest.dataset_fingerprint  # a trajectory student sees the teacher's chains only
    if cfg.method == CONSISTENCY_METHOD:
        data_fingerprint = fingerprint(opts.data)
        vae, vae_manifest = load_vae(opts.checkpoints, teacher_manifest.vae_version, device)
        means, logvars, labels = training_latents(vae, vae_manifest.version, data_fingerprint, data_cfg, opts,
                                                  device, ddp.is_main)
        del vae
    projector = teacher_chroma_projector(opts.checkpoints, teacher_manifest, device)

    teacher = UNet(teacher_manifest.model)
    teacher.load_state_dict(teacher_ck.state_dict)
    teacher.to(device).eval().requires_grad_(False)
    if cfg.method == TRAJECTORY_METHOD:
        rolled_out = (earlier.to(device), lineage.version) if cfg.rollouts else None
        bank, restarts = fill_banks(bank_dir, teacher, teacher_manifest, cfg, consistency, device, dtype, projector,
                                    ddp.is_main, rolled_out)
        examples = len(bank["x0"])
    else:
        examples = len(means)
    student = (student_from_teacher(teacher, consistency.jumps) if earlier is None else earlier).to(device)
    model = DistributedDataParallel(student) if ddp.world > 1 else student
    trainer = Trainer(opts.run_dir, cfg.steps, cfg.log_every, cfg.save_every, ddp, device, {"model": model},
                      {"model": torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)},
                      dtype == torch.float16, BatchStream(examples, cfg.batch_size, cfg.seed, ddp),
                      {"noise": torch.Generator().manual_seed(cfg.seed * 1000 + 17 + ddp.rank)},
                      EMA(student, cfg.target_ema_decay),
                      deadline=None if minutes is None else started + 60 * minutes)
    if cfg.method == TRAJECTORY_METHOD:
        step = TrajectoryStep(student, bank, teacher_manifest, consistency, cfg, trainer, dtype, restarts)
    else:
        step = DistillStep(student, teacher, (means, logvars), labels, teacher_manifest, consistency, cfg, trainer,
                           dtype, projector)
    trainer.run(step, "distill")

    result = None
    if ddp.is_main:
        tm = teacher_manifest
        manifest = DiffusionManifest(
            model=student.config, schedule=tm.schedule, sampling=tm.sampling, vae_version=tm.vae_version,
            latent_scale=tm.latent_scale, latent_clip=tm.latent_clip, latent_shape=tm.latent_shape,
            image_size=tm.image_size, attributes=tm.attributes, data=data_cfg, dataset_fingerprint=data_fingerprint,
            training=TrainingRun(cfg, trainer.completed, examples, str(dtype).removeprefix("torch."), ddp.world,
                                 device.type, weights="ema", init_from=lineage),
            metrics={"train_loss_ema": round(step.loss_avg, 6) if step.loss_avg is not None else None},
            reader=tm.reader,  # the same latent space: the teacher's attribute reader reads the student's latents
            distillation=Distillation(teacher_ck.version, cfg.method, consistency))
        parts = {READER_FILE: load_part(teacher_ck, READER_FILE)} if tm.reader is not None else {}
        result = save_checkpoint(opts.checkpoints, unwrap(trainer.ema.model).state_dict(), manifest,
                                 dtype=DTYPES[opts.export_dtype], parts=parts)
        print(f"student checkpoint: {result} ({trainer.completed} of {cfg.steps} iterations, teacher "
              f"{teacher_ck.version}, {cfg.method})")
    ddp.close()
    return result
