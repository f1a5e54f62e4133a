"""Storage faults: transient ones are retried to the identical output; a permanent one stops the
stage with a clear error and keeps the finished chunks for the rerun (issue 14)."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
from prefect.task_runners import ThreadPoolTaskRunner

from emcore.errors import StorageIOError
from emcore.layers import open_layer
from flows.layout import Layout
from flows.runtime import use_cluster
from flows.stages import normalize_flow
from tests.faults import StorageFaults
from tests.flows.conftest import tiny_params


@pytest.fixture(scope="module")
def in_process_cluster(prefect_api):
    """A real dask cluster whose workers are threads of this process, so the fault injection
    (a patch of this process's storage calls) reaches the chunk functions."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        yield cluster.scheduler_address


_CLUSTER: list[str] = []


@pytest.fixture(autouse=True)
def _cluster(in_process_cluster):
    _CLUSTER[:] = [in_process_cluster]
    yield


def _normalize(params):
    with use_cluster(_CLUSTER[0]):
        return normalize_flow.with_options(task_runner=ThreadPoolTaskRunner(max_workers=2))(params)


def _all_mips(path: str) -> list[np.ndarray]:
    layer = open_layer(path)
    return [layer.read(layer.bounds(m), m) for m in range(layer.num_mips)]


def _markers(path: str) -> int:
    return len(glob.glob(os.path.join(path[len("file://"):], ".sectionflow", "done", "normalize", "*.json")))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_stack, in_process_cluster):
    _CLUSTER[:] = [in_process_cluster]
    params = tiny_params(tmp_path_factory.mktemp("ref") / "run", tiny_stack)
    _normalize(params)
    return _all_mips(Layout(params.output).normalized)


def test_transient_faults_are_retried_to_the_identical_output(tmp_path, tiny_stack, reference):
    params = tiny_params(tmp_path / "run", tiny_stack)
    with StorageFaults(str(tmp_path), fraction=0.15) as faults:
        summary = _normalize(params)
    print("injected faults:", dict(faults.injected))
    assert faults.injected["read"] >= 3 and faults.injected["write"] >= 3, faults.injected
    assert summary["skipped"] == 0
    for mip, (got, want) in enumerate(zip(_all_mips(Layout(params.output).normalized), reference,
                                          strict=True)):
        np.testing.assert_array_equal(got, want, err_msg=f"mip {mip}")


def test_permanent_fault_stops_clearly_and_the_rerun_keeps_finished_chunks(tmp_path, tiny_stack, reference):
    params = tiny_params(tmp_path / "run", tiny_stack)
    normalized = Layout(params.output).normalized
    mip = params.finetune_mip
    key = open_layer(params.source).info["scales"][mip]["key"]
    victim = f"{key}/64-128_64-128_2-3"  # one normalize chunk at the finetune mip
    with StorageFaults(str(tmp_path), permanent=(victim,)) as faults, pytest.raises(StorageIOError) as err:
        _normalize(params)
    assert faults.injected["permanent"] == 3  # the first attempt and 2 retries
    assert f"of layer {normalized} failed: injected permanent storage fault" in str(err.value)
    total = 2 * 2 * open_layer(normalized).size(mip)[2]
    assert _markers(normalized) == total - 1  # every other chunk finished and is kept
    summary = _normalize(params)  # the storage is back: only the missing chunk is computed
    assert summary["skipped"] == total - 1
    for got, want in zip(_all_mips(normalized), reference, strict=True):
        np.testing.assert_array_equal(got, want)
