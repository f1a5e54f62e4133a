"""A storage-fault wrapper for tests: cloud-files' local storage that fails some reads and writes.

:class:`StorageFaults` wraps ``cloudfiles.interfaces.FileInterface`` (what every ``file://`` read
and write of cloud-volume, the layers and the markers goes through) in this process:

* transient faults: the first read (``get_file``) and the first write (``put_file``) of each
  chosen file raise ``OSError``; later attempts go through. A file is chosen when the crc32 of its
  path relative to the parent of ``root`` falls in the given ``fraction`` (so the choice is the same
  in every pytest run, whatever its ``pytest-N`` folder). Only the data I/O of chunk tasks is
  faulted: chunk files and completion markers, not layer metadata (``info``, ``provenance``, the
  stages' JSON files), which flows read and write outside any retried task.
* a transient fault is what the chunk retry policy (:mod:`tasks.retry`, ``RETRIES``) is built to
  absorb, so one chunk gets at most ``RETRIES`` injected faults over all its attempts; without that
  cap, a chunk touching several chosen files would fail for good in some runs and pass in others.
  A chunk is known by its completion marker, which every chunk task reads first (``is_done``), in
  the thread that then runs the chunk and its retries.
* permanent faults: every write of a file whose path contains one of ``permanent`` raises.

Use it with flows running their tasks in this process (``ThreadPoolTaskRunner``): dask worker
processes do not see the wrapper.
"""

from __future__ import annotations

import os
import re
import threading
import zlib
from collections import Counter
from typing import Any

from cloudfiles.interfaces import FileInterface

from tasks.retry import RETRIES

__all__ = ["StorageFaults"]


def _is_data(path: str) -> bool:
    """Chunk files and markers, not metadata (info, provenance, JSON bookkeeping)."""
    if "/.sectionflow/done/" in path:
        return True
    return path.rsplit("/", 1)[-1] not in ("info", "provenance") and not path.endswith(".json")


class StorageFaults:
    """Context manager injecting storage faults (see the module docstring); ``.injected`` counts them."""

    def __init__(self, root: str, fraction: float = 0.0, permanent: tuple[str, ...] = ()) -> None:
        self.root = str(root)
        self.fraction = fraction
        self.permanent = permanent
        self.injected: Counter[str] = Counter()
        self._seen: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._thread = threading.local()  # .chunk: the marker of the chunk this thread runs
        self._per_chunk: Counter[str | None] = Counter()  # injected faults per chunk

    def _chosen(self, relative: str) -> bool:
        return zlib.crc32(relative.encode()) % 1000 < self.fraction * 1000

    def _maybe_fail(self, op: str, path: str) -> None:
        if op == "write" and any(p in path for p in self.permanent):
            self.injected["permanent"] += 1
            raise OSError(f"injected permanent storage fault: {op} {path}")
        # the file's identity: its path beside root, without the per-write staging folder
        relative = re.sub(r"/\.sectionflow/staging/[0-9a-f]+", "",
                          os.path.relpath(path, os.path.dirname(self.root)))
        with self._lock:
            first = (op, relative) not in self._seen
            self._seen.add((op, relative))
        if op == "read" and "/.sectionflow/done/" in path:
            self._thread.chunk = relative  # a chunk task starts (or retries) here
        chunk = getattr(self._thread, "chunk", None)
        with self._lock:
            inject = (first and _is_data(path) and self._chosen(relative)
                      and self._per_chunk[chunk] < RETRIES)
            if inject:
                self._per_chunk[chunk] += 1
                self.injected[op] += 1
        if inject:
            raise OSError(f"injected transient storage fault: {op} {path}")

    def __enter__(self) -> StorageFaults:
        self._get, self._put = FileInterface.get_file, FileInterface.put_file
        faults = self

        def get_file(iface: Any, file_path: str, *args: Any, **kwargs: Any) -> Any:
            faults._maybe_fail("read", iface.get_path_to_file(file_path))
            return faults._get(iface, file_path, *args, **kwargs)

        def put_file(iface: Any, file_path: str, *args: Any, **kwargs: Any) -> Any:
            faults._maybe_fail("write", iface.get_path_to_file(file_path))
            return faults._put(iface, file_path, *args, **kwargs)

        FileInterface.get_file, FileInterface.put_file = get_file, put_file
        return self

    def __exit__(self, *exc: object) -> None:
        FileInterface.get_file, FileInterface.put_file = self._get, self._put
