"""Fold / crack detection with a learned model: section -> boolean defect mask.

:func:`detect_defects` runs a detector (the shipped ``defect_detector``, see
``emcore/models/weights/README.md``) over a normalized section, tile by tile with full context
(:func:`emcore.models.encode.encode_tiled`: the image continues with zeros beyond its edges, and
the result does not depend on the tile size), and thresholds the defect probability.

Input: ``(N, 1, H, W)`` float32 sections normalized to tissue mean 0 / std 1
(:mod:`emcore.normalize`), 0 = no data, at the model's resolution (``config.resolution_nm``,
15-50 nm/px for ``defect_detector``, trained at ~20 and ~40 nm/px: resample first, e.g. with
:mod:`emcore.pyramid`; at the finest such mip a thin crack is widest, and a gap under ~3 px is not
found). The shipped detector was trained on normalized images, not on encodings.

Output: ``(N, 1, H, W)`` bool, True on fold bands and resin-filled cracks. No-data pixels (0) are
never marked: an empty crack gap is no data already, which every consumer treats as "nothing
here".

Length rule (``min_length`` px of :func:`detect_defects`; the pipeline passes
``min_length_px(nm_per_px)``, i.e. :data:`MIN_DEFECT_LENGTH_NM` = 1.6 um): a fold or crack is a
long band, so a marked connected component (8-connected) whose length, its largest extent (max
Feret diameter between pixel centres, + 1 px), is under ``min_length`` px is dropped. On the real
shared stacks every component the network marks on clean sections is a dark, smooth, thick cell
profile of at most 33 px (1.3 um) at 40 nm/px; on held-out synthetic sections no whole defect is
that short (the shortest found is 46 px; only pieces of bands broken up by strong artifacts are).
A real fold shorter than 1.6 um is not reported (see the weights README).

Contrast rule (``min_bright_contrast`` of :func:`detect_defects`; the pipeline passes
:data:`MIN_BRIGHT_CONTRAST` = 1.6 tissue std): a marked component brighter than the tissue mean
(its mean above 0: resin-like; a fold band, drawn 1.5-3 std below the mean, is not) is kept only if its
mean is at least ``min_bright_contrast`` above the mean of the tissue within
:data:`CONTRAST_RING_PX` px around it (:func:`component_contrasts`). Resin is the brightest thing in
a section (it takes no stain), so a resin-filled crack stands out from the tissue on both sides of
it; a large bright cell process that the network takes for resin under blur and a brightness
gradient does not: part of the ring around the marked part is the same bright process. Dark
components are not touched (their contrast does not separate fold bands from dark cell profiles).
1.6 was chosen on training sections with the artifact augmentation (the largest value that loses at
most 0.5 % of the true-positive pixels there); see the weights README ("Clean sections with
artifacts").
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from torch import nn

from emcore.models.encode import encode_tiled
from emcore.models.format import Model
from emcore.pyramid import downsample_image_torch

__all__ = [
    "CONTRAST_RING_PX",
    "DEFAULT_THRESHOLD",
    "MIN_BRIGHT_CONTRAST",
    "MIN_DEFECT_LENGTH_NM",
    "component_contrasts",
    "component_lengths",
    "defect_probability",
    "detect_defects",
    "detect_defects_two_scales",
    "drop_faint_bright_components",
    "drop_short_components",
    "min_length_px",
]

DEFAULT_THRESHOLD = 0.5
#: The shortest marked component the pipeline keeps, in nm (1.6 um: 40 px at 40 nm/px).
MIN_DEFECT_LENGTH_NM = 1600.0
#: How much brighter than the tissue around it (tissue std) a bright marked component must be.
MIN_BRIGHT_CONTRAST = 1.6
#: The ring around a component whose tissue it is compared with, px at the detection mip.
CONTRAST_RING_PX = 3


def min_length_px(resolution_nm: float, length_nm: float = MIN_DEFECT_LENGTH_NM) -> float:
    """``length_nm`` in px at ``resolution_nm`` nm/px (the detection mip's x resolution)."""
    if not resolution_nm > 0:
        raise ValueError(f"resolution_nm must be > 0, got {resolution_nm}")
    return length_nm / resolution_nm


def _max_extent(points: np.ndarray) -> float:
    """Largest distance between two of ``points`` ``(K, 2)`` (px), via their convex hull."""
    if len(points) > 3:
        try:
            points = points[ConvexHull(points).vertices]
        except QhullError:  # all on one line: its two ends
            t = (points - points[0]) @ (points[-1] - points[0])
            points = points[[int(t.argmin()), int(t.argmax())]]
    diff = points[:, None, :] - points[None, :, :]
    return float(np.sqrt((diff**2).sum(-1)).max())


def component_lengths(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Label the 8-connected components of a 2-D bool ``mask``; their lengths (px).

    Returns ``(labels, lengths)``: ``labels`` int32 ``(H, W)``, 0 = background, ``k`` = component
    ``k``; ``lengths[k - 1]`` = the component's max Feret diameter between pixel centres + 1.
    """
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    lengths = np.zeros(count, dtype=np.float64)
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        ys, xs = np.nonzero(labels[box] == k)
        lengths[k - 1] = _max_extent(np.stack((ys, xs), 1).astype(np.float64)) + 1.0
    return labels.astype(np.int32), lengths


def drop_short_components(mask: torch.Tensor, min_length: float) -> torch.Tensor:
    """``mask`` ``(N, 1, H, W)`` bool without its components shorter than ``min_length`` px.

    Components and lengths are per section (:func:`component_lengths`); ``min_length <= 1``
    keeps everything.
    """
    _check_mask(mask, "drop_short_components")
    if min_length <= 1.0 or not mask.any():
        return mask
    out = mask.clone()
    for i in range(mask.shape[0]):
        labels, lengths = component_lengths(mask[i, 0].numpy())
        short = np.concatenate(([False], lengths < min_length))
        out[i, 0] &= torch.from_numpy(~short[labels])
    return out


def _check_mask(mask: torch.Tensor, what: str) -> None:
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.dtype != torch.bool:
        raise ValueError(f"{what} needs a bool (N, 1, H, W) mask, got {mask.dtype} {tuple(mask.shape)}")


def component_contrasts(
    image: np.ndarray, labels: np.ndarray, ring_px: int = CONTRAST_RING_PX
) -> tuple[np.ndarray, np.ndarray]:
    """Mean image value of each labelled component and of the tissue in a ring around it.

    Args:
        image: ``(H, W)`` normalized section (tissue std units), 0 = no data.
        labels: ``(H, W)`` int, 0 = background, ``k`` = component ``k`` (:func:`component_lengths`).
        ring_px: ring radius (px, Euclidean): the tissue pixels (nonzero) within ``ring_px`` of the
            component and not in it.

    Returns:
        ``(inside, ring)`` float64 ``(K,)``; ``ring[k - 1]`` is NaN where the ring holds no tissue.
    """
    disk = np.hypot(*np.mgrid[-ring_px : ring_px + 1, -ring_px : ring_px + 1]) <= ring_px
    height, width = labels.shape
    boxes = ndimage.find_objects(labels)
    inside, ring = np.zeros(len(boxes)), np.full(len(boxes), np.nan)
    for k, box in enumerate(boxes, start=1):
        if box is None:
            inside[k - 1] = np.nan
            continue
        y0, x0 = max(box[0].start - ring_px, 0), max(box[1].start - ring_px, 0)
        y1, x1 = min(box[0].stop + ring_px, height), min(box[1].stop + ring_px, width)
        part, img = labels[y0:y1, x0:x1] == k, image[y0:y1, x0:x1]
        around = ndimage.binary_dilation(part, structure=disk) & ~part & (img != 0)
        inside[k - 1] = float(img[part].mean())
        if around.any():
            ring[k - 1] = float(img[around].mean())
    return inside, ring


def drop_faint_bright_components(
    mask: torch.Tensor, image: torch.Tensor, min_contrast: float, ring_px: int = CONTRAST_RING_PX
) -> torch.Tensor:
    """``mask`` ``(N, 1, H, W)`` bool without its bright components that do not stand out.

    A component (8-connected, per section) whose mean in ``image`` (``(N, 1, H, W)`` normalized,
    tissue mean 0 / std 1) is above 0 is dropped when that mean is less than ``min_contrast`` above
    the mean of the tissue within ``ring_px`` px around it (:func:`component_contrasts`); dark
    components (mean <= 0) and components without tissue around them are kept.
    """
    _check_mask(mask, "drop_faint_bright_components")
    if image.shape != mask.shape or not image.is_floating_point():
        raise ValueError(
            f"drop_faint_bright_components needs a float image of the mask's shape {tuple(mask.shape)}, "
            f"got {image.dtype} {tuple(image.shape)}"
        )
    if not mask.any():
        return mask
    out = mask.clone()
    for i in range(mask.shape[0]):
        labels, _ = ndimage.label(mask[i, 0].numpy(), structure=np.ones((3, 3), dtype=bool))
        inside, ring = component_contrasts(image[i, 0].numpy(), labels, ring_px)
        faint = (inside > 0) & (inside - ring < min_contrast)  # NaN ring: not faint
        out[i, 0] &= torch.from_numpy(~np.concatenate(([False], faint))[labels])
    return out


def defect_probability(
    image: torch.Tensor, model: Model | nn.Module, *, tile: int | None = 256
) -> torch.Tensor:
    """The detector's defect probability ``(N, 1, H, W)`` float32 in [0, 1]; 0 where no data."""
    if image.ndim != 4 or image.shape[1] != 1 or not image.is_floating_point():
        raise ValueError(
            f"detect_defects needs a float (N, 1, H, W) normalized section tensor, got {image.dtype} "
            f"{tuple(image.shape)}"
        )
    network = model.network if isinstance(model, Model) else model
    if tile is not None:
        multiple = int(getattr(network, "size_multiple", 1))
        tile = -(-tile // multiple) * multiple
    logits = encode_tiled(model, image, tile=tile)
    return torch.where(image != 0, torch.sigmoid(logits), torch.zeros((), dtype=logits.dtype))


def detect_defects(
    image: torch.Tensor,
    model: Model | nn.Module,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    tile: int | None = 256,
    min_length: float | None = None,
    min_bright_contrast: float | None = None,
) -> torch.Tensor:
    """Boolean defect mask ``(N, 1, H, W)``: probability above ``threshold`` on tissue, without
    components shorter than ``min_length`` px and bright ones fainter than ``min_bright_contrast``.

    Args:
        image: ``(N, 1, H, W)`` float normalized sections, 0 = no data, at the model's resolution.
        model: a loaded detector (``load_model("defect_detector")``) or its network.
        threshold: probability above which a pixel is a defect (0 < threshold < 1).
        tile: output tile size in px for the tiled run (``None`` = whole image at once).
        min_length: the length rule, px at the image's resolution (the pipeline passes
            ``min_length_px(resolution_nm)``); ``None`` = no length rule.
        min_bright_contrast: the contrast rule, tissue std (the pipeline passes
            :data:`MIN_BRIGHT_CONTRAST`; :func:`drop_faint_bright_components`); ``None`` = none.
            Both ``None``: the network's mask.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    mask = defect_probability(image, model, tile=tile) > threshold
    if min_length is not None:
        mask = drop_short_components(mask, min_length)
    if min_bright_contrast is not None:
        mask = drop_faint_bright_components(mask, image, min_bright_contrast)
    return mask


def detect_defects_two_scales(
    image: torch.Tensor,
    model: Model,
    resolution_nm: float,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    tile: int | None = 256,
    min_length_nm: float | None = MIN_DEFECT_LENGTH_NM,
    min_bright_contrast: float | None = MIN_BRIGHT_CONTRAST,
) -> torch.Tensor:
    """:func:`detect_defects` at ``image``'s resolution and one mip coarser, united: ``(N, 1, H, W)``.

    The detector's widths are px (3-16 px at every training resolution), so one resolution sees
    only part of the physical widths: at ~20 nm/px a 10 px crack of a 9-10 nm/px section (5 px) is
    found and a 40 px one (20 px) is not; at ~40 nm/px the reverse (2.5 px: as thin as the knife
    streaks it learns to ignore; 10 px: found). So the pipeline runs both: ``image`` at
    ``resolution_nm`` nm/px and its 2x :func:`emcore.pyramid.downsample_image_torch` (when
    ``2 * resolution_nm`` is within ``model.config.resolution_nm``), each with the length rule
    (``min_length_nm``, in px at its own resolution) and the contrast rule, the coarse mask
    repeated 2x pixel by pixel; a pixel is a defect when either marks it (never on no data).
    ``None`` rules are not applied.
    """
    lo, hi = model.config.resolution_nm
    if not lo <= resolution_nm <= hi:
        raise ValueError(
            f"detect_defects_two_scales: {resolution_nm} nm/px is outside the detector's range "
            f"{lo}-{hi} nm/px: resample the section first"
        )

    def one(img: torch.Tensor, nm: float) -> torch.Tensor:
        length = None if min_length_nm is None else min_length_px(nm, min_length_nm)
        return detect_defects(img, model, threshold=threshold, tile=tile, min_length=length,
                              min_bright_contrast=min_bright_contrast)  # fmt: skip

    mask = one(image, resolution_nm)
    if 2 * resolution_nm <= hi:
        height, width = image.shape[-2:]
        coarse = one(downsample_image_torch(image), 2 * resolution_nm)
        up = coarse.repeat_interleave(2, 2).repeat_interleave(2, 3)[..., :height, :width]
        mask = mask | (up & (image != 0))
    return mask
