"""Instruments of ``python -m training evaluate-edit --instruments``: does an edit look real, keep its mouth's colours
real and keep the person?

- ``realism``: KID (unbiased, ± its std over subsets) and FID of the edits toward a label against held-out real faces
  of that label (the test faces of the label that no edit starts from), beside the same numbers, at the same n and
  with the same Inception features, for held-out real faces of the label (the edits' sources of the other
  direction: about 0), their VAE round trips (the floor an edit through this VAE cannot go below) and generated
  faces of the label (the worker's sampler and guidance).
- ``colour``: the rate of faces whose mouth shows colours real mouths of the label do not
  (:mod:`training.evaluation.mouth_colour`; real mouths of the validation split set the reference and the threshold),
  with its 95% Wilson interval, for the same four sets.
- ``identity``: the rate of edits that keep every identity parameter of the synthetic faces, and each one, within the
  tolerance that separates two different faces (:mod:`training.evaluation.identity`), beside the same rate for the
  sources' VAE round trips, and the regressor's own accuracy on the test faces and their round trips.

Beside the edits, every instrument also scores *perfect edits*: the sources drawn again by the generator with a mouth
of the target label and nothing else changed (:func:`~training.evaluation.identity.drawn_with_mouth`), as they are
and through the VAE (encoded and decoded: the best an edit through this VAE could return).

The colour and identity instruments read faces with the identity regressor, which needs a folder written by
``python -m training synth`` (``synth_seed``: the seed it was written with; checked against its landmarks).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from facegen.model.config import DataConfig
from facegen.model.pipeline import LatentDiffusion
from training.data.celeba import load_split
from training.stats import percent_ci, rate

from .evaluate import Setting, generate, reconstruct
from .identity import (
    IDENTITY,
    IdentityRegressor,
    RoundTrip,
    Targets,
    accuracy,
    kept_rates,
    mouth_geometry,
    parameters_lost,
    split_parameters,
    targets_of,
    tolerances,
    train_regressor,
)
from .metrics import InceptionFeatures, kid
from .mouth_colour import MouthColour

INSTRUMENTS = ("realism", "colour", "identity")
# the generated faces beside the edits: the worker's default sampler and steps (facegen.contract.spec repeats them;
# tests/training/test_edit_instruments.py checks they agree) at the model's own guidance
GENERATED = Setting("dpmpp", 20, None)
# the report's names of the perfect edits' sets (:func:`baselines`), as they are and through the VAE
PERFECT_SETS = (("perfect edits", "perfect"), ("perfect edits through the VAE", "perfect_vae"))


class Realism:
    """KID and FID of image sets against held-out real faces of each label (one Inception pass per set)."""

    def __init__(self, inception: InceptionFeatures, references: dict[bool, torch.Tensor], seed: int):
        self.inception = inception
        self.seed = seed
        self.reference = {value: inception.features(images) for value, images in references.items()}
        self.statistics = {value: inception.statistics(features) for value, features in self.reference.items()}

    def score(self, images: torch.Tensor, label: bool) -> dict[str, float]:
        """``{kid, kid_std, fid, n, reference_images}`` of ``uint8 [N, 3, S, S]`` against the faces of ``label``."""
        features = self.inception.features(images)
        value, spread = kid(self.reference[label], features, seed=self.seed)
        return {"kid": value, "kid_std": spread, "fid": self.inception.fid(self.statistics[label], features),
                "n": len(images), "reference_images": len(self.reference[label])}


@dataclass
class EditInstruments:
    """The chosen instruments, built once per evaluation: ``realism`` (None unless chosen), the identity regressor
    (colour and identity), each label's real mouth colours (colour) and the identity tolerances (identity)."""

    realism: Realism | None
    regressor: IdentityRegressor | None
    colour: dict[bool, MouthColour] | None
    tolerance: dict[str, float] | None

    def score(self, images: torch.Tensor, label: bool, sources: torch.Tensor | None = None,
              truth: Targets | None = None) -> dict[str, Any]:
        """Each chosen instrument on ``images uint8 [N, 3, S, S]`` of ``label``; with their ``sources`` (the faces
        they were made from) and the sources' true parameters, also the identity they keep."""
        scores: dict[str, Any] = {}
        readings = self.regressor.read(images) if self.regressor is not None else None
        if self.realism is not None:
            scores["realism"] = self.realism.score(images, label)
        if self.colour is not None and readings is not None:
            scores["colour_outside"] = rate(self.colour[label].outside(images, mouth_geometry(readings)))
        if self.tolerance is not None and readings is not None and sources is not None and truth is not None:
            assert self.regressor is not None
            scores["identity_kept"] = kept_rates(self.regressor.read(sources), readings, truth, self.tolerance)
        return scores

    def face_scores(self, images: torch.Tensor, label: bool, sources: torch.Tensor, truth: Targets
                    ) -> dict[str, torch.Tensor]:
        """Per edit of ``images uint8 [N, 3, S, S]`` (of ``label``, made from ``sources``, whose true parameters are
        ``truth``): ``colour float32 [N]``, its mouth's colour score over the real mouths' threshold (above 1:
        outside), and ``lost int64 [N]``, how many identity parameters it does not keep. Needs colour and
        identity."""
        assert self.regressor is not None and self.colour is not None and self.tolerance is not None
        readings = self.regressor.read(images)
        colour = self.colour[label]
        return {"colour": colour.scores(images, mouth_geometry(readings)) / colour.threshold,
                "lost": parameters_lost(self.regressor.read(sources), readings, truth, self.tolerance)}


def mouth_colours(regressor: IdentityRegressor, images: torch.Tensor, labels: torch.Tensor
                  ) -> dict[bool, MouthColour]:
    """Each label's :class:`MouthColour` from real faces ``uint8 [N, 3, S, S]`` of a split no report is taken on
    (``labels int64 [N]``): of each label's faces, alternately one to the reference and one to the calibration."""
    geometry = mouth_geometry(regressor.read(images))
    colours = {}
    for value in (True, False):
        rows = (labels == int(value)).nonzero().flatten()
        reference, calibration = rows[0::2], rows[1::2]
        colours[value] = MouthColour.fit(images[reference], geometry[reference], images[calibration],
                                         geometry[calibration])
    return colours


def build_instruments(chosen: tuple[str, ...], model: LatentDiffusion, data: Path, references: dict[bool, torch.Tensor],
                      seed: int, synth_seed: int, identity_steps: int, feature_cache: Path | None = None,
                      identity_cache: Path | None = None) -> EditInstruments:
    """The ``chosen`` instruments for ``model``: ``references`` are each label's held-out real faces of the
    realism reference; the regressor trains from ``seed`` for ``identity_steps`` steps on the training faces and
    their round trips through ``model``'s VAE (weights kept in ``identity_cache``), Inception features are kept in
    ``feature_cache``."""
    unknown = set(chosen) - set(INSTRUMENTS)
    if unknown:
        raise ValueError(f"unknown instruments {sorted(unknown)}; choose from {', '.join(INSTRUMENTS)}")
    data_cfg = DataConfig(attributes=model.attributes[:1], crop=model.manifest.data.crop,
                          image_size=model.manifest.data.image_size)
    realism = None
    if "realism" in chosen:
        realism = Realism(InceptionFeatures(model.device, feature_cache), references, seed)
    regressor = colour = tolerance = None
    if "colour" in chosen or "identity" in chosen:
        round_trip = RoundTrip(model.manifest.vae_version, lambda faces: reconstruct(model, faces))
        regressor = train_regressor(data, data_cfg, synth_seed, identity_steps, seed, cache=identity_cache,
                                    round_trip=round_trip)
    if "colour" in chosen:
        assert regressor is not None
        val_images, val_labels = load_split(data, "val", data_cfg)
        colour = mouth_colours(regressor, val_images, val_labels[:, 0])
    if "identity" in chosen:
        tolerance = tolerances(targets_of(split_parameters(data, "val", synth_seed), data_cfg))
    return EditInstruments(realism, regressor, colour, tolerance)


def baselines(tools: EditInstruments, model: LatentDiffusion, sources: dict[bool, torch.Tensor],
              truth: dict[bool, Targets | None], seed: int, perfect: dict[bool, torch.Tensor] | None = None
              ) -> dict[bool, dict[str, Any]]:
    """Per label: the instruments on held-out real faces of the label (``sources``, the faces edits start from),
    their VAE round trips (with the identity they keep) and as many generated faces of the label (``GENERATED``,
    noise seeds ``(seed, i)``); with ``perfect`` (per label, the other label's sources drawn again with a mouth of
    this one), also on those perfect edits and their round trips, with the identity they keep of their sources."""
    attribute = model.attributes[0]
    setting = GENERATED.for_model(model)
    found = {}
    for value, faces in sources.items():
        round_trips = reconstruct(model, faces)
        generated = generate(model, {attribute: value}, len(faces), setting, seed)
        found[value] = {"real": tools.score(faces, value),
                        "vae": tools.score(round_trips, value, faces, truth[value]),
                        "generated": tools.score(generated, value) | {"setting": setting.name()}}
        if perfect is not None:
            start, truths = sources[not value], truth[not value]
            found[value] |= {"perfect": tools.score(perfect[value], value, start, truths),
                             "perfect_vae": tools.score(reconstruct(model, perfect[value]), value, start, truths)}
    return found


def regressor_check(tools: EditInstruments, model: LatentDiffusion, images: torch.Tensor, truth: Targets,
                    sources_index: torch.Tensor) -> dict[str, Any] | None:
    """The identity regressor's accuracy against the true parameters (:func:`~training.evaluation.identity.accuracy`)
    on held-out ``images`` and on the VAE round trips of the ``sources_index`` rows among them, and how often a
    different face passes for the same (``other_faces``: each face's readings against the next one's; None without
    identity)."""
    if tools.regressor is None or tools.tolerance is None:
        return None
    round_trips = reconstruct(model, images[sources_index])
    readings = tools.regressor.read(images)
    others = readings[torch.roll(torch.arange(len(images)), 1)]  # each face against the next, a different face
    return {"held_out": accuracy(readings, truth, tools.tolerance),
            "round_trips": accuracy(tools.regressor.read(round_trips), truth[sources_index], tools.tolerance),
            "other_faces": kept_rates(readings, others, truth, tools.tolerance)["all"],
            "tolerance": tools.tolerance}


def _quality_cells(scores: dict[str, Any]) -> list[str]:
    """KID ×1000, FID and the colour rate of one set (dashes for instruments not chosen)."""
    realism = scores.get("realism")
    cells = [f"{1000 * realism['kid']:.1f} ± {1000 * realism['kid_std']:.1f}", f"{realism['fid']:.1f}"] \
        if realism else ["–", "–"]
    colour = scores.get("colour_outside")
    return cells + [percent_ci(colour) if colour else "–"]


def markdown_sections(results: dict[str, Any]) -> list[str]:
    """The instruments' tables: realism and colour per target label (real, VAE, generated, each row's edits), identity
    per row with the round trips' ceiling, and the regressor's accuracy."""
    label = results["attribute"].lower()
    names = {True: label, False: f"not_{label}"}
    bases = results["instruments"]["baselines"]
    lines = ["", f"Instruments (n = {results['n_per_direction']} per set; KID ×1000 ± std over subsets and FID "
             "against held-out real faces of the target label; mouths outside real colour with 95% Wilson intervals):",
             "", "| target | set | KID ×1000 | FID | mouths outside real colour |", "|---|---|---|---|---|"]
    for value in (True, False):
        base = bases[value]
        for name, key in (("real held-out faces", "real"), ("their VAE round trips", "vae"),
                          (f"generated ({base['generated']['setting']})", "generated"), *PERFECT_SETS):
            if key in base:
                lines.append(f"| {names[value]} | {name} | {' | '.join(_quality_cells(base[key]))} |")
        for row in results["rows"]:
            if row["direction"].endswith(f"-> {names[value]}"):
                lines.append(f"| {names[value]} | edits, strength {row['strength']:g}, guidance {row['guidance_scale']:g}, "
                             f"hold {row['hold_guidance']:g} | {' | '.join(_quality_cells(row['instruments']))} |")
    check = results["instruments"].get("regressor")
    if check is not None:
        lines += _identity_lines(results, bases, check)
    return lines


def _identity_lines(results: dict[str, Any], bases: dict[bool, Any], check: dict[str, Any]) -> list[str]:
    parameters = [p.name for p in IDENTITY]
    lines = ["", "Identity kept (regressor readings of edit and input within the tolerance, % per parameter; identity: "
             "every parameter but the iris; round trips: the sources' VAE round trips; perfect edits: the sources "
             "drawn again with the target's mouth; a different face passes for the same on "
             f"{percent_ci(check['other_faces'])}):", "",
             "| direction | set | identity kept | " + " | ".join(parameters) + " |",
             "|---|---|---|" + "---|" * len(parameters)]
    for row in results["rows"]:
        source = not row["direction"].startswith("not_")
        target = bases[not source]
        sets = [("round trips", bases[source]["vae"]["identity_kept"])]
        sets += [(name, target[key]["identity_kept"]) for name, key in PERFECT_SETS if key in target]
        sets.append((f"edits, strength {row['strength']:g}, hold {row['hold_guidance']:g}",
                     row["instruments"]["identity_kept"]))
        for name, kept in sets:
            cells = [f"{100 * kept[p]['rate']:.1f}" for p in parameters]
            lines.append(f"| {row['direction']} | {name} | {percent_ci(kept['all'])} | {' | '.join(cells)} |")
    lines += ["", "The identity regressor against the true parameters (share within the tolerance, or the right class):",
              "", "| parameter | tolerance | held-out faces | median error | their round trips |", "|---|---|---|---|---|"]
    for p in IDENTITY:
        held, trips = check["held_out"][p.name], check["round_trips"][p.name]
        tolerance = f"{check['tolerance'][p.name]:.4g}" if p.name in check["tolerance"] else "same class"
        error = f"{held['median_error']:.4g}" if "median_error" in held else "–"
        lines.append(f"| {p.name} | {tolerance} | {percent_ci(held)} | {error} | {percent_ci(trips)} |")
    geometry = ", ".join(f"{name} {check['held_out'][name]['median_error']:.2f} px"
                         for name in ("mouth_x", "mouth_y", "mouth_width"))
    return lines + ["", f"Mouth geometry, median error on held-out faces: {geometry}."]
