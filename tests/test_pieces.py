"""Splitting tissue into pieces along defect masks (emcore.pieces)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emcore.pieces import split_pieces
from emcore.synthetic import fold_field


def _image(h: int = 64, w: int = 64) -> np.ndarray:
    return np.random.default_rng(0).uniform(0.5, 1.5, (h, w)).astype(np.float32)


def test_fold_band_splits_section_in_two_largest_first():
    _, mask = fold_field(64, 64, angle_deg=30.0, offset_px=10.0, fold_width_px=4.0)
    pieces = split_pieces(torch.from_numpy(_image()), mask)
    assert pieces.count == 2
    assert pieces.areas[0] >= pieces.areas[1] > 0
    band = mask[0, 0].numpy()
    assert not (pieces.labels[band] > 0).any()
    assert sum(pieces.areas) == int((~band).sum())


def test_diagonal_one_pixel_line_separates_sides():
    bad = np.eye(32, dtype=bool)
    pieces = split_pieces(_image(32, 32), bad, min_area=1)
    assert pieces.count == 2


def test_no_defect_is_one_piece_and_background_is_not_tissue():
    img = _image()
    img[:, :10] = 0
    pieces = split_pieces(img, np.zeros_like(img, dtype=bool))
    assert pieces.count == 1
    assert not (pieces.labels[:, :10] > 0).any()


def test_sliver_merges_into_the_piece_it_touches_most_through_the_defect():
    img = _image()
    bad = np.zeros((64, 64), dtype=bool)
    bad[:, 30:32] = True  # splits left / right
    bad[5:8, 40:50] = True  # a box cuts a small sliver out of the right piece ...
    bad[5:20, 40:43] = True
    bad[5:20, 47:50] = True
    bad[17:20, 40:50] = True  # ... the sliver is rows 8..16, cols 43..46
    pieces = split_pieces(img, bad, min_area=100)
    assert pieces.count == 2
    assert len(pieces.merged) == 1
    area, label = pieces.merged[0]
    assert area == 9 * 4
    assert pieces.labels[10, 44] == label == pieces.labels[30, 60]  # joined the right piece


def test_isolated_sliver_is_dropped():
    img = np.zeros((64, 64), dtype=np.float32)
    img[:, :40] = 1.0 + _image()[:, :40]
    img[30:33, 60:63] = 1.0  # an island of tissue, no defect next to it
    pieces = split_pieces(img, np.zeros((64, 64), dtype=bool), min_area=50)
    assert pieces.count == 1
    assert pieces.dropped == [9]
    assert pieces.labels[31, 61] == 0


def test_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="defects"):
        split_pieces(_image(), np.zeros((8, 8), dtype=bool))
    with pytest.raises(ValueError, match="image must have shape"):
        split_pieces(np.zeros((2, 3, 4)), np.zeros((2, 3, 4)))
