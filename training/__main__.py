"""``python -m training {synth,vae,diffusion,distill,retune,reader,evaluate,evaluate-edit,transitions,student-fit,
visualize,publish,alias,models} ...``"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from facegen.model.config import (
    EDIT_FOCUS_THRESHOLD,
    EDIT_GUIDANCE_SCALE,
    EDIT_HOLD_GUIDANCE,
    EDIT_REFERENCE,
    EDIT_REFERENCES,
    EDIT_SCOPE,
    EDIT_SCOPES,
    PRECISIONS,
    STUDENT_SERVING_FIELDS,
    ConsistencyConfig,
    DataConfig,
    DiffusionTrainConfig,
    DistillConfig,
    InvalidConfig,
    ReaderTrainConfig,
    SamplingConfig,
    ScheduleConfig,
    UNetConfig,
    VAEConfig,
    VAETrainConfig,
)
from facegen.model.device import DTYPES
from facegen.model.diffusion.samplers import SAMPLERS
from facegen.model.manifest import DiffusionManifest, Distillation
from training.evaluation.edit_realism import INSTRUMENTS
from training.evaluation.evaluate_edit import InstrumentOptions
from training.evaluation.protocol import EDIT_SWEEP_STRENGTHS, JUDGE_PANEL_SIZE, REPORT_SEED, TUNING_SEED

DEFAULT_CHECKPOINTS = Path("checkpoints")


def add_config_flags(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """One ``--flag`` per field of a config dataclass; defaults stay in the dataclass (None = not given)."""
    for f in dataclasses.fields(cls):
        flag = "--" + (prefix + f.name).replace("_", "-")
        default = f.default
        if isinstance(default, tuple):
            kind = type(default[0]) if default else str
            parser.add_argument(flag, dest=prefix + f.name, nargs="+", type=kind, default=None,
                                help=f"default: {' '.join(map(str, default))}")
        elif isinstance(default, bool):
            parser.add_argument(flag, dest=prefix + f.name, type=lambda s: s.lower() in ("1", "true", "yes"),
                                default=None, help=f"default: {default}")
        else:
            parser.add_argument(flag, dest=prefix + f.name, type=type(default), default=None, help=f"default: {default}")


def config_from_args(cls: type, args: argparse.Namespace, prefix: str = "", **fixed: Any) -> Any:
    given = {f.name: getattr(args, prefix + f.name) for f in dataclasses.fields(cls)
             if getattr(args, prefix + f.name, None) is not None}
    return cls(**{**given, **fixed})


def inherited_sampling(args: argparse.Namespace) -> dict[str, Any]:
    """A warm-started diffusion run keeps its parent's serving defaults, except those given as flags."""
    if not args.init_from:
        return {}
    from facegen.model.checkpoints import read_manifest, resolve_version

    parent = read_manifest(resolve_version(args.checkpoints, "diffusion", args.init_from))
    return {name: value for name, value in dataclasses.asdict(parent.sampling).items()
            if getattr(args, "sampling_" + name) is None}


JUDGE_CACHE_HELP = "keep the judge's trained weights here and reuse them when data, seed and steps are the same"


def add_run_flags(parser: argparse.ArgumentParser, init_from: bool = True) -> None:
    """Where a training run reads, writes and computes; ``init_from``: also ``--init-from VERSION``."""
    parser.add_argument("--data", type=Path, required=True, help="CelebA-layout folder")
    parser.add_argument("--checkpoints", type=Path, default=DEFAULT_CHECKPOINTS)
    parser.add_argument("--run-dir", type=Path, required=True, help="resumable state and log.jsonl")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="auto", choices=PRECISIONS)
    parser.add_argument("--export-dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    if init_from:
        parser.add_argument("--init-from", default=None, metavar="VERSION",
                            help="warm-start from this exported version (its architecture and weights; 'latest' "
                                 "allowed)")


def add_train_commands(commands: argparse._SubParsersAction) -> None:
    synth = commands.add_parser("synth", help="write synthetic faces in the CelebA layout")
    synth.add_argument("--out", type=Path, required=True)
    synth.add_argument("--count", type=int, required=True)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--workers", type=int, default=1)

    vae = commands.add_parser("vae", help="train the VAE")
    add_run_flags(vae)
    vae.add_argument("--perceptual-weights", type=Path, default=None, help="local VGG16 features state dict")
    add_config_flags(vae, DataConfig, "data_")
    add_config_flags(vae, VAEConfig, "vae_")
    add_config_flags(vae, VAETrainConfig)

    diffusion = commands.add_parser("diffusion", help="train the latent diffusion UNet")
    add_run_flags(diffusion)
    diffusion.add_argument("--vae", default="latest", help="VAE checkpoint version")
    diffusion.add_argument("--latent-cache", type=Path, default=None, metavar="DIR",
                           help="keep the encoded training latents here and reuse them in later runs")
    diffusion.add_argument("--attributes", nargs="+", default=None, metavar="NAME",
                           help="CelebA attributes to condition on (default: the VAE's); a warm start may add some")
    add_config_flags(diffusion, UNetConfig, "unet_")
    add_config_flags(diffusion, ScheduleConfig, "schedule_")
    add_config_flags(diffusion, SamplingConfig, "sampling_")
    add_config_flags(diffusion, DiffusionTrainConfig)

    retune = commands.add_parser("retune", help="a new diffusion version: same weights, other sampling defaults "
                                                "(or VAE decoder, or fewer attributes)")
    retune.add_argument("--checkpoints", type=Path, default=DEFAULT_CHECKPOINTS)
    retune.add_argument("--diffusion", default="latest", help="diffusion checkpoint version to derive from")
    retune.add_argument("--vae", default=None, metavar="VERSION",
                        help="use this VAE version instead: one whose encoder is bit for bit the current one's (a "
                             "decoder fine-tune, `vae --train-encoder false`) or whose decoder is (an encoder "
                             "fine-tune, `vae --train-decoder false`: samples decode to the same images)")
    retune.add_argument("--attributes", nargs="+", default=None, metavar="NAME",
                        help="condition on these of the model's attributes alone, the others folded in as left open "
                             "(the same outputs as the source with them open)")
    add_config_flags(retune, SamplingConfig)
    retune.add_argument("--student-default-steps", type=int, default=None, metavar="N",
                        help="a distilled student (named by --diffusion): the step count it samples with when a "
                             "request gives none (1..its max_steps; choose it with `evaluate --tuning`)")
    retune.add_argument("--student-fresh-noise", type=float, default=None, metavar="R",
                        help="a distilled student: the share of fresh noise between its steps (0..1; 1: Song et "
                             "al.'s multistep sampling, 0: deterministic; choose it with `evaluate --tuning`)")

    reader = commands.add_parser("reader", help="a new diffusion version: same weights plus a latent attribute reader "
                                                "(edits hold the attributes they leave open by its gradient)")
    reader.add_argument("--data", type=Path, required=True, help="CelebA-layout folder")
    reader.add_argument("--checkpoints", type=Path, default=DEFAULT_CHECKPOINTS)
    reader.add_argument("--diffusion", default="latest", help="diffusion checkpoint version to derive from")
    reader.add_argument("--attributes", nargs="+", default=None, metavar="NAME",
                        help="CelebA attributes to read (default: the version's own)")
    reader.add_argument("--latent-cache", type=Path, default=None, metavar="DIR",
                        help="the encoded training latents, shared with `diffusion --latent-cache`")
    reader.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    reader.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    reader.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    add_config_flags(reader, ReaderTrainConfig)


def add_distill_command(commands: argparse._SubParsersAction) -> None:
    distill = commands.add_parser("distill", help="a few-step student of a diffusion version (latent or trajectory "
                                                  "consistency distillation, --method; the guidance scale an input)")
    add_run_flags(distill, init_from=False)
    distill.add_argument("--teacher", required=True, metavar="VERSION",
                         help="the diffusion version to distil ('latest' allowed); the student starts from its weights")
    distill.add_argument("--minutes", type=float, default=None,
                         help="time budget of the whole command: the loop then stops, saves its state and exports")
    distill.add_argument("--resume", action="store_true", help="go on with the run in --run-dir (its state.pt)")
    distill.add_argument("--init-from", default=None, metavar="STUDENT",
                         help="start from this exported student of the teacher (a version under --checkpoints or "
                              "a version folder's path; same --student-* flags) instead of the teacher's weights: a "
                              "new run that goes on where that one stopped")
    distill.add_argument("--latent-cache", type=Path, default=None, metavar="DIR",
                         help="the encoded training latents, shared with `diffusion --latent-cache`; with "
                              "--method trajectory-consistency, the teacher's chains (DIR/trajectories)")
    add_config_flags(distill, ConsistencyConfig, "student_")
    add_config_flags(distill, DistillConfig)


def add_student_fit_command(commands: argparse._SubParsersAction) -> None:
    fit = commands.add_parser("student-fit", help="a jump student's loss on the teacher chains it learnt from "
                                                  "against chains it never saw, per jump of its 1..max-step chains")
    fit.add_argument("--diffusion", required=True, metavar="STUDENT", help="a jump student's version")
    fit.add_argument("--checkpoints", type=Path, default=DEFAULT_CHECKPOINTS)
    fit.add_argument("--latent-cache", type=Path, required=True, metavar="DIR",
                     help="where the distillation keeps its chains (DIR/trajectories); the new ones land there too")
    fit.add_argument("--chains", type=int, default=512, help="chains of each set")
    fit.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    fit.add_argument("--precision", default="fp32", choices=PRECISIONS)


def add_measure_commands(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser("evaluate", help="attribute accuracy, KID/FID and VAE reconstruction")
    evaluate.add_argument("--checkpoints", type=Path, default=DEFAULT_CHECKPOINTS)
    evaluate.add_argument("--diffusion", nargs="*", default=["latest"],
                          help="diffusion checkpoint version(s), judged side by side by one judge; none (the flag "
                               "alone) with --vae: the VAE versions alone")
    evaluate.add_argument("--data", type=Path, required=True,
                          help="CelebA-layout folder (train: judge; test, or val with --tuning: held-out faces)")
    evaluate.add_argument("--vae", nargs="*", default=[], metavar="VERSION",
                          help="also measure these VAE versions alone (round trip) with the same judge")
    evaluate.add_argument("--n", type=int, default=500, help="generated images per label and setting")
    evaluate.add_argument("--sampler", default="dpmpp", choices=sorted(SAMPLERS))
    evaluate.add_argument("--steps", type=int, default=20)
    evaluate.add_argument("--guidance", type=float, default=None, help="default: each model's own")
    evaluate.add_argument("--sweep", action="store_true", help="all samplers, step counts and guidance scales")
    evaluate.add_argument("--settings", default=None,
                          help="instead of --sampler/--steps/--guidance: SAMPLER:STEPS[:GUIDANCE][@N],... e.g. "
                               "student:1,student:4,dpmpp:20,ddpm:1000@100 (student: the model's newest distilled "
                               "student; @N: that row's images per label instead of --n)")
    evaluate.add_argument("--no-fid", action="store_true", help="attribute accuracy only")
    evaluate.add_argument("--classifier-steps", type=int, default=1500, help="training steps of the attribute judge")
    evaluate.add_argument("--judges", type=int, default=JUDGE_PANEL_SIZE,
                          help="classifiers in the judge panel (seeds: the evaluation seed and the next ones); a "
                               "verdict is their mean probability")
    evaluate.add_argument("--precision", default="auto", choices=PRECISIONS,
                          help="sampling precision (auto: the worker's, fp16 on CUDA; bf16 on CPUs with native bf16, else fp32)")
    evaluate.add_argument("--seed", type=int, default=None,
                          help=f"noise seeds (default: {REPORT_SEED} for a report, {TUNING_SEED} with --tuning)")
    evaluate.add_argument("--tuning", action="store_true",
                          help="choosing (serving defaults, a VAE): tuning seeds and the validation split in place of "
                               "the test split, stored as metrics.tuning, not as the report")
    evaluate.add_argument("--report", type=Path, default=None, help="append the Markdown table to this file")
    evaluate.add_argument("--feature-cache", type=Path, default=None, metavar="DIR",
                          help="keep the Inception features of repeated image sets (test split, floors) here")
    evaluate.add_argument("--judge-cache", type=Path, default=None, metavar="DIR", help=JUDGE_CACHE_HELP)
    evaluate.add_argument("--colour", action="store_true",
                          help="also the share of generated mouths outside real mouths' colours, per label (the edit "
                               "instruments' colour instrument; --data must be a folder written by `synth`)")
    add_regressor_flags(evaluate, "--colour")


def add_regressor_flags(parser: argparse.ArgumentParser, used_by: str) -> None:
    """The identity regressor's flags (it finds the mouth for the colour instrument and reads identity)."""
    parser.add_argument("--synth-seed", type=int, default=InstrumentOptions.synth_seed,
                        help=f"the seed `synth` wrote --data with ({used_by})")
    parser.add_argument("--identity-steps", type=int, default=InstrumentOptions.identity_steps,
                        help=f"training steps of the identity regressor ({used_by})")
    parser.add_argument("--identity-cache", type=Path, default=None, metavar="DIR",
                        help=f"keep the identity regressor's weights here, by data, seed and steps ({used_by})")


def add_instrument_flags(edits: argparse.ArgumentParser) -> None:
    """evaluate-edit's instruments (training/evaluation/edit_realism.py) and what they need."""
    edits.add_argument("--instruments", nargs="+", default=[], choices=INSTRUMENTS,
                       help="also measure the edits' realism (KID/FID), their mouths' colour fidelity and the identity "
                            "they keep, beside real, round-trip and generated faces (training/evaluation/edit_realism.py;"
                            " colour and identity need a folder written by `synth`)")
    add_regressor_flags(edits, "colour, identity")
    edits.add_argument("--realism-reference", type=int, default=None, metavar="N",
                       help="real faces per label in the KID/FID reference (default: every test face no edit starts "
                            "from)")
    edits.add_argument("--feature-cache", type=Path, default=None, metavar="DIR",
                       help="keep the Inception features of repeated image sets here (realism)")
    edits.add_argument("--cases", type=Path, default=None, metavar="DIR",
                       help="draw the first setting's best and worst edits each way (by mouth colour and identity "
                            "parameters lost) into DIR as edit_cases_to_<label>.png (needs colour and identity)")


def add_edit_commands(commands: argparse._SubParsersAction) -> None:
    """The measurements of transitions and edits (training/evaluation/transitions.py, training/evaluation/evaluate_edit.py)."""
    transitions = commands.add_parser("transitions", help="attribute transitions: first frame read as the source "
                                      "value and last as the target, identity kept (training/evaluation/transitions.py)")
    transitions.add_argument("--checkpoints", type=Path, default=DEFAULT_CHECKPOINTS)
    transitions.add_argument("--diffusion", default="latest", help="diffusion checkpoint version")
    transitions.add_argument("--data", type=Path, required=True, help="CelebA-layout folder (train split: the judge)")
    transitions.add_argument("--n", type=int, default=200, help="faces per target value")
    transitions.add_argument("--frames", type=int, default=8, help="frames per transition (the API's default)")
    transitions.add_argument("--sampler", default="dpmpp", choices=sorted(SAMPLERS))
    transitions.add_argument("--steps", type=int, default=20)
    transitions.add_argument("--guidance", type=float, default=None, help="default: the model's own")
    transitions.add_argument("--classifier-steps", type=int, default=1500, help="training steps of the judge")
    transitions.add_argument("--judges", type=int, default=JUDGE_PANEL_SIZE,
                             help="classifiers in the judge panel (as evaluate's)")
    transitions.add_argument("--judge-cache", type=Path, default=None, metavar="DIR", help=JUDGE_CACHE_HELP)
    transitions.add_argument("--precision", default="auto", choices=PRECISIONS)
    transitions.add_argument("--seed", type=int, default=REPORT_SEED)
    transitions.add_argument("--report", type=Path, default=None, help="append the Markdown table to this file")
    edits = commands.add_parser("evaluate-edit", help="edit success against what the edit keeps, over strengths")
    edits.add_argument("--checkpoints", type=Path, default=DEFAULT_CHECKPOINTS)
    edits.add_argument("--diffusion", default="latest", help="diffusion checkpoint version")
    edits.add_argument("--data", type=Path, required=True, help="CelebA-layout folder (train: judge, test: faces)")
    edits.add_argument("--n", type=int, default=200, help="held-out faces per direction")
    edits.add_argument("--strengths", default=",".join(f"{s:g}" for s in EDIT_SWEEP_STRENGTHS),
                       help="comma-separated strengths in [0, 1] (0: the VAE round trip alone)")
    edits.add_argument("--steps", type=int, default=50, help="DDIM steps of the whole schedule")
    edits.add_argument("--guidance", type=float, nargs="+", default=[EDIT_GUIDANCE_SCALE],
                       help="one or more (default: the worker's edit guidance)")
    edits.add_argument("--classifier-steps", type=int, default=1500, help="training steps of the attribute judge")
    edits.add_argument("--judges", type=int, default=JUDGE_PANEL_SIZE,
                       help="classifiers in the judge panel (as evaluate's)")
    edits.add_argument("--train-limit", type=int, default=None, help="train the judge on the first N training faces")
    edits.add_argument("--precision", default="auto", choices=PRECISIONS)
    edits.add_argument("--seed", type=int, default=REPORT_SEED, help="the judge's training seed")
    edits.add_argument("--reference", nargs="+", default=[EDIT_REFERENCE], choices=EDIT_REFERENCES,
                       help="the label(s) edits invert under and guide away from (default: the worker's)")
    edits.add_argument("--scope", nargs="+", default=[EDIT_SCOPE], choices=EDIT_SCOPES,
                       help="where edits may change the face: the attribute's region, that region narrowed per face "
                            "to where the model's predictions for the two labels differ (focused), or the whole image "
                            "(default: the worker's)")
    edits.add_argument("--focus-threshold", type=float, nargs="+", default=[EDIT_FOCUS_THRESHOLD],
                       help="the focused scope's threshold(s) on the model's map of where the edit acts, a share of "
                            "each face's largest (default: the worker's)")
    edits.add_argument("--hold-guidance", type=float, nargs="+", default=[EDIT_HOLD_GUIDANCE],
                       help="step size(s) of the reader's guidance holding the attributes an edit leaves open (a "
                            "version with a reader only; default: the worker's)")
    edits.add_argument("--tuning", action="store_true",
                       help="choosing a setting: the last n test faces per direction, disjoint from a report's first n")
    edits.add_argument("--report", type=Path, default=None, help="append the Markdown table to this file")
    edits.add_argument("--judge-cache", type=Path, default=None, metavar="DIR", help=JUDGE_CACHE_HELP)
    add_instrument_flags(edits)

    visualize = commands.add_parser("visualize", help="reconstructions, samples, latent projections, denoising paths")
    visualize.add_argument("--checkpoints", type=Path, default=DEFAULT_CHECKPOINTS)
    visualize.add_argument("--diffusion", default="latest", help="diffusion checkpoint version")
    visualize.add_argument("--data", type=Path, required=True, help="CelebA-layout folder (its test split is used)")
    visualize.add_argument("--out", type=Path, required=True)
    visualize.add_argument("--count", type=int, default=8)
    visualize.add_argument("--sampler", default="dpmpp", choices=sorted(SAMPLERS))
    visualize.add_argument("--steps", type=int, default=20)
    visualize.add_argument("--frames", type=int, default=10)
    visualize.add_argument("--seed", type=int, default=0)


def run_options(args: argparse.Namespace, perceptual_weights: Path | None = None) -> Any:
    from .trainer import RunOptions

    return RunOptions(args.data, args.checkpoints, args.run_dir, args.device, args.precision, args.export_dtype,
                      args.limit, perceptual_weights, args.threads, args.init_from)


def run_synth(args: argparse.Namespace) -> None:
    from .data.synthetic import write_dataset

    print(write_dataset(args.out, args.count, args.seed, workers=args.workers))


def run_vae(args: argparse.Namespace) -> None:
    from .train_vae import train_vae

    train_vae(config_from_args(DataConfig, args, "data_"), config_from_args(VAEConfig, args, "vae_"),
              config_from_args(VAETrainConfig, args), run_options(args, args.perceptual_weights))


def run_diffusion(args: argparse.Namespace) -> None:
    from .train_diffusion import train_diffusion

    sampling = config_from_args(SamplingConfig, args, "sampling_", **inherited_sampling(args))
    train_diffusion(args.vae, config_from_args(UNetConfig, args, "unet_"),
                    config_from_args(ScheduleConfig, args, "schedule_"), sampling,
                    config_from_args(DiffusionTrainConfig, args),
                    dataclasses.replace(run_options(args), latent_cache=args.latent_cache),
                    tuple(args.attributes) if args.attributes else None)


def run_distill(args: argparse.Namespace) -> None:
    from facegen.model.config import InvalidConfig

    from .distill import DistillError, distill
    from .trainer import RunOptions

    opts = RunOptions(args.data, args.checkpoints, args.run_dir, args.device, args.precision, args.export_dtype,
                      args.limit, threads=args.threads, latent_cache=args.latent_cache)
    try:
        consistency = config_from_args(ConsistencyConfig, args, "student_")
        distill(args.teacher, config_from_args(DistillConfig, args), consistency, opts, minutes=args.minutes,
                resume=args.resume, init_from=args.init_from)
    except (DistillError, InvalidConfig) as exc:  # said in one line, without a traceback
        sys.exit(f"distill: {exc}")


def evaluation_settings(args: argparse.Namespace) -> list[Any]:
    """The rows to measure: ``--settings``, ``--sweep``, or the one ``--sampler/--steps/--guidance``."""
    from training.evaluation.evaluate import Setting, parse_settings, sweep_settings

    guidance = args.guidance  # None: each model's own default
    if args.settings:
        try:
            return parse_settings(args.settings, guidance)
        except ValueError as exc:
            sys.exit(f"evaluate: --settings: {exc}")
    if args.sweep:
        return sweep_settings(guidance)
    return [Setting(args.sampler, args.steps, guidance)]


def run_evaluate(args: argparse.Namespace) -> None:
    from facegen.model.checkpoints import CheckpointError
    from training.evaluation.evaluate import SeedError, SettingError, evaluate_versions, markdown_report

    seed = args.seed if args.seed is not None else TUNING_SEED if args.tuning else REPORT_SEED
    command = "python -m training " + " ".join(args.argv)
    try:
        evaluated = evaluate_versions(
            args.checkpoints, args.diffusion, args.data, args.n, evaluation_settings(args), seed,
            args.classifier_steps, fid=not args.no_fid, precision=args.precision, tuning=args.tuning,
            vae_versions=tuple(args.vae), feature_cache=args.feature_cache, judge_cache=args.judge_cache,
            judges=args.judges, colour=InstrumentOptions(("colour",), args.synth_seed, args.identity_steps,
                                                         identity_cache=args.identity_cache) if args.colour else None)
    except (SeedError, SettingError, CheckpointError) as exc:  # said in one line, without a traceback
        sys.exit(f"evaluate: {exc}")
    report = "\n".join(markdown_report(results, command) for results in evaluated)
    print(report)
    if args.report:
        with args.report.open("a") as handle:
            handle.write(report + "\n")


def run_evaluate_edit(args: argparse.Namespace) -> None:
    from training.evaluation.evaluate_edit import evaluate_edits, markdown_report

    strengths = tuple(float(value) for value in args.strengths.split(","))
    instruments = InstrumentOptions(tuple(args.instruments), args.synth_seed, args.identity_steps,
                                    args.realism_reference, args.feature_cache, args.identity_cache)
    results = evaluate_edits(args.checkpoints, args.diffusion, args.data, args.n, strengths, args.steps,
                             tuple(args.guidance), args.classifier_steps, args.seed, precision=args.precision,
                             train_limit=args.train_limit, references=tuple(args.reference), scopes=tuple(args.scope),
                             tuning=args.tuning, judge_cache=args.judge_cache,
                             hold_guidances=tuple(args.hold_guidance), judges=args.judges, instruments=instruments,
                             focus_thresholds=tuple(args.focus_threshold), cases=args.cases)
    report = markdown_report(results, "python -m training " + " ".join(args.argv))
    print(report)
    if args.report:
        with args.report.open("a") as handle:
            handle.write(report + "\n")


def run_visualize(args: argparse.Namespace) -> None:
    from facegen.contract.fields import DEFAULT_EDIT_STRENGTH
    from facegen.contract.spec import DEFAULT_EDIT_GUIDANCE, DEFAULT_STEPS, Sampler
    from training.evaluation.visualize import visualize as make_pictures

    for path in make_pictures(args.checkpoints, args.diffusion, args.data, args.out, args.count, args.sampler,
                              args.steps, args.frames, args.seed, edit_strength=DEFAULT_EDIT_STRENGTH,
                              edit_steps=DEFAULT_STEPS[Sampler.ddim], edit_guidance=DEFAULT_EDIT_GUIDANCE):
        print(path)


def run_transitions(args: argparse.Namespace) -> None:
    from training.evaluation.transitions import evaluate_transitions, transitions_report

    results = evaluate_transitions(args.checkpoints, args.diffusion, args.data, args.n, args.frames, args.sampler,
                                   args.steps, args.guidance, args.seed, args.classifier_steps,
                                   precision=args.precision, judges=args.judges, judge_cache=args.judge_cache)
    report = transitions_report(results, "python -m training " + " ".join(args.argv))
    print(report)
    if args.report:
        with args.report.open("a") as handle:
            handle.write(report + "\n")


def run_student_fit(args: argparse.Namespace) -> None:
    from facegen.model.device import pick_device, pick_dtype
    from training.evaluation.student_fit import fit_table, student_fit

    device = pick_device(args.device)
    try:
        losses, sampling = student_fit(args.checkpoints, args.diffusion, args.latent_cache, args.chains, device,
                                       pick_dtype(device, args.precision))
    except ValueError as exc:
        sys.exit(f"student-fit: {exc}")
    print(fit_table(losses, sampling))


def retuned_student(source: DiffusionManifest, args: argparse.Namespace) -> Distillation | None:
    """``source``'s distillation record with the sampling that ``args``' ``--student-*`` flags give, or None when
    they give none; exits with one line for a plain version or a value the student cannot take."""
    given = {name: getattr(args, f"student_{name}") for name in STUDENT_SERVING_FIELDS}
    changes = {name: value for name, value in given.items() if value is not None}
    if not changes:
        return None
    flags = ", ".join(f"--student-{name.replace('_', '-')}" for name in changes)
    if source.distillation is None:
        sys.exit(f"{flags}: {source.version} is not a distilled student; name one with --diffusion")
    try:
        sampling = dataclasses.replace(source.distillation.sampling, **changes)
    except InvalidConfig as exc:
        sys.exit(f"{flags}: {exc}")
    return dataclasses.replace(source.distillation, sampling=sampling)


def run_retune(args: argparse.Namespace) -> None:
    from facegen.model.checkpoints import derive_checkpoint, load_checkpoint, resolve_version, shared_parts

    source = load_checkpoint(args.checkpoints, "diffusion", args.diffusion).manifest
    kept = {name: value for name, value in dataclasses.asdict(source.sampling).items()
            if getattr(args, name, None) is None}
    changes: dict[str, Any] = {"sampling": config_from_args(SamplingConfig, args, **kept)}
    student = retuned_student(source, args)
    if student is not None:
        changes["distillation"] = student
    if args.vae:
        vae = resolve_version(args.checkpoints, "vae", args.vae).name  # `latest` too; shared_parts loads the weights
        if not shared_parts(args.checkpoints, source.vae_version, vae):
            sys.exit(f"VAE {vae} neither encodes nor decodes like {source.vae_version}, the latent space "
                     f"{source.version} was trained on: only a fine-tune of its decoder or of its encoder alone can "
                     "replace it")
        changes["vae_version"] = vae
    weights: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    if args.attributes:
        from facegen.model.networks.unet import EMBEDDING_TABLE, narrowed_attribute_table

        kept = tuple(args.attributes)

        def narrowed(state: dict[str, Any]) -> dict[str, Any]:
            return {**state, EMBEDDING_TABLE: narrowed_attribute_table(state[EMBEDDING_TABLE], source.attributes, kept,
                                                                       source.model.null_label)}

        weights = narrowed
        changes.update(attributes=kept, model=dataclasses.replace(source.model, num_attributes=len(kept)),
                       data=dataclasses.replace(source.data, attributes=kept))
    print(derive_checkpoint(args.checkpoints, "diffusion", source.version, weights, **changes))


def run_reader(args: argparse.Namespace) -> None:
    from .train_reader import train_reader
    from .trainer import RunOptions

    opts = RunOptions(args.data, args.checkpoints, run_dir=Path("."), device=args.device, limit=args.limit,
                      threads=args.threads, latent_cache=args.latent_cache)  # no resumable state: run_dir unused
    print(train_reader(args.diffusion, tuple(args.attributes) if args.attributes else None,
                       config_from_args(ReaderTrainConfig, args), opts))


def add_store_commands(commands: argparse._SubParsersAction) -> None:
    """The model store's commands (facegen/contract/model_store.py; MODEL_STORE, S3_*, AWS_* from the environment)."""
    from facegen.contract.model_store import SERVED_KIND
    from facegen.model.manifest import KINDS

    publish = commands.add_parser("publish", help="upload a version (and the VAE it needs) to the model store")
    publish.add_argument("version", help="the version under --checkpoints ('latest' allowed)")
    publish.add_argument("--kind", default=SERVED_KIND, choices=KINDS)
    publish.add_argument("--checkpoints", type=Path, default=DEFAULT_CHECKPOINTS)
    publish.add_argument("--alias", default=None, metavar="NAME",
                         help="then point this alias (e.g. stable, canary) at the version")
    publish.add_argument("--actor", default=None, help="who publishes, as the store records it (default: $USER@host)")
    alias = commands.add_parser("alias", help="point an alias at a version the model store holds (a roll-out, or a "
                                              "roll-back: no local copy needed)")
    alias.add_argument("name", help="the alias, e.g. stable, canary")
    alias.add_argument("version", help="a published diffusion version")
    alias.add_argument("--actor", default=None, help="who moves it, as the store records it (default: $USER@host)")
    models = commands.add_parser("models", help="the model store's versions with their model-card numbers, and aliases")
    models.add_argument("--history", default=None, metavar="NAME", help="instead, every move of this alias")


def open_model_store_or_exit(command: str) -> Any:
    from pydantic import ValidationError

    from facegen.contract.model_store import ModelStoreSettings, open_model_store

    try:
        store = open_model_store(ModelStoreSettings())
    except ValidationError as exc:
        sys.exit(f"{command}: {exc}")
    if store is None:
        sys.exit(f"{command}: MODEL_STORE is not set (s3://bucket/prefix; the server and credentials as for the "
                 "artifact store: S3_ENDPOINT_URL, AWS_*)")
    return store


def actor_name(args: argparse.Namespace) -> str:
    return args.actor or f"{os.environ.get('USER') or getpass.getuser()}@{socket.gethostname()}"


def describe_move(name: str, version: str, move: Any) -> str:
    """One line for ``ModelStore.set_alias``'s answer (``None``: it already pointed there)."""
    return f"alias {name} already points at {version}" if move is None else (
        f"alias {name}: {move.previous or '(new)'} -> {move.version}")


def run_publish(args: argparse.Namespace) -> None:
    from facegen.contract.model_store import SERVED_KIND, ModelStoreError
    from facegen.model.checkpoints import CheckpointError, resolve_version

    if args.alias and args.kind != SERVED_KIND:
        sys.exit(f"publish: an alias names a {SERVED_KIND} version, not a {args.kind} one")
    store = open_model_store_or_exit("publish")
    actor = actor_name(args)
    try:
        directory = resolve_version(args.checkpoints, args.kind, args.version)
        result = store.publish(directory, actor)
        for ref in result.recorded:
            print(f"published {ref.kind} {ref.version} to {store.location}")
        for ref in result.unchanged:
            print(f"{ref.kind} {ref.version} was already published")
        print(f"{len(result.uploaded)} files uploaded ({result.uploaded_bytes} bytes), {len(result.present)} already "
              "in the store")
        if args.alias:
            print(describe_move(args.alias, directory.name, store.set_alias(args.alias, directory.name, actor)))
    except (CheckpointError, ModelStoreError) as exc:
        sys.exit(f"publish: {exc}")


def run_alias(args: argparse.Namespace) -> None:
    from facegen.contract.model_store import ModelStoreError

    store = open_model_store_or_exit("alias")
    try:
        print(describe_move(args.name, args.version, store.set_alias(args.name, args.version, actor_name(args))))
    except ModelStoreError as exc:
        sys.exit(f"alias: {exc}")


def run_models(args: argparse.Namespace) -> None:
    from facegen.contract.model_store import ModelStoreError, format_card

    store = open_model_store_or_exit("models")
    try:
        if args.history:
            moves = store.alias_history(args.history)
            if not moves:
                sys.exit(f"models: no alias {args.history!r} in {store.location}")
            for move in moves:
                print(f"{move.at}  {move.by}  {move.previous or '(new)'} -> {move.version}")
            return
        aliases = store.aliases()
        print(store.location)
        for record in store.versions():
            names = " ".join(f"[{name}]" for name, move in aliases.items() if move.version == record.version)
            print(f"{record.kind:<9} {record.version} {names} published by {record.published_by} at "
                  f"{record.published_at}\n          {format_card(record.card)}")
        for name, move in aliases.items():
            print(f"alias {name} -> {move.version} (moved by {move.by} at {move.at})")
    except ModelStoreError as exc:
        sys.exit(f"models: {exc}")


COMMANDS = {"synth": run_synth, "vae": run_vae, "diffusion": run_diffusion, "distill": run_distill,
            "evaluate": run_evaluate, "evaluate-edit": run_evaluate_edit, "visualize": run_visualize,
            "retune": run_retune, "reader": run_reader, "transitions": run_transitions,
            "student-fit": run_student_fit, "publish": run_publish, "alias": run_alias, "models": run_models}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training")
    commands = parser.add_subparsers(dest="command", required=True)
    add_train_commands(commands)
    add_distill_command(commands)
    add_measure_commands(commands)
    add_student_fit_command(commands)
    add_edit_commands(commands)
    add_store_commands(commands)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.argv = argv
    COMMANDS[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
