"""Where flows run: the dask cluster that computes the chunks, and the local Prefect API.

* :class:`ClusterConfig` - which cluster: an existing scheduler (``address``), or a cluster class
  started for the run (``cluster_class`` + ``cluster_kwargs``, optional adaptive scaling
  ``adapt_kwargs``: dask-jobqueue's ``SLURMCluster``, dask-kubernetes' ``KubeCluster``, ...), or by
  default a ``distributed.LocalCluster`` sized to the machine (one single-threaded worker process
  per 2 cores, at least 2) with a memory limit per worker. The ``cluster:`` section of a config
  file (see ``configs/cluster_*.yaml``) is this model.
* :func:`cluster` - a context manager starting that cluster once (or connecting to ``address``),
  making it the current one for :func:`dask_client` (and so for :func:`flows.blocks.run_chunks`),
  and yielding its scheduler address. :func:`local_cluster` is the same for an address or the
  default LocalCluster.
* :func:`use_cluster` / :func:`dask_client` - the current cluster of this process and a
  (cached, thread-safe) ``distributed.Client`` to it.
* :func:`stage_task_runner` - the Prefect task runner of the stage flows: threads in the flow's
  process (their block tasks only wait for dask futures).
* :func:`worker_memory_limit` - the smallest memory limit of the current cluster's workers (bytes;
  ``None`` without workers or limits), which :func:`flows.plan.check_task_memory` compares with the
  largest task before a run.
* :func:`stage_settings` - the Prefect settings a stage flow runs under: inside a parent flow run
  (``align_stack``) a stage subflow sends no heartbeats of its own. Prefect 3.9 joins a flow's
  heartbeat thread on exit, which waits out the thread's 1 s sleep: measured 1.2 s per subflow with
  heartbeats against 0.2 s without (5 nested no-op subflows), the fixed cost that dominated a rerun.
  The parent's heartbeat still marks the process alive; a stage run on its own (``sectionflow
  normalize ...``) keeps its heartbeat.
* :func:`api_and_cluster` - both of the above started side by side (what the CLI uses).
* :func:`ensure_local_api` - when no ``PREFECT_API_URL`` is configured, start Prefect's embedded
  temporary API server once in this process and export its URL, so the dask worker processes
  report to the same API instead of each starting their own. It gives the server
  :func:`startup_timeout` seconds to come up (``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``,
  default 300 here instead of Prefect's 20, which a loaded machine exceeds), a SQLite database
  that no other running process uses (:func:`run_database_url`: concurrent runs otherwise share
  ``~/.prefect/prefect.db`` and answer ``503``), raises the client's retries of transient API
  errors (``PREFECT_CLIENT_MAX_RETRIES``, default 10 here) for the processes started after it, and
  logs all three.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

from prefect.context import FlowRunContext, SettingsContext, get_settings_context
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from emcore.errors import SectionflowError

__all__ = [
    "DATABASE_CACHE_ENV",
    "DEFAULT_CLIENT_RETRIES",
    "DEFAULT_STARTUP_TIMEOUT_S",
    "ClusterConfig",
    "cluster",
    "dask_client",
    "default_workers",
    "api_and_cluster",
    "ensure_local_api",
    "local_cluster",
    "run_database_url",
    "stage_settings",
    "stage_task_runner",
    "startup_timeout",
    "use_cluster",
    "worker_memory_limit",
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


class ClusterError(SectionflowError):
    """A cluster that cannot be started (unknown class, bad kwargs)."""


def default_workers() -> int:
    """Worker processes for a LocalCluster: ``max(2, cpu_count // 2)``, one thread each."""
    return max(2, (os.cpu_count() or 2) // 2)


def _import_class(name: str) -> Callable[..., Any]:
    """The class named ``pkg.module.Class``; ``ValueError`` saying what to install if it is missing."""
    module, _, attr = name.rpartition(".")
    if not module:
        raise ValueError(f"{name!r}: give a qualified name such as distributed.LocalCluster")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        pip = {"dask_jobqueue": "dask-jobqueue", "dask_kubernetes": "dask-kubernetes"}
        hint = pip.get(module.split(".")[0])
        extra = f" (pip install {hint})" if hint else ""
        raise ValueError(f"{name!r} cannot be imported: {exc}{extra}") from None


class ClusterConfig(BaseModel):
    """The dask cluster of a run (the ``cluster:`` section of a config file).

    Exactly one of: ``address`` (an existing scheduler, e.g. ``tcp://scheduler:8786``; its workers'
    memory limits are set where they are started: ``dask worker --memory-limit 8GiB``), or
    ``cluster_class`` (a qualified class name such as ``dask_jobqueue.SLURMCluster``, instantiated
    with ``cluster_kwargs``, then ``cluster.adapt(**adapt_kwargs)`` if given), or neither: a
    ``distributed.LocalCluster`` of ``n_workers`` single-threaded processes with ``memory_limit``
    each (dask spills at 60 %, pauses a worker at 80 % and restarts it at 95 % of it).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str | None = Field(None, description="scheduler address of an existing dask cluster")
    cluster_class: str | None = Field(
        None, description="qualified cluster class, e.g. dask_jobqueue.SLURMCluster, distributed.LocalCluster"
    )
    cluster_kwargs: dict[str, Any] = Field(default_factory=dict, description="kwargs of cluster_class")
    adapt_kwargs: dict[str, Any] | None = Field(
        None, description="adaptive scaling: cluster.adapt(**adapt_kwargs), e.g. {minimum: 1, maximum: 20}"
    )
    n_workers: int | None = Field(None, gt=0, description="default LocalCluster: worker processes")
    memory_limit: str | float | int = Field(
        "auto", description="default LocalCluster: memory limit per worker ('auto' = RAM / n_workers, '4GiB')"
    )

    @field_validator("cluster_class")
    @classmethod
    def _importable(cls, name: str | None) -> str | None:
        if name is not None:
            _import_class(name)  # fail before anything starts, with what to install
        return name

    @model_validator(mode="after")
    def _one_kind(self) -> ClusterConfig:
        if self.address and self.cluster_class:
            raise ValueError("cluster: give either address (an existing scheduler) or cluster_class")
        if (self.cluster_kwargs or self.adapt_kwargs) and not self.cluster_class:
            raise ValueError("cluster: cluster_kwargs / adapt_kwargs need a cluster_class")
        return self


def _cluster_kwargs(n_workers: int | None, memory_limit: str | float | int = "auto") -> dict[str, Any]:
    return {
        "n_workers": n_workers or default_workers(),
        "threads_per_worker": 1,
        "processes": True,
        "dashboard_address": None,
        "memory_limit": memory_limit,
        "preload": ["tasks.preload"],  # the chunk modules, imported as the workers start
    }




# -- the current cluster of this process ------------------------------------------------------------
_LOCK = threading.Lock()
_CURRENT: list[str] = []
_CLIENTS: dict[str, Any] = {}
_IMPLICIT: Any = None


@contextlib.contextmanager
def use_cluster(address: str) -> Iterator[str]:
    """Make the scheduler at ``address`` this process's current cluster for the block."""
    with _LOCK:
        _CURRENT.append(address)
    try:
        yield address
    finally:
        with _LOCK:
            _CURRENT.remove(address)


def _forget_client(address: str) -> None:
    """Close the cached client of a cluster that is going away (before it goes)."""
    with _LOCK:
        client = _CLIENTS.pop(address, None)
    if client is not None:
        with contextlib.suppress(Exception):
            client.close()


def _close_clients() -> None:
    global _IMPLICIT
    for client in list(_CLIENTS.values()):
        with contextlib.suppress(Exception):
            client.close()
    _CLIENTS.clear()
    if _IMPLICIT is not None:
        with contextlib.suppress(Exception):
            _IMPLICIT.close()
        _IMPLICIT = None


def dask_client() -> Any:
    """A ``distributed.Client`` to the current cluster (:func:`use_cluster`), cached per address.

    Without a current cluster: inside a dask task, its worker's client; else a LocalCluster started
    once for this process (a stage flow run alone, e.g. from a deployment), closed at exit.
    """
    global _IMPLICIT
    import distributed

    with _LOCK:
        address = _CURRENT[-1] if _CURRENT else None
        if address is None:
            try:
                distributed.get_worker()  # inside a dask task: its worker's client
                return distributed.get_client()
            except ValueError:
                pass
            if _IMPLICIT is None:
                os.environ.setdefault("OMP_NUM_THREADS", "1")
                _IMPLICIT = distributed.LocalCluster(**_cluster_kwargs(None))
                atexit.register(_close_clients)
            address = _IMPLICIT.scheduler_address
        client = _CLIENTS.get(address)
        if client is None or client.status in ("closed", "closing"):
            client = distributed.Client(address, set_as_default=False)
            _CLIENTS[address] = client
            if len(_CLIENTS) == 1 and _IMPLICIT is None:
                atexit.register(_close_clients)
        return client


@contextlib.contextmanager
def cluster(config: ClusterConfig | str | None = None) -> Iterator[str]:
    """Start (or connect to) the cluster of ``config`` for the block; yield its scheduler address.

    ``config`` may be a :class:`ClusterConfig`, an address string, or ``None`` (default
    LocalCluster). The cluster is the current one (:func:`dask_client`) inside the block and is
    closed at its end if it was started here.
    """
    if config is None or isinstance(config, str):
        config = ClusterConfig(address=config or None)
    if config.address:
        with use_cluster(config.address):
            yield config.address
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if config.cluster_class:
        cls = _import_class(config.cluster_class)
        try:
            started = cls(**config.cluster_kwargs)
        except TypeError as exc:
            raise ClusterError(f"cluster.cluster_kwargs do not fit {config.cluster_class}: {exc}") from None
    else:
        from distributed import LocalCluster

        started = LocalCluster(**_cluster_kwargs(config.n_workers, config.memory_limit))
    with started:
        if config.adapt_kwargs:
            started.adapt(**config.adapt_kwargs)
        try:
            with use_cluster(started.scheduler_address) as address:
                yield address
        finally:
            _forget_client(started.scheduler_address)


@contextlib.contextmanager
def api_and_cluster(output: str | None, config: ClusterConfig | str | None = None) -> Iterator[str]:
    """:func:`ensure_local_api` (``output``: see there) and :func:`cluster` (``config``) started side by
    side; yields the scheduler address once both are up.

    Both mostly wait for subprocesses (the API's server; the dask workers, which import the chunk
    modules as they start: ``tasks.preload``), so a command that needs both pays about the longer
    of the two instead of their sum. An error of either propagates after the other has finished
    starting (and the cluster has closed).
    """
    from concurrent.futures import ThreadPoolExecutor

    # leaving the pool waits for the API thread, also when the cluster failed to start
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefect-api") as pool:
        api = pool.submit(ensure_local_api, output)
        with cluster(config) as address:
            api.result()
            yield address


@contextlib.contextmanager
def local_cluster(address: str | None = None, n_workers: int | None = None) -> Iterator[str]:
    """:func:`cluster` on ``address`` if given, else on a default LocalCluster of ``n_workers``."""
    with cluster(ClusterConfig(address=address, n_workers=n_workers)) as addr:
        yield addr


def stage_task_runner() -> Any:
    """The task runner of a stage flow (see the module docstring): its block tasks reach the
    cluster through :func:`dask_client`."""
    return ThreadPoolTaskRunner(max_workers=8)


def worker_memory_limit() -> int | None:
    """The smallest ``memory_limit`` of the current cluster's workers in bytes (``None``: no workers
    yet, e.g. an adaptive cluster at zero, or no limits)."""
    workers = dask_client().scheduler_info().get("workers", {})
    limits = [int(w.get("memory_limit") or 0) for w in workers.values()]
    limits = [limit for limit in limits if limit > 0]
    return min(limits) if limits else None


@contextlib.contextmanager
def stage_settings() -> Iterator[None]:
    """Run a stage flow under these settings (module docstring): no own heartbeat inside a parent
    flow run, Prefect's settings unchanged otherwise."""
    if FlowRunContext.get() is None:
        yield
        return
    # A model copy, not ``prefect.settings.temporary_settings``: that one re-reads the environment
    # and re-validates every setting (measured 0.16 s per call).
    context = get_settings_context()
    settings = context.settings
    flows_settings = settings.flows.model_copy(update={"heartbeat_frequency": None})
    quiet = settings.model_copy(update={"flows": flows_settings})
    with SettingsContext(profile=context.profile, settings=quiet):
        yield


def startup_timeout() -> int:
    """Seconds to wait for the embedded API: the environment's value, else 300."""
    raw = os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")
    try:
        return max(1, int(float(raw))) if raw else DEFAULT_STARTUP_TIMEOUT_S
    except ValueError:
        raise ValueError(
            f"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS={raw!r} is not a number of seconds"
        ) from None


DATABASE_CACHE_ENV = "SECTIONFLOW_CACHE"
"""Folder of the per-output Prefect databases (default ``$XDG_CACHE_HOME/sectionflow`` or
``~/.cache/sectionflow``)."""
_HELD_DATABASES: dict[str, Any] = {}  # folder -> open, flock-ed lock file (held until exit)


def _database_cache() -> str:
    root = os.environ.get(DATABASE_CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sectionflow"
    )
    return os.path.join(root, "prefect")


def _hold(folder: str) -> bool:
    """Lock ``folder`` for this process (an exclusive ``flock`` kept until exit); False if another
    process holds it or it cannot be created."""
    import fcntl

    if folder in _HELD_DATABASES:
        return True
    try:
        os.makedirs(folder, exist_ok=True)
        handle = open(os.path.join(folder, "in-use.lock"), "a")  # noqa: SIM115 - held until exit
    except OSError:  # an unwritable cache: the caller falls back to a temporary database
        return False
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return False
    _HELD_DATABASES[folder] = handle
    return True


def run_database_url(output: str | None = None) -> tuple[str, str | None]:
    """The database of this process's embedded API: ``(url, folder to delete at exit or None)``.

    A database the user configured (``PREFECT_SERVER_DATABASE_CONNECTION_URL`` or
    ``PREFECT_API_DATABASE_CONNECTION_URL``) is kept. For a run into ``output``, a SQLite file kept
    for that output (``<cache>/<hash of the output path>/prefect.db``, :data:`DATABASE_CACHE_ENV`),
    locked for this process: the output's run history stays between runs, and a rerun's API starts
    without creating the database (measured 7.8 s against 16.9 s for a new one). When another
    process holds it, or without ``output``, a new temporary folder, deleted at exit. So no two
    running processes ever share (and lock) one database.
    """
    import hashlib

    from flows.blocks import absolute_path

    for name in _DB_VARIABLES:
        if os.environ.get(name):
            return os.environ[name], None
    if output is not None:
        key = hashlib.sha256(absolute_path(output).encode()).hexdigest()[:16]
        folder = os.path.join(_database_cache(), key)
        if _hold(folder):
            return f"sqlite+aiosqlite:///{os.path.join(folder, 'prefect.db')}", None
    folder = tempfile.mkdtemp(prefix="sectionflow-prefect-")
    return f"sqlite+aiosqlite:///{os.path.join(folder, 'prefect.db')}", folder


def ensure_local_api(output: str | None = None) -> str | None:
    """Start Prefect's temporary local API once if no ``PREFECT_API_URL`` is set; return the URL.

    ``output``: the run's output path, whose kept database the API uses when no other process
    holds it (:func:`run_database_url`). See the module docstring for the start-up timeout and the
    retries.
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
    url, folder = run_database_url(output)
    os.environ["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = url  # read by the server subprocess
    if folder is not None:
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
