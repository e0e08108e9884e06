"""``python -m training evaluate``: attribute control, KID/FID and VAE reconstruction, each with its uncertainty.

- The judge (:mod:`training.evaluation.judge`) is a panel of classifiers (``--judges``, default five seeds) trained on the
  folder's train split with a generator's failure modes as augmentations; a verdict is their mean probability, and
  each rate comes with every member's own. Its accuracy on the sharp test split, a blurred copy and the VAE's
  reconstructions is reported beside everything it judges, with a warning when they differ by more than 2 points.
- For each sampler setting, ``n`` images per label (or the setting's own ``n``: DDPM 1000 costs hours at 500) are
  generated with the worker's sampling path (:meth:`LatentDiffusion.sample_latents` +
  :meth:`LatentDiffusion.decode`, image ``i`` seeded by ``(seed, i)``) and scored: attribute accuracy per label with
  a 95% Wilson interval, KID (unbiased at small n) and FID against the test split (n printed with each; compare FIDs
  only at equal n), seconds per image. The ``student`` sampler runs the model's newest distilled student (the one a
  worker serves beside it), at the model's default guidance unless the setting gives one; its rows name it and are
  also recorded beside the student.
- Reported numbers use ``REPORT_SEED`` and the test split; tuning (``--tuning``) uses ``TUNING_SEED`` and the
  validation split in its place (judged faces, round trips, KID/FID reference) and is stored apart, and a report
  refuses any seed that trained or tuned the model: no reported number was selected on its own seeds or faces.
- The VAE's reconstruction PSNR on the test split, and how often the judge agrees on an image and its
  reconstruction (a smile the VAE loses cannot be generated).
- With ``colour`` (``--colour``): the share of each label's generated faces whose mouth shows colours real mouths
  of the label do not (the edit instruments' colour instrument, :mod:`training.evaluation.mouth_colour`, its
  reference and threshold from the validation split), with its 95% Wilson interval.
- Floors beside the generated rows: KID/FID of ``n`` real training faces per label against the test split (what a
  perfect generator scores at this n) and of the same faces after a round trip through the model's VAE (what a
  perfect diffusion model on this VAE scores): how much of a row's distance the diffusion model can still close.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from facegen.model.checkpoints import (
    LATEST,
    load_checkpoint,
    read_evaluation,
    read_manifest,
    record_evaluation,
    resolve_version,
    served_versions,
)
from facegen.model.config import DataConfig
from facegen.model.device import pick_device, pick_dtype
from facegen.model.diffusion.noise import ImageNoise
from facegen.model.diffusion.samplers import STUDENT_SAMPLER
from facegen.model.imaging import to_float, to_uint8
from facegen.model.manifest import DiffusionManifest
from facegen.model.networks.vae import VAE
from facegen.model.pipeline import LatentDiffusion
from training.data.celeba import load_split
from training.evaluation.protocol import (
    JUDGE_PANEL_SIZE,
    REPORT_SEED,
    REPORT_SPLIT,
    TUNING_SEED,
    TUNING_SPLIT,
)
from training.stats import percent_ci
from training.train_vae import psnr, reconstruct_images

from .judge import (
    JudgePanel,
    Verdicts,
    describe_panel,
    first_attribute_only,
    format_rate,
    members_range,
    robustness,
    train_panel,
)
from .metrics import InceptionFeatures, kid

if TYPE_CHECKING:  # both import this module
    from .edit_realism import EditInstruments
    from .evaluate_edit import InstrumentOptions

HEADLINE_MIN_N = 500  # images per label the headline row needs before the report calls it one


class SeedError(ValueError):
    """A report was asked for on seeds that trained or tuned the model."""


class SettingError(ValueError):
    """A sampler setting the model cannot be measured at: no student for the student sampler, steps or a guidance
    scale its sampler does not take."""


@dataclass(frozen=True)
class Setting:
    sampler: str
    steps: int
    guidance_scale: float | None  # None: the model's own serving default
    n: int | None = None  # images per label for this row; None: the evaluation's n

    def name(self) -> str:
        return f"{self.sampler}-{self.steps}-g{self.guidance_scale:g}"

    def for_model(self, model: LatentDiffusion) -> Setting:
        """This setting with the model's default guidance filled in where none was given."""
        if self.guidance_scale is not None:
            return self
        return dataclasses.replace(self, guidance_scale=model.sampling.guidance_scale)


def parse_settings(text: str, guidance: float | None) -> list[Setting]:
    """``SAMPLER:STEPS[:GUIDANCE][@N],...`` (e.g. ``student:4,dpmpp:20:3,ddpm:1000@100``) -> settings;
    ``guidance`` where an item gives none (None: each model's own), ``@N`` that row's images per label."""
    settings = []
    for item in text.split(","):
        spec, _, n = item.strip().partition("@")
        parts = spec.split(":")
        if len(parts) not in (2, 3) or not parts[0]:
            raise ValueError(f"setting {item!r}: expected SAMPLER:STEPS[:GUIDANCE][@N]")
        settings.append(Setting(parts[0], int(parts[1]), float(parts[2]) if len(parts) == 3 else guidance,
                                int(n) if n else None))
    return settings


def sweep_settings(guidance: float | None) -> list[Setting]:
    """The comparison table: the original 1000-step DDPM, DDIM 50/20, DPM-Solver++ 20/10, guidance 1/2/4."""
    settings = [Setting("ddpm", 1000, guidance), Setting("ddim", 50, guidance), Setting("ddim", 20, guidance),
                Setting("dpmpp", 20, guidance), Setting("dpmpp", 10, guidance)]
    return settings + [Setting("dpmpp", 20, g) for g in (1.0, 2.0, 4.0) if g != guidance]


def seeds_used(manifest: DiffusionManifest, evaluation: dict[str, Any]) -> set[int]:
    """Seeds that shaped a model: its training seed and every tuning seed in its evaluation record."""
    return {TUNING_SEED, manifest.training.config.seed, *evaluation.get("tuning", {}).get("seeds", [])}


@torch.no_grad()
def generate(model: LatentDiffusion, attributes: dict[str, bool], n: int, setting: Setting, seed: int,
             batch: int = 64) -> torch.Tensor:
    """``n`` images ``uint8 [n, 3, H, W]`` for one condition, image ``i`` from noise stream ``(seed, i)``."""
    out = []
    label = model.labels_for(attributes)
    for start in range(0, n, batch):
        rows = list(range(start, min(start + batch, n)))
        latents = model.sample_latents(label.expand(len(rows), -1), ImageNoise([(seed, i) for i in rows], model.device),
                                       setting.sampler, setting.steps, setting.guidance_scale)
        out.append(to_uint8(model.decode(latents)))
    return torch.cat(out)


@torch.no_grad()
def reconstruct(model: LatentDiffusion, images: torch.Tensor, batch: int = 128) -> torch.Tensor:
    """``uint8 [N, 3, S, S]`` -> encoded (posterior mean) and decoded by the model's VAE, ``uint8`` again."""
    out = []
    for chunk in images.split(batch):
        out.append(to_uint8(model.decode(model.encode(to_float(chunk)))))
    return torch.cat(out)


class Scorer:
    """KID and FID of generated sets against held-out faces (``uint8 [N, 3, S, S]``, labels ``int64 [N, A]``: the
    test split, or the validation split when choosing), per label and overall (one Inception pass each)."""

    def __init__(self, device: torch.device, reference_images: torch.Tensor, reference_labels: torch.Tensor,
                 seed: int, feature_cache: Path | None = None):
        self.inception = InceptionFeatures(device, feature_cache)
        self.seed = seed
        features = self.inception.features(reference_images)
        masks = {value: (reference_labels[:, 0] == int(value)).numpy() for value in (True, False)}
        self.reference = {value: features[mask] for value, mask in masks.items()} | {None: features}
        self.statistics = {key: self.inception.statistics(f) for key, f in self.reference.items()}

    def score(self, generated: dict[bool, torch.Tensor], label: str) -> dict[str, float]:
        """``{kid, kid_std, fid}`` overall and ``..._{label}`` / ``..._not_{label}`` per condition."""
        features = {value: self.inception.features(images) for value, images in generated.items()}
        features[None] = np.concatenate([features[True], features[False]])
        scores: dict[str, float] = {}
        for key, suffix in ((None, ""), (True, f"_{label}"), (False, f"_not_{label}")):
            scores[f"kid{suffix}"], scores[f"kid_std{suffix}"] = kid(self.reference[key], features[key], seed=self.seed)
            scores[f"fid{suffix}"] = self.inception.fid(self.statistics[key], features[key])
        scores["reference_images"] = len(self.reference[None])
        return scores


def score_setting(model: LatentDiffusion, setting: Setting, n: int, seed: int, judge: JudgePanel,
                  scorer: Scorer | None, mouths: EditInstruments | None = None) -> dict[str, Any]:
    """One row of the table: ``n`` images per label generated by ``model`` (the version that samples: the student
    for the student sampler) at ``setting`` (its guidance given) and judged (rates with intervals), KID/FID, and
    with ``mouths`` the rate of mouths outside real colours per label."""
    attribute = model.attributes[0]
    row: dict[str, Any] = {"setting": setting.name(), "sampler": setting.sampler, "steps": setting.steps,
                           "guidance_scale": setting.guidance_scale, "n_per_label": n, "version": model.version}
    started = time.perf_counter()
    generated = {value: generate(model, {attribute: value}, n, setting, seed) for value in (True, False)}
    row["seconds_per_image"] = (time.perf_counter() - started) / (2 * n)
    for value, images in generated.items():
        label = ("" if value else "not_") + attribute.lower()
        verdict = judge.read(images).rate_of(torch.full((len(images),), int(value)))
        row[f"accuracy_{label}"] = verdict["rate"]
        row[f"accuracy_{label}_ci95"] = [verdict["low"], verdict["high"]]
        row[f"accuracy_{label}_members"] = verdict["members"]
        if mouths is not None:
            row[f"colour_outside_{label}"] = mouths.score(images, value)["colour_outside"]
    if scorer:
        row |= scorer.score(generated, attribute.lower())
    return row


@dataclass
class Instruments:
    """What judges every model of one evaluation: the trained judge panel, the held-out faces and the KID/FID
    scorer."""

    judge: JudgePanel
    split: str  # which held-out faces: REPORT_SPLIT, or TUNING_SPLIT when choosing
    images: torch.Tensor  # uint8 [N, 3, S, S]
    labels: torch.Tensor  # int64 [N, A]
    verdicts: Verdicts  # the judge's reading of the images: what a round trip should keep
    scorer: Scorer | None
    mouths: EditInstruments | None = None  # the colour instrument, when chosen
    floor_faces: dict[bool, torch.Tensor] | None = None  # n training faces per label, uint8 [n, 3, S, S]
    real_floor: dict[str, float] | None = None  # their KID/FID against the held-out faces (the same for every model)


def training_faces(data: Path, data_cfg: DataConfig, n: int) -> dict[bool, torch.Tensor]:
    """The first ``n`` training faces of each value of the first attribute, ``{value: uint8 [n, 3, S, S]}``."""
    images, labels = load_split(data, "train", data_cfg, limit=6 * n)
    faces = {value: images[labels[:, 0] == int(value)][:n] for value in (True, False)}
    if min(len(f) for f in faces.values()) < n:
        raise ValueError(f"{data}: fewer than {n} training faces of each label in its first {6 * n} images")
    return faces


def floors(model: LatentDiffusion, tools: Instruments) -> dict[str, dict[str, float]]:
    """KID/FID of the real training faces (``real``) and of their VAE round trips (``vae``) against the held-out faces:
    the distances a perfect generator, and a perfect diffusion model on this VAE, would score at this n."""
    assert tools.scorer is not None and tools.floor_faces is not None and tools.real_floor is not None
    round_trips = {value: reconstruct(model, faces) for value, faces in tools.floor_faces.items()}
    return {"real": tools.real_floor, "vae": tools.scorer.score(round_trips, model.attributes[0].lower())}


def student_of(checkpoints: Path, model: LatentDiffusion) -> LatentDiffusion:
    """The model the student sampler runs for ``model``: itself when it is a distilled student, else the newest
    student of it under ``checkpoints`` (the one a worker serves beside it), sharing its VAE."""
    if model.is_student:
        return model
    _, student = served_versions(checkpoints, model.version)
    if student is None:
        raise SettingError(f"model {model.version} has no distilled student under {checkpoints}: the "
                           f"{STUDENT_SAMPLER!r} settings need one (python -m training distill --teacher "
                           f"{model.version})")
    return LatentDiffusion.load(checkpoints, student, model.device, model.dtype, share_vae=model)


def check_setting(runner: LatentDiffusion, setting: Setting) -> None:
    """Refuse, before any work, a setting (its guidance given) that ``runner`` cannot sample: a sampler it does not
    run, steps its sampler does not take, a guidance scale outside the range a student was distilled on (or 0)."""
    try:
        runner.sampler(setting.sampler).set_timesteps(setting.steps)
    except ValueError as exc:
        raise SettingError(f"setting {setting.sampler}:{setting.steps}: {exc}") from None
    distillation = runner.manifest.distillation
    if distillation is not None:
        low, high = distillation.sampling.guidance_range
        if setting.guidance_scale != 0 and not low <= setting.guidance_scale <= high:
            raise SettingError(f"setting {setting.sampler}:{setting.steps}: the student {runner.version} was "
                               f"distilled for guidance {low:g} to {high:g} (or 0), not {setting.guidance_scale:g}")


def sampling_models(checkpoints: Path, model: LatentDiffusion, settings: list[Setting]) -> dict[str, LatentDiffusion]:
    """``{sampler name: the model that samples with it}`` for ``settings`` of ``model`` (the student sampler: its
    student, :func:`student_of`; the others: ``model``), every setting checked (:func:`check_setting`)."""
    runners: dict[str, LatentDiffusion] = {}
    for setting in settings:
        if setting.sampler not in runners:
            runners[setting.sampler] = student_of(checkpoints, model) if setting.sampler == STUDENT_SAMPLER else model
        check_setting(runners[setting.sampler], setting.for_model(model))
    return runners


def record(checkpoints: Path, version: str, results: dict[str, Any], seed: int, tuning: bool) -> dict[str, Any]:
    """Merge ``results`` into ``version``'s evaluation record: as its report, or with ``tuning`` as its tuning
    entry, which keeps every seed that ever tuned it (``seeds``); returns what was stored."""
    directory = resolve_version(checkpoints, "diffusion", version)
    if tuning:
        tuned = read_evaluation(directory).get("tuning", {})
        results = results | {"seeds": sorted({*tuned.get("seeds", []), seed})}
    record_evaluation(directory, {"tuning" if tuning else "evaluation": results})
    return results


def evaluate_model(checkpoints: Path, model: LatentDiffusion, tools: Instruments, n: int, settings: list[Setting],
                   seed: int, tuning: bool, runners: dict[str, LatentDiffusion] | None = None) -> dict[str, Any]:
    """One model's numbers (see :func:`evaluate_versions`), merged into its evaluation record; ``runners``: the
    model each sampler runs on (:func:`sampling_models`; default ``model`` for all). The rows a student sampled
    are also merged into the student's record."""
    runners = runners or {}
    reconstructions = reconstruct(model, tools.images)
    reconstructed = tools.judge.read(reconstructions)  # read once: for the robustness check and the agreement
    results: dict[str, Any] = {
        "version": model.version, "attribute": model.attributes[0], "n_per_label": n, "seed": seed,
        "split": tools.split, f"{tools.split}_images": len(tools.images),
        "precision": str(model.dtype).removeprefix("torch."),
        "judge": robustness(tools.judge, tools.images, tools.labels, tools.verdicts, reconstructed),
        "judge_seeds": tools.judge.seeds,
        "vae_psnr_db": psnr(to_float(reconstructions), to_float(tools.images)),
        "vae_attribute_agreement": reconstructed.rate_of(tools.verdicts),
    }
    if results["judge"]["warning"]:
        print(f"WARNING ({model.version}): {results['judge']['warning']}", flush=True)
    if tools.floor_faces is not None:
        results["floors"] = floors(model, tools)
        print({"version": model.version, "floors": {k: {m: round(v[m], 5) for m in ("kid", "kid_std", "fid")}
                                                    for k, v in results["floors"].items()}}, flush=True)
    results["settings"] = []
    for setting in settings:
        row = score_setting(runners.get(setting.sampler, model), setting.for_model(model), setting.n or n, seed,
                            tools.judge, tools.scorer, tools.mouths)
        results["settings"].append(row)
        print({"model": model.version} | {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()},
              flush=True)
    results = record(checkpoints, model.version, results, seed, tuning)
    for student in {runner.version for runner in runners.values()} - {model.version}:
        rows = [row for row in results["settings"] if row["version"] == student]
        record(checkpoints, student, {"version": student, "teacher": model.version, "split": tools.split,
                                      "seed": seed, "precision": results["precision"],
                                      "judge_seeds": tools.judge.seeds, "settings": rows}, seed, tuning)
    return results


def vae_round_trip(checkpoints: Path, version: str, tools: Instruments, device: torch.device, seed: int,
                   tuning: bool) -> dict[str, Any]:
    """A VAE version alone (float32): PSNR of the held-out faces' reconstructions, the judge's agreement between
    each image and its reconstruction, and the judge's accuracy on the reconstructions; merged into its evaluation
    record (under ``tuning`` when choosing, else ``evaluation``)."""
    checkpoint = load_checkpoint(checkpoints, "vae", version)
    vae = VAE(checkpoint.manifest.model)
    vae.load_state_dict({k: v.float() for k, v in checkpoint.state_dict.items()})
    recon = to_uint8(reconstruct_images(vae.to(device).eval(), tools.images, device, torch.float32))
    verdicts = tools.judge.read(recon)
    results = {"vae_version": checkpoint.version, "split": tools.split, "seed": seed, "judge_seeds": tools.judge.seeds,
               "vae_psnr_db": psnr(to_float(recon), to_float(tools.images)),
               "vae_attribute_agreement": verdicts.rate_of(tools.verdicts),
               "judge_on_reconstructions": verdicts.rate_of(tools.labels[:, 0])}
    record_evaluation(checkpoint.path, {"tuning" if tuning else "evaluation": results})
    return results


def evaluate_versions(checkpoints: Path, versions: list[str], data: Path, n: int, settings: list[Setting], seed: int,
                      classifier_steps: int, device: str = "cpu", fid: bool = True, precision: str = "auto",
                      tuning: bool = False, vae_versions: tuple[str, ...] = (), feature_cache: Path | None = None,
                      judge_cache: Path | None = None, judges: int = JUDGE_PANEL_SIZE,
                      colour: InstrumentOptions | None = None) -> list[dict[str, Any]]:
    """Several diffusion versions side by side, judged by one judge panel (``judges`` classifiers) against one set
    of reference features (they must share a data config). Each version's numbers are also merged into its
    evaluation record (``evaluation.json`` beside it, under ``evaluation``, or ``tuning`` with ``tuning=True``). ``vae_versions`` are also
    measured on their own (:func:`vae_round_trip`) by the same judge; their rows come first in the returned list. ``feature_cache``: a
    folder for the Inception features of image sets evaluations repeat (see :class:`InceptionFeatures`);
    ``judge_cache``: one for the judge panel's weights (see :func:`~training.evaluation.judge.train_panel`).
    ``colour``: measure the generated mouths' colour too, with these options' identity regressor (it finds the mouth).

    ``precision`` is the sampling precision (``auto``: the worker's, fp16 on CUDA and bf16 on CPU). A report
    (``tuning=False``) refuses seeds that trained or tuned a model (:func:`seeds_used`)."""
    if not (versions or vae_versions):
        raise ValueError("nothing to evaluate: give diffusion versions, VAE versions or both")
    torch_device = pick_device(device)
    versions = [served_versions(checkpoints, LATEST)[0] if v == LATEST else v for v in versions]  # a plain model
    models = [LatentDiffusion.load(checkpoints, v, torch_device, pick_dtype(torch_device, precision)) for v in versions]
    data_configs = {first_attribute_only(m.manifest.data) for m in models}  # further attributes are left open
    if not models:  # VAE versions alone: judged on what they were trained on
        data_configs = {first_attribute_only(read_manifest(resolve_version(checkpoints, "vae", v)).data)
                        for v in vae_versions}
    if len(data_configs) != 1:
        raise ValueError(f"versions {versions or vae_versions} differ in their data config or first attribute; "
                         "evaluate them apart")
    runners = [sampling_models(checkpoints, model, settings) for model in models]  # refuse before any work
    sampling = {model.version: model for model in models} | {r.version: r for each in runners for r in each.values()}
    for sampled in sampling.values():  # the models and the students that sample for them
        evaluation = read_evaluation(resolve_version(checkpoints, "diffusion", sampled.version))
        if not tuning and seed in seeds_used(sampled.manifest, evaluation):
            raise SeedError(f"seed {seed} trained or tuned model {sampled.version}; report on other seeds "
                            f"(default {REPORT_SEED}) or pass --tuning")
    (data_cfg,) = data_configs
    split = TUNING_SPLIT if tuning else REPORT_SPLIT
    judge, images, labels = train_panel(data, data_cfg, classifier_steps, seed, judges, judge_cache, split)
    scorer = Scorer(torch_device, images, labels, seed, feature_cache) if fid and models else None
    tools = Instruments(judge, split, images, labels, judge.read(images), scorer)
    if colour is not None and models:
        from .edit_realism import build_instruments

        tools.mouths = build_instruments(("colour",), models[0], data, {}, seed, colour.synth_seed,
                                         colour.identity_steps, identity_cache=colour.identity_cache)
    if scorer is not None:
        tools.floor_faces = training_faces(data, data_cfg, n)
        tools.real_floor = scorer.score(tools.floor_faces, data_cfg.attributes[0].lower())
    vaes = [vae_round_trip(checkpoints, version, tools, torch_device, seed, tuning) for version in vae_versions]
    return vaes + [evaluate_model(checkpoints, model, tools, n, settings, seed, tuning, sampled)
                   for model, sampled in zip(models, runners, strict=True)]


def evaluate(checkpoints: Path, version: str, data: Path, n: int, settings: list[Setting], seed: int,
             classifier_steps: int, device: str = "cpu", fid: bool = True, precision: str = "auto",
             tuning: bool = False) -> dict[str, Any]:
    """Every number of the report for one diffusion version (see :func:`evaluate_versions`)."""
    return evaluate_versions(checkpoints, [version], data, n, settings, seed, classifier_steps, device, fid,
                             precision, tuning)[0]


def table_row(row: dict[str, Any], label: str, version: str) -> str:
    """One setting's row of :func:`markdown_report`'s table; a row sampled by another version than ``version`` (its
    student) names it beside the sampler."""
    accuracies = [f"{100 * row[f'accuracy_{k}']:.1f}% [{100 * row[f'accuracy_{k}_ci95'][0]:.1f}, "
                  f"{100 * row[f'accuracy_{k}_ci95'][1]:.1f}] {members_range(row[f'accuracy_{k}_members'])}".rstrip()
                  for k in (label, f"not_{label}")]
    quality = (f"{1000 * row['kid']:.2f} ± {1000 * row['kid_std']:.2f} | {row['fid']:.2f} "
               f"({2 * row['n_per_label']} / {row['reference_images']})") if "fid" in row else "– | –"
    sampler = row["sampler"] + (f" `{row['version']}`" if row.get("version", version) != version else "")
    colours = [percent_ci(row[f"colour_outside_{k}"]) for k in (label, f"not_{label}")
               if f"colour_outside_{k}" in row]
    return (f"| {sampler} | {row['steps']} | {row['guidance_scale']:g} | {row['n_per_label']} | "
            f"{' | '.join(accuracies + colours)} | {quality} | {row['seconds_per_image']:.3f} |")


def markdown_report(results: dict[str, Any], command: str) -> str:
    """The evaluation as a Markdown section: the command, the judge, the VAE, the sampler table (or the one line of
    a VAE measured alone)."""
    if "vae_version" in results:
        return (f"- VAE `{results['vae_version']}` alone (`{command}`): {results['vae_psnr_db']:.2f} dB PSNR on the "
                f"{results['split']} split; judge agreement image/reconstruction "
                f"{format_rate(results['vae_attribute_agreement'])}; "
                f"judge accuracy on the reconstructions {format_rate(results['judge_on_reconstructions'])} "
                f"({describe_panel(results['judge_seeds'])})\n")
    label, split = results["attribute"].lower(), results["split"]
    judge = results["judge"]
    lines = [f"Model `{results['version']}`. Command: `{command}` (seed {results['seed']}, {results['precision']})", "",
             f"- {describe_panel(results['judge_seeds'])}",
             f"- judge accuracy (95% Wilson intervals): sharp {split} images {format_rate(judge['sharp'])}; "
             f"blurred copy {format_rate(judge['blurred'])}"
             + (f"; VAE reconstructions {format_rate(judge['reconstructed'])}" if "reconstructed" in judge else ""),
             f"- VAE reconstruction on the {split} split: {results['vae_psnr_db']:.2f} dB PSNR; judge agreement "
             f"between image and reconstruction: {format_rate(results['vae_attribute_agreement'])}",
             f"- {results['n_per_label']} generated images per label for each setting but those whose n column "
             f"says otherwise; KID (x 1000, ± std over subsets) and FID against the {split} split (compare FIDs "
             "only at equal n)"]
    if judge["warning"]:
        lines.append(f"- **warning:** {judge['warning']}")
    if "floors" in results:
        real, vae = results["floors"]["real"], results["floors"]["vae"]
        lines.append(f"- floors at the same n: real training faces KID ×1000 {1000 * real['kid']:.2f} ± "
                     f"{1000 * real['kid_std']:.2f}, FID {real['fid']:.2f}; the same faces through the VAE KID ×1000 "
                     f"{1000 * vae['kid']:.2f} ± {1000 * vae['kid_std']:.2f}, FID {vae['fid']:.2f}")
    if min((row["n_per_label"] for row in results["settings"]), default=results["n_per_label"]) < HEADLINE_MIN_N:
        lines.append(f"- a row of fewer than {HEADLINE_MIN_N} images per label (n column): not a headline measurement")
    colour = any(f"colour_outside_{label}" in row for row in results["settings"])
    colour_columns = (f" mouths outside real colour, {label} [95% CI] | mouths outside real colour, not_{label} "
                      "[95% CI] |") if colour else ""
    header = (f"| sampler | steps | guidance | n / label | accuracy {label} [95% CI] | accuracy not_{label} "
              f"[95% CI] |{colour_columns} KID ×1000 | FID (n gen / n ref) | s / image |")
    lines += ["", header, "|---" * (header.count("|") - 1) + "|"]
    lines += [table_row(row, label, results["version"]) for row in results["settings"]]
    return "\n".join(lines) + "\n"
