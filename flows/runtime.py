"""Where flows run: the dask cluster behind Prefect's task runner, and the local Prefect API.

* :func:`task_runner` - a ``prefect_dask.DaskTaskRunner`` on an existing cluster (``address``) or
  a new ``distributed.LocalCluster`` sized to the machine: one single-threaded worker process
  per 2 cores... at least 2 workers (2 workers x 1 thread on a 2-core machine), so torch in each
  task uses one thread and peak memory per worker is bounded by one chunk.
* :func:`local_cluster` - a context manager starting that LocalCluster once, so the stage flows of
  one ``align_stack`` run share it instead of each starting their own.
* :func:`ensure_local_api` - when no ``PREFECT_API_URL`` is configured, start Prefect's embedded
  temporary API server once in this process and export its URL, so the dask worker processes
  report to the same API instead of each starting their own.
* :func:`wait_all` - wait for submitted chunk tasks, logging progress, and return their results.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import PrefectFuture, as_completed
from prefect_dask import DaskTaskRunner

__all__ = ["default_workers", "ensure_local_api", "local_cluster", "task_runner", "wait_all"]

_SERVER: Any = None


def default_workers() -> int:
    """Worker processes for a LocalCluster: ``max(2, cpu_count // 2)``, one thread each."""
    return max(2, (os.cpu_count() or 2) // 2)


def _cluster_kwargs(n_workers: int | None) -> dict[str, Any]:
    return {
        "n_workers": n_workers or default_workers(),
        "threads_per_worker": 1,
        "processes": True,
        "dashboard_address": None,
    }


def task_runner(address: str | None = None, n_workers: int | None = None) -> DaskTaskRunner:
    """A DaskTaskRunner on ``address`` or on a new LocalCluster (see the module docstring)."""
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=_cluster_kwargs(n_workers))


@contextlib.contextmanager
def local_cluster(address: str | None = None, n_workers: int | None = None) -> Iterator[str]:
    """Yield ``address`` if given, else start a LocalCluster for the block and yield its address."""
    if address:
        yield address
        return
    from distributed import LocalCluster

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with LocalCluster(**_cluster_kwargs(n_workers)) as cluster:
        yield cluster.scheduler_address


def ensure_local_api() -> str | None:
    """Start Prefect's temporary local API once if no ``PREFECT_API_URL`` is set; return the URL."""
    global _SERVER
    from prefect.settings import PREFECT_API_URL

    configured = os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()
    if configured:
        return configured
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    from prefect.server.api.server import SubprocessASGIServer

    _SERVER = SubprocessASGIServer()
    _SERVER.start()
    os.environ["PREFECT_API_URL"] = _SERVER.api_url
    return _SERVER.api_url


def wait_all(futures: Sequence[PrefectFuture], stage: str) -> list[Any]:
    """Results of ``futures`` (in submission order), reporting progress every ~10% as they finish.

    Progress goes to the run's log and to a Prefect progress artifact (percent of chunks finished,
    shown on the flow run's page in the UI).
    """
    logger = get_run_logger()
    total = len(futures)
    step = max(1, total // 10)
    artifact = create_progress_artifact(0.0, description=f"{stage}: chunks finished") if total else None
    for i, _ in enumerate(as_completed(list(futures)), start=1):
        if i % step == 0 or i == total:
            logger.info("%s: %d/%d chunks finished", stage, i, total)
            if artifact is not None:
                update_progress_artifact(artifact, 100.0 * i / total)
    return [f.result() for f in futures]
