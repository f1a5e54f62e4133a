"""Coarse alignment stage: one pairwise field per (section ``z``, neighbour ``z - k``).

``P[z, k]`` aligns section ``z`` onto section ``z - k`` (``warp(img_z, P) ~= img_{z-k}``,
:mod:`emcore.stack_solve`'s convention), estimated on whole sections at a coarse mip (defect masks
excluded) by one of three methods (``AlignParams.coarse_method``):

* ``"classical"``: :func:`emcore.coarse_xcorr.coarse_align` (masked FFT cross-correlation + patch
  fit, no model);
* ``"learned"``: the shipped ``pyramid_aligner`` network alone;
* ``"classical+refine"``: the classical aligner, then the shipped ``pyramid_refiner`` network on
  what it leaves (:func:`emcore.models.refine.learned_coarse_align` for both learned methods).

It is stored at the coarse mip in the pair layer ``<out>/fields/pairwise/z-<k>`` at section ``z``,
and its least-squares affine matrix (px at the coarse mip, origin = the region's first pixel,
:mod:`emcore.affine`) goes into the outcome's ``detail["matrix"]`` for the global affine stack solve
(:mod:`emcore.affine_solve`).

A pair that cannot be measured (a blank section) is written as zeros and reported ``blank``; an
unreliable estimate is reported with its reason and gets weight 0 in the stack solve.

Torn sections (issue 16): with a ``defects`` layer, method ``"classical"``, and a defect mask that
splits the tissue of ``z`` or ``z - k`` into >= 2 pieces (:func:`emcore.pieces.split_pieces`),
the pair is estimated piece by piece (:func:`emcore.coarse_pieces.coarse_align_pieces`). Then

* the field written to the pair layer is the torn piecewise field (each piece its own transform);
* ``detail["matrix"]`` is the **largest piece's** matrix, not the least-squares affine of the torn
  field (that would be a blend that fits neither side): a piecewise result does not fit in one
  affine, so the section affine (:mod:`tasks.affine`) follows the largest piece;
* ``detail["pieces"]`` lists the side whose mask split, and per piece its area, matrix,
  reliability, whether it fell back to the whole-section transform, and why.

Empty cracks (no data in the gap, no mask marks them) split a section too: the pyramid's mean over
the data pixels closes a thin no-data gap within a few mips, so the task also reads each section
at :func:`tear_mip` (up to :data:`TEAR_MIPS` mips finer, never finer than :data:`TEAR_NM` nm/px nor
more than :data:`TEAR_READ_PX` px) and, where its tissue (``image != 0``) falls into >= 2 pieces
there, unites the section's defect mask with the tear lines of :func:`emcore.pieces.nodata_tears`
(:func:`section_defects`; also without a ``defects`` layer). Such a pair takes the piecewise path
(``detail["pieces"]["nodata"]`` names the sides); a section whose fine tissue is one piece (a
margin, holes, a ragged edge) keeps its mask as it was, bit for bit. Limit: the fine mip's tissue
is the image alone, so a tear made of a no-data gap *and* a masked band together is not seen there.

Every other pair takes exactly the unsplit path. The other pieces' motion relative to the largest
one (``detail["pieces"]``) is handed to the later stages beside the section affine, as the torn
section's coarse field ``S[z]`` (:mod:`tasks.torn`, built by the coarse stage flow after the affine
solve): the finetune stage reads a torn section through ``S[z]`` and the solve stage composes the
final field with it.

Why the piece motion cannot simply ride in the finetuned residual ``Q[z, k]``: the stack solve
(:func:`emcore.stack_solve.solve_stack` with the default ``anchor`` 1 and ``robust_px`` 2) treats
a large residual as an outlier against its anchor. Measured on 4 sections of 128 px with section
2's far half torn by 30 px in every pair that touches it (exact pairs, k = 1, 2): ``G[2]`` on the
far side came out 0.40 px (anchor 0: 30.00 px; anchor 1 without the robust loss: 20.57 px). So the
torn motion lives beside the section affine, with no anchor on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch

from emcore.affine import fit_affine
from emcore.coarse_pieces import PiecewiseAlignment, coarse_align_pieces
from emcore.coarse_xcorr import coarse_align
from emcore.errors import BlankSectionError
from emcore.geometry import VoxelBox
from emcore.layers import Layer, open_layer
from emcore.mip_plan import FINETUNE_NM
from emcore.models import Model, load_model
from emcore.models.refine import LEARNED_METHODS, learned_coarse_align
from emcore.pieces import nodata_tears, split_pieces
from tasks.io import read_tensor
from tasks.markers import ChunkMarker, ChunkOutcome

__all__ = [
    "COARSE_METHODS", "TEAR_MIPS", "TEAR_NM", "TEAR_READ_PX", "coarse_pair_task", "section_box",
    "defects_with_tears", "layer_tear_mip", "section_defects", "tear_mip", "tissue_splits",
]  # fmt: skip

COARSE_METHODS = ("classical", *LEARNED_METHODS)

#: No-data tears are looked for at most this many mips below the coarse mip: a gap of ``g`` px at
#: the coarse mip is ``8 g`` px there (measured: a 10 px no-data gap still splits 2 mips up and
#: not 3; a 40 px one up to 4).
TEAR_MIPS = 3
#: ... never at a finer resolution than this (nm/px; :data:`emcore.mip_plan.FINETUNE_NM`'s floor, the
#: finetune stage's usual finest mip): a gap open only below it is a motion within the finetuner's
#: reach there.
TEAR_NM = FINETUNE_NM[0]
#: ... and never reading more than this many px per section.
TEAR_READ_PX = 4096 * 4096


@lru_cache(maxsize=4)
def _shipped_model(name: str) -> Model:
    """A shipped model, loaded once per worker process."""
    return load_model(name)


def section_box(region: VoxelBox, z: int) -> VoxelBox:
    """The xy extent of ``region`` at section ``z`` (one section thick)."""
    return VoxelBox((region.start[0], region.start[1], z), (region.stop[0], region.stop[1], z + 1))


def tear_mip(resolutions_nm: Sequence[float], mip: int, section_px: tuple[int, int]) -> int:
    """The mip at which the coarse stage looks for no-data tears of sections at ``mip``.

    The finest of ``mip - TEAR_MIPS .. mip - 1`` whose x resolution (``resolutions_nm[m]``, nm/px)
    is at least :data:`TEAR_NM` and whose section (``section_px = (x, y)`` px at ``mip``) has at
    most :data:`TEAR_READ_PX` px; ``mip`` itself when none is (then the coarse image is used).
    """
    for m in range(max(0, mip - TEAR_MIPS), mip):
        f = 2 ** (mip - m)
        if resolutions_nm[m] >= TEAR_NM and section_px[0] * f * section_px[1] * f <= TEAR_READ_PX:
            return m
    return mip


def layer_tear_mip(layer: Layer, mip: int, region: VoxelBox) -> int:
    """:func:`tear_mip` for sections of ``layer`` on ``region`` (xy voxels at ``mip``)."""
    resolutions = [layer.resolution(m)[0] for m in range(layer.num_mips)]
    return tear_mip(resolutions, mip, (region.shape[0], region.shape[1]))


def defects_with_tears(
    fine: torch.Tensor, factor: int, mask: torch.Tensor | None
) -> tuple[torch.Tensor | None, bool]:
    """``mask`` (``(H, W)`` at the coarse mip, or ``None``) united with the no-data tears of
    ``fine`` (the section ``factor`` x finer, :func:`emcore.pieces.nodata_tears`).

    Returns ``(mask, nodata)``: ``nodata`` = the fine tissue falls into >= 2 pieces; then ``mask`` is
    the given one (or zeros) united with the tear lines, float32 (1 = defect); otherwise the given
    ``mask`` unchanged (the same object).
    """
    tears = nodata_tears(fine, factor)
    if tears is None:
        return mask, False
    lines = torch.from_numpy(tears)
    united = lines if mask is None else (mask != 0) | lines
    return united.to(torch.float32), True


def section_defects(
    layer: Layer, box: VoxelBox, mip: int, fine_mip: int, image: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor | None, bool]:
    """The defect mask the coarse stage uses for one section, and whether no data splits it.

    Args:
        layer: the image layer; ``box`` the section (xy voxels at ``mip``, one section).
        fine_mip: :func:`tear_mip` (``== mip``: ``image`` itself is looked at).
        image: ``(H, W)`` the section at ``mip``; ``mask``: its ``(H, W)`` defect mask or ``None``.

    Returns:
        :func:`defects_with_tears` of the section read at ``fine_mip``.
    """
    fine = image
    if fine_mip < mip:
        f = 2 ** (mip - fine_mip)
        fine_box = VoxelBox((box.start[0] * f, box.start[1] * f, box.start[2]),
                            (box.stop[0] * f, box.stop[1] * f, box.stop[2]))  # fmt: skip
        fine = read_tensor(layer, fine_box, fine_mip)[0, 0]
    return defects_with_tears(fine, 2 ** (mip - fine_mip), mask)


def tissue_splits(image: torch.Tensor, mask: torch.Tensor | None, nodata: bool = False) -> bool:
    """Whether ``mask`` (nonzero = defect) cuts the tissue of ``image`` into >= 2 pieces (a mask
    that marks nothing counts only when no data split the section at the fine mip)."""
    if mask is None or not (nodata or bool((mask != 0).any())):
        return False
    return split_pieces(image, mask != 0).count >= 2


def _pieces_detail(result: PiecewiseAlignment) -> dict:
    """The JSON-able per-piece summary of a piecewise coarse result."""
    return {
        "side": result.side,
        "count": result.pieces.count,
        "gap_px": int(result.gap.sum()),
        "gap_conflicts": result.gap_conflicts,
        "transforms": [
            {"label": t.label, "area": t.area, "matrix": t.matrix.tolist(), "reliable": t.reliable,
             "fallback": t.fallback, "reason": t.reason}
            for t in result.transforms
        ],
    }  # fmt: skip


def coarse_pair_task(
    image: str,
    output: str,
    region: VoxelBox,
    z: int,
    k: int,
    mip: int,
    model: str = "rigid",
    defects: str | None = None,
    method: str = "classical",
) -> ChunkOutcome:
    """Estimate ``P[z, k]`` on ``region`` (chunk-aligned xy box at ``mip``) and write it to ``output``.

    ``model`` is the classical aligner's model (used by ``"classical"`` and ``"classical+refine"``);
    ``method`` one of :data:`COARSE_METHODS`.

    Returns a :class:`~tasks.markers.ChunkOutcome` whose ``detail`` has ``z, k, blank, reliable,
    confidence, reason, matrix`` (kept in the marker, so a skipped rerun reports the same).
    """
    if method not in COARSE_METHODS:
        raise ValueError(f"coarse method must be one of {COARSE_METHODS}, got {method!r}")
    params: dict = {"z": z, "k": k, "mip": mip, "model": model, "method": method}
    network = None
    if method in LEARNED_METHODS:
        network = _shipped_model(LEARNED_METHODS[method])
        params["weights_sha256"] = network.config.weights_sha256  # new weights: recompute
    img = open_layer(image)
    fine_mip = mip
    if network is None:
        fine_mip = layer_tear_mip(img, mip, region)
        if fine_mip < mip:
            params["tear_mip"] = fine_mip  # only then: the markers of other runs stay valid
    marker = ChunkMarker(output, "coarse", f"{region}@{mip}:{z}-{k}", (image, defects or ""), params)
    previous = marker.read_extra()
    if previous is not None:
        return ChunkOutcome("coarse", f"{z}-{k}", "skipped", previous)
    src_box, tgt_box = section_box(region, z), section_box(region, z - k)
    src, tgt = read_tensor(img, src_box, mip)[0, 0], read_tensor(img, tgt_box, mip)[0, 0]
    src_mask = tgt_mask = None
    if defects:
        mask_layer = open_layer(defects)
        src_mask = read_tensor(mask_layer, src_box, mip)[0, 0]
        tgt_mask = read_tensor(mask_layer, tgt_box, mip)[0, 0]
    src_nodata = tgt_nodata = False
    if network is None:
        src_mask, src_nodata = section_defects(img, src_box, mip, fine_mip, src, src_mask)
        tgt_mask, tgt_nodata = section_defects(img, tgt_box, mip, fine_mip, tgt, tgt_mask)
    detail: dict = {"z": z, "k": k, "blank": False, "reliable": False, "confidence": 0.0, "reason": ""}
    try:
        torn = network is None and (
            tissue_splits(src, src_mask, src_nodata) or tissue_splits(tgt, tgt_mask, tgt_nodata)
        )
        if torn:
            pieces = coarse_align_pieces(src, tgt, src_mask, tgt_mask, model=model)
            field = pieces.field
            first = pieces.transforms[0]
            confidence = pieces.whole.confidence if first.fallback else max(0.0, min(1.0, first.peak))
            summary = _pieces_detail(pieces)
            sides = (("source", src_nodata), ("target", tgt_nodata))
            summary["nodata"] = [side for side, hit in sides if hit]
            detail.update(
                pieces=summary,
                translation=[float(pieces.matrix[0, 2]), float(pieces.matrix[1, 2])],
                matrix=pieces.matrix.tolist(),
                reliable=bool(pieces.reliable),
                confidence=float(confidence),
                reason=pieces.reason,
            )
        elif network is None:
            result = coarse_align(src, tgt, src_mask=src_mask, tgt_mask=tgt_mask, model=model)
            field = result.field
            detail.update(translation=[float(result.translation.dx), float(result.translation.dy)])
        else:
            result = learned_coarse_align(
                src, tgt, method=method, network=network, model=model,
                moving_mask=src_mask, fixed_mask=tgt_mask,
            )  # fmt: skip
            field = result.field
        if not torn:
            detail.update(matrix=fit_affine(field).tolist())
            detail.update(
                reliable=bool(result.reliable), confidence=float(result.confidence), reason=result.reason
            )
    except BlankSectionError as exc:
        field = torch.zeros(1, 2, *src.shape)
        detail.update(blank=True, reason=str(exc), matrix=[[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    open_layer(output).write(src_box, field.numpy(), mip)
    marker.mark_done(detail)
    return ChunkOutcome("coarse", f"{z}-{k}", "done", detail)
