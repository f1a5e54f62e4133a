"""Affine maps of sections as 2 x 3 *displacement* matrices: build, compose, invert, rescale, describe.

A displacement matrix ``M`` (float64, ``(2, 3)``) acts on pixel-centre coordinates ``(x, y, 1)``
relative to a stated origin pixel (usually the top-left pixel of the region or image the field
covers): ``field(x, y) = M @ (x, y, 1)``, the :mod:`emcore.field` convention (pull semantics,
channel 0 = x, px at the matrix's mip). Its *position map* is ``T(p) = p + M @ (p, 1)``.

API summary
-----------
* :func:`affine_displacement_field` -> ``(1, 2, H, W)`` float32 field of a matrix.
* :func:`compose_matrices` / :func:`invert_matrix`: exact :func:`emcore.field.compose` / ``invert``.
* :func:`rotation_matrix`: a rotation by an angle about the image centre.
* :func:`rescale_matrix`: the same map expressed at another mip (pixel centres stay aligned as in
  :func:`emcore.field.resample_field`).
* :func:`shift_origin`: the same map expressed relative to another origin pixel.
* :func:`decompose` -> :class:`AffineDecomposition` (rotation deg, scales, shear, translation px
  at the centre of a ``height x width`` section).
* :func:`fit_affine` -> the least-squares matrix of a field (optionally weighted); the same fit
  from :class:`AffineMoments` summed over chunks (:func:`affine_moments`, :func:`fit_affine_moments`).
* :func:`compose_with_affine` -> exact ``emcore.field.compose(field, affine)`` (no resampling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "AffineDecomposition",
    "AffineMoments",
    "affine_displacement_field",
    "affine_moments",
    "compose_matrices",
    "compose_with_affine",
    "decompose",
    "fit_affine",
    "fit_affine_moments",
    "invert_matrix",
    "rescale_matrix",
    "rotation_matrix",
    "shift_origin",
]


def affine_displacement_field(matrix: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(1, 2, height, width)`` float32 field ``f(x, y) = matrix @ (x, y, 1)`` (pixel centres)."""
    matrix = torch.as_tensor(matrix, dtype=torch.float64)
    if matrix.shape != (2, 3):
        raise ValueError(f"matrix must have shape (2, 3), got {tuple(matrix.shape)}")
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64), indexing="ij"
    )
    fx = matrix[0, 0] * xs + matrix[0, 1] * ys + matrix[0, 2]
    fy = matrix[1, 0] * xs + matrix[1, 1] * ys + matrix[1, 2]
    return torch.stack((fx, fy))[None].to(torch.float32)


def rotation_matrix(angle_deg: float, height: int, width: int) -> torch.Tensor:
    """Displacement matrix of a rotation by ``angle_deg`` about the image centre."""
    theta = math.radians(angle_deg)
    c, s = math.cos(theta), math.sin(theta)
    cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
    lin = torch.tensor([[c - 1.0, -s], [s, c - 1.0]], dtype=torch.float64)
    offset = -(lin @ torch.tensor([cx, cy], dtype=torch.float64))
    return torch.cat((lin, offset[:, None]), dim=1)


def compose_matrices(f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Displacement matrix of ``emcore.field.compose(f, g)`` for affine ``f``, ``g`` (``(2, 3)`` each).

    ``compose(f, g)(p) = f(p) + g(p + f(p))``: warping by ``g`` then by ``f``.
    """
    f, g = torch.as_tensor(f, dtype=torch.float64), torch.as_tensor(g, dtype=torch.float64)
    eye = torch.eye(2, dtype=torch.float64)
    lin = f[:, :2] + g[:, :2] @ (eye + f[:, :2])
    off = f[:, 2] + g[:, :2] @ f[:, 2] + g[:, 2]
    return torch.cat((lin, off[:, None]), dim=1)


def invert_matrix(matrix: torch.Tensor) -> torch.Tensor:
    """The displacement matrix ``h`` with ``compose(h, matrix) == 0`` (and ``compose(matrix, h) == 0``).

    With position maps ``T(p) = p + M @ (p, 1)``, ``T_h`` is the inverse map of ``T_matrix``.
    """
    m = torch.as_tensor(matrix, dtype=torch.float64)
    if m.shape != (2, 3):
        raise ValueError(f"matrix must have shape (2, 3), got {tuple(m.shape)}")
    eye = torch.eye(2, dtype=torch.float64)
    a = eye + m[:, :2]
    if abs(float(torch.linalg.det(a))) < 1e-9:
        raise ValueError("matrix is not invertible (its position map collapses the plane)")
    a_inv = torch.linalg.inv(a)
    return torch.cat((a_inv - eye, -(a_inv @ m[:, 2])[:, None]), dim=1)


def _as_matrix(matrix: torch.Tensor | list) -> torch.Tensor:
    m = torch.as_tensor(matrix, dtype=torch.float64)
    if m.shape != (2, 3):
        raise ValueError(f"matrix must have shape (2, 3), got {tuple(m.shape)}")
    return m


def rescale_matrix(matrix: torch.Tensor, from_mip: int, to_mip: int) -> torch.Tensor:
    """``matrix`` (px at ``from_mip``, origin = pixel 0) expressed at ``to_mip`` (origin = pixel 0).

    Pixel centres follow :func:`emcore.field.resample_field`: pixel ``i`` at mip ``m`` has its centre
    at ``s * i + (s - 1) / 2`` at mip ``m - log2 s``. With ``s = 2 ** (from_mip - to_mip)`` and
    ``c = (s - 1) / 2``: ``M' = [L | s t - L c]`` (``L`` the linear part, ``t`` the translation);
    the linear part is unitless and stays.
    """
    m = _as_matrix(matrix)
    s = 2.0 ** (from_mip - to_mip)
    c = (s - 1.0) / 2.0
    lin = m[:, :2]
    t = s * m[:, 2] - lin @ torch.tensor([c, c], dtype=torch.float64)
    return torch.cat((lin, t[:, None]), dim=1)


def shift_origin(matrix: torch.Tensor, offset: tuple[float, float]) -> torch.Tensor:
    """The map of ``matrix`` relative to the pixel ``offset = (x, y)`` (px, in the old origin's frame).

    ``field(q) = M @ (q + offset, 1) = L q + (L offset + t)`` for the new coordinates ``q``.
    """
    m = _as_matrix(matrix)
    o = torch.tensor([float(offset[0]), float(offset[1])], dtype=torch.float64)
    return torch.cat((m[:, :2], (m[:, :2] @ o + m[:, 2])[:, None]), dim=1)


@dataclass(frozen=True)
class AffineDecomposition:
    """A displacement matrix in words: the position map's linear part ``A = I + L = R(theta) U``,
    ``R`` a rotation and ``U = [[scale_x, shear], [0, scale_y]]`` upper triangular.

    Attributes:
        rotation_deg: ``theta`` (deg), the sign of :func:`rotation_matrix` (a matrix built by
            ``rotation_matrix(a, ...)`` decomposes to ``a``; positive = counter-clockwise in (x, y)
            with y down, as :func:`emcore.synthetic.affine_field`).
        scale_x, scale_y: diagonal of ``U`` (1 = no scaling).
        shear: its off-diagonal (dimensionless; 0 = none).
        translation: ``(tx, ty)`` px, the displacement of the section centre ``((W-1)/2, (H-1)/2)``.
    """

    rotation_deg: float
    scale_x: float
    scale_y: float
    shear: float
    translation: tuple[float, float]


def decompose(matrix: torch.Tensor, height: int, width: int) -> AffineDecomposition:
    """Rotation (deg), scales, shear and centre translation (px) of a ``(2, 3)`` displacement matrix.

    ``height``, ``width``: the section size in px (the centre is ``((width-1)/2, (height-1)/2)``).
    """
    m = _as_matrix(matrix)
    a = torch.eye(2, dtype=torch.float64) + m[:, :2]
    theta = math.atan2(float(a[1, 0]), float(a[0, 0]))
    c, s = math.cos(theta), math.sin(theta)
    scale_x = math.hypot(float(a[0, 0]), float(a[1, 0]))
    shear = c * float(a[0, 1]) + s * float(a[1, 1])
    scale_y = -s * float(a[0, 1]) + c * float(a[1, 1])
    centre = torch.tensor([(width - 1) / 2.0, (height - 1) / 2.0, 1.0], dtype=torch.float64)
    t = m @ centre
    return AffineDecomposition(math.degrees(theta), scale_x, scale_y, shear, (float(t[0]), float(t[1])))


@dataclass(frozen=True)
class AffineMoments:
    """Weighted least-squares sums of a field for an affine fit; sums of parts add up.

    With design rows ``d = (x, y, 1)`` (pixel centres relative to a stated origin pixel, px) and
    displacements ``f = (fx, fy)``: ``s = sum w d^T d`` ``(3, 3)`` and ``b = sum w d^T f``
    ``(3, 2)``, float64. The moments of chunks of one section (each with its offset from the
    common origin) add up to the moments of the whole section, so a section's affine part can be
    fitted from per-chunk results without ever holding the section.
    """

    s: torch.Tensor
    b: torch.Tensor

    def __add__(self, other: AffineMoments) -> AffineMoments:
        return AffineMoments(self.s + other.s, self.b + other.b)

    @property
    def weight(self) -> float:
        """The total weight (number of pixels when unweighted)."""
        return float(self.s[2, 2])

    def to_list(self) -> list[list[float]]:
        """JSON-able ``3 x 5`` rows ``[s | b]``."""
        return torch.cat((self.s, self.b), dim=1).tolist()

    @staticmethod
    def from_list(rows: list[list[float]]) -> AffineMoments:
        m = torch.tensor(rows, dtype=torch.float64)
        if m.shape != (3, 5):
            raise ValueError(f"affine moments must be 3 x 5 rows, got {tuple(m.shape)}")
        return AffineMoments(m[:, :3].clone(), m[:, 3:].clone())

    @staticmethod
    def zero() -> AffineMoments:
        return AffineMoments(torch.zeros(3, 3, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.float64))


def affine_moments(
    field: torch.Tensor, weight: torch.Tensor | None = None, origin: tuple[int, int] = (0, 0)
) -> AffineMoments:
    """:class:`AffineMoments` of a ``(1, 2, H, W)`` (or ``(2, H, W)``) field.

    ``weight`` (``(H, W)`` or broadcastable, >= 0; default 1) weighs pixels; ``origin`` ``(x, y)``
    is the position of the field's pixel ``(0, 0)`` relative to the common origin (px).
    """
    f = field[0] if field.ndim == 4 else field
    if f.ndim != 3 or f.shape[0] != 2:
        raise ValueError(f"field must have shape (1, 2, H, W) or (2, H, W), got {tuple(field.shape)}")
    h, w = f.shape[-2:]
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float64) + origin[1],
        torch.arange(w, dtype=torch.float64) + origin[0],
        indexing="ij",
    )
    wt = torch.ones(h, w, dtype=torch.float64) if weight is None else torch.as_tensor(weight).double()
    wt = wt.expand(h, w).reshape(-1)
    design = torch.stack((xs.reshape(-1), ys.reshape(-1), torch.ones(h * w, dtype=torch.float64)), dim=1)
    weighted = design * wt[:, None]
    return AffineMoments(weighted.T @ design, weighted.T @ f.reshape(2, -1).T.double())


def fit_affine_moments(moments: AffineMoments) -> torch.Tensor:
    """The least-squares displacement matrix ``(2, 3)`` (origin = the moments' origin).

    Solved in coordinates centred on the weighted mean pixel (conditioning for large sections).

    Raises:
        ValueError: no positive weight, or the weighted pixels lie on a line (no unique fit).
    """
    s, b = moments.s, moments.b
    total = float(s[2, 2])
    if total <= 0:
        raise ValueError("an affine fit needs a positive weight somewhere")
    cx, cy = float(s[0, 2]) / total, float(s[1, 2]) / total
    shift = torch.tensor([[1.0, 0.0, -cx], [0.0, 1.0, -cy], [0.0, 0.0, 1.0]], dtype=torch.float64)
    sc, bc = shift @ s @ shift.T, shift @ b  # the same sums in centred coordinates
    if abs(float(torch.linalg.det(sc))) <= 1e-12 * max(1.0, float(sc.abs().max())) ** 3:
        raise ValueError("an affine fit needs weighted pixels that do not lie on one line")
    sol = torch.linalg.solve(sc, bc).T  # (2, 3) in centred coordinates
    lin = sol[:, :2]
    offset = sol[:, 2] - lin @ torch.tensor([cx, cy], dtype=torch.float64)
    return torch.cat((lin, offset[:, None]), dim=1).contiguous()


def fit_affine(field: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Least-squares displacement matrix ``(2, 3)`` of a ``(1, 2, H, W)`` (or ``(2, H, W)``) field.

    ``weight`` (``(H, W)`` or broadcastable, >= 0) weighs pixels (e.g. 0 outside tissue); default 1.
    Origin = pixel ``(0, 0)`` of the field.
    """
    return fit_affine_moments(affine_moments(field, weight))


def compose_with_affine(field: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``compose(field, affine)`` exactly: ``field(p) + M @ (p + field(p), 1)``.

    ``field`` is ``(N, 2, H, W)`` px, ``matrix`` ``(2, 3)`` px with origin = pixel ``(0, 0)`` of the
    field; the result (same shape, float32) warps by the affine map first, then by ``field``
    (:func:`emcore.field.compose`'s order). No interpolation: valid up to the image border.
    """
    m = _as_matrix(matrix).to(field.device)
    h, w = field.shape[-2:]
    base = affine_displacement_field(m.cpu(), h, w).to(field.device, torch.float64)
    lin = m[:, :2]
    f = field.to(torch.float64)
    moved = torch.einsum("rc,nchw->nrhw", lin, f)
    return (f + base + moved).to(torch.float32)
