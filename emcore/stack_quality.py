"""Stack-level quality of final alignment fields: affine part, drift, non-affine part, folds, seams, truth.

Inputs are the final fields ``G[z]`` of a stack (:mod:`emcore.stack_solve`: ``aligned_z =
warp(img_z, G[z])``), ``(Z, 2, H, W)`` or one section ``(2, H, W)`` / ``(1, 2, H, W)``, float, px at
the finetune mip, in the convention of :mod:`emcore.field` (channel 0 = x, pull semantics, pixel
centres at integer coordinates, origin at the top-left pixel of the array). Masks are bool
``(H, W)`` / ``(1, 1, H, W)`` per section or ``(Z, 1, H, W)`` per stack; set = evaluate this pixel.

Affine matrices are *displacement* matrices ``M`` ``(2, 3)`` as in :mod:`emcore.coarse_xcorr`:
``field(x, y) = M @ (x, y, 1)``. Their position map is ``p -> p + M @ (p, 1) = A p + b`` with
``A = I + M[:, :2]``; :func:`decompose` writes ``A = R(theta) @ [[scale_x, shear], [0, scale_y]]``
(``R(theta) = [[cos, -sin], [sin, cos]]``), the sign of :func:`emcore.synthetic.affine_field`: a
field made with ``rotation_deg=theta`` decomposes to ``theta``.

API summary
-----------
* :func:`affine_part` -> ``(2, 3)`` float64 least-squares affine displacement matrix of a field
  (:func:`emcore.affine.fit_affine` on the masked pixels).
* :func:`decompose` -> :class:`AffineDecomposition` (from :mod:`emcore.affine`, re-exported;
  rotation deg, scales, shear, translation px
  of the section centre).
* :func:`non_affine` -> :class:`NonAffine` (``|G - affine|`` map, median, p95 px).
* :func:`jacobian_outliers` -> :class:`JacobianOutliers` (``det(I + dG/dp)`` map, fraction outside
  ``[0.5, 2]``, fraction ``< 0`` = folded).
* :func:`seam_score` -> :class:`SeamScore` (median field jump across processing-chunk borders /
  median jump elsewhere: 1.0 = no seam).
* :func:`rotation_drift` -> :class:`RotationDrift` (max - min rotation over the stack, its linear
  trend along z, per-section series, deg) of affine matrices; :func:`rotation_series_drift` the same
  of per-section rotations already decomposed; :func:`linear_trend` (what a least-squares line through
  a series changes by over the stack).
* :func:`residual_vs_truth` -> :class:`TruthResidual` (``|G - G_true|`` median / p95 after removing
  the one global rigid transform between the estimated and the true stack frame, and without).
* :func:`section_metrics` -> one dict per section with all of the above (for reports and tables).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from emcore.affine import (
    AffineDecomposition,
    affine_displacement_field,
    compose_matrices,
    decompose,
    fit_affine,
)
from emcore.field import check_field, compose

__all__ = [
    "AffineDecomposition",
    "JacobianOutliers",
    "NonAffine",
    "RotationDrift",
    "SeamScore",
    "TruthResidual",
    "affine_part",
    "decompose",
    "jacobian_outliers",
    "non_affine",
    "linear_trend",
    "residual_vs_truth",
    "rotation_series_drift",
    "rotation_drift",
    "seam_score",
    "section_metrics",
]


def _one_field(field: torch.Tensor, name: str = "field") -> torch.Tensor:
    """``(2, H, W)`` or ``(1, 2, H, W)`` -> ``(2, H, W)`` float64."""
    if field.ndim == 3:
        field = field[None]
    check_field(field, name)
    if field.shape[0] != 1:
        raise ValueError(f"{name} must be one section (2, H, W) or (1, 2, H, W), got {tuple(field.shape)}")
    return field[0].to(torch.float64)


def _stack(field: torch.Tensor, name: str = "field") -> torch.Tensor:
    """``(Z, 2, H, W)`` / ``(2, H, W)`` -> ``(Z, 2, H, W)`` float64."""
    if field.ndim == 3:
        field = field[None]
    check_field(field, name)
    return field.to(torch.float64)


def _mask_2d(mask: torch.Tensor | None, height: int, width: int) -> torch.Tensor:
    if mask is None:
        return torch.ones(height, width, dtype=torch.bool)
    m = torch.as_tensor(mask).bool()
    while m.ndim > 2 and m.shape[0] == 1:
        m = m[0]
    if tuple(m.shape) != (height, width):
        raise ValueError(
            f"mask must have shape ({height}, {width}) or (1, 1, {height}, {width}), got {tuple(mask.shape)}"
        )
    return m


def _mask_stack(mask: torch.Tensor | None, shape: Sequence[int]) -> torch.Tensor:
    """``(Z, 1, H, W)`` bool mask for a stack of ``shape`` ``(Z, 2, H, W)``."""
    z, _, h, w = shape
    if mask is None:
        return torch.ones(z, 1, h, w, dtype=torch.bool)
    m = torch.as_tensor(mask).bool()
    if m.ndim == 2:
        m = m[None, None]
    elif m.ndim == 3:
        m = m[:, None]
    if m.shape[-2:] != (h, w) or m.shape[0] not in (1, z) or m.shape[1] != 1:
        raise ValueError(
            f"mask must be (H, W), (Z, H, W) or (Z, 1, H, W) for a ({z}, 2, {h}, {w}) stack, "
            f"got {tuple(mask.shape)}"
        )
    return m.expand(z, 1, h, w)


def _coords(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64), indexing="ij"
    )
    return xs, ys


def _quantiles(values: torch.Tensor) -> tuple[float, float]:
    if values.numel() == 0:
        return float("nan"), float("nan")
    q = torch.quantile(values.to(torch.float64), torch.tensor([0.5, 0.95], dtype=torch.float64))
    return float(q[0]), float(q[1])


def _sample(values: torch.Tensor, limit: int = 4_000_000) -> torch.Tensor:
    """A deterministic subsample (every k-th value) for ``torch.quantile``'s size limit."""
    values = values.reshape(-1)
    if values.numel() <= limit:
        return values
    step = -(-values.numel() // limit)
    return values[::step]


# ----------------------------------------------------------------------------------------------
# Affine part
# ----------------------------------------------------------------------------------------------


def affine_part(field: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Least-squares affine displacement matrix of one field.

    Args:
        field: ``(2, H, W)`` or ``(1, 2, H, W)`` px.
        mask: optional bool ``(H, W)`` / ``(1, 1, H, W)``: only set pixels enter the fit.

    Returns:
        ``(2, 3)`` float64 ``M`` minimizing ``sum_p |field(p) - M @ (x, y, 1)|^2`` (pixel centres).
    """
    f = _one_field(field)
    h, w = f.shape[-2:]
    keep = _mask_2d(mask, h, w)
    if int(keep.sum()) < 3:
        raise ValueError("affine_part needs at least 3 pixels in the mask")
    return fit_affine(f, keep.to(torch.float64))


# ----------------------------------------------------------------------------------------------
# Non-affine part, Jacobian
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NonAffine:
    """``|field - affine|`` per pixel ``(H, W)`` float64 px and its median / p95 over the mask."""

    magnitude: torch.Tensor
    median: float
    p95: float


def non_affine(field: torch.Tensor, matrix: torch.Tensor, mask: torch.Tensor | None = None) -> NonAffine:
    """The non-affine part of one field: ``|field - M @ (x, y, 1)|`` (Euclidean, px).

    Args:
        field: ``(2, H, W)`` / ``(1, 2, H, W)`` px; matrix: ``(2, 3)`` (usually :func:`affine_part`).
        mask: optional bool ``(H, W)``: the statistics use set pixels only (the map is complete).
    """
    f = _one_field(field)
    h, w = f.shape[-2:]
    affine = affine_displacement_field(matrix, h, w)[0].to(torch.float64)
    mag = (f - affine).norm(dim=0)
    med, p95 = _quantiles(_sample(mag[_mask_2d(mask, h, w)]))
    return NonAffine(mag, med, p95)


@dataclass(frozen=True)
class JacobianOutliers:
    """Jacobian determinant of the position map ``p -> p + field(p)``.

    Attributes:
        det: ``(H, W)`` float64 ``det(I + d field / dp)`` (central differences, one-sided at edges).
        outside: fraction of evaluated pixels with ``det < low`` or ``det > high``.
        folded: fraction with ``det < 0`` (the map folds: tissue is repeated or flipped).
        min_det, max_det: extremes over the evaluated pixels.
    """

    det: torch.Tensor
    outside: float
    folded: float
    min_det: float
    max_det: float


def jacobian_outliers(
    field: torch.Tensor, mask: torch.Tensor | None = None, *, low: float = 0.5, high: float = 2.0
) -> JacobianOutliers:
    """Fraction of pixels whose local area change ``det(I + dG/dp)`` is below ``low`` or above ``high``.

    Args:
        field: ``(2, H, W)`` / ``(1, 2, H, W)`` px (H, W >= 2).
        mask: optional bool ``(H, W)``: pixels to evaluate.
        low, high: the accepted range of the determinant (area ratio, dimensionless).
    """
    f = _one_field(field)
    h, w = f.shape[-2:]
    if h < 2 or w < 2:
        raise ValueError(f"jacobian_outliers needs at least 2 x 2 px, got {h} x {w}")
    dux_dy, dux_dx = torch.gradient(f[0])
    duy_dy, duy_dx = torch.gradient(f[1])
    det = (1.0 + dux_dx) * (1.0 + duy_dy) - dux_dy * duy_dx
    values = det[_mask_2d(mask, h, w)]
    if values.numel() == 0:
        raise ValueError("jacobian_outliers: the mask selects no pixel")
    outside = float(((values < low) | (values > high)).double().mean())
    folded = float((values < 0).double().mean())
    return JacobianOutliers(det, outside, folded, float(values.min()), float(values.max()))


# ----------------------------------------------------------------------------------------------
# Seams
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeamScore:
    """Field jumps across processing-chunk borders versus elsewhere (px at the field's mip).

    Attributes:
        ratio: ``(border_median + eps) / (elsewhere_median + eps)`` with ``eps`` = 1e-3 px (so two
            zero fields score 1.0); NaN when the field has no chunk border.
        border_median: median jump across chunk borders (px).
        elsewhere_median: median jump between all other neighbouring pixels (px).
        border_jumps: number of jumps measured across borders.
    """

    ratio: float
    border_median: float
    elsewhere_median: float
    border_jumps: int


SEAM_EPS_PX = 1e-3


def seam_score(
    field: torch.Tensor,
    chunk_xy: int | Sequence[int],
    origin: Sequence[int] = (0, 0),
    mask: torch.Tensor | None = None,
) -> SeamScore:
    """The seam ratio: median ``|G(p+1) - G(p)|`` across chunk borders / median elsewhere (1.0 = no seam).

    A jump is the Euclidean norm of the field difference of two neighbouring pixels: along x for
    pixel pairs on either side of a vertical chunk border, along y across horizontal ones.
    "Elsewhere" is every other x-neighbour and y-neighbour pair. Sections are pooled.

    Args:
        field: ``(Z, 2, H, W)`` or one section ``(2, H, W)`` px.
        chunk_xy: processing chunk side (or ``(cx, cy)``) in px at the field's mip.
        origin: ``(x, y)`` px of the chunk grid's first corner in the field array (chunks start at
            ``origin + k * chunk``); 0 when the field covers the processing region from its start.
        mask: optional ``(H, W)`` / ``(Z, 1, H, W)`` bool; a jump counts when both pixels are set.
    """
    g = _stack(field)
    z, _, h, w = g.shape
    if isinstance(chunk_xy, int):
        cx = cy = int(chunk_xy)
    else:
        cx, cy = int(chunk_xy[0]), int(chunk_xy[1])
    if cx <= 0 or cy <= 0:
        raise ValueError(f"chunk_xy must be positive, got {chunk_xy}")
    keep = _mask_stack(mask, g.shape)[:, 0]
    jx = (g[..., :, 1:] - g[..., :, :-1]).norm(dim=1)  # (Z, H, W-1): between x-1 and x for x >= 1
    jy = (g[..., 1:, :] - g[..., :-1, :]).norm(dim=1)  # (Z, H-1, W)
    kx = keep[..., :, 1:] & keep[..., :, :-1]
    ky = keep[..., 1:, :] & keep[..., :-1, :]
    xs = torch.arange(1, w)
    ys = torch.arange(1, h)
    bx = ((xs - int(origin[0])) % cx == 0).view(1, 1, w - 1).expand_as(jx)
    by = ((ys - int(origin[1])) % cy == 0).view(1, h - 1, 1).expand_as(jy)
    border = torch.cat((jx[kx & bx], jy[ky & by]))
    other = torch.cat((jx[kx & ~bx], jy[ky & ~by]))
    if other.numel() == 0:
        raise ValueError("seam_score: no pixel pairs away from chunk borders (field too small or mask empty)")
    elsewhere = float(_sample(other).median())
    if border.numel() == 0:
        return SeamScore(float("nan"), float("nan"), elsewhere, 0)
    at_border = float(_sample(border).median())
    ratio = (at_border + SEAM_EPS_PX) / (elsewhere + SEAM_EPS_PX)
    return SeamScore(ratio, at_border, elsewhere, int(border.numel()))


# ----------------------------------------------------------------------------------------------
# Drift along z
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RotationDrift:
    """Rotation of each section's affine part (deg, ``(Z,)``), its range ``max - min`` (deg) and its
    trend: the change of the least-squares line through the series from the first to the last
    section (deg, :func:`linear_trend`).

    The two differ where one section is turned against both neighbours (its correction widens the
    range, not the trend) and agree where the rotation accumulates along z (drift bends the stack).
    """

    drift_deg: float
    series_deg: tuple[float, ...]
    trend_deg: float = 0.0


def linear_trend(values: Sequence[float], positions: Sequence[float] | None = None) -> float:
    """Slope of the least-squares line through ``values`` at ``positions`` (default ``0 .. n-1``)
    times the positions' extent (``max - min``): the change along the stack that the line says.
    0.0 for fewer than two values."""
    y = np.asarray(values, dtype=np.float64)
    x = np.arange(len(y), dtype=np.float64) if positions is None else np.asarray(positions, np.float64)
    if len(y) < 2 or np.ptp(x) == 0:
        return 0.0
    xc = x - x.mean()
    return float((xc @ (y - y.mean())) / (xc @ xc) * np.ptp(x))


def rotation_series_drift(
    angles_deg: Sequence[float], positions: Sequence[float] | None = None
) -> RotationDrift:
    """Range and linear trend of per-section rotations ``angles_deg`` (deg) at ``positions``
    (section z; default ``0 .. n-1``). At least one angle."""
    angles = tuple(float(a) for a in angles_deg)
    if not angles:
        raise ValueError("rotation_series_drift needs at least one section's rotation")
    return RotationDrift(max(angles) - min(angles), angles, linear_trend(angles, positions))


def rotation_drift(matrices: torch.Tensor | Sequence[torch.Tensor]) -> RotationDrift:
    """:func:`rotation_series_drift` of the rotations of ``(Z, 2, 3)`` affine displacement matrices
    (e.g. :func:`affine_part` of each ``G[z]``, or a sequence of ``(2, 3)``), sections equally spaced;
    each rotation as :func:`emcore.affine.decompose` gives it."""
    ms = torch.stack([torch.as_tensor(m, dtype=torch.float64) for m in matrices]) if not isinstance(
        matrices, torch.Tensor
    ) else matrices.to(torch.float64)
    if ms.ndim != 3 or ms.shape[1:] != (2, 3) or ms.shape[0] == 0:
        raise ValueError(f"matrices must have shape (Z, 2, 3) with Z >= 1, got {tuple(ms.shape)}")
    return rotation_series_drift([decompose(m, 1, 1).rotation_deg for m in ms])


# ----------------------------------------------------------------------------------------------
# Residual against the truth
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TruthResidual:
    """``|G - G_true|`` over the stack, px at the fields' mip.

    Attributes:
        median, p95: after removing the best global rigid frame change (one for the whole stack).
        plain_median, plain_p95: without that removal.
        rigid: ``(2, 3)`` float64 displacement matrix ``r`` of that frame change:
            ``G ~= compose(r, G_true)``, i.e. estimated-frame point ``p`` is true-frame point
            ``p + r(p)``.
        rigid_rotation_deg, rigid_translation: ``r`` in words (translation of the section centre, px).
        per_section_median: ``(Z,)`` median residual of each section after the removal.
    """

    median: float
    p95: float
    plain_median: float
    plain_p95: float
    rigid: torch.Tensor
    rigid_rotation_deg: float
    rigid_translation: tuple[float, float]
    per_section_median: tuple[float, ...]


def _kabsch(points: torch.Tensor, disp: torch.Tensor) -> torch.Tensor:
    """Least-squares rigid displacement matrix ``(2, 3)`` for ``p -> p + disp`` (``(P, 2)`` each)."""
    q = points + disp
    pc, qc = points.mean(0), q.mean(0)
    cov = (q - qc).T @ (points - pc)
    u, _, vt = torch.linalg.svd(cov)
    d = float(torch.sign(torch.linalg.det(u @ vt)))
    rot = u @ torch.diag(torch.tensor([1.0, d if d != 0 else 1.0], dtype=torch.float64)) @ vt
    t = qc - rot @ pc
    return torch.cat((rot - torch.eye(2, dtype=torch.float64), t[:, None]), dim=1)


def residual_vs_truth(
    fields: torch.Tensor,
    true_fields: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    iterations: int = 6,
) -> TruthResidual:
    """Residual of estimated against true fields, up to the arbitrary rigid frame of the stack.

    An aligner may put the stack into any frame: the estimate is right if ``G[z] = compose(r,
    G_true[z])`` for ONE rigid ``r`` shared by all sections. ``r`` is fitted by Gauss-Newton on
    the pooled residual (Kabsch on ``G - compose(r, G_true)``, composed into ``r``, ``iterations``
    times); a rotation or shift that grows along z is not rigid-for-all and stays in the residual.

    Args:
        fields, true_fields: ``(Z, 2, H, W)`` px at the same mip.
        mask: optional bool ``(H, W)``, ``(Z, H, W)`` or ``(Z, 1, H, W)``: pixels to evaluate (e.g.
            where the truth points inside the source, away from the edge).
    """
    g = _stack(fields, "fields")
    t = _stack(true_fields, "true_fields")
    if g.shape != t.shape:
        raise ValueError(f"fields {tuple(g.shape)} and true_fields {tuple(t.shape)} must have the same shape")
    z, _, h, w = g.shape
    keep = _mask_stack(mask, g.shape)
    if not bool(keep.any()):
        raise ValueError("residual_vs_truth: the mask selects no pixel")
    plain = (g - t).norm(dim=1, keepdim=True)[keep]
    xs, ys = _coords(h, w)
    pts = torch.stack((xs, ys), dim=-1).expand(z, h, w, 2)[keep[:, 0]]  # (P, 2)
    r = torch.zeros(2, 3, dtype=torch.float64)
    for _ in range(iterations):
        moved = compose(affine_displacement_field(r, h, w).to(torch.float64), t)
        d = (g - moved).permute(0, 2, 3, 1)[keep[:, 0]]  # (P, 2)
        step = _kabsch(pts, d)
        r = compose_matrices(step, r)
        if float(step.abs().max()) < 1e-7:
            break
    moved = compose(affine_displacement_field(r, h, w).to(torch.float64), t)
    err = (g - moved).norm(dim=1, keepdim=True)
    med, p95 = _quantiles(_sample(err[keep]))
    pmed, pp95 = _quantiles(_sample(plain))
    per = tuple(float(err[i][keep[i]].median()) if bool(keep[i].any()) else float("nan") for i in range(z))
    parts = decompose(r, h, w)
    return TruthResidual(med, p95, pmed, pp95, r, parts.rotation_deg, parts.translation, per)


# ----------------------------------------------------------------------------------------------
# Everything per section
# ----------------------------------------------------------------------------------------------


def section_metrics(
    fields: torch.Tensor,
    *,
    chunk_xy: int | None = None,
    origin: Sequence[int] = (0, 0),
    mask: torch.Tensor | None = None,
) -> list[dict[str, float]]:
    """Per-section quality of a stack's final fields ``(Z, 2, H, W)`` px: one dict per section.

    Keys: ``rotation_deg``, ``scale_x``, ``scale_y``, ``shear``, ``tx``, ``ty`` (px, centre),
    ``non_affine_median``, ``non_affine_p95`` (px), ``jacobian_outside``, ``jacobian_folded``
    (fractions), and ``seam_ratio`` with ``seam_excess_px`` (median jump across chunk borders less
    the median jump elsewhere, px) when ``chunk_xy`` is given (NaN without a chunk border).
    """
    g = _stack(fields)
    z, _, h, w = g.shape
    keep = _mask_stack(mask, g.shape)
    rows = []
    for i in range(z):
        m = affine_part(g[i], keep[i, 0])
        parts = decompose(m, h, w)
        na = non_affine(g[i], m, keep[i, 0])
        jac = jacobian_outliers(g[i], keep[i, 0])
        row = {
            "rotation_deg": parts.rotation_deg,
            "scale_x": parts.scale_x,
            "scale_y": parts.scale_y,
            "shear": parts.shear,
            "tx": parts.translation[0],
            "ty": parts.translation[1],
            "non_affine_median": na.median,
            "non_affine_p95": na.p95,
            "jacobian_outside": jac.outside,
            "jacobian_folded": jac.folded,
        }
        if chunk_xy is not None:
            seam = seam_score(g[i], chunk_xy, origin, keep[i, 0])
            row["seam_ratio"] = seam.ratio
            row["seam_excess_px"] = seam.border_median - seam.elsewhere_median
        rows.append(row)
    return rows
