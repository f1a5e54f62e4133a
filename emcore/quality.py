"""Alignment quality of image stacks: tiled Pearson correlation between neighbouring sections.

Two aligned neighbouring sections look alike locally, so the Pearson correlation of their
intensities in small tiles rises when alignment improves (it never reaches 1: the sections are
50 nm apart and differ). Computed per tile (so a local misalignment is not averaged away and
results are chunk-friendly) over the pixels where *both* sections have data (0 = no data) and
neither mask is set; a tile with fewer than ``min_pixels`` such pixels, or constant intensity in
either section, has no value (NaN). A section's summary is the median over its tiles.

Images are 2D ``(Y, X)`` arrays (numpy or torch, any real dtype, e.g. normalized float32 or raw
uint8) at any mip; tiles are ``tile`` px of that mip. Masks: nonzero = exclude.

API summary
-----------
* :func:`tile_correlation` -> :class:`TileCorrelation` ``(tiles (TY, TX) float64 with NaN,
  median, valid_tiles)`` for one pair of sections.
* :func:`neighbour_correlation` -> ``(Z,)`` float64: for each section ``z >= 1`` the median tile
  correlation with section ``z - 1`` (NaN for ``z = 0`` and for pairs without any valid tile).
  Used for the report's before/after table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["TileCorrelation", "as_section", "neighbour_correlation", "tile_correlation"]


@dataclass(frozen=True)
class TileCorrelation:
    """Per-tile Pearson correlations ``(TY, TX)`` (NaN = no value), their median and count."""

    tiles: np.ndarray
    median: float
    valid_tiles: int


def as_section(values: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    """``values`` as a 2-D ``(H, W)`` numpy array (a tensor is copied to the CPU); ``(1, 1, H, W)``
    is accepted. Raises ``ValueError`` naming ``name`` for another shape or a non-numeric dtype."""
    arr = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if arr.ndim == 4 and arr.shape[:2] == (1, 1):
        arr = arr[0, 0]
    if arr.ndim != 2:
        raise ValueError(f"{name} must have shape (H, W) or (1, 1, H, W), got {tuple(arr.shape)}")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"{name} must be numeric, got {arr.dtype}")
    return arr


def _tiles(arr: np.ndarray, tile: int) -> np.ndarray:
    """``(TY, TX, tile * tile)`` view of ``arr`` zero-padded to a multiple of ``tile``."""
    h, w = arr.shape
    ty, tx = -(-h // tile), -(-w // tile)
    padded = np.zeros((ty * tile, tx * tile), dtype=arr.dtype)
    padded[:h, :w] = arr
    return padded.reshape(ty, tile, tx, tile).transpose(0, 2, 1, 3).reshape(ty, tx, tile * tile)


def tile_correlation(
    a: np.ndarray | torch.Tensor,
    b: np.ndarray | torch.Tensor,
    *,
    tile: int = 64,
    mask_a: np.ndarray | torch.Tensor | None = None,
    mask_b: np.ndarray | torch.Tensor | None = None,
    min_pixels: int | None = None,
) -> TileCorrelation:
    """Pearson correlation of ``a`` and ``b`` in ``tile x tile`` px tiles.

    Args:
        a, b: sections ``(Y, X)`` (or ``(1, 1, Y, X)``) of the same shape; 0 = no data.
        tile: tile side in px (edge tiles may be partial).
        mask_a, mask_b: optional masks (nonzero = exclude), same shape.
        min_pixels: tiles with fewer usable pixels have no value (default ``tile * tile // 4``).
    """
    if tile < 2:
        raise ValueError(f"tile must be >= 2 px, got {tile}")
    a2, b2 = as_section(a, "a"), as_section(b, "b")
    if a2.shape != b2.shape:
        raise ValueError(f"sections must have the same shape, got {a2.shape} and {b2.shape}")
    keep = (a2 != 0) & (b2 != 0)
    for name, mask in (("mask_a", mask_a), ("mask_b", mask_b)):
        if mask is not None:
            m = as_section(mask, name)
            if m.shape != a2.shape:
                raise ValueError(f"{name} {m.shape} must match the sections {a2.shape}")
            keep &= m == 0
    needed = tile * tile // 4 if min_pixels is None else int(min_pixels)
    k = _tiles(keep, tile).astype(np.float64)
    x = _tiles(a2.astype(np.float64), tile) * k
    y = _tiles(b2.astype(np.float64), tile) * k
    n = k.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mx, my = x.sum(-1) / n, y.sum(-1) / n
        cov = (x * y).sum(-1) / n - mx * my
        vx = (x * x).sum(-1) / n - mx * mx
        vy = (y * y).sum(-1) / n - my * my
        denom = np.sqrt(np.clip(vx, 0, None) * np.clip(vy, 0, None))
        scale = np.maximum(np.abs(mx), 1.0) * np.maximum(np.abs(my), 1.0)
        ok = (n >= max(needed, 2)) & (denom > 1e-9 * scale)
        r = np.where(ok, cov / np.where(ok, denom, 1.0), np.nan)
    r = np.clip(r, -1.0, 1.0)
    count = int(np.isfinite(r).sum())
    median = float(np.nanmedian(r)) if count else float("nan")
    return TileCorrelation(tiles=r, median=median, valid_tiles=count)


def neighbour_correlation(
    stack: np.ndarray | torch.Tensor,
    *,
    tile: int = 64,
    masks: np.ndarray | torch.Tensor | None = None,
    min_pixels: int | None = None,
) -> np.ndarray:
    """Median tile correlation of every section with the one before it.

    Args:
        stack: ``(Z, Y, X)`` sections (or ``(Z, 1, Y, X)``), 0 = no data.
        tile, min_pixels: as in :func:`tile_correlation`.
        masks: optional ``(Z, Y, X)`` (or ``(Z, 1, Y, X)``) masks, nonzero = exclude.

    Returns:
        ``(Z,)`` float64; entry ``z`` compares sections ``z`` and ``z - 1``; entry 0 is NaN, as is any
        pair without a valid tile (e.g. next to a blank section).
    """
    arr = stack.detach().cpu().numpy() if isinstance(stack, torch.Tensor) else np.asarray(stack)
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 3:
        raise ValueError(f"stack must have shape (Z, Y, X) or (Z, 1, Y, X), got {arr.shape}")
    m = None
    if masks is not None:
        m = masks.detach().cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
        if m.ndim == 4 and m.shape[1] == 1:
            m = m[:, 0]
        if m.shape != arr.shape:
            raise ValueError(f"masks {m.shape} must match the stack {arr.shape}")
    out = np.full(arr.shape[0], np.nan)
    for z in range(1, arr.shape[0]):
        out[z] = tile_correlation(
            arr[z], arr[z - 1], tile=tile, min_pixels=min_pixels,
            mask_a=None if m is None else m[z], mask_b=None if m is None else m[z - 1],
        ).median  # fmt: skip
    return out
