"""Export a final field to ``.npy`` / OME-Zarr (NGFF 0.6) / corgie's layout, and import it back.

The layouts and their convention are defined in :mod:`emcore.field_io` (pure conversions); this
module does the reading and writing. Regions are voxels at the field's mip.

API summary
-----------
* ``resolve_field_layer(path) -> Layer``: an alignment output (``<path>/fields/final``) or a field layer.
* ``field_mip(layer) -> int | None``: the mip its values live at (``finetune_mip`` of its provenance).
* ``export_field(layer, dest, fmt, *, mip, region=None) -> record``: write ``region`` (default the
  whole layer at ``mip``) in format ``fmt`` (``npy``, ``ome-zarr``, ``corgie``).
* ``guess_format(path) -> fmt``: from the file name / what is there.
* ``import_field(src, *, mip=None) -> (field (N, 2, H, W) px, record)``; ``write_field_layer(dest,
  field, record) -> Layer`` stores it as a sectionflow field layer with the record's geometry.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from cloudfiles import CloudFiles

from emcore.errors import LayerNotFoundError
from emcore.field_io import (
    DISPLACEMENTS_PATH,
    FORMATS,
    FieldFormatError,
    FieldRecord,
    convention_record,
    from_corgie_array,
    from_ngff_displacements,
    ngff_array_attributes,
    ngff_root_attributes,
    parse_convention_record,
    parse_ngff,
    to_corgie_array,
    to_ngff_displacements,
)
from emcore.geometry import VoxelBox
from emcore.layers import Layer, create_layer, normalize_path, open_layer

__all__ = [
    "export_field",
    "field_mip",
    "guess_format",
    "import_field",
    "resolve_field_layer",
    "write_field_layer",
]


def resolve_field_layer(path: str) -> Layer:
    """The field layer at ``path``: an alignment output directory (its ``fields/final``) or a layer."""
    base = normalize_path(path)
    for candidate in (base + "/fields/final", base):
        try:
            layer = open_layer(candidate)
        except LayerNotFoundError:
            continue
        if layer.num_channels == 2 and layer.dtype == np.float32:
            return layer
    raise LayerNotFoundError(
        f"no field at {path}: expected an alignment output (with fields/final) or a 2-channel float32 layer"
    )


def field_mip(layer: Layer) -> int | None:
    """The mip the layer's values are stored at: ``finetune_mip`` from its last provenance record."""
    try:
        raw = CloudFiles(layer.path).get("provenance")
    except Exception:  # noqa: BLE001 - no provenance is a normal case
        raw = None
    if not raw:
        return None
    try:
        records = json.loads(raw).get("processing", [])
    except ValueError:
        return None
    for rec in reversed(records):
        params = (rec.get("method") or {}).get("parameters") or {}
        if "finetune_mip" in params:
            return int(params["finetune_mip"])
    return None


def guess_format(path: str) -> str:
    """``npy`` for ``*.npy``, ``ome-zarr`` for ``*.zarr`` or a folder with ``zarr.json``, else ``corgie``."""
    text = path.rstrip("/")
    local = text[len("file://") :] if text.startswith("file://") else text
    if text.endswith(".npy"):
        return "npy"
    if text.endswith(".zarr") or ("://" not in local and os.path.exists(os.path.join(local, "zarr.json"))):
        return "ome-zarr"
    return "corgie"


def _local(path: str, what: str) -> str:
    if path.startswith("file://"):
        return path[len("file://") :]
    if "://" in path:
        raise FieldFormatError(f"{what} {path}: .npy and OME-Zarr fields are written to local paths only")
    return path


def export_field(
    layer: Layer, dest: str, fmt: str, *, mip: int, region: VoxelBox | None = None
) -> FieldRecord:
    """Write ``region`` (voxels at ``mip``; default the layer's bounds) of ``layer`` to ``dest``.

    Returns the convention record written with it (see :func:`emcore.field_io.convention_record`).
    """
    if fmt not in FORMATS:
        raise FieldFormatError(f"unknown field format {fmt!r}: use one of {', '.join(FORMATS)}")
    bounds = layer.bounds(mip)
    box = bounds if region is None else region.intersection(bounds)
    if box.is_empty:
        raise FieldFormatError(
            f"the requested region {region} lies outside {layer.path} (bounds {bounds} at mip {mip})"
        )
    field = layer.read(box, mip).astype(np.float32)  # (Z, 2, Y, X), channel 0 = x, px at mip
    record = convention_record(
        fmt, mip=mip, resolution_nm=layer.resolution(mip), offset_px=box.start, shape_zyx=box.shape_zyx,
        source=layer.path,
    )
    if fmt == "npy":
        path = _local(dest, "npy destination")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        np.save(path, field)
        with open(path + ".json", "w") as fh:
            json.dump(record, fh, indent=1)
    elif fmt == "ome-zarr":
        _write_zarr(_local(dest, "OME-Zarr destination"), field, record)
    else:
        _write_corgie(dest, field, record, layer.chunk_size(mip))
    return record


def _write_zarr(path: str, field: np.ndarray, record: FieldRecord) -> None:
    import zarr

    disp = to_ngff_displacements(field, record["resolution_nm"])
    root = zarr.open_group(path, mode="w", zarr_format=3)
    root.attrs.update(ngff_root_attributes(record))
    chunks = (1, min(disp.shape[1], 512), min(disp.shape[2], 512), 3)
    arr = root.create_array(
        DISPLACEMENTS_PATH, shape=disp.shape, chunks=chunks, dtype="float32",
        dimension_names=["z", "y", "x", "d"],
    )
    arr[...] = disp
    arr.attrs.update(ngff_array_attributes(record))


def _region_layer(dest: str, record: FieldRecord, chunk: tuple[int, int, int]) -> Layer:
    """A field layer covering exactly the record's region at its mip (mips 0..mip, data at mip)."""
    mip, f = int(record["mip"]), 2 ** int(record["mip"])
    rx, ry, rz = record["resolution_nm"]
    (ox, oy, oz), (sz, sy, sx) = record["offset_px"], record["shape_zyx"]
    return create_layer(
        dest, kind="field", resolution=(rx / f, ry / f, rz), size=(sx * f, sy * f, sz),
        voxel_offset=(ox * f, oy * f, oz), chunk_size=chunk, num_mips=mip + 1,
    )


def _write_corgie(dest: str, field: np.ndarray, record: FieldRecord, chunk: tuple[int, int, int]) -> None:
    layer = _region_layer(dest, record, chunk)
    info = layer.info
    info.pop("sectionflow", None)  # not sectionflow's channel order: no "kind": "field" here
    info["displacement_field"] = dict(record)
    CloudFiles(layer.path).put_json("info", info)
    layer = Layer(layer.path, info)
    mip = int(record["mip"])
    layer.write(layer.bounds(mip), to_corgie_array(field), mip)


def write_field_layer(dest: str, field: np.ndarray, record: FieldRecord, chunk: int = 128) -> Layer:
    """Store ``field`` (our convention, px at the record's mip) as a sectionflow field layer at ``dest``."""
    sz, sy, sx = record["shape_zyx"]
    if field.shape != (sz, 2, sy, sx):
        raise FieldFormatError(
            f"field of shape {field.shape} does not match its record's region {record['shape_zyx']}"
        )
    layer = _region_layer(dest, record, (chunk, chunk, 1))
    layer.write(layer.bounds(int(record["mip"])), field, int(record["mip"]))
    return layer


def import_field(src: str, *, mip: int | None = None) -> tuple[np.ndarray, FieldRecord]:
    """Read a field written by :func:`export_field` (or a corgie field layer) back in our convention.

    Args:
        src: a ``.npy`` file (with its ``.npy.json`` record), an OME-Zarr folder or a precomputed
            layer in corgie's layout.
        mip: only for a corgie layer without a sectionflow record: the mip its field lives at.

    Returns:
        ``(field, record)``: ``(N, 2, H, W)`` float32 px at ``record["mip"]``, channel 0 = x.
    """
    fmt = guess_format(src)
    if fmt == "npy":
        path = _local(src, "npy field")
        if not os.path.exists(path):
            raise FieldFormatError(f"no such file: {path}")
        if not os.path.exists(path + ".json"):
            raise FieldFormatError(
                f"{path}: missing its record {path}.json (mip, nm per px, region); export with "
                "`sectionflow export-field` or write that JSON next to the array"
            )
        with open(path + ".json") as fh:
            record = parse_convention_record(json.load(fh), where=path + ".json")
        field = np.load(path, allow_pickle=False)
        if field.ndim != 4 or field.shape[1] != 2:
            raise FieldFormatError(f"{path}: expected an (N, 2, H, W) array, got shape {field.shape}")
        return field.astype(np.float32, copy=False), record
    if fmt == "ome-zarr":
        return _read_zarr(_local(src, "OME-Zarr field"))
    return _read_corgie(src, mip)


def _read_zarr(path: str) -> tuple[np.ndarray, FieldRecord]:
    import zarr

    if not os.path.exists(os.path.join(path, "zarr.json")):
        raise FieldFormatError(f"{path}: not a Zarr v3 group (no zarr.json)")
    root = zarr.open_group(path, mode="r")
    try:
        arr = root[DISPLACEMENTS_PATH]
    except KeyError as exc:
        raise FieldFormatError(f"{path}: no array at {DISPLACEMENTS_PATH}") from exc
    record = parse_ngff(dict(root.attrs), dict(arr.attrs), where=path)
    field = from_ngff_displacements(np.asarray(arr[...]), record["resolution_nm"], where=path)
    record["shape_zyx"] = [field.shape[0], field.shape[2], field.shape[3]]
    return field, record


def _read_corgie(src: str, mip: int | None) -> tuple[np.ndarray, FieldRecord]:
    layer = open_layer(src)
    stored: dict[str, Any] | None = layer.info.get("displacement_field")
    if stored is not None:
        record = parse_convention_record(stored, where=f"{layer.path}/info")
        if record["layout"] != "corgie":
            raise FieldFormatError(f"{layer.path}: its record says layout {record['layout']!r}, not corgie")
        at = int(record["mip"])
        box = VoxelBox.from_shape(record["offset_px"], record["shape_zyx"][::-1])
    else:
        if mip is None:
            raise FieldFormatError(
                f"{layer.path}: a field layer without a sectionflow record; "
                "pass --mip (the mip its field lives at)"
            )
        if layer.info.get("sectionflow", {}).get("kind") == "field":
            raise FieldFormatError(
                f"{layer.path} is a sectionflow field layer (channel 0 = x), not corgie's layout; "
                "use it as it is"
            )
        at, box = mip, layer.bounds(mip)
        record = convention_record(
            "corgie", mip=at, resolution_nm=layer.resolution(at), offset_px=box.start,
            shape_zyx=box.shape_zyx, source=layer.path,
        )
    field = from_corgie_array(layer.read(box, at))
    return field, record
