"""The real EM stacks models are trained and benchmarked on, at a chosen mip, normalized.

Datasets (in :func:`emcore.bundled.shared_data_dir`, ``$SECTIONFLOW_SHARED_DATA``; see its README
for sources and licenses; when that folder lacks a section, its mip-2 copy shipped in
``data/reduced_mip2/`` (:data:`emcore.bundled.REDUCED_MIP2_DIR`, made by the same
:func:`emcore.pyramid.downsample_image`) serves every ``mip >= 2`` bitwise identically):

* ``"vnc"``: ``drosophila_vnc_stack1/00.tif .. 19.tif``, 1024 px, 4.6 nm/px (ssTEM, registered).
* ``"medulla"``: ``drosophila_medulla_fibsem/00.png .. 63.png``, 520 px, 10 nm/px (FIB-SEM,
  registered, 40 nm apart).

Held out for benchmarks (never used for training): vnc sections 16-19, medulla 56-63
(:data:`HELD_OUT`).

:func:`load_stack` returns ``(Z, 1, Y, X)`` float32 sections at ``mip`` (``2**mip`` downsampled
with :func:`emcore.pyramid.downsample_image`), each normalized over its tissue to mean 0 / std 1
with :mod:`emcore.normalize` (0 = no data). Resolution at mip ``m``: ``base_nm * 2**m`` nm/px.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from emcore.bundled import REDUCED_MIP, REDUCED_MIP2_DIR, shared_data_dir
from emcore.normalize import normalize, section_stats
from emcore.pyramid import downsample_image
from emcore.stack_import import read_section

__all__ = ["DATASETS", "HELD_OUT", "Dataset", "load_stack", "training_sections"]


@dataclass(frozen=True)
class Dataset:
    """One stack: folder under the shared data, file pattern, section count, nm/px at mip 0."""

    folder: str
    pattern: str
    count: int
    base_nm: float


DATASETS = {
    "vnc": Dataset("drosophila_vnc_stack1", "{:02d}.tif", 20, 4.6),
    "medulla": Dataset("drosophila_medulla_fibsem", "{:02d}.png", 64, 10.0),
}
HELD_OUT = {"vnc": tuple(range(16, 20)), "medulla": tuple(range(56, 64))}


def training_sections(dataset: str) -> list[int]:
    """The section indices of ``dataset`` that training may use (all but :data:`HELD_OUT`)."""
    return [i for i in range(_dataset(dataset).count) if i not in HELD_OUT[dataset]]


def _dataset(name: str) -> Dataset:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    return DATASETS[name]


def _read(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(
            f"section {path} not found: set SECTIONFLOW_SHARED_DATA to the shared data folder "
            "(the one holding drosophila_vnc_stack1/)"
        )
    return read_section(path)


def _read_at_most(info: Dataset, index: int, mip: int) -> tuple[np.ndarray, int]:
    """Section ``index`` as ``(1, 1, Y, X)`` uint8 at the finest stored mip ``<= mip``, and that mip.

    The full-resolution file in the shared data when it is there; else, for ``mip >= 2``, the
    bundled mip-2 copy (identical to downsampling the full section twice).
    """
    full = shared_data_dir() / info.folder / info.pattern.format(index)
    reduced = REDUCED_MIP2_DIR / info.folder / f"{index:02d}.png"
    if not full.is_file() and mip >= REDUCED_MIP and reduced.is_file():
        return read_section(reduced)[None, None], REDUCED_MIP
    return _read(full)[None, None], 0


def load_stack(dataset: str, mip: int, sections: Sequence[int] | None = None) -> torch.Tensor:
    """Sections of ``dataset`` at ``mip``, normalized: ``(Z, 1, Y, X)`` float32 (0 = no data).

    Args:
        dataset: ``"vnc"`` or ``"medulla"``.
        mip: ``2**mip`` downsampling (0 = full resolution).
        sections: indices (default all).
    """
    info = _dataset(dataset)
    if mip < 0:
        raise ValueError(f"mip must be >= 0, got {mip}")
    indices = list(range(info.count)) if sections is None else list(sections)
    out = []
    for i in indices:
        image, stored_mip = _read_at_most(info, i, mip)
        for _ in range(mip - stored_mip):
            image = downsample_image(image)
        stats = section_stats(image, section=f"{dataset} {i}")
        out.append(normalize(image, stats.mean, stats.std))
    return torch.from_numpy(np.concatenate(out))
