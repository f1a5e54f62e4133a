"""Completion markers: what makes every chunk task idempotent and reruns cheap.

A chunk task that finished writes, *after* its chunk write, a small JSON marker next to its output
layer: ``<layer>/.sectionflow/done/<task>/<chunk>.json``. The marker holds a key, the sha256 of the
task name, the chunk, the input layer paths, the parameters and the code version
(:func:`tasks.version.code_version`). A task whose marker exists with the same key is skipped; any
change of inputs, parameters or code gives a new key and the chunk is recomputed. A crash between
the chunk write and the marker only costs a recomputation (the write itself is idempotent).

Local (``file://``) markers are written atomically (temporary file + rename); on object stores a
single ``put`` is atomic.

API summary
-----------
* ``ChunkMarker(layer_path, task, chunk, inputs, parameters)``: ``.key``, ``.is_done()``,
  ``.mark_done(extra=None)``.
* ``ChunkOutcome(task, chunk, status, detail)``: what chunk tasks return (``status`` in ``"done"``,
  ``"skipped"``); ``count(outcomes)`` -> ``{"done": n, "skipped": m}``.
* ``clear_markers(layer_path)``: forget every marker of a layer (forces recomputation).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cloudfiles import CloudFiles

from emcore.layers import normalize_path
from tasks.version import code_version

__all__ = ["ChunkMarker", "ChunkOutcome", "clear_markers", "count"]

MARKER_DIR = ".sectionflow/done"


def _canonical(value: Any) -> Any:
    """JSON-able canonical form (tuples -> lists, objects -> str) for stable keys."""
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    return str(value)


@dataclass(frozen=True)
class ChunkOutcome:
    """Result of one chunk task: ``status`` is ``"done"`` (computed now) or ``"skipped"`` (marker found)."""

    task: str
    chunk: str
    status: str
    detail: dict[str, Any] = field(default_factory=dict)


def count(outcomes: Iterable[ChunkOutcome]) -> dict[str, int]:
    """``{"done": n, "skipped": m}`` over ``outcomes``."""
    c = Counter(o.status for o in outcomes)
    return {"done": c.get("done", 0), "skipped": c.get("skipped", 0)}


@dataclass(frozen=True)
class ChunkMarker:
    """The completion marker of one chunk of one task writing to ``layer_path``.

    Attributes:
        layer_path: the output layer (cloud path or local directory).
        task: task name (one marker folder per task).
        chunk: the chunk's name, e.g. ``str(VoxelBox)`` plus the mip; must be unique per task.
        inputs: input layer paths (or other input identities).
        parameters: everything else that changes the output.
    """

    layer_path: str
    task: str
    chunk: str
    inputs: tuple[str, ...] = ()
    parameters: Mapping[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        payload = {
            "task": self.task,
            "chunk": self.chunk,
            "inputs": [normalize_path(p) if "/" in p else p for p in self.inputs],
            "parameters": _canonical(dict(self.parameters)),
            "code_version": code_version(),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    @property
    def _name(self) -> str:
        digest = hashlib.sha1(self.chunk.encode()).hexdigest()[:16]
        return f"{MARKER_DIR}/{self.task}/{digest}.json"

    def is_done(self) -> bool:
        """Whether this chunk finished before with the same key."""
        raw = CloudFiles(normalize_path(self.layer_path)).get(self._name)
        if raw is None:
            return False
        try:
            return json.loads(raw).get("key") == self.key
        except ValueError:
            return False

    def mark_done(self, extra: Mapping[str, Any] | None = None) -> None:
        """Write the marker (after the chunk's data is written)."""
        record = {
            "key": self.key,
            "task": self.task,
            "chunk": self.chunk,
            "extra": _canonical(dict(extra or {})),
        }
        data = json.dumps(record, sort_keys=True).encode()
        path = normalize_path(self.layer_path)
        if path.startswith("file://"):
            target = os.path.join(path[len("file://") :], self._name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".tmp-")
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, target)
        else:
            CloudFiles(path).put(self._name, data, content_type="application/json", compress=None)

    def read_extra(self) -> dict[str, Any] | None:
        """The ``extra`` dict stored with a valid marker, or ``None`` if not done."""
        raw = CloudFiles(normalize_path(self.layer_path)).get(self._name)
        if raw is None:
            return None
        record = json.loads(raw)
        return record.get("extra") if record.get("key") == self.key else None


def clear_markers(layer_path: str) -> None:
    """Delete all completion markers of a layer (the next run recomputes everything)."""
    path = normalize_path(layer_path)
    if path.startswith("file://"):
        shutil.rmtree(os.path.join(path[len("file://") :], MARKER_DIR), ignore_errors=True)
    else:
        cf = CloudFiles(path)
        cf.delete(list(cf.list(prefix=MARKER_DIR)))
