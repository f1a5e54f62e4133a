"""Real clusters: a ``dask scheduler`` + ``dask worker`` started here (``--dask-address``), and a
cluster class from the config (``cluster:`` section, here ``distributed.LocalCluster``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from emcore.layers import open_layer
from flows.cli import app
from flows.runtime import ClusterConfig, api_and_cluster, cluster
from tests.flows.conftest import TINY

STAGE_SETTINGS = [f"--set={k}={v}" for k, v in TINY.items()]


@pytest.fixture
def external_cluster(tmp_path: Path, prefect_api: str) -> Iterator[tuple[str, Path]]:
    """``dask scheduler`` and one ``dask worker`` (1 thread, 2 GiB) as processes, run from a directory
    of their own (so a relative path would resolve elsewhere there): ``(address, that directory)``."""
    elsewhere = tmp_path / "worker_cwd"
    elsewhere.mkdir()
    info = tmp_path / "scheduler.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    common = ["--scheduler-file", str(info), "--no-dashboard"]
    procs = [subprocess.Popen([sys.executable, "-m", "dask", "scheduler", "--port", "0", *common],
                              cwd=elsewhere, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        for _ in range(600):
            if info.exists() and info.read_text().strip():
                break
            time.sleep(0.1)
        address = json.loads(info.read_text())["address"]
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "dask", "worker", "--nthreads", "1", "--memory-limit", "2GiB",
             "--preload", "tasks.preload", *common],
            cwd=elsewhere, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
        from distributed import Client

        with Client(address, timeout=120) as client:
            client.wait_for_workers(1, timeout=120)
        yield address, elsewhere
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=60)


def test_stage_on_external_scheduler_and_worker_relative_paths(external_cluster, tiny_stack, monkeypatch):
    address, worker_cwd = external_cluster
    root = Path(tiny_stack["misaligned"][len("file://") :]).parent
    monkeypatch.chdir(root)  # the CLI's working directory; the worker's is another one
    result = CliRunner().invoke(app, [
        "normalize", "--source", "file://./misaligned", "--output", "file://./ext_run",
        "--set", "defects=file://./masks/defects", *STAGE_SETTINGS, "--dask-address", address,
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "OK normalize" in result.output
    normalized = open_layer(f"file://{root}/ext_run/normalized")
    assert normalized.read(normalized.bounds(1), 1).any()
    # the worker wrote where the CLI meant, nothing relative to its own directory
    assert not [name for name in os.listdir(worker_cwd) if not name.startswith("dask-")]


def test_cluster_class_from_config(tmp_path, tiny_stack, prefect_api):
    section = {
        "cluster_class": "distributed.LocalCluster",
        "cluster_kwargs": {"n_workers": 1, "threads_per_worker": 1, "processes": True,
                           "dashboard_address": None, "memory_limit": "1GiB"},
        "adapt_kwargs": {"minimum": 1, "maximum": 1},
    }  # fmt: skip
    with cluster(ClusterConfig(**section)) as address:
        from distributed import Client

        with Client(address) as client:
            client.wait_for_workers(1, timeout=120)
            workers = client.scheduler_info()["workers"].values()
            assert [w["memory_limit"] for w in workers] == [2**30]
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "source": tiny_stack["misaligned"], "output": str(tmp_path / "run"), "defects": tiny_stack["defects"],
        **TINY, "cluster": section,
    }))  # fmt: skip
    result = CliRunner().invoke(app, ["normalize", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "OK normalize" in result.output
    assert open_layer(str(tmp_path / "run" / "normalized")).num_mips > 1


def test_bad_cluster_section_is_a_clear_error(tmp_path, tiny_stack):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({"cluster": {"cluster_class": "dask_nowhere.MissingCluster"}}))
    result = CliRunner().invoke(app, ["normalize", "--source", tiny_stack["misaligned"], "--output",
                                      str(tmp_path / "o"), *STAGE_SETTINGS, "--cluster-config", str(cfg)])
    assert result.exit_code == 2
    text = " ".join(result.output.split())  # rich wraps long lines
    assert "cluster.cluster_class: 'dask_nowhere.MissingCluster' cannot be imported" in text
    cfg.write_text(yaml.safe_dump({"cluster": {"cluster_kwargs": {"n_workers": 2}}}))
    result = CliRunner().invoke(app, ["normalize", "--source", tiny_stack["misaligned"], "--output",
                                      str(tmp_path / "o"), *STAGE_SETTINGS, "--cluster-config", str(cfg)])
    assert result.exit_code == 2
    assert "need a cluster_class" in " ".join(result.output.split())


def _chunk_modules_loaded() -> bool:
    return all(name in sys.modules for name in ("torch", "tasks.finetune", "tasks.render"))


def test_api_and_default_cluster_workers_import_the_chunk_modules_at_start(prefect_api):
    from distributed import Client

    with api_and_cluster(None, ClusterConfig(n_workers=1)) as address, Client(address) as client:
        assert os.environ["PREFECT_API_URL"] == prefect_api  # a configured API is kept
        loaded = client.run(_chunk_modules_loaded)  # before any chunk ran there
    assert list(loaded.values()) == [True]


def test_api_and_cluster_passes_a_cluster_error_on(prefect_api):
    bad = ClusterConfig(cluster_class="distributed.LocalCluster", cluster_kwargs={"no_such_option": 1})
    with pytest.raises(Exception, match="no_such_option|Nanny failed to start"), api_and_cluster(None, bad):
        pass
