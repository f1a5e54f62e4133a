"""Tiny chunk functions for the run_chunks tests (module level: the dask workers import them)."""

from __future__ import annotations

import os
from typing import Any

from emcore.errors import SectionflowError
from tasks.markers import ChunkMarker, ChunkOutcome


def square(x: int, path: str = "") -> dict[str, Any]:
    """``{"x", "y": x * x, "path", "pid"}``: which worker process computed it, with the path it got."""
    return {"x": x, "y": x * x, "path": path, "pid": os.getpid()}


def flaky(x: int, flag_dir: str) -> int:
    """Fails once with a transient ``OSError`` per ``x`` (a flag file remembers), then returns ``x``."""
    flag = os.path.join(flag_dir, f"failed-{x}")
    if not os.path.exists(flag):
        open(flag, "w").close()
        raise ConnectionResetError(f"storage hiccup on chunk {x}")
    return x


def broken(x: int, calls_dir: str) -> int:
    """Always fails with sectionflow's own (non-transient) error; counts its calls in ``calls_dir``."""
    open(os.path.join(calls_dir, f"call-{x}-{len(os.listdir(calls_dir))}"), "w").close()
    raise SectionflowError(f"chunk {x}: bad input, fix the parameters")


def square_or_broken(x: int, path: str = "", calls_dir: str = "") -> Any:
    """:func:`broken` when ``calls_dir`` is given, else :func:`square` (a group with one bad chunk)."""
    return broken(x, calls_dir) if calls_dir else square(x, path)


def marked(layer: str, x: int) -> ChunkOutcome:
    """A chunk with a completion marker: ``done`` the first time, ``skipped`` after."""
    marker = ChunkMarker(layer, "marked", str(x), (), {})
    if marker.is_done():
        return ChunkOutcome("marked", str(x), "skipped")
    marker.mark_done()
    return ChunkOutcome("marked", str(x), "done")
