"""Identity kept by an edit, without attribute judges: a regressor of the synthetic faces' own parameters.

A synthetic face is drawn from parameters (:class:`training.data.synthetic.FaceParameters`), so a face folder
written by ``python -m training synth --seed S`` has, for every image, the true skin tone, hair colour and style,
face shape, head pose, eye spacing and iris colour, beard, background and clothes colours. An edit of *Smiling* may
change none of them. :class:`IdentityRegressor` (a small CNN) reads them back from an image; it trains on the train
split with blur, down/up-sampling, noise and small shifts (the shifts move the position targets with the image), so
it reads a decoded face as it reads the original.

An edit keeps a parameter when the regressor's readings of the edit and of its input differ by at most the
parameter's **tolerance**: the lower quartile (``TOLERANCE_QUANTILE``) of the true difference between two different
faces of the validation split (a colour's difference is the Euclidean distance of its RGB values in [0, 1]); a
categorical parameter (hair style, iris colour, beard, mustache) is kept when both readings name the same class. One
parameter within its tolerance says little (a quarter of the pairs of different faces are), all of them at once
say "the same face" (a random other face almost never passes them all). An edit keeps the **identity** when it
keeps every parameter with ``in_identity`` set (all but the iris colour, which does not survive a VAE round trip).

The quartile, the iris left out of the identity and what the regressor resolves through a decoder are measured in
EVALUATION.md (on the validation split's faces and their VAE round trips, never on edits). The regressor's own
error (:func:`accuracy`: its readings against the truth, on held-out faces and on their VAE round trips) and the
round trips' kept rates are reported beside every edit's.

:func:`drawn_with_mouth` draws faces again with the other mouth and nothing else changed: a perfect edit of
*Smiling*, which the instruments score beside the model's edits (with and without a VAE round trip) to say what an
edit could reach.

The mouth's position and width (``GEOMETRY``) are read too: the colour-fidelity instrument
(:mod:`training.evaluation.mouth_colour`) finds the mouth by them on any image, generated ones included.
"""

from __future__ import annotations

import hashlib
import io
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from facegen.model.config import DataConfig
from facegen.model.imaging import IMAGE_HEIGHT, IMAGE_WIDTH, center_crop_resize, to_float
from training.data.celeba import (
    DatasetError,
    fingerprint,
    load_split,
    read_annotations,
    read_landmarks,
    split_indices,
)
from training.data.synthetic import (
    HAIR_STYLES,
    IRIS_COLOURS,
    JPEG_QUALITY,
    SUPERSAMPLE,
    FaceParameters,
    face_parameters,
    file_name,
    landmarks_of,
    render,
    rotate_points,
    with_mouth,
)
from training.evaluation.judge import FEATURE_CHANNELS, Augmentation, degrade, strided_features
from training.runtime import cached_tensors
from training.stats import rate

TOLERANCE_QUANTILE = 0.25  # of the difference between two different faces: what "kept" allows
TOLERANCE_PAIRS = 20_000  # random pairs of different validation faces the tolerances are measured on
# the regressor's training: degradations a decoder and an edit bring (no colour change: colours are targets), shifts
AUGMENTATION = Augmentation(probability=0.5, max_blur_sigma=1.5, max_noise_std=0.05, brightness=0.0, contrast=0.0,
                            saturation=0.0, max_shift=0.0)
MAX_SHIFT = 2  # pixels at 64x64, each axis, applied with AUGMENTATION.probability
TRAINING_BATCH = 64
STEPS = 6000  # training steps of ``python -m training evaluate-edit``'s regressor


@dataclass(frozen=True)
class Parameter:
    """One regressed parameter: ``width`` values (continuous: 3 for a colour) or classes (``categorical``)."""

    name: str
    width: int
    categorical: bool = False
    position: bool = False  # an x or y coordinate: it moves when the image is shifted
    in_identity: bool = True  # counted in "keeps the identity" (every such parameter kept)


IDENTITY = (
    Parameter("skin", 3), Parameter("hair_colour", 3), Parameter("hair_style", len(HAIR_STYLES), categorical=True),
    Parameter("face_width", 1), Parameter("face_aspect", 1), Parameter("head_x", 1, position=True),
    Parameter("head_y", 1, position=True), Parameter("roll", 1), Parameter("eye_spacing", 1),
    Parameter("iris", len(IRIS_COLOURS), categorical=True, in_identity=False), Parameter("beard", 3, categorical=True),
    Parameter("mustache", 2, categorical=True), Parameter("background_top", 3), Parameter("background_bottom", 3),
    Parameter("clothes", 3),
)
GEOMETRY = (Parameter("mouth_x", 1, position=True), Parameter("mouth_y", 1, position=True),
            Parameter("mouth_width", 1))
PARAMETERS = IDENTITY + GEOMETRY
CONTINUOUS = tuple(p for p in PARAMETERS if not p.categorical)
CATEGORICAL = tuple(p for p in PARAMETERS if p.categorical)


def _columns() -> dict[str, slice]:
    """Where each continuous parameter's values sit in a row of :attr:`Targets.values`."""
    spans, start = {}, 0
    for p in CONTINUOUS:
        spans[p.name] = slice(start, start + p.width)
        start += p.width
    return spans


COLUMNS = _columns()
VALUES = sum(p.width for p in CONTINUOUS)


@dataclass(frozen=True)
class Targets:
    """Parameters of ``N`` faces: ``values float32 [N, VALUES]`` (the continuous ones in ``CONTINUOUS`` order:
    colours in [0, 1], lengths and positions in pixels of the ``S x S`` image, roll in degrees), ``classes int64
    [N, len(CATEGORICAL)]`` and ``known bool [N, len(PARAMETERS)]`` (whether the face shows the parameter: no hair
    colour on a bald head, no mustache without a beard)."""

    values: torch.Tensor
    classes: torch.Tensor
    known: torch.Tensor

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, rows: Any) -> Targets:
        return Targets(self.values[rows], self.classes[rows], self.known[rows])

    def value(self, name: str) -> torch.Tensor:
        """One continuous parameter, ``[N, width]``."""
        return self.values[:, COLUMNS[name]]

    def category(self, name: str) -> torch.Tensor:
        """One categorical parameter's classes, ``int64 [N]``."""
        return self.classes[:, [p.name for p in CATEGORICAL].index(name)]

    def shows(self, name: str) -> torch.Tensor:
        """``bool [N]``: which faces show the parameter."""
        return self.known[:, [p.name for p in PARAMETERS].index(name)]


class ImageFrame:
    """Maps the generator's 2x canvas to the ``S x S`` training image (centre crop ``crop``, resize to ``S``):
    positions as continuous pixel coordinates (pixel ``i`` spans ``[i, i + 1)``), lengths in pixels."""

    def __init__(self, data_cfg: DataConfig):
        self.scale = data_cfg.image_size / data_cfg.crop
        self.left = (IMAGE_WIDTH - data_cfg.crop) // 2
        self.top = (IMAGE_HEIGHT - data_cfg.crop) // 2

    def point(self, x: float, y: float) -> tuple[float, float]:
        return (x / SUPERSAMPLE - self.left) * self.scale, (y / SUPERSAMPLE - self.top) * self.scale

    def length(self, canvas_pixels: float) -> float:
        return canvas_pixels / SUPERSAMPLE * self.scale


def _beard_class(p: FaceParameters) -> int:
    """0: none, 1: hair-coloured, 2: stubble."""
    return 0 if p.beard is None else 1 if p.beard.hair_coloured else 2


def encode(p: FaceParameters, frame: ImageFrame) -> tuple[dict[str, list[float]], dict[str, int], dict[str, bool]]:
    """One face's parameters as the regressor's targets: continuous values, classes and which ones it shows."""
    g = p.head
    head, mouth = rotate_points([(g.cx, g.cy), (g.cx, p.mouth.y)], p.angle, p.roll_centre)
    values = {
        "skin": [c / 255 for c in g.skin], "hair_colour": [c / 255 for c in g.hair],
        "face_width": [frame.length(g.face_w)], "face_aspect": [g.face_h / g.face_w],
        "head_x": [frame.point(*head)[0]], "head_y": [frame.point(*head)[1]], "roll": [p.angle],
        "eye_spacing": [frame.length(2 * p.eyes.dx)],
        "background_top": [c / 255 for c in p.background.top],
        "background_bottom": [c / 255 for c in p.background.bottom], "clothes": [c / 255 for c in p.clothes],
        "mouth_x": [frame.point(*mouth)[0]], "mouth_y": [frame.point(*mouth)[1]],
        "mouth_width": [frame.length(p.mouth.w)],
    }
    classes = {"hair_style": HAIR_STYLES.index(g.style), "iris": IRIS_COLOURS.index(p.eyes.iris),
               "beard": _beard_class(p), "mustache": int(p.beard is not None and p.beard.mustache)}
    known = {name: True for name in (q.name for q in PARAMETERS)}
    known["hair_colour"] = g.style != "bald"
    known["mustache"] = p.beard is not None
    return values, classes, known


def targets_of(parameters: list[FaceParameters], data_cfg: DataConfig) -> Targets:
    """:class:`Targets` of faces, in the pixels of ``data_cfg``'s images."""
    frame = ImageFrame(data_cfg)
    encoded = [encode(p, frame) for p in parameters]
    values = torch.tensor([[v for q in CONTINUOUS for v in e[0][q.name]] for e in encoded], dtype=torch.float32)
    classes = torch.tensor([[e[1][q.name] for q in CATEGORICAL] for e in encoded], dtype=torch.int64)
    known = torch.tensor([[e[2][q.name] for q in PARAMETERS] for e in encoded], dtype=torch.bool)
    return Targets(values.reshape(len(parameters), VALUES), classes.reshape(len(parameters), len(CATEGORICAL)),
                   known.reshape(len(parameters), len(PARAMETERS)))


def split_parameters(data: Path, split: str, synth_seed: int, limit: int | None = None) -> list[FaceParameters]:
    """The generator's parameters of one split's faces (the rows of ``load_split``), from the seed the folder was
    written with; raises :class:`DatasetError` when the folder's landmarks say it was not (or has none)."""
    data = Path(data)
    annotations = read_annotations(data)
    files = [annotations.files[i] for i in split_indices(data, annotations, split, limit)]
    parameters = [face_parameters(synth_seed, int(Path(f).stem) - 1) for f in files]
    landmarks = read_landmarks(data)
    if landmarks is None:
        raise DatasetError(f"{data}: no landmark file, so no check that its faces are the synthetic ones of seed "
                           f"{synth_seed}: identity parameters need a folder written by `python -m training synth`")
    for name, p in zip(files, parameters, strict=True):
        index = int(Path(name).stem) - 1
        if name != file_name(index) or name not in landmarks or \
                tuple(map(tuple, landmarks[name].astype(int).tolist())) != landmarks_of(p):
            raise DatasetError(f"{data}: {name} is not face {index} of `python -m training synth --seed {synth_seed}` "
                               "(its landmarks differ): pass the seed the folder was written with")
    return parameters


def drawn_with_mouth(parameters: list[FaceParameters], smiling: bool, data_cfg: DataConfig, seed: int
                     ) -> torch.Tensor:
    """The faces of ``parameters`` drawn again with a mouth for ``smiling`` and nothing else changed
    (:func:`~training.data.synthetic.with_mouth`, face ``k``'s mouth from ``random.Random(f"{seed}:{k}")``), saved
    and framed as the folder's faces are (JPEG, centre crop, resize): ``uint8 [N, 3, S, S]``."""
    faces = []
    for k, p in enumerate(parameters):
        encoded = io.BytesIO()
        render(with_mouth(p, smiling, random.Random(f"{seed}:{k}"))).save(encoded, format="JPEG", quality=JPEG_QUALITY)
        with Image.open(encoded) as image:
            faces.append(torch.from_numpy(center_crop_resize(image.convert("RGB"), data_cfg.crop, data_cfg.image_size)))
    return torch.stack(faces)


class IdentityRegressor(nn.Module):
    """``[N, 3, S, S]`` in [-1, 1] -> ``(values [N, VALUES], logits [N, sum of the classes])``: the continuous
    parameters in standardised units (``mean``/``std`` of the training targets, kept as buffers) and each categorical
    parameter's class logits. Four stride-2 convolutions, then two linear layers over the whole ``S/16 x S/16`` map
    (positions matter)."""

    def __init__(self, image_size: int, mean: torch.Tensor | None = None, std: torch.Tensor | None = None):
        super().__init__()
        self.features = strided_features()
        outputs = VALUES + sum(p.width for p in CATEGORICAL)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(FEATURE_CHANNELS * (image_size // 16) ** 2, 256), nn.SiLU(),
                                  nn.Linear(256, outputs))
        self.register_buffer("mean", torch.zeros(VALUES) if mean is None else mean)
        self.register_buffer("std", torch.ones(VALUES) if std is None else std)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.head(self.features(x))
        return out[:, :VALUES], out[:, VALUES:]

    @torch.no_grad()
    def read(self, images: torch.Tensor, batch: int = 256) -> Targets:
        """``uint8 [N, 3, S, S]`` -> its readings as :class:`Targets` (``known``: all True)."""
        self.eval()
        values, classes = [], []
        for chunk in images.split(batch):
            standardised, logits = self(to_float(chunk))
            values.append(standardised * self.std + self.mean)
            classes.append(torch.stack([part.argmax(dim=1) for part in _class_logits(logits)], dim=1))
        values_all = torch.cat(values)
        return Targets(values_all, torch.cat(classes), torch.ones(len(values_all), len(PARAMETERS), dtype=torch.bool))


def _class_logits(logits: torch.Tensor) -> list[torch.Tensor]:
    """The logits ``[N, sum of the classes]`` split per categorical parameter."""
    return list(logits.split([p.width for p in CATEGORICAL], dim=1))


def shift(images: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Move each image of ``[N, C, S, S]`` by its own whole-pixel ``offsets int64 [N, 2]`` (x, y; positive: right,
    down), filling the uncovered border with the edge pixels."""
    margin = int(offsets.abs().max()) if len(offsets) else 0
    if margin == 0:
        return images
    size = images.shape[-1]
    padded = F.pad(images, (margin, margin, margin, margin), mode="replicate")
    return torch.stack([padded[i, :, margin - dy:margin - dy + size, margin - dx:margin - dx + size]
                        for i, (dx, dy) in enumerate(offsets.tolist())])


def _value_mask(known: torch.Tensor) -> torch.Tensor:
    """Per continuous value ``bool [N, VALUES]``, from the per-parameter ``known [N, len(PARAMETERS)]``."""
    index = [[p.name for p in PARAMETERS].index(q.name) for q in CONTINUOUS for _ in range(q.width)]
    return known[:, index]


def _loss(regressor: IdentityRegressor, x: torch.Tensor, targets: Targets) -> torch.Tensor:
    values, logits = regressor(x)
    standardised = (targets.values - regressor.mean) / regressor.std
    mask = _value_mask(targets.known).float()
    loss = (F.smooth_l1_loss(values, standardised, reduction="none") * mask).sum() / mask.sum().clamp_min(1)
    names = [p.name for p in PARAMETERS]
    for k, (p, part) in enumerate(zip(CATEGORICAL, _class_logits(logits), strict=True)):
        shown = targets.known[:, names.index(p.name)].float()
        ce = F.cross_entropy(part, targets.classes[:, k], reduction="none")
        loss = loss + (ce * shown).sum() / shown.sum().clamp_min(1) / len(CATEGORICAL)
    return loss


def _shifted_targets(targets: Targets, offsets: torch.Tensor) -> Targets:
    """``targets`` of images moved by ``offsets [N, 2]`` (x, y pixels): the positions move with them."""
    values = targets.values.clone()
    for p in CONTINUOUS:
        if p.position:
            values[:, COLUMNS[p.name]] += offsets[:, 0 if p.name.endswith("_x") else 1, None].float()
    return Targets(values, targets.classes, targets.known)


def fit_regressor(images: torch.Tensor, targets: Targets, steps: int, seed: int,
                  batch: int = TRAINING_BATCH) -> dict[str, torch.Tensor]:
    """The trained weights of an :class:`IdentityRegressor` on ``images uint8 [N, 3, S, S]`` and their
    ``targets`` (initialised and trained from ``seed`` alone; AdamW, one-cycle schedule)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    size = images.shape[-1]
    shown = _value_mask(targets.known)
    mean = torch.stack([targets.values[shown[:, j], j].mean() for j in range(VALUES)])
    std = torch.stack([targets.values[shown[:, j], j].std() for j in range(VALUES)]).clamp_min(1e-3)
    regressor = IdentityRegressor(size, mean, std)
    optimizer = torch.optim.AdamW(regressor.parameters(), lr=1e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=max(steps, 1))
    max_shift = max(1, round(MAX_SHIFT * size / 64))
    regressor.train()
    for _ in range(steps):
        index = torch.randint(0, len(images), (batch,), generator=generator)
        moved = torch.rand(batch, generator=generator) < AUGMENTATION.probability
        offsets = torch.randint(-max_shift, max_shift + 1, (batch, 2), generator=generator) * moved[:, None]
        x = shift(degrade(to_float(images[index]), AUGMENTATION, generator), offsets)
        loss = _loss(regressor, x, _shifted_targets(targets[index], offsets))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return regressor.state_dict()


@dataclass(frozen=True)
class RoundTrip:
    """A VAE's round trip of faces, ``uint8 [N, 3, S, S]`` -> encoded and decoded ``uint8 [N, 3, S, S]``, and the
    version of the VAE that makes it (it names the regressor's cached weights)."""

    vae_version: str
    apply: Callable[[torch.Tensor], torch.Tensor]


def train_regressor(data: Path, data_cfg: DataConfig, synth_seed: int, steps: int, seed: int,
                    train_limit: int | None = None, cache: Path | None = None,
                    round_trip: RoundTrip | None = None) -> IdentityRegressor:
    """An :class:`IdentityRegressor` trained on the train split (its first ``train_limit`` faces, default all) of a
    folder written by ``python -m training synth --seed synth_seed``; with ``round_trip``, on those faces and their
    round trips through that VAE, each with its face's parameters.

    ``cache``: a folder keeping the trained weights under a name made of everything they depend on (the data's
    fingerprint, crop and size, the seeds, ``steps``, ``train_limit``, the augmentation, the VAE); a later call with
    the same inputs reads them instead of training."""
    frame = DataConfig(attributes=data_cfg.attributes[:1], crop=data_cfg.crop, image_size=data_cfg.image_size)
    path = None
    if cache is not None:
        inputs = repr((fingerprint(data), frame.crop, frame.image_size, synth_seed, steps, seed, train_limit,
                       AUGMENTATION, MAX_SHIFT, TRAINING_BATCH, [(p.name, p.width) for p in PARAMETERS],
                       None if round_trip is None else round_trip.vae_version))
        path = cache / f"identity-{hashlib.sha256(inputs.encode()).hexdigest()[:32]}.pt"

    def fit() -> dict[str, torch.Tensor]:
        images, _ = load_split(data, "train", frame, train_limit)
        targets = targets_of(split_parameters(data, "train", synth_seed, train_limit), frame)
        if round_trip is not None:
            images = torch.cat([images, round_trip.apply(images)])
            targets = Targets(*(torch.cat([part, part]) for part in (targets.values, targets.classes, targets.known)))
        return fit_regressor(images, targets, steps, seed)

    regressor = IdentityRegressor(frame.image_size)
    regressor.load_state_dict(cached_tensors(path, fit))
    return regressor.eval()


def _distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distance between rows ``[N, width]`` (for one value: the absolute difference)."""
    return (a - b).norm(dim=1)


def tolerances(targets: Targets, pairs: int = TOLERANCE_PAIRS, seed: int = 0,
               quantile: float = TOLERANCE_QUANTILE) -> dict[str, float]:
    """Per continuous identity parameter, the ``quantile`` of the true difference between two different faces
    (``pairs`` random pairs of ``targets``' rows, both showing the parameter)."""
    generator = torch.Generator().manual_seed(seed)
    first = torch.randint(0, len(targets), (pairs,), generator=generator)
    second = (first + torch.randint(1, len(targets), (pairs,), generator=generator)) % len(targets)
    found = {}
    for p in IDENTITY:
        if p.categorical:
            continue
        both = targets.shows(p.name)[first] & targets.shows(p.name)[second]
        gaps = _distance(targets.value(p.name)[first[both]], targets.value(p.name)[second[both]])
        found[p.name] = float(torch.quantile(gaps, quantile))
    return found


def agreement(a: Targets, b: Targets, tolerance: dict[str, float]) -> dict[str, torch.Tensor]:
    """Per identity parameter, ``bool [N]``: whether readings (or truths) ``a`` and ``b`` of the same ``N`` faces
    agree: within the tolerance, or the same class."""
    same = {}
    for p in IDENTITY:
        if p.categorical:
            same[p.name] = a.category(p.name) == b.category(p.name)
        else:
            same[p.name] = _distance(a.value(p.name), b.value(p.name)) <= tolerance[p.name]
    return same


def identity_held(same: dict[str, torch.Tensor], truth: Targets) -> torch.Tensor:
    """``bool [P, N]``: per parameter ``in_identity`` (in ``IDENTITY``'s order), whether each face keeps it, from
    :func:`agreement`'s ``same``; a parameter the face's true parameters do not show counts as kept."""
    return torch.stack([same[p.name] | ~truth.shows(p.name) for p in IDENTITY if p.in_identity])


def kept_rates(sources: Targets, edits: Targets, truth: Targets, tolerance: dict[str, float]) -> dict[str, Any]:
    """How often edits keep each identity parameter (readings of the edit against readings of its input; over the
    faces whose true parameters show it) and the identity (``all``: every parameter ``in_identity`` at once), each a
    rate with its 95% Wilson interval."""
    same = agreement(sources, edits, tolerance)
    rates = {name: rate(hits[truth.shows(name)]) for name, hits in same.items()}
    return {"all": rate(identity_held(same, truth).all(dim=0)), **rates}


def parameters_lost(sources: Targets, edits: Targets, truth: Targets, tolerance: dict[str, float]) -> torch.Tensor:
    """``int64 [N]``: how many identity parameters each edit does not keep (:func:`kept_rates`' ``all`` is 0 here)."""
    return (~identity_held(agreement(sources, edits, tolerance), truth)).sum(dim=0)


def accuracy(readings: Targets, truth: Targets, tolerance: dict[str, float]) -> dict[str, Any]:
    """The regressor's error: per identity parameter, how often its reading is within the tolerance of the truth
    (the right class) over the faces that show it, with its median error (continuous ones); per ``GEOMETRY``
    parameter, the median absolute error in pixels."""
    same = agreement(readings, truth, tolerance)
    report: dict[str, Any] = {}
    for p in IDENTITY:
        shown = truth.shows(p.name)
        report[p.name] = rate(same[p.name][shown])
        if not p.categorical:
            errors = _distance(readings.value(p.name)[shown], truth.value(p.name)[shown])
            report[p.name] |= {"median_error": float(errors.median()), "tolerance": tolerance[p.name]}
    for p in GEOMETRY:
        report[p.name] = {"median_error": float(_distance(readings.value(p.name), truth.value(p.name)).median())}
    return report


def mouth_geometry(targets: Targets) -> torch.Tensor:
    """``float32 [N, 3]``: each face's mouth centre x, y and width (pixels of its image)."""
    return torch.cat([targets.value(name) for name in ("mouth_x", "mouth_y", "mouth_width")], dim=1)

