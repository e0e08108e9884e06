"""The CelebA-layout reader and the synthetic-face writer."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from facegen.model.config import DataConfig
from training.data.celeba import (
    DatasetError,
    load_landmarks,
    load_split,
    load_split_labels,
    read_annotations,
    read_landmarks,
)
from training.data.layout import (
    ATTR_FILE,
    ATTRIBUTE_NAMES,
    IMAGE_DIR,
    LANDMARK_FILE,
    LANDMARK_NAMES,
    PARTITION_FILE,
)
from training.data.synthetic import VARIED_ATTRIBUTES, write_dataset


def test_synthetic_folder_has_the_official_layout(synth_dir: Path) -> None:
    lines = (synth_dir / ATTR_FILE).read_text().splitlines()
    assert lines[0] == "120"
    assert tuple(lines[1].split()) == ATTRIBUTE_NAMES and len(ATTRIBUTE_NAMES) == 40
    assert len(list((synth_dir / IMAGE_DIR).glob("*.jpg"))) == 120
    splits = [line.split()[1] for line in (synth_dir / PARTITION_FILE).read_text().splitlines()]
    assert splits.count("0") == 96 and splits.count("1") == 12 and splits.count("2") == 12


def test_varied_attributes_vary_and_the_rest_are_minus_one(synth_dir: Path) -> None:
    annotations = read_annotations(synth_dir)
    for index, name in enumerate(annotations.attribute_names):
        column = set(annotations.values[:, index].tolist())
        assert column == ({-1, 1} if name in VARIED_ATTRIBUTES else {-1}), name


def test_synthetic_faces_are_deterministic_for_a_seed(tmp_path: Path) -> None:
    def digest(folder: Path) -> str:
        h = hashlib.sha256()
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                h.update(path.name.encode() + path.read_bytes())
        return h.hexdigest()

    a = write_dataset(tmp_path / "a", 6, seed=11)
    b = write_dataset(tmp_path / "b", 6, seed=11, workers=2)
    c = write_dataset(tmp_path / "c", 6, seed=12)
    assert digest(a) == digest(b)
    assert digest(a) != digest(c)


def test_load_split_crops_resizes_and_labels(synth_dir: Path) -> None:
    images, labels = load_split(synth_dir, "train", DataConfig(attributes=("Smiling", "Male"), image_size=32))
    assert images.shape == (96, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.shape == (96, 2) and set(labels.unique().tolist()) == {0, 1}
    annotations = read_annotations(synth_dir)
    smiling = annotations.attribute_names.index("Smiling")
    assert labels[:, 0].tolist() == [int(v > 0) for v in annotations.values[:96, smiling]]
    config = DataConfig(attributes=("Smiling", "Male"), image_size=32)
    for split, limit in (("train", None), ("test", None), ("train", 10)):
        assert torch.equal(load_split_labels(synth_dir, split, config, limit), load_split(synth_dir, split, config,
                                                                                            limit)[1])


@pytest.fixture()
def copy_of(synth_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "celeba"
    shutil.copytree(synth_dir, target)
    return target


def _rewrite(path: Path, edit) -> None:
    lines = path.read_text().splitlines()
    path.write_text("\n".join(edit(lines)) + "\n")


@pytest.mark.parametrize(("edit", "message"), [
    (lambda lines: lines[:5] + [lines[5].rsplit(" ", 1)[0]] + lines[6:], f"{ATTR_FILE}:6: expected a file name"),
    (lambda lines: lines[:4] + [lines[4].replace(" 1", " 7", 1).replace("-1", " 7", 1)] + lines[5:],
     f"{ATTR_FILE}:5: attribute values must be -1 or 1"),
    (lambda lines: ["121"] + lines[1:], "line 1 announces 121 images but 120 rows follow"),
    (lambda lines: ["many"] + lines[1:], f"{ATTR_FILE}:1: expected the image count"),
])
def test_malformed_attribute_file_names_file_and_line(copy_of: Path, edit, message: str) -> None:
    _rewrite(copy_of / ATTR_FILE, edit)
    with pytest.raises(DatasetError, match=message.replace("(", r"\(")):
        read_annotations(copy_of)


def test_missing_files_are_named(copy_of: Path) -> None:
    (copy_of / PARTITION_FILE).unlink()
    with pytest.raises(DatasetError, match=f"{PARTITION_FILE}: file not found"):
        read_annotations(copy_of)


def test_missing_image_is_named(copy_of: Path) -> None:
    (copy_of / IMAGE_DIR / "000002.jpg").unlink()
    with pytest.raises(DatasetError, match="000002.jpg: image listed"):
        load_split(copy_of, "train", DataConfig())


def test_malformed_partition_line(copy_of: Path) -> None:
    _rewrite(copy_of / PARTITION_FILE, lambda lines: lines[:2] + ["000003.jpg 9"] + lines[3:])
    with pytest.raises(DatasetError, match=f"{PARTITION_FILE}:3:"):
        read_annotations(copy_of)


def test_unknown_attribute_lists_valid_names(synth_dir: Path) -> None:
    with pytest.raises(DatasetError, match="unknown attribute 'Grinning'; valid names: 5_o_Clock_Shadow"):
        load_split(synth_dir, "train", DataConfig(attributes=("Grinning",)))


def test_synthetic_landmarks_sit_on_eyes_nose_and_mouth(synth_dir: Path) -> None:
    lines = (synth_dir / LANDMARK_FILE).read_text().splitlines()
    assert lines[0] == "120" and tuple(lines[1].split()) == LANDMARK_NAMES
    points = read_landmarks(synth_dir)
    assert len(points) == 120
    for xy in points.values():
        left_eye, right_eye, nose, left_mouth, right_mouth = xy
        assert left_eye[0] < nose[0] < right_eye[0] and left_mouth[0] < right_mouth[0]
        assert max(left_eye[1], right_eye[1]) < nose[1] < min(left_mouth[1], right_mouth[1])
        assert (0 <= xy[:, 0]).all() and (xy[:, 0] < 178).all() and (xy[:, 1] < 218).all()


def test_landmarks_follow_the_crop_and_resize_of_the_images(synth_dir: Path) -> None:
    config = DataConfig(image_size=32)
    images, _ = load_split(synth_dir, "test", config)
    landmarks = load_landmarks(synth_dir, "test", config)
    assert landmarks.shape == (len(images), 5, 2)
    raw = read_landmarks(synth_dir)["000109.jpg"]  # the first test image (rows 108.. are the test split)
    expected = (torch.from_numpy(raw) - torch.tensor([0.0, 20.0]) + 0.5) * (32 / 178) - 0.5
    assert torch.allclose(landmarks[0], expected)
    # the irises are dark: at 64x64 the pixel under each eye landmark is darker than the 9x9 patch around it
    images, _ = load_split(synth_dir, "test", DataConfig())
    landmarks = load_landmarks(synth_dir, "test", DataConfig())
    for row in range(len(images)):
        grey = images[row].float().mean(dim=0)
        for x, y in landmarks[row, :2].round().long().tolist():
            assert grey[y, x] < grey[y - 4:y + 5, x - 4:x + 5].mean()


def test_landmarks_are_optional_and_malformed_lines_are_named(copy_of: Path) -> None:
    _rewrite(copy_of / LANDMARK_FILE, lambda lines: lines[:3] + ["000002.jpg 1 2 3"] + lines[4:])
    with pytest.raises(DatasetError, match=f"{LANDMARK_FILE}:4: expected a file name and 10 numbers"):
        load_landmarks(copy_of, "train", DataConfig())
    (copy_of / LANDMARK_FILE).unlink()
    assert load_landmarks(copy_of, "train", DataConfig()) is None
