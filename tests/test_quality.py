"""Tiled neighbour correlation on real EM: rises with alignment, ignores no-data and masked pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emcore.quality import neighbour_correlation, tile_correlation


@pytest.fixture
def crops(vnc_sections: np.ndarray) -> np.ndarray:
    """Sections 0-3 at mip 2 (256 x 256 px, 4x4 means), uint8 with tissue >= 1 (0 = no data)."""
    small = vnc_sections.reshape(4, 256, 4, 256, 4).mean(axis=(2, 4))
    return np.clip(np.round(small), 1, 255).astype(np.uint8)


def test_matches_numpy_per_tile_and_excludes_zeros(crops):
    a, b = crops[0].astype(np.float32), crops[1].astype(np.float32)
    b[:40, :] = 0  # no data in b's top band
    result = tile_correlation(a, b, tile=64)
    assert result.tiles.shape == (4, 4)
    keep = b[:64, 64:128] != 0
    expected = np.corrcoef(a[:64, 64:128][keep], b[:64, 64:128][keep])[0, 1]
    assert result.tiles[0, 1] == pytest.approx(expected, abs=1e-9)
    expected = np.corrcoef(a[128:192, :64].ravel(), b[128:192, :64].ravel())[0, 1]
    assert result.tiles[2, 0] == pytest.approx(expected, abs=1e-9)
    # Too few pixels with data in a tile: no value.
    b[:, :50] = 0
    sparse = tile_correlation(a, b, tile=64)
    assert np.isnan(sparse.tiles[:, 0]).all()
    assert sparse.valid_tiles == 12
    assert sparse.median == pytest.approx(float(np.nanmedian(sparse.tiles)))


def test_identical_sections_correlate_perfectly(crops):
    result = tile_correlation(torch.from_numpy(crops[0]).float(), torch.from_numpy(crops[0]).float(), tile=32)
    assert result.valid_tiles == 64
    assert np.allclose(result.tiles, 1.0)


def test_alignment_raises_neighbour_correlation(crops):
    aligned = neighbour_correlation(crops, tile=64)
    shifted = crops.copy()
    shifted[1] = np.roll(crops[1], (6, -9), axis=(0, 1))
    misaligned = neighbour_correlation(shifted, tile=64)
    assert aligned.shape == (4,) and np.isnan(aligned[0]) and np.isnan(misaligned[0])
    assert aligned[1] > 0.3
    # Shifting section 1 hurts both pairs it is in, and only those.
    assert misaligned[1] < aligned[1] - 0.2 and misaligned[2] < aligned[2] - 0.2
    assert misaligned[3] == pytest.approx(aligned[3])


def test_masks_and_blank_sections(crops):
    a, b = crops[0].astype(np.float32), crops[1].astype(np.float32)
    clean = tile_correlation(a, b, tile=64).tiles[1, 1]
    a[64:128, 64:128][:20] = 255.0  # a bright defect band in one tile
    assert tile_correlation(a, b, tile=64).tiles[1, 1] != pytest.approx(clean, abs=0.02)
    mask = np.zeros_like(a, dtype=bool)
    mask[64:84, 64:128] = True
    keep = ~mask[64:128, 64:128]
    expected = np.corrcoef(a[64:128, 64:128][keep], b[64:128, 64:128][keep])[0, 1]
    assert tile_correlation(a, b, tile=64, mask_a=mask).tiles[1, 1] == pytest.approx(expected, abs=1e-9)
    stack = crops.copy()
    stack[2] = 0  # a blank section
    values = neighbour_correlation(stack, tile=64)
    assert np.isnan(values[2]) and np.isnan(values[3]) and np.isfinite(values[1])


def test_bad_input_errors(crops):
    with pytest.raises(ValueError, match="same shape"):
        tile_correlation(crops[0], crops[1][:100])
    with pytest.raises(ValueError, match="mask_a"):
        tile_correlation(crops[0], crops[1], mask_a=np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"\(Z, Y, X\)"):
        neighbour_correlation(crops[0])
