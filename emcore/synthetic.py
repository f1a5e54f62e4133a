"""Known deformations for benchmarks, tests and the demo.

Real EM sections of an already-registered stack, warped by one of these fields, give an exact
ground truth for what an aligner must recover. All fields follow :mod:`emcore.field`'s convention:
``(1, 2, H, W)`` float32, channel 0 = x, pixels at the image's mip, pull semantics
(``deformed = warp(registered, field)``).

The field that re-aligns ``deformed`` onto ``registered`` is the inverse of the applied field
(``compose(recovered, applied) ~= 0`` is not what is measured; see :func:`true_alignment_field`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from emcore.field import invert

__all__ = ["affine_field", "fold_field", "smooth_field", "torn_fold_field", "true_alignment_field"]


def smooth_field(
    height: int,
    width: int,
    max_displacement: float,
    *,
    grid: int = 4,
    seed: int = 0,
) -> torch.Tensor:
    """A random smooth field: bicubic interpolation of a ``grid x grid`` lattice of normals.

    Scaled so that the largest displacement magnitude is ``max_displacement`` px. With ``grid=4``
    on 512 px and 2 px this gives a maximum strain around 1-1.5%.

    Returns:
        ``(1, 2, height, width)`` float32 field in pixels.
    """
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 2, grid, grid, generator=gen, dtype=torch.float64)
    field = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=True)
    peak = field.norm(dim=1).max()
    return (field * (max_displacement / peak)).to(torch.float32)


def affine_field(
    height: int,
    width: int,
    *,
    rotation_deg: float = 0.0,
    translation: tuple[float, float] = (0.0, 0.0),
    scale: float = 1.0,
) -> torch.Tensor:
    """The field of a rotation/scale about the image centre plus a translation ``(tx, ty)`` px.

    ``deformed(p) = registered(c + s R (p - c) + t)``, i.e. ``field(p) = (s R - I)(p - c) + t``.

    Returns:
        ``(1, 2, height, width)`` float32 field in pixels.
    """
    theta = math.radians(rotation_deg)
    cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float64) - cy,
        torch.arange(width, dtype=torch.float64) - cx,
        indexing="ij",
    )
    c, s = math.cos(theta) * scale, math.sin(theta) * scale
    fx = (c - 1.0) * xs - s * ys + translation[0]
    fy = s * xs + (c - 1.0) * ys + translation[1]
    return torch.stack((fx, fy)).unsqueeze(0).to(torch.float32)


def fold_field(
    height: int,
    width: int,
    *,
    angle_deg: float = 30.0,
    offset_px: float = 0.0,
    fold_width_px: float = 6.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fold-like discontinuity: a straight line across the section, tissue beyond it displaced.

    The line passes ``offset_px`` from the image centre with normal at ``angle_deg`` (0 = +x).
    On the far side (signed distance ``d > 0``) the field is ``-fold_width_px * n``: the deformed
    image repeats a band of ``fold_width_px`` px of tissue there, as folded-over tissue does. The
    returned mask marks that band (``0 <= d < fold_width_px``) in the deformed frame: a defect
    mask, the region an aligner must not trust and across which tissue may tear.

    A straight-line toy; realistic folds and cracks (curved, 20-200 px motion, dark band or gap,
    partial tears, exact truth and validity) are made by :mod:`emcore.synthetic_defects`.

    Returns:
        ``(field, mask)``: ``(1, 2, H, W)`` float32 field in px and ``(1, 1, H, W)`` bool mask.
    """
    theta = math.radians(angle_deg)
    nx, ny = math.cos(theta), math.sin(theta)
    d = _signed_distance(height, width, nx, ny, offset_px)
    beyond = (d >= 0).to(torch.float32)
    field = torch.stack((-fold_width_px * nx * beyond, -fold_width_px * ny * beyond)).unsqueeze(0)
    mask = ((d >= 0) & (d < fold_width_px)).view(1, 1, height, width)
    return field, mask


def true_alignment_field(applied: torch.Tensor, *, border: int = 0) -> torch.Tensor:
    """The field that maps a deformed image back onto the registered one.

    If ``deformed = warp(registered, applied)`` then ``warp(deformed, true) ~= registered`` with
    ``true = invert(applied)``. Raises if the inversion residual exceeds 0.01 px (interior).
    """
    result = invert(applied, num_iter=200, tol=1e-5, border=border)
    if result.residual > 0.01:
        raise ValueError(f"applied field is not invertible to 0.01 px (residual {result.residual:.3g} px)")
    return result.inverse


def torn_fold_field(
    height: int,
    width: int,
    *,
    angle_deg: float = 30.0,
    offset_px: float = 0.0,
    fold_width_px: float = 6.0,
    slide_px: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`fold_field` whose far side also slides ``slide_px`` along the fold line (a tear).

    With ``t = (-sin a, cos a)`` the line's direction, the applied field is 0 on the near side
    (``d < 0``) and ``-fold_width_px * n + slide_px * t`` beyond; ``deformed = warp(registered,
    applied)`` shows the far side moved by ``-slide_px * t``, a band of repeated tissue (the
    returned mask, deformed frame) between the sides. The exact alignment field (registered frame,
    ``warp(deformed, truth) ~= registered``) is piecewise constant: 0 where ``d < 0`` and
    ``fold_width_px * n - slide_px * t`` where ``d >= 0`` (``d`` measured in the registered frame).

    Returns:
        ``(applied, mask, truth)``: ``(1, 2, H, W)`` float32, ``(1, 1, H, W)`` bool, ``(1, 2, H, W)``
        float32, px.
    """
    theta = math.radians(angle_deg)
    nx, ny = math.cos(theta), math.sin(theta)
    tx, ty = -ny, nx
    fold, mask = fold_field(
        height, width, angle_deg=angle_deg, offset_px=offset_px, fold_width_px=fold_width_px
    )
    beyond = _signed_distance(height, width, nx, ny, offset_px) >= 0
    slide = torch.stack((slide_px * tx * beyond, slide_px * ty * beyond)).unsqueeze(0).to(torch.float32)
    return fold + slide, mask, -fold - slide


def _signed_distance(height: int, width: int, nx: float, ny: float, offset_px: float) -> torch.Tensor:
    """``(H, W)`` float32 signed distance (px) of every pixel from the line with normal ``n`` that
    passes ``offset_px`` from the image centre."""
    cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float32) - cy,
        torch.arange(width, dtype=torch.float32) - cx,
        indexing="ij",
    )
    return xs * nx + ys * ny - offset_px
