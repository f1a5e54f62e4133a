"""Finetune stage: refine a pairwise field chunk by chunk with the online finetuner.

For pair ``(z, k)`` and a processing chunk (voxels at the finetune mip) the task reads, with
``pad`` px of context on each side: the target section ``z - k``, the coarse field
``P[z, k]`` (stored at the coarse mip, upsampled exactly), and the source section ``z`` shifted by
the coarse field's median integer displacement so it overlaps the target. It runs
:func:`emcore.finetune.finetune` (coarse to fine inside the chunk) from the coarse field, crops the
context down to a *piece* (the chunk grown by a blend ``margin``, :func:`emcore.blend.piece_box`)
and stores it beside the pair layer (``<pairs>/.sectionflow/pieces/...``, a ``.npy`` per chunk).

Then :func:`blend_chunk_task` writes each chunk of ``P[z, k]`` at the finetune mip into the pair
layer as the raised-cosine blend of the pieces that overlap it (:func:`emcore.blend.blend_pieces`),
so neighbouring chunks meet without a seam. Every chunk saw ``pad`` px of real neighbouring data;
the chunked result equals the whole-section result within a small tolerance away from the volume
edge (tested in ``tests/flows/test_chunking.py``).
"""

from __future__ import annotations

import io

import numpy as np
import torch
from cloudfiles import CloudFiles

from emcore.blend import blend_pieces, piece_box
from emcore.finetune import finetune
from emcore.geometry import VoxelBox
from emcore.layers import open_layer
from tasks.coarse import section_box
from tasks.io import read_field, read_tensor
from tasks.markers import ChunkMarker, ChunkOutcome

__all__ = ["blend_chunk_task", "finetune_chunk_task"]


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
    coarse_mip: int,
    *,
    pad: int,
    margin: int,
    bounds: VoxelBox,
    sm: float,
    num_iter: int,
    defects: str | None = None,
) -> ChunkOutcome:
    """Refine ``P[z, k]`` on ``box`` (xy chunk at ``mip``, any z) and store its blend piece.

    ``bounds`` is the region the chunks tile (xy, voxels at ``mip``); ``margin <= pad`` is the blend
    margin in px.
    """
    if margin > pad:
        raise ValueError(f"blend margin {margin} px must not exceed the context pad {pad} px")
    params = {
        "margin": margin,
        "bounds": str(bounds),
        "z": z,
        "k": k,
        "mip": mip,
        "coarse_mip": coarse_mip,
        "pad": pad,
        "sm": sm,
        "num_iter": num_iter,
    }
    chunk = section_box(box, z)
    marker = ChunkMarker(pairs, "finetune", f"{chunk}@{mip}:{z}-{k}", (image, defects or ""), params)
    previous = marker.read_extra()
    if previous is not None:
        return ChunkOutcome("finetune", f"{z}-{k} {chunk}", "skipped", previous)
    padded = chunk.padded(pad)
    pair_layer, img = open_layer(pairs), open_layer(image)
    init = read_field(pair_layer, padded, mip, field_mip=coarse_mip)
    shift = (int(round(float(init[:, 0].median()))), int(round(float(init[:, 1].median()))))
    src_box = padded.translated((shift[0], shift[1], 0))
    tgt_box = section_box(padded, z - k)
    src, tgt = read_tensor(img, src_box, mip), read_tensor(img, tgt_box, mip)
    src_def = tgt_def = None
    if defects:
        mask_layer = open_layer(defects)
        src_def = read_tensor(mask_layer, src_box, mip) != 0
        tgt_def = read_tensor(mask_layer, tgt_box, mip) != 0
    shift_t = torch.tensor(shift, dtype=torch.float32).view(1, 2, 1, 1)
    result = finetune(
        src,
        tgt,
        init_field=init - shift_t,
        src_defects=src_def,
        tgt_defects=tgt_def,
        sm=sm,
        num_iter=num_iter,
    )
    field = (result.field + shift_t).numpy()
    piece = piece_box(chunk, bounds, margin)
    y0, x0 = piece.start[1] - padded.start[1], piece.start[0] - padded.start[0]
    _save_piece(pairs, chunk, mip, field[..., y0:y0 + piece.shape[1], x0:x0 + piece.shape[0]])
    detail = {
        "z": z,
        "k": k,
        "loss": float(result.loss[0]),
        "no_data": bool(result.no_data[0]),
        "seconds": round(result.seconds, 3),
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
