"""Per-section intensity normalization over tissue, keeping 0 = "no data".

Tissue is every pixel that is nonzero in the image and not set in the (optional) defect mask
(mask nonzero = excluded). Statistics are exact over the tissue pixels of the array they are given,
so they can be computed cheaply on a downsampled mip and applied to another mip of the same section.

API summary
-----------
* ``tissue(image, mask=None) -> bool array``: the tissue pixels.
* ``section_stats(image, mask=None, *, section=...) -> SectionStats(mean, std, count)``: exact
  float64 mean / population std over tissue. Raises :class:`~emcore.errors.BlankSectionError`
  (naming ``section``) when there is no tissue or the tissue is constant (std below ``min_std``),
  and :class:`~emcore.errors.NonFiniteSectionError` when any pixel is NaN or inf (not blank: the
  data is broken and must be fixed, never aligned as "no tissue").
* ``require_finite(image, section=...)``: that NaN/inf check alone.
* ``normalize(image, mean, std, mask=None) -> float32``: ``(image - mean) / std`` on tissue, exactly
  0 elsewhere; tissue values that would be exactly 0.0 become ``TISSUE_FLOOR`` so 0 keeps meaning
  "no data".
* ``keep_tissue_nonzero(values, tissue)``: that last step alone (used by the image pyramid too).

Shapes: any array shape; one call = one section (e.g. ``(Y, X)`` or ``(1, 1, Y, X)``), and ``mask``
must have the image's shape (or broadcast to it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from emcore.errors import BlankSectionError, NonFiniteSectionError

__all__ = [
    "TISSUE_FLOOR",
    "SectionStats",
    "keep_tissue_nonzero",
    "normalize",
    "require_finite",
    "section_stats",
    "tissue",
]

TISSUE_FLOOR = np.float32(1e-6)
"""The value a tissue pixel takes when its float value would be exactly 0.0 (0 means no data)."""


@dataclass(frozen=True)
class SectionStats:
    """Mean and population standard deviation of a section's tissue intensities (image units)."""

    mean: float
    std: float
    count: int


def tissue(image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Bool array: pixels that are nonzero in ``image`` and zero (not set) in ``mask``."""
    image = np.asarray(image)
    out = image != 0
    if mask is not None:
        mask = np.asarray(mask)
        try:
            out = out & (np.broadcast_to(mask, image.shape) == 0)
        except ValueError:
            raise ValueError(
                f"mask of shape {mask.shape} does not match image of shape {image.shape}"
            ) from None
    return out


def require_finite(image: np.ndarray, *, section: object = "?") -> None:
    """Raise :class:`~emcore.errors.NonFiniteSectionError` naming ``section`` if ``image`` has NaN/inf."""
    image = np.asarray(image)
    if not np.issubdtype(image.dtype, np.floating):
        return
    finite = np.isfinite(image)
    if not finite.all():
        nan = int(np.isnan(image).sum())
        inf = int(finite.size - finite.sum()) - nan
        raise NonFiniteSectionError(
            section,
            f"{nan} NaN and {inf} inf pixels of {image.size}: fix the source layer (0 = no data), "
            "then rerun; nothing was written",
        )


def section_stats(
    image: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    section: object = "?",
    min_std: float = 1e-6,
) -> SectionStats:
    """Exact mean/std of the tissue pixels of one section (float64 accumulation).

    Args:
        image: the section at any mip, any numeric dtype; 0 = no data.
        mask: optional defect mask, same shape; nonzero pixels are excluded.
        section: name or z index used in error messages.
        min_std: a std at or below this (image units) counts as a blank section.

    Raises:
        BlankSectionError: no tissue pixels, or constant tissue.
        NonFiniteSectionError: NaN or inf pixels.
    """
    image = np.asarray(image)
    require_finite(image, section=section)
    where = tissue(image, mask)
    values = image[where].astype(np.float64)
    if values.size == 0:
        raise BlankSectionError(section, "no tissue (all pixels are zero or masked); skip it")
    mean = float(values.mean())
    std = float(values.std())
    if not std > min_std:
        raise BlankSectionError(
            section, f"tissue has constant intensity (std {std:g} <= {min_std:g}); skip it"
        )
    return SectionStats(mean=mean, std=std, count=int(values.size))


def keep_tissue_nonzero(values: np.ndarray, tissue_pixels: np.ndarray) -> np.ndarray:
    """Return float ``values`` with tissue pixels that are exactly 0.0 set to ``TISSUE_FLOOR``."""
    return np.where(tissue_pixels & (values == 0), values.dtype.type(TISSUE_FLOOR), values)


def normalize(
    image: np.ndarray, mean: float, std: float, mask: np.ndarray | None = None
) -> np.ndarray:
    """``(image - mean) / std`` as float32 on tissue; exactly 0 on zero or masked pixels.

    ``mean``/``std`` usually come from :func:`section_stats` (possibly at another mip).
    """
    if not (np.isfinite(mean) and np.isfinite(std) and std > 0):
        raise ValueError(f"normalize needs a finite mean and a positive std, got mean={mean}, std={std}")
    image = np.asarray(image)
    where = tissue(image, mask)
    scaled = ((image.astype(np.float64) - mean) / std).astype(np.float32)
    out = np.where(where, scaled, np.float32(0))
    return keep_tissue_nonzero(out, where)
