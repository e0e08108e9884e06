"""``python -m training visualize`` on the tiny model: every picture is written and decodes with the right shape."""

from __future__ import annotations

import subprocess
import sys

from PIL import Image

from facegen.model.imaging import GRID_PADDING
from tests.conftest import ROOT


def test_visualize_writes_every_picture(tiny_checkpoints, synth_dir, tmp_path) -> None:
    out = tmp_path / "pictures"
    result = subprocess.run([sys.executable, "-m", "training", "visualize", "--checkpoints", str(tiny_checkpoints),
                             "--data", str(synth_dir), "--out", str(out), "--count", "3", "--steps", "6",
                             "--frames", "4"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    names = {p.name for p in out.iterdir()}
    assert names == {"reconstruction.png", "samples_smiling.png", "samples_not_smiling.png",
                     "denoising_path_smiling.png", "denoising_path_not_smiling.png", "denoising_smiling.gif",
                     "denoising_not_smiling.gif", "latent_pca.png", "latent_tsne.png", "edits_to_smiling.png",
                     "edits_to_not_smiling.png"}
    tile = 64 + GRID_PADDING
    assert Image.open(out / "reconstruction.png").size == (3 * tile + GRID_PADDING, 2 * tile + GRID_PADDING)
    assert Image.open(out / "denoising_path_smiling.png").size == (4 * tile + GRID_PADDING, 3 * tile + GRID_PADDING)
    assert Image.open(out / "denoising_smiling.gif").n_frames == 4
    gallery = Image.open(out / "edits_to_smiling.png")  # input, edit and difference map per face
    assert gallery.size == (3 * tile + GRID_PADDING, 3 * tile + GRID_PADDING)
    difference_column = [gallery.crop((GRID_PADDING + 2 * tile, GRID_PADDING + r * tile,
                                       GRID_PADDING + 2 * tile + 64, GRID_PADDING + r * tile + 64)) for r in range(3)]
    for tile_image in difference_column:
        red, green, blue = tile_image.split()
        assert red.tobytes() == green.tobytes() == blue.tobytes()  # grey
    assert any(max(tile_image.getdata()) > (0, 0, 0) for tile_image in difference_column)  # the edit changed pixels


def test_visualize_sets_a_student_beside_its_model(tiny_student_checkpoints, synth_dir, tmp_path) -> None:
    out = tmp_path / "pictures"
    result = subprocess.run([sys.executable, "-m", "training", "visualize", "--checkpoints",
                             str(tiny_student_checkpoints), "--data", str(synth_dir), "--out", str(out), "--count", "3",
                             "--steps", "6", "--frames", "4"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    tile = 64 + GRID_PADDING
    picture = Image.open(out / "student_vs_default.png")  # the model's row, then the student's at 1, 2 and 4 steps
    assert picture.size == (3 * tile + GRID_PADDING, 4 * tile + GRID_PADDING)
    rows = [picture.crop((0, r * tile, picture.width, (r + 1) * tile)).tobytes() for r in range(4)]
    assert len(set(rows)) == 4  # four samplers, four different rows of the same noise
