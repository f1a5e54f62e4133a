"""emcore.stack_quality on synthetic fields with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from emcore.coarse_xcorr import affine_displacement_field
from emcore.field import compose
from emcore.stack_quality import (
    affine_part,
    decompose,
    jacobian_outliers,
    linear_trend,
    non_affine,
    residual_vs_truth,
    rotation_drift,
    rotation_series_drift,
    seam_score,
    section_metrics,
)
from emcore.synthetic import affine_field, fold_field, smooth_field

H, W = 96, 128


def test_pure_rotation_gives_its_angle_and_no_non_affine_part() -> None:
    field = affine_field(H, W, rotation_deg=-0.7, translation=(3.0, -5.0))
    m = affine_part(field)
    parts = decompose(m, H, W)
    assert parts.rotation_deg == pytest.approx(-0.7, abs=1e-4)
    assert parts.scale_x == pytest.approx(1.0, abs=1e-5)
    assert parts.scale_y == pytest.approx(1.0, abs=1e-5)
    assert parts.shear == pytest.approx(0.0, abs=1e-5)
    assert parts.translation == pytest.approx((3.0, -5.0), abs=1e-3)
    assert non_affine(field, m).p95 < 1e-3


def test_scale_and_shear_are_separated_from_rotation() -> None:
    matrix = torch.tensor([[0.02, 0.01, 1.0], [0.0, -0.03, 2.0]], dtype=torch.float64)
    parts = decompose(matrix, H, W)
    assert parts.rotation_deg == pytest.approx(0.0, abs=1e-9)
    assert (parts.scale_x, parts.scale_y, parts.shear) == pytest.approx((1.02, 0.97, 0.01))


def test_affine_part_with_mask_ignores_a_local_bump() -> None:
    field = affine_field(H, W, rotation_deg=0.5)
    bumped = field.clone()
    bumped[:, :, 10:20, 10:20] += 15.0
    mask = torch.ones(H, W, dtype=torch.bool)
    mask[5:25, 5:25] = False
    assert decompose(affine_part(bumped, mask), H, W).rotation_deg == pytest.approx(0.5, abs=1e-4)
    na = non_affine(bumped, affine_part(bumped, mask))
    assert na.magnitude[15, 15] == pytest.approx(15.0 * math.sqrt(2), abs=1e-3)
    # An unmasked fit is pulled by the bump.
    assert non_affine(bumped, affine_part(bumped)).median > 0.1


def test_non_affine_measures_a_smooth_field() -> None:
    smooth = smooth_field(H, W, 4.0, seed=3)
    na = non_affine(smooth, affine_part(smooth))
    assert 0.3 < na.p95 <= 4.0 + 1e-6
    assert na.median < na.p95


def test_fold_gives_jacobian_outliers_and_smooth_field_none() -> None:
    fold, _ = fold_field(H, W, angle_deg=30.0, fold_width_px=6.0)
    jac = jacobian_outliers(fold)
    assert jac.folded > 0.005
    assert jac.outside >= jac.folded
    assert jac.min_det < 0
    smooth = jacobian_outliers(smooth_field(H, W, 2.0, seed=1))
    assert smooth.outside == 0.0 and smooth.folded == 0.0
    assert jacobian_outliers(affine_field(H, W, scale=1.1)).det.mean() == pytest.approx(1.21, abs=1e-6)


def test_seam_score_detects_a_jump_at_a_chunk_border() -> None:
    base = smooth_field(H, W, 2.0, seed=2)
    assert seam_score(base, 32).ratio == pytest.approx(1.0, abs=0.3)
    torn = base.clone()
    torn[:, 0, :, 64:] += 0.5  # a tear at the only vertical chunk border x = 64
    torn[:, 1, 64:, :] -= 0.5  # and at the only horizontal one, y = 64
    score = seam_score(torn, 64)
    assert score.ratio > 10
    assert score.border_jumps > 0
    # The same tear off the chunk grid (origin shifted by 16 px) is not at a border.
    assert seam_score(torn, 64, origin=(16, 16)).ratio < 1.5
    # Zero fields score 1.0; a single chunk has no border.
    assert seam_score(torch.zeros(2, H, W), 32).ratio == pytest.approx(1.0)
    assert math.isnan(seam_score(base, 256).ratio)


def test_rotation_drift_is_max_minus_min() -> None:
    angles = [0.0, -0.1, -0.25, 0.05]
    ms = torch.stack([affine_part(affine_field(H, W, rotation_deg=a)) for a in angles])
    drift = rotation_drift(ms)
    assert drift.drift_deg == pytest.approx(0.30, abs=1e-4)
    assert drift.series_deg == pytest.approx(angles, abs=1e-4)


def test_rotation_trend_tells_drift_from_one_turned_section() -> None:
    # Drift: 0.05 deg per section accumulates to 0.25 deg over 6 sections; range and trend agree.
    drifting = [0.05 * z for z in range(6)]
    ms = torch.stack([affine_part(affine_field(H, W, rotation_deg=a)) for a in drifting])
    drift = rotation_drift(ms)
    assert drift.drift_deg == pytest.approx(0.25, abs=1e-4)
    assert drift.trend_deg == pytest.approx(0.25, abs=1e-4)
    # One section turned by 0.2 deg in the middle of a still stack: the range sees it, the trend not.
    turned = [0.0, 0.0, 0.2, 0.0, 0.0]
    ms = torch.stack([affine_part(affine_field(H, W, rotation_deg=a)) for a in turned])
    drift = rotation_drift(ms)
    assert drift.drift_deg == pytest.approx(0.2, abs=1e-4)
    assert abs(drift.trend_deg) < 1e-4
    # Positions: the slope is per unit of position, times their extent.
    assert linear_trend([0.0, 1.0, 2.0], [0, 10, 20]) == pytest.approx(2.0)
    assert linear_trend([1.0]) == 0.0


def _truth_stack(z: int = 4) -> torch.Tensor:
    return torch.cat([
        compose(affine_field(H, W, rotation_deg=0.3 * (i - 1.5), translation=(2.0 * i, -i)),
                smooth_field(H, W, 1.5, seed=i))
        for i in range(z)
    ])  # fmt: skip


def test_residual_vs_truth_removes_one_global_rigid_transform() -> None:
    truth = _truth_stack()
    frame = affine_field(H, W, rotation_deg=0.8, translation=(6.0, -4.0))
    estimate = compose(frame.expand_as(truth), truth)  # the right answer in another stack frame
    inner = torch.zeros(H, W, dtype=torch.bool)
    inner[12:-12, 12:-12] = True
    res = residual_vs_truth(estimate, truth, inner)
    assert res.median < 0.01 and res.p95 < 0.02
    assert res.plain_median > 3.0
    assert res.rigid_rotation_deg == pytest.approx(0.8, abs=0.01)
    assert res.rigid_translation == pytest.approx((6.0, -4.0), abs=0.05)


def test_residual_vs_truth_keeps_a_drift_along_z() -> None:
    truth = _truth_stack()
    drift = torch.cat([affine_field(H, W, rotation_deg=0.5 * i) for i in range(4)])
    estimate = torch.cat([compose(drift[i : i + 1], truth[i : i + 1]) for i in range(4)])
    res = residual_vs_truth(estimate, truth)
    # 0.5 deg per section on a 96 x 128 px section is ~0.5 px per section at mid-radius: not removable.
    assert res.median > 0.2
    assert res.per_section_median[0] > 0.2 and res.per_section_median[3] > 0.2


def test_section_metrics_rows() -> None:
    stack = torch.cat([affine_field(H, W, rotation_deg=a) for a in (0.0, 0.2)])
    rows = section_metrics(stack, chunk_xy=32)
    assert len(rows) == 2
    assert rows[1]["rotation_deg"] == pytest.approx(0.2, abs=1e-4)
    assert rows[1]["non_affine_p95"] < 1e-3
    assert rows[0]["seam_ratio"] == pytest.approx(1.0)


def test_bad_shapes_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="one section"):
        affine_part(torch.zeros(3, 2, H, W))
    with pytest.raises(ValueError, match="same shape"):
        residual_vs_truth(torch.zeros(2, 2, H, W), torch.zeros(3, 2, H, W))
    with pytest.raises(ValueError, match="mask"):
        affine_part(torch.zeros(2, H, W), torch.ones(H + 1, W, dtype=torch.bool))
    with pytest.raises(ValueError, match="chunk_xy"):
        seam_score(torch.zeros(2, H, W), 0)
    assert affine_displacement_field(torch.zeros(2, 3), H, W).abs().max() == 0


def test_rotation_series_drift_takes_positions_and_refuses_an_empty_stack() -> None:
    drift = rotation_series_drift([0.0, 0.1, 0.3], [0, 2, 6])
    assert drift.drift_deg == pytest.approx(0.3)
    assert drift.trend_deg == pytest.approx(linear_trend([0.0, 0.1, 0.3], [0, 2, 6]))
    with pytest.raises(ValueError, match="at least one section"):
        rotation_series_drift([])
