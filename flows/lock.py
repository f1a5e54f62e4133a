"""One run per output: an exclusive lock on ``<output>/.sectionflow/lock`` while a run writes there.

Two ``align-stack`` runs (or stage commands) into one output would compute the same chunks twice
and race on their files. :func:`output_lock` takes an exclusive ``fcntl.flock`` on the output's
lock file; a second run refuses at once with :class:`~emcore.errors.OutputLockedError` naming the
holder (pid, host, start time, command) and what to do. The operating system drops the lock when
its process ends, however it ends (crash, SIGKILL), so a stale lock never blocks a rerun.

The lock is re-entrant within one process (``align_stack`` holds it and each of its stages takes it
again). It covers local outputs (``file://`` or a plain path) on one machine or a shared file
system with working ``flock``; object-store outputs (``gs://``, ``s3://``) are not locked (a lease
there needs a conditional put, not implemented).

API summary
-----------
* ``output_lock(output) -> context manager``: hold the lock for the block.
* ``lock_path(output) -> str | None``: the lock file of a local output, ``None`` for object stores.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
import threading
from collections.abc import Iterator
from typing import IO

from emcore.errors import OutputLockedError
from emcore.layers import normalize_path

__all__ = ["lock_path", "output_lock"]

_HELD: dict[str, tuple[IO[str], int]] = {}
_GUARD = threading.Lock()


def lock_path(output: str) -> str | None:
    """``<output>/.sectionflow/lock`` for a local output; ``None`` for object stores."""
    path = normalize_path(output)
    if not path.startswith("file://"):
        return None
    return os.path.join(path[len("file://") :], ".sectionflow", "lock")


def _holder(fh: IO[str]) -> str:
    try:
        fh.seek(0)
        info = json.loads(fh.read() or "{}")
    except ValueError:
        info = {}
    if not info:
        return "another process"
    return (
        f"pid {info.get('pid')} on {info.get('host')}, since {info.get('since')}, "
        f"command: {info.get('command')}"
    )


@contextlib.contextmanager
def output_lock(output: str) -> Iterator[None]:
    """Hold the exclusive lock of ``output`` for the block (see the module docstring).

    Raises:
        OutputLockedError: another process holds it.
    """
    path = lock_path(output)
    if path is None:
        yield
        return
    with _GUARD:
        if path in _HELD:
            fh, depth = _HELD[path]
            _HELD[path] = (fh, depth + 1)
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fh = open(path, "a+")  # noqa: SIM115 - held open for the lock's lifetime
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fh)
                fh.close()
                raise OutputLockedError(
                    f"output {normalize_path(output)} is in use by another sectionflow run ({holder}): "
                    "wait for it to finish (the lock goes with its process), or write to another output"
                ) from None
            fh.seek(0)
            fh.truncate()
            fh.write(json.dumps({
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "since": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "command": " ".join(sys.argv)[:300],
            }))  # fmt: skip
            fh.flush()
            _HELD[path] = (fh, 1)
    try:
        yield
    finally:
        with _GUARD:
            fh, depth = _HELD[path]
            if depth > 1:
                _HELD[path] = (fh, depth - 1)
            else:
                del _HELD[path]
                fh.seek(0)
                fh.truncate()
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
                fh.close()
