"""Bending energy of a displacement field: a smoothness penalty that leaves affine motion free.

The spring rigidity of :mod:`emcore.finetune.loss_reference` penalizes any change of length, so
it also penalizes true strain (a section stretched by 5 % pays for it) and pulls a recovered
field towards a rigid one. The bending (thin-plate) energy penalizes curvature only::

    bending(field) = mean over points of  sum_c  (d2 u_c/dx2)^2 + 2 (d2 u_c/dx dy)^2 + (d2 u_c/dy2)^2

(second differences, ``u_c`` the x and y displacement): translations, rotations, scalings and
shears cost nothing, so it smooths the field against image noise without biasing strain.

Shapes and units: ``field`` ``(N, 2, H, W)`` in px at its own mip (:mod:`emcore.field`
convention), differences per px at that mip. :func:`bending_energy` returns ``(N,)``; to compare
fields held at different mips, :func:`bending_energy` takes ``mip``: the energy is returned in
mip-0 units (a field at mip ``k`` moves ``2**k`` times more mip-0 px per value over ``2**k`` times
the distance, so its second differences are ``2**k`` times smaller in mip-0 px per mip-0 px^2:
the energy is divided by ``4**k``). The mean runs over the points where the stencil fits, so the
value is a per-area density that does not grow with the field's size.

``weight`` (optional, ``(N, 1, H, W)`` in ``[0, 1]``) cuts the penalty where tissue may tear: each
stencil term is multiplied by the product of the weights of the points it touches (0 at folds,
cracks and no data).

Higher orders (:func:`smoothness_energy`, ``order`` n = 3 or 4): the same density of the n-th
derivatives, ``sum_k C(n, k) (d^n u_c / dx^k dy^(n-k))^2`` (forward differences; n = 2 is the
bending energy above). Polynomial motion of degree < n costs nothing; in frequency a penalty of
order n grows as ``|omega|^(2n)``, so at the weight that suppresses the same noise at high
frequencies it flattens the band of a smooth strain field less (a sharper low-pass). Units as
above: a field at mip ``k`` has its energy divided by ``4**(k (n - 1))`` (mip-0 px per mip-0
px^n), so one weight means the same continuous penalty at every mip.
"""

from __future__ import annotations

import math

import torch

__all__ = ["MAX_ORDER", "bending_energy", "smoothness_energy"]

#: Highest derivative order :func:`smoothness_energy` accepts.
MAX_ORDER = 4


def _second_differences(field: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(d2/dx2, d2/dy2, d2/dxdy)`` of ``(N, C, H, W)``, spatial shapes ``(H, W-2)``, ``(H-2, W)``,
    ``(H-1, W-1)``."""
    dxx = field[..., :, 2:] - 2 * field[..., :, 1:-1] + field[..., :, :-2]
    dyy = field[..., 2:, :] - 2 * field[..., 1:-1, :] + field[..., :-2, :]
    dxy = field[..., 1:, 1:] - field[..., 1:, :-1] - field[..., :-1, 1:] + field[..., :-1, :-1]
    return dxx, dyy, dxy


def _stencil_weights(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Products of ``weight`` over the points of each stencil of :func:`_second_differences`."""
    wxx = weight[..., :, 2:] * weight[..., :, 1:-1] * weight[..., :, :-2]
    wyy = weight[..., 2:, :] * weight[..., 1:-1, :] * weight[..., :-2, :]
    wxy = weight[..., 1:, 1:] * weight[..., 1:, :-1] * weight[..., :-1, 1:] * weight[..., :-1, :-1]
    return wxx, wyy, wxy


def bending_energy(field: torch.Tensor, *, mip: int = 0, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Thin-plate bending energy of each item, ``(N,)`` (see the module docstring).

    Args:
        field: ``(N, 2, H, W)`` float field in px at ``mip``; ``H, W >= 3`` (smaller: 0).
        mip: the field's mip relative to the units of the result (mip-0 px per mip-0 px^2).
        weight: optional ``(N, 1, H, W)`` per-point weights in ``[0, 1]`` (0 = may tear).
    """
    if field.dim() != 4 or field.shape[1] != 2:
        raise ValueError(f"field must be (N, 2, H, W), got {tuple(field.shape)}")
    n, _, h, w = field.shape
    if h < 3 or w < 3:
        return field.new_zeros(n)
    dxx, dyy, dxy = _second_differences(field)
    terms = [dxx.square(), dyy.square(), 2 * dxy.square()]
    if weight is not None:
        if weight.shape != (n, 1, h, w):
            raise ValueError(f"weight must be {(n, 1, h, w)}, got {tuple(weight.shape)}")
        terms = [t * s for t, s in zip(terms, _stencil_weights(weight.to(field.dtype)), strict=True)]
    energy = sum(t.sum(dim=(1, 2, 3)) / (t.shape[-1] * t.shape[-2]) for t in terms)
    return energy / 4**mip


def _differences(t: torch.Tensor, dim: int, times: int) -> torch.Tensor:
    """``times``-fold forward difference of ``t`` along ``dim`` (the axis shrinks by ``times``)."""
    for _ in range(times):
        size = t.shape[dim]
        t = t.narrow(dim, 1, size - 1) - t.narrow(dim, 0, size - 1)
    return t


def smoothness_energy(field: torch.Tensor, *, mip: int = 0, order: int = 2) -> torch.Tensor:
    """``(N,)`` density of the squared ``order``-th derivatives of ``(N, 2, H, W)`` ``field`` (px at
    ``mip``; see the module docstring), in mip-0 units. ``order`` 2 is :func:`bending_energy`
    itself (the same computation); 3 and 4 leave quadratic / cubic motion free. A field with fewer
    than ``order + 1`` points along an axis contributes 0 for the terms that need them."""
    if not (isinstance(order, int) and 2 <= order <= MAX_ORDER):
        raise ValueError(f"order must be an int in [2, {MAX_ORDER}], got {order!r}")
    if order == 2:
        return bending_energy(field, mip=mip)
    if field.dim() != 4 or field.shape[1] != 2:
        raise ValueError(f"field must be (N, 2, H, W), got {tuple(field.shape)}")
    energy = field.new_zeros(field.shape[0])
    for k in range(order + 1):
        term = _differences(_differences(field, -1, k), -2, order - k).square()
        points = term.shape[-1] * term.shape[-2]
        if points > 0:
            energy = energy + math.comb(order, k) * term.sum(dim=(1, 2, 3)) / points
    return energy / 4 ** (mip * (order - 1))
