"""Per-section normalization over tissue on real EM, and blank-section errors."""

from __future__ import annotations

import numpy as np
import pytest

from emcore.errors import BlankSectionError
from emcore.normalize import TISSUE_FLOOR, normalize, section_stats
from emcore.pyramid import downsample_image


def _masked_section(vnc_sections):
    image = vnc_sections[0, :256, :256].copy()
    image[:, :40] = 0  # no-data margin
    mask = np.zeros_like(image)
    mask[100:140, 60:200] = 1  # a "fold"
    return image, mask


def test_stats_match_numpy_over_tissue(vnc_sections):
    image, mask = _masked_section(vnc_sections)
    stats = section_stats(image, mask, section=0)
    tissue = image[(image != 0) & (mask == 0)].astype(np.float64)
    assert stats.count == tissue.size > 0
    assert stats.mean == pytest.approx(tissue.mean(), rel=1e-12)
    assert stats.std == pytest.approx(tissue.std(), rel=1e-12)
    # the masked region and the margin change the result: they are really excluded
    assert abs(section_stats(image, None).mean - stats.mean) > 1e-3


def test_normalize_against_numpy_and_zero_stays_zero(vnc_sections):
    image, mask = _masked_section(vnc_sections)
    stats = section_stats(image, mask, section=0)
    out = normalize(image, stats.mean, stats.std, mask)
    assert out.dtype == np.float32
    tissue = (image != 0) & (mask == 0)
    expected = (image.astype(np.float64) - stats.mean) / stats.std
    np.testing.assert_allclose(out[tissue], expected[tissue], rtol=1e-6, atol=1e-6)
    assert (out[~tissue] == 0).all()
    assert (out[tissue] != 0).all()
    assert abs(out[tissue].mean()) < 1e-5 and out[tissue].std() == pytest.approx(1.0, rel=1e-5)


def test_tissue_that_lands_on_zero_is_nudged():
    image = np.array([[0, 10, 20, 30]], np.uint8)
    out = normalize(image, 20.0, 10.0)
    np.testing.assert_array_equal(out, np.array([[0, -1, TISSUE_FLOOR, 1]], np.float32))


def test_stats_from_a_coarser_mip_are_close_and_apply_to_mip0(vnc_sections):
    image = vnc_sections[1]
    fine = section_stats(image, section=1)
    coarse = section_stats(downsample_image(downsample_image(image[None, None]))[0, 0], section=1)
    assert coarse.mean == pytest.approx(fine.mean, rel=0.01)
    assert coarse.std < fine.std  # averaging 4x4 blocks removes fine texture
    out = normalize(image, coarse.mean, coarse.std)
    assert out.shape == image.shape and ((out != 0) == (image != 0)).all()


def test_blank_and_constant_sections_name_the_section():
    with pytest.raises(BlankSectionError, match="section 7: no tissue") as err:
        section_stats(np.zeros((16, 16), np.uint8), section=7)
    assert err.value.section == 7
    everything_masked = np.ones((16, 16), np.uint8)
    with pytest.raises(BlankSectionError, match="section z=3: no tissue"):
        section_stats(np.full((16, 16), 9, np.uint8), everything_masked, section="z=3")
    with pytest.raises(BlankSectionError, match="constant intensity"):
        section_stats(np.full((16, 16), 9, np.uint8), section=2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="positive std"):
        normalize(np.ones((2, 2)), 0.0, 0.0)
    with pytest.raises(ValueError, match="does not match"):
        section_stats(np.ones((4, 4)), np.ones((3, 3)))
