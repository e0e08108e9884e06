"""Procedural synthetic faces written in the official CelebA layout.

``write_dataset(out, count, seed)`` draws ``count`` faces (178x218 JPEGs, like aligned CelebA) and writes
``list_attr_celeba.txt`` (all 40 attribute names; ``Smiling``, ``Eyeglasses``, ``Male`` and ``Young`` vary
independently, every other attribute is -1), ``list_eval_partition.txt`` (80/10/10 train/val/test) and
``list_landmarks_align_celeba.txt`` (eye centres, nose tip and mouth corners in pixels of the 178x218 image).
Face *i* depends only on ``(seed, i)``, so a folder is reproducible whatever the number of processes.

A face is drawn in two steps: :func:`sample_parameters` draws everything random about it (a
:class:`FaceParameters`: colours, geometry, styles), :func:`render` paints those parameters. So
:func:`face_parameters` gives face *i*'s parameters without painting it (what an instrument that checks a face's
identity regresses), and :func:`with_mouth` draws the same face again with a mouth of the other *Smiling* value:
what a perfect edit of the attribute would return.
"""

from __future__ import annotations

import math
import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

from facegen.model.imaging import IMAGE_HEIGHT, IMAGE_WIDTH
from training.data.layout import (
    ATTR_FILE,
    ATTRIBUTE_NAMES,
    IMAGE_DIR,
    LANDMARK_FILE,
    LANDMARK_NAMES,
    PARTITION_FILE,
)

VARIED_ATTRIBUTES = ("Smiling", "Eyeglasses", "Male", "Young")
ATTRIBUTE_PROBABILITY = {"Smiling": 0.5, "Eyeglasses": 0.3, "Male": 0.5, "Young": 0.6}
SUPERSAMPLE = 2  # faces are drawn at 2x and downsampled with a Lanczos filter (anti-aliasing)
JPEG_QUALITY = 95  # of the written faces

SKIN_TONES = [(255, 224, 196), (241, 194, 160), (224, 172, 130), (198, 134, 96), (161, 102, 68),
              (120, 76, 50), (88, 56, 38), (236, 205, 180)]
HAIR_COLOURS = [(30, 22, 18), (70, 45, 30), (120, 80, 45), (200, 160, 90), (160, 60, 30), (15, 15, 20)]
GREY_HAIR = [(180, 180, 180), (215, 215, 210), (140, 138, 135)]
IRIS_COLOURS = [(60, 40, 25), (40, 90, 140), (70, 110, 60), (100, 70, 40), (30, 30, 30)]
HAIR_STYLES = ("short", "long", "bangs", "side_part", "bald", "bun")
# the mouth's shape, as fractions of its width (corner to corner): a smile's middle sits this far below the
# corners; a neutral mouth's corners sit this far below (< 0: above) its middle
SMILE_DEPTH = (0.35, 0.6)
NEUTRAL_DROOP = (-0.12, 0.02)
DROOP_ARC = -0.05  # a neutral mouth whose droop is below this is drawn as an arc, else as a straight line
MAX_ROLL = 8.0  # degrees: the head's roll is uniform in [-MAX_ROLL, MAX_ROLL]

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class FaceAttributes:
    smiling: bool
    eyeglasses: bool
    male: bool
    young: bool


def _jitter(rng: random.Random, colour: RGB, amount: int) -> RGB:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in colour)  # type: ignore[return-value]


def _shade(colour: RGB, factor: float) -> RGB:
    return tuple(max(0, min(255, int(c * factor))) for c in colour)  # type: ignore[return-value]


def sample_attributes(rng: random.Random) -> FaceAttributes:
    p = ATTRIBUTE_PROBABILITY
    return FaceAttributes(rng.random() < p["Smiling"], rng.random() < p["Eyeglasses"],
                          rng.random() < p["Male"], rng.random() < p["Young"])


@dataclass(frozen=True)
class Background:
    """A vertical gradient from ``top`` to ``bottom`` with soft ``blobs`` ``(cx, cy, radius, colour)`` (2x canvas
    pixels)."""

    top: RGB
    bottom: RGB
    blobs: tuple[tuple[int, int, int, RGB], ...]


@dataclass(frozen=True)
class Head:
    """Where the head sits on the supersampled canvas and its colours (pixels of the 2x canvas)."""

    cx: float
    cy: float
    face_w: float
    face_h: float
    skin: RGB
    hair: RGB
    style: str

    @property
    def top(self) -> float:
        return self.cy - self.face_h / 2

    @property
    def bottom(self) -> float:
        return self.cy + self.face_h / 2


@dataclass(frozen=True)
class Beard:
    """A beard along the jaw, hair-coloured or in a darker skin shade (stubble), with or without a mustache."""

    hair_coloured: bool
    mustache: bool


@dataclass(frozen=True)
class Eyes:
    """Both eyes (centres at ``y``, ``cx -+ dx``; ``w x h`` whites), their iris colour and the brows above them."""

    y: float
    dx: float  # half the distance between the eye centres
    w: float
    h: float
    iris: RGB
    brow_lift: float  # how far the brows sit above the eye centres
    brow_tilt: float
    brow_widths: tuple[int, int]  # line widths of the left and right brow


@dataclass(frozen=True)
class Nose:
    y: float  # the tip
    w: float


@dataclass(frozen=True)
class Mouth:
    """The mouth: centre ``y`` under the head's centre line, ``w`` from corner to corner, lip colour and line
    thickness; a smile has a ``depth`` (its middle below the corners) and is ``open`` (teeth) or closed, a neutral
    mouth a ``droop`` (corners below its middle; < 0: above)."""

    y: float
    w: float
    lip: RGB
    thickness: int
    depth: float | None
    open: bool
    droop: float | None


@dataclass(frozen=True)
class Glasses:
    frame: RGB
    lens: float  # half the width of a lens
    width: int  # line width of the frame
    round: bool


@dataclass(frozen=True)
class FaceParameters:
    """Everything random about one face: with :func:`render`, its pixels; 2x canvas pixels for geometry."""

    attributes: FaceAttributes
    background: Background
    head: Head
    clothes: RGB
    beard: Beard | None
    eyes: Eyes
    wrinkles: int  # forehead lines (0: none)
    nose: Nose
    mouth: Mouth
    glasses: Glasses | None
    angle: float  # head roll in degrees, counter-clockwise about ``roll_centre``

    @property
    def roll_centre(self) -> tuple[float, float]:
        return self.head.cx, self.head.cy + self.head.face_h * 0.2


def _sample_background(rng: random.Random, w: int, h: int) -> Background:
    top = (rng.randint(40, 230), rng.randint(40, 230), rng.randint(40, 230))
    bottom = _jitter(rng, top, 70)
    blobs = []
    for _ in range(rng.randint(0, 3)):
        cx, cy, r = rng.randint(0, w), rng.randint(0, h), rng.randint(w // 10, w // 3)
        blobs.append((cx, cy, r, _jitter(rng, top, 40)))
    return Background(top, bottom, tuple(blobs))


def _sample_head(rng: random.Random, attrs: FaceAttributes, w: int, h: int) -> Head:
    s = SUPERSAMPLE
    skin = _jitter(rng, rng.choice(SKIN_TONES), 12)
    hair = _jitter(rng, rng.choice(HAIR_COLOURS if attrs.young else GREY_HAIR), 10)
    scale = rng.uniform(0.88, 1.1)
    cx = w / 2 + rng.uniform(-6, 6) * s
    cy = h / 2 + rng.uniform(-4, 6) * s
    face_w = rng.uniform(88, 102) * s * scale
    face_h = face_w * rng.uniform(1.18, 1.42)
    style = rng.choice(HAIR_STYLES if not attrs.male else ("short", "short", "side_part", "bald", "bangs"))
    if not attrs.male and rng.random() < 0.5:
        style = "long"
    return Head(cx, cy, face_w, face_h, skin, hair, style)


def _sample_beard(rng: random.Random) -> Beard | None:
    """Most male faces have one."""
    if rng.random() >= 0.8:
        return None
    hair_coloured = rng.random() < 0.6
    return Beard(hair_coloured, rng.random() < 0.6)


def _sample_eyes(rng: random.Random, g: Head) -> Eyes:
    s = SUPERSAMPLE
    y, dx, w, h = (g.cy - g.face_h * rng.uniform(0.04, 0.1), g.face_w * rng.uniform(0.19, 0.24),
                   g.face_w * rng.uniform(0.13, 0.17), g.face_h * rng.uniform(0.045, 0.065))
    iris = rng.choice(IRIS_COLOURS)
    brow_lift, brow_tilt = g.face_h * rng.uniform(0.07, 0.11), rng.uniform(-0.04, 0.06) * g.face_h
    left = int(rng.uniform(2, 4) * s)
    return Eyes(y, dx, w, h, iris, brow_lift, brow_tilt, (left, int(rng.uniform(2, 4) * s)))


def _sample_mouth(rng: random.Random, attrs: FaceAttributes, g: Head) -> Mouth:
    lip = _jitter(rng, (150, 60, 60) if not attrs.male else _shade(g.skin, 0.6), 20)
    y = g.cy + g.face_h * rng.uniform(0.23, 0.27)
    width = g.face_w * rng.uniform(0.32, 0.42)
    thickness = max(2, int(rng.uniform(2.5, 4.0) * SUPERSAMPLE))
    return _sample_mouth_shape(rng, attrs.smiling, Mouth(y, width, lip, thickness, None, False, None))


def _sample_mouth_shape(rng: random.Random, smiling: bool, mouth: Mouth) -> Mouth:
    """``mouth`` (its position, width, lip colour and thickness) with a shape drawn for ``smiling``: a smile's depth
    and whether it is open, or a neutral mouth's droop."""
    if smiling:
        return replace(mouth, depth=rng.uniform(*SMILE_DEPTH) * mouth.w, open=rng.random() < 0.5, droop=None)
    return replace(mouth, depth=None, open=False, droop=rng.uniform(*NEUTRAL_DROOP) * mouth.w)


def _sample_glasses(rng: random.Random, eyes: Eyes) -> Glasses:
    frame = rng.choice([(15, 15, 15), (90, 60, 30), (140, 140, 150), (120, 20, 20)])
    lens = eyes.w * rng.uniform(0.62, 0.75)
    width = int(rng.uniform(2, 3.5) * SUPERSAMPLE)
    return Glasses(frame, lens, width, rng.random() < 0.5)


def sample_parameters(rng: random.Random, attrs: FaceAttributes) -> FaceParameters:
    """Everything random about a face with these attributes, drawn from ``rng`` (in a fixed order: a face's
    pixels depend on it)."""
    w, h = IMAGE_WIDTH * SUPERSAMPLE, IMAGE_HEIGHT * SUPERSAMPLE
    background = _sample_background(rng, w, h)
    head = _sample_head(rng, attrs, w, h)
    clothes = (rng.randint(20, 230), rng.randint(20, 230), rng.randint(20, 230))
    beard = _sample_beard(rng) if attrs.male else None
    eyes = _sample_eyes(rng, head)
    wrinkles = 0 if attrs.young else rng.randint(2, 3)
    nose = Nose(head.cy + head.face_h * rng.uniform(0.07, 0.12), head.face_w * rng.uniform(0.07, 0.11))
    mouth = _sample_mouth(rng, attrs, head)
    glasses = _sample_glasses(rng, eyes) if attrs.eyeglasses else None
    return FaceParameters(attrs, background, head, clothes, beard, eyes, wrinkles, nose, mouth, glasses,
                          rng.uniform(-MAX_ROLL, MAX_ROLL))


def _draw_background(b: Background, w: int, h: int) -> Image.Image:
    """Vertical two-colour gradient with a few soft blobs."""
    column = Image.new("RGB", (1, h))
    for y in range(h):
        a = y / (h - 1)
        column.putpixel((0, y), tuple(int(b.top[i] * (1 - a) + b.bottom[i] * a) for i in range(3)))
    image = column.resize((w, h))
    draw = ImageDraw.Draw(image)
    for cx, cy, r, colour in b.blobs:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    return image.filter(ImageFilter.GaussianBlur(6 * SUPERSAMPLE))


def _draw_mouth(draw: ImageDraw.ImageDraw, cx: float, m: Mouth) -> None:
    """A smile curves up at the corners (closed, or open with teeth); a neutral mouth is flat or turned down."""
    half, thickness = m.w / 2, m.thickness
    if m.depth is not None:
        depth = m.depth
        if m.open:  # a half-disc with teeth
            box = [cx - half, m.y - depth, cx + half, m.y + depth]
            draw.chord(box, 0, 180, fill=(90, 20, 30))
            draw.chord([cx - half * 0.9, m.y - depth * 0.95, cx + half * 0.9, m.y + depth * 0.45], 0, 180,
                       fill=(245, 245, 240))
            draw.arc(box, 0, 180, fill=m.lip, width=thickness)
            draw.line([cx - half, m.y, cx + half, m.y], fill=m.lip, width=thickness)
        else:  # a thick upward-curving arc
            draw.arc([cx - half, m.y - depth, cx + half, m.y + depth], 10, 170, fill=m.lip,
                     width=thickness + SUPERSAMPLE)
    else:
        droop = m.droop
        assert droop is not None
        if droop < DROOP_ARC * m.w:
            draw.arc([cx - half, m.y + droop, cx + half, m.y - droop * 1.2], 200, 340, fill=m.lip, width=thickness)
        else:
            draw.line([cx - half * 0.85, m.y, cx + half * 0.85, m.y], fill=m.lip, width=thickness)


Landmarks = tuple[tuple[int, int], ...]  # five (x, y) pixel positions in the order of LANDMARK_NAMES


def rotate_points(points: list[tuple[float, float]], degrees: float, centre: tuple[float, float]
                  ) -> list[tuple[float, float]]:
    """Where ``points`` land after PIL's ``rotate(degrees, center=centre)`` (counter-clockwise on screen, y down)."""
    a = math.radians(degrees)
    cx, cy = centre
    return [(cx + (x - cx) * math.cos(a) + (y - cy) * math.sin(a), cy - (x - cx) * math.sin(a) + (y - cy) * math.cos(a))
            for x, y in points]


def _draw_body(draw: ImageDraw.ImageDraw, g: Head, clothes: RGB) -> None:
    """Shoulders, neck, long hair behind the head, ears and the face itself."""
    cx, cy, fw, fh = g.cx, g.cy, g.face_w, g.face_h
    draw.ellipse([cx - fw * 1.6, g.bottom + fh * 0.15, cx + fw * 1.6, g.bottom + fh * 1.4], fill=clothes)
    draw.rectangle([cx - fw * 0.22, cy, cx + fw * 0.22, g.bottom + fh * 0.3], fill=_shade(g.skin, 0.85))
    if g.style == "long":
        draw.rounded_rectangle([cx - fw * 0.72, g.top - fh * 0.1, cx + fw * 0.72, g.bottom + fh * 0.35],
                               radius=int(fw * 0.4), fill=g.hair)
    for side in (-1, 1):
        ex = cx + side * fw * 0.5
        draw.ellipse([ex - fw * 0.08, cy - fh * 0.08, ex + fw * 0.08, cy + fh * 0.1], fill=_shade(g.skin, 0.93))
    draw.ellipse([cx - fw / 2, g.top, cx + fw / 2, g.bottom], fill=g.skin)


def _draw_beard(draw: ImageDraw.ImageDraw, g: Head, beard: Beard) -> None:
    """Beard or stubble along the jaw, and a mustache."""
    cx, cy, fw, fh = g.cx, g.cy, g.face_w, g.face_h
    colour = g.hair if beard.hair_coloured else _shade(g.skin, 0.7)
    draw.chord([cx - fw / 2, g.top + fh * 0.25, cx + fw / 2, g.bottom + fh * 0.02], 20, 160, fill=colour)
    draw.ellipse([cx - fw * 0.3, cy + fh * 0.08, cx + fw * 0.3, cy + fh * 0.36], fill=g.skin)
    if beard.mustache:
        draw.rectangle([cx - fw * 0.2, cy + fh * 0.14, cx + fw * 0.2, cy + fh * 0.18], fill=colour)


def _draw_hair(draw: ImageDraw.ImageDraw, g: Head) -> None:
    """Hair on top of the head, by style (none when bald)."""
    if g.style == "bald":
        return
    cx, top, fw, fh = g.cx, g.top, g.face_w, g.face_h
    draw.chord([cx - fw * 0.54, top - fh * 0.08, cx + fw * 0.54, top + fh * 0.5], 180, 360, fill=g.hair)
    if g.style == "bangs":
        draw.rectangle([cx - fw * 0.45, top + fh * 0.05, cx + fw * 0.45, top + fh * 0.22], fill=g.hair)
    elif g.style == "side_part":
        draw.polygon([(cx - fw * 0.5, top + fh * 0.28), (cx + fw * 0.1, top + fh * 0.05),
                      (cx - fw * 0.5, top + fh * 0.05)], fill=g.hair)
    elif g.style == "bun":
        r = fw * 0.2
        draw.ellipse([cx - r, top - fh * 0.12 - r, cx + r, top - fh * 0.12 + r], fill=g.hair)


def _draw_eyes(draw: ImageDraw.ImageDraw, young: bool, g: Head, eyes: Eyes) -> None:
    """Eyes with iris and pupil, and brows."""
    brow = _shade(g.hair, 0.8) if young else (120, 115, 110)
    for side, brow_width in zip((-1, 1), eyes.brow_widths, strict=True):
        ex, ey = g.cx + side * eyes.dx, eyes.y
        draw.ellipse([ex - eyes.w / 2, ey - eyes.h / 2, ex + eyes.w / 2, ey + eyes.h / 2], fill=(250, 250, 250))
        r = eyes.h * 0.48
        draw.ellipse([ex - r, ey - r, ex + r, ey + r], fill=eyes.iris)
        draw.ellipse([ex - r / 2, ey - r / 2, ex + r / 2, ey + r / 2], fill=(10, 10, 10))
        by = ey - eyes.brow_lift
        draw.line([ex - side * eyes.w * 0.55, by + eyes.brow_tilt * 0.3, ex + side * eyes.w * 0.6,
                   by - eyes.brow_tilt * 0.3], fill=brow, width=brow_width)


def _draw_wrinkles(draw: ImageDraw.ImageDraw, lines: int, g: Head, eyes: Eyes) -> None:
    """Forehead lines and bags under the eyes (older faces)."""
    s = SUPERSAMPLE
    line = _shade(g.skin, 0.72)
    for k in range(lines):
        y = g.top + g.face_h * (0.2 + 0.05 * k) + g.face_h * 0.04
        draw.arc([g.cx - g.face_w * 0.25, y, g.cx + g.face_w * 0.25, y + g.face_h * 0.06], 200, 340, fill=line,
                 width=s * 2)
    for side in (-1, 1):
        ex = g.cx + side * eyes.dx
        draw.arc([ex - eyes.w / 2, eyes.y, ex + eyes.w / 2, eyes.y + eyes.h * 1.4], 20, 160, fill=line, width=s * 2)


def _draw_nose(draw: ImageDraw.ImageDraw, g: Head, eyes: Eyes, nose: Nose) -> None:
    s = SUPERSAMPLE
    draw.line([g.cx, eyes.y + eyes.h, g.cx - nose.w * 0.3, nose.y], fill=_shade(g.skin, 0.8), width=2 * s)
    draw.arc([g.cx - nose.w, nose.y - nose.w * 0.6, g.cx + nose.w, nose.y + nose.w * 0.5], 20, 160,
             fill=_shade(g.skin, 0.7), width=2 * s)


def _draw_glasses(draw: ImageDraw.ImageDraw, g: Head, eyes: Eyes, glasses: Glasses) -> None:
    """Round or rectangular frames over both eyes, with a bridge and temples."""
    frame, lens, width = glasses.frame, glasses.lens, glasses.width
    shape = draw.ellipse if glasses.round else draw.rectangle
    for side in (-1, 1):
        ex = g.cx + side * eyes.dx
        shape([ex - lens, eyes.y - lens * 0.75, ex + lens, eyes.y + lens * 0.75], outline=frame, width=width)
    draw.line([g.cx - eyes.dx + lens, eyes.y, g.cx + eyes.dx - lens, eyes.y], fill=frame, width=width)
    for side in (-1, 1):
        draw.line([g.cx + side * (eyes.dx + lens), eyes.y, g.cx + side * g.face_w * 0.5, eyes.y - lens * 0.2],
                  fill=frame, width=width)


def landmarks_of(p: FaceParameters) -> Landmarks:
    """The five landmarks (eye centres, nose tip, mouth corners) of a face, in pixels of its 178x218 image."""
    s, g = SUPERSAMPLE, p.head
    points = [(g.cx - p.eyes.dx, p.eyes.y), (g.cx + p.eyes.dx, p.eyes.y), (g.cx, p.nose.y),
              (g.cx - p.mouth.w / 2, p.mouth.y), (g.cx + p.mouth.w / 2, p.mouth.y)]
    return tuple((round(x / s), round(y / s)) for x, y in rotate_points(points, p.angle, p.roll_centre))


def render(p: FaceParameters) -> Image.Image:
    """The face of these parameters as a 178x218 RGB image, centred in the 178x178 square a CelebA-style centre
    crop keeps."""
    w, h = IMAGE_WIDTH * SUPERSAMPLE, IMAGE_HEIGHT * SUPERSAMPLE
    image = _draw_background(p.background, w, h)
    layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    g, attrs = p.head, p.attributes
    _draw_body(draw, g, p.clothes)
    if p.beard is not None:
        _draw_beard(draw, g, p.beard)
    _draw_hair(draw, g)
    _draw_eyes(draw, attrs.young, g, p.eyes)
    if p.wrinkles:
        _draw_wrinkles(draw, p.wrinkles, g, p.eyes)
    _draw_nose(draw, g, p.eyes, p.nose)
    _draw_mouth(draw, g.cx, p.mouth)  # the attribute the product controls
    if p.glasses is not None:
        _draw_glasses(draw, g, p.eyes, p.glasses)
    layer = layer.rotate(p.angle, resample=Image.BICUBIC, center=p.roll_centre)
    image.paste(layer, (0, 0), layer)
    return image.resize((IMAGE_WIDTH, IMAGE_HEIGHT), Image.LANCZOS)


def draw_face(rng: random.Random, attrs: FaceAttributes) -> tuple[Image.Image, Landmarks]:
    """One face as a 178x218 RGB image (:func:`render` of :func:`sample_parameters`) and its five landmarks."""
    parameters = sample_parameters(rng, attrs)
    return render(parameters), landmarks_of(parameters)


def face_parameters(seed: int, index: int) -> FaceParameters:
    """The parameters of face number ``index`` of the dataset with this ``seed`` (deterministic; nothing drawn)."""
    rng = random.Random(f"{seed}:{index}")
    return sample_parameters(rng, sample_attributes(rng))


def with_mouth(p: FaceParameters, smiling: bool, rng: random.Random) -> FaceParameters:
    """Face ``p`` with a mouth drawn for ``smiling`` from ``rng`` (as the dataset draws one for that value) and
    everything else kept, the mouth's position, width, lip colour and thickness included."""
    return replace(p, attributes=replace(p.attributes, smiling=smiling),
                   mouth=_sample_mouth_shape(rng, smiling, p.mouth))


def face(seed: int, index: int) -> tuple[Image.Image, FaceAttributes, Landmarks]:
    """Face number ``index`` of the dataset with this ``seed`` (deterministic), its attributes and landmarks."""
    parameters = face_parameters(seed, index)
    return render(parameters), parameters.attributes, landmarks_of(parameters)
def _write_one(args: tuple[Path, int, int]) -> tuple[FaceAttributes, Landmarks]:
    out, seed, index = args
    image, attrs, landmarks = face(seed, index)
    image.save(out / IMAGE_DIR / file_name(index), quality=JPEG_QUALITY)
    return attrs, landmarks


def file_name(index: int) -> str:
    return f"{index + 1:06d}.jpg"


def attribute_row(attrs: FaceAttributes) -> list[int]:
    """The 40 CelebA values (1 / -1) for one face."""
    given = {"Smiling": attrs.smiling, "Eyeglasses": attrs.eyeglasses, "Male": attrs.male, "Young": attrs.young}
    return [1 if given.get(name, False) else -1 for name in ATTRIBUTE_NAMES]


def split_of(index: int, count: int) -> int:
    """0/1/2 = train/val/test: the first 80% train, the next 10% val, the rest test."""
    if index < math.floor(count * 0.8):
        return 0
    return 1 if index < math.floor(count * 0.9) else 2


def write_dataset(out: str | Path, count: int, seed: int, workers: int = 1) -> Path:
    """Write ``count`` synthetic faces to ``out`` in the CelebA layout; returns ``out``."""
    if count < 1:
        raise ValueError("count must be at least 1")
    out = Path(out)
    (out / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    jobs = [(out, seed, i) for i in range(count)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            faces = list(pool.map(_write_one, jobs, chunksize=64))
    else:
        faces = [_write_one(job) for job in jobs]
    rows = [f"{file_name(i)} " + " ".join(f"{v:2d}" for v in attribute_row(a)) for i, (a, _) in enumerate(faces)]
    (out / ATTR_FILE).write_text(f"{count}\n" + " ".join(ATTRIBUTE_NAMES) + "\n" + "\n".join(rows) + "\n")
    points = [f"{file_name(i)} " + " ".join(f"{v:4d}" for xy in marks for v in xy) for i, (_, marks) in enumerate(faces)]
    (out / LANDMARK_FILE).write_text(f"{count}\n" + " ".join(LANDMARK_NAMES) + "\n" + "\n".join(points) + "\n")
    (out / PARTITION_FILE).write_text("".join(f"{file_name(i)} {split_of(i, count)}\n" for i in range(count)))
    return out
