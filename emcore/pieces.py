"""Split a section's tissue into pieces along its defect mask (folds, cracks).

A fold band or a crack gap can cut a section in two or more pieces of tissue that moved
independently (a tear). :func:`split_pieces` finds them:

1. tissue = pixels with data (``image != 0``, :mod:`emcore.normalize`'s "0 = no data") that are
   not defects (``defects`` True = fold band / crack gap);
2. pieces = the 4-connected components of that tissue (4-connectivity, so that a one-pixel-wide
   diagonal defect line still separates its two sides);
3. slivers (components below ``min_area`` px, by default ``min_fraction`` of the tissue) are
   merged into the large piece they touch most *through the defects* (the contact count after
   growing the sliver up to ``touch_px`` px into defect pixels only), or dropped ("no data",
   label 0) when they touch none.

Labels are ``1..n`` ordered by decreasing area (piece 1 is the largest); 0 = no piece (no data,
defect, or dropped sliver). All inputs are ``(H, W)`` (or ``(1, 1, H, W)``) tensors or arrays at one
mip; areas are in px at that mip. Pure numpy/scipy.ndimage, nothing is modified in place.

No-data tears seen from a finer mip
----------------------------------
The pyramid's 2x mean over the data pixels (:mod:`emcore.pyramid`) closes a thin no-data gap within
a few mips, so an empty crack (no data, no defect mask) that cuts a section in two at a fine mip
may leave one piece at the coarse mip. :func:`nodata_tears` finds the pieces at the fine mip (the
4-connected components of ``image != 0`` of at least ``min_fraction`` of the tissue; smaller ones
are ignored, no sliver merging) and, when there are >= 2, marks at the mip ``factor`` x coarser
the pixels where the gap closed: the coarse pixels whose ``factor x factor`` block holds pixels of
two pieces, those next to a coarse pixel of another piece, and data pixels of no piece (slivers,
dust in the gap) next to a piece. United with the defects mask at the coarse mip, the tissue
there then splits along the gap: every 4-connected component of the unmarked coarse tissue lies
in one fine piece (two unmarked, adjacent coarse pixels with data always belong to the same
piece). A section whose tissue is one piece at the fine mip (margins, holes, ragged edges,
slivers under ``min_fraction``) gets ``None``: nothing changes for it.

API summary
-----------
* :func:`split_pieces` -> :class:`Pieces` ``(labels (H, W) int32, areas, merged, dropped,
  min_area)``; ``.count``, ``.mask(i)``.
* :func:`nodata_tears` ``(fine image, factor)`` -> ``(ceil(H / factor), ceil(W / factor))`` bool
  tear mask at the coarse mip, or ``None`` when the fine tissue is one piece.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage

from emcore.quality import as_section

__all__ = ["Pieces", "nodata_tears", "split_pieces"]

_FOUR = ndimage.generate_binary_structure(2, 1)


@dataclass(frozen=True)
class Pieces:
    """The tissue pieces of one section.

    Attributes:
        labels: ``(H, W)`` int32; ``1..count`` = piece (1 = largest), 0 = no piece.
        areas: px per piece, ``areas[i - 1]`` for label ``i`` (after merging slivers).
        merged: ``{sliver area px: label it joined}`` per merged sliver, as a list of pairs.
        dropped: areas (px) of slivers that touched no large piece (now label 0).
        min_area: the sliver threshold used (px).
    """

    labels: np.ndarray
    areas: list[int]
    merged: list[tuple[int, int]] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    min_area: int = 0

    @property
    def count(self) -> int:
        """Number of pieces (0 for a section without tissue)."""
        return len(self.areas)

    def mask(self, label: int) -> np.ndarray:
        """``(H, W)`` bool mask of piece ``label`` (``1..count``)."""
        if not 1 <= label <= self.count:
            raise ValueError(f"piece label must be in 1..{self.count}, got {label}")
        return self.labels == label


def split_pieces(
    image: torch.Tensor | np.ndarray,
    defects: torch.Tensor | np.ndarray,
    *,
    min_fraction: float = 0.02,
    min_area: int | None = None,
    touch_px: int = 8,
) -> Pieces:
    """The pieces of tissue that ``defects`` cut ``image`` into.

    Args:
        image: ``(H, W)`` or ``(1, 1, H, W)`` section, 0 = no data.
        defects: same shape, nonzero = defect (fold band, crack gap).
        min_fraction: default sliver threshold as a fraction of the tissue area.
        min_area: sliver threshold in px (overrides ``min_fraction``).
        touch_px: how far (px, through defect pixels only) a sliver looks for a piece to join.

    Returns:
        :class:`Pieces`, labels ordered by decreasing area.
    """
    img = as_section(image, "image")
    bad = as_section(defects, "defects") != 0
    if bad.shape != img.shape:
        raise ValueError(f"defects {bad.shape} must match image {img.shape}")
    if not 0 <= min_fraction < 1:
        raise ValueError(f"min_fraction must be in [0, 1), got {min_fraction}")
    if touch_px < 0:
        raise ValueError(f"touch_px must be >= 0, got {touch_px}")
    tissue = (img != 0) & ~bad
    labels, n = ndimage.label(tissue, structure=_FOUR)
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    threshold = int(round(min_fraction * int(tissue.sum()))) if min_area is None else int(min_area)
    large = [i + 1 for i in np.argsort(-areas, kind="stable") if areas[i] >= threshold and areas[i] > 0]
    if not large and n:
        large = [int(np.argmax(areas)) + 1]  # every piece is a sliver: keep the biggest
    relabel = np.zeros(n + 1, dtype=np.int32)
    for new, old in enumerate(large, start=1):
        relabel[old] = new
    merged, dropped = [], []
    big = relabel[labels]
    for old in range(1, n + 1):
        if relabel[old]:
            continue
        sliver = labels == old
        grown = sliver
        for _ in range(touch_px):
            grown = grown | (ndimage.binary_dilation(grown, structure=_FOUR) & bad)
        contact = ndimage.binary_dilation(grown, structure=_FOUR) & (big > 0)
        counts = np.bincount(big[contact], minlength=len(large) + 1)[1:]
        if counts.size and counts.max() > 0:
            target = int(np.argmax(counts)) + 1
            relabel[old] = target
            merged.append((int(areas[old - 1]), target))
        else:
            dropped.append(int(areas[old - 1]))
    out = relabel[labels].astype(np.int32)
    final = np.bincount(out.ravel(), minlength=len(large) + 1)[1:]
    order = np.zeros(len(large) + 1, dtype=np.int32)  # merging may reorder the areas
    order[1:][np.argsort(-final, kind="stable")] = np.arange(1, len(large) + 1, dtype=np.int32)
    merged = [(area, int(order[label])) for area, label in merged]
    return Pieces(order[out], [int(a) for a in sorted(final, reverse=True)], merged, dropped, threshold)


def _large_components(tissue: np.ndarray, min_fraction: float) -> np.ndarray:
    """``(H, W)`` int32: the 4-connected components of ``tissue`` of at least ``min_fraction`` of it,
    labelled ``1..n`` by decreasing area; 0 elsewhere (no data and the smaller components)."""
    labels, n = ndimage.label(tissue, structure=_FOUR)
    if n < 2:
        return np.zeros_like(labels, dtype=np.int32) if n == 0 else labels.astype(np.int32)
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    areas[0] = 0
    threshold = max(1, int(round(min_fraction * int(areas.sum()))))
    order = np.argsort(-areas, kind="stable")
    relabel = np.zeros(n + 1, dtype=np.int32)
    kept = [int(i) for i in order if areas[i] >= threshold and i > 0]
    relabel[kept] = np.arange(1, len(kept) + 1, dtype=np.int32)
    return relabel[labels]


def _blocks(data: np.ndarray, factor: int, fill: int) -> np.ndarray:
    """``(h, w, factor * factor)`` view of ``data`` padded with ``fill`` to a multiple of ``factor``."""
    h, w = data.shape
    hc, wc = -(-h // factor), -(-w // factor)
    padded = np.full((hc * factor, wc * factor), fill, dtype=data.dtype)
    padded[:h, :w] = data
    return padded.reshape(hc, factor, wc, factor).transpose(0, 2, 1, 3).reshape(hc, wc, factor * factor)


def nodata_tears(
    fine_image: torch.Tensor | np.ndarray, factor: int, *, min_fraction: float = 0.02
) -> np.ndarray | None:
    """Where no-data gaps that cut ``fine_image``'s tissue into >= 2 pieces closed, ``factor`` x coarser.

    Args:
        fine_image: ``(H, W)`` or ``(1, 1, H, W)`` section at the fine mip, 0 = no data.
        factor: ``2 ** (coarse_mip - fine_mip)`` (1 = the same mip); coarse pixel ``(i, j)`` covers
            the fine block ``[i f, (i + 1) f) x [j f, (j + 1) f)``, as :mod:`emcore.pyramid` makes it.
        min_fraction: a piece is a component of at least this fraction of the tissue area.

    Returns:
        ``(ceil(H / f), ceil(W / f))`` bool, True = tear line at the coarse mip (see the module
        docstring; all False when the gap is still open there), or ``None`` when the fine tissue
        has fewer than 2 pieces.
    """
    img = as_section(fine_image, "fine_image")
    if factor < 1 or factor & (factor - 1):
        raise ValueError(f"factor must be a power of 2 >= 1, got {factor}")
    if not 0 <= min_fraction < 1:
        raise ValueError(f"min_fraction must be in [0, 1), got {min_fraction}")
    tissue = img != 0
    labels = _large_components(tissue, min_fraction)
    if labels.max() < 2:
        return None
    big = np.iinfo(np.int32).max
    top = _blocks(labels, factor, 0).max(axis=2)
    low = _blocks(np.where(labels > 0, labels, big).astype(np.int32), factor, big).min(axis=2)
    data = _blocks(tissue, factor, False).any(axis=2)
    two = (top > 0) & (low != top)  # a block with pixels of two pieces
    one = np.where((top > 0) & ~two, top, 0)
    tear = two.copy()
    for axis in (0, 1):  # a coarse pixel of one piece next to one of another
        a = np.moveaxis(one, axis, 0)
        diff = (a[1:] > 0) & (a[:-1] > 0) & (a[1:] != a[:-1])
        t = np.moveaxis(tear, axis, 0)
        t[1:] |= diff
        t[:-1] |= diff
    stray = data & (top == 0)  # data of no piece (a sliver, dust in the gap) next to a piece
    tear |= stray & ndimage.binary_dilation(top > 0, structure=_FOUR)
    return tear
