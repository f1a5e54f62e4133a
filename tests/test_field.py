"""Property tests of emcore/field.py: the displacement-field convention and its operations.

Tolerances asserted here were measured on this CPU build (worst case over the hypothesis examples
is reported with ``pytest -s``); they are in pixels for fields and in image units for images.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from cloudvolume import CloudVolume
from hypothesis import assume, given, settings, target
from hypothesis import strategies as st

from emcore.field import compose, from_corgie, identity, invert, resample_field, to_corgie, warp, warp_mask
from emcore.layers import create_layer
from emcore.synthetic import affine_field, smooth_field

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True)
SIZE = 40

# Tolerances (see module docstring).
IDENTITY_TOL = 2e-6  # on images in [0, 1)
MAX_STRAIN = 0.2  # inversion is tested on fields whose neighbour differences stay below this
INVERSE_TOL_PX = 0.03
COMPOSE_WARP_TOL = 0.02  # on images with values in [1, 2]
COARSE_FINE_COARSE_TOL_PX = 0.05
FINE_COARSE_FINE_TOL_PX = 0.05


def smooth_image(size: int, seed: int) -> torch.Tensor:
    """A smooth positive test image ``(1, 1, size, size)`` with values in [1, 2]."""
    bumps = smooth_field(size, size, 1.0, grid=4, seed=seed + 1000)[:, :1]
    return 1.5 + 0.5 * bumps


def interior(t: torch.Tensor, border: int) -> torch.Tensor:
    return t[..., border:-border, border:-border]


# -- identity and translations --------------------------------------------------------------------


@SETTINGS
@given(seed=st.integers(0, 10_000), height=st.integers(1, 24), width=st.integers(1, 24))
def test_warp_by_identity_is_exact_to_float_roundoff(seed, height, width):
    """Not bitwise: pixel centre -> normalized -> pixel costs ~1e-7 relative (measured <= 1e-6 on
    [0, 1) images), so identity warps are exact to float32 roundoff, e.g. exact after uint8 rounding."""
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(2, 3, height, width, generator=gen)
    out = warp(image, identity(1, height, width))
    torch.testing.assert_close(out, image, atol=IDENTITY_TOL, rtol=0)
    as_uint8 = (image * 255).round()
    assert torch.equal(warp(as_uint8, identity(1, height, width)).round(), as_uint8)


@SETTINGS
@given(seed=st.integers(0, 10_000), tx=st.integers(-6, 6), ty=st.integers(-6, 6))
def test_integer_translation_is_a_shift_channel0_x_pull(seed, tx, ty):
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 1, 17, 23, generator=gen) + 1.0
    field = identity(1, 17, 23)
    field[:, 0] = tx  # x (last axis)
    field[:, 1] = ty  # y
    out = warp(image, field)
    expected = torch.zeros_like(image)
    h, w = image.shape[-2:]
    # pull: out[y, x] = image[y + ty, x + tx], 0 where that is outside
    ys = slice(max(0, -ty), min(h, h - ty))
    xs = slice(max(0, -tx), min(w, w - tx))
    src_ys = slice(ys.start + ty, ys.stop + ty)
    src_xs = slice(xs.start + tx, xs.stop + tx)
    expected[..., ys, xs] = image[..., src_ys, src_xs]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_positive_x_displacement_moves_content_left():
    image = torch.zeros(1, 1, 1, 8)
    image[..., 5] = 1.0
    field = identity(1, 1, 8)
    field[:, 0] = 3.0
    assert warp(image, field)[0, 0, 0].argmax().item() == 2  # out[2] = src[5]


# -- inversion and composition --------------------------------------------------------------------


def max_strain(field: torch.Tensor) -> float:
    """Largest displacement difference between neighbouring pixels (px / px)."""
    dx = (field[..., :, 1:] - field[..., :, :-1]).abs().max().item()
    dy = (field[..., 1:, :] - field[..., :-1, :]).abs().max().item()
    return max(dx, dy)


@SETTINGS
@given(seed=st.integers(0, 10_000), max_disp=st.floats(0.2, 4.0), grid=st.integers(2, 5))
def test_compose_with_inverse_is_zero_on_smooth_fields(seed, max_disp, grid):
    f = smooth_field(SIZE, SIZE, max_disp, grid=grid, seed=seed)
    assume(max_strain(f) <= MAX_STRAIN)  # realistic section deformations; beyond: next test
    border = math.ceil(max_disp) + 1
    result = invert(f, num_iter=100, tol=1e-5, border=border)
    err_right = interior(compose(f, result.inverse), border).abs().max().item()
    err_left = interior(compose(result.inverse, f), border).abs().max().item()
    target(max(err_right, err_left), label="max |compose(f, inv f)| px")
    print(f"compose-with-inverse residual {max(err_right, err_left):.2e} px (tol {INVERSE_TOL_PX})")
    assert err_right <= INVERSE_TOL_PX
    assert err_left <= INVERSE_TOL_PX
    assert result.residual == interior(compose(f, result.inverse), border).abs().max().item()


def test_invert_reports_its_residual_on_strongly_strained_fields():
    """At ~80% neighbour strain the fixed point is only approximate; ``residual`` says so."""
    f = smooth_field(SIZE, SIZE, 4.0, grid=5, seed=0)
    assert max_strain(f) > 0.5
    result = invert(f, num_iter=100, tol=1e-5, border=5)
    measured = interior(compose(f, result.inverse), 5).abs().max().item()
    assert result.residual == measured
    # compose(inverse, f) is what the iteration solves: it stays tiny even here
    assert interior(compose(result.inverse, f), 5).abs().max().item() < 1e-3


@SETTINGS
@given(
    seed=st.integers(0, 10_000),
    f_disp=st.floats(0.0, 3.0),
    g_disp=st.floats(0.0, 3.0),
)
def test_warp_twice_equals_warp_by_composition(seed, f_disp, g_disp):
    image = smooth_image(SIZE, seed)
    f = smooth_field(SIZE, SIZE, f_disp, grid=3, seed=seed)
    g = smooth_field(SIZE, SIZE, g_disp, grid=3, seed=seed + 1)
    border = math.ceil(f_disp + g_disp) + 2
    twice = warp(warp(image, g), f)
    once = warp(image, compose(f, g))
    err = interior(twice - once, border).abs().max().item()
    target(err, label="max |warp(warp(x, g), f) - warp(x, compose(f, g))|")
    print(f"warp-compose difference {err:.2e} (tol {COMPOSE_WARP_TOL}, image range [1, 2])")
    assert err <= COMPOSE_WARP_TOL


def test_compose_order_matters_apply_g_first():
    """With a translation g and a scale f, only compose(f, g) reproduces warp(warp(x, g), f)."""
    image = smooth_image(SIZE, 3)
    g = affine_field(SIZE, SIZE, translation=(4.0, -3.0))
    f = affine_field(SIZE, SIZE, rotation_deg=10.0, scale=1.05)
    twice = interior(warp(warp(image, g), f), 8)
    good = interior(warp(image, compose(f, g)), 8)
    bad = interior(warp(image, compose(g, f)), 8)
    assert (twice - good).abs().max() < 1e-3 < 0.02 < (twice - bad).abs().max()


# -- resampling between mips ----------------------------------------------------------------------


@SETTINGS
@given(
    rotation=st.floats(-3.0, 3.0),
    scale=st.floats(0.97, 1.03),
    tx=st.floats(-4.0, 4.0),
    ty=st.floats(-4.0, 4.0),
)
def test_resample_coarse_fine_coarse_is_exact_on_affine_fields(rotation, scale, tx, ty):
    coarse = affine_field(SIZE // 2, SIZE // 2, rotation_deg=rotation, scale=scale, translation=(tx, ty))
    back = resample_field(resample_field(coarse, 1, 0), 0, 1)
    # bilinear upsampling is exact for affine fields; the outermost coarse pixel is extrapolated
    torch.testing.assert_close(interior(back, 1), interior(coarse, 1), atol=1e-4, rtol=0)


@SETTINGS
@given(seed=st.integers(0, 10_000), max_disp=st.floats(0.5, 4.0))
def test_resample_round_trips_on_smooth_fields(seed, max_disp):
    # coarser -> finer -> coarser
    coarse = smooth_field(SIZE // 2, SIZE // 2, max_disp, grid=3, seed=seed)
    back = resample_field(resample_field(coarse, 2, 1), 1, 2)
    err_cfc = interior(back - coarse, 1).abs().max().item()
    # finer -> coarser -> finer (a field smooth at the coarse scale)
    fine = smooth_field(SIZE, SIZE, max_disp, grid=3, seed=seed)
    again = resample_field(resample_field(fine, 0, 1), 1, 0)
    err_fcf = interior(again - fine, 2).abs().max().item()
    target(err_cfc, label="coarse-fine-coarse px")
    target(err_fcf, label="fine-coarse-fine px")
    print(f"resample round trips: coarse-fine-coarse {err_cfc:.2e} px, fine-coarse-fine {err_fcf:.2e} px")
    assert err_cfc <= COARSE_FINE_COARSE_TOL_PX
    assert err_fcf <= FINE_COARSE_FINE_TOL_PX


def test_resample_scales_values_by_two_per_mip():
    f = torch.full((1, 2, 8, 8), 3.0)
    torch.testing.assert_close(resample_field(f, 2, 0), torch.full((1, 2, 32, 32), 12.0))
    torch.testing.assert_close(resample_field(f, 0, 2), torch.full((1, 2, 2, 2), 0.75))


# -- masks ----------------------------------------------------------------------------------------


@SETTINGS
@given(seed=st.integers(0, 10_000), tx=st.floats(-3.0, 3.0), ty=st.floats(-3.0, 3.0))
def test_warp_mask_nearest_lies_between_strict_and_dilating_thresholds(seed, tx, ty):
    gen = torch.Generator().manual_seed(seed)
    mask = (torch.rand(1, 1, 24, 24, generator=gen) > 0.8).to(torch.uint8)
    field = identity(1, 24, 24)
    field[:, 0], field[:, 1] = tx, ty
    nearest = warp_mask(mask, field).bool()
    dilated = warp_mask(mask, field, threshold=0.01).bool()
    strict = warp_mask(mask, field, threshold=1.0).bool()
    assert warp_mask(mask, field).dtype == torch.uint8
    assert not (nearest & ~dilated).any()  # dilated contains nearest
    assert not (strict & ~nearest).any()  # nearest contains strict
    if tx % 1 or ty % 1:
        assert dilated.sum() >= nearest.sum() >= strict.sum()


def test_warp_mask_half_pixel_shift_nearest_vs_threshold():
    mask = torch.zeros(1, 1, 1, 8, dtype=torch.bool)
    mask[..., 4] = True
    field = identity(1, 1, 8)
    field[:, 0] = 0.5  # read halfway between x and x + 1
    assert warp_mask(mask, field, threshold=0.01)[0, 0, 0].nonzero().flatten().tolist() == [3, 4]
    assert warp_mask(mask, field, threshold=0.5)[0, 0, 0].nonzero().flatten().tolist() == [3, 4]
    assert warp_mask(mask, field, threshold=1.0).sum() == 0
    assert warp_mask(mask, field).dtype == torch.bool
    # the default (0.5, ties set) keeps a 1-px defect at a half-pixel shift, on even and odd
    # pixels alike (grid_sample's nearest mode rounds half to even and would drop odd ones)
    assert warp_mask(mask, field)[0, 0, 0].nonzero().flatten().tolist() == [3, 4]
    odd = torch.zeros(1, 1, 1, 8, dtype=torch.bool)
    odd[..., 5] = True
    assert warp_mask(odd, field)[0, 0, 0].nonzero().flatten().tolist() == [4, 5]
    assert warp_mask(odd, field, threshold=0.01).sum() == 2


@SETTINGS
@given(seed=st.integers(0, 10_000), tx=st.floats(-3.0, 3.0), ty=st.floats(-3.0, 3.0))
def test_warp_mask_dilating_threshold_never_loses_a_defect(seed, tx, ty):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(1, 1, 24, 24, generator=gen) > 0.95
    field = identity(1, 24, 24)
    field[:, 0], field[:, 1] = tx, ty
    warped = warp_mask(mask, field, threshold=0.01)
    # every set source pixel whose position is read by some output pixel stays visible
    back = identity(1, 24, 24)
    back[:, 0], back[:, 1] = -tx, -ty
    seen = warp_mask(warped, back, threshold=0.01)
    inside = interior(torch.ones_like(mask), 4)
    assert not (interior(mask, 4) & ~interior(seen, 4) & inside).any()


# -- corgie / torchfields interoperability --------------------------------------------------------


def _torchfields_sample(image_zcxy: torch.Tensor, field_zcxy_pixels: torch.Tensor) -> torch.Tensor:
    """torchfields' ``DisplacementField.from_pixels().sample(image)``, reproduced.

    torchfields: channel 0 moves along the LAST tensor axis; pixels -> normalized by
    ``size / 2`` with ``size = shape[-1]`` (square images); ``sample`` adds the ``affine_grid``
    identity (align_corners=False) and calls ``grid_sample`` (zeros padding, align_corners=False).
    """
    size = field_zcxy_pixels.shape[-1]
    normalized = field_zcxy_pixels / (size / 2)
    n = normalized.shape[0]
    theta = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]]).expand(n, 2, 3)
    ident = F.affine_grid(theta, list(normalized.shape), align_corners=False)  # (N, H, W, 2)
    grid = normalized.permute(0, 2, 3, 1) + ident
    return F.grid_sample(image_zcxy, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _corgie_round_trip(
    stored_xyzc: np.ndarray, image_zcyx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(corgie's warp, our warp) of ``image`` by a field stored as cloud-volume ``(X, Y, Z, 2)``."""
    # corgie: cutout (X, Y, Z, C) -> transpose(2, 3, 0, 1) -> (Z, C, X, Y); images the same way
    corgie_field = torch.from_numpy(stored_xyzc.transpose(2, 3, 0, 1).copy())
    corgie_image = image_zcyx.permute(0, 1, 3, 2)  # (Z, C, Y, X) -> (Z, C, X, Y)
    corgie_out = _torchfields_sample(corgie_image, corgie_field).permute(0, 1, 3, 2)
    # ours: the same cutout read as (Z, C, Y, X) (emcore.layers' transpose), then from_corgie
    ours_field = from_corgie(torch.from_numpy(stored_xyzc.transpose(2, 3, 1, 0).copy()))
    return corgie_out, warp(image_zcyx, ours_field)


def test_corgie_translation_field_matches_from_corgie(layer_root):
    size, dy = 32, 3.0
    image = smooth_image(size, 5)
    stored = np.zeros((size, size, 1, 2), np.float32)  # cloud-volume (X, Y, Z, C)
    stored[..., 0] = dy  # corgie channel 0 moves along its last tensor axis = Y
    stored[:, 7, 0, 1] = 0.25  # a marker in corgie channel 1 (x) at y = 7, to check the layout
    # a corgie field layer on disk, read back through emcore.layers: (Z, C, Y, X), corgie channels
    layer = create_layer(f"{layer_root}/corgie_field", kind="field", resolution=(4, 4, 40),
                         size=(size, size, 1), chunk_size=(16, 16, 1))
    CloudVolume(layer.path, progress=False)[0:size, 0:size, 0:1] = stored
    read = torch.from_numpy(layer.read(layer.bounds(0)))
    assert torch.equal(read, torch.from_numpy(stored.transpose(2, 3, 1, 0).copy()))
    assert (from_corgie(read)[0, 0, 7] == 0.25).all() and from_corgie(read)[0, 0].sum() == 0.25 * size
    stored[:, 7, 0, 1] = 0.0
    corgie_out, ours = _corgie_round_trip(stored, image)
    torch.testing.assert_close(ours, corgie_out, atol=1e-5, rtol=0)
    # and both are the +dy pull: out[y] = image[y + 3]
    torch.testing.assert_close(ours[..., : size - 3, :], image[..., 3:, :], atol=1e-5, rtol=0)
    assert (ours[..., size - 3 :, :] == 0).all()


@SETTINGS
@given(seed=st.integers(0, 10_000), max_disp=st.floats(0.5, 4.0))
def test_corgie_general_field_matches_from_corgie(seed, max_disp):
    size = 32
    image = smooth_image(size, seed)
    ours_field = smooth_field(size, size, max_disp, grid=3, seed=seed)  # (1, 2, Y, X), channel 0 = x
    stored = to_corgie(ours_field).numpy().transpose(3, 2, 0, 1)  # what corgie would store (X, Y, Z, C)
    corgie_out, ours = _corgie_round_trip(np.ascontiguousarray(stored), image)
    torch.testing.assert_close(ours, corgie_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours, warp(image, ours_field), atol=1e-6, rtol=0)
