"""Procedural synthetic faces written in the official CelebA layout.

``write_dataset(out, count, seed)`` draws ``count`` faces (178x218 JPEGs, like aligned CelebA) and writes
``list_attr_celeba.txt`` (all 40 attribute names; ``Smiling``, ``Eyeglasses``, ``Male`` and ``Young`` vary
independently, every other attribute is -1), ``list_eval_partition.txt`` (80/10/10 train/val/test) and
``list_landmarks_align_celeba.txt`` (eye centres, nose tip and mouth corners in pixels of the 178x218 image).
Face *i* depends only on ``(seed, i)``, so a folder is reproducible whatever the number of processes.
"""

from __future__ import annotations

import math
import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
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

SKIN_TONES = [(255, 224, 196), (241, 194, 160), (224, 172, 130), (198, 134, 96), (161, 102, 68),
              (120, 76, 50), (88, 56, 38), (236, 205, 180)]
HAIR_COLOURS = [(30, 22, 18), (70, 45, 30), (120, 80, 45), (200, 160, 90), (160, 60, 30), (15, 15, 20)]
GREY_HAIR = [(180, 180, 180), (215, 215, 210), (140, 138, 135)]
IRIS_COLOURS = [(60, 40, 25), (40, 90, 140), (70, 110, 60), (100, 70, 40), (30, 30, 30)]
HAIR_STYLES = ("short", "long", "bangs", "side_part", "bald", "bun")


@dataclass(frozen=True)
class FaceAttributes:
    smiling: bool
    eyeglasses: bool
    male: bool
    young: bool


def _jitter(rng: random.Random, colour: tuple[int, int, int], amount: int) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in colour)  # type: ignore[return-value]


def _shade(colour: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(max(0, min(255, int(c * factor))) for c in colour)  # type: ignore[return-value]


def sample_attributes(rng: random.Random) -> FaceAttributes:
    p = ATTRIBUTE_PROBABILITY
    return FaceAttributes(rng.random() < p["Smiling"], rng.random() < p["Eyeglasses"],
                          rng.random() < p["Male"], rng.random() < p["Young"])


def _background(rng: random.Random, w: int, h: int) -> Image.Image:
    """Vertical two-colour gradient with a few soft blobs."""
    top = (rng.randint(40, 230), rng.randint(40, 230), rng.randint(40, 230))
    bottom = _jitter(rng, top, 70)
    column = Image.new("RGB", (1, h))
    for y in range(h):
        a = y / (h - 1)
        column.putpixel((0, y), tuple(int(top[i] * (1 - a) + bottom[i] * a) for i in range(3)))
    image = column.resize((w, h))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(0, 3)):
        cx, cy, r = rng.randint(0, w), rng.randint(0, h), rng.randint(w // 10, w // 3)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=_jitter(rng, top, 40))
    return image.filter(ImageFilter.GaussianBlur(6 * SUPERSAMPLE))


def _draw_mouth(draw: ImageDraw.ImageDraw, rng: random.Random, cx: float, cy: float, width: float,
                smiling: bool, lip: tuple[int, int, int], s: int) -> None:
    """A smile curves up at the corners (closed, or open with teeth); a neutral mouth is flat or turned down."""
    half = width / 2
    thickness = max(2, int(rng.uniform(2.5, 4.0) * s))
    if smiling:
        depth = rng.uniform(0.35, 0.6) * width  # how far the middle sits below the corners
        if rng.random() < 0.5:  # open smile: a half-disc with teeth
            box = [cx - half, cy - depth, cx + half, cy + depth]
            draw.chord(box, 0, 180, fill=(90, 20, 30))
            draw.chord([cx - half * 0.9, cy - depth * 0.95, cx + half * 0.9, cy + depth * 0.45], 0, 180,
                       fill=(245, 245, 240))
            draw.arc(box, 0, 180, fill=lip, width=thickness)
            draw.line([cx - half, cy, cx + half, cy], fill=lip, width=thickness)
        else:  # closed smile: a thick upward-curving arc
            draw.arc([cx - half, cy - depth, cx + half, cy + depth], 10, 170, fill=lip, width=thickness + s)
    else:
        droop = rng.uniform(-0.12, 0.02) * width  # <0: corners turned down
        if droop < -0.05 * width:
            draw.arc([cx - half, cy + droop, cx + half, cy - droop * 1.2], 200, 340, fill=lip, width=thickness)
        else:
            draw.line([cx - half * 0.85, cy, cx + half * 0.85, cy], fill=lip, width=thickness)


Landmarks = tuple[tuple[int, int], ...]  # five (x, y) pixel positions in the order of LANDMARK_NAMES


def _rotate_points(points: list[tuple[float, float]], degrees: float, centre: tuple[float, float]
                   ) -> list[tuple[float, float]]:
    """Where ``points`` land after PIL's ``rotate(degrees, center=centre)`` (counter-clockwise on screen, y down)."""
    a = math.radians(degrees)
    cx, cy = centre
    return [(cx + (x - cx) * math.cos(a) + (y - cy) * math.sin(a), cy - (x - cx) * math.sin(a) + (y - cy) * math.cos(a))
            for x, y in points]


@dataclass(frozen=True)
class Head:
    """Where the head sits on the supersampled canvas and its colours (pixels of the 2x canvas)."""

    cx: float
    cy: float
    face_w: float
    face_h: float
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    style: str

    @property
    def top(self) -> float:
        return self.cy - self.face_h / 2

    @property
    def bottom(self) -> float:
        return self.cy + self.face_h / 2


@dataclass(frozen=True)
class Eyes:
    y: float
    dx: float  # half the distance between the eye centres
    w: float
    h: float


def _head(rng: random.Random, attrs: FaceAttributes, w: int, h: int) -> Head:
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


def _draw_body(draw: ImageDraw.ImageDraw, rng: random.Random, g: Head) -> None:
    """Shoulders, neck, long hair behind the head, ears and the face itself."""
    cx, cy, fw, fh = g.cx, g.cy, g.face_w, g.face_h
    clothes = (rng.randint(20, 230), rng.randint(20, 230), rng.randint(20, 230))
    draw.ellipse([cx - fw * 1.6, g.bottom + fh * 0.15, cx + fw * 1.6, g.bottom + fh * 1.4], fill=clothes)
    draw.rectangle([cx - fw * 0.22, cy, cx + fw * 0.22, g.bottom + fh * 0.3], fill=_shade(g.skin, 0.85))
    if g.style == "long":
        draw.rounded_rectangle([cx - fw * 0.72, g.top - fh * 0.1, cx + fw * 0.72, g.bottom + fh * 0.35],
                               radius=int(fw * 0.4), fill=g.hair)
    for side in (-1, 1):
        ex = cx + side * fw * 0.5
        draw.ellipse([ex - fw * 0.08, cy - fh * 0.08, ex + fw * 0.08, cy + fh * 0.1], fill=_shade(g.skin, 0.93))
    draw.ellipse([cx - fw / 2, g.top, cx + fw / 2, g.bottom], fill=g.skin)


def _draw_beard(draw: ImageDraw.ImageDraw, rng: random.Random, g: Head) -> None:
    """Beard or stubble along the jaw, and a mustache, for most male faces."""
    if rng.random() >= 0.8:
        return
    cx, cy, fw, fh = g.cx, g.cy, g.face_w, g.face_h
    beard = g.hair if rng.random() < 0.6 else _shade(g.skin, 0.7)
    draw.chord([cx - fw / 2, g.top + fh * 0.25, cx + fw / 2, g.bottom + fh * 0.02], 20, 160, fill=beard)
    draw.ellipse([cx - fw * 0.3, cy + fh * 0.08, cx + fw * 0.3, cy + fh * 0.36], fill=g.skin)
    if rng.random() < 0.6:
        draw.rectangle([cx - fw * 0.2, cy + fh * 0.14, cx + fw * 0.2, cy + fh * 0.18], fill=beard)


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


def _draw_eyes(draw: ImageDraw.ImageDraw, rng: random.Random, attrs: FaceAttributes, g: Head) -> Eyes:
    """Eyes with iris and pupil, and brows."""
    s = SUPERSAMPLE
    eyes = Eyes(g.cy - g.face_h * rng.uniform(0.04, 0.1), g.face_w * rng.uniform(0.19, 0.24),
                g.face_w * rng.uniform(0.13, 0.17), g.face_h * rng.uniform(0.045, 0.065))
    iris = rng.choice(IRIS_COLOURS)
    brow_lift, brow_tilt = g.face_h * rng.uniform(0.07, 0.11), rng.uniform(-0.04, 0.06) * g.face_h
    brow = _shade(g.hair, 0.8) if attrs.young else (120, 115, 110)
    for side in (-1, 1):
        ex, ey = g.cx + side * eyes.dx, eyes.y
        draw.ellipse([ex - eyes.w / 2, ey - eyes.h / 2, ex + eyes.w / 2, ey + eyes.h / 2], fill=(250, 250, 250))
        r = eyes.h * 0.48
        draw.ellipse([ex - r, ey - r, ex + r, ey + r], fill=iris)
        draw.ellipse([ex - r / 2, ey - r / 2, ex + r / 2, ey + r / 2], fill=(10, 10, 10))
        by = ey - brow_lift
        draw.line([ex - side * eyes.w * 0.55, by + brow_tilt * 0.3, ex + side * eyes.w * 0.6, by - brow_tilt * 0.3],
                  fill=brow, width=int(rng.uniform(2, 4) * s))
    return eyes


def _draw_wrinkles(draw: ImageDraw.ImageDraw, rng: random.Random, g: Head, eyes: Eyes) -> None:
    """Forehead lines and bags under the eyes (older faces)."""
    s = SUPERSAMPLE
    line = _shade(g.skin, 0.72)
    for k in range(rng.randint(2, 3)):
        y = g.top + g.face_h * (0.2 + 0.05 * k) + g.face_h * 0.04
        draw.arc([g.cx - g.face_w * 0.25, y, g.cx + g.face_w * 0.25, y + g.face_h * 0.06], 200, 340, fill=line,
                 width=s * 2)
    for side in (-1, 1):
        ex = g.cx + side * eyes.dx
        draw.arc([ex - eyes.w / 2, eyes.y, ex + eyes.w / 2, eyes.y + eyes.h * 1.4], 20, 160, fill=line, width=s * 2)


def _draw_nose(draw: ImageDraw.ImageDraw, rng: random.Random, g: Head, eyes: Eyes) -> float:
    """The nose; returns the y of its tip."""
    s = SUPERSAMPLE
    nose_y = g.cy + g.face_h * rng.uniform(0.07, 0.12)
    nose_w = g.face_w * rng.uniform(0.07, 0.11)
    draw.line([g.cx, eyes.y + eyes.h, g.cx - nose_w * 0.3, nose_y], fill=_shade(g.skin, 0.8), width=2 * s)
    draw.arc([g.cx - nose_w, nose_y - nose_w * 0.6, g.cx + nose_w, nose_y + nose_w * 0.5], 20, 160,
             fill=_shade(g.skin, 0.7), width=2 * s)
    return nose_y


def _draw_glasses(draw: ImageDraw.ImageDraw, rng: random.Random, g: Head, eyes: Eyes) -> None:
    """Round or rectangular frames over both eyes, with a bridge and temples."""
    frame = rng.choice([(15, 15, 15), (90, 60, 30), (140, 140, 150), (120, 20, 20)])
    lens = eyes.w * rng.uniform(0.62, 0.75)
    width = int(rng.uniform(2, 3.5) * SUPERSAMPLE)
    shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
    for side in (-1, 1):
        ex = g.cx + side * eyes.dx
        shape([ex - lens, eyes.y - lens * 0.75, ex + lens, eyes.y + lens * 0.75], outline=frame, width=width)
    draw.line([g.cx - eyes.dx + lens, eyes.y, g.cx + eyes.dx - lens, eyes.y], fill=frame, width=width)
    for side in (-1, 1):
        draw.line([g.cx + side * (eyes.dx + lens), eyes.y, g.cx + side * g.face_w * 0.5, eyes.y - lens * 0.2],
                  fill=frame, width=width)


def draw_face(rng: random.Random, attrs: FaceAttributes) -> tuple[Image.Image, Landmarks]:
    """One face as a 178x218 RGB image, centred in the 178x178 square a CelebA-style center crop keeps, and its
    five landmarks (eye centres, nose tip, mouth corners) in that image's pixels."""
    s = SUPERSAMPLE
    w, h = IMAGE_WIDTH * s, IMAGE_HEIGHT * s
    image = _background(rng, w, h)
    layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    g = _head(rng, attrs, w, h)
    _draw_body(draw, rng, g)
    if attrs.male:
        _draw_beard(draw, rng, g)
    _draw_hair(draw, g)
    eyes = _draw_eyes(draw, rng, attrs, g)
    if not attrs.young:
        _draw_wrinkles(draw, rng, g, eyes)
    nose_y = _draw_nose(draw, rng, g, eyes)
    # Mouth: the attribute the product controls.
    lip = _jitter(rng, (150, 60, 60) if not attrs.male else _shade(g.skin, 0.6), 20)
    mouth_y = g.cy + g.face_h * rng.uniform(0.23, 0.27)
    mouth_w = g.face_w * rng.uniform(0.32, 0.42)
    _draw_mouth(draw, rng, g.cx, mouth_y, mouth_w, attrs.smiling, lip, s)
    if attrs.eyeglasses:
        _draw_glasses(draw, rng, g, eyes)

    angle = rng.uniform(-8, 8)  # small head roll
    centre = (g.cx, g.cy + g.face_h * 0.2)
    layer = layer.rotate(angle, resample=Image.BICUBIC, center=centre)
    image.paste(layer, (0, 0), layer)
    points = [(g.cx - eyes.dx, eyes.y), (g.cx + eyes.dx, eyes.y), (g.cx, nose_y),
              (g.cx - mouth_w / 2, mouth_y), (g.cx + mouth_w / 2, mouth_y)]
    landmarks = tuple((round(x / s), round(y / s)) for x, y in _rotate_points(points, angle, centre))
    return image.resize((IMAGE_WIDTH, IMAGE_HEIGHT), Image.LANCZOS), landmarks


def face(seed: int, index: int) -> tuple[Image.Image, FaceAttributes, Landmarks]:
    """Face number ``index`` of the dataset with this ``seed`` (deterministic), its attributes and landmarks."""
    rng = random.Random(f"{seed}:{index}")
    attrs = sample_attributes(rng)
    image, landmarks = draw_face(rng, attrs)
    return image, attrs, landmarks


def _write_one(args: tuple[Path, int, int]) -> tuple[FaceAttributes, Landmarks]:
    out, seed, index = args
    image, attrs, landmarks = face(seed, index)
    image.save(out / IMAGE_DIR / file_name(index), quality=95)
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
