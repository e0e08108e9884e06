"""Every model, data and training default, defined once in frozen dataclasses.

Configs round-trip through plain dicts (``asdict`` / ``from_dict``) so a checkpoint's manifest can rebuild its
networks without code from the file name or pickles.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

# Compute precisions every entry point accepts (``facegen.model.device.pick_dtype`` turns one into a dtype).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")

# What an edit inverts under and guides away from (``LatentDiffusion.edit_latents``): the source's label or the null
# (unconditional) one, and the edit's guidance scale; the defaults are the ones ``python -m training evaluate-edit``
# chose; facegen.contract.spec.DEFAULT_EDIT_GUIDANCE repeats the scale torch-free (tests/worker/test_contract.py).
EDIT_REFERENCES = ("source", "null")
EDIT_REFERENCE = "source"
EDIT_GUIDANCE_SCALE = 3.0
# Where an edit may change the face: "region" keeps every latent outside the edited attributes' regions on the input's
# own inversion path (``facegen.model.regions.edit_mask``); "focused" narrows that region, face by face, to where the
# model's own predictions under the source and the target labels differ (``LatentDiffusion.focus_mask``); "image"
# lets the whole image change.
EDIT_SCOPES = ("region", "focused", "image")
EDIT_SCOPE = "region"
# The focused scope's map: the prediction difference averaged over this many fixed noises at this fraction of the
# schedule, divided by each face's largest; full where it reaches the threshold, fading to 0 at half of it.
EDIT_FOCUS_TRIALS = 8
EDIT_FOCUS_TIME = 0.5
EDIT_FOCUS_THRESHOLD = 0.5
# An edit holds the attributes it leaves open at the input's values, read by the model itself (``LatentDiffusion.
# read_open_attributes``): the denoising error under each value over this many fixed (timestep, noise) pairs, the
# timesteps spread evenly over this span of the schedule (as fractions of its length).
ATTRIBUTE_READ_TRIALS = 16
ATTRIBUTE_READ_SPAN = (0.1, 0.9)
# With a latent attribute reader in the version (``python -m training reader``), an edit also steers each step's x0
# prediction inside the edited region down the gradient of the reader's loss against the input's own readings of the
# attributes the edit leaves open, by this step size (0: off; chosen by ``evaluate-edit --hold-guidance``).
EDIT_HOLD_GUIDANCE = 0.5
# Each attribute's region in the aligned crop: an ellipse (centre x, centre y, radius x, radius y) in fractions of the
# image side. Smiling's spans the mouth of CelebA's aligned faces (mean mouth centre 0.74 of the side down the crop)
# and of the synthetic ones (0.67, spread 0.02; mouth 0.15-0.25 of the side wide). An edit of an attribute not listed
# may change the whole image.
EDIT_REGIONS = {"Smiling": (0.5, 0.71, 0.2, 0.11)}

T = TypeVar("T")


class InvalidConfig(ValueError):
    """A config whose values do not fit together (the message names the field)."""


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build a config dataclass from a dict, converting lists back to tuples and refusing unknown keys."""
    names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - set(names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config keys {sorted(unknown)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**values)


def asdict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


@dataclass(frozen=True)
class DataConfig:
    """How CelebA-layout images become training tensors: ``[3, image_size, image_size]`` in ``[-1, 1]``."""

    attributes: tuple[str, ...] = ("Smiling",)
    crop: int = 178  # center crop (pixels of the 178x218 aligned images) before resizing
    image_size: int = 64
    hflip: bool = True


@dataclass(frozen=True)
class VAEConfig:
    """Convolutional VAE: ``[N, 3, R, R]`` in [-1, 1] <-> latent ``[N, latent_channels, R/2^k, R/2^k]``."""

    in_channels: int = 3
    channels: tuple[int, ...] = (32, 64, 128)  # one entry per resolution; len-1 downsamplings
    blocks_per_level: int = 1
    latent_channels: int = 4
    groups: int = 16  # GroupNorm groups
    attention_reduction: int = 8  # squeeze-excitation bottleneck ratio


@dataclass(frozen=True)
class UNetConfig:
    """Latent denoiser: ``(x_t [N, C, H, W], t [N] in 0..T-1, labels [N, A] in {0, 1, null_label}) -> [N, C, H, W]``."""

    in_channels: int = 4
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    blocks_per_level: int = 2
    attention_levels: tuple[int, ...] = (1, 2)  # levels (0 = full latent resolution) with self-attention
    heads: int = 4
    groups: int = 32
    dropout: float = 0.0
    num_attributes: int = 1
    null_label: int = 2  # label index meaning "attribute not given" (classifier-free guidance)
    # a distilled student's extra input, the guidance scale w [N]: embedded like t and added to the time embedding
    # through a zero-initialised projection (``UNet(..., guidance=w)``); False: the plain model, unchanged
    guidance_embedding: bool = False
    # a jump student's extra input, the timestep its step lands on (-1: the chain's end), embedded like t through a
    # zero-initialised projection (``UNet(..., target=s)``); False: no such input
    target_embedding: bool = False


@dataclass(frozen=True)
class ReaderConfig:
    """Latent attribute reader: scaled latents ``[N, in_channels, h, w] -> logits [N, len(attributes)]``, two 3x3
    convolutions (GroupNorm, SiLU) per level of ``channels``, halving the resolution between levels."""

    attributes: tuple[str, ...]
    in_channels: int = 4
    channels: tuple[int, ...] = (64, 128, 128)
    groups: int = 8


@dataclass(frozen=True)
class ReaderTrainConfig:
    """``python -m training reader``: AdamW with a one-cycle schedule on latents sampled from the cached posteriors,
    plus Gaussian noise of ``latent_noise`` (in scaled-latent units) so that the reader tolerates a sampler's drift."""

    steps: int = 1500
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    latent_noise: float = 0.1
    seed: int = 0


@dataclass(frozen=True)
class ScheduleConfig:
    """Forward process ``q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)`` and what the network predicts."""

    timesteps: int = 1000
    kind: str = "cosine"  # "cosine" (Nichol & Dhariwal) or "linear" (Ho et al.)
    prediction: str = "v"  # "v" (Salimans & Ho), well-posed at abar_T ~ 0; or "eps"
    linear_beta_start: float = 1e-4
    linear_beta_end: float = 2e-2


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling defaults stored with a diffusion checkpoint."""

    guidance_scale: float = 3.0
    ddim_eta: float = 0.0
    # False: guidance leaves the decoded colours to the conditional prediction and extrapolates only the rest of the
    # guidance difference (shape, luminance; facegen.model.chroma); True: plain classifier-free guidance
    guide_chroma: bool = True


@dataclass(frozen=True)
class VAETrainConfig:
    steps: int = 2000
    batch_size: int = 32
    lr: float = 3e-4
    kl_weight: float = 1e-4
    perceptual_weight: float = 0.5
    adversarial_weight: float = 0.0  # > 0 enables the PatchGAN discriminator
    adversarial_start: int = 1000  # step at which the adversarial loss starts
    landmark_weight: float = 3.0  # extra L1 weight around eyes and mouth (when the folder has landmarks; 0: off)
    landmark_sigma: float = 0.06  # width of each landmark's weight bump, as a fraction of the image size
    # > 0: a mouth whose luminance varies less than this (std, in [-1, 1] units; the synthetic faces' median is 0.22,
    # their dark faces' 0.15) gets its landmark weight raised by the shortfall's ratio, up to mouth_contrast_cap
    # (regions.contrast_boost); 0: off
    mouth_contrast: float = 0.0
    mouth_contrast_cap: float = 4.0
    # True: draw training faces in proportion to that boost too (needs mouth_contrast > 0): faint mouths come up to
    # mouth_contrast_cap times as often, so the few faces that lose their smile in the round trip are seen more
    contrast_sampling: bool = False
    train_encoder: bool = True  # False: fine-tune the decoder alone; the latent space (and diffusion models on it) stay valid
    # False: fine-tune the encoder alone; every latent a diffusion model samples decodes to the same image as before
    train_decoder: bool = True
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 50
    save_every: int = 500  # resumable training state, not a checkpoint version


@dataclass(frozen=True)
class DiffusionTrainConfig:
    steps: int = 4000
    batch_size: int = 128
    lr: float = 3e-4
    warmup: int = 200
    label_dropout: float = 0.15  # probability of training a sample with the null label
    # then, for each attribute of a sample kept by label_dropout, the probability of the null label for it alone:
    # a multi-attribute model learns every partial condition (e.g. Smiling given, Male left open); 0 for one attribute
    attribute_dropout: float = 0.0
    min_snr_gamma: float = 5.0  # Min-SNR-gamma loss weighting (Hang et al. 2023); 0: plain MSE
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 50
    save_every: int = 500


@dataclass(frozen=True)
class ConsistencyConfig:
    """A latent consistency student (Luo et al. 2023): what it was distilled on and how it samples; stored in its
    manifest, read by ``facegen.model.diffusion.consistency``.

    The student is distilled on the teacher's ``skeleton_steps`` DDIM timesteps ``t_n = (n + 1) T / N - 1`` and
    outputs ``f(x_t, t) = c_skip(t) x_t + c_out(t) x0_pred`` with ``c_skip = sigma_data^2 / ((s t)^2 + sigma_data^2)``,
    ``c_out = s t / sqrt((s t)^2 + sigma_data^2)``, ``s = timestep_scaling`` (LCM's boundary condition: ``f(x, 0) = x``,
    ``f ~ x0_pred`` at every skeleton timestep)."""

    skeleton_steps: int = 50
    sigma_data: float = 0.5
    timestep_scaling: float = 10.0
    max_steps: int = 8  # sampling takes 1..max_steps steps (network rows per image)
    default_steps: int = 4
    # between steps, the share of the re-noised latent's noise variance drawn afresh: 1 is Song et al.'s multistep
    # sampling, 0 steps deterministically along the student's own noise estimate (DDIM on its sample)
    fresh_noise: float = 1.0
    # a jump student (``trajectory-consistency`` only): the network also takes the timestep its step lands on and
    # outputs the ``x0`` whose DDIM step from ``x_t`` reaches the teacher's chain there (its end at the last step), so
    # the sampler steps deterministically (fresh_noise 0) along the teacher's trajectory
    jumps: bool = False
    guidance_range: tuple[float, ...] = (1.0, 8.0)  # the guidance scales w it was trained on (drawn uniformly)

    def __post_init__(self) -> None:
        if len(self.guidance_range) != 2 or not 0 <= self.guidance_range[0] <= self.guidance_range[1]:
            raise InvalidConfig(f"guidance_range must be two scales 0 <= low <= high, got {self.guidance_range}")
        if not 1 <= self.default_steps <= self.max_steps:
            raise InvalidConfig(f"default_steps must be in 1..max_steps ({self.max_steps}), got {self.default_steps}")
        if not 0 <= self.fresh_noise <= 1:
            raise InvalidConfig(f"fresh_noise must be in [0, 1], got {self.fresh_noise}")
        if self.jumps and self.fresh_noise:
            raise InvalidConfig(f"a jump student steps deterministically: fresh_noise must be 0, got {self.fresh_noise}")


# The fields of a ConsistencyConfig that choose how a trained student samples, not what it learnt: ``retune`` sets
# them (``--student-default-steps``, ``--student-fresh-noise``) and a run going on from a student ignores them.
STUDENT_SERVING_FIELDS = ("default_steps", "fresh_noise")


# How a student learns its consistency function ``f(x_t, t)`` (``training.distill``): "latent-consistency" matches
# ``f`` at neighbouring skeleton timesteps, one guided teacher DDIM step apart (Luo et al. 2023, Alg. 1);
# "trajectory-consistency" regresses ``f`` at every state of the teacher's served guided DPM-Solver++ chains on that
# chain's final sample (``training.trajectories``).
DISTILLATION_METHODS = ("latent-consistency", "trajectory-consistency")


@dataclass(frozen=True)
class DistillConfig:
    """``python -m training distill``: a few-step student of a teacher by one of ``DISTILLATION_METHODS``. The
    loss is the pseudo-Huber distance ``sqrt(||f - f_target||^2 + c^2) - c`` per latent (Song & Dhariwal 2023:
    far-off targets pull linearly, not quadratically as in a squared error), AdamW with a linear warm-up then a
    constant learning rate (a time budget may stop the run at any step)."""

    method: str = "latent-consistency"
    steps: int = 4000  # iterations planned (``--minutes`` may stop earlier; ``--resume`` goes on)
    batch_size: int = 64
    lr: float = 5e-5
    warmup: int = 100
    label_dropout: float = 0.1  # probability of the null label: requests that leave an attribute open
    attribute_dropout: float = 0.0  # then each attribute alone (multi-attribute teachers), as DiffusionTrainConfig's
    target_ema_decay: float = 0.95  # the target network's EMA (LCM's mu); the exported weights are this EMA
    huber_c: float = 0.03  # pseudo-Huber c: Song & Dhariwal's 0.00054 sqrt(d), d = 4x16x16, doubled for latents of std 1
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 20
    save_every: int = 200
    # trajectory-consistency: the teacher chains drawn before training (their start noise, labels and scales from
    # ``seed``), and the share of them at the teacher's served guidance scale (the rest uniform in guidance_range)
    trajectories: int = 8192
    served_guidance_share: float = 0.5
    trajectory_chunk: int = 256  # chains per bank file: what a stopped fill resumes from
    # restarts: the first ``restarts`` chains' samples noised afresh to a later skeleton timestep and finished by the
    # teacher again (the states a multistep student sampler visits); ``restart_share`` of each batch comes from them
    restarts: int = 0
    restart_share: float = 0.5
    # rollouts (a jump student going on from one, ``--init-from``): that student's own states along its
    # ``default_steps``-step chains from the first ``rollouts`` chains' starts, each finished by the teacher from
    # there; restarts and rollouts together make up ``restart_share`` of each batch
    rollouts: int = 0
    # a jump student: the share of each batch's chain rows drawn among the jumps of its ``default_steps``-step chain
    # (the served one); the rest draw each step count 1..max_steps as often
    default_steps_share: float = 0.0

    def __post_init__(self) -> None:
        if self.method not in DISTILLATION_METHODS:
            raise InvalidConfig(f"method must be one of {DISTILLATION_METHODS}, got {self.method!r}")
        if min(self.trajectories, self.trajectory_chunk) < 1 or not 0 <= self.served_guidance_share <= 1:
            raise InvalidConfig("trajectories and trajectory_chunk must be >= 1 and served_guidance_share in [0, 1], "
                                f"got {self.trajectories}, {self.trajectory_chunk}, {self.served_guidance_share}")
        if not all(0 <= count <= self.trajectories for count in (self.restarts, self.rollouts)) \
                or not 0 <= self.restart_share <= 1:
            raise InvalidConfig(f"restarts and rollouts must be in 0..trajectories ({self.trajectories}) and "
                                f"restart_share in [0, 1], got {self.restarts}, {self.rollouts}, {self.restart_share}")
        if not 0 <= self.default_steps_share <= 1:
            raise InvalidConfig(f"default_steps_share must be in [0, 1], got {self.default_steps_share}")
