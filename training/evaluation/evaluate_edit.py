"""``python -m training evaluate-edit``: how well an edit changes the attribute and how much of the face it keeps.

Held-out faces (the test split) are edited in both directions (``Smiling`` to not, not to ``Smiling``) at each
strength of a sweep, by the worker's path (:meth:`LatentDiffusion.edit_latents`): VAE encode, DDIM inversion through
``strength`` of the ``steps`` DDIM steps, DDIM regeneration under the target with guidance; inversion and guidance
reference the source's label (or, with ``--reference null``, the unconditional model). Each strength is scored by:

- success: the judge (``training.evaluation.judge``, trained with a generator's failure modes as augmentations) reads the target;
- PSNR of the edit to its input (the 64x64 crop the model saw);
- kept: the judge's reading of each other attribute (``Eyeglasses``, ``Male``, ``Young``) is the same on the edit as
  on its input, per attribute and all at once.

With a latent attribute reader in the version (``python -m training reader``), edits also hold the attributes they
leave open by the reader's gradient (``--hold-guidance``: its step size; 0 turns it off); the judge, a pixel
classifier trained apart from it, scores them all the same.

Strength 0 (in the default sweep) is the VAE round trip with no diffusion step: its kept rates are the ceiling the
judge and the VAE leave to any edit.

``instruments`` adds, per row and beside real, round-trip and generated faces, the realism of the edits (KID/FID),
the colour fidelity of their mouths and the identity they keep (:mod:`training.evaluation.edit_realism`).

Rates come with 95% Wilson intervals. One judge panel reads all four attributes: ``evaluate``'s panel (classifiers
of consecutive seeds, a verdict = their mean probability), trained on the four columns; its accuracy per attribute
on the sharp test split is reported, and every rate carries each member's own.
Edits are deterministic (DDIM with eta 0), so no seed is involved beyond the judge's training.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from facegen.model.config import (
    EDIT_FOCUS_THRESHOLD,
    EDIT_HOLD_GUIDANCE,
    EDIT_REFERENCE,
    EDIT_SCOPE,
    DataConfig,
)
from facegen.model.device import pick_device, pick_dtype
from facegen.model.diffusion.inversion import inversion_depth
from facegen.model.diffusion.noise import ImageNoise
from facegen.model.imaging import grid_image, to_float, to_uint8
from facegen.model.pipeline import LatentDiffusion
from training.evaluation.protocol import JUDGE_PANEL_SIZE
from training.stats import percent_ci
from training.train_vae import psnr

from .edit_pictures import case_rows
from .edit_realism import EditInstruments, baselines, build_instruments, markdown_sections, regressor_check
from .identity import STEPS as IDENTITY_STEPS
from .identity import Targets, drawn_with_mouth, split_parameters, targets_of
from .judge import JudgePanel, describe_panel, format_rate, panel_rate, train_panel

KEPT_ATTRIBUTES = ("Eyeglasses", "Male", "Young")
TARGET_SUCCESS = 0.90  # the targets at the default strength
TARGET_KEPT = 0.95


@torch.no_grad()
def edit_images(model: LatentDiffusion, images: torch.Tensor, target: dict[str, bool], strength: float, steps: int,
                guidance_scale: float, reference: str = EDIT_REFERENCE, scope: str = EDIT_SCOPE, batch: int = 64,
                hold_guidance: float = EDIT_HOLD_GUIDANCE, focus_threshold: float = EDIT_FOCUS_THRESHOLD
                ) -> torch.Tensor:
    """``uint8 [N, 3, S, S]`` faces -> their edits ``uint8 [N, 3, S, S]`` toward ``target`` by the worker's method
    (:meth:`LatentDiffusion.edit_latents`; ``reference``, ``scope``, ``hold_guidance`` and ``focus_threshold`` as
    there)."""
    depth = inversion_depth(strength, steps)
    out = []
    for chunk in images.split(batch):
        labels = model.labels_for(target).expand(len(chunk), -1)
        noise = ImageNoise([(0, i) for i in range(len(chunk))], model.device)  # DDIM with eta 0 draws none of it
        latents = model.edit_latents(model.encode(to_float(chunk)), labels, steps, depth, guidance_scale, noise,
                                     reference, scope, hold_guidance=hold_guidance, focus_threshold=focus_threshold)
        out.append(to_uint8(model.decode(latents)))
    return torch.cat(out)


def score_edits(judge: JudgePanel, sources: torch.Tensor, edits: torch.Tensor, target: bool) -> dict[str, Any]:
    """Success, PSNR and the kept attributes of ``edits`` of ``sources`` (both ``uint8 [N, 3, S, S]``); column 0 of
    the judge panel is the edited attribute, the others ``KEPT_ATTRIBUTES``. Each judged rate is the panel's, with
    every member's own (a member keeps an attribute when its own readings of source and edit agree)."""
    row: dict[str, Any] = {"success": judge.read(edits, 0).rate_of(int(target)),
                           "psnr_db": psnr(to_float(edits), to_float(sources))}
    kept = [judge.read(edits, k).hits(judge.read(sources, k)) for k in range(1, 1 + len(KEPT_ATTRIBUTES))]
    for name, hits in zip(KEPT_ATTRIBUTES, kept, strict=True):
        row[f"kept_{name}"] = panel_rate(*hits)
    row["kept_all"] = panel_rate(*(torch.stack(part).all(dim=0) for part in zip(*kept, strict=True)))
    return row


def held_out_indices(labels: torch.Tensor, n: int, tuning: bool = False) -> dict[bool, torch.Tensor]:
    """Rows of ``n`` test faces with and without the edited attribute (column 0 of ``labels int64 [N, A]``):
    ``{has it: int64 [n]}``; the first ``n`` of each for a report, the last ``n`` with ``tuning`` (disjoint while
    ``2 n`` fit: choosing a setting never sees the faces that report it)."""
    rows = {}
    for value in (True, False):
        pool = (labels[:, 0] == int(value)).nonzero().flatten()
        if len(pool) < (2 * n if tuning else n):
            raise ValueError(f"the test split has only {len(pool)} faces with attribute value {value}; lower --n")
        rows[value] = pool[-n:] if tuning else pool[:n]
    return rows


def held_out_faces(images: torch.Tensor, labels: torch.Tensor, n: int, tuning: bool = False
                   ) -> dict[bool, torch.Tensor]:
    """The faces ``uint8 [n, 3, S, S]`` of :func:`held_out_indices`."""
    return {value: images[rows] for value, rows in held_out_indices(labels, n, tuning).items()}


def realism_references(labels: torch.Tensor, sources: dict[bool, torch.Tensor], limit: int | None
                       ) -> dict[bool, torch.Tensor]:
    """Per value of the edited attribute, rows of the test faces no edit starts from (the first ``limit``; all with
    None): the real faces edits toward that value are compared with."""
    references = {}
    for value, rows in sources.items():
        pool = (labels[:, 0] == int(value)).nonzero().flatten()
        references[value] = pool[~torch.isin(pool, rows)][:limit]
    return references


@dataclass(frozen=True)
class InstrumentOptions:
    """Which instruments of :mod:`training.evaluation.edit_realism` to run and how: ``synth_seed`` (the seed the
    synthetic folder was written with), the identity regressor's training steps, the size of the realism reference
    per label (None: every test face no edit starts from) and the folders keeping Inception features and the
    regressor's weights."""

    chosen: tuple[str, ...] = ()
    synth_seed: int = 0
    identity_steps: int = IDENTITY_STEPS
    realism_reference: int | None = None
    feature_cache: Path | None = None
    identity_cache: Path | None = None


def evaluate_edits(checkpoints: Path, version: str, data: Path, n: int, strengths: tuple[float, ...], steps: int,
                   guidance_scales: tuple[float | None, ...], classifier_steps: int, seed: int, device: str = "cpu",
                   precision: str = "auto", train_limit: int | None = None,
                   references: tuple[str, ...] = (EDIT_REFERENCE,), scopes: tuple[str, ...] = (EDIT_SCOPE,),
                   tuning: bool = False, judge_cache: Path | None = None,
                   hold_guidances: tuple[float, ...] = (EDIT_HOLD_GUIDANCE,), judges: int = JUDGE_PANEL_SIZE,
                   instruments: InstrumentOptions | None = None,
                   focus_thresholds: tuple[float, ...] = (EDIT_FOCUS_THRESHOLD,), cases: Path | None = None
                   ) -> dict[str, Any]:
    """The sweep: for each scope (the focused one at each of ``focus_thresholds``), reference, guidance scale (None:
    the model's own), hold guidance (acts with a reader only: a version without one is measured once, as 0),
    strength and direction, ``n``
    held-out faces edited and scored (:func:`score_edits`) by one judge panel of ``judges`` classifiers from
    ``seed`` on (their weights kept in ``judge_cache``, see :func:`~training.evaluation.judge.train_panel`);
    with ``instruments``, each row also by them (:mod:`training.evaluation.edit_realism`), beside their baselines;
    with ``cases`` too (a folder; colour and identity needed), the first setting's best and worst edits of each
    direction go there as ``edit_cases_to_<label>.png`` (:func:`~training.evaluation.edit_pictures.case_rows`)."""
    if cases is not None and not {"colour", "identity"} <= set(instruments.chosen if instruments else ()):
        raise ValueError("the best and worst cases (--cases) are chosen by the colour and identity instruments: "
                         "add --instruments colour identity")
    torch_device = pick_device(device)
    model = LatentDiffusion.load(checkpoints, version, torch_device, pick_dtype(torch_device, precision))
    attribute = model.attributes[0]
    data_cfg = model.manifest.data
    judge_cfg = DataConfig(attributes=(attribute, *KEPT_ATTRIBUTES), crop=data_cfg.crop, image_size=data_cfg.image_size)
    judge, test_images, test_labels = train_panel(data, judge_cfg, classifier_steps, seed, judges, judge_cache,
                                                  train_limit=train_limit)
    results: dict[str, Any] = {
        "version": model.version, "attribute": attribute, "n_per_direction": n, "steps": steps, "tuning": tuning,
        "classifier_steps": classifier_steps, "train_limit": train_limit, "seed": seed,
        "precision": str(model.dtype).removeprefix("torch."), "reader": model.reader is not None,
        "judge_seeds": judge.seeds,
        "judge_accuracy": {name: judge.read(test_images, k).rate_of(test_labels[:, k])
                           for k, name in enumerate(judge_cfg.attributes)},
        "rows": []}
    sources = held_out_indices(test_labels, n, tuning)
    faces = {value: test_images[rows] for value, rows in sources.items()}
    tools, truth = None, {}
    if instruments is not None and instruments.chosen:
        tools, truth = prepare_instruments(instruments, model, data, test_images, test_labels, sources, seed, results)
    guidances = [model.sampling.guidance_scale if g is None else g for g in guidance_scales]
    holds = hold_guidances if model.reader is not None else (0.0,)
    scoped = [(scope, focus) for scope in scopes
              for focus in (focus_thresholds if scope == "focused" else (EDIT_FOCUS_THRESHOLD,))]
    for (scope, focus), reference, guidance, hold, strength in itertools.product(scoped, references, guidances,
                                                                                 holds, strengths):
        for source_value, source_faces in faces.items():
            started = time.perf_counter()
            edits = edit_images(model, source_faces, {attribute: not source_value}, strength, steps, guidance,
                                reference, scope, hold_guidance=hold, focus_threshold=focus)
            row = {"scope": scope if scope != "focused" else f"focused {focus:g}", "reference": reference,
                   "guidance_scale": guidance, "hold_guidance": hold, "strength": strength,
                   "direction": f"{'' if source_value else 'not_'}{attribute.lower()} -> "
                                f"{'not_' if source_value else ''}{attribute.lower()}",
                   "seconds_per_edit": (time.perf_counter() - started) / n,
                   **score_edits(judge, source_faces, edits, not source_value)}
            if tools is not None:
                row["instruments"] = tools.score(edits, not source_value, source_faces, truth[source_value])
                if cases is not None and len(results["rows"]) < len(faces):  # the first setting's two directions
                    read = judge.read(edits, 0).panel == int(not source_value)
                    row["cases"] = write_cases(cases, tools, source_faces, edits, not source_value,
                                               truth[source_value], read, attribute)
            results["rows"].append(row)
            print({k: (round(v["rate"], 3) if "rate" in v else "…") if isinstance(v, dict) else v
                   for k, v in row.items()}, flush=True)
    return results


def write_cases(folder: Path, tools: EditInstruments, sources: torch.Tensor, edits: torch.Tensor, label: bool,
                truth: Targets, read: torch.Tensor, attribute: str) -> dict[str, Any]:
    """Draw the best and worst of ``edits`` (toward ``label``) of ``sources`` to ``folder`` as
    ``edit_cases_to_<label>.png`` (three columns: input, edit, difference; ``read bool [N]``: the judge reads the
    target); returns the file's name and each group's rows with their scores (:meth:`EditInstruments.face_scores`)."""
    scores = tools.face_scores(edits, label, sources, truth) | {"read": read}
    rows, groups = case_rows(sources, edits, scores)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"edit_cases_to_{'' if label else 'not_'}{attribute.lower()}.png"
    grid_image(rows, cols=3).save(path)
    return {"file": path.name, **{name: [{"row": i, "colour": round(float(scores["colour"][i]), 3),
                                          "lost": int(scores["lost"][i]), "read": bool(read[i])} for i in indices]
                                  for name, indices in groups.items()}}


def prepare_instruments(options: InstrumentOptions, model: LatentDiffusion, data: Path, test_images: torch.Tensor,
                        test_labels: torch.Tensor, sources: dict[bool, torch.Tensor], seed: int,
                        results: dict[str, Any]) -> tuple[EditInstruments, dict[bool, Any]]:
    """Build the chosen instruments, record their baselines (with perfect edits where the faces' parameters are
    known) and the identity regressor's accuracy under ``results["instruments"]``; returns them and each direction's
    sources' true parameters (None without identity)."""
    references = realism_references(test_labels, sources, options.realism_reference)
    tools = build_instruments(options.chosen, model, data, {v: test_images[rows] for v, rows in references.items()},
                              seed, options.synth_seed, options.identity_steps, options.feature_cache,
                              options.identity_cache)
    test_truth = perfect = None
    truth: dict[bool, Any] = {value: None for value in sources}
    if tools.regressor is not None:  # a synthetic folder: the faces' parameters are known
        parameters = split_parameters(data, "test", options.synth_seed)
        perfect = {value: drawn_with_mouth([parameters[i] for i in sources[not value].tolist()], value,
                                           model.manifest.data, seed) for value in sources}
        if tools.tolerance is not None:
            test_truth = targets_of(parameters, model.manifest.data)
            truth = {value: test_truth[rows] for value, rows in sources.items()}
    faces = {value: test_images[rows] for value, rows in sources.items()}
    results["instruments"] = {
        "chosen": list(options.chosen), "synth_seed": options.synth_seed, "identity_steps": options.identity_steps,
        "baselines": baselines(tools, model, faces, truth, seed, perfect),
        "regressor": None if test_truth is None else regressor_check(tools, model, test_images, test_truth,
                                                                     torch.cat(list(sources.values())))}
    return tools, truth


def markdown_report(results: dict[str, Any], command: str) -> str:
    """The sweep as a Markdown table, with the judge's accuracy per attribute and the sample size."""
    judge = "; ".join(f"{name} {format_rate(entry)}" for name, entry in results["judge_accuracy"].items())
    faces = "tuning faces (the last of the test split)" if results["tuning"] else "held-out faces"
    lines = [f"Model `{results['version']}`, DDIM {results['steps']} steps, {results['precision']}; "
             f"n = {results['n_per_direction']} {faces} per direction. Command: `{command}`", "",
             f"- {describe_panel(results['judge_seeds'])}; its accuracy on the sharp test split (95% Wilson "
             f"intervals, {results['classifier_steps']} training steps on {results['train_limit'] or 'all'} "
             f"training faces): {judge}", "",
             "| scope | reference | guidance | hold guidance | strength | direction | target read [95% CI] | "
             "PSNR to input (dB) | Eyeglasses kept | Male kept | Young kept | all three kept | s / edit |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        kept = [percent_ci(row[f"kept_{name}"]) for name in KEPT_ATTRIBUTES]
        lines.append(f"| {row['scope']} | {row['reference']} | {row['guidance_scale']:g} | {row['hold_guidance']:g} | "
                     f"{row['strength']:g} | "
                     f"{row['direction']} | {percent_ci(row['success'])} | {row['psnr_db']:.2f} | "
                     f"{' | '.join(kept)} | "
                     f"{percent_ci(row['kept_all'])} | {row['seconds_per_edit']:.2f} |")
    for row in results["rows"]:
        if "cases" in row:
            groups = "; ".join(f"{name}: " + ", ".join(f"#{case['row']} ({case['lost']} lost, colour "
                                                       f"{case['colour']:.2f}×{'' if case['read'] else ', missed'})"
                                                       for case in row["cases"][name])
                               for name in ("colour", "identity", "best"))
            lines += ["", f"Cases {row['direction']}, `{row['cases']['file']}` (rows of the held-out faces, "
                          f"identity parameters lost, mouth colour score over the real mouths' threshold, missed: "
                          f"the judge does not read the target): {groups}"]
    if "instruments" in results:
        lines += markdown_sections(results)
    return "\n".join(lines) + "\n"
