"""Packing of a level's parameters (control grid + detail near defects) and the defect neighbourhood."""

from __future__ import annotations

import pytest
import torch

from emcore.finetune.parameters import FieldParameters, defect_neighbourhood
from emcore.synthetic import affine_field, smooth_field


def test_grid_only_packs_and_expands_an_affine_field() -> None:
    field = affine_field(64, 64, rotation_deg=3.0, scale=1.02, translation=(2.0, -1.0))
    params = FieldParameters((1, 2, 64, 64), grid_mip=3)
    packed = params.pack(field)
    assert packed.shape == (1, 2 * 8 * 8)
    assert params.grid(packed).shape == (1, 2, 8, 8)
    inner = (..., slice(4, -4), slice(4, -4))  # bilinear upsampling extrapolates flat at the edges
    assert torch.allclose(params.expand(packed)[inner], field[inner], atol=1e-4)


def test_detail_reproduces_the_field_where_the_mask_is_set_only() -> None:
    field = smooth_field(64, 64, 3.0, grid=8, seed=2)  # varies faster than an 8 px grid can follow
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :, :8] = 1  # detail on the left half (4 px cells)
    grid_only = FieldParameters((1, 2, 64, 64), grid_mip=3)
    with_detail = FieldParameters((1, 2, 64, 64), grid_mip=3, detail_mask=mask, detail_mip=2)
    packed = with_detail.pack(field)
    assert packed.shape == (1, 2 * 8 * 8 + 2 * 16 * 16)
    smooth, detailed = grid_only.expand(grid_only.pack(field)), with_detail.expand(packed)
    left, right = (..., slice(4, -4), slice(4, 24)), (..., slice(4, -4), slice(40, -4))
    assert (detailed - field)[left].abs().mean() < 0.5 * (smooth - field)[left].abs().mean()
    assert torch.equal(detailed[right], smooth[right])


def test_bad_detail_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="detail_mip must be an int"):
        FieldParameters((1, 2, 64, 64), grid_mip=2, detail_mask=torch.ones(1, 1, 16, 16), detail_mip=2)
    with pytest.raises(ValueError, match="detail_mask must be"):
        FieldParameters((1, 2, 64, 64), grid_mip=3, detail_mask=torch.ones(1, 1, 8, 8), detail_mip=2)


def test_defect_neighbourhood_covers_defects_of_both_frames_within_the_radius() -> None:
    tgt = torch.zeros(1, 1, 64, 64, dtype=torch.bool)
    tgt[..., 10, 10] = True
    src = torch.zeros(1, 1, 64, 64, dtype=torch.bool)
    src[..., 40, 40] = True
    shift = torch.zeros(1, 2, 64, 64)
    shift[:, 0] = 8.0  # target pixel (x, y) reads source (x + 8, y): the source defect lands at x = 32
    cells = defect_neighbourhood(src, tgt, shift, mip=2, radius=1)
    assert cells.shape == (1, 1, 16, 16)
    set_cells = {(int(y), int(x)) for y, x in torch.nonzero(cells[0, 0])}
    centres = ((2, 2), (10, 8))  # cells of the target defect (10, 10) and of the pulled source one (40, 32)
    around = {(cy + dy, cx + dx) for cy, cx in centres for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
    assert set_cells == around
    assert float(defect_neighbourhood(None, None, shift, mip=2, radius=3).sum()) == 0.0
