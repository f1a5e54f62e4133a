"""Torn sections' coarse fields ``S[z]`` (issue 16): the piece motion beside the section affine.

A section ``z`` whose own defect mask splits it (the coarse pair of ``z`` with the smallest used
``k`` took the piecewise path with ``side == "source"``, :mod:`tasks.coarse`) gets a per-section
coarse field ``S[z]`` in the stack frame at the finetune mip: each stack-frame pixel reads raw ``z``
through the affine of the piece it belongs to (:mod:`emcore.torn_sections`; piece 0, the largest,
is what the section affine ``A[z]`` follows, so ``S[z] = A[z]`` there). The finetune stage reads a
torn section through ``S[z]`` instead of ``A[z]`` and the solve stage composes the final field with
it, so the piece motion (up to the whole section's size) never has to ride in the finetuned residual
that the anchored robust stack solve flattens (:mod:`tasks.coarse`).

:func:`torn_sections` picks the sections and their matrices from the coarse stage's pair status;
:func:`torn_section_task` reads the section and its mask at the coarse mip (the whole section, as
the coarse stage does, with the no-data tears it found, :func:`tasks.coarse.section_defects`),
rebuilds the pieces exactly as the coarse pair task did, decides the
stack-frame piece map there, and writes ``S[z]`` chunk by chunk at the finetune mip into
``<out>/fields/sections_coarse`` (:mod:`flows.layout`).

Limits: only source-side splits (a section whose pieces were seen only as a *target*, e.g. the first
section, keeps its affine); the piece map is decided with the coarse-stage affine ``A[z]``; the solve
stage's refined affine ``A'[z]`` is brought in by composing with ``A[z]^-1 o A'[z]`` in the stack
frame (:mod:`tasks.solve`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from emcore.affine import rescale_matrix, shift_origin
from emcore.geometry import VoxelBox
from emcore.layers import open_layer
from emcore.pieces import split_pieces
from emcore.torn_sections import piecewise_affine_field, section_piece_matrices, stack_piece_assignment
from tasks.coarse import layer_tear_mip, section_box, section_defects
from tasks.io import read_tensor
from tasks.markers import ChunkMarker, ChunkOutcome

__all__ = ["torn_section_task", "torn_sections"]


def torn_sections(
    status: dict[str, dict[str, Any]], used: list[tuple[int, int]]
) -> dict[int, dict[str, Any]]:
    """``{z: {"pair": "z-k", "pair_matrices": [M_p ...]}}`` for every section split on its own side.

    For each section the used pair with the smallest ``k`` decides: it must be a piecewise pair
    (``detail["pieces"]``) whose pieces are the source's (``z``'s own mask split it), and at least
    one piece besides the largest must have its own estimate. A piece that fell back to the
    whole-section transform (too small, or unreliable) follows the largest piece (``M_p = M_0``:
    it stays with the section affine, as without a tear), not the whole-section blend.
    """
    out: dict[int, dict[str, Any]] = {}
    for z in sorted({z for z, _ in used}):
        k = min(kk for zz, kk in used if zz == z)
        detail = status[f"{z}-{k}"]
        pieces = detail.get("pieces")
        if detail.get("blank") or not pieces or pieces["side"] != "source" or pieces["count"] < 2:
            continue
        transforms = pieces["transforms"]
        if all(t["fallback"] for t in transforms[1:]):
            continue  # nothing moves apart from the largest piece: the plain path
        largest = transforms[0]["matrix"]
        out[z] = {"pair": f"{z}-{k}",
                  "pair_matrices": [largest if t["fallback"] else t["matrix"] for t in transforms]}
    return out


def torn_section_task(
    image: str,
    defects: str | None,
    output: str,
    region: VoxelBox,
    z: int,
    coarse_mip: int,
    finetune_mip: int,
    section_affine: list[list[float]],
    piece_matrices: list[list[list[float]]],
    fine_region: VoxelBox,
    chunks: list[VoxelBox],
) -> ChunkOutcome:
    """Write ``S[z]`` on ``chunks`` (xy boxes at the finetune mip) of ``output``.

    Args:
        image, defects: the normalized image and the defect mask layer (``None``: none) as the coarse
            stage read them; the section's no-data tears are found as it found them
            (:func:`tasks.coarse.section_defects` at :func:`tasks.coarse.layer_tear_mip`).
        region: the region at the coarse mip (origin of ``section_affine`` and ``piece_matrices``).
        section_affine: ``A[z]`` at the coarse mip (``affine.json``'s ``matrices_coarse``).
        piece_matrices: the pair's ``M_p`` (coarse mip), the largest piece first.
        fine_region: the region at the finetune mip (origin of the written field's matrices).
    """
    params = {"z": z, "mips": [coarse_mip, finetune_mip], "affine": section_affine, "pieces": piece_matrices,
              "region": str(region), "fine_region": str(fine_region), "chunks": [str(c) for c in chunks]}
    img = open_layer(image)
    fine_mip = layer_tear_mip(img, coarse_mip, region)
    if fine_mip < coarse_mip:
        params["tear_mip"] = fine_mip
    marker = ChunkMarker(output, "torn-section", f"{region}@{coarse_mip}:{z}", (image, defects or ""), params)
    previous = marker.read_extra()
    if previous is not None:
        return ChunkOutcome("torn", str(z), "skipped", previous)
    box = section_box(region, z)
    src = read_tensor(img, box, coarse_mip)[0, 0]
    mask = read_tensor(open_layer(defects), box, coarse_mip)[0, 0] if defects else None
    mask, _ = section_defects(img, box, coarse_mip, fine_mip, src, mask)
    if mask is None:
        mask = torch.zeros_like(src)
    pieces = split_pieces(src, mask != 0)  # the coarse pair task's split (same defaults)
    if pieces.count != len(piece_matrices):
        raise ValueError(
            f"section {z}: the defect mask splits it into {pieces.count} pieces, but its coarse pair "
            f"has {len(piece_matrices)}: rerun the coarse_align stage"
        )
    centroids = []
    for label in range(1, pieces.count + 1):
        py, px = np.nonzero(pieces.labels == label)
        centroids.append((float(px.mean()), float(py.mean())))
    coarse = section_piece_matrices(
        torch.tensor(section_affine), [torch.tensor(m) for m in piece_matrices], centroids
    )
    assignment = stack_piece_assignment(pieces, coarse)
    scale = 2 ** (coarse_mip - finetune_mip)
    # the piece map's pixel (0, 0) covers fine pixels from ``lookup`` on; rescale_matrix keeps that
    # pixel as the origin. The written displacements do not depend on the origin chosen.
    lookup = (region.start[0] * scale, region.start[1] * scale)
    at_lookup = [rescale_matrix(m, coarse_mip, finetune_mip) for m in coarse]
    layer = open_layer(output)
    for chunk in chunks:
        field = piecewise_affine_field(
            at_lookup, assignment, scale, (chunk.start[0] - lookup[0], chunk.start[1] - lookup[1]),
            (chunk.shape[1], chunk.shape[0]),
        )
        layer.write(section_box(chunk, z), field.numpy(), finetune_mip)
    offset = (fine_region.start[0] - lookup[0], fine_region.start[1] - lookup[1])
    fine = [shift_origin(m, offset) for m in at_lookup]
    detail = {
        "z": z,
        "pieces": pieces.count,
        "areas": list(pieces.areas),
        "area_stack_px": [int((assignment == i + 1).sum()) for i in range(pieces.count)],
        "matrices": [m.tolist() for m in fine],
    }
    marker.mark_done(detail)
    return ChunkOutcome("torn", str(z), "done", detail)
