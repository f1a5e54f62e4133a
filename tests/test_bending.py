"""Bending energy: affine motion is free, curvature costs its known value, weights cut it; the
higher-order smoothness energies leave polynomial motion below their order free."""

from __future__ import annotations

import pytest
import torch

from emcore.finetune.bending import MAX_ORDER, bending_energy, smoothness_energy
from emcore.synthetic import affine_field


def _grid(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    return xs, ys


def test_affine_fields_cost_nothing() -> None:
    field = affine_field(32, 40, rotation_deg=7.0, scale=1.05, translation=(3.0, -2.0)).double()
    assert float(bending_energy(field).abs().max()) < 1e-10  # float32 rounding of the field only


def test_quadratic_and_twist_fields_have_their_known_energy() -> None:
    xs, ys = _grid(16, 20)
    bend = torch.stack([0.01 * xs**2, 0.02 * ys**2]).unsqueeze(0)  # d2/dx2 = 0.02, d2/dy2 = 0.04
    assert float(bending_energy(bend)) == pytest.approx(0.02**2 + 0.04**2, rel=1e-9)
    twist = torch.stack([0.03 * xs * ys, torch.zeros_like(xs)]).unsqueeze(0)  # d2/dxdy = 0.03, counted twice
    assert float(bending_energy(twist)) == pytest.approx(2 * 0.03**2, rel=1e-9)


def test_mip_converts_to_mip0_units() -> None:
    """A field at mip k holds 2**k times smaller values on a 2**k times coarser grid."""
    xs, ys = _grid(64, 64)
    fine = torch.stack([0.001 * xs**2, torch.zeros_like(xs)]).unsqueeze(0)
    coarse_xs = xs[::4, ::4]
    coarse = torch.stack([0.001 * coarse_xs**2 / 4, torch.zeros_like(coarse_xs)]).unsqueeze(0)
    assert float(bending_energy(coarse, mip=2)) == pytest.approx(float(bending_energy(fine)), rel=1e-9)


def test_zero_weight_cuts_every_stencil_through_a_point() -> None:
    xs, _ = _grid(9, 9)
    kink = torch.stack([torch.clamp(xs - 4, min=0), torch.zeros_like(xs)]).unsqueeze(0)  # bends at x = 4 only
    assert float(bending_energy(kink)) > 0
    weight = torch.ones(1, 1, 9, 9, dtype=torch.float64)
    weight[..., 4] = 0
    assert float(bending_energy(kink, weight=weight)) == 0.0


def test_items_are_independent_and_small_fields_cost_zero() -> None:
    xs, ys = _grid(8, 8)
    curved = torch.stack([0.1 * xs**2, ys]).unsqueeze(0)
    batch = torch.cat([curved, torch.zeros_like(curved)])
    energy = bending_energy(batch)
    assert energy.shape == (2,) and float(energy[0]) > 0 and float(energy[1]) == 0.0
    assert bending_energy(torch.ones(3, 2, 2, 5)).tolist() == [0.0, 0.0, 0.0]


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="field must be"):
        bending_energy(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="weight must be"):
        bending_energy(torch.zeros(1, 2, 8, 8), weight=torch.ones(1, 1, 4, 4))


def test_order_two_is_the_bending_energy() -> None:
    xs, ys = _grid(12, 14)
    field = torch.stack([0.01 * xs**3 + 0.2 * ys, 0.03 * xs * ys**2]).unsqueeze(0)
    assert torch.equal(smoothness_energy(field, mip=1, order=2), bending_energy(field, mip=1))


def test_higher_orders_leave_lower_degree_motion_free_and_cost_their_known_value() -> None:
    xs, ys = _grid(16, 20)
    quadratic = torch.stack([0.01 * xs**2 + 0.02 * xs * ys, 0.03 * ys**2]).unsqueeze(0)
    cubic = torch.stack([0.002 * xs**3, 0.001 * xs * ys**2]).unsqueeze(0)  # d3/dx3 = 0.012; d3/dxdy2 = 0.002
    assert float(bending_energy(quadratic)) > 0
    assert float(smoothness_energy(quadratic, order=3)) == pytest.approx(0.0, abs=1e-20)
    # order 3: sum_k C(3, k) (d3 u / dx^k dy^(3-k))^2 = 0.012**2 (u_x) + C(3, 1) 0.002**2 (u_y)
    assert float(smoothness_energy(cubic, order=3)) == pytest.approx(0.012**2 + 3 * 0.002**2, rel=1e-9)
    assert float(smoothness_energy(cubic, order=4)) == pytest.approx(0.0, abs=1e-20)
    quartic = torch.stack([0.001 * ys**4, torch.zeros_like(xs)]).unsqueeze(0)  # d4/dy4 = 0.024
    assert float(smoothness_energy(quartic, order=4)) == pytest.approx(0.024**2, rel=1e-9)


def test_higher_orders_convert_to_mip0_units() -> None:
    xs, _ = _grid(64, 64)
    fine = torch.stack([1e-4 * xs**4, torch.zeros_like(xs)]).unsqueeze(0)
    coarse_xs = xs[::4, ::4]
    coarse = torch.stack([1e-4 * coarse_xs**4 / 4, torch.zeros_like(coarse_xs)]).unsqueeze(0)
    assert float(smoothness_energy(coarse, mip=2, order=4)) == pytest.approx(
        float(smoothness_energy(fine, order=4)), rel=1e-9
    )


def test_bad_orders_are_refused() -> None:
    for bad in (1, MAX_ORDER + 1, 2.0):
        with pytest.raises(ValueError, match="order must be"):
            smoothness_energy(torch.zeros(1, 2, 8, 8), order=bad)
