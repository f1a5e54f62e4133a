"""Field exchange formats: pure conversions between sectionflow fields and three documented layouts.

sectionflow's own field (:mod:`emcore.field`): ``(N, 2, H, W)`` float32, channel 0 = x, channel 1 =
y, **pixels at the field's mip**, pull semantics ``aligned(p) = source(p + f(p))`` (the field lives
in the aligned frame and says where to read in the source), pixel centres at integer coordinates.

The three export layouts (what :mod:`tasks.field_io` writes; every file states this in its metadata,
see :func:`convention_record`):

* ``npy``: the array exactly as above, ``(N, 2, H, W)`` float32 px, plus a JSON sidecar
  ``<file>.npy.json`` (the ``.npy`` header cannot hold extra keys) with the convention record
  (mip, nm per px, region, units).
* ``ome-zarr``: an OME-Zarr (NGFF 0.6, Zarr v3) container whose root group declares two coordinate
  systems, ``aligned`` and ``source`` (axes z, y, x in nanometer), and one ``displacements``
  coordinate transformation ``aligned -> source`` stored at ``coordinateTransformations/displacements``.
  That array is ``(Z, Y, X, 3)`` float32 in **nanometer** with the displacement axis last, in the
  order of the coordinate system's axes (z, y, x; the z displacement is 0: sections move in
  their plane). NGFF's forward direction maps a point ``p`` of ``aligned`` to ``p + d(p)`` in
  ``source``, which is exactly the pull semantics above. Its own metadata maps array indices to
  ``aligned`` by ``scale`` (nm per voxel) then ``translation`` (the region's offset in nm); NGFF
  and sectionflow both put pixel centres at integer array coordinates.
* ``corgie``: a Neuroglancer-precomputed layer ``(X, Y, Z, 2)`` float32 with corgie/torchfields'
  channel order (channel 0 = **y**, channel 1 = x, px at the layer's mip,
  :func:`emcore.field.to_corgie`); the info file carries the convention record under
  ``"displacement_field"``.

Everything here is numpy/json only (no I/O); inputs are never modified.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from emcore.errors import SectionflowError
from emcore.field import from_corgie, to_corgie

__all__ = [
    "CONVENTION_TEXT",
    "DISPLACEMENTS_PATH",
    "FORMATS",
    "FieldFormatError",
    "FieldRecord",
    "convention_record",
    "from_corgie_array",
    "from_ngff_displacements",
    "ngff_array_attributes",
    "ngff_root_attributes",
    "parse_convention_record",
    "parse_ngff",
    "to_corgie_array",
    "to_ngff_displacements",
]

FORMATS = ("npy", "ome-zarr", "corgie")
DISPLACEMENTS_PATH = "coordinateTransformations/displacements"
NGFF_VERSION = "0.6"
CONVENTION_TEXT = (
    "pull: aligned(p) = source(p + f(p)); the field lives in the aligned frame and says where to read "
    "in the source; pixel centres at integer coordinates; 0 = identity"
)


class FieldFormatError(SectionflowError, ValueError):
    """A field file whose layout or metadata is not one sectionflow can read (the message says why)."""


FieldRecord = dict[str, Any]
"""The convention record: a plain JSON-able dict, see :func:`convention_record`."""


def convention_record(
    layout: str,
    *,
    mip: int,
    resolution_nm: Sequence[float],
    offset_px: Sequence[int],
    shape_zyx: Sequence[int],
    source: str | None = None,
) -> FieldRecord:
    """The metadata every exported field carries, stating its convention.

    Args:
        layout: one of :data:`FORMATS`.
        mip: the field's mip (values in px at this mip for ``npy``/``corgie``).
        resolution_nm: nm per px (x, y, z) at ``mip``.
        offset_px: the region's first voxel (x, y, z) at ``mip`` in the layer's voxel frame.
        shape_zyx: the region's size (z, y, x) in voxels at ``mip``.
        source: where the field came from (a layer path), for the record.
    """
    if layout not in FORMATS:
        raise ValueError(f"layout must be one of {FORMATS}, got {layout!r}")
    channels = {
        "npy": "array (N=z, C, H=y, W=x); channel 0 = x displacement, channel 1 = y displacement",
        "ome-zarr": f"array {DISPLACEMENTS_PATH} (z, y, x, d); d = (z, y, x) displacement, z = 0",
        "corgie": "precomputed (X, Y, Z, C); channel 0 = y displacement, channel 1 = x (corgie/torchfields)",
    }[layout]
    units = "nanometer" if layout == "ome-zarr" else f"pixels at mip {mip}"
    return dict(
        format="sectionflow-displacement-field",
        version=1,
        layout=layout,
        semantics=CONVENTION_TEXT,
        channels=channels,
        units=units,
        mip=int(mip),
        resolution_nm=[float(r) for r in resolution_nm],
        offset_px=[int(o) for o in offset_px],
        shape_zyx=[int(s) for s in shape_zyx],
        source=source,
    )


def parse_convention_record(record: Mapping[str, Any], *, where: str) -> FieldRecord:
    """Check a convention record read back from ``where``; raise :class:`FieldFormatError` if unusable."""
    if record.get("format") != "sectionflow-displacement-field":
        raise FieldFormatError(
            f"{where}: no sectionflow field record (expected format 'sectionflow-displacement-field', "
            f"got {record.get('format')!r}); export the field with `sectionflow export-field`"
        )
    missing = [k for k in ("layout", "mip", "resolution_nm", "offset_px", "shape_zyx") if k not in record]
    if missing:
        raise FieldFormatError(f"{where}: the field record lacks {missing}")
    if record["layout"] not in FORMATS:
        raise FieldFormatError(f"{where}: unknown layout {record['layout']!r} (expected one of {FORMATS})")
    return dict(record)


def _as_numpy(field: torch.Tensor | np.ndarray) -> np.ndarray:
    arr = field.detach().cpu().numpy() if isinstance(field, torch.Tensor) else np.asarray(field)
    if arr.ndim != 4 or arr.shape[1] != 2:
        raise ValueError(f"field must have shape (N, 2, H, W), got {arr.shape}")
    return arr.astype(np.float32, copy=False)


# -- OME-Zarr (NGFF 0.6) ------------------------------------------------------------------------------
def to_ngff_displacements(field: torch.Tensor | np.ndarray, resolution_nm: Sequence[float]) -> np.ndarray:
    """Our ``(N, 2, H, W)`` px field -> NGFF displacements ``(Z, Y, X, 3)`` float32 nm, d = (z, y, x).

    ``resolution_nm`` is the field mip's nm per px (x, y, z); the z displacement is 0.
    """
    arr = _as_numpy(field)
    rx, ry = float(resolution_nm[0]), float(resolution_nm[1])
    out = np.zeros((arr.shape[0], arr.shape[2], arr.shape[3], 3), dtype=np.float32)
    out[..., 1] = arr[:, 1] * ry
    out[..., 2] = arr[:, 0] * rx
    return out


def from_ngff_displacements(
    disp: np.ndarray, resolution_nm: Sequence[float], *, where: str = "array"
) -> np.ndarray:
    """NGFF displacements ``(Z, Y, X, 3)`` nm (d = z, y, x) -> our ``(N, 2, H, W)`` float32 px.

    Raises :class:`FieldFormatError` when the array has the wrong shape or a nonzero z displacement
    (sectionflow fields move sections in their plane only).
    """
    disp = np.asarray(disp)
    if disp.ndim != 4 or disp.shape[-1] != 3:
        raise FieldFormatError(f"{where}: expected a (z, y, x, 3) displacement array, got shape {disp.shape}")
    if np.any(disp[..., 0] != 0):
        raise FieldFormatError(
            f"{where}: the z displacement is nonzero (max |dz| = {float(np.abs(disp[..., 0]).max()):g} nm); "
            "sectionflow fields are in-plane"
        )
    rx, ry = float(resolution_nm[0]), float(resolution_nm[1])
    out = np.empty((disp.shape[0], 2, disp.shape[1], disp.shape[2]), dtype=np.float32)
    out[:, 0] = disp[..., 2] / rx
    out[:, 1] = disp[..., 1] / ry
    return out


def _axes(unit: str = "nanometer") -> list[dict[str, Any]]:
    return [{"name": n, "type": "space", "unit": unit} for n in ("z", "y", "x")]


def ngff_root_attributes(record: FieldRecord) -> dict[str, Any]:
    """Root-group attributes: the two coordinate systems and the ``displacements`` transformation."""
    return {
        "ome": {
            "version": NGFF_VERSION,
            "coordinateSystems": [{"name": "aligned", "axes": _axes()}, {"name": "source", "axes": _axes()}],
            "coordinateTransformations": [
                {
                    "type": "displacements",
                    "name": "aligned_to_source",
                    "path": DISPLACEMENTS_PATH,
                    "input": "aligned",
                    "output": "source",
                    "interpolation": "linear",
                }
            ],
        },
        "sectionflow": dict(record),
    }


def ngff_array_attributes(record: FieldRecord) -> dict[str, Any]:
    """Attributes of the displacement array: its coordinate system and array -> ``aligned`` transform."""
    rx, ry, rz = record["resolution_nm"]
    ox, oy, oz = record["offset_px"]
    return {
        "ome": {
            "version": NGFF_VERSION,
            "coordinateSystems": [
                {
                    "name": "aligned_to_source",
                    "axes": [*_axes(), {"name": "d", "type": "displacement", "discrete": True}],
                }
            ],
            "coordinateTransformations": [
                {
                    "type": "sequence",
                    "input": DISPLACEMENTS_PATH,
                    "output": "aligned_to_source",
                    "transformations": [
                        {"type": "scale", "scale": [rz, ry, rx, 1.0]},
                        {"type": "translation", "translation": [oz * rz, oy * ry, ox * rx, 0.0]},
                    ],
                }
            ],
        },
        "sectionflow": dict(record),
    }


def parse_ngff(root_attrs: Mapping[str, Any], array_attrs: Mapping[str, Any], *, where: str) -> FieldRecord:
    """Check an OME-Zarr field's metadata and return its record (resolution and offset from the NGFF part).

    The NGFF metadata is authoritative for geometry (scale, translation, units); the ``sectionflow``
    record, when present, supplies the mip and the source path.
    """
    ome = root_attrs.get("ome") or {}
    transforms = [t for t in ome.get("coordinateTransformations", []) if t.get("type") == "displacements"]
    if not transforms:
        raise FieldFormatError(f"{where}: the root group declares no NGFF 'displacements' transformation")
    if transforms[0].get("path") != DISPLACEMENTS_PATH:
        raise FieldFormatError(
            f"{where}: displacements at {transforms[0].get('path')!r}; "
            f"sectionflow reads {DISPLACEMENTS_PATH!r}"
        )
    aome = array_attrs.get("ome") or {}
    systems = aome.get("coordinateSystems") or []
    if not systems:
        raise FieldFormatError(f"{where}: the displacement array has no coordinateSystems")
    axes = systems[0].get("axes", [])
    names = [a.get("name") for a in axes[:3]]
    if names != ["z", "y", "x"] or len(axes) != 4 or axes[3].get("type") != "displacement":
        raise FieldFormatError(f"{where}: expected displacement array axes (z, y, x, d), got {axes}")
    units = {a.get("unit") for a in axes[:3]}
    if units != {"nanometer"}:
        raise FieldFormatError(f"{where}: expected units nanometer on z, y, x, got {sorted(map(str, units))}")
    scale, translation = [1.0] * 4, [0.0] * 4
    for t in aome.get("coordinateTransformations", []):
        for step in t.get("transformations", [t]):
            if step.get("type") == "scale":
                scale = [float(v) for v in step["scale"]]
            elif step.get("type") == "translation":
                translation = [float(v) for v in step["translation"]]
    rz, ry, rx = scale[:3]
    offset = [round(translation[2] / rx), round(translation[1] / ry), round(translation[0] / rz)]
    own = dict(array_attrs.get("sectionflow") or root_attrs.get("sectionflow") or {})
    shape = own.get("shape_zyx")
    return dict(
        format="sectionflow-displacement-field",
        version=1,
        layout="ome-zarr",
        semantics=CONVENTION_TEXT,
        units="nanometer",
        mip=int(own.get("mip", 0)),
        resolution_nm=[rx, ry, rz],
        offset_px=offset,
        shape_zyx=shape,
        source=own.get("source"),
    )


# -- corgie -------------------------------------------------------------------------------------------
def to_corgie_array(field: torch.Tensor | np.ndarray) -> np.ndarray:
    """Our ``(N, 2, H, W)`` field -> the same array in corgie's channel order (channel 0 = y)."""
    return to_corgie(torch.from_numpy(_as_numpy(field).copy())).numpy()


def from_corgie_array(field: np.ndarray) -> np.ndarray:
    """corgie's channel order ``(N, 2, H, W)`` -> ours (channel 0 = x)."""
    return from_corgie(torch.from_numpy(_as_numpy(field).copy())).numpy()
