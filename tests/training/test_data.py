"""The CelebA-layout reader and the synthetic-face writer."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from training.config import DataConfig
from training.data.celeba import DatasetError, load_split, read_annotations
from training.data.layout import ATTR_FILE, ATTRIBUTE_NAMES, IMAGE_DIR, PARTITION_FILE
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
