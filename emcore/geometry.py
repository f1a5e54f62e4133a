"""Bounding boxes in nm and in voxels, and the storage chunk grid of a layer at one mip.

Conventions
-----------
* Everything is in **xyz order** (x = columns, y = rows, z = sections), like Neuroglancer and
  cloud-volume. Tensors are ``(Z, C, Y, X)``; only the boxes are xyz.
* Boxes are half-open: ``start <= p < stop``.
* A :class:`BBox` is in **nm** and independent of resolution. A :class:`VoxelBox` is in voxels at
  one mip; convert between them with the layer's resolution at that mip (``Layer.resolution(mip)``,
  nm per voxel, xyz). Voxel ``i`` covers ``[i * res, (i + 1) * res)`` nm; its centre is
  ``(i + 0.5) * res``.
* Mip ``m`` is ``2**m`` downsampled in x and y, z unchanged, but resolutions always come from the
  layer info (never assumed).
* A :class:`ChunkGrid` is a layer's storage grid at one mip: bounds ``voxel_offset .. voxel_offset +
  size`` and chunks of ``chunk_size`` starting at ``voxel_offset``. Writes must start on the grid
  and end on it or at the bound.

All classes are frozen dataclasses (hashable: usable in cache keys and task names) with a readable
``str``.

API summary
-----------
* ``BBox(start_nm, stop_nm)``; ``BBox.from_voxels(box, resolution)``; ``bbox.to_voxels(resolution,
  outward=False)``; ``bbox.padded(nm)``; ``bbox.intersection(other)``; ``bbox.size_nm``.
* ``VoxelBox(start, stop)``; ``.shape`` (xyz), ``.shape_zyx``; ``.padded(xy, z=0)``;
  ``.cropped(xy, z=0)``; ``.intersection(other)``; ``.translated(offset)``; ``.to_nm(resolution)``;
  ``.slices_zyx(origin)`` (index an array read at ``origin``); ``.is_empty``.
* ``ChunkGrid(voxel_offset, size, chunk_size)``; ``.bounds``; ``.align(box)`` (expand outward to
  the grid, clipped to the bounds); ``.is_aligned(box)``; ``.check_aligned(box, what)`` (raises
  :class:`~emcore.errors.UnalignedWriteError`); ``.chunks(box, processing_chunk)`` (the processing
  chunks covering ``box``, each aligned; the chunk size must be a multiple of ``chunk_size``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from emcore.errors import GeometryError, UnalignedWriteError

__all__ = ["BBox", "ChunkGrid", "Vec3", "VoxelBox"]

Vec3 = tuple[int, int, int]
"""Three ints in xyz order."""

_AXES = "xyz"


def _int3(values: Sequence[int] | int, name: str) -> Vec3:
    if isinstance(values, int):
        return (values, values, values)
    out = tuple(values)
    if len(out) != 3:
        raise GeometryError(f"{name} must have 3 values (x, y, z), got {values!r}")
    for v in out:
        if isinstance(v, bool) or not float(v).is_integer():
            raise GeometryError(f"{name} must be integers (x, y, z), got {values!r}")
    return (int(out[0]), int(out[1]), int(out[2]))


def _float3(values: Sequence[float], name: str) -> tuple[float, float, float]:
    out = tuple(float(v) for v in values)
    if len(out) != 3:
        raise GeometryError(f"{name} must have 3 values (x, y, z), got {values!r}")
    if not all(math.isfinite(v) for v in out):
        raise GeometryError(f"{name} must be finite, got {values!r}")
    return (out[0], out[1], out[2])


def _resolution3(resolution: Sequence[float]) -> tuple[float, float, float]:
    res = _float3(resolution, "resolution")
    if min(res) <= 0:
        raise GeometryError(f"resolution must be positive nm per voxel (x, y, z), got {resolution!r}")
    return res


def _fmt(v: float) -> str:
    return f"{v:g}"


@dataclass(frozen=True)
class VoxelBox:
    """A half-open box of voxels at one mip, xyz order: ``start <= p < stop``."""

    start: Vec3
    stop: Vec3

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", _int3(self.start, "start"))
        object.__setattr__(self, "stop", _int3(self.stop, "stop"))
        if any(b < a for a, b in zip(self.start, self.stop, strict=True)):
            raise GeometryError(f"box stop {self.stop} is before its start {self.start} (xyz voxels)")

    @classmethod
    def from_shape(cls, start: Sequence[int], shape: Sequence[int]) -> VoxelBox:
        """The box at ``start`` with ``shape`` voxels (both xyz)."""
        s, n = _int3(start, "start"), _int3(shape, "shape")
        return cls(s, (s[0] + n[0], s[1] + n[1], s[2] + n[2]))

    def __str__(self) -> str:
        parts = ", ".join(f"{a} {s}:{e}" for a, s, e in zip(_AXES, self.start, self.stop, strict=True))
        return f"VoxelBox[{parts}]"

    @property
    def shape(self) -> Vec3:
        """Size in voxels, xyz."""
        return (self.stop[0] - self.start[0], self.stop[1] - self.start[1], self.stop[2] - self.start[2])

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        """Size in voxels as ``(Z, Y, X)``, the order of our arrays."""
        x, y, z = self.shape
        return (z, y, x)

    @property
    def is_empty(self) -> bool:
        return min(self.shape) == 0

    def padded(self, xy: int, z: int = 0) -> VoxelBox:
        """Grow by ``xy`` voxels on each side in x and y and ``z`` in z (negative shrinks)."""
        return VoxelBox(
            (self.start[0] - xy, self.start[1] - xy, self.start[2] - z),
            (self.stop[0] + xy, self.stop[1] + xy, self.stop[2] + z),
        )

    def cropped(self, xy: int, z: int = 0) -> VoxelBox:
        """Shrink by ``xy`` voxels on each side in x and y and ``z`` in z (undoes :meth:`padded`)."""
        return self.padded(-xy, -z)

    def translated(self, offset: Sequence[int]) -> VoxelBox:
        o = _int3(offset, "offset")
        return VoxelBox(
            (self.start[0] + o[0], self.start[1] + o[1], self.start[2] + o[2]),
            (self.stop[0] + o[0], self.stop[1] + o[1], self.stop[2] + o[2]),
        )

    def intersection(self, other: VoxelBox) -> VoxelBox:
        """The overlap of two boxes (an empty box at ``self.start`` side if they do not meet)."""
        start = tuple(max(a, b) for a, b in zip(self.start, other.start, strict=True))
        stop = tuple(max(s, min(a, b)) for s, a, b in zip(start, self.stop, other.stop, strict=True))
        return VoxelBox(start, stop)  # type: ignore[arg-type]

    def contains(self, other: VoxelBox) -> bool:
        return all(a <= b for a, b in zip(self.start, other.start, strict=True)) and all(
            a >= b for a, b in zip(self.stop, other.stop, strict=True)
        )

    def to_nm(self, resolution: Sequence[float]) -> BBox:
        """This box in nm, given the resolution (nm per voxel, xyz) of its mip."""
        res = _resolution3(resolution)
        return BBox(
            tuple(s * r for s, r in zip(self.start, res, strict=True)),  # type: ignore[arg-type]
            tuple(s * r for s, r in zip(self.stop, res, strict=True)),  # type: ignore[arg-type]
        )

    def slices_zyx(self, origin: Sequence[int] | None = None) -> tuple[slice, slice, slice]:
        """``(z, y, x)`` slices selecting this box from an array whose voxel 0 is at ``origin``.

        E.g. to take the inner chunk out of a cutout ``(Z, C, Y, X)`` read at ``padded_box``:
        ``z, y, x = inner.slices_zyx(padded_box.start)`` then ``cutout[z, :, y, x]``.
        """
        o = (0, 0, 0) if origin is None else _int3(origin, "origin")
        x, y, z = (slice(s - oo, e - oo) for s, e, oo in zip(self.start, self.stop, o, strict=True))
        return (z, y, x)


@dataclass(frozen=True)
class BBox:
    """A half-open box in nm, xyz order, independent of resolution (coordinates kept to 1e-6 nm)."""

    start_nm: tuple[float, float, float]
    stop_nm: tuple[float, float, float]

    def __post_init__(self) -> None:
        # Canonical to 1e-6 nm, so the same box computed two ways (64 * 4.6 vs 294.4) is equal and
        # hashes the same.
        start = tuple(round(v, 6) + 0.0 for v in _float3(self.start_nm, "start_nm"))
        stop = tuple(round(v, 6) + 0.0 for v in _float3(self.stop_nm, "stop_nm"))
        object.__setattr__(self, "start_nm", start)
        object.__setattr__(self, "stop_nm", stop)
        if any(b < a for a, b in zip(self.start_nm, self.stop_nm, strict=True)):
            raise GeometryError(f"bbox stop {self.stop_nm} nm is before its start {self.start_nm} nm")

    @classmethod
    def from_voxels(cls, box: VoxelBox, resolution: Sequence[float]) -> BBox:
        return box.to_nm(resolution)

    def __str__(self) -> str:
        parts = ", ".join(
            f"{a} {_fmt(s)}-{_fmt(e)}" for a, s, e in zip(_AXES, self.start_nm, self.stop_nm, strict=True)
        )
        return f"BBox[{parts} nm]"

    @property
    def size_nm(self) -> tuple[float, float, float]:
        return (
            self.stop_nm[0] - self.start_nm[0],
            self.stop_nm[1] - self.start_nm[1],
            self.stop_nm[2] - self.start_nm[2],
        )

    def padded(self, xy_nm: float, z_nm: float = 0.0) -> BBox:
        """Grow by ``xy_nm`` on each side in x and y and ``z_nm`` in z."""
        return BBox(
            (self.start_nm[0] - xy_nm, self.start_nm[1] - xy_nm, self.start_nm[2] - z_nm),
            (self.stop_nm[0] + xy_nm, self.stop_nm[1] + xy_nm, self.stop_nm[2] + z_nm),
        )

    def intersection(self, other: BBox) -> BBox:
        start = tuple(max(a, b) for a, b in zip(self.start_nm, other.start_nm, strict=True))
        stop = tuple(max(s, min(a, b)) for s, a, b in zip(start, self.stop_nm, other.stop_nm, strict=True))
        return BBox(start, stop)  # type: ignore[arg-type]

    def to_voxels(self, resolution: Sequence[float], *, outward: bool = False) -> VoxelBox:
        """The voxel box at a mip with ``resolution`` (nm per voxel, xyz).

        With ``outward=False`` the bbox must lie on that mip's voxel grid (within 1e-6 voxel),
        otherwise :class:`~emcore.errors.GeometryError` is raised. With ``outward=True`` the start
        is rounded down and the stop up (the smallest voxel box covering the bbox).
        """
        res = _resolution3(resolution)
        start_f = [s / r for s, r in zip(self.start_nm, res, strict=True)]
        stop_f = [s / r for s, r in zip(self.stop_nm, res, strict=True)]
        if outward:
            start = [math.floor(v + 1e-6) for v in start_f]
            stop = [math.ceil(v - 1e-6) for v in stop_f]
            return VoxelBox(tuple(start), tuple(max(a, b) for a, b in zip(start, stop, strict=True)))  # type: ignore[arg-type]
        rounded_start = [round(v) for v in start_f]
        rounded_stop = [round(v) for v in stop_f]
        off = [abs(a - b) for a, b in zip(start_f + stop_f, rounded_start + rounded_stop, strict=True)]
        if max(off) > 1e-6:
            raise GeometryError(
                f"{self} is not on the voxel grid of resolution {res} nm "
                f"(start {tuple(start_f)}, stop {tuple(stop_f)} voxels); pass outward=True to cover it"
            )
        return VoxelBox(tuple(rounded_start), tuple(rounded_stop))  # type: ignore[arg-type]


@dataclass(frozen=True)
class ChunkGrid:
    """A layer's storage chunk grid at one mip (all xyz voxels at that mip)."""

    voxel_offset: Vec3
    size: Vec3
    chunk_size: Vec3

    def __post_init__(self) -> None:
        object.__setattr__(self, "voxel_offset", _int3(self.voxel_offset, "voxel_offset"))
        object.__setattr__(self, "size", _int3(self.size, "size"))
        object.__setattr__(self, "chunk_size", _int3(self.chunk_size, "chunk_size"))
        if min(self.chunk_size) <= 0:
            raise GeometryError(f"chunk_size must be positive (x, y, z), got {self.chunk_size}")
        if min(self.size) < 0:
            raise GeometryError(f"size must not be negative (x, y, z), got {self.size}")

    def __str__(self) -> str:
        return f"ChunkGrid[bounds {self.bounds}, chunk {self.chunk_size}]"

    @property
    def bounds(self) -> VoxelBox:
        return VoxelBox.from_shape(self.voxel_offset, self.size)

    def align(self, box: VoxelBox) -> VoxelBox:
        """Expand ``box`` outward to the chunk grid, then clip it to the bounds."""
        start, stop = [], []
        for a, b, o, c in zip(box.start, box.stop, self.voxel_offset, self.chunk_size, strict=True):
            start.append(o + (a - o) // c * c)
            stop.append(o - ((o - b) // c) * c)
        return VoxelBox(tuple(start), tuple(stop)).intersection(self.bounds)  # type: ignore[arg-type]

    def misalignment(self, box: VoxelBox) -> list[str]:
        """Human-readable reasons why ``box`` is not a valid write region ([] if it is)."""
        reasons = []
        bounds = self.bounds
        if not bounds.contains(box):
            reasons.append(f"it is not inside the layer bounds {bounds}")
        for axis, a, b, o, c, end in zip(
            _AXES, box.start, box.stop, self.voxel_offset, self.chunk_size, bounds.stop, strict=True
        ):
            if (a - o) % c:
                reasons.append(f"{axis} start {a} is not on the grid (offset {o} + k*{c})")
            if (b - o) % c and b != end:
                reasons.append(
                    f"{axis} stop {b} is neither on the grid (offset {o} + k*{c}) nor the bound {end}"
                )
        return reasons

    def is_aligned(self, box: VoxelBox) -> bool:
        return not self.misalignment(box)

    def check_aligned(self, box: VoxelBox, what: str = "write") -> None:
        """Raise :class:`~emcore.errors.UnalignedWriteError` unless ``box`` is a valid write region."""
        reasons = self.misalignment(box)
        if reasons:
            raise UnalignedWriteError(
                f"unaligned {what} {box}: " + "; ".join(reasons) + f" (storage chunk size {self.chunk_size}, "
                f"voxel offset {self.voxel_offset}). Use ChunkGrid.align() or ChunkGrid.chunks()."
            )

    def check_processing_chunk(self, processing_chunk: Sequence[int]) -> Vec3:
        """Validate a processing chunk size (xyz voxels): a positive multiple of the storage chunk."""
        pc = _int3(processing_chunk, "processing_chunk")
        bad = [a for a, p, c in zip(_AXES, pc, self.chunk_size, strict=True) if p <= 0 or p % c]
        if bad:
            raise GeometryError(
                f"processing chunk {pc} must be a positive multiple of the storage chunk size "
                f"{self.chunk_size} in every axis (not in {', '.join(bad)})"
            )
        return pc

    def chunks(self, box: VoxelBox, processing_chunk: Sequence[int]) -> Iterator[VoxelBox]:
        """The processing chunks covering ``box``, in z, y, x order (x fastest).

        ``box`` is first expanded to the grid and clipped to the bounds (:meth:`align`); chunks start
        every ``processing_chunk`` voxels from there and the last one in each axis is cut at the
        aligned box's stop, so every chunk is a valid write region.
        """
        pc = self.check_processing_chunk(processing_chunk)
        aligned = self.align(box)
        if aligned.is_empty:
            return
        ranges = [
            list(range(a, b, p)) for a, b, p in zip(aligned.start, aligned.stop, pc, strict=True)
        ]
        for z in ranges[2]:
            for y in ranges[1]:
                for x in ranges[0]:
                    start = (x, y, z)
                    stop = tuple(min(s + p, e) for s, p, e in zip(start, pc, aligned.stop, strict=True))
                    yield VoxelBox(start, stop)  # type: ignore[arg-type]
