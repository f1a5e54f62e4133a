"""``flows.blocks.run_chunks`` in real Prefect flows on the session's dask LocalCluster."""

from __future__ import annotations

import os
import time

import pytest
from prefect import flow

from emcore.errors import SectionflowError
from flows.blocks import (
    GROUP_ENV,
    MAX_CHUNKS_PER_TASK,
    ChunkProgress,
    absolute_path,
    absolute_paths,
    chunks_per_task,
    progress_hook,
    run_chunks,
)
from flows.runtime import stage_task_runner, use_cluster
from tasks.markers import count
from tasks.retry import call_with_retries
from tests.flows import chunkfns


def _task_runs(flow_run_id: str, expected: int) -> list:
    """The task runs of a flow run (the API records them asynchronously: wait until ``expected``)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs: list = []
    for _ in range(50):
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
        if len(runs) >= expected:
            time.sleep(0.5)  # and no more arrive
            with get_client(sync_client=True) as client:
                return client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
                )
        time.sleep(0.2)
    return runs


@flow
def _square_flow(n: int, block_size: int, path: str) -> tuple[str, list]:
    from prefect.runtime import flow_run

    results = run_chunks(
        chunkfns.square, [{"x": x, "path": path} for x in range(n)], "squares", block_size=block_size
    )
    return str(flow_run.id), results


def test_results_in_order_one_prefect_task_per_block(dask_address):
    events: list[ChunkProgress] = []
    with use_cluster(dask_address), progress_hook(events.append):
        run_id, results = _square_flow.with_options(task_runner=stage_task_runner())(
            10, 3, "file://./here"
        )
    assert [r["y"] for r in results] == [x * x for x in range(10)]
    # the relative file:// path reached the workers as an absolute one
    assert {r["path"] for r in results} == {"file://" + os.path.abspath("here")}
    assert len({r["pid"] for r in results}) >= 1
    runs = _task_runs(run_id, 4)
    assert sorted(r.name for r in runs) == ["squares 1/4", "squares 2/4", "squares 3/4", "squares 4/4"]
    assert all(r.state_type.value == "COMPLETED" for r in runs)
    # progress: a start event, then as chunks complete, ending at the total
    assert events[0].done == 0 and events[0].total == 10
    done = [e.done for e in events]
    assert done == sorted(done) and done[-1] == 10 and all(e.total == 10 for e in events)


def test_transient_errors_are_retried_per_chunk(dask_address, tmp_path):
    with use_cluster(dask_address):
        out = run_chunks(chunkfns.flaky, [{"x": x, "flag_dir": str(tmp_path)} for x in range(3)], "flaky")
    assert out == [0, 1, 2]
    assert sorted(os.listdir(tmp_path)) == ["failed-0", "failed-1", "failed-2"]


def test_own_errors_fail_at_once_with_their_message(dask_address, tmp_path):
    with use_cluster(dask_address), pytest.raises(SectionflowError, match="bad input, fix the parameters"):
        run_chunks(chunkfns.broken, [{"x": 0, "calls_dir": str(tmp_path)}], "broken")
    assert len(os.listdir(tmp_path)) == 1  # not retried


def test_markers_make_a_rerun_skip_every_chunk(dask_address, layer_root):
    kwargs = [{"layer": f"{layer_root}/marked", "x": x} for x in range(5)]
    with use_cluster(dask_address):
        first = run_chunks(chunkfns.marked, kwargs, "marked", block_size=2)
        second = run_chunks(chunkfns.marked, kwargs, "marked", block_size=2)
    assert count(first) == {"done": 5, "skipped": 0}
    assert count(second) == {"done": 0, "skipped": 5}


def test_call_with_retries_policy():
    calls = []

    def hiccup(n: int) -> int:
        calls.append(n)
        if len(calls) < 3:
            raise TimeoutError("slow bucket")
        return n

    assert call_with_retries(hiccup, {"n": 7}, delay_s=0) == 7 and len(calls) == 3
    attempts = []

    def down() -> None:
        attempts.append(1)
        raise ConnectionError("bucket unreachable")

    with pytest.raises(ConnectionError):
        call_with_retries(down, {}, retries=2, delay_s=0)
    assert len(attempts) == 3  # the first call + 2 retries, then the error propagates


def test_absolute_paths():
    cwd = os.getcwd()
    assert absolute_path("file://./a/b") == f"file://{cwd}/a/b"
    assert absolute_path("rel/x") == f"file://{cwd}/rel/x"
    assert absolute_path("gs://bucket/x") == "gs://bucket/x"
    shared = {"stats": {1: (0.0, 1.0)}, "name": "rigid"}
    same = absolute_paths(shared)
    assert same is shared  # nothing to resolve: the same object (pickled once for all chunks)
    out = absolute_paths({"layers": {1: "file://x"}, "pairs": [(1, 2)], "mode": "classical"})
    assert out == {"layers": {1: f"file://{cwd}/x"}, "pairs": [(1, 2)], "mode": "classical"}


def test_without_a_current_cluster_a_local_one_is_started_for_the_process():
    from flows import runtime

    try:
        assert [r["y"] for r in run_chunks(chunkfns.square, [{"x": 3}], "alone")] == [9]
        assert runtime._IMPLICIT is not None  # a stage flow run alone (e.g. from a deployment)
    finally:
        runtime._close_clients()


def test_chunks_per_task_rule(monkeypatch):
    monkeypatch.delenv(GROUP_ENV, raising=False)
    assert chunks_per_task(257, 2) == 9  # ceil(257 / (2 threads * 16 tasks each))
    assert chunks_per_task(10_000, 2) == MAX_CHUNKS_PER_TASK
    assert chunks_per_task(5, 4) == 1
    assert chunks_per_task(40, 0) == 3  # an adaptive cluster before its first worker: 1 thread
    monkeypatch.setenv(GROUP_ENV, "3")
    assert chunks_per_task(10_000, 2) == 3
    monkeypatch.setenv(GROUP_ENV, "many")
    with pytest.raises(SectionflowError, match=GROUP_ENV):
        chunks_per_task(10, 2)


def test_chunk_groups_keep_order_progress_retries_and_errors(dask_address, tmp_path, monkeypatch):
    monkeypatch.setenv(GROUP_ENV, "4")  # 10 chunks -> dask tasks of 4, 4 and 2 chunks
    events: list[ChunkProgress] = []
    with use_cluster(dask_address), progress_hook(events.append):
        results = run_chunks(chunkfns.square, [{"x": x} for x in range(10)], "grouped")
        flaky = run_chunks(chunkfns.flaky, [{"x": x, "flag_dir": str(tmp_path)} for x in range(6)], "flaky")
    assert [r["y"] for r in results] == [x * x for x in range(10)]
    done = [e.done for e in events if e.label == "grouped"]
    assert done[0] == 0 and done[-1] == 10 and set(done) <= {0, 2, 4, 6, 8, 10}
    assert flaky == list(range(6))  # each chunk of a group retried on its own
    calls = tmp_path / "calls"
    calls.mkdir()
    kwargs = [{"x": x, "path": ""} for x in range(3)] + [{"x": 3, "calls_dir": str(calls)}]
    with use_cluster(dask_address), pytest.raises(SectionflowError, match="chunk 3: bad input"):
        run_chunks(chunkfns.square_or_broken, kwargs, "mixed")
    assert len(os.listdir(calls)) == 1  # the failing chunk of the group ran once, not retried
