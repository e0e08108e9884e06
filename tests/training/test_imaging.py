"""PNG grids and GIF animations, checked by decoding the files."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from facegen.model.imaging import FINAL_FRAME_HOLD, GRID_PADDING, gif_bytes, grid_image, grid_shape, png_bytes


@pytest.mark.parametrize(("count", "shape"), [(1, (1, 1)), (2, (1, 2)), (3, (2, 2)), (4, (2, 2)), (5, (2, 3)),
                                              (16, (4, 4)), (17, (4, 5)), (64, (8, 8))])
def test_grid_shape_is_near_square_without_empty_rows(count: int, shape: tuple[int, int]) -> None:
    rows, cols = grid_shape(count)
    assert (rows, cols) == shape and (rows - 1) * cols < count <= rows * cols


def test_png_grid_places_every_tile() -> None:
    tiles = torch.stack([torch.full((3, 8, 6), 10 * (k + 1), dtype=torch.uint8) for k in range(5)])
    image = Image.open(io.BytesIO(png_bytes(grid_image(tiles))))
    assert image.format == "PNG" and image.size == (3 * (6 + GRID_PADDING) + GRID_PADDING, 2 * (8 + GRID_PADDING) + GRID_PADDING)
    pixels = image.convert("RGB").load()
    for k in range(5):
        r, c = divmod(k, 3)
        x, y = GRID_PADDING + c * (6 + GRID_PADDING), GRID_PADDING + r * (8 + GRID_PADDING)
        assert pixels[x + 2, y + 3] == (10 * (k + 1),) * 3
    assert pixels[0, 0] == (255, 255, 255)  # padding


def test_gif_has_every_frame_in_order_loops_and_holds_the_last() -> None:
    frames = [torch.full((2, 3, 8, 8), 40 * k, dtype=torch.uint8) for k in range(5)]
    gif = Image.open(io.BytesIO(gif_bytes(frames, fps=10)))
    assert gif.format == "GIF" and gif.n_frames == 5 and gif.info.get("loop") == 0
    values, durations = [], []
    for index in range(gif.n_frames):
        gif.seek(index)
        values.append(gif.convert("RGB").getpixel((GRID_PADDING + 1, GRID_PADDING + 1))[0])
        durations.append(gif.info["duration"])
    assert values == [0, 40, 80, 120, 160]
    assert durations[:-1] == [100] * 4 and durations[-1] == 100 * FINAL_FRAME_HOLD
