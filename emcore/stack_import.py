"""Import a stack of section image files (TIFF / PNG, one per z) into a new image layer.

Files are sorted by name in natural order (``2.png`` before ``10.png``); file ``k`` becomes section
``voxel_offset.z + k``. Every file must be a single greyscale 2D image of the same size and dtype
(uint8, or float32); all are checked (headers only) before the layer is created. Sections are then
read, written and downsampled one storage-chunk slab in z at a time, so memory stays at
``chunk_size.z`` sections; each slab is complete before the next starts.

API summary
-----------
* ``SECTION_SUFFIXES``: the file endings imported (``.tif``, ``.tiff``, ``.png``).
* ``list_section_files(source) -> list[Path]``: a directory's section files, naturally sorted, or the
  given sequence of files checked to exist (kept in its order).
* ``read_section(path) -> np.ndarray (Y, X)``: one section; :class:`~emcore.errors.StackImportError`
  naming the file if it cannot be read or is not a 2D greyscale image.
* ``import_stack(source, layer_path, *, resolution, chunk_size=(256, 256, 1), num_mips=1,
  voxel_offset=(0, 0, 0), code_version=None) -> Layer``: the new layer (x, y size = image width,
  height; z size = number of files), all mips filled, a provenance record added.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import tifffile
from PIL import Image

from emcore.errors import StackImportError
from emcore.geometry import VoxelBox

if TYPE_CHECKING:  # the layer writer needs cloud-volume; reading sections must not
    from emcore.layers import Layer

__all__ = ["SECTION_SUFFIXES", "import_stack", "list_section_files", "read_section"]

SECTION_SUFFIXES = (".tif", ".tiff", ".png")
_SUPPORTED_DTYPES = ("uint8", "float32")


def _natural_key(path: Path) -> list[object]:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def list_section_files(source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The section files of a directory (naturally sorted) or an explicit list (order kept)."""
    if isinstance(source, str | os.PathLike):
        directory = Path(source)
        if not directory.is_dir():
            raise StackImportError(f"section directory {directory} does not exist")
        files = sorted(
            (p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in SECTION_SUFFIXES),
            key=_natural_key,
        )
        if not files:
            raise StackImportError(
                f"no section files ({', '.join(SECTION_SUFFIXES)}) in {directory}"
            )
        return files
    files = [Path(p) for p in source]
    if not files:
        raise StackImportError("no section files given")
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise StackImportError(f"section files not found: {', '.join(missing)}")
    return files


def _probe(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a section file from its header (no pixel decoding for PNG)."""
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                return tuple(series.shape), np.dtype(series.dtype)
        with Image.open(path) as img:
            mode_dtypes = {"L": "uint8", "F": "float32", "I;16": "uint16", "I": "int32"}
            if img.mode not in mode_dtypes:
                return (img.height, img.width, len(img.getbands())), np.dtype("uint8")
            return (img.height, img.width), np.dtype(mode_dtypes[img.mode])
    except Exception as err:  # any decoder failure: name the file
        raise StackImportError(f"cannot read section file {path}: {err}") from err


def _check_section(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
    if len(shape) != 2:
        raise StackImportError(
            f"section file {path} has shape {shape}; expected one 2D greyscale image (Y, X)"
        )
    if dtype.name not in _SUPPORTED_DTYPES:
        raise StackImportError(
            f"section file {path} has dtype {dtype}; supported: {', '.join(_SUPPORTED_DTYPES)} "
            "(convert it first)"
        )


def read_section(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one section file as a ``(Y, X)`` array (uint8 or float32)."""
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            image = tifffile.imread(path)
        else:
            with Image.open(path) as img:
                image = np.asarray(img)
    except Exception as err:  # any decoder failure: name the file
        raise StackImportError(f"cannot read section file {path}: {err}") from err
    _check_section(path, image.shape, image.dtype)
    return image


def import_stack(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    layer_path: str | os.PathLike[str],
    *,
    resolution: Sequence[float],
    chunk_size: Sequence[int] = (256, 256, 1),
    num_mips: int = 1,
    voxel_offset: Sequence[int] = (0, 0, 0),
    code_version: str | None = None,
    kind: str = "image",
) -> Layer:
    """Import section files into a new image (or mask) layer and fill its mip pyramid.

    Args:
        source: a directory of ``.tif``/``.tiff``/``.png`` files, or a list of files (z order).
        layer_path: where to create the image layer (see :func:`emcore.layers.create_layer`).
        resolution: mip-0 nm per voxel (x, y, z), e.g. ``(4.6, 4.6, 50)``.
        chunk_size: storage chunk in voxels (x, y, z).
        num_mips: mips to create and fill by downsampling (image rule: mean of data pixels).
        voxel_offset: mip-0 offset of the first section's corner (x, y, z).
        code_version: recorded in the layer's provenance (default: the installed sectionflow version).
        kind: ``"image"`` (values as they are) or ``"mask"`` (a defect mask: nonzero pixels become
            1, stored uint8, coarser mips by max, so a fold never vanishes when downsampled).

    Raises:
        StackImportError: no files, an unreadable file, or files of mixed size / dtype (named).
    """
    if kind not in ("image", "mask"):
        raise StackImportError(f"kind must be 'image' or 'mask', got {kind!r}")
    files = list_section_files(source)
    first_shape, first_dtype = _probe(files[0])
    _check_section(files[0], first_shape, first_dtype)
    for path in files[1:]:
        shape, dtype = _probe(path)
        _check_section(path, shape, dtype)
        if shape != first_shape or dtype != first_dtype:
            raise StackImportError(
                f"section file {path} is {shape[1]}x{shape[0]} {dtype}, but {files[0].name} is "
                f"{first_shape[1]}x{first_shape[0]} {first_dtype}; all sections must match"
            )
    height, width = first_shape
    from emcore.layers import create_layer

    layer = create_layer(
        layer_path,
        kind=kind,
        resolution=resolution,
        size=(width, height, len(files)),
        voxel_offset=voxel_offset,
        chunk_size=chunk_size,
        num_mips=num_mips,
        dtype=first_dtype if kind == "image" else "uint8",
    )
    bounds = layer.bounds(0)
    slab = layer.chunk_size(0)[2]
    for first in range(0, len(files), slab):
        group = files[first : first + slab]
        sections = []
        for path in group:
            section = read_section(path)
            if section.shape != first_shape or section.dtype != first_dtype:
                raise StackImportError(f"section file {path} changed while importing")
            sections.append(section)
        z0 = bounds.start[2] + first
        box = VoxelBox.from_shape((bounds.start[0], bounds.start[1], z0), (width, height, len(group)))
        data = np.stack(sections)
        if kind == "mask":
            data = (data != 0).astype(np.uint8)
        layer.write(box, data)
        if num_mips > 1:
            layer.downsample(box)
    layer.add_provenance(
        f"import_stack: section files imported as a{'n image' if kind == 'image' else ' defect mask'} layer",
        {
            "files": [str(p) for p in files],
            "resolution_nm": list(resolution),
            "chunk_size": list(chunk_size),
            "num_mips": num_mips,
            "voxel_offset": list(voxel_offset),
        },
        code_version or _installed_version(),
    )
    return layer


def _installed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"sectionflow {version('sectionflow')}"
    except PackageNotFoundError:
        return "sectionflow (not installed)"
