"""Prefect at the level a person watches, dask at the level of chunks: :func:`run_chunks`.

A stage calls ``run_chunks(chunk_fn, [kwargs, ...], label)`` once per group of chunks it used to
submit as Prefect tasks. The chunks are cut, in list order, into *blocks* of ``block_chunks``
chunks (``$SECTIONFLOW_BLOCK_CHUNKS``, default :data:`DEFAULT_BLOCK_CHUNKS`); the stages list chunks
z-major (:meth:`emcore.geometry.VoxelGrid.chunks`), so a block is a z-range x the stage's region.
Each block is one Prefect task run (``chunk-block``, named ``"<label> <i>/<n>"``) in the flow's
process that maps its chunks over the dask cluster (:func:`flows.runtime.dask_client`,
``client.map``, no Prefect per chunk) and waits for them as they complete. At most
:data:`BLOCKS_IN_FLIGHT` blocks run at once, so the futures held by the client are bounded by
``BLOCKS_IN_FLIGHT * block_chunks`` whatever the volume.

One dask task runs a *group* of consecutive chunks of a block, one after the other
(:func:`run_chunk_group`; :func:`chunks_per_task` sets the group size): a dask task costs ~3-4 ms
of scheduling on a small machine, more than a skipped chunk's marker check (~0.15 ms), so one task
per chunk made a rerun cost ~5 ms per chunk. Groups are small enough that every worker thread
still gets about :data:`TASKS_PER_THREAD` of them per block (load balance: the last group to finish
holds about 1/16 of a thread's share of the block) and at most
:data:`MAX_CHUNKS_PER_TASK` chunks (progress steps, work redone when a worker dies mid-group:
its finished chunks are kept by their markers). A group's memory is one chunk's: its chunks run
in turn, and after each one that computed, the memory it freed goes back to the system
(:func:`release_free_memory`), so a worker's resident size does not creep up over the run.

What every chunk keeps (on the worker, in the chunk function and :func:`tasks.retry.call_with_retries`):
its completion marker is checked before any read and written atomically after the write
(:mod:`tasks.markers`); transient storage errors are retried (2 retries, 2 s apart), sectionflow's
own errors are not.

Progress, updated as chunk futures complete:

* per block: log lines (every ~25 % of a large block, and one when it finishes: chunks computed /
  skipped, seconds, ms per chunk) and, when the call has more than one block, a Prefect progress
  artifact ``"<label> <i>/<n>: chunks finished"``;
* per call: a progress artifact ``"<label>: chunks finished"`` on the flow run (artifacts are
  updated every ~10 %, at most once a second, and at 100 %);
* in this process: :func:`progress_hook` callbacks (the CLI draws a live rich bar with an ETA).

Paths: every ``file://`` path in the kwargs is made absolute (:func:`absolute_paths`) before it is
sent, so workers with another working directory read the same data; :func:`absolute_params` does the
same for the layer paths of a parameter model (plain relative paths too).

The design before this one, one Prefect task per chunk on a ``DaskTaskRunner``, was kept behind a
flag until ``benchmarks/bench_scale.py`` had recorded both side by side (benchmarks/README.md,
"Orchestration at scale", up to commit 4c313a8), then removed.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import ctypes.util
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext, TaskRunContext

from emcore.errors import SectionflowError
from flows.runtime import dask_client
from tasks.markers import ChunkOutcome
from tasks.retry import call_with_retries

__all__ = [
    "BLOCKS_IN_FLIGHT",
    "BLOCK_ENV",
    "DEFAULT_BLOCK_CHUNKS",
    "GROUP_ENV",
    "MAX_CHUNKS_PER_TASK",
    "TASKS_PER_THREAD",
    "ChunkProgress",
    "absolute_params",
    "absolute_path",
    "absolute_paths",
    "block_chunks",
    "chunks_per_task",
    "progress_hook",
    "run_chunk_group",
    "run_chunks",
]

BLOCK_ENV = "SECTIONFLOW_BLOCK_CHUNKS"
DEFAULT_BLOCK_CHUNKS = 1024
BLOCKS_IN_FLIGHT = 4
GROUP_ENV = "SECTIONFLOW_CHUNKS_PER_TASK"
TASKS_PER_THREAD = 16  # dask tasks per worker thread and block, at least (load balance)
MAX_CHUNKS_PER_TASK = 32
ARTIFACT_EVERY_S = 1.0  # progress artifacts are updated every ~10 %, at most once a second, and at 100 %
_LOG = logging.getLogger("sectionflow.blocks")


class ChunkFailedError(SectionflowError):
    """A chunk's worker died (memory limit, crash) while computing it."""


# -- paths ------------------------------------------------------------------------------------------
def absolute_path(path: str) -> str:
    """``file://`` and plain local paths -> ``file:///absolute``; other URLs (``gs://`` ...) unchanged."""
    if "://" not in path:
        return "file://" + os.path.abspath(os.path.expanduser(path))
    if path.startswith("file://"):
        return "file://" + os.path.abspath(os.path.expanduser(path[len("file://") :]))
    return path


def absolute_paths(value: Any) -> Any:
    """``value`` with every ``file://`` string inside (dicts, lists, tuples) made absolute.

    Containers without such a string are returned as they are (the same object), so a value
    shared by many chunks (e.g. the per-section stats) stays shared and is pickled once.
    """
    if isinstance(value, str):
        if not value.startswith("file://"):
            return value
        resolved = absolute_path(value)
        return value if resolved == value else resolved
    if isinstance(value, Mapping):
        items = {k: absolute_paths(v) for k, v in value.items()}
        return items if any(items[k] is not v for k, v in value.items()) else value
    if isinstance(value, list | tuple) and not hasattr(value, "_fields"):
        items = [absolute_paths(v) for v in value]
        if all(a is b for a, b in zip(items, value, strict=True)):
            return value
        return tuple(items) if isinstance(value, tuple) else items
    return value


_PATH_FIELDS = ("source", "output", "defects", "true_fields", "layer")


def absolute_params(params: Any) -> Any:
    """A copy of a pydantic parameter model with its layer paths (plain or ``file://``) made absolute."""
    update = {}
    for name in _PATH_FIELDS:
        value = getattr(params, name, None)
        if isinstance(value, str) and absolute_path(value) != value:
            update[name] = absolute_path(value)
    return params.model_copy(update=update) if update else params


# -- progress ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChunkProgress:
    """Progress of one :func:`run_chunks` call: ``done`` of ``total`` chunks after ``elapsed_s`` s."""

    label: str
    done: int
    total: int
    elapsed_s: float


_HOOKS: list[Callable[[ChunkProgress], None]] = []


@contextlib.contextmanager
def progress_hook(hook: Callable[[ChunkProgress], None]) -> Iterator[None]:
    """Call ``hook(progress)`` in this process at the start of every :func:`run_chunks` call and as its
    chunks complete (from the block threads: the hook must be thread-safe, e.g. a rich Progress)."""
    _HOOKS.append(hook)
    try:
        yield
    finally:
        _HOOKS.remove(hook)


def _prefect_context() -> bool:
    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


class _Tracker:
    """Chunks finished over all blocks of one call: hooks and the call's progress artifact."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.done = label, total, 0
        self.start = time.perf_counter()
        self.failed = threading.Event()
        self._lock = threading.Lock()
        self._step = max(1, total // 10)
        self._updated = 0.0
        self._artifact = None
        if _prefect_context():
            with contextlib.suppress(Exception):  # artifacts are a convenience, never fail a run
                self._artifact = create_progress_artifact(0.0, description=f"{label}: chunks finished")
        self._notify()

    def _notify(self) -> None:
        event = ChunkProgress(self.label, self.done, self.total, time.perf_counter() - self.start)
        for hook in list(_HOOKS):
            hook(event)

    def add(self, n: int = 1) -> None:
        with self._lock:
            before, self.done = self.done, self.done + n
            now = time.perf_counter()
            step = before // self._step != self.done // self._step
            crossed = (step and now - self._updated >= ARTIFACT_EVERY_S) or self.done == self.total
            if crossed:
                self._updated = now
        self._notify()
        if crossed and self._artifact is not None:
            with contextlib.suppress(Exception):
                update_progress_artifact(self._artifact, 100.0 * self.done / self.total)


# -- blocks -----------------------------------------------------------------------------------------
class _Block:
    """One block's work (a plain object, so Prefect does not walk it as task parameters)."""

    __slots__ = ("count", "fn", "index", "kwargs", "label", "tracker")

    def __init__(self, fn: Callable[..., Any], kwargs: list[dict[str, Any]], label: str, index: int,
                 count: int, tracker: _Tracker) -> None:  # fmt: skip
        self.fn, self.kwargs, self.label = fn, kwargs, label
        self.index, self.count, self.tracker = index, count, tracker

    @property
    def name(self) -> str:
        return self.label if self.count == 1 else f"{self.label} {self.index + 1}/{self.count}"


def _logger() -> Any:
    try:
        return get_run_logger()
    except Exception:  # noqa: BLE001 - outside a Prefect run
        return _LOG


def _counts(results: Sequence[Any]) -> str:
    outcomes = [r for r in results if isinstance(r, ChunkOutcome)]
    if not outcomes:
        return f"{len(results)} chunks"
    done = sum(o.status == "done" for o in outcomes)
    return f"{done} chunks computed, {len(outcomes) - done} skipped"


def chunks_per_task(chunks: int, threads: int) -> int:
    """Chunks per dask task for a block of ``chunks`` on a cluster with ``threads`` worker threads.

    ``ceil(chunks / (threads * TASKS_PER_THREAD))``, between 1 and :data:`MAX_CHUNKS_PER_TASK`
    (``threads`` 0, an adaptive cluster before its first worker, counts as 1);
    ``$SECTIONFLOW_CHUNKS_PER_TASK`` sets it instead (1 = one dask task per chunk).
    """
    chosen = _positive_env(GROUP_ENV, "chunks per dask task")
    if chosen is not None:
        return chosen
    per_task = -(-chunks // (max(threads, 1) * TASKS_PER_THREAD))
    return max(1, min(MAX_CHUNKS_PER_TASK, per_task))


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or ``None`` where the C library has none (macOS, musl)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Hand the worker's freed heap memory back to the system (``malloc_trim(0)``, ~1-20 ms).

    A chunk's tensors are freed when it ends, but glibc keeps the holes they leave in its heap, so
    without this a worker's resident size creeps up over thousands of chunks of different sizes
    (measured: three solves of one size in a row, 290 -> 304 MiB; trimmed after each, every one
    starts from the same 233 MiB). Dask's documentation gives the same remedy ("Memory not
    released back to the OS").
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def run_chunk_group(fn: Callable[..., Any], group: Sequence[Mapping[str, Any]]) -> list[Any]:
    """``[fn(**kwargs) for kwargs in group]`` on a worker, each chunk with its retries
    (:func:`tasks.retry.call_with_retries`); the first chunk that still fails stops the group.
    After each chunk that computed (not one skipped by its marker) the freed memory goes back to
    the system (:func:`release_free_memory`)."""
    results = []
    for kwargs in group:
        results.append(call_with_retries(fn, kwargs))
        if getattr(results[-1], "status", None) != "skipped":
            release_free_memory()
    return results


def _run_block(block: _Block) -> list[Any]:
    """Map the block's chunks over the cluster and wait for them, reporting progress."""
    from distributed import KilledWorker, as_completed

    start = time.perf_counter()
    logger = _logger()
    n = len(block.kwargs)
    artifact = None
    if block.count > 1 and _prefect_context():  # one block: the call's own artifact says it all
        with contextlib.suppress(Exception):
            artifact = create_progress_artifact(0.0, description=f"{block.name}: chunks finished")
    updated = 0.0
    client = dask_client()
    size = chunks_per_task(n, sum(client.nthreads().values()))
    groups = [block.kwargs[i : i + size] for i in range(0, n, size)]
    futures = client.map(
        functools.partial(run_chunk_group, block.fn), groups, pure=False, key=block.fn.__name__
    )
    index = {f.key: i for i, f in enumerate(futures)}  # future -> its group
    results: list[Any] = [None] * n
    log_step = max(1, n // 4) if n >= 100 else n
    art_step = max(1, n // 10)
    finished = 0
    failed = None  # the first chunk that failed: the block's other chunks still finish (and are kept)
    try:
        for batch in as_completed(futures, loop=client.loop).batches():
            if block.tracker.failed.is_set() and failed is None:
                raise ChunkFailedError(f"{block.name}: stopped, another block of {block.label} failed")
            chunks = 0
            for future in batch:
                g = index[future.key]
                chunks += len(groups[g])
                if future.status == "error":
                    if failed is None:
                        failed = future
                        block.tracker.failed.set()
                    continue
                results[g * size : g * size + len(groups[g])] = future.result()
            before, finished = finished, finished + chunks
            block.tracker.add(chunks)
            now = time.perf_counter()
            due = finished // art_step != before // art_step and now - updated >= ARTIFACT_EVERY_S
            if artifact is not None and (due or finished == n):
                updated = now
                with contextlib.suppress(Exception):
                    update_progress_artifact(artifact, 100.0 * finished / n)
            if finished // log_step != before // log_step and finished < n:
                logger.info("%s: %d/%d chunks finished", block.name, finished, n)
        if failed is not None:
            failed.result()  # raises the chunk's own error (a clear SectionflowError, or after retries)
    except KilledWorker as exc:
        block.tracker.failed.set()
        client.cancel(futures)
        raise ChunkFailedError(
            f"{block.name}: a chunk of {block.fn.__name__} killed its dask worker more than once "
            f"({exc}); most often the worker's memory limit: lower chunk_xy or give the workers "
            "more memory (cluster.memory_limit, dask worker --memory-limit)"
        ) from None
    except BaseException:
        block.tracker.failed.set()
        client.cancel(futures)
        raise
    del futures, index, groups
    seconds = time.perf_counter() - start
    logger.info("%s: %s in %.1f s (%.1f ms per chunk)", block.name, _counts(results), seconds,
                1e3 * seconds / max(n, 1))  # fmt: skip
    return results


@task(name="chunk-block", cache_policy=NO_CACHE, persist_result=False)
def chunk_block(block: _Block) -> list[Any]:
    """One block of chunks as a Prefect task run (see the module docstring)."""
    return _run_block(block)


def _block_in_prefect(block: _Block) -> list[Any]:
    return chunk_block.with_options(task_run_name=block.name)(block)


def block_chunks() -> int:
    """Chunks per block from ``$SECTIONFLOW_BLOCK_CHUNKS`` (default :data:`DEFAULT_BLOCK_CHUNKS`)."""
    chosen = _positive_env(BLOCK_ENV, "chunks per block")
    return DEFAULT_BLOCK_CHUNKS if chosen is None else chosen


def _positive_env(name: str, what: str) -> int | None:
    """The positive integer in ``$name``, ``None`` when unset; a clear error naming it otherwise."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise SectionflowError(f"${name}={raw!r}: expected a positive number of {what}")
    return value


def run_chunks(
    fn: Callable[..., Any],
    kwargs_list: Sequence[Mapping[str, Any]],
    label: str,
    *,
    block_size: int | None = None,
) -> list[Any]:
    """``[fn(**kwargs) for kwargs in kwargs_list]`` on the dask cluster, in blocks (module docstring).

    Args:
        fn: a plain chunk function (module level, importable on the workers).
        kwargs_list: the keyword arguments of each chunk (small: paths, boxes, parameters).
        label: what a person sees (log lines, artifacts, the CLI's progress bar).
        block_size: chunks per block (default :func:`block_chunks`).

    Returns:
        The chunk results in the order of ``kwargs_list``. The first failing chunk (after its
        retries) stops the call and its error propagates.
    """
    kwargs = [dict(absolute_paths(kw)) for kw in kwargs_list]
    total = len(kwargs)
    tracker = _Tracker(label, total)
    if not total:
        return []
    size = block_size or block_chunks()
    ranges = [range(i, min(i + size, total)) for i in range(0, total, size)]
    blocks = [_Block(fn, kwargs[r.start : r.stop], label, i, len(ranges), tracker)
              for i, r in enumerate(ranges)]  # fmt: skip
    runner = _block_in_prefect if FlowRunContext.get() is not None else _run_block
    results: list[Any] = []
    in_flight = min(BLOCKS_IN_FLIGHT, len(blocks))
    with ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="block") as pool:
        futures = [pool.submit(contextvars.copy_context().run, runner, b) for b in blocks]
        try:
            for future in futures:
                results.extend(future.result())
        except BaseException:
            tracker.failed.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return results
