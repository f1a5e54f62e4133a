"""Image, mask and field layers: Neuroglancer-precomputed volumes through cloud-volume.

A layer is a chunked volume with a mip pyramid at one path (``file://`` by default; a plain local
path is turned into ``file://``; ``gs://`` / ``s3://`` work through cloud-volume). Mip ``m`` has
``2**m`` times the mip-0 resolution in x and y (z unchanged); its size is ``ceil(size / 2**m)`` and
its voxel offset ``voxel_offset / 2**m`` (so the mip-0 offset must be divisible by
``2**(num_mips - 1)`` in x and y). Every mip's resolution is recorded in the info, and read back
from it: ``Layer.resolution(mip)``.

Kinds (recorded in the info under ``"sectionflow": {"kind": ...}``):

* ``image``: uint8 or float32, usually 1 channel; 0 = no data.
* ``mask``: uint8, 1 channel; nonzero = set (defect / excluded).
* ``field``: float32, 2 channels; channel 0 = x displacement, channel 1 = y, pixels at the layer's
  mip (:mod:`emcore.field`'s convention, stored ``(X, Y, Z, 2)``).

Arrays are numpy ``(Z, C, Y, X)`` (our tensors' ``(N, C, H, W)``); cloud-volume's ``(X, Y, Z, C)``
never leaks out. Boxes are :mod:`emcore.geometry` objects (xyz).

API summary
-----------
* ``create_layer(path, kind=..., resolution=..., size=..., voxel_offset=(0, 0, 0), chunk_size=(256,
  256, 1), num_mips=1, dtype=None, num_channels=None) -> Layer``: creates the info, or opens the
  existing layer if its info is identical; raises :class:`~emcore.errors.IncompatibleLayerError`
  listing the differences otherwise.
* ``open_layer(path) -> Layer``: raises :class:`~emcore.errors.LayerNotFoundError` ("no layer at
  ... (missing info file)").
* ``Layer``: ``.path``, ``.kind``, ``.dtype``, ``.num_channels``, ``.num_mips``, ``.info`` (copy),
  ``.resolution(mip)`` (nm/voxel xyz), ``.size(mip)``, ``.voxel_offset(mip)``,
  ``.chunk_size(mip)``, ``.grid(mip) -> ChunkGrid``, ``.bounds(mip) -> VoxelBox``, ``.bbox -> BBox``
  (nm), ``.voxel_box(bbox, mip, outward=False)``;
  ``.read(region, mip=0, pad=0, pad_z=0) -> (Z, C, Y, X)`` (zero fill outside the bounds);
  ``.read_xarray(...)`` (the same as an ``xarray.DataArray``, see :mod:`emcore.cutout`);
  ``.write(box, data, mip=0)`` (chunk-aligned only, else
  :class:`~emcore.errors.UnalignedWriteError` before anything is written);
  ``.downsample(region, src_mip=0, dst_mip=None) -> list[VoxelBox]`` (rules of
  :mod:`emcore.pyramid`); ``.add_provenance(description, parameters, code_version)``.
* ``require_same_resolution(layers, mip)``: raises ``IncompatibleLayerError`` if they differ.

Failure behaviour
-----------------
* Writes are atomic per chunk file. On ``file://`` cloud-volume encodes the chunks into a private
  staging folder (``<layer>/.sectionflow/staging/<uuid>/``) and each finished file is then moved
  into place with ``os.replace``: a process killed inside a write leaves at most stray files in
  staging, never a truncated chunk. Object stores (``gs://``, ``s3://``) get one ``put`` per chunk
  file, which is atomic there.
* A chunk file that cannot be decoded (truncated, zero bytes, not gzip, wrong size) raises
  :class:`~emcore.errors.CorruptChunkError` naming the file and the layer, never a decoder
  traceback; it is not retried.
* An ``OSError`` from storage is raised as :class:`~emcore.errors.StorageIOError` (an ``OSError``:
  chunk tasks retry it) naming the layer, the box and the mip.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import uuid
import warnings
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
from cloudfiles import CloudFiles
from cloudvolume import CloudVolume

from emcore.cutout import as_dataarray
from emcore.errors import CorruptChunkError, IncompatibleLayerError, LayerNotFoundError, StorageIOError
from emcore.geometry import BBox, ChunkGrid, Vec3, VoxelBox
from emcore.pyramid import LAYER_KINDS, downsample

__all__ = ["Layer", "create_layer", "normalize_path", "open_layer", "require_same_resolution"]

STAGING_DIR = ".sectionflow/staging"
"""Where ``file://`` writes are encoded before their files are moved into place (per layer)."""

_DEFAULTS: dict[str, tuple[str, int]] = {"image": ("uint8", 1), "mask": ("uint8", 1), "field": ("float32", 2)}
_ALLOWED_DTYPES: dict[str, tuple[str, ...]] = {
    "image": ("uint8", "float32"),
    "mask": ("uint8",),
    "field": ("float32",),
}


def normalize_path(path: str | os.PathLike[str]) -> str:
    """A cloud path: ``gs://``, ``s3://``, ``file://`` ... kept; a plain local path -> ``file://abs``."""
    text = os.fspath(path)
    if "://" in text:
        return text.rstrip("/")
    return "file://" + os.path.abspath(text)


@contextmanager
def _quiet() -> Any:
    """Silence cloud-volume's chatter (deprecation / user warnings) around one call."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


def _scale_key(resolution: Sequence[float]) -> str:
    return "_".join(f"{r:g}" for r in resolution)


def _build_info(
    kind: str,
    resolution: Sequence[float],
    size: Sequence[int],
    voxel_offset: Sequence[int],
    chunk_size: Sequence[int],
    num_mips: int,
    dtype: str | np.dtype | None,
    num_channels: int | None,
) -> dict[str, Any]:
    if kind not in LAYER_KINDS:
        raise ValueError(f"layer kind must be one of {LAYER_KINDS}, got {kind!r}")
    default_dtype, default_channels = _DEFAULTS[kind]
    dtype_name = np.dtype(dtype or default_dtype).name
    if dtype_name not in _ALLOWED_DTYPES[kind]:
        raise ValueError(f"a {kind} layer must have dtype in {_ALLOWED_DTYPES[kind]}, got {dtype_name}")
    channels = default_channels if num_channels is None else int(num_channels)
    if kind in ("mask", "field") and channels != default_channels:
        raise ValueError(f"a {kind} layer has {default_channels} channel(s), got num_channels={channels}")
    if channels < 1:
        raise ValueError(f"num_channels must be >= 1, got {channels}")
    res = [float(r) for r in resolution]
    if len(res) != 3 or min(res) <= 0:
        raise ValueError(f"resolution must be 3 positive nm values (x, y, z), got {resolution!r}")
    grid = ChunkGrid(voxel_offset, size, chunk_size)  # validates the three vectors
    if min(grid.size) <= 0:
        raise ValueError(f"size must be positive (x, y, z), got {grid.size}")
    if num_mips < 1:
        raise ValueError(f"num_mips must be >= 1, got {num_mips}")
    top = 2 ** (num_mips - 1)
    if grid.voxel_offset[0] % top or grid.voxel_offset[1] % top:
        raise ValueError(
            f"voxel_offset {grid.voxel_offset} must be divisible by 2**(num_mips-1) = {top} in x and y "
            "so that every mip's voxels line up with mip 0"
        )
    scales = []
    for mip in range(num_mips):
        f = 2**mip
        mip_res = [res[0] * f, res[1] * f, res[2]]
        scales.append(
            {
                "key": _scale_key(mip_res),
                "resolution": mip_res,
                "size": [math.ceil(grid.size[0] / f), math.ceil(grid.size[1] / f), grid.size[2]],
                "voxel_offset": [grid.voxel_offset[0] // f, grid.voxel_offset[1] // f, grid.voxel_offset[2]],
                "chunk_sizes": [list(grid.chunk_size)],
                "encoding": "raw",
            }
        )
    return {
        "type": "image",
        "data_type": dtype_name,
        "num_channels": channels,
        "scales": scales,
        "sectionflow": {"kind": kind},
    }


def _info_differences(existing: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    diffs = []
    for key in ("data_type", "num_channels"):
        if existing.get(key) != wanted[key]:
            diffs.append(f"{key}: existing {existing.get(key)!r}, requested {wanted[key]!r}")
    kind = existing.get("sectionflow", {}).get("kind")
    if kind != wanted["sectionflow"]["kind"]:
        diffs.append(f"kind: existing {kind!r}, requested {wanted['sectionflow']['kind']!r}")
    old_scales, new_scales = existing.get("scales", []), wanted["scales"]
    if len(old_scales) != len(new_scales):
        diffs.append(f"num_mips: existing {len(old_scales)}, requested {len(new_scales)}")
    for mip, (old, new) in enumerate(zip(old_scales, new_scales, strict=False)):
        for key in ("resolution", "size", "voxel_offset", "chunk_sizes", "encoding"):
            a, b = old.get(key), new[key]
            same = (a is not None and np.allclose(a, b, rtol=1e-9, atol=0)) if key == "resolution" else a == b
            if not same:
                diffs.append(f"mip {mip} {key}: existing {a!r}, requested {b!r}")
    return diffs


def _info_exists(path: str) -> bool:
    with _quiet():
        return bool(CloudFiles(path).exists("info"))


def create_layer(
    path: str | os.PathLike[str],
    *,
    kind: str,
    resolution: Sequence[float],
    size: Sequence[int],
    voxel_offset: Sequence[int] = (0, 0, 0),
    chunk_size: Sequence[int] = (256, 256, 1),
    num_mips: int = 1,
    dtype: str | np.dtype | None = None,
    num_channels: int | None = None,
) -> Layer:
    """Create a layer (info file) or open the identical existing one.

    Args:
        path: cloud path or local directory.
        kind: ``"image"``, ``"mask"`` or ``"field"``.
        resolution: mip-0 nm per voxel (x, y, z).
        size: mip-0 size in voxels (x, y, z).
        voxel_offset: mip-0 offset in voxels (x, y, z); divisible by ``2**(num_mips-1)`` in x, y.
        chunk_size: storage chunk in voxels (x, y, z), the same at every mip.
        num_mips: number of mips (mip 0 included).
        dtype: image uint8 (default) or float32; mask uint8; field float32.
        num_channels: image default 1; mask 1; field 2.

    Raises:
        IncompatibleLayerError: a layer exists at ``path`` with a different info.
    """
    cloudpath = normalize_path(path)
    info = _build_info(kind, resolution, size, voxel_offset, chunk_size, num_mips, dtype, num_channels)
    if _info_exists(cloudpath):
        existing = open_layer(cloudpath)
        diffs = _info_differences(existing.info, info)
        if diffs:
            raise IncompatibleLayerError(
                f"a different layer already exists at {cloudpath}: " + "; ".join(diffs)
                + ". Use another path, or delete the existing layer first."
            )
        return existing
    with _quiet():
        cv = CloudVolume(cloudpath, info=copy.deepcopy(info), progress=False)
        cv.commit_info()
    return Layer(cloudpath, info)


def open_layer(path: str | os.PathLike[str]) -> Layer:
    """Open an existing layer. Raises :class:`~emcore.errors.LayerNotFoundError` if there is none."""
    cloudpath = normalize_path(path)
    if not _info_exists(cloudpath):
        raise LayerNotFoundError(f"no layer at {cloudpath} (missing info file)")
    with _quiet():
        info = CloudVolume(cloudpath, progress=False).info
    return Layer(cloudpath, copy.deepcopy(info))


def _other_encodings(path: str) -> list[str]:
    """Existing files of the same chunk as ``path`` under another compression extension."""
    base = path
    for ext in (".gz", ".br", ".zstd", ".xz", ".bz2"):
        if path.endswith(ext):
            base = path[: -len(ext)]
    candidates = [base] + [base + ext for ext in (".gz", ".br", ".zstd", ".xz", ".bz2")]
    return [c for c in candidates if c != path and os.path.exists(c)]


def require_same_resolution(layers: Iterable[Layer], mip: int) -> tuple[float, float, float]:
    """The common resolution of ``layers`` at ``mip``; ``IncompatibleLayerError`` if they differ."""
    layers = list(layers)
    if not layers:
        raise ValueError("require_same_resolution needs at least one layer")
    ref = layers[0].resolution(mip)
    bad = [f"{layer.path}: {layer.resolution(mip)}" for layer in layers[1:]
           if not np.allclose(layer.resolution(mip), ref, rtol=1e-9, atol=0)]
    if bad:
        raise IncompatibleLayerError(
            f"layers differ in resolution at mip {mip}: {layers[0].path}: {ref} nm vs " + ", ".join(bad)
        )
    return ref


class Layer:
    """One precomputed layer. Build with :func:`create_layer` or :func:`open_layer`.

    Picklable (for dask / Prefect workers): only the path and info travel; cloud-volume handles
    are re-created lazily.
    """

    def __init__(self, path: str, info: Mapping[str, Any]) -> None:
        self.path = path
        self._info = copy.deepcopy(dict(info))
        self._volumes: dict[int, CloudVolume] = {}
        scales = self._info.get("scales") or []
        if not scales:
            raise LayerNotFoundError(f"layer at {path} has no scales in its info")
        kind = self._info.get("sectionflow", {}).get("kind")
        if kind is None:  # a layer written by other software: guess from its shape
            kind = "field" if self._info.get("num_channels") == 2 and self.dtype == np.float32 else "image"
        self.kind: str = kind

    # -- pickling: drop the cloud-volume handles ---------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_volumes"] = {}
        return state

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Layer) and (self.path, self._info) == (other.path, other._info)

    def __hash__(self) -> int:
        return hash(self.path)

    def __repr__(self) -> str:
        return (
            f"Layer({self.kind} {self.dtype.name} x{self.num_channels} at {self.path}, "
            f"mip 0 resolution {self.resolution(0)} nm, bounds {self.bounds(0)}, {self.num_mips} mips)"
        )

    # -- info ---------------------------------------------------------------------------------
    @property
    def info(self) -> dict[str, Any]:
        return copy.deepcopy(self._info)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._info["data_type"])

    @property
    def num_channels(self) -> int:
        return int(self._info["num_channels"])

    @property
    def num_mips(self) -> int:
        return len(self._info["scales"])

    def _scale(self, mip: int) -> Mapping[str, Any]:
        if not isinstance(mip, int | np.integer) or not 0 <= mip < self.num_mips:
            raise ValueError(f"layer {self.path} has mips 0..{self.num_mips - 1}, asked for mip {mip!r}")
        return self._info["scales"][int(mip)]

    def resolution(self, mip: int) -> tuple[float, float, float]:
        """nm per voxel (x, y, z) at ``mip``, as recorded in the info."""
        r = self._scale(mip)["resolution"]
        return (float(r[0]), float(r[1]), float(r[2]))

    def size(self, mip: int) -> Vec3:
        s = self._scale(mip)["size"]
        return (int(s[0]), int(s[1]), int(s[2]))

    def voxel_offset(self, mip: int) -> Vec3:
        o = self._scale(mip)["voxel_offset"]
        return (int(o[0]), int(o[1]), int(o[2]))

    def chunk_size(self, mip: int) -> Vec3:
        c = self._scale(mip)["chunk_sizes"][0]
        return (int(c[0]), int(c[1]), int(c[2]))

    def grid(self, mip: int) -> ChunkGrid:
        return ChunkGrid(self.voxel_offset(mip), self.size(mip), self.chunk_size(mip))

    def bounds(self, mip: int) -> VoxelBox:
        return self.grid(mip).bounds

    @property
    def bbox(self) -> BBox:
        """The layer's extent in nm (from mip 0)."""
        return self.bounds(0).to_nm(self.resolution(0))

    def voxel_box(self, region: BBox | VoxelBox, mip: int, *, outward: bool = False) -> VoxelBox:
        """``region`` as voxels at ``mip`` (a ``VoxelBox`` is taken to be at ``mip`` already)."""
        if isinstance(region, VoxelBox):
            return region
        if isinstance(region, BBox):
            return region.to_voxels(self.resolution(mip), outward=outward)
        raise TypeError(f"region must be a BBox (nm) or VoxelBox (voxels at mip {mip}), got {region!r}")

    def _volume(self, mip: int) -> CloudVolume:
        self._scale(mip)
        if mip not in self._volumes:
            with _quiet():
                self._volumes[mip] = CloudVolume(
                    self.path,
                    mip=mip,
                    info=copy.deepcopy(self._info),
                    fill_missing=True,
                    bounded=False,
                    non_aligned_writes=False,
                    progress=False,
                    parallel=1,
                )
        return self._volumes[mip]

    # -- reading ------------------------------------------------------------------------------
    def read(self, region: BBox | VoxelBox, mip: int = 0, *, pad: int = 0, pad_z: int = 0) -> np.ndarray:
        """Read ``region`` grown by ``pad`` voxels (x, y) and ``pad_z`` sections, at ``mip``.

        Returns:
            ``(Z, C, Y, X)`` array of the layer's dtype; voxels outside the layer bounds (or never
            written) are 0.
        """
        box = self.voxel_box(region, mip).padded(pad, pad_z)
        out = np.zeros((box.shape_zyx[0], self.num_channels, *box.shape_zyx[1:]), dtype=self.dtype)
        inside = box.intersection(self.bounds(mip))
        if inside.is_empty:
            return out
        cutout = self._cutout(inside, mip)
        z, y, x = inside.slices_zyx(box.start)
        out[z, :, y, x] = cutout.transpose(2, 3, 1, 0)
        return out

    def _cutout(self, inside: VoxelBox, mip: int) -> np.ndarray:
        """cloud-volume's ``(X, Y, Z, C)`` cutout of ``inside`` (within the bounds), errors made clear."""
        (x0, y0, z0), (x1, y1, z1) = inside.start, inside.stop
        try:
            with _quiet():
                return np.asarray(self._volume(mip)[x0:x1, y0:y1, z0:z1])
        except OSError as exc:
            raise StorageIOError(f"reading {inside} at mip {mip} of layer {self.path} failed: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - decoder errors of any library: find the chunk
            self._raise_corrupt_chunk(inside, mip, exc)
            raise

    def chunk_file(self, chunk: VoxelBox, mip: int) -> str:
        """The cloud path of the storage chunk file holding ``chunk`` (one grid chunk, at ``mip``)."""
        (x0, y0, z0), (x1, y1, z1) = chunk.start, chunk.stop
        return f"{self.path}/{self._scale(mip)['key']}/{x0}-{x1}_{y0}-{y1}_{z0}-{z1}"

    def _raise_corrupt_chunk(self, inside: VoxelBox, mip: int, first: BaseException) -> None:
        """Read ``inside`` chunk by chunk; raise :class:`CorruptChunkError` for the first bad one."""
        grid = self.grid(mip)
        for chunk in grid.chunks(grid.align(inside), self.chunk_size(mip)):
            (x0, y0, z0), (x1, y1, z1) = chunk.start, chunk.stop
            try:
                with _quiet():
                    self._volume(mip)[x0:x1, y0:y1, z0:z1]
            except OSError:
                continue
            except Exception as exc:  # noqa: BLE001 - this chunk does not decode
                reason = " ".join(str(exc).replace("Filename: N/A", "").split()) or type(exc).__name__
                raise CorruptChunkError(self._stored_name(chunk, mip), self.path, reason) from first

    def _stored_name(self, chunk: VoxelBox, mip: int) -> str:
        """:meth:`chunk_file` with the compression extension it is stored under (local layers)."""
        name = self.chunk_file(chunk, mip)
        if name.startswith("file://"):
            local = name[len("file://") :]
            for ext in ("", ".gz", ".br", ".zstd", ".xz", ".bz2"):
                if os.path.exists(local + ext):
                    return name + ext
        return name

    def read_xarray(self, region: BBox | VoxelBox, mip: int = 0, *, pad: int = 0, pad_z: int = 0) -> Any:
        """:meth:`read` as an ``xarray.DataArray`` with nm coordinates (see :mod:`emcore.cutout`)."""
        box = self.voxel_box(region, mip).padded(pad, pad_z)
        data = self.read(box, mip)
        return as_dataarray(data, box, self.resolution(mip), mip=mip, layer_path=self.path)

    # -- writing ------------------------------------------------------------------------------
    def _checked_data(self, box: VoxelBox, data: np.ndarray) -> np.ndarray:
        data = np.asarray(data)
        if data.ndim == 3 and self.num_channels == 1:
            data = data[:, None]
        expected = (box.shape_zyx[0], self.num_channels, *box.shape_zyx[1:])
        if data.shape != expected:
            raise ValueError(
                f"data of shape {data.shape} does not fit {box} of layer {self.path}: expected (Z, C, Y, X) "
                f"= {expected}"
            )
        if data.dtype == self.dtype:
            out = data
        elif np.issubdtype(self.dtype, np.floating) and (
            np.issubdtype(data.dtype, np.floating) or np.can_cast(data.dtype, self.dtype, "safe")
        ):
            out = data.astype(self.dtype)
        elif np.issubdtype(self.dtype, np.integer) and (
            data.dtype == np.bool_ or np.issubdtype(data.dtype, np.integer)
        ):
            info = np.iinfo(self.dtype)
            if data.size and (data.min() < info.min or data.max() > info.max):
                raise ValueError(
                    f"data values {data.min()}..{data.max()} do not fit layer {self.path} dtype {self.dtype}"
                )
            out = data.astype(self.dtype)
        else:
            raise ValueError(
                f"cannot write {data.dtype} data to layer {self.path} of dtype {self.dtype} without losing "
                "information; convert it explicitly"
            )
        if np.issubdtype(out.dtype, np.floating) and not np.isfinite(out).all():
            raise ValueError(f"refusing to write NaN/inf values to layer {self.path} ({box})")
        return out

    def write(self, box: VoxelBox, data: np.ndarray, mip: int = 0) -> None:
        """Write ``data`` ``(Z, C, Y, X)`` (or ``(Z, Y, X)`` for 1 channel) to ``box`` at ``mip``.

        ``box`` must start on the storage chunk grid and end on it or at the layer bound; otherwise
        :class:`~emcore.errors.UnalignedWriteError` is raised and nothing is written.
        """
        if not isinstance(box, VoxelBox):
            raise TypeError(f"write takes a VoxelBox at mip {mip}, got {box!r}")
        grid = self.grid(mip)
        grid.check_aligned(box, what=f"write to {self.path} at mip {mip}")
        out = self._checked_data(box, data)
        if box.is_empty:
            return
        (x0, y0, z0), (x1, y1, z1) = box.start, box.stop
        array = np.ascontiguousarray(out.transpose(3, 2, 0, 1))
        try:
            if self.path.startswith("file://"):
                self._write_staged(box, array, mip)
            else:  # object stores: one put per chunk file, atomic there
                with _quiet():
                    self._volume(mip)[x0:x1, y0:y1, z0:z1] = array
        except OSError as exc:
            raise StorageIOError(f"writing {box} at mip {mip} of layer {self.path} failed: {exc}") from exc

    def _write_staged(self, box: VoxelBox, array: np.ndarray, mip: int) -> None:
        """Encode ``array`` (cloud-volume ``(X, Y, Z, C)``) into a private staging folder, then move
        each finished chunk file into the layer with ``os.replace`` (atomic on one filesystem)."""
        root = self.path[len("file://") :]
        staging = os.path.join(root, STAGING_DIR, uuid.uuid4().hex)
        (x0, y0, z0), (x1, y1, z1) = box.start, box.stop
        try:
            with _quiet():
                volume = CloudVolume(
                    "file://" + staging, mip=mip, info=copy.deepcopy(self._info), fill_missing=True,
                    bounded=False, non_aligned_writes=False, progress=False, parallel=1,
                )  # fmt: skip
                volume[x0:x1, y0:y1, z0:z1] = array
            for folder, _, files in os.walk(staging):
                target_dir = os.path.join(root, os.path.relpath(folder, staging))
                for name in files:
                    os.makedirs(target_dir, exist_ok=True)
                    for stale in _other_encodings(os.path.join(target_dir, name)):
                        os.remove(stale)  # a chunk stored before under another compression
                    os.replace(os.path.join(folder, name), os.path.join(target_dir, name))
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def downsample(
        self, region: BBox | VoxelBox, src_mip: int = 0, dst_mip: int | None = None
    ) -> list[VoxelBox]:
        """Fill mips ``src_mip + 1 .. dst_mip`` (default: the top mip) of ``region`` from ``src_mip``.

        Uses the rule of the layer's kind (:func:`emcore.pyramid.downsample`). ``region`` (at
        ``src_mip``) and its footprint at every target mip must be valid write regions (chunk
        aligned); this is checked before anything is read or written.

        Returns:
            The boxes written, one per target mip.
        """
        dst = self.num_mips - 1 if dst_mip is None else dst_mip
        self._scale(src_mip)
        self._scale(dst)
        if dst <= src_mip:
            raise ValueError(
                f"dst_mip {dst} must be above src_mip {src_mip} (layer has {self.num_mips} mips)"
            )
        box = self.voxel_box(region, src_mip)
        self.grid(src_mip).check_aligned(box, what=f"downsample source at mip {src_mip} of {self.path}")
        targets = []
        current = box
        for mip in range(src_mip + 1, dst + 1):
            if current.start[0] % 2 or current.start[1] % 2:
                raise ValueError(f"cannot downsample {current} at mip {mip - 1}: x/y start must be even")
            current = VoxelBox(
                (current.start[0] // 2, current.start[1] // 2, current.start[2]),
                (-(-current.stop[0] // 2), -(-current.stop[1] // 2), current.stop[2]),
            )
            self.grid(mip).check_aligned(current, what=f"downsample target at mip {mip} of {self.path}")
            targets.append(current)
        data = self.read(box, src_mip)
        for mip, target in enumerate(targets, start=src_mip + 1):
            data = downsample(data, self.kind)
            self.write(target, data, mip)
        return targets

    # -- provenance ---------------------------------------------------------------------------
    def add_provenance(
        self, description: str, parameters: Mapping[str, Any], code_version: str
    ) -> None:
        """Append a processing record (and set the description) in the layer's ``provenance`` file."""
        with _quiet():
            cv = CloudVolume(self.path, info=copy.deepcopy(self._info), progress=False)
            prov = cv.provenance
            prov.description = description
            prov.processing.append(
                {"method": {"description": description, "parameters": dict(parameters)},
                 "code_version": code_version}
            )
            cv.commit_provenance()
