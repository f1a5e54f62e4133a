"""One run per output: a second run into a locked output refuses with a clear message (issue 14)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from emcore.errors import OutputLockedError
from flows.align_stack import run_stage
from flows.layout import Layout
from flows.lock import lock_path, output_lock
from flows.stages import normalize_flow
from tests.flows.conftest import tiny_params

_HOLD = textwrap.dedent(
    """
    import sys, time
    from flows.lock import output_lock
    with output_lock(sys.argv[1]):
        print("LOCKED", flush=True)
        time.sleep(600)
    """
)


@pytest.fixture
def other_run(tmp_path):
    """A second process holding the lock of ``tmp_path / "run"`` until it is killed."""
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path / "run")], env=env,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "LOCKED"
    yield proc
    proc.kill()
    proc.wait()


def test_second_run_into_a_locked_output_refuses(tmp_path, tiny_stack, dask_address, other_run):
    params = tiny_params(tmp_path / "run", tiny_stack)
    with pytest.raises(OutputLockedError, match=rf"output file://{tmp_path}/run is in use by another "
                                                rf"sectionflow run \(pid {other_run.pid} on "):
        run_stage(normalize_flow, params, dask_address)
    assert not os.path.exists(Layout(params.output).normalized[len("file://"):])  # nothing written
    other_run.kill()  # however the holder ends (here SIGKILL), its lock goes with it
    other_run.wait()
    with output_lock(params.output):
        pass


def test_lock_is_reentrant_in_one_process_and_released(tmp_path):
    out = str(tmp_path / "run")
    with output_lock(out), output_lock(out):
        assert os.path.getsize(lock_path(out)) > 0  # holder recorded for the message
    assert os.path.getsize(lock_path(out)) == 0
    assert lock_path("gs://bucket/run") is None  # object stores: not locked (see flows.lock)


def test_cli_says_the_output_is_in_use(tmp_path, tiny_stack, dask_address, other_run):
    from typer.testing import CliRunner

    from flows.cli import app

    args = ["align-stack", "--source", tiny_stack["misaligned"], "--output", str(tmp_path / "run"),
            "--dask-address", dask_address]
    for name, value in (("coarse_mip", 2), ("finetune_mip", 1), ("chunk_xy", 64), ("pad", 16)):
        args += ["--set", f"{name}={value}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "is in use by another sectionflow run" in " ".join(result.output.split())
