"""The code version recorded in provenance records and completion-marker keys.

``git describe --always --dirty`` of the checkout when sectionflow runs from one, else the
installed package version (``sectionflow 0.1.0``).
"""

from __future__ import annotations

import functools
import subprocess
from importlib import metadata
from pathlib import Path

__all__ = ["code_version"]

_REPO = Path(__file__).resolve().parent.parent


@functools.cache
def code_version() -> str:
    """``git describe --always --dirty`` of the source tree, or ``sectionflow <version>``."""
    try:
        out = subprocess.run(
            ["git", "-C", str(_REPO), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        if out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return f"sectionflow {metadata.version('sectionflow')}"
    except metadata.PackageNotFoundError:
        return "sectionflow (unknown version)"
