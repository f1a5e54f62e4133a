"""The last level's Gaussian pre-filter (emcore.finetune.prefilter, ``Level.prefilter``).

The filter over data pixels, the gradient-energy ratio that rescales the bending weights, and the
rule in the schedule: a noisy strained pair (passes the noise check) is fitted on the filtered
images and ends closer to the truth; a pair of different sections (fails the check) gets bit for
bit the fit without the filter. Benchmark-scale numbers: benchmarks/README.md, "Issue 17, third
pass".
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from emcore.field import warp
from emcore.finetune import finetune
from emcore.finetune.coarse_to_fine import DEFAULT_PREFILTER, Level, default_levels
from emcore.finetune.prefilter import gaussian_prefilter, gradient_energy_ratio
from emcore.finetune.selection import noise_sigma
from emcore.metrics import field_residual
from emcore.synthetic import smooth_field, true_alignment_field
from tests.sections import noisy as _noisy
from tests.sections import noisy_neighbours, normalized_crop


def _section(vnc_sections: np.ndarray, z: int, size: int) -> torch.Tensor:
    """This module's crops sit at (300, 300) px."""
    return normalized_crop(vnc_sections, z, size, y=300, x=300)


def _without_prefilter(levels: list[Level]) -> list[Level]:
    return [*levels[:-1], replace(levels[-1], prefilter=0.0)]


def test_prefilter_keeps_no_data_and_removes_most_noise() -> None:
    gen = torch.Generator().manual_seed(0)
    noise = 1.0 + 0.3 * torch.randn(1, 1, 96, 96, generator=gen)
    noise[..., :, :20] = 0  # no data on a strip
    out = gaussian_prefilter(noise, DEFAULT_PREFILTER)
    assert out.shape == noise.shape
    assert torch.equal(out == 0, noise == 0)  # no-data stays 0, data stays nonzero
    assert noise_sigma(out).item() < 0.5 * noise_sigma(noise).item()
    flat = torch.where(noise != 0, torch.full_like(noise, 2.0), noise)
    assert torch.allclose(gaussian_prefilter(flat, 1.0)[..., 20:], flat[..., 20:])  # no darkening at the edge
    assert gaussian_prefilter(noise, 0.0) is noise
    with pytest.raises(ValueError, match="sigma"):
        gaussian_prefilter(noise, float("nan"))


def test_gradient_energy_ratio_measures_the_weaker_data_term(vnc_sections: np.ndarray) -> None:
    gen = torch.Generator().manual_seed(1)
    img = torch.cat([_noisy(_section(vnc_sections, 0, 64), gen), torch.zeros(1, 1, 64, 64)])
    once, twice = gaussian_prefilter(img, 0.5), gaussian_prefilter(img, 1.0)
    r_same, r_once, r_twice = (gradient_energy_ratio(x, img) for x in (img, once, twice))
    assert torch.allclose(r_same, torch.ones(2))
    assert 0.3 < r_once[0].item() < 0.8 and r_twice[0].item() < r_once[0].item()
    assert r_once[1].item() == 1.0  # no data: nothing to rescale


def test_strained_noisy_pair_fits_closer_with_the_prefilter(vnc_sections: np.ndarray) -> None:
    size = 256
    gen = torch.Generator().manual_seed(3)
    clean = _section(vnc_sections, 0, size)
    applied = smooth_field(size, size, 1.5, grid=8, seed=2)  # ~32 px features: local strain
    src, tgt = _noisy(warp(clean, applied), gen), _noisy(clean, gen)
    true = true_alignment_field(applied, border=8)
    levels = default_levels(size, size, 4)
    # The filter alone (refits: test_finetune_refits.py), with the soft fit it came with (the bending
    # energy, 2e2; the fourth-order soft fits of test_finetune_order.py gain less from it on this
    # pair: 0.119 -> 0.116 px p95).
    levels[-1] = replace(levels[-1], refits=0, candidate_order=2, bending_candidates=(2e2,))
    filtered = finetune(src, tgt, levels=levels)
    plain = finetune(src, tgt, levels=_without_prefilter(levels))
    err_f = field_residual(filtered.field, true, border=16)
    err_p = field_residual(plain.field, true, border=16)
    assert err_f.p95 < 0.97 * err_p.p95, (err_f, err_p)
    # The fit saw the filtered images: its MSE is far below that of the noisy ones.
    assert filtered.loss.item() < 0.7 * plain.loss.item()


def test_different_sections_are_fitted_unfiltered(vnc_sections: np.ndarray) -> None:
    """Neighbouring sections fail the noise check: the pre-filter changes nothing, bit for bit."""
    size = 128
    src, tgt = noisy_neighbours(vnc_sections, size, y=300, x=300)
    levels = default_levels(size, size, 4)
    with_filter = finetune(src, tgt, levels=levels)
    without = finetune(src, tgt, levels=_without_prefilter(levels))
    assert torch.equal(with_filter.field, without.field)
    assert torch.equal(with_filter.iterations, without.iterations)
