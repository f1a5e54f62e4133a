"""View a cutout array as an ``xarray.DataArray`` with nm coordinates.

API summary
-----------
* ``as_dataarray(data, box, resolution, *, mip, layer_path="") -> xarray.DataArray``: ``data`` is
  ``(Z, C, Y, X)`` (dims ``z, c, y, x``) or ``(Z, Y, X)`` (dims ``z, y, x``) read at ``box`` (voxels
  at ``mip``, xyz); coordinates ``z``, ``y``, ``x`` are the **voxel centres in nm**
  (``(i + 0.5) * resolution``), ``c`` is the channel index; attrs ``mip``, ``resolution_nm`` (xyz)
  and ``layer_path``. The array is not copied.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xarray as xr

from emcore.geometry import VoxelBox

__all__ = ["as_dataarray"]


def as_dataarray(
    data: np.ndarray,
    box: VoxelBox,
    resolution: Sequence[float],
    *,
    mip: int,
    layer_path: str = "",
) -> xr.DataArray:
    """Wrap ``data`` read at ``box`` (voxels at ``mip``) with nm coordinates (voxel centres)."""
    data = np.asarray(data)
    res = tuple(float(r) for r in resolution)
    if len(res) != 3:
        raise ValueError(f"resolution must be (x, y, z) nm, got {resolution!r}")
    if data.ndim == 4:
        dims: tuple[str, ...] = ("z", "c", "y", "x")
        spatial = (data.shape[0], data.shape[2], data.shape[3])
    elif data.ndim == 3:
        dims = ("z", "y", "x")
        spatial = data.shape
    else:
        raise ValueError(f"cutout must be (Z, C, Y, X) or (Z, Y, X), got shape {data.shape}")
    if tuple(spatial) != box.shape_zyx:
        raise ValueError(f"cutout (Z, Y, X) = {tuple(spatial)} does not match {box} (shape {box.shape_zyx})")
    x0, y0, z0 = box.start
    coords = {
        "z": (np.arange(spatial[0]) + z0 + 0.5) * res[2],
        "y": (np.arange(spatial[1]) + y0 + 0.5) * res[1],
        "x": (np.arange(spatial[2]) + x0 + 0.5) * res[0],
    }
    if data.ndim == 4:
        coords["c"] = np.arange(data.shape[1])
    return xr.DataArray(
        data,
        dims=dims,
        coords=coords,
        attrs={"mip": int(mip), "resolution_nm": res, "layer_path": layer_path},
    )
