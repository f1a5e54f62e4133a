"""The embedded Prefect API gets the start-up time it needs and a database of its own (issue 14)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from prefect import flow

from flows.runtime import DEFAULT_STARTUP_TIMEOUT_S, run_database_url, startup_timeout


def test_startup_timeout_is_generous_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", raising=False)
    assert startup_timeout() == DEFAULT_STARTUP_TIMEOUT_S >= 120  # Prefect's own default is 20 s
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "45")
    assert startup_timeout() == 45
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "soon")
    with pytest.raises(ValueError, match="PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS='soon'"):
        startup_timeout()


def test_each_run_gets_its_own_database_unless_one_is_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL"):
        monkeypatch.delenv(name, raising=False)
    (a, folder_a), (b, folder_b) = run_database_url(), run_database_url()
    try:
        assert a != b and folder_a != folder_b and a.endswith("/prefect.db") and folder_a in a
    finally:
        for folder in (folder_a, folder_b):
            os.rmdir(folder)
    monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", "sqlite+aiosqlite:////somewhere/mine.db")
    assert run_database_url() == ("sqlite+aiosqlite:////somewhere/mine.db", None)


_START = textwrap.dedent(
    """
    import os, httpx
    from flows.runtime import ensure_local_api
    url = ensure_local_api()
    print("HEALTH", httpx.get(url + "/health").status_code)
    print("DB", os.environ["PREFECT_SERVER_DATABASE_CONNECTION_URL"].split("///", 1)[1])
    """
)


def test_embedded_api_starts_with_its_own_database_and_says_so(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-c", _START], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "HEALTH 200" in proc.stdout
    db = proc.stdout.split("DB ", 1)[1].split()[0]
    assert not db.startswith(str(tmp_path / "home"))  # not the shared ~/.prefect/prefect.db
    assert not os.path.exists(os.path.dirname(db))  # the run's database is removed at exit
    assert f"start-up timeout {DEFAULT_STARTUP_TIMEOUT_S} s" in proc.stderr
    assert not (tmp_path / "home" / "prefect.db").exists()


# -- stage subflows: no heartbeat thread of their own inside align_stack ---------------------------
@flow(name="heartbeat_probe")
def _heartbeat_probe(params: object) -> dict[str, object]:
    from prefect.settings import get_current_settings

    return {"heartbeat": get_current_settings().flows.heartbeat_frequency, "done": 0, "skipped": 0}


@flow(name="heartbeat_parent")
def _heartbeat_parent(params: object, address: str) -> tuple[object, object]:
    from prefect.settings import get_current_settings

    from flows.align_stack import run_stage

    own = get_current_settings().flows.heartbeat_frequency
    return own, run_stage(_heartbeat_probe, params, address)["heartbeat"]


def test_stage_subflows_skip_heartbeats_but_top_level_runs_keep_them(
    tmp_path: Path, dask_address: str
) -> None:
    """Prefect joins a flow's heartbeat thread on exit (up to 1 s per subflow); the parent's heartbeat
    already marks the process alive, so a stage subflow runs without one, a stage run alone keeps it."""
    from flows.align_stack import run_stage

    params = SimpleNamespace(output=str(tmp_path / "out"))
    parent_own, stage_inside = _heartbeat_parent(params, dask_address)
    assert parent_own is not None and stage_inside is None
    assert run_stage(_heartbeat_probe, params, dask_address)["heartbeat"] == parent_own


def test_a_run_keeps_its_output_database_unless_another_process_holds_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reruns into one output reuse its migrated database (the API starts faster); two running
    processes never share one: the second gets a temporary database."""
    for name in ("PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SECTIONFLOW_CACHE", str(tmp_path / "cache"))
    out = str(tmp_path / "out")
    first, kept = run_database_url(out)
    assert kept is None and first.startswith(f"sqlite+aiosqlite:///{tmp_path / 'cache'}")
    assert run_database_url("file://" + out) == (first, None)  # the same output, spelled otherwise
    other, _ = run_database_url(str(tmp_path / "elsewhere"))
    assert other != first
    probe = (
        "from flows.runtime import run_database_url; import shutil; url, folder = run_database_url("
        f"{out!r}); print(url); shutil.rmtree(folder)"
    )
    env = dict(os.environ, SECTIONFLOW_CACHE=str(tmp_path / "cache"))
    answer = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env,
                            check=True)  # fmt: skip
    url = answer.stdout.strip().splitlines()[-1]
    assert url != first and "sectionflow-prefect-" in url  # held by this process: a temporary one


def test_an_unwritable_cache_falls_back_to_a_temporary_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "a_file").write_text("not a folder")
    monkeypatch.setenv("SECTIONFLOW_CACHE", str(tmp_path / "a_file" / "cache"))
    url, folder = run_database_url(str(tmp_path / "out"))
    try:
        assert folder is not None and folder in url
    finally:
        os.rmdir(folder)
