"""Finetune stage: refine a pairwise field chunk by chunk with the online finetuner, in the stack frame.

For pair ``(z, k)`` and a processing chunk (voxels at the finetune mip) the task reads, with
``pad`` px of context on each side, sections ``z`` and ``z - k`` each seen through its section
affine from the global affine stage (:mod:`tasks.affine`; :func:`tasks.io.read_through_field`
reads only the source region the affine points into), so both are already in the affinely aligned
stack frame. A torn section (:mod:`tasks.torn`) is read through its coarse field ``S[z]`` instead
(each piece its own affine), so its pieces' relative motion is not part of the residual
either. It runs :func:`emcore.finetune.finetune` (coarse to fine inside the chunk) from the
zero field: the result ``Q[z, k]`` is the small residual with
``warp(A_z(img_z), Q) ~= A_{z-k}(img_{z-k})``. It crops the context down to a *piece* (the chunk
grown by a blend ``margin``, :func:`emcore.blend.piece_box`) and stores it beside the pair layer
(``<pairs>/.sectionflow/pieces/...``, a ``.npy`` per chunk).

Then :func:`blend_chunk_task` writes each chunk of ``Q[z, k]`` at the finetune mip into the pair
layer as the raised-cosine blend of the pieces that overlap it (:func:`emcore.blend.blend_pieces`),
so neighbouring chunks meet without a seam. Each finetune task also returns (in its marker's
detail) the :class:`~emcore.affine.AffineMoments` of ``Q[z, k]`` on its chunk, weighted by the
pixels where both sections have data and no defect (origin = the region's first pixel):
:func:`pair_residual_affines` sums them into each pair's affine part ``R[z, k]``, which
:func:`tasks.affine.refine_section_affines` takes into the section affines. (The pair layer's
coarse mip keeps the coarse field ``P[z, k]`` in the sections' own frames, for inspection.)
Every chunk saw ``pad`` px of real neighbouring data; the chunked result equals the whole-section
result within a small tolerance away from the volume edge (tested in ``tests/flows/test_chunking.py``).
"""

from __future__ import annotations

import io

import numpy as np
from cloudfiles import CloudFiles

from emcore.affine import AffineMoments, affine_moments, fit_affine_moments
from emcore.blend import blend_pieces, piece_box
from emcore.finetune import finetune
from emcore.geometry import VoxelBox
from emcore.layers import open_layer
from tasks.affine import affine_field
from tasks.coarse import section_box
from tasks.io import read_field, read_through_field
from tasks.markers import ChunkMarker, ChunkOutcome

__all__ = ["RESIDUAL_MOTION_PX", "blend_chunk_task", "finetune_chunk_task", "pair_residual_affines"]

#: A pair's residual affine part is fitted only from at least this fraction of its region's pixels
#: with data (below it the fit would be extrapolated from a corner).
MIN_AFFINE_DATA_FRACTION = 0.05

#: The largest residual motion (px at the finetune mip) the finetuner must capture: the sections
#: are already warped by their affines, so what is left is the elastic part and the affine
#: solve's error. It sets the finetuner's pyramid depth (4 levels, as before issue 17's rule).
RESIDUAL_MOTION_PX = 16.0


def _piece_name(chunk: VoxelBox, mip: int) -> str:
    x, y, z = chunk.start
    return f".sectionflow/pieces/mip{mip}/z{z}/{x}_{y}.npy"


def _save_piece(pairs: str, chunk: VoxelBox, mip: int, values: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, values.astype(np.float32), allow_pickle=False)
    CloudFiles(pairs).put(_piece_name(chunk, mip), buffer.getvalue(), compress=None)


def _load_piece(pairs: str, chunk: VoxelBox, mip: int) -> np.ndarray:
    raw = CloudFiles(pairs).get(_piece_name(chunk, mip))
    if raw is None:
        raise FileNotFoundError(
            f"finetune piece of {chunk} (mip {mip}) is missing in {pairs}: rerun the finetune stage"
        )
    return np.load(io.BytesIO(raw), allow_pickle=False)


def finetune_chunk_task(
    image: str,
    pairs: str,
    box: VoxelBox,
    z: int,
    k: int,
    mip: int,
    affines: dict[str, list[list[float]]],
    *,
    pad: int,
    margin: int,
    bounds: VoxelBox,
    sm: float,
    num_iter: int,
    defects: str | None = None,
    coarse_fields: str | None = None,
    torn: list[int] | None = None,
) -> ChunkOutcome:
    """Refine ``Q[z, k]`` on ``box`` (xy chunk at ``mip``, any z) and store its blend piece.

    ``affines`` holds ``G_affine`` of sections ``z`` and ``z - k`` (``{str(z): 2 x 3}``, px at
    ``mip``, origin = ``bounds.start``); ``bounds`` is the region the chunks tile (xy, voxels at
    ``mip``); ``margin <= pad`` is the blend margin in px. Sections listed in ``torn`` are read
    through their coarse field ``S[z]`` in the layer ``coarse_fields`` (:mod:`tasks.torn`, same mip;
    replicated past the layer bounds) instead of their affine.
    """
    if margin > pad:
        raise ValueError(f"blend margin {margin} px must not exceed the context pad {pad} px")
    params = {
        "margin": margin,
        "bounds": str(bounds),
        "z": z,
        "k": k,
        "mip": mip,
        "affines": [affines[str(z)], affines[str(z - k)]],
        "pad": pad,
        "sm": sm,
        "num_iter": num_iter,
    }
    torn_set = set(torn or ())
    if torn_set:
        if coarse_fields is None:
            raise ValueError(f"torn sections {sorted(torn_set)} need the coarse_fields layer")
        params.update(coarse_fields=coarse_fields, torn=sorted(torn_set))
    chunk = section_box(box, z)
    marker = ChunkMarker(pairs, "finetune", f"{chunk}@{mip}:{z}-{k}", (image, defects or ""), params)
    previous = marker.read_extra()
    if previous is not None:
        return ChunkOutcome("finetune", f"{z}-{k} {chunk}", "skipped", previous)
    padded = chunk.padded(pad)
    img = open_layer(image)
    src_box, tgt_box = section_box(padded, z), section_box(padded, z - k)

    def section_field(section: int, section_box_: VoxelBox):
        if section in torn_set:
            return read_field(open_layer(coarse_fields), section_box_, mip)
        return affine_field(affines[str(section)], section_box_, bounds)

    src_affine = section_field(z, src_box)
    tgt_affine = section_field(z - k, tgt_box)
    src = read_through_field(img, src_box, mip, src_affine)
    tgt = read_through_field(img, tgt_box, mip, tgt_affine)
    src_def = tgt_def = None
    if defects:
        mask_layer = open_layer(defects)
        src_def = read_through_field(mask_layer, src_box, mip, src_affine, is_mask=True) != 0
        tgt_def = read_through_field(mask_layer, tgt_box, mip, tgt_affine, is_mask=True) != 0
    result = finetune(
        src, tgt, src_defects=src_def, tgt_defects=tgt_def, sm=sm, num_iter=num_iter,
        max_motion=RESIDUAL_MOTION_PX,
    )  # fmt: skip
    core = chunk.intersection(bounds)
    cy, cx = core.start[1] - padded.start[1], core.start[0] - padded.start[0]
    ch, cw = core.shape[1], core.shape[0]
    data = (src[0, 0] != 0) & (tgt[0, 0] != 0)
    if src_def is not None:
        data &= ~(src_def[0, 0] | tgt_def[0, 0])
    moments = affine_moments(
        result.field[..., cy : cy + ch, cx : cx + cw], data[cy : cy + ch, cx : cx + cw],
        origin=(core.start[0] - bounds.start[0], core.start[1] - bounds.start[1]),
    )  # fmt: skip
    field = result.field.numpy()
    piece = piece_box(chunk, bounds, margin)
    y0, x0 = piece.start[1] - padded.start[1], piece.start[0] - padded.start[0]
    _save_piece(pairs, chunk, mip, field[..., y0:y0 + piece.shape[1], x0:x0 + piece.shape[0]])
    detail = {
        "z": z,
        "k": k,
        "loss": float(result.loss[0]),
        "no_data": bool(result.no_data[0]),
        "seconds": round(result.seconds, 3),
        "moments": moments.to_list(),
    }
    marker.mark_done(detail)
    return ChunkOutcome("finetune", f"{z}-{k} {chunk}", "done", detail)


def blend_chunk_task(
    pairs: str, box: VoxelBox, z: int, k: int, mip: int, *, margin: int, bounds: VoxelBox,
    cores: list[VoxelBox], inputs: str,
) -> ChunkOutcome:
    """Write ``P[z, k]`` on ``box`` (xy chunk at ``mip``) as the blend of the overlapping finetune pieces.

    ``cores`` are all chunks tiling ``bounds`` (only those within ``margin`` of ``box`` are read);
    ``inputs`` identifies the finetune run (its parameters) for the marker key.
    """
    chunk = section_box(box, z)
    marker = ChunkMarker(pairs, "finetune-blend", f"{chunk}@{mip}:{z}-{k}", (inputs,),
                         {"margin": margin, "bounds": str(bounds)})
    if marker.is_done():
        return ChunkOutcome("blend", f"{z}-{k} {chunk}", "skipped")
    near = chunk.padded(margin)
    pieces = []
    for core in cores:
        core_z = section_box(core, z)
        if not core_z.intersection(near).is_empty:
            pieces.append((core_z, _load_piece(pairs, core_z, mip)))
    blended = blend_pieces(pieces, chunk, section_box(bounds, z), margin)
    open_layer(pairs).write(chunk, blended, mip)
    marker.mark_done()
    return ChunkOutcome("blend", f"{z}-{k} {chunk}", "done")


def pair_residual_affines(details: list[dict], region_px: int) -> dict[str, list[list[float]]]:
    """``{"z-k": 2 x 3}``: each pair's residual affine part ``R[z, k]`` from its chunks' moments.

    ``details`` are the finetune tasks' details (``z``, ``k``, ``moments``); ``region_px`` is the
    region's pixel count at the finetune mip. A pair whose pixels with data are fewer than
    ``MIN_AFFINE_DATA_FRACTION`` of it, or lie on a line, is left out (its sections keep the
    coarse-stage evidence of their other pairs, or are interpolated by the solve).
    """
    sums: dict[str, AffineMoments] = {}
    for detail in details:
        if "moments" not in detail:
            continue
        key = f"{detail['z']}-{detail['k']}"
        sums[key] = sums.get(key, AffineMoments.zero()) + AffineMoments.from_list(detail["moments"])
    residual = {}
    for key, moments in sorted(sums.items()):
        if moments.weight < MIN_AFFINE_DATA_FRACTION * region_px:
            continue
        try:
            residual[key] = fit_affine_moments(moments).tolist()
        except ValueError:
            continue
    return residual
