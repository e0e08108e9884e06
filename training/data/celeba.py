"""Reader for CelebA in its official local layout (real CelebA or the synthetic faces).

``load_split(root, split, config)`` returns images ``uint8 [N, 3, S, S]`` (center crop, then resize) and binary
labels ``int64 [N, A]`` (1 = attribute present, 0 = absent) for the attributes named in the config;
``load_landmarks`` the five facial landmarks of the same images in the same pixels, when the folder has the
optional landmark file. Every problem raises :class:`DatasetError` naming the file and line; nothing is skipped
silently.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from facegen.model.config import DataConfig
from facegen.model.imaging import IMAGE_HEIGHT, IMAGE_WIDTH, center_crop_resize
from training.data.layout import ATTR_FILE, IMAGE_DIR, LANDMARK_FILE, LANDMARK_NAMES, PARTITION_FILE, SPLITS


class DatasetError(ValueError):
    """A CelebA-layout folder is missing a file or holds a malformed one."""


@dataclass(frozen=True)
class Annotations:
    files: list[str]
    attribute_names: list[str]
    values: np.ndarray  # int8 [N, 40] of -1 / 1
    partition: dict[str, int]


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"{path}: file not found (expected the official CelebA layout)")
    return path.read_text().splitlines()


def _attribute_row(line: str, width: int, where: str) -> list[int]:
    """The ``width`` values (-1 / 1) after the file name of one ``list_attr_celeba.txt`` row."""
    fields = line.split()
    if len(fields) != width + 1:
        raise DatasetError(f"{where}: expected a file name and {width} values, got {len(fields)} fields")
    try:
        row = [int(v) for v in fields[1:]]
    except ValueError:
        raise DatasetError(f"{where}: attribute values must be -1 or 1") from None
    if any(v not in (-1, 1) for v in row):
        raise DatasetError(f"{where}: attribute values must be -1 or 1")
    return row


def read_annotations(root: str | Path) -> Annotations:
    """Parse ``list_attr_celeba.txt`` and ``list_eval_partition.txt`` under ``root``."""
    root = Path(root)
    attr_path = root / ATTR_FILE
    lines = _read_lines(attr_path)
    if len(lines) < 2:
        raise DatasetError(f"{attr_path}: expected an image count on line 1 and attribute names on line 2")
    try:
        count = int(lines[0].strip())
    except ValueError:
        raise DatasetError(f"{attr_path}:1: expected the image count, got {lines[0]!r}") from None
    names = lines[1].split()
    if not names:
        raise DatasetError(f"{attr_path}:2: no attribute names")
    rows = [(number, line) for number, line in enumerate(lines[2:], start=3) if line.strip()]
    if len(rows) != count:
        raise DatasetError(f"{attr_path}: line 1 announces {count} images but {len(rows)} rows follow")
    files: list[str] = []
    values = np.empty((count, len(names)), dtype=np.int8)
    for i, (number, line) in enumerate(rows):
        files.append(line.split()[0])
        values[i] = _attribute_row(line, len(names), f"{attr_path}:{number}")

    part_path = root / PARTITION_FILE
    partition: dict[str, int] = {}
    for number, line in enumerate(_read_lines(part_path), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise DatasetError(f"{part_path}:{number}: expected '<file> 0|1|2', got {line!r}")
        partition[fields[0]] = int(fields[1])
    missing = [f for f in files if f not in partition]
    if missing:
        raise DatasetError(f"{part_path}: no split for {len(missing)} images, first {missing[0]!r}")
    return Annotations(files, names, values, partition)


def attribute_columns(annotations: Annotations, wanted: tuple[str, ...]) -> list[int]:
    """Column index of each wanted attribute; unknown names raise listing the valid ones."""
    columns = []
    for name in wanted:
        if name not in annotations.attribute_names:
            raise DatasetError(f"unknown attribute {name!r}; valid names: {', '.join(annotations.attribute_names)}")
        columns.append(annotations.attribute_names.index(name))
    return columns


def load_image(path: Path, config: DataConfig) -> np.ndarray:
    """One image as ``uint8 [3, S, S]``: center crop ``config.crop`` pixels, resize to ``config.image_size``."""
    if not path.is_file():
        raise DatasetError(f"{path}: image listed in {ATTR_FILE} is missing")
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            w, h = image.size
            if min(w, h) < config.crop:
                raise DatasetError(f"{path}: image is {w}x{h}, smaller than the {config.crop}px crop")
            return center_crop_resize(image, config.crop, config.image_size)
    except OSError as exc:
        raise DatasetError(f"{path}: cannot decode image ({exc})") from None


def split_indices(root: Path, annotations: Annotations, split: str, limit: int | None) -> list[int]:
    """Row numbers of ``annotations`` in one split ("train", "val", "test"), the first ``limit`` of them."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}")
    indices = [i for i, f in enumerate(annotations.files) if annotations.partition[f] == SPLITS[split]]
    if limit is not None:
        indices = indices[:limit]
    if not indices:
        raise DatasetError(f"{root / PARTITION_FILE}: the {split!r} split is empty")
    return indices


def load_split(root: str | Path, split: str, config: DataConfig, limit: int | None = None,
               threads: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``uint8 [N, 3, S, S]`` and labels ``int64 [N, A]`` in {0, 1} of one split ("train", "val", "test")."""
    root = Path(root)
    annotations = read_annotations(root)
    indices = split_indices(root, annotations, split, limit)
    paths = [root / IMAGE_DIR / annotations.files[i] for i in indices]
    with ThreadPoolExecutor(threads) as pool:
        images = list(pool.map(lambda p: load_image(p, config), paths))
    return torch.from_numpy(np.stack(images)), _labels(annotations, indices, config)


def load_split_labels(root: str | Path, split: str, config: DataConfig, limit: int | None = None) -> torch.Tensor:
    """The labels of :func:`load_split` alone, ``int64 [N, A]``, without decoding an image."""
    annotations = read_annotations(root)
    return _labels(annotations, split_indices(Path(root), annotations, split, limit), config)


def _labels(annotations: Annotations, indices: list[int], config: DataConfig) -> torch.Tensor:
    columns = attribute_columns(annotations, config.attributes)
    return torch.from_numpy((annotations.values[indices][:, columns] > 0).astype(np.int64))


def read_landmarks(root: str | Path) -> dict[str, np.ndarray] | None:
    """``list_landmarks_align_celeba.txt`` as ``{file: float32 [5, 2]}`` (x, y in the 178x218 aligned image:
    left eye, right eye, nose, left and right mouth corner), or None when the folder has no landmark file."""
    path = Path(root) / LANDMARK_FILE
    if not path.is_file():
        return None
    lines = path.read_text().splitlines()
    if len(lines) < 2 or tuple(lines[1].split()) != LANDMARK_NAMES:
        raise DatasetError(f"{path}:2: expected the column names {' '.join(LANDMARK_NAMES)}")
    points: dict[str, np.ndarray] = {}
    for number, line in enumerate(lines[2:], start=3):
        fields = line.split()
        if not fields:
            continue
        try:
            if len(fields) != 1 + len(LANDMARK_NAMES):
                raise ValueError
            xy = np.array([float(v) for v in fields[1:]], dtype=np.float32).reshape(5, 2)
        except ValueError:
            raise DatasetError(f"{path}:{number}: expected a file name and {len(LANDMARK_NAMES)} numbers") from None
        points[fields[0]] = xy
    return points


def load_landmarks(root: str | Path, split: str, config: DataConfig, limit: int | None = None
                   ) -> torch.Tensor | None:
    """Landmarks ``float32 [N, 5, 2]`` (x, y in pixels of the ``S x S`` images ``load_split`` returns, same rows),
    or None when the folder has no landmark file (it is optional in the layout)."""
    root = Path(root)
    points = read_landmarks(root)
    if points is None:
        return None
    annotations = read_annotations(root)
    files = [annotations.files[i] for i in split_indices(root, annotations, split, limit)]
    missing = [f for f in files if f not in points]
    if missing:
        raise DatasetError(f"{root / LANDMARK_FILE}: no landmarks for {len(missing)} images, first {missing[0]!r}")
    xy = torch.from_numpy(np.stack([points[f] for f in files]))
    # the same center crop and resize as load_image (images are IMAGE_WIDTH x IMAGE_HEIGHT in the layout);
    # pixel i spans [i, i + 1), so centres map as (i + 0.5) * scale - 0.5
    offset = torch.tensor([(IMAGE_WIDTH - config.crop) // 2, (IMAGE_HEIGHT - config.crop) // 2], dtype=torch.float32)
    return (xy - offset + 0.5) * (config.image_size / config.crop) - 0.5


def fingerprint(root: str | Path) -> str:
    """sha256 over the two annotation files and every image's name and size (cheap, changes with the data)."""
    root = Path(root)
    digest = hashlib.sha256()
    for name in (ATTR_FILE, PARTITION_FILE):
        digest.update((root / name).read_bytes())
    for path in sorted((root / IMAGE_DIR).iterdir()):
        digest.update(f"{path.name}:{path.stat().st_size};".encode())
    return digest.hexdigest()

