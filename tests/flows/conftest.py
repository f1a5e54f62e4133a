"""Session fixtures of the flow tests: ONE Prefect API, ONE dask LocalCluster, tiny real-EM stacks.

* ``prefect_api`` - ``prefect_test_harness`` (temporary local API + SQLite), its URL exported as
  ``PREFECT_API_URL`` so the dask worker processes report to it too. No network: analytics off.
* ``dask_address`` - a ``distributed.LocalCluster(n_workers=2, threads_per_worker=1,
  processes=True)`` started once (after the API, so workers inherit its URL).
* ``tiny_stack`` - the demo's deformation on 4 bundled sections cropped to 256 x 256 px (chunks
  64 px, mips 0-2), fold on section 2: ``{"registered", "misaligned", "defects", "true_fields"}``.
* ``tiny_run`` - ``(params, result)`` of one real ``align_stack`` run on ``tiny_stack`` (chunked:
  2 x 2 finetune chunks), shared by the end-to-end, rerun and chunking tests.
* ``tiny_params(root, paths, **overrides)`` - :class:`AlignParams` for those tiny stacks: coarse
  mip 2 (64 px), finetune mip 1 (128 px, 2 x 2 chunks of 64 px + 16 px context), 40 iterations.
"""

from __future__ import annotations

import os

os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from collections.abc import Iterator  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

TINY = {"coarse_mip": 2, "finetune_mip": 1, "chunk_xy": 64, "pad": 16, "num_iter": 40}


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    previous = os.environ.get("PREFECT_API_URL")
    with prefect_test_harness(server_startup_timeout=120):
        url = PREFECT_API_URL.value()
        os.environ["PREFECT_API_URL"] = url
        yield url
    if previous is None:
        os.environ.pop("PREFECT_API_URL", None)
    else:
        os.environ["PREFECT_API_URL"] = previous


@pytest.fixture(scope="session")
def dask_address(prefect_api: str) -> Iterator[str]:
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="session")
def tiny_stack(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from flows.demo import prepare_demo

    root = tmp_path_factory.mktemp("tiny_stack")
    return prepare_demo(root, sections=4, crop=256, fold_section=2, chunk=64, num_mips=3, truth_mip=1)


def tiny_params(output: Any, paths: dict[str, str], **overrides: Any) -> Any:
    """AlignParams for a tiny stack from :func:`flows.demo.prepare_demo` (see the module docstring)."""
    from flows.params import AlignParams

    values: dict[str, Any] = {"source": paths["misaligned"], "defects": paths["defects"],
                              "true_fields": paths["true_fields"], "output": str(output), **TINY}
    values.update(overrides)
    return AlignParams(**values)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_stack: dict[str, str], dask_address: str) -> Any:
    from flows.align_stack import align_stack

    params = tiny_params(tmp_path_factory.mktemp("align") / "run", tiny_stack)
    return params, align_stack(params, dask_address=dask_address)
