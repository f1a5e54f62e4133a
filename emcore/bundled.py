"""The real EM data that ships with sectionflow, and where the larger shared data lies.

API summary
-----------
* ``VNC_STACK_DIR``: ``<repo>/data/vnc_stack1`` (``00.png`` ... ``09.png``, 1024 x 1024 uint8; see
  ``data/README.md`` for source, citation and license: CC BY-NC-SA 3.0).
* ``VNC_RESOLUTION_NM = (4.6, 4.6, 50.0)``: nm per voxel (x, y, z).
* ``load_vnc_sections(indices=None, crop=None) -> np.ndarray (Z, Y, X) uint8``.
* ``REDUCED_MIP2_DIR``: ``<repo>/data/reduced_mip2``: every section of the shared VNC and medulla
  stacks at mip 2 (``REDUCED_MIP``), so tests and model training run from a bare clone (see
  :mod:`emcore.models.em_data`).
* ``shared_data_dir() -> Path``: ``$SECTIONFLOW_SHARED_DATA``, default ``<repo>/../shared/data``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from emcore.stack_import import read_section

__all__ = [
    "REDUCED_MIP",
    "REDUCED_MIP2_DIR",
    "REPO_ROOT",
    "VNC_NUM_SECTIONS",
    "VNC_RESOLUTION_NM",
    "VNC_STACK_DIR",
    "load_vnc_sections",
    "shared_data_dir",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
VNC_STACK_DIR = REPO_ROOT / "data" / "vnc_stack1"
REDUCED_MIP = 2
REDUCED_MIP2_DIR = REPO_ROOT / "data" / "reduced_mip2"
VNC_RESOLUTION_NM: tuple[float, float, float] = (4.6, 4.6, 50.0)
VNC_NUM_SECTIONS = 10


def load_vnc_sections(
    indices: Sequence[int] | None = None,
    crop: tuple[slice, slice] | None = None,
) -> np.ndarray:
    """Load bundled VNC sections.

    Args:
        indices: section numbers in ``0..9`` (default: all 10), in the order wanted.
        crop: ``(y slice, x slice)`` in mip-0 pixels applied to every section (default: full 1024 x
            1024).

    Returns:
        ``(Z, Y, X)`` uint8 array, one z per index.
    """
    indices = list(range(VNC_NUM_SECTIONS)) if indices is None else list(indices)
    if not indices:
        raise ValueError("load_vnc_sections needs at least one section index")
    bad = [i for i in indices if not (isinstance(i, int | np.integer) and 0 <= i < VNC_NUM_SECTIONS)]
    if bad:
        raise ValueError(f"bundled VNC section indices must be in 0..{VNC_NUM_SECTIONS - 1}, got {bad}")
    sections = []
    for i in indices:
        path = VNC_STACK_DIR / f"{int(i):02d}.png"
        if not path.is_file():
            raise FileNotFoundError(f"bundled section {path} is missing; is the checkout complete?")
        image = read_section(path)
        sections.append(image if crop is None else image[crop[0], crop[1]])
    return np.stack(sections).astype(np.uint8, copy=False)


def shared_data_dir() -> Path:
    """The larger shared real EM data: ``$SECTIONFLOW_SHARED_DATA`` or ``<repo>/../shared/data``."""
    env = os.environ.get("SECTIONFLOW_SHARED_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"
