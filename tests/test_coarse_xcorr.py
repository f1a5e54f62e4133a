"""Classical coarse aligner on real EM (bundled VNC sections at mip 2, 256 px) with known motions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from emcore.coarse_xcorr import (
    UnreliableAlignmentError,
    affine_displacement_field,
    coarse_align,
    compose_matrices,
    estimate_translation,
    invert_matrix,
    masked_ncc,
)
from emcore.errors import BlankSectionError
from emcore.field import compose, warp
from emcore.metrics import field_residual
from emcore.normalize import normalize, section_stats
from emcore.synthetic import affine_field

SIZE = 256


def _affine_matrix(rotation_deg: float, shift: tuple[float, float]) -> torch.Tensor:
    """Displacement matrix of ``emcore.synthetic.affine_field(SIZE, SIZE, ...)``."""
    theta = math.radians(rotation_deg)
    lin = torch.tensor(
        [[math.cos(theta) - 1, -math.sin(theta)], [math.sin(theta), math.cos(theta) - 1]], dtype=torch.float64
    )
    c = torch.full((2,), (SIZE - 1) / 2, dtype=torch.float64)
    return torch.cat((lin, (torch.tensor(shift, dtype=torch.float64) - lin @ c)[:, None]), dim=1)


def _true_field(rotation_deg: float, shift: tuple[float, float]) -> torch.Tensor:
    """The exact alignment field of ``warp(x, affine_field(...))`` back onto ``x`` (affine inverse)."""
    return affine_displacement_field(invert_matrix(_affine_matrix(rotation_deg, shift)), SIZE, SIZE)


def _mip2(section: np.ndarray) -> torch.Tensor:
    """A 1024 px uint8 section -> normalized ``(1, 1, 256, 256)`` float32 at mip 2."""
    small = F.avg_pool2d(torch.from_numpy(section).float()[None, None], 4)[0, 0].numpy()
    stats = section_stats(small)
    return torch.from_numpy(normalize(small, stats.mean, stats.std))[None, None]


@pytest.fixture
def sections(vnc_sections: np.ndarray) -> list[torch.Tensor]:
    return [_mip2(s) for s in vnc_sections[:2]]


@pytest.mark.parametrize("shift", [(40.0, -25.0), (-33.5, 40.0)])
def test_translation_with_missing_regions(sections, shift):
    section = sections[0]
    src = warp(section, affine_field(SIZE, SIZE, translation=shift))
    tgt = section.clone()
    src[..., 100:200, 20:150] = 0  # missing data in the source
    tgt[..., :90, :] = 0  # and a blank band in the target
    est = estimate_translation(src, tgt)
    assert est.reliable, est.reason
    # warp(src, (dx, dy)) == tgt needs (dx, dy) = -shift.
    assert est.dx == pytest.approx(-shift[0], abs=0.1)
    assert est.dy == pytest.approx(-shift[1], abs=0.1)
    assert est.margin > 0.3


def test_masked_defect_does_not_pull_the_peak_to_zero(sections):
    """An identical bright artefact at the same place in both images correlates at 0 shift."""
    section = sections[0]
    src = warp(section, affine_field(SIZE, SIZE, translation=(30.0, 20.0)))
    tgt = section.clone()
    defect = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    defect[60:200, 60:200] = True
    stripes = 8.0 * torch.sign(torch.sin(torch.arange(SIZE, dtype=torch.float32) / 3.0)).expand(SIZE, SIZE)
    for image in (src, tgt):
        image[0, 0][defect] = stripes[defect]
    fooled = estimate_translation(src, tgt)
    assert abs(fooled.dx) < 1 and abs(fooled.dy) < 1  # without masks the artefact wins
    est = estimate_translation(src, tgt, src_mask=defect, tgt_mask=defect)
    assert est.reliable, est.reason
    assert (est.dx, est.dy) == (pytest.approx(-30.0, abs=0.15), pytest.approx(-20.0, abs=0.15))


@pytest.mark.parametrize("rotation, shift", [(5.0, (-40.0, 25.0)), (-5.0, (10.0, 40.0))])
def test_rotation_and_translation_same_section(sections, rotation, shift):
    applied = affine_field(SIZE, SIZE, rotation_deg=rotation, translation=shift)
    src = warp(sections[0], applied)
    result = coarse_align(src, sections[0], model="affine")
    assert result.reliable, result.reason
    true = _true_field(rotation, shift)
    res = field_residual(result.field, true, border=64)
    assert res.p95 < 0.2, res
    assert result.num_inliers >= 20
    if rotation > 0:  # rigid fit of the same motion: as good
        rigid = coarse_align(src, sections[0], model="rigid")
        assert field_residual(rigid.field, true, border=64).p95 < 0.2


def test_rotation_onto_neighbour_section(sections):
    """Neighbouring sections differ in content; the motion is still recovered to ~1 px at mip 2."""
    applied = affine_field(SIZE, SIZE, rotation_deg=4.0, translation=(-30.0, 35.0))
    src = warp(sections[1], applied)
    result = coarse_align(src, sections[0])
    assert result.reliable, result.reason
    assert 0 < result.confidence <= 1
    true = _true_field(4.0, (-30.0, 35.0))
    res = field_residual(result.field, true, border=64)
    assert res.median < 1.0 and res.p95 < 1.5, res
    # The aligned neighbour correlates with the target far better than the unaligned one.
    def corr(a: torch.Tensor, b: torch.Tensor) -> float:
        keep = (a != 0) & (b != 0)
        return float(torch.corrcoef(torch.stack((a[keep], b[keep])))[0, 1])

    assert corr(warp(src, result.field), sections[0]) > corr(src, sections[0]) + 0.2


def test_translation_model_returns_constant_field(sections):
    src = warp(sections[0], affine_field(SIZE, SIZE, translation=(12.25, -7.5)))
    result = coarse_align(src, sections[0], model="translation")
    assert result.reliable
    assert torch.allclose(result.field[:, 0], torch.tensor(-12.25), atol=0.1)
    assert torch.allclose(result.field[:, 1], torch.tensor(7.5), atol=0.1)


def test_blank_section_raises(sections):
    with pytest.raises(BlankSectionError, match="src"):
        estimate_translation(torch.zeros(1, 1, SIZE, SIZE), sections[0])
    with pytest.raises(BlankSectionError, match="tgt"):
        coarse_align(sections[0], torch.full((SIZE, SIZE), 0.5))


def test_unrelated_images_are_flagged_unreliable(sections):
    noise = torch.randn(1, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    result = coarse_align(noise, sections[0])
    assert not result.reliable
    assert result.confidence == 0.0
    assert "peak" in result.reason
    with pytest.raises(UnreliableAlignmentError, match="section 7"):
        result.raise_if_unreliable(7)


def test_bad_input_errors(sections):
    with pytest.raises(ValueError, match="same shape"):
        estimate_translation(sections[0], sections[0][..., :128, :128])
    with pytest.raises(ValueError, match="model must be one of"):
        coarse_align(sections[0], sections[0], model="projective")
    with pytest.raises(ValueError, match="float"):
        estimate_translation(sections[0].to(torch.uint8), sections[0])


def test_masked_ncc_surface_peaks_at_the_shift(sections):
    src = warp(sections[0], affine_field(SIZE, SIZE, translation=(3.0, -2.0)))
    ncc, overlap = masked_ncc(src, sections[0], max_shift=8)
    assert ncc.shape == overlap.shape == (17, 17)
    iy, ix = divmod(int(ncc.argmax()), 17)
    assert (ix - 8, iy - 8) == (-3, 2)


def test_compose_matrices_matches_field_composition():
    f = torch.tensor([[0.01, -0.02, 3.0], [0.015, 0.005, -2.0]], dtype=torch.float64)
    g = torch.tensor([[-0.03, 0.01, -1.0], [0.02, -0.01, 4.0]], dtype=torch.float64)
    ff, gf = affine_displacement_field(f, 64, 64), affine_displacement_field(g, 64, 64)
    expected = compose(ff, gf)
    got = affine_displacement_field(compose_matrices(f, g), 64, 64)
    assert torch.allclose(got[..., 8:-8, 8:-8], expected[..., 8:-8, 8:-8], atol=1e-4)


def test_matrix_helpers_match_the_synthetic_field_and_invert_exactly():
    m = _affine_matrix(5.0, (-40.0, 25.0))
    field = affine_displacement_field(m, SIZE, SIZE)
    expected = affine_field(SIZE, SIZE, rotation_deg=5.0, translation=(-40.0, 25.0))
    assert torch.allclose(field, expected, atol=1e-4)
    inv = invert_matrix(m)
    assert torch.allclose(compose_matrices(inv, m), torch.zeros(2, 3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(compose_matrices(m, inv), torch.zeros(2, 3, dtype=torch.float64), atol=1e-12)


def test_failed_patch_fit_falls_back_to_a_measured_translation_not_a_grid_angle(sections):
    """Cause of the "-2.000 deg" pairs: when the patches did not support the model, the result was
    the global estimate at the best *trial* angle (a grid value). Now it is a translation measured
    without rotation, flagged as such."""
    applied = affine_field(SIZE, SIZE, rotation_deg=1.6, translation=(6.0, -4.0))
    src = warp(sections[0], applied)
    result = coarse_align(src, sections[0], model="rigid", min_inliers=10_000)  # the patches can't agree
    rotation = math.degrees(math.atan2(float(result.matrix[1, 0]), 1 + float(result.matrix[0, 0])))
    assert rotation == 0.0  # before: exactly 2.0, the nearest trial angle
    assert result.reliable and result.reason.startswith("translation only"), result.reason
    assert float(result.matrix[:, 2].norm()) > 3.0  # the shift was measured


def test_peak_at_the_search_limit_is_never_reliable(sections):
    src = warp(sections[0], affine_field(SIZE, SIZE, translation=(14.0, 0.0)))
    est = estimate_translation(src, sections[0], max_shift=12)  # the true shift is just beyond
    assert not est.reliable and "search limit" in est.reason
