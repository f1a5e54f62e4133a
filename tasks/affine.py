"""The global affine stage: section affines from the coarse pairs, and reading them back per chunk.

:func:`section_affines` runs :func:`emcore.affine_solve.solve_affine_stack` on the coarse pairs'
matrices (``detail["matrix"]`` of :func:`tasks.coarse.coarse_pair_task`, px at the coarse mip,
origin = the region's first pixel). Only reliable pairs are used, ``z -> z-k`` weighted ``1 /
k**2``; a section left with none is listed under ``fallback`` and its affine is interpolated from
its neighbours (the solve's rule for sections without a pair), never taken from an unreliable
estimate. The result, written as ``<out>/fields/affine.json``, holds every section's ``G_affine[z]``
at the coarse and at the finetune mip (origin = the region's first pixel at that mip).

Later stages work in the affinely aligned stack frame: the finetuner compares sections ``z`` and
``z - k`` both warped by their affines (so its fields are small residuals ``Q[z, k]``), the stack
solve relaxes those residuals, and the final field is ``compose(H[z], G_affine[z])``, composed
exactly (:func:`emcore.affine.compose_with_affine`) with no context needed at chunk borders.

**The affine part is decided once, with the drift prior.** The residuals ``Q[z, k]`` still carry an
affine part: what the coarse pairs missed (the finetune mip is finer) and the content rotation that
the prior of :mod:`emcore.affine_solve` deliberately left out. Relaxed per pixel, that part came
back as invented rotation (registered medulla, 12 sections: 0.058 deg of rotation drift after the
affine solve, 0.196 deg in the final fields). So :func:`refine_section_affines` re-solves the
section affines from the pairs refined by the residuals' affine parts ``R[z, k]`` (the finetune
stage's per-chunk :class:`~emcore.affine.AffineMoments`, summed per pair), with the same prior, at
the finetune mip, into ``<out>/fields/affine_refined.json``; the residual solve then relaxes only
``Q[z, k] - R[z, k]`` and composes with the refined affines.
"""

from __future__ import annotations

from typing import Any

import torch

from emcore.affine import (
    affine_displacement_field,
    compose_matrices,
    decompose,
    invert_matrix,
    rescale_matrix,
    shift_origin,
)
from emcore.affine_solve import AffineStackSolution, solve_affine_stack
from emcore.geometry import VoxelBox

__all__ = ["affine_field", "refine_section_affines", "section_affines"]


def section_affines(
    status: dict[str, dict[str, Any]],
    sections: list[int],
    blank: list[int],
    size: tuple[int, int],
    coarse_mip: int,
    finetune_mip: int,
    *,
    drift_sections_linear: float,
    drift_sections_translation: float,
) -> dict[str, Any]:
    """Solve the section affines from the coarse pairs' status (``{"z-k": detail}``).

    Args:
        status: the coarse stage's per-pair details (``z, k, blank, reliable, matrix, ...``).
        sections: absolute section indices of the region, in order.
        blank: blank sections (no pair).
        size: ``(height, width)`` of the region at the coarse mip (px).

    Returns:
        A JSON-able dict: ``matrices`` / ``matrices_coarse`` ``{z: 2 x 3 list}`` (finetune / coarse
        mip), ``parts`` per section (rotation_deg, scale, shear, translation px at the finetune mip),
        ``fixed``, ``fallback`` (sections without a reliable pair), ``pair_residual_px``,
        ``pair_weight``, and the prior lengths used.
    """
    z0 = sections[0]
    pairs, weights, reliable_sections = {}, {}, set()
    for detail in status.values():
        if detail.get("blank") or not detail.get("reliable") or "matrix" not in detail:
            continue
        z, k = int(detail["z"]), int(detail["k"])
        pairs[(z - z0, k)] = torch.tensor(detail["matrix"], dtype=torch.float64)
        weights[(z - z0, k)] = 1.0 / k**2  # apparent motion grows with distance (emcore.affine_solve)
        reliable_sections.update((z, z - k))
    fallback = sorted(z for z in sections if z not in blank and z not in reliable_sections)
    if len(sections) - len(blank) < 2:
        fallback = []
    h, w = size
    solution = solve_affine_stack(
        pairs, len(sections), h, w, weights=weights, blank=[z - z0 for z in blank],
        drift_sections_linear=drift_sections_linear,
        drift_sections_translation=drift_sections_translation,
    )  # fmt: skip
    return {
        **_describe(solution, sections, size, coarse_mip, finetune_mip),
        "fallback": fallback,
        "drift_sections_linear": drift_sections_linear,
        "drift_sections_translation": drift_sections_translation,
    }


def _describe(
    solution: AffineStackSolution, sections: list[int], size: tuple[int, int], mip: int, finetune_mip: int
) -> dict[str, Any]:
    """The JSON-able record of a solution at ``mip`` (``size`` px there): matrices at both mips, parts."""
    z0, (h, w) = sections[0], size
    scale = 2 ** (mip - finetune_mip)
    matrices, coarse, parts = {}, {}, {}
    for i, z in enumerate(sections):
        m = solution.matrices[i]
        fine = rescale_matrix(m, mip, finetune_mip)
        coarse[str(z)] = m.tolist()
        matrices[str(z)] = fine.tolist()
        p = decompose(fine, h * scale, w * scale)
        parts[str(z)] = {
            "rotation_deg": p.rotation_deg, "scale_x": p.scale_x, "scale_y": p.scale_y,
            "shear": p.shear, "translation_px": list(p.translation),
        }  # fmt: skip
    return {
        "coarse_mip": mip,
        "finetune_mip": finetune_mip,
        "matrices": matrices,
        "matrices_coarse": coarse,
        "parts": parts,
        "fixed": solution.fixed + z0,
        "interpolated": [z + z0 for z in solution.interpolated],
        "pair_residual_px": {f"{z + z0}-{k}": round(r, 4) for (z, k), r in solution.pair_residual_px.items()},
        "pair_weight": {f"{z + z0}-{k}": round(r, 4) for (z, k), r in solution.pair_weight.items()},
    }


def refine_section_affines(
    affines: dict[str, Any],
    residual: dict[str, list[list[float]]],
    sections: list[int],
    blank: list[int],
    size: tuple[int, int],
    *,
    robust_px: float = 2.0,
) -> dict[str, Any]:
    """Re-solve the section affines with every pair refined by its residual's affine part.

    Args:
        affines: the record of :func:`section_affines` (``matrices`` at the finetune mip, the prior).
        residual: ``{"z-k": 2 x 3}`` affine parts ``R[z, k]`` of the finetuned residuals (px at the
            finetune mip, origin = the region's first pixel); the pairs the solve uses.
        size: ``(height, width)`` of the region at the finetune mip (px).
        robust_px: the Cauchy scale at the *coarse* mip (scaled to the finetune mip here, so the
            same physical residual is outvoted).

    Returns:
        A record like :func:`section_affines`'s (``coarse_mip`` is the finetune mip here), plus
        ``refined_from`` (the pairs used).

    A refined pair is ``P[z, k] = A[z - k]^-1 o R[z, k] o A[z]`` in position maps (``A`` the
    coarse-stage affines): the residual aligned ``A[z]``-warped ``z`` onto ``A[z - k]``-warped
    ``z - k``, so this maps raw ``z`` onto raw ``z - k``, now at finetune-mip precision.
    """
    z0, fine = sections[0], affines["finetune_mip"]
    a = {int(z): torch.tensor(m, dtype=torch.float64) for z, m in affines["matrices"].items()}
    pairs, weights = {}, {}
    for key, matrix in residual.items():
        z, k = (int(v) for v in key.split("-"))
        r = torch.tensor(matrix, dtype=torch.float64)
        pairs[(z - z0, k)] = compose_matrices(invert_matrix(a[z - k]), compose_matrices(r, a[z]))
        weights[(z - z0, k)] = 1.0 / k**2
    h, w = size
    solution = solve_affine_stack(
        pairs, len(sections), h, w, weights=weights, blank=[z - z0 for z in blank],
        drift_sections_linear=affines["drift_sections_linear"],
        drift_sections_translation=affines["drift_sections_translation"],
        robust_px=robust_px * 2 ** (affines["coarse_mip"] - fine),
    )  # fmt: skip
    return {
        **_describe(solution, sections, size, fine, fine),
        "fallback": affines.get("fallback", []),
        "drift_sections_linear": affines["drift_sections_linear"],
        "drift_sections_translation": affines["drift_sections_translation"],
        "refined_from": sorted(residual),
    }


def affine_field(matrix: list[list[float]], box: VoxelBox, region: VoxelBox) -> torch.Tensor:
    """``(1, 2, Y, X)`` float32 field of a section affine (origin = ``region.start``) on ``box``.

    ``box`` and ``region`` are voxels at the matrix's mip; ``box`` may extend past the region.
    """
    local = shift_origin(torch.tensor(matrix, dtype=torch.float64),
                         (box.start[0] - region.start[0], box.start[1] - region.start[1]))
    return affine_displacement_field(local, box.shape[1], box.shape[0])
