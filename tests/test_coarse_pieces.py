"""Coarse alignment that tears (emcore.coarse_pieces) on real EM (bundled VNC, mip 2, 256 px) with a
synthetic fold whose far side slid 60 px along the fold line (emcore.synthetic.torn_fold_field)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from emcore.bundled import load_vnc_sections
from emcore.coarse_pieces import coarse_align_pieces
from emcore.field import warp
from emcore.normalize import normalize, section_stats
from emcore.synthetic import torn_fold_field

SIZE = 256
ANGLE = 30.0
OFFSET = 25.0
WIDTH = 6.0
SLIDE = 60.0


def _mip2(section: np.ndarray) -> torch.Tensor:
    small = F.avg_pool2d(torch.from_numpy(section).float()[None, None], 4)[0, 0].numpy()
    stats = section_stats(small)
    return torch.from_numpy(normalize(small, stats.mean, stats.std))[None, None]


def _far_side(offset: float = OFFSET) -> np.ndarray:
    """(H, W) bool, registered frame: the side of the line that slid."""
    nx, ny = math.cos(math.radians(ANGLE)), math.sin(math.radians(ANGLE))
    c = (SIZE - 1) / 2.0
    ys, xs = np.meshgrid(np.arange(SIZE) - c, np.arange(SIZE) - c, indexing="ij")
    return xs * nx + ys * ny - offset >= 0


def _side_errors(field: torch.Tensor, truth: torch.Tensor, far: np.ndarray, margin: int = 4) -> dict:
    """Median |field - truth| px per side, away from the line and where the truth reads data."""
    edge = ndimage.binary_dilation(far, iterations=margin) & ndimage.binary_dilation(~far, iterations=margin)
    reads_data = warp(torch.ones(1, 1, SIZE, SIZE), truth)[0, 0].numpy() > 0.999
    err = (field - truth)[0].norm(dim=0).numpy()
    sides = (("near", ~far), ("far", far))
    return {name: float(np.median(err[side & ~edge & reads_data])) for name, side in sides}


@pytest.fixture(scope="module")
def registered(pair_sections: np.ndarray) -> torch.Tensor:
    return _mip2(pair_sections[1])


@pytest.fixture(scope="module")
def pair_sections() -> np.ndarray:
    """Bundled sections 2 and 3 (module scope, unlike conftest's per-test ``vnc_sections``)."""
    return load_vnc_sections([2, 3])


@pytest.fixture(scope="module")
def torn(registered):
    applied, mask, truth = torn_fold_field(SIZE, SIZE, angle_deg=ANGLE, offset_px=OFFSET, fold_width_px=WIDTH,
                                           slide_px=SLIDE)  # fmt: skip
    return warp(registered, applied), mask[0, 0], truth


@pytest.fixture(scope="module")
def source_result(registered, torn):
    source, mask, _ = torn
    return coarse_align_pieces(source, registered, mask)


def test_source_fold_both_sides_recovered_where_one_rigid_fit_is_not(source_result, torn):
    result, truth = source_result, torn[2]
    assert result.side == "source" and result.pieces.count == 2
    assert result.reliable and all(t.reliable and not t.fallback for t in result.transforms), result.reason
    far = _far_side()
    pieces = _side_errors(result.field, truth, far)
    whole = _side_errors(result.whole.field, truth, far)
    assert pieces["near"] < 0.1 and pieces["far"] < 0.1, pieces
    assert whole["far"] > 40, whole  # one rigid model follows one side only
    # The largest piece (near side) gives the matrix the single affine should follow.
    assert torch.allclose(result.matrix, result.transforms[0].matrix)
    assert abs(float(result.matrix[0, 2])) < 0.5 and abs(float(result.matrix[1, 2])) < 0.5


def test_field_is_piecewise_rigid_off_the_seam(source_result):
    result = source_result
    field = result.field[0].double()
    jxx = 1 + (field[0, 1:-1, 2:] - field[0, 1:-1, :-2]) / 2
    jxy = (field[0, 2:, 1:-1] - field[0, :-2, 1:-1]) / 2
    jyx = (field[1, 1:-1, 2:] - field[1, 1:-1, :-2]) / 2
    jyy = 1 + (field[1, 2:, 1:-1] - field[1, :-2, 1:-1]) / 2
    det = (jxx * jyy - jxy * jyx).numpy()
    off_seam = ~result.seam[1:-1, 1:-1]
    assert result.seam.any() and off_seam.mean() > 0.9
    assert np.abs(det[off_seam] - 1).max() < 0.05
    # Nothing reads the other side's tissue: every assigned pixel reads its own piece.
    assert result.gap_conflicts == 0


def test_neighbour_pair_far_side_within_a_few_px(pair_sections, torn):
    """Real neighbouring sections (z=2 target, z=3 torn source): their own small misalignment stays."""
    _, mask, truth = torn
    applied = -truth  # piecewise constant: the applied field is minus the truth pixel by pixel
    source = warp(_mip2(pair_sections[1]), applied)
    result = coarse_align_pieces(source, _mip2(pair_sections[0]), mask)
    errors = _side_errors(result.field, truth, _far_side())
    assert errors["near"] < 2.0 and errors["far"] < 2.0, errors


def test_target_fold_tears_along_the_target_mask(registered, torn):
    deformed, mask, truth = torn
    # Swap roles: align the registered section onto the folded one; the pieces are the target's.
    result = coarse_align_pieces(registered, deformed, None, mask)
    assert result.side == "target" and result.pieces.count == 2
    applied = -truth
    near = ~_far_side()
    far = _far_side(OFFSET + WIDTH)
    err = (result.field - applied)[0].norm(dim=0).numpy()
    reads = warp(torch.ones(1, 1, SIZE, SIZE), applied)[0, 0].numpy() > 0.999
    for side in (near, far):
        inner = ndimage.binary_erosion(side, iterations=3) & reads
        assert np.median(err[inner]) < 0.1


def test_small_piece_falls_back_to_whole_section(registered):
    applied, mask, _ = torn_fold_field(SIZE, SIZE, angle_deg=0.0, offset_px=100.0, fold_width_px=WIDTH,
                                       slide_px=20.0)  # fmt: skip
    source = warp(registered, applied)
    result = coarse_align_pieces(source, registered, mask[0, 0], min_piece_fraction=0.2)
    assert result.pieces.count == 2
    small = result.transforms[1]
    assert small.fallback and small.estimated is None and "below" in small.reason
    assert torch.equal(small.matrix, result.whole.matrix)
    assert "piece 2" in result.reason


def test_no_split_is_the_whole_section_estimate(registered):
    result = coarse_align_pieces(registered, registered)
    assert result.pieces.count == 1 and not result.seam.any()
    assert torch.allclose(result.field, result.whole.field)


def test_compose_residual_keeps_the_tear_exact(source_result):
    result = source_result
    assert torch.allclose(result.compose_residual(torch.zeros_like(result.field)), result.field)
    shift = torch.zeros_like(result.field)
    shift[:, 0] = 2.0  # read 2 px to the right: the piece there, its affine at q = p + (2, 0)
    composed = result.compose_residual(shift)
    inner = ~ndimage.binary_dilation(result.seam, iterations=3)
    inner[:, -3:] = False
    expected = 2.0 + torch.roll(result.field, -2, dims=3)
    assert torch.allclose(composed[0, 0][torch.from_numpy(inner)], expected[0, 0][torch.from_numpy(inner)],
                          atol=1e-3)  # fmt: skip


def test_finetune_after_pieces_recovers_both_sides(registered, torn, source_result):
    """Target elastically deformed (2 px) as well: the finetuner on the source seen through the torn
    field gets both sides to the target of 0.5 px (worst side median)."""
    from emcore.field import compose
    from emcore.finetune import finetune
    from emcore.synthetic import smooth_field

    source, mask, truth_torn = torn
    smooth = smooth_field(SIZE, SIZE, 2.0, seed=0)
    target = warp(registered, smooth)
    truth = compose(smooth, truth_torn)
    coarse = coarse_align_pieces(source, target, mask)
    result = finetune(warp(source, coarse.field), target, src_defects=coarse.tear_mask(mask), max_motion=8.0)
    field = coarse.compose_residual(result.field)
    far = warp(torch.from_numpy(_far_side()).float()[None, None], smooth)[0, 0].numpy() >= 0.5
    errors = _side_errors(field, truth, far)
    assert max(errors.values()) <= 0.5, errors
    assert _side_errors(coarse.field, truth, far)["far"] > max(errors.values())  # the finetuner helped


@pytest.mark.parametrize(("kind", "seed"), [("fold", 1), ("crack", 2)])
def test_realistic_defect_both_sides_after_finetune(kind, seed):
    """emcore.synthetic_defects (curved tear, side B moved ~100 px by rigid + smooth motion, band
    or gap 5-40 px) on bundled section 3 (512 px, mip 0): pieces + finetune reach 0.5 px on the
    worst side, where one rigid fit leaves one side ~100 px off."""
    from emcore.finetune import finetune
    from emcore.synthetic_defects import DefectSettings, make_defect

    raw = load_vnc_sections([3], crop=(slice(256, 768), slice(256, 768))).astype(np.float32)[None]
    stats = section_stats(raw)
    clean = torch.from_numpy(normalize(raw, stats.mean, stats.std))
    settings = DefectSettings(kind=kind, displacement_px=(60.0, 175.0))
    defect = make_defect(clean, torch.Generator().manual_seed(seed), settings)
    assert float(defect.displacements[0].max()) > 60
    coarse = coarse_align_pieces(defect.image, clean, defect.mask[0, 0])
    assert coarse.pieces.count == 2 and not any(t.fallback for t in coarse.transforms), coarse.reason
    moved = warp(defect.image, coarse.field)
    result = finetune(moved, clean, src_defects=coarse.tear_mask(defect.mask[0, 0]), max_motion=8.0)
    field = coarse.compose_residual(result.field)
    valid = defect.valid[0, 0].numpy()
    side_a = (defect.field[0].abs().sum(0) == 0).numpy()

    def medians(f: torch.Tensor) -> list[float]:
        err = (f - defect.field)[0].norm(dim=0).numpy()
        return [float(np.median(err[valid & s])) for s in (side_a, ~side_a)]

    assert max(medians(coarse.field)) < 3.0
    assert max(medians(field)) <= 0.5, medians(field)
    assert max(medians(coarse.whole.field)) > 50
