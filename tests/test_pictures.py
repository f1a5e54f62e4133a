"""Report pictures: shapes, dtypes, contrast, no-data handling and PNG round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from emcore.pictures import (
    checkerboard,
    field_colors,
    red_cyan,
    save_png,
    side_by_side,
    stretch,
    thumbnail,
    xz_reslice,
)
from emcore.synthetic import affine_field


@pytest.fixture
def crops(vnc_sections: np.ndarray) -> np.ndarray:
    return vnc_sections[:, 200:456, 300:556].copy()


def test_stretch_uses_full_range_and_keeps_no_data_black(crops):
    image = crops[0].astype(np.float32) / 255 - 0.5
    image[:50] = 0
    grey = stretch(image)
    assert grey.dtype == np.uint8 and grey.shape == image.shape
    assert np.all(grey[:50] == 0)
    data = grey[50:]
    assert data.min() >= 1 and data.max() == 255 and np.percentile(data, 1) <= 3
    assert np.all(stretch(np.zeros((8, 8))) == 0)
    assert np.all(stretch(np.full((8, 8), 3.0)) == 128)


def test_thumbnail_size_and_contrast(vnc_sections):
    thumb = thumbnail(torch.from_numpy(vnc_sections[0]), size=200)
    assert thumb.shape == (170, 170)  # factor ceil(1024 / 200) = 6, 1024 // 6 blocks
    assert thumb.max() == 255 and thumb.min() >= 1


def test_side_by_side_checkerboard_and_red_cyan(crops):
    a, b = crops[0], crops[1]
    both = side_by_side([a, b[:200]], gap=4, labels=["before", "after"])
    assert both.shape == (256, 516)
    assert np.all(both[:, 256:260] == 255)  # the gap
    assert np.all(both[200:, 260:] == 0)  # shorter panel padded black
    # The label is drawn: white text on a black box in the top-left corner of each panel.
    assert (both[2:16, 2:60] > 200).any() and (both[2:16, 2:60] == 0).any()
    board = checkerboard(a, b, square=32)
    assert np.array_equal(board[:32, :32], stretch(a)[:32, :32])
    assert np.array_equal(board[:32, 32:64], stretch(b)[:32, 32:64])
    overlay = red_cyan(a, b)
    assert overlay.shape == (256, 256, 3)
    assert np.array_equal(overlay[..., 0], stretch(a)) and np.array_equal(overlay[..., 2], stretch(b))
    with pytest.raises(ValueError, match="same shape"):
        checkerboard(a, b[:100])


def test_xz_reslice(crops):
    cut = xz_reslice(crops, 100, z_scale=3)
    assert cut.shape == (12, 256)
    assert np.array_equal(cut[0], cut[2]) and not np.array_equal(cut[2], cut[3])
    with pytest.raises(ValueError, match="outside"):
        xz_reslice(crops, 300)


def test_field_colors_direction_and_magnitude():
    colors = field_colors(torch.tensor([[[[3.0, 0.0, 1.5, -3.0]], [[0.0, 0.0, 0.0, 0.0]]]]))
    assert colors.shape == (1, 4, 3)
    assert tuple(colors[0, 0]) == (255, 0, 0)  # +x, full magnitude: red
    assert tuple(colors[0, 1]) == (0, 0, 0)  # no displacement: black
    assert tuple(colors[0, 2]) == (128, 0, 0)  # half magnitude
    assert tuple(colors[0, 3]) == (0, 255, 255)  # -x: cyan
    rotation = field_colors(affine_field(64, 64, rotation_deg=5.0), max_px=4.0)
    assert len({tuple(c) for c in rotation[::8, ::8].reshape(-1, 3)}) > 20  # directions vary


def test_save_png_round_trip(tmp_path, crops):
    grey = stretch(crops[0])
    path = save_png(tmp_path / "section.png", grey)
    assert np.array_equal(np.asarray(Image.open(path)), grey)
    rgb = red_cyan(crops[0], crops[1])
    assert np.array_equal(np.asarray(Image.open(save_png(tmp_path / "rgb.png", rgb))), rgb)
    with pytest.raises(ValueError, match="uint8"):
        save_png(tmp_path / "bad.png", grey.astype(np.float32))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_png(tmp_path / "missing" / "x.png", grey)
