"""Coarse alignment stage: one pairwise field per (section ``z``, neighbour ``z - k``).

``P[z, k]`` aligns section ``z`` onto section ``z - k`` (``warp(img_z, P) ~= img_{z-k}``,
:mod:`emcore.stack_solve`'s convention), estimated on whole sections at a coarse mip by the
classical aligner :func:`emcore.coarse_xcorr.coarse_align` (masked FFT cross-correlation + patch
fit; defect masks excluded). It is stored at the coarse mip in the pair layer
``<out>/fields/pairwise/z-<k>`` at section ``z``.

A pair that cannot be measured (a blank section) is written as zeros and reported ``blank``; an
unreliable estimate is reported with its reason and gets weight 0 in the stack solve.
"""

from __future__ import annotations

import torch
from prefect import task

from emcore.coarse_xcorr import coarse_align
from emcore.errors import BlankSectionError
from emcore.geometry import VoxelBox
from emcore.layers import open_layer
from tasks.io import read_tensor
from tasks.markers import ChunkMarker, ChunkOutcome
from tasks.retry import CHUNK_TASK_OPTIONS

__all__ = ["coarse_pair_task", "section_box"]


def section_box(region: VoxelBox, z: int) -> VoxelBox:
    """The xy extent of ``region`` at section ``z`` (one section thick)."""
    return VoxelBox((region.start[0], region.start[1], z), (region.stop[0], region.stop[1], z + 1))


@task(name="coarse-pair", **CHUNK_TASK_OPTIONS)
def coarse_pair_task(
    image: str,
    output: str,
    region: VoxelBox,
    z: int,
    k: int,
    mip: int,
    model: str = "rigid",
    defects: str | None = None,
) -> ChunkOutcome:
    """Estimate ``P[z, k]`` on ``region`` (chunk-aligned xy box at ``mip``) and write it to ``output``.

    Returns a :class:`~tasks.markers.ChunkOutcome` whose ``detail`` has ``z, k, blank, reliable,
    confidence, reason`` (kept in the marker, so a skipped rerun reports the same).
    """
    params = {"z": z, "k": k, "mip": mip, "model": model}
    marker = ChunkMarker(output, "coarse", f"{region}@{mip}:{z}-{k}", (image, defects or ""), params)
    previous = marker.read_extra()
    if previous is not None:
        return ChunkOutcome("coarse", f"{z}-{k}", "skipped", previous)
    src_box, tgt_box = section_box(region, z), section_box(region, z - k)
    img = open_layer(image)
    src, tgt = read_tensor(img, src_box, mip)[0, 0], read_tensor(img, tgt_box, mip)[0, 0]
    src_mask = tgt_mask = None
    if defects:
        mask_layer = open_layer(defects)
        src_mask = read_tensor(mask_layer, src_box, mip)[0, 0]
        tgt_mask = read_tensor(mask_layer, tgt_box, mip)[0, 0]
    detail: dict = {"z": z, "k": k, "blank": False, "reliable": False, "confidence": 0.0, "reason": ""}
    try:
        result = coarse_align(src, tgt, src_mask=src_mask, tgt_mask=tgt_mask, model=model)
        field = result.field
        detail.update(
            reliable=bool(result.reliable),
            confidence=float(result.confidence),
            reason=result.reason,
            translation=[float(result.translation.dx), float(result.translation.dy)],
        )
    except BlankSectionError as exc:
        field = torch.zeros(1, 2, *src.shape)
        detail.update(blank=True, reason=str(exc))
    open_layer(output).write(src_box, field.numpy(), mip)
    marker.mark_done(detail)
    return ChunkOutcome("coarse", f"{z}-{k}", "done", detail)
