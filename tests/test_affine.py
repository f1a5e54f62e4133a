"""emcore.affine: matrices of section affines (build, rescale, shift, describe, fit, compose)."""

from __future__ import annotations

import math

import pytest
import torch

from emcore.affine import (
    AffineMoments,
    affine_displacement_field,
    affine_moments,
    compose_with_affine,
    decompose,
    fit_affine,
    fit_affine_moments,
    rescale_matrix,
    rotation_matrix,
    shift_origin,
)
from emcore.field import compose, resample_field


def _matrix() -> torch.Tensor:
    m = rotation_matrix(1.5, 64, 80)
    m[:, 2] += torch.tensor([2.5, -1.25], dtype=torch.float64)
    m[0, 0] += 0.01
    return m


def test_rescale_matrix_matches_resampled_field():
    m = _matrix()
    coarse = affine_displacement_field(m, 16, 20)
    fine = resample_field(coarse, 2, 0)
    expected = affine_displacement_field(rescale_matrix(m, 2, 0), 64, 80)
    assert float((fine - expected)[..., 4:-4, 4:-4].abs().max()) < 1e-4
    assert torch.allclose(rescale_matrix(rescale_matrix(m, 2, 0), 0, 2), m, atol=1e-12)


def test_shift_origin_is_a_crop_of_the_field():
    m = _matrix()
    full = affine_displacement_field(m, 64, 80)
    crop = affine_displacement_field(shift_origin(m, (10, 7)), 20, 30)
    assert torch.allclose(full[..., 7:27, 10:40], crop, atol=1e-5)


def test_decompose_recovers_rotation_and_centre_translation():
    m = rotation_matrix(-0.7, 100, 120)
    m[:, 2] += torch.tensor([3.0, -4.0], dtype=torch.float64)
    parts = decompose(m, 100, 120)
    assert math.isclose(parts.rotation_deg, -0.7, abs_tol=1e-9)
    assert math.isclose(parts.scale_x, 1.0, abs_tol=1e-9) and math.isclose(parts.shear, 0.0, abs_tol=1e-9)
    assert math.isclose(parts.translation[0], 3.0, abs_tol=1e-9)
    assert math.isclose(parts.translation[1], -4.0, abs_tol=1e-9)


def test_fit_affine_of_an_affine_field_is_exact_and_ignores_zero_weight():
    m = _matrix()
    field = affine_displacement_field(m, 40, 50)
    assert torch.allclose(fit_affine(field), m, atol=1e-6)
    noisy = field.clone()
    noisy[..., :10, :] += 30.0  # outliers where the weight is 0
    weight = torch.ones(40, 50)
    weight[:10] = 0
    assert torch.allclose(fit_affine(noisy, weight), m, atol=1e-6)


def test_chunk_moments_add_up_to_the_whole_section_fit():
    gen = torch.Generator().manual_seed(3)
    field = affine_displacement_field(_matrix(), 96, 128) + 0.3 * torch.randn(1, 2, 96, 128, generator=gen)
    weight = (torch.rand(96, 128, generator=gen) > 0.3).double()
    whole = fit_affine(field, weight)
    total = AffineMoments.zero()
    for y0 in range(0, 96, 32):
        for x0 in range(0, 128, 48):
            part = field[..., y0 : y0 + 32, x0 : x0 + 48]
            total = total + affine_moments(part, weight[y0 : y0 + 32, x0 : x0 + 48], origin=(x0, y0))
    round_trip = AffineMoments.from_list(total.to_list())
    assert torch.allclose(fit_affine_moments(round_trip), whole, atol=1e-9)
    assert round_trip.weight == float(weight.sum())


def test_an_affine_fit_without_weight_or_on_one_line_is_refused():
    field = torch.zeros(1, 2, 8, 8)
    with pytest.raises(ValueError, match="positive weight"):
        fit_affine(field, torch.zeros(8, 8))
    line = torch.zeros(8, 8)
    line[3] = 1  # one row of pixels: the y-coefficients are undetermined
    with pytest.raises(ValueError, match="one line"):
        fit_affine(field, line)


def test_compose_with_affine_equals_compose_inside():
    field = torch.randn(1, 2, 48, 48, generator=torch.Generator().manual_seed(0)) * 0.5
    m = _matrix()
    exact = compose_with_affine(field, m)
    sampled = compose(field, affine_displacement_field(m, 48, 48))
    assert float((exact - sampled)[..., 6:-6, 6:-6].abs().max()) < 1e-4
