"""Global affine stack solve: one affine map per section from pairwise affine estimates, without drift.

Frames follow :mod:`emcore.stack_solve`: ``P[z, k]`` aligns section ``z`` onto ``z - k`` and ``G[z]``
aligns section ``z`` into the stack frame, consistent when ``G[z] = compose(G[z - k], P[z, k])``.
Here every map is affine, a 2 x 3 displacement matrix (:mod:`emcore.affine`, px at one mip, origin
= pixel 0 of the region, a ``height x width`` section). In position maps (``T(p) = p + M (p, 1)``)
consistency reads ``T_G[z] = T_P[z,k] o T_G[z-k]``: linear in the unknowns.

Why a prior: pairwise estimates between *neighbouring* sections see content change as motion.
On real registered stacks (the shared FIB-SEM medulla, registered by acquisition, and the VNC
ssTEM stack) every pairwise estimator we tried, elastix's too, finds a small rotation of one sign
(-0.02 to -0.06 deg per pair on the medulla, from oblique structures), and chaining the pairs
turns it into a drift that grows linearly with z. Real misalignment is the opposite: every section
is cut, picked up and imaged on its own, so its placement error is independent of its neighbours'
and bounded. The solve therefore minimizes (all terms mean squared px over the section)::

    E = sum_{z,k} w[z,k] rho(|T_G[z] - T_P[z,k] o T_G[z-k]|^2)
        + sum_z (lambda_linear |L_z D|^2 + lambda_translation |t_z|^2)

with ``L_z``, ``t_z`` the linear part and centre translation of ``G[z]`` and ``D`` the section's
second-moment scale: the maximum a posteriori estimate when placements are independent with a
zero-mean prior. ``lambda = 1 / drift_sections**2``: a consistent per-pair bias ``b`` then moves a
section by at most about ``b * drift_sections`` instead of ``b * z``, while an independent
misalignment of a section is undone to a fraction ``1 / (1 + 2 n drift_sections**2)`` of its size
(``n`` pairs per section). The linear part gets a short length (its evidence between neighbours is
weak: content rotates it), the translation a long one.

How strong: fixed lengths, measured (tests/test_affine_solve.py on synthetic stacks; the shared
stacks in benchmarks/README.md, "Stack benchmark"): the linear part
``DEFAULT_DRIFT_SECTIONS_LINEAR`` = 0.7 (content rotations of -0.06 / -0.19 deg per z-1 / z-2 pair,
as on the medulla, drift by 0.05 deg over 12-64 sections instead of 0.7-4 deg; independent +-1 deg,
+-20 px misplacements of 256 px sections are undone to 0.2-0.8 px median, 1.1-1.2 px p95), the
translation ``DEFAULT_DRIFT_SECTIONS_TRANSLATION`` = 64 (independent shifts are undone to ~0.1 %).
Two data-driven rules were tried and dropped: an estimate of the misalignment variance from the
lag-1 anti-correlation of neighbouring pairs (too noisy with 10-60 pairs: it chose a strong prior
for a misaligned 12-section stack and undid nothing), and a robust (Cauchy) prior on each section's
deviation (it fought the robust pair loss and collapsed onto the prior). Callers weigh pairs ``z ->
z-k`` by ``1 / k**2``: content differences, and with them the apparent motion, grow with the
distance between sections (on the medulla the z-2 pairs rotate 2-4 times as much as the z-1 pairs).

``rho`` is a Cauchy loss of scale ``robust_px`` on a pair's RMS residual (iteratively reweighted),
so one wrong pair is outvoted by the others. The fixed section (default the first non-blank one)
keeps ``G = 0`` and defines the frame. Sections with no pair (blank, or every pair rejected) are
interpolated linearly in z between the nearest solved sections (copied at the ends); the solve
lists them.

The columns of ``[A | t]`` decouple (the x-coefficients, y-coefficients and translations of all
sections form three independent sparse systems of ``2 Z`` unknowns), so the solve is cheap even for
``10**4`` sections.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch

from emcore.affine import shift_origin

__all__ = [
    "DEFAULT_DRIFT_SECTIONS_LINEAR",
    "DEFAULT_DRIFT_SECTIONS_TRANSLATION",
    "AffineStackSolution",
    "solve_affine_stack",
]

#: Prior lengths (sections) of the linear part and of the translation (module docstring).
DEFAULT_DRIFT_SECTIONS_LINEAR = 0.7
DEFAULT_DRIFT_SECTIONS_TRANSLATION = 64.0


@dataclass(frozen=True)
class AffineStackSolution:
    """Result of :func:`solve_affine_stack`.

    Attributes:
        matrices: ``(Z, 2, 3)`` float64 displacement matrices ``G[z]`` (px, origin pixel 0).
        fixed: the section with ``G = 0``.
        interpolated: sections without a usable pair, interpolated in z.
        pair_residual_px: per used pair, the RMS px residual over the section at the solution.
        pair_weight: per used pair, the final robust weight (0..1; low = outvoted).
    """

    matrices: torch.Tensor
    fixed: int
    interpolated: tuple[int, ...]
    pair_residual_px: dict[tuple[int, int], float]
    pair_weight: dict[tuple[int, int], float]


def _centred(matrix: torch.Tensor, centre: tuple[float, float]) -> np.ndarray:
    """Position map ``[A | b]`` (2 x 3) in coordinates centred on the section."""
    m = shift_origin(matrix, centre).numpy()
    return np.concatenate((np.eye(2) + m[:, :2], m[:, 2:]), axis=1)


def _uncentred(b: np.ndarray, centre: tuple[float, float]) -> torch.Tensor:
    m = np.concatenate((b[:, :2] - np.eye(2), b[:, 2:]), axis=1)
    return shift_origin(torch.from_numpy(m), (-centre[0], -centre[1]))


def solve_affine_stack(
    pairs: Mapping[tuple[int, int], torch.Tensor],
    num_sections: int,
    height: int,
    width: int,
    *,
    weights: Mapping[tuple[int, int], float] | None = None,
    blank: Iterable[int] = (),
    fixed: int | None = None,
    drift_sections_linear: float = DEFAULT_DRIFT_SECTIONS_LINEAR,
    drift_sections_translation: float = DEFAULT_DRIFT_SECTIONS_TRANSLATION,
    robust_px: float | None = 2.0,
    iterations: int = 8,
) -> AffineStackSolution:
    """Solve for ``G[z]`` (affine, see the module docstring) from pairwise matrices ``P[z, k]``.

    Args:
        pairs: ``{(z, k): (2, 3) matrix}``, px at one mip, origin pixel 0 of the section.
        num_sections: ``Z``; sections ``0 .. Z - 1``.
        height, width: section size (px at the matrices' mip): the px metric of every term.
        weights: optional ``{(z, k): w >= 0}`` (default 1; 0 = ignore the pair).
        blank: sections that take part in no pair (interpolated).
        fixed: the frame section (default the first section with a pair, else the first non-blank).
        drift_sections_linear, drift_sections_translation: prior lengths (> 0; ``inf`` = no prior).
        robust_px: Cauchy scale on a pair's RMS residual; ``None`` = least squares.
        iterations: reweighting rounds (1 = plain weighted least squares).

    Raises:
        ValueError: malformed pairs or weights, or a blank / out-of-range fixed section.
    """
    blank_set = {int(z) for z in blank}
    centre = ((width - 1) / 2.0, (height - 1) / 2.0)
    scale = np.array([np.sqrt((width**2 - 1) / 12.0), np.sqrt((height**2 - 1) / 12.0), 1.0])
    active: dict[tuple[int, int], tuple[np.ndarray, float]] = {}
    for (z, k), matrix in pairs.items():
        z, k = int(z), int(k)
        if k < 1 or not 0 <= z - k < z < num_sections:
            raise ValueError(f"pair (z={z}, k={k}) must have k >= 1 and 0 <= z - k < z < {num_sections}")
        w = 1.0 if weights is None else float(weights.get((z, k), 1.0))
        if not np.isfinite(w) or w < 0:
            raise ValueError(f"weight of pair ({z}, {k}) must be finite and >= 0, got {w}")
        m = torch.as_tensor(matrix, dtype=torch.float64)
        if m.shape != (2, 3) or not torch.isfinite(m).all():
            raise ValueError(f"pair ({z}, {k}) must be a finite (2, 3) matrix, got {tuple(m.shape)}")
        if w > 0 and z not in blank_set and z - k not in blank_set:
            active[(z, k)] = (_centred(m, centre), w)
    linked = sorted({z for z, _ in active} | {z - k for z, k in active})
    if fixed is None:
        candidates = linked or [z for z in range(num_sections) if z not in blank_set]
        if not candidates:
            raise ValueError("every section is blank: nothing to align")
        fixed = candidates[0]
    if not 0 <= fixed < num_sections or fixed in blank_set:
        raise ValueError(f"fixed section {fixed} must be a non-blank section in 0..{num_sections - 1}")
    if not (drift_sections_linear > 0 and drift_sections_translation > 0):
        raise ValueError(
            f"drift_sections_* must be > 0, got {drift_sections_linear}, {drift_sections_translation}"
        )
    free = [z for z in linked if z != fixed]
    index = {z: i for i, z in enumerate(free)}
    n = len(free)
    prior = [1.0 / drift_sections_linear**2] * 2 + [1.0 / drift_sections_translation**2]
    robust = {key: 1.0 for key in active}
    solution = {z: np.concatenate((np.eye(2), np.zeros((2, 1))), axis=1) for z in range(num_sections)}
    for _ in range(max(1, iterations) if robust_px is not None else 1):
        for j in range(3):
            blocks: list[tuple[int, int, np.ndarray]] = []
            rhs = np.zeros(2 * n)
            target = np.eye(2)[:, j] if j < 2 else np.zeros(2)
            for i in range(n):
                blocks.append((i, i, prior[j] * scale[j] ** 2 * np.eye(2)))
                rhs[2 * i : 2 * i + 2] += prior[j] * scale[j] ** 2 * target
            for (z, k), (bp, w) in active.items():
                wt = w * robust[(z, k)] * scale[j] ** 2
                a_p, d = bp[:, :2], (bp[:, 2] if j == 2 else np.zeros(2))
                # residual r = x_z - A_P x_{z-k} - d (column j); known x for the fixed section
                iz, ib = index.get(z), index.get(z - k)
                xz_known = solution[z][:, j] if iz is None else None
                xb_known = solution[z - k][:, j] if ib is None else None
                if iz is not None:
                    blocks.append((iz, iz, wt * np.eye(2)))
                    rhs[2 * iz : 2 * iz + 2] += wt * d
                    if ib is not None:
                        blocks.append((iz, ib, -wt * a_p))
                    else:
                        rhs[2 * iz : 2 * iz + 2] += wt * a_p @ xb_known
                if ib is not None:
                    blocks.append((ib, ib, wt * a_p.T @ a_p))
                    rhs[2 * ib : 2 * ib + 2] -= wt * a_p.T @ d
                    if iz is not None:
                        blocks.append((ib, iz, -wt * a_p.T))
                    else:
                        rhs[2 * ib : 2 * ib + 2] += wt * a_p.T @ xz_known
            if n:
                system = _assemble(blocks, 2 * n)
                x = spla.spsolve(system.tocsc(), rhs)
                for z, i in index.items():
                    solution[z][:, j] = x[2 * i : 2 * i + 2]
        residual = _pair_residuals(active, solution, scale)
        if robust_px is not None:
            robust = {key: robust_px**2 / (robust_px**2 + r**2) for key, r in residual.items()}
    residual = _pair_residuals(active, solution, scale)
    solved = set(linked)
    interpolated = tuple(z for z in range(num_sections) if z not in solved)
    matrices = [_uncentred(solution[z], centre) for z in range(num_sections)]
    for z in interpolated:
        lo = max((s for s in solved if s < z), default=None)
        hi = min((s for s in solved if s > z), default=None)
        if lo is None and hi is None:
            matrices[z] = torch.zeros(2, 3, dtype=torch.float64)
        elif lo is None or hi is None:
            matrices[z] = matrices[hi if lo is None else lo].clone()  # type: ignore[index]
        else:
            t = (z - lo) / (hi - lo)
            matrices[z] = (1 - t) * matrices[lo] + t * matrices[hi]
    return AffineStackSolution(
        matrices=torch.stack(matrices),
        fixed=fixed,
        interpolated=interpolated,
        pair_residual_px=residual,
        pair_weight={key: float(v) for key, v in robust.items()},
    )


def _assemble(blocks: list[tuple[int, int, np.ndarray]], size: int) -> sp.csr_matrix:
    """Sparse matrix from 2 x 2 blocks at block positions ``(a, b)`` (duplicates add up)."""
    rows, cols, vals = [], [], []
    for a, b, block in blocks:
        for r in range(2):
            for c in range(2):
                rows.append(2 * a + r)
                cols.append(2 * b + c)
                vals.append(float(block[r, c]))
    return sp.csr_matrix((vals, (rows, cols)), shape=(size, size))


def _pair_residuals(
    active: Mapping[tuple[int, int], tuple[np.ndarray, float]],
    solution: Mapping[int, np.ndarray],
    scale: np.ndarray,
) -> dict[tuple[int, int], float]:
    """RMS px residual over the section of every active pair."""
    out = {}
    for (z, k), (bp, _) in active.items():
        below = solution[z - k]
        chained = np.concatenate((bp[:, :2] @ below[:, :2], (bp[:, :2] @ below[:, 2] + bp[:, 2])[:, None]), 1)
        err = (solution[z] - chained) * scale[None, :]
        out[(z, k)] = float(np.sqrt((err**2).sum()))
    return out
