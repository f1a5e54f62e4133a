"""Shared fixtures (kept small and stable: other test modules rely on them).

* ``vnc_sections``: bundled real EM sections 0-3 as a fresh ``(4, 1024, 1024)`` uint8 array
  (a copy per test: mutate freely). 4.6 x 4.6 x 50 nm, see ``data/README.md``.
* ``layer_root``: a ``file://`` URL of an empty directory under ``tmp_path`` to create layers in
  (``f"{layer_root}/image"`` ...).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from emcore.bundled import load_vnc_sections


@functools.cache
def _vnc_sections_cached() -> np.ndarray:
    return load_vnc_sections([0, 1, 2, 3])


@pytest.fixture
def vnc_sections() -> np.ndarray:
    """Bundled real VNC sections 0-3, ``(4, 1024, 1024)`` uint8 (a copy per test)."""
    return _vnc_sections_cached().copy()


@pytest.fixture
def layer_root(tmp_path) -> str:
    """A ``file://`` URL of an empty directory for layers."""
    root = tmp_path / "layers"
    root.mkdir()
    return f"file://{root}"
