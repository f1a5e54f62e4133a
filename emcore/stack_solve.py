"""Global stack solve: one consistent alignment field per section from many pairwise fields.

Frames and conventions (fields follow :mod:`emcore.field`: ``(N, 2, H, W)`` float32, channel 0 = x,
px at the fields' mip, pull semantics):

* ``P[z, k]`` aligns section ``z`` onto section ``z - k`` (``k >= 1``):
  ``warp(img_z, P[z, k]) ~= img_{z-k}``.
* ``G[z]`` aligns section ``z`` into the common (stack) frame: ``aligned_z = warp(img_z, G[z])``,
  with ``G[fixed] = 0`` (the fixed section defines the frame; default the first non-blank one).
* Consistency: ``G[z] ~= compose(G[z - k], P[z, k])`` for every pair.

The solve minimizes::

    E(G) = sum_{z,k} sum_p w[z,k](p) rho(|G[z](p) - compose(G[z-k], P[z,k])(p)|)
           + smoothness * sum_z sum_p |grad G[z](p)|^2

           + anchor * sum_z sum_p |G[z](p)|^2

with ``rho`` the squared distance (least squares) in the first third of the sweeps and then a
Cauchy robust loss with scale ``robust_px`` (iteratively reweighted: a pixel's weight is
``c^2 / (c^2 + r^2)``), so one wrong pairwise field (a defect, a bad estimate) is voted down by the
other pairs instead of shifting every section above it. The membrane smoothness term (4-neighbour
Laplacian, replicate border) is a simple, documented stand-in for rigidity; ``0`` disables it.
It is zero for any affine field away from the image border. The ``anchor`` term (default 0) pulls
every free section towards the zero field: the prior that stops drift when the fields are residuals
after a global affine solve (:mod:`emcore.affine_solve`): content differences between neighbours
then move a section by about ``1 / sqrt(anchor)`` sections' worth of pairs, not by all pairs below it.

Relaxation: symmetric Gauss-Seidel sweeps over the stack (up, then down). Each section takes the
weighted average of the predictions of its neighbours: from below ``compose(G[z-k], P[z,k])``
and from above ``compose(G[z+k], P[z+k,k]^-1)`` (``P^-1`` from :func:`emcore.field.invert`; that
term is the energy term of pair ``(z+k, k)`` measured in section ``z``'s frame, equal to first
order). The start is the sequential composition (:func:`sequential_composition`), so errors
that the solve removes are those that sequential alignment accumulates along z.

Blank sections (given by the caller) take part in no pair; after the solve their fields are
linearly interpolated in z from the nearest solved sections below and above (copied at the stack
ends), and listed in the result.

API summary
-----------
* :func:`solve_stack` -> :class:`StackSolution` ``(fields (Z, 2, H, W), fixed, interpolated,
  ignored_pairs, pair_residual_px, pair_weight, sweeps, converged)``.
* :func:`sequential_composition` -> ``(Z, 2, H, W)``: chain the pairs from the fixed section
  (smallest ``k`` available), the classical section-after-section alignment.
* ``Pairs = Mapping[(z, k), Tensor]``: fields ``(1, 2, H, W)`` or ``(2, H, W)``; weights
  ``Mapping[(z, k), float | Tensor (1, 1, H, W)]`` (default 1; a pair with weight 0 is ignored).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from emcore.field import check_field, compose, invert

__all__ = ["Pairs", "StackSolution", "sequential_composition", "solve_stack"]

Pairs = Mapping[tuple[int, int], torch.Tensor]
Weights = Mapping[tuple[int, int], "float | torch.Tensor"]


@dataclass(frozen=True)
class StackSolution:
    """Result of :func:`solve_stack`.

    Attributes:
        fields: ``(Z, 2, H, W)`` float32, ``G[z]`` in px at the pairs' mip (``G[fixed] == 0``).
        fixed: the section whose field is 0 (the stack frame); -1 when none is (an anchored solve
            without ``fixed``: the anchor defines the frame).
        interpolated: blank sections whose fields were interpolated from neighbours.
        ignored_pairs: pairs not used (weight 0, or touching a blank section), sorted.
        pair_residual_px: per used pair, the median over pixels of
            ``|G[z] - compose(G[z-k], P[z,k])|`` (px) at the solution.
        pair_weight: per used pair, the mean robust weight (0..1) at the solution: low = rejected.
        sweeps: Gauss-Seidel sweeps run (up + down counts as one).
        converged: whether the largest update of the last sweep was below ``tol``.
    """

    fields: torch.Tensor
    fixed: int
    interpolated: tuple[int, ...]
    ignored_pairs: tuple[tuple[int, int], ...]
    pair_residual_px: dict[tuple[int, int], float]
    pair_weight: dict[tuple[int, int], float]
    sweeps: int
    converged: bool


@dataclass(frozen=True)
class _Pair:
    z: int
    k: int
    field: torch.Tensor  # (1, 2, H, W) float32
    weight: torch.Tensor  # (1, 1, H, W) or a uniform (1, 1, 1, 1) float32, > 0 somewhere


def _prepare(
    pairs: Pairs,
    num_sections: int,
    weights: Weights | None,
    blank: Iterable[int],
) -> tuple[list[_Pair], set[int], list[tuple[int, int]], tuple[int, int]]:
    """Validate inputs; return (active pairs, blank set, ignored pair keys, (H, W))."""
    if num_sections < 1:
        raise ValueError(f"num_sections must be >= 1, got {num_sections}")
    blank_set = set()
    for z in blank:
        if not 0 <= int(z) < num_sections:
            raise ValueError(f"blank section {z} is outside the stack 0..{num_sections - 1}")
        blank_set.add(int(z))
    size: tuple[int, int] | None = None
    active: list[_Pair] = []
    ignored: list[tuple[int, int]] = []
    for key, field in pairs.items():
        if not (isinstance(key, tuple) and len(key) == 2):
            raise ValueError(f"pair keys must be (z, k) tuples, got {key!r}")
        z, k = int(key[0]), int(key[1])
        if k < 1 or not 0 <= z - k < z < num_sections:
            raise ValueError(
                f"pair (z={z}, k={k}) must have k >= 1 and 0 <= z - k < z < {num_sections} "
                "(P[z, k] aligns section z onto section z - k)"
            )
        if field.ndim == 3:
            field = field[None]
        check_field(field, f"pair ({z}, {k})")
        if field.shape[0] != 1:
            raise ValueError(f"pair ({z}, {k}) must hold one field (1, 2, H, W), got {tuple(field.shape)}")
        if size is None:
            size = (field.shape[-2], field.shape[-1])
        elif (field.shape[-2], field.shape[-1]) != size:
            raise ValueError(
                f"pair ({z}, {k}) is {tuple(field.shape[-2:])} but other pairs are {size}: "
                "resample all pairwise fields to one mip and size"
            )
        if not torch.isfinite(field).all():
            raise ValueError(f"pair ({z}, {k}) contains NaN or inf")
        w = 1.0 if weights is None else weights.get((z, k), 1.0)
        w_t = torch.as_tensor(w, dtype=torch.float32)
        if w_t.ndim == 0:
            w_t = w_t.reshape(1, 1, 1, 1)  # broadcasts like a map, without holding H x W floats
        elif tuple(w_t.shape) != (1, 1, *size):
            raise ValueError(f"weight of pair ({z}, {k}) must be a float or (1, 1, {size[0]}, {size[1]})")
        if not torch.isfinite(w_t).all() or (w_t < 0).any():
            raise ValueError(f"weight of pair ({z}, {k}) must be finite and >= 0")
        if z in blank_set or z - k in blank_set or not bool((w_t > 0).any()):
            ignored.append((z, k))
            continue
        active.append(_Pair(z, k, field.to(torch.float32), w_t.contiguous()))
    if size is None:
        raise ValueError("no pairwise fields given")
    return active, blank_set, sorted(ignored), size


def _pick_fixed(num_sections: int, blank: set[int], fixed: int | None) -> int:
    if fixed is None:
        candidates = [z for z in range(num_sections) if z not in blank]
        if not candidates:
            raise ValueError("every section is blank: nothing to align")
        return candidates[0]
    if not 0 <= fixed < num_sections:
        raise ValueError(f"fixed section {fixed} is outside the stack 0..{num_sections - 1}")
    if fixed in blank:
        raise ValueError(f"fixed section {fixed} is blank; fix a section with tissue (or leave fixed=None)")
    return fixed


def _check_connected(num_sections: int, blank: set[int], active: list[_Pair], fixed: int) -> None:
    """Raise unless every non-blank section is linked to ``fixed`` by a chain of pairs."""
    links: dict[int, set[int]] = {z: set() for z in range(num_sections)}
    for p in active:
        links[p.z].add(p.z - p.k)
        links[p.z - p.k].add(p.z)
    seen, todo = {fixed}, [fixed]
    while todo:
        z = todo.pop()
        for n in links[z] - seen:
            seen.add(n)
            todo.append(n)
    lost = [z for z in range(num_sections) if z not in blank and z not in seen]
    if lost:
        raise ValueError(
            f"sections {lost} have no chain of pairs to the fixed section {fixed}: add pairs across the "
            "gap (larger k) or mark them blank"
        )


def _sequential(
    num_sections: int,
    blank: set[int],
    active: list[_Pair],
    fixed: int,
    inverses: dict[tuple[int, int], torch.Tensor],
    size: tuple[int, int],
) -> list[torch.Tensor | None]:
    """Chain pairs away from ``fixed``, smallest ``k`` first; unreachable sections stay None."""
    by_key = {(p.z, p.k): p for p in active}
    g: list[torch.Tensor | None] = [None] * num_sections
    g[fixed] = torch.zeros(1, 2, *size)
    for z in range(fixed + 1, num_sections):
        for k in sorted(k for (zz, k) in by_key if zz == z):
            below = g[z - k]
            if below is not None:
                g[z] = compose(below, by_key[(z, k)].field)
                break
    for z in range(fixed - 1, -1, -1):
        for k in sorted(k for (zz, k) in by_key if zz - k == z):
            above = g[z + k]
            if above is not None:
                g[z] = compose(above, inverses[(z + k, k)])
                break
    return g


def _interpolate_blank(
    g: list[torch.Tensor | None], blank: set[int], store: torch.Tensor | None = None
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``(Z, 2, H, W)`` from the per-section fields ``g``, blank (None) ones interpolated in z.

    Consumes ``g``: each entry is released once copied, so the stack is held once, not twice.
    ``store``: the ``(Z, 2, H, W)`` tensor the entries of ``g`` are views of, if any (filled in place).
    """
    solved = [z for z, f in enumerate(g) if f is not None]
    first = g[solved[0]]
    assert first is not None
    out = first.new_empty((len(g), *first.shape[1:])) if store is None else store
    for z in solved:
        if store is None:
            out[z : z + 1] = g[z]  # type: ignore[assignment]
        g[z] = None
    for z in range(len(g)):
        if z in solved:
            continue
        lo = max((s for s in solved if s < z), default=None)
        hi = min((s for s in solved if s > z), default=None)
        if lo is None:
            out[z] = out[hi]  # type: ignore[index]
        elif hi is None:
            out[z] = out[lo]
        else:
            t = (z - lo) / (hi - lo)
            out[z : z + 1] = (1 - t) * out[lo : lo + 1] + t * out[hi : hi + 1]  # type: ignore[operator]
    return out, tuple(sorted(z for z in blank))


def _inverses(active: list[_Pair]) -> dict[tuple[int, int], torch.Tensor]:
    """Each pair's inverse field, as views of one ``(P, 2, H, W)`` block (one allocation: it is
    the solve's largest store and goes back to the system whole when freed)."""
    if not active:
        return {}
    store = torch.empty((len(active), *active[0].field.shape[1:]))
    out = {}
    for i, p in enumerate(active):
        store[i : i + 1] = invert(p.field, num_iter=100, tol=1e-3).inverse
        out[(p.z, p.k)] = store[i : i + 1]
    return out


def sequential_composition(
    pairs: Pairs,
    num_sections: int,
    *,
    weights: Weights | None = None,
    blank: Iterable[int] = (),
    fixed: int | None = None,
) -> torch.Tensor:
    """Section-after-section alignment: ``G[z] = compose(G[z - k], P[z, k])`` with the smallest ``k``.

    Sections below ``fixed`` are chained downwards with inverted pairs. Blank sections and pairs
    with weight 0 are skipped; blank sections are interpolated as in :func:`solve_stack`.

    Returns:
        ``(Z, 2, H, W)`` float32 fields.
    """
    active, blank_set, _, size = _prepare(pairs, num_sections, weights, blank)
    fixed = _pick_fixed(num_sections, blank_set, fixed)
    _check_connected(num_sections, blank_set, active, fixed)
    inverses = _inverses([p for p in active if p.z - p.k < fixed]) if fixed > 0 else {}
    g = _sequential(num_sections, blank_set, active, fixed, inverses, size)
    return _interpolate_blank(g, blank_set)[0]


def _neighbour_mean(field: torch.Tensor) -> torch.Tensor:
    """Mean of the 4 neighbours of every pixel (replicate border): ``(1, 2, H, W)``."""
    padded = F.pad(field, (1, 1, 1, 1), mode="replicate")
    return 0.25 * (
        padded[..., :-2, 1:-1] + padded[..., 2:, 1:-1] + padded[..., 1:-1, :-2] + padded[..., 1:-1, 2:]
    )


def solve_stack(
    pairs: Pairs,
    num_sections: int,
    *,
    weights: Weights | None = None,
    blank: Iterable[int] = (),
    fixed: int | None = None,
    smoothness: float = 0.0,
    anchor: float = 0.0,
    robust_px: float | None = 2.0,
    max_sweeps: int = 60,
    tol: float = 1e-3,
) -> StackSolution:
    """Solve for one field per section that agrees with all pairwise fields (see the module doc).

    Args:
        pairs: ``{(z, k): P[z, k]}``, each ``(1, 2, H, W)`` (or ``(2, H, W)``) px at one mip;
            ``P[z, k]`` aligns section ``z`` onto ``z - k``.
        num_sections: ``Z``; sections are ``0 .. Z - 1``.
        weights: optional ``{(z, k): w}``, a float or a ``(1, 1, H, W)`` per-pixel map (>= 0;
            e.g. 0 on a defect). Missing keys weigh 1. A pair with weight 0 everywhere is ignored.
        blank: sections without usable tissue: no pair touches them; their fields are
            interpolated in z.
        fixed: the section whose field is 0 (default the first non-blank section; with
            ``anchor > 0`` the default is none: the anchor defines the frame).
        smoothness: weight of the membrane smoothness term (per pixel, relative to a pair weight
            of 1). 0 disables it.
        anchor: weight (per pixel, relative to a pair weight of 1) pulling every free section
            towards the zero field; 0 disables it.
        robust_px: Cauchy scale ``c`` (px) of the robust loss; ``None`` = plain least squares.
        max_sweeps: Gauss-Seidel sweeps at most (each sweep goes up then down the stack).
        tol: stop when no field changes by more than this (px) in a sweep (checked once the
            robust phase has begun).

    Returns:
        :class:`StackSolution`.

    Raises:
        ValueError: malformed pairs/weights, a blank fixed section, or non-blank sections that no
            chain of pairs links to the fixed section.
    """
    if smoothness < 0:
        raise ValueError(f"smoothness must be >= 0, got {smoothness}")
    if anchor < 0:
        raise ValueError(f"anchor must be >= 0, got {anchor}")
    if robust_px is not None and not robust_px > 0:
        raise ValueError(f"robust_px must be > 0 or None, got {robust_px}")
    active, blank_set, ignored, size = _prepare(pairs, num_sections, weights, blank)
    inverses = _inverses(active)
    if anchor > 0:
        # Residual fields: the anchor fixes the frame, so no section needs to be held at 0 (a block
        # of the stack then solves like the whole stack inside its core) and no chain of pairs is
        # needed; start from the zero field.
        if len(blank_set) == num_sections:
            raise ValueError("every section is blank: nothing to align")
        fixed = -1 if fixed is None else _pick_fixed(num_sections, blank_set, fixed)
        store = torch.zeros(num_sections, 2, *size)  # one block, updated in place by the sweeps
        g: list[torch.Tensor | None] = [
            None if z in blank_set else store[z : z + 1] for z in range(num_sections)
        ]
    else:
        store = None
        fixed = _pick_fixed(num_sections, blank_set, fixed)
        _check_connected(num_sections, blank_set, active, fixed)
        g = _sequential(num_sections, blank_set, active, fixed, inverses, size)

    below: dict[int, list[_Pair]] = {z: [] for z in range(num_sections)}
    above: dict[int, list[_Pair]] = {z: [] for z in range(num_sections)}
    for p in active:
        below[p.z].append(p)
        above[p.z - p.k].append(p)
    free = [z for z in range(num_sections) if z != fixed and z not in blank_set]
    plain_sweeps = max_sweeps // 3 if robust_px is not None else 0

    def predictions(z: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Section ``z``'s neighbours' predictions of its field, one at a time (bounded memory)."""
        for p in below[z]:
            yield compose(g[p.z - p.k], p.field), p.weight  # type: ignore[arg-type]
        for p in above[z]:
            yield compose(g[p.z], inverses[(p.z, p.k)]), p.weight  # type: ignore[arg-type]

    sweeps, converged = 0, not free
    for sweep in range(max_sweeps if free else 0):
        robust = robust_px is not None and sweep >= plain_sweeps
        largest = 0.0
        for z in free + free[::-1]:
            current = g[z]
            assert current is not None
            num = torch.zeros_like(current)
            den = torch.zeros(1, 1, *size)
            for pred, w in predictions(z):
                if robust:
                    r2 = (current - pred).square().sum(dim=1, keepdim=True)
                    w = w * (robust_px**2 / (robust_px**2 + r2))  # type: ignore[operator]
                num = num + w * pred
                den = den + w
            if smoothness > 0:
                num = num + (4 * smoothness) * _neighbour_mean(current)
                den = den + 4 * smoothness
            if anchor > 0:
                den = den + anchor
            new = torch.where(den > 0, num / den.clamp_min(1e-12), current)
            largest = max(largest, float((new - current).abs().max()))
            current.copy_(new)  # in place: the sweep allocates no new per-section store
        sweeps = sweep + 1
        if largest < tol and (robust or robust_px is None):
            converged = True
            break

    inverses.clear()  # the largest store after the pairs: free it before the output is assembled
    residual: dict[tuple[int, int], float] = {}
    weight_used: dict[tuple[int, int], float] = {}
    for p in active:
        r = (g[p.z] - compose(g[p.z - p.k], p.field)).norm(dim=1, keepdim=True)  # type: ignore[arg-type]
        residual[(p.z, p.k)] = float(r.median())
        rho = torch.ones_like(r) if robust_px is None else robust_px**2 / (robust_px**2 + r.square())
        used = (p.weight > 0).expand_as(rho)
        weight_used[(p.z, p.k)] = float((rho * used).sum() / used.sum())
    fields, interpolated = _interpolate_blank(g, blank_set, store)
    return StackSolution(
        fields=fields.to(torch.float32),
        fixed=fixed,
        interpolated=interpolated,
        ignored_pairs=tuple(ignored),
        pair_residual_px=residual,
        pair_weight=weight_used,
        sweeps=sweeps,
        converged=converged,
    )
