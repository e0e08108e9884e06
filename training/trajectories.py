"""Trajectory-consistency distillation: the teacher's served chains, solved once, teach the student's consistency
function directly.

A consistency function maps every state of an ODE trajectory to the trajectory's end. The teacher's served sampler
(DPM-Solver++(2M), classifier-free guidance, ``x0`` clamped to the latent clip) on the student's skeleton
timesteps ``T - 1 = t_0 > ... > t_{N-1}`` is such a trajectory, from ``x_{t_0} ~ N(0, I)`` to its sample ``x_0``:
:func:`teacher_trajectories` records its ``N`` states and its end, and :class:`TrajectoryStep` regresses the
student's ``f(x_{t_k}, t_k, w)`` on that end (pseudo-Huber), for a state ``k`` drawn per row. Where latent
consistency distillation (``training.distill``) matches ``f`` one teacher step apart against its own EMA target,
every target here is the teacher's finished sample, so that no error of the student's feeds back into its targets
(the knowledge distillation of Luhman & Luhman 2021, at every state of the chain rather than at its start alone).
The student's multistep sampler (``ConsistencySampler``) visits skeleton timesteps only, so with the skeleton of
the teacher's served step count (20) it starts from the states the student learnt, and at one step maps the noise
to the teacher's served sample for that noise.

A student sampling in several steps does not stay on those chains: between steps it noises its sample afresh, so
at a later skeleton timestep it meets ``sqrt(abar) x0 + sqrt(1 - abar) z``, a state no chain passed through. The
*restarts* (:func:`fill_restarts`) are such states: a chain's sample noised afresh to a later skeleton timestep,
finished again by the teacher's served sampler from there; the student learns to map them to that new end too
(``DistillConfig.restarts``, ``restart_share``).

The chains and restarts are computed before training, in chunks that land as files in a bank folder named after
what decides them (:func:`bank_folder`): a stopped run, or another run with the same teacher and draws, reuses
what is there. Tensors ``k`` draws its noise, labels and scales from its own generator (:func:`chunk_generator`),
so a bank's contents do not depend on how many runs filled it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from facegen.model.config import ConsistencyConfig, DistillConfig
from facegen.model.device import autocast
from facegen.model.diffusion.consistency import (
    ConsistencySampler,
    consistency_output,
    jump_steps,
    skeleton_timesteps,
)
from facegen.model.diffusion.guidance import guided
from facegen.model.diffusion.samplers import DPMSolverPP2MSampler
from facegen.model.diffusion.schedule import NoiseSchedule, signal_and_noise
from facegen.model.manifest import DiffusionManifest
from facegen.model.networks.unet import UNet

from .student_training import StudentStep, guidance_draws, open_labels, pseudo_huber
from .trainer import Trainer


def teacher_trajectories(teacher: UNet, schedule: NoiseSchedule, timesteps: list[int], x_start: torch.Tensor,
                         labels: torch.Tensor, guidance: torch.Tensor, x0_clip: float,
                         chroma_projector: torch.Tensor | None = None, first: int = 0, last: int | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's served chains from ``x_start [N, C, H, W]`` at ``timesteps[first]`` over the rest of the
    descending ``timesteps`` (K of them): DPM-Solver++(2M) on ``guided`` outputs at the per-row scales ``guidance
    [N]`` under ``labels [N, A]`` (``chroma_projector [C, C]`` as the teacher serves, if it does). Returns ``(states
    [N, K - first, C, H, W], x0 [N, C, H, W])``, both float32: the state at each timestep from ``first`` on and the
    chain's sample; with ``last < K``, the chains stop at ``timesteps[last]``: ``(states [N, last - first, C, H, W],
    the state there)``. 2(K - first) (or 2(last - first)) teacher rows per row."""
    sampler = DPMSolverPP2MSampler(schedule, x0_clip)
    sampler.set_timesteps(len(timesteps))
    if sampler.timesteps != list(timesteps):
        raise ValueError(f"the served sampler's {len(timesteps)} steps are {sampler.timesteps}, not {timesteps}")
    model_fn = guided(teacher, labels, guidance, teacher.config.null_label, chroma_projector=chroma_projector)
    x, states = x_start, []
    for i, t in enumerate(timesteps[first:last], first):
        states.append(x)
        t_row = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        x = sampler.step(model_fn(x, t_row).float(), i, x).prev_sample
    return torch.stack(states, 1), x


def chain_draws(count: int, generator: torch.Generator, shape: tuple[int, ...], attributes: int, null_label: int,
                cfg: DistillConfig, consistency: ConsistencyConfig, served_guidance: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_start [count, *shape], labels int64 [count, A], guidance [count])`` for ``count`` chains: standard
    normal starts; each attribute 0 or 1 with even odds, then the null label with ``cfg.attribute_dropout`` per
    attribute and ``cfg.label_dropout`` per row (requests that leave attributes open); the served scale with
    probability ``cfg.served_guidance_share``, else uniform in ``consistency.guidance_range``."""
    x_start = torch.randn((count, *shape), generator=generator)
    labels = open_labels(torch.randint(0, 2, (count, attributes), generator=generator), null_label, cfg, generator)
    guidance = guidance_draws(count, consistency, generator)
    served = torch.rand(count, generator=generator) < cfg.served_guidance_share
    return x_start, labels, torch.where(served, torch.full_like(guidance, served_guidance), guidance)


def bank_folder(root: Path, teacher_version: str, cfg: DistillConfig, consistency: ConsistencyConfig) -> Path:
    """The folder under ``root`` of the chains that ``teacher_version`` draws for these settings: named after the
    teacher and a digest of every setting a chain depends on (not of the count: a larger bank extends a smaller)."""
    decides = {"seed": cfg.seed, "label_dropout": cfg.label_dropout, "attribute_dropout": cfg.attribute_dropout,
               "served_guidance_share": cfg.served_guidance_share, "skeleton_steps": consistency.skeleton_steps,
               "guidance_range": list(consistency.guidance_range)}
    digest = hashlib.sha256(json.dumps(decides, sort_keys=True).encode()).hexdigest()[:12]
    return root / f"{teacher_version}-{digest}"


def chunk_generator(seed: int, k: int, restarts: bool = False) -> torch.Generator:
    """The generator of the bank's chunk ``k`` of chains (or, with ``restarts``, of restarts) for ``seed``."""
    return torch.Generator().manual_seed(seed * 1_000_003 + k + (2**40 if restarts else 0))


Tensors = dict[str, torch.Tensor]  # named tensors: a bank, a chunk of it, a batch


def chunk_file(path: Path, compute: Callable[[], Tensors]) -> Tensors:
    """The bank chunk in ``path``, or ``compute()``'s, written there first so that it is there whole or not at all
    (a stopped fill leaves a ``.part`` file)."""
    if path.is_file():
        return torch.load(path, weights_only=True)
    part = compute()
    partial = path.with_suffix(".part")
    torch.save(part, partial)
    partial.replace(path)
    return part


def joined(chunks: list[Tensors], count: int) -> Tensors:
    """The first ``count`` rows of ``chunks``, each field concatenated along its first dimension."""
    return {name: torch.cat([part[name] for part in chunks])[:count] for name in chunks[0]}


def chain_chunk_files(folder: Path, prefix: str, chains: int, end: int, chunk: int,
                      compute: Callable[[int, slice], Tensors], desc: str, show_progress: bool) -> list[Tensors]:
    """The chunks of rows made from the bank's first ``chains`` chains, ``chunk`` chains each (chunk ``k``: chains
    ``k chunk`` up to the next chunk's first or ``end``), in the files ``{prefix}-{chunk}-{k:05d}-{chains}.pt`` of
    ``folder``; ``compute(k, chains)`` makes those it lacks (:func:`chunk_file`)."""
    folder.mkdir(parents=True, exist_ok=True)
    chunks = []
    for k in tqdm(range(-(-chains // chunk)), desc=desc, disable=not show_progress):
        rows = slice(k * chunk, min((k + 1) * chunk, end))
        path = folder / f"{prefix}-{chunk}-{k:05d}-{rows.stop - rows.start}.pt"
        chunks.append(chunk_file(path, lambda k=k, rows=rows: compute(k, rows)))
    return chunks


def fill_bank(folder: Path, teacher: UNet, manifest: DiffusionManifest, cfg: DistillConfig,
              consistency: ConsistencyConfig, device: torch.device, dtype: torch.dtype,
              chroma_projector: torch.Tensor | None = None, show_progress: bool = True) -> Tensors:
    """The first ``cfg.trajectories`` chains of the bank ``folder``, computing the chunks (of
    ``cfg.trajectory_chunk`` chains; a file per chunk, named by its size and index) it lacks: ``states
    float16 [M, K, C, H, W]`` (K = ``consistency.skeleton_steps``, descending timesteps), ``x0 float32 [M, C, H,
    W]``, ``labels int64 [M, A]``, ``guidance float32 [M]``, ``timesteps int64 [K]``."""
    schedule = NoiseSchedule(manifest.schedule)
    timesteps = skeleton_timesteps(schedule.timesteps, consistency.skeleton_steps)[::-1]
    folder.mkdir(parents=True, exist_ok=True)
    chunk = cfg.trajectory_chunk

    def chains(k: int) -> Tensors:
        x_start, labels, guidance = chain_draws(chunk, chunk_generator(cfg.seed, k), manifest.latent_shape,
                                                len(manifest.attributes), teacher.config.null_label, cfg,
                                                consistency, manifest.sampling.guidance_scale)
        with torch.no_grad(), autocast(device, dtype):
            states, x0 = teacher_trajectories(teacher, schedule, timesteps, x_start.to(device), labels.to(device),
                                              guidance.to(device), manifest.latent_clip, chroma_projector)
        return {"states": states.half().cpu(), "x0": x0.cpu(), "labels": labels, "guidance": guidance}

    chunks = [chunk_file(folder / f"{chunk}-{k:05d}.pt", lambda k=k: chains(k))
              for k in tqdm(range(-(-cfg.trajectories // chunk)), desc="teacher chains", disable=not show_progress)]
    return joined(chunks, cfg.trajectories) | {"timesteps": torch.tensor(timesteps)}


def fill_restarts(folder: Path, bank: Tensors, teacher: UNet, manifest: DiffusionManifest, cfg: DistillConfig,
                  device: torch.device, dtype: torch.dtype, chroma_projector: torch.Tensor | None = None,
                  show_progress: bool = True) -> Tensors:
    """The restarts of the first ``cfg.restarts`` chains of ``bank`` (:func:`fill_bank`), computing the chunks the
    folder lacks (a file per chunk of ``cfg.trajectory_chunk`` chains, named by its size, index and rows): chain
    ``j``'s sample noised afresh to skeleton index ``index[j] = 1 + j mod (K - 1)`` (every timestep below ``T - 1``
    in turn) and finished by the teacher under the chain's labels and scale. Returns ``states float16 [M, C, H,
    W]`` (the noised samples), ``index int64 [M]`` (into ``bank["timesteps"]``), ``x0 float32 [M, C, H, W]`` (the
    teacher's new ends), ``labels int64 [M, A]``, ``guidance float32 [M]``; about K teacher rows per restart, half
    a chain's 2K."""
    schedule = NoiseSchedule(manifest.schedule)
    timesteps = bank["timesteps"].tolist()

    def restarted(k: int, rows: slice) -> Tensors:
        sample, labels, guidance = bank["x0"][rows], bank["labels"][rows], bank["guidance"][rows]
        index = 1 + torch.arange(rows.start, rows.stop) % (len(timesteps) - 1)
        noise = torch.randn(sample.shape, generator=chunk_generator(cfg.seed, k, restarts=True))
        states = schedule.q_sample(sample, bank["timesteps"][index], noise)
        ends = torch.empty_like(sample)
        for first in index.unique().tolist():
            at = index == first
            with torch.no_grad(), autocast(device, dtype):
                ends[at] = teacher_trajectories(teacher, schedule, timesteps, states[at].to(device),
                                                labels[at].to(device), guidance[at].to(device), manifest.latent_clip,
                                                chroma_projector, first)[1].cpu()
        return {"states": states.half(), "index": index, "x0": ends, "labels": labels, "guidance": guidance}

    # whole chunks of the bank (its last may be cut short), so that more restarts extend these files
    chunks = chain_chunk_files(folder, "restart", cfg.restarts, len(bank["x0"]), cfg.trajectory_chunk, restarted,
                               "teacher restarts", show_progress)
    return joined(chunks, cfg.restarts) | {"landing": torch.full((cfg.restarts,), len(timesteps))}


def fill_rollouts(folder: Path, bank: Tensors, teacher: UNet, student: UNet, student_version: str,
                  manifest: DiffusionManifest, cfg: DistillConfig, consistency: ConsistencyConfig,
                  device: torch.device, dtype: torch.dtype, chroma_projector: torch.Tensor | None = None,
                  show_progress: bool = True) -> Tensors:
    """The rollouts of the jump student ``student`` (version ``student_version``) from the first ``cfg.rollouts``
    chains of ``bank`` (:func:`fill_bank`), computing the chunks the folder lacks (a file per chunk of
    ``cfg.trajectory_chunk`` chains, named by the student, its size, index and rows): the states its served
    sampler reaches after each of the first ``n - 1`` steps of its ``n = consistency.default_steps``-step chain from
    the chain's start, each finished by the teacher from there, and the ``x0`` whose DDIM step from the state lands
    where the teacher is at the sampler's next timestep (:func:`landing_x0`). Returns ``states float16 [M, C, H,
    W]``, ``index`` and ``landing`` (``int64 [M]``, into ``bank["timesteps"]``; its length: the end), ``x0 float32
    [M, C, H, W]``, ``labels int64 [M, A]``, ``guidance float32 [M]``, ``M = (n - 1) cfg.rollouts``."""
    schedule = NoiseSchedule(manifest.schedule)
    timesteps = bank["timesteps"].tolist()
    sampler = ConsistencySampler(schedule, consistency, manifest.latent_clip)
    sampler.set_timesteps(consistency.default_steps)
    landings = sampler.timesteps[1:] + [-1]

    def rolled(rows: slice) -> Tensors:
        x = bank["states"][rows, 0].to(device).float()  # the chains' starts
        labels, guidance = (bank[name][rows].to(device) for name in ("labels", "guidance"))
        count, parts = rows.stop - rows.start, []
        for i, (t, s) in enumerate(zip(sampler.timesteps[:-1], landings[:-1], strict=True)):
            with torch.no_grad(), autocast(device, dtype):
                output = student(x, torch.full((count,), t, device=device), labels, guidance=guidance,
                                 target=torch.full((count,), s, device=device)).float()
                x = sampler.step(output, i, x).prev_sample
                land = landings[i + 1]
                first, landing = timesteps.index(s), len(timesteps) if land < 0 else timesteps.index(land)
                x_land = teacher_trajectories(teacher, schedule, timesteps, x, labels, guidance, manifest.latent_clip,
                                              chroma_projector, first, landing)[1]  # the teacher goes no further
            target = landing_x0(schedule, x, torch.full((count,), s, device=device), x_land,
                                torch.full((count,), land, device=device))
            parts.append({"states": x.half().cpu(), "index": torch.full((count,), first),
                          "landing": torch.full((count,), landing), "x0": target.cpu(), "labels": labels.cpu(),
                          "guidance": guidance.cpu()})
        return joined(parts, len(parts) * count)

    chunks = chain_chunk_files(folder, f"rollout-{student_version}", cfg.rollouts, cfg.rollouts, cfg.trajectory_chunk,
                               lambda k, rows: rolled(rows), "student rollouts", show_progress)
    return joined(chunks, (len(landings) - 1) * cfg.rollouts)


def fill_banks(folder: Path, teacher: UNet, manifest: DiffusionManifest, cfg: DistillConfig,
               consistency: ConsistencyConfig, device: torch.device, dtype: torch.dtype,
               chroma_projector: torch.Tensor | None = None, show_progress: bool = True,
               rolled_out: tuple[UNet, str] | None = None) -> tuple[Tensors, Tensors | None]:
    """``(chains, off_chain)``: :func:`fill_bank`'s chains, then the rows off them, joined: :func:`fill_restarts`'
    restarts (``cfg.restarts``) and :func:`fill_rollouts`' rollouts of the jump student ``rolled_out = (network,
    version)`` (``cfg.rollouts``); None when there are neither."""
    bank = fill_bank(folder, teacher, manifest, cfg, consistency, device, dtype, chroma_projector, show_progress)
    parts = []
    if cfg.restarts:
        parts.append(fill_restarts(folder, bank, teacher, manifest, cfg, device, dtype, chroma_projector,
                                   show_progress))
    if cfg.rollouts:
        network, version = rolled_out
        was_training = network.training
        parts.append(fill_rollouts(folder, bank, teacher, network.eval(), version, manifest, cfg, consistency, device,
                                   dtype, chroma_projector, show_progress))
        network.train(was_training)
    return bank, joined(parts, sum(len(part["x0"]) for part in parts)) if parts else None


def landing_x0(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, x_s: torch.Tensor, s: torch.Tensor
               ) -> torch.Tensor:
    """The ``x0 [N, C, H, W]`` whose DDIM step (eta 0) from ``x_t`` at ``t [N]`` lands on ``x_s`` at ``s [N]`` (``s <
    t``): ``x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps(x_t, x0)`` solved for ``x0``; rows with ``s = -1`` (the
    chain's end, ``abar = 1``) give ``x_s`` itself. float32."""
    end = (s < 0).view(-1, 1, 1, 1)
    root_a, root_1a = signal_and_noise(schedule.abar(t, x_t), x_t)
    root_as, root_1as = signal_and_noise(torch.where(end, 1.0, schedule.abar(s.clamp(min=0), x_t)), x_t)
    ratio = root_1as / root_1a
    return (x_s - ratio * x_t) / (root_as - ratio * root_a)


def bank_jumps(steps: list[tuple[int, int, int]], states: int) -> torch.Tensor:
    """``int64 [J, 2]``: the bank indices (descending timesteps, ``states`` of them; ``states``: the chain's end) of
    the start and landing of each of :func:`jump_steps`' ``steps`` (indices into the ascending skeleton)."""
    return torch.tensor([[states - 1 - start, states if end < 0 else states - 1 - end] for _, start, end in steps])


def jump_weights(steps: list[tuple[int, int, int]], consistency: ConsistencyConfig, default_steps_share: float
                 ) -> torch.Tensor:
    """``float64 [J]``, summing to 1: the probability of each of :func:`jump_steps`' ``steps`` in a batch's chain
    rows: ``default_steps_share`` spread over the jumps of the ``consistency.default_steps``-step chain, the rest
    over the step counts ``1..max_steps`` alike and within each over its jumps alike."""
    counts = torch.tensor([n for n, _, _ in steps], dtype=torch.float64)
    served = (counts == consistency.default_steps).double()
    return (1 - default_steps_share) / (consistency.max_steps * counts) + default_steps_share * served / served.sum()


def with_end(timesteps: torch.Tensor) -> torch.Tensor:
    """The bank's descending ``timesteps [K]`` and ``-1`` (the chain's end) after them: ``[K + 1]``, indexed by a
    landing."""
    return torch.cat([timesteps, torch.tensor([-1])])


def chain_rows(bank: Tensors, schedule: NoiseSchedule, chains: torch.Tensor, k: torch.Tensor, landing: torch.Tensor,
               jumps: bool) -> Tensors:
    """The training rows of ``bank``'s chains ``chains [B]`` at their states ``k [B]`` (bank indices): ``x_t [B, C,
    H, W]`` (float32), ``index`` (``k``), ``landing [B]``, ``labels``, ``guidance`` and the target ``x0``: the
    chain's sample, or with ``jumps`` the ``x0`` whose DDIM step from ``x_t`` lands on the chain's state ``landing``
    (``len(bank["timesteps"])``: its end; :func:`landing_x0`)."""
    last = len(bank["timesteps"])
    x_t = bank["states"][chains, k].float()
    target = bank["x0"][chains]
    if jumps:
        x_s = torch.where((landing == last).view(-1, 1, 1, 1), target,
                          bank["states"][chains, landing.clamp(max=last - 1)].float())
        target = landing_x0(schedule, x_t, bank["timesteps"][k], x_s, with_end(bank["timesteps"])[landing])
    return {"x_t": x_t, "index": k, "landing": landing, "x0": target, "labels": bank["labels"][chains],
            "guidance": bank["guidance"][chains]}


def student_loss(student: torch.nn.Module, schedule: NoiseSchedule, consistency: ConsistencyConfig,
                 timesteps: torch.Tensor, rows: Tensors, huber_c: float, device: torch.device, dtype: torch.dtype
                 ) -> torch.Tensor:
    """The pseudo-Huber loss (mean over rows) of the student's ``f`` at ``rows`` (:func:`chain_rows`' fields;
    ``index`` and ``landing`` into the bank's descending ``timesteps``) against their ``x0``."""
    t = timesteps[rows["index"]].to(device)
    target_t = with_end(timesteps)[rows["landing"]].to(device) if consistency.jumps else None
    x_t, y, w, target = (rows[name].to(device) for name in ("x_t", "labels", "guidance", "x0"))
    with autocast(device, dtype):
        output = student(x_t, t, y, guidance=w, target=target_t).float()
        return pseudo_huber(consistency_output(schedule, consistency, output, x_t, t), target, huber_c)


class TrajectoryStep(StudentStep):
    """One trajectory-consistency iteration: a batch of chains from the bank, one state of each, the student's
    ``f`` there pulled towards the chain's sample, or, for a jump student (``consistency.jumps``), towards the
    ``x0`` whose DDIM step lands on the chain where the sampler's step from that state does (:func:`jump_steps`:
    the steps of every chain of 1..max_steps steps, drawn as :func:`jump_weights` says)."""

    def __init__(self, student: UNet, bank: Tensors, manifest: DiffusionManifest,
                 consistency: ConsistencyConfig, cfg: DistillConfig, trainer: Trainer, dtype: torch.dtype,
                 restarts: Tensors | None = None):
        super().__init__(student, cfg, trainer)
        self.bank, self.restarts, self.consistency, self.dtype = bank, restarts, consistency, dtype
        self.schedule = NoiseSchedule(manifest.schedule)
        steps = jump_steps(consistency.skeleton_steps, consistency.max_steps)
        self.jumps = bank_jumps(steps, len(bank["timesteps"]))
        self.jump_weights = jump_weights(steps, consistency, cfg.default_steps_share)

    def batch(self) -> Tensors:
        """The iteration's rows: ``x_t [B, C, H, W]`` (float32), ``index [B]`` (of its timestep in the bank's),
        ``landing [B]`` (the bank index of the state its step lands on; ``len(timesteps)``: the end), ``x0`` (the
        target), ``labels``, ``guidance``: one state of each chain the stream deals (a jump's start for a jump
        student), each row replaced with ``cfg.restart_share`` by a random row of ``restarts`` (when there are any:
        :func:`fill_restarts`' and :func:`fill_rollouts`' rows), which lands where its own ``landing`` says."""
        generator, bank = self.trainer.generators["noise"], self.bank
        chains = next(self.trainer.stream)
        last = len(bank["timesteps"])
        if self.consistency.jumps:
            k, landing = self.jumps[torch.multinomial(self.jump_weights, len(chains), True, generator=generator)].T
        else:
            k = torch.randint(0, last, (len(chains),), generator=generator)
            landing = torch.full_like(k, last)
        rows = chain_rows(bank, self.schedule, chains, k, landing, self.consistency.jumps)
        if self.restarts is None:
            return rows
        picked = torch.randint(0, len(self.restarts["x0"]), (len(chains),), generator=generator)
        use = torch.rand(len(chains), generator=generator) < self.cfg.restart_share
        restart = {"x_t": self.restarts["states"][picked].float()} | {
            name: self.restarts[name][picked] for name in ("index", "landing", "x0", "labels", "guidance")}
        return {name: torch.where(use.view(-1, *[1] * (value.dim() - 1)), restart[name], value)
                for name, value in rows.items()}

    def __call__(self, step: int) -> dict[str, float]:
        loss = student_loss(self.trainer.modules["model"], self.schedule, self.consistency, self.bank["timesteps"],
                            self.batch(), self.cfg.huber_c, self.trainer.device, self.dtype)
        return self.update(step, loss)
