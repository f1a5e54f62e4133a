"""Blending overlapping chunk outputs reproduces the one-piece result."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from emcore.blend import blend_pieces, blend_weights, crop, cut, piece_box, ramp
from emcore.errors import GeometryError
from emcore.geometry import VoxelBox

BOUNDS = VoxelBox((0, 0, 0), (90, 100, 1))  # x 0:90, y 0:100
CORE = 32
MARGIN = 6


def _cores(bounds: VoxelBox = BOUNDS, size: int = CORE) -> list[VoxelBox]:
    cores = []
    for y in range(bounds.start[1], bounds.stop[1], size):
        for x in range(bounds.start[0], bounds.stop[0], size):
            stop = (min(x + size, bounds.stop[0]), min(y + size, bounds.stop[1]), bounds.stop[2])
            cores.append(VoxelBox((x, y, bounds.start[2]), stop))
    return cores


def _smooth(h: int = 100, w: int = 90) -> np.ndarray:
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.stack((np.sin(xs / 9.0) + 0.01 * ys, np.cos(ys / 7.0) * xs / 50.0))  # (2, Y, X)


def test_ramp_is_symmetric_and_smooth():
    r = ramp(12)
    assert np.allclose(r + r[::-1], 1.0)
    assert 0 < r[0] < 0.05 and 0.95 < r[-1] < 1
    assert np.all(np.diff(r) > 0)


def test_blending_pieces_of_a_known_array_reproduces_it():
    data = _smooth()
    pieces = []
    for core in _cores():
        box = piece_box(core, BOUNDS, MARGIN)
        pieces.append((core, cut(data, BOUNDS, box)))
    whole = blend_pieces(pieces, BOUNDS, BOUNDS, MARGIN)
    np.testing.assert_allclose(whole, data, rtol=0, atol=1e-5)
    # Any sub-region (e.g. one storage chunk straddling core boundaries) as well.
    region = VoxelBox((20, 25, 0), (70, 60, 1))
    part = blend_pieces(pieces, region, BOUNDS, MARGIN)
    np.testing.assert_allclose(part, cut(data, BOUNDS, region), atol=1e-5)


def _blur(image: torch.Tensor) -> torch.Tensor:
    """A 9 x 9 box blur with zeros outside: a computation that needs 4 px of context."""
    return F.conv2d(image, torch.full((1, 1, 9, 9), 1 / 81), padding=4)


@pytest.mark.parametrize("context", [4, 2])
def test_chunked_computation_equals_one_piece_away_from_the_edge(context):
    image = torch.rand(1, 1, 100, 90, generator=torch.Generator().manual_seed(0))
    reference = _blur(image)
    pieces = []
    for core in _cores():
        out_box = piece_box(core, BOUNDS, MARGIN)
        read_box = piece_box(out_box, BOUNDS, context)  # context pad, clipped at the volume edge
        result = _blur(cut(image, BOUNDS, read_box))
        pieces.append((core, cut(result, read_box, out_box)))
    blended = blend_pieces(pieces, BOUNDS, BOUNDS, MARGIN)
    assert isinstance(blended, torch.Tensor)
    error = (blended - reference).abs().max().item()
    if context >= 4:
        assert error < 1e-5
    else:  # too little context: seams differ (the blend only softens them)
        assert error > 1e-3


def test_weights_at_the_volume_edge_and_in_the_middle():
    box, w = blend_weights(VoxelBox((0, 0, 0), (32, 32, 1)), BOUNDS, MARGIN)
    assert box == VoxelBox((0, 0, 0), (38, 38, 1))
    assert w.shape == (38, 38) and w.dtype == np.float32
    assert np.all(w[:26, :26] == 1.0)  # no ramp towards the volume edge, 1 inside
    assert w[-1, -1] < 0.01
    box, w = blend_weights(VoxelBox((32, 32, 0), (64, 64, 1)), BOUNDS, 0)
    assert box == VoxelBox((32, 32, 0), (64, 64, 1)) and np.all(w == 1)


def test_missing_piece_and_bad_geometry_raise():
    data = _smooth()
    pieces = [(core, cut(data, BOUNDS, piece_box(core, BOUNDS, MARGIN))) for core in _cores()]
    with pytest.raises(ValueError, match="total weight 1"):
        blend_pieces(pieces[1:], BOUNDS, BOUNDS, MARGIN)
    with pytest.raises(GeometryError, match="shorter than 2 x blend margin"):
        blend_weights(VoxelBox((32, 32, 0), (40, 64, 1)), BOUNDS, MARGIN)
    with pytest.raises(ValueError, match="must have shape"):
        blend_pieces([(pieces[0][0], pieces[0][1][..., :-1])], BOUNDS, BOUNDS, MARGIN)
    with pytest.raises(GeometryError, match="not inside"):
        blend_pieces(pieces, VoxelBox((80, 0, 0), (100, 10, 1)), BOUNDS, MARGIN)


def test_crop_and_cut():
    data = np.arange(2 * 10 * 12).reshape(2, 10, 12)
    assert crop(data, 2).shape == (2, 6, 8)
    assert crop(data, (1, 3))[0, 0, 0] == data[0, 1, 3]
    with pytest.raises(ValueError, match="nothing would be left"):
        crop(data, 5)
    box = VoxelBox((100, 200, 0), (112, 210, 1))
    inner = VoxelBox((103, 202, 0), (110, 205, 1))
    assert np.array_equal(cut(data, box, inner), data[:, 2:5, 3:10])
    with pytest.raises(GeometryError, match="not inside"):
        cut(data, box, VoxelBox((90, 200, 0), (105, 205, 1)))


def test_blend_margin_is_not_shrunk_by_a_partial_last_chunk():
    from emcore.blend import blend_margin

    # a 260 px region in 128 px chunks: the last chunk is 4 px wide; the seams between the full
    # chunks still blend over pad // 2 px on each side (it was 2 px: visible seams)
    cores = [VoxelBox((x, y, 0), (min(x + 128, 260), min(y + 128, 260), 1))
             for x in (0, 128, 256) for y in (0, 128, 256)]
    assert blend_margin(32, cores) == 16
    assert blend_margin(32, [VoxelBox((0, 0, 0), (20, 20, 1))]) == 10
    # the weights of every core still sum to one with that margin
    bounds = VoxelBox((0, 0, 0), (260, 260, 1))
    total = np.zeros((260, 260))
    for core in cores:
        box, w = blend_weights(core, bounds, 16)
        total[box.start[1] : box.stop[1], box.start[0] : box.stop[0]] += w
    assert np.allclose(total, 1.0, atol=1e-6)
