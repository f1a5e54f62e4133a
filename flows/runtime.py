"""Where flows run: the dask cluster behind Prefect's task runner, and the local Prefect API.

* :func:`task_runner` - a ``prefect_dask.DaskTaskRunner`` on an existing cluster (``address``) or
  a new ``distributed.LocalCluster`` sized to the machine: one single-threaded worker process
  per 2 cores... at least 2 workers (2 workers x 1 thread on a 2-core machine), so torch in each
  task uses one thread and peak memory per worker is bounded by one chunk.
* :func:`local_cluster` - a context manager starting that LocalCluster once, so the stage flows of
  one ``align_stack`` run share it instead of each starting their own.
* :func:`ensure_local_api` - when no ``PREFECT_API_URL`` is configured, start Prefect's embedded
  temporary API server once in this process and export its URL, so the dask worker processes
  report to the same API instead of each starting their own. It gives the server
  :func:`startup_timeout` seconds to come up (``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``,
  default 300 here instead of Prefect's 20, which a loaded machine exceeds), its own SQLite
  database in a fresh temporary folder (:func:`run_database_url`; concurrent runs otherwise share
  ``~/.prefect/prefect.db`` and answer ``503``), raises the client's retries of transient API
  errors (``PREFECT_CLIENT_MAX_RETRIES``, default 10 here) for the processes started after it, and
  logs all three.
* :func:`wait_all` - wait for submitted chunk tasks, logging progress, and return their results.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import PrefectFuture, as_completed
from prefect_dask import DaskTaskRunner

__all__ = [
    "DEFAULT_CLIENT_RETRIES",
    "DEFAULT_STARTUP_TIMEOUT_S",
    "default_workers",
    "ensure_local_api",
    "local_cluster",
    "run_database_url",
    "startup_timeout",
    "task_runner",
    "wait_all",
]

_SERVER: Any = None
DEFAULT_STARTUP_TIMEOUT_S = 300
"""Seconds the embedded Prefect API may take to start (Prefect's own default, 20 s, is too short
on a loaded machine); ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` overrides it."""
DEFAULT_CLIENT_RETRIES = 10
"""Prefect client retries of transient API answers (429 / 502 / 503, with backoff) unless
``PREFECT_CLIENT_MAX_RETRIES`` is set (Prefect's default is 5)."""
_DB_VARIABLES = ("PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL")
_log = logging.getLogger("sectionflow.runtime")


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


def startup_timeout() -> int:
    """Seconds to wait for the embedded API: the environment's value, else 300."""
    raw = os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")
    try:
        return max(1, int(float(raw))) if raw else DEFAULT_STARTUP_TIMEOUT_S
    except ValueError:
        raise ValueError(
            f"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS={raw!r} is not a number of seconds"
        ) from None


def run_database_url() -> tuple[str, str | None]:
    """The database of this process's embedded API: ``(url, folder to delete at exit or None)``.

    A database the user configured (``PREFECT_SERVER_DATABASE_CONNECTION_URL`` or
    ``PREFECT_API_DATABASE_CONNECTION_URL``) is kept; otherwise a SQLite file in a new temporary
    folder, so concurrent runs never share (and lock) one database.
    """
    for name in _DB_VARIABLES:
        if os.environ.get(name):
            return os.environ[name], None
    folder = tempfile.mkdtemp(prefix="sectionflow-prefect-")
    return f"sqlite+aiosqlite:///{os.path.join(folder, 'prefect.db')}", folder


def ensure_local_api() -> str | None:
    """Start Prefect's temporary local API once if no ``PREFECT_API_URL`` is set; return the URL.

    See the module docstring for the start-up timeout, the per-run database and the retries.
    """
    global _SERVER
    from prefect.settings import PREFECT_API_URL

    configured = os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()
    if configured:
        return configured
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_CLIENT_MAX_RETRIES", str(DEFAULT_CLIENT_RETRIES))
    from prefect.server.api.server import SubprocessASGIServer

    timeout = startup_timeout()
    url, folder = run_database_url()
    if folder is not None:
        os.environ["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = url  # read by the server subprocess
        import atexit

        atexit.register(shutil.rmtree, folder, True)  # runs after the server's own atexit stop
    _log.warning(
        "sectionflow: starting Prefect's temporary API (start-up timeout %d s: "
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS; database %s; client retries %s: "
        "PREFECT_CLIENT_MAX_RETRIES); set PREFECT_API_URL to use a running Prefect server instead",
        timeout, url.split("///", 1)[-1], os.environ["PREFECT_CLIENT_MAX_RETRIES"],
    )  # fmt: skip
    _SERVER = SubprocessASGIServer()
    _SERVER.start(timeout=timeout)
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
