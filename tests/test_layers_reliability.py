"""Layers under bad storage: corrupt chunks are named, a kill inside a write leaves no torn chunk."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from emcore.errors import CorruptChunkError, SectionflowError, StorageIOError
from emcore.geometry import VoxelBox
from emcore.layers import STAGING_DIR, create_layer, open_layer
from tasks.retry import is_transient

BOX = VoxelBox((0, 0, 0), (128, 128, 2))


def _layer(root: str, data: np.ndarray):
    layer = create_layer(f"{root}/img", kind="image", resolution=(4, 4, 40), size=(128, 128, 2),
                         chunk_size=(64, 64, 1))
    layer.write(BOX, data)
    return layer


def _chunk_files(layer) -> list[str]:
    return sorted(glob.glob(os.path.join(layer.path[len("file://"):], "4_4_40", "*")))


@pytest.mark.parametrize("damage", ["cut in half", "zero bytes"])
def test_corrupt_chunk_names_the_file_and_the_layer(layer_root: str, damage: str) -> None:
    data = np.random.default_rng(0).integers(1, 255, (2, 1, 128, 128), dtype=np.uint8)
    layer = _layer(layer_root, data)
    victim = next(f for f in _chunk_files(layer) if os.path.basename(f).startswith("64-128_0-64_1-2"))
    with open(victim, "rb") as fh:
        raw = fh.read()
    with open(victim, "wb") as fh:
        fh.write(raw[: len(raw) // 2] if damage == "cut in half" else b"")
    with pytest.raises(CorruptChunkError) as err:
        open_layer(layer.path).read(BOX)
    message = str(err.value)
    assert f"corrupt chunk file://{victim} of layer {layer.path}" in message
    assert "re-import" in message and "delete" in message
    assert not is_transient(err.value) and isinstance(err.value, SectionflowError)
    # the other chunks are intact and still read
    good = VoxelBox((0, 0, 0), (64, 128, 2))
    np.testing.assert_array_equal(open_layer(layer.path).read(good), data[..., :, :64])


def test_storage_oserror_is_named_and_transient(layer_root: str) -> None:
    layer = _layer(layer_root, np.ones((2, 1, 128, 128), np.uint8))
    folder = os.path.join(layer.path[len("file://"):], "4_4_40")
    for name in os.listdir(folder):
        os.remove(os.path.join(folder, name))
    os.rmdir(folder)
    open(folder, "w").close()  # a file where the scale folder should be: the write cannot land
    with pytest.raises(StorageIOError, match=f"writing .* of layer {layer.path} failed") as err:
        layer.write(BOX, np.full((2, 1, 128, 128), 2, np.uint8))
    assert is_transient(err.value)
    assert not glob.glob(os.path.join(layer.path[len("file://"):], STAGING_DIR, "*"))  # cleaned up


_KILL_INSIDE_WRITE = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    import cloudfiles.interfaces as interfaces
    from emcore.geometry import VoxelBox
    from emcore.layers import open_layer

    real_open = open

    class TornFile:
        def __init__(self, fh):
            self.fh = fh
        def write(self, data):
            self.fh.write(bytes(data)[: len(data) // 2])
            self.fh.flush()
            os.fsync(self.fh.fileno())
            os.kill(os.getpid(), signal.SIGKILL)  # killed inside the write: half the bytes are out
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            self.fh.close()

    def killing_open(path, mode="r", *args, **kwargs):
        fh = real_open(path, mode, *args, **kwargs)
        return TornFile(fh) if "w" in mode and "64-128_0-64_1-2" in str(path) else fh

    interfaces.open = killing_open
    layer = open_layer(sys.argv[1])
    layer.write(VoxelBox((0, 0, 0), (128, 128, 2)), np.full((2, 1, 128, 128), 7, np.uint8))
    """
)


def test_a_kill_inside_a_chunk_write_leaves_no_torn_chunk(layer_root: str, tmp_path) -> None:
    first = np.random.default_rng(1).integers(1, 255, (2, 1, 128, 128), dtype=np.uint8)
    layer = _layer(layer_root, first)
    script = tmp_path / "kill_inside_write.py"
    script.write_text(_KILL_INSIDE_WRITE)
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, str(script), layer.path], env=env, capture_output=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    after = open_layer(layer.path).read(BOX)  # no CorruptChunkError: every chunk file is whole
    for z in range(2):
        for ys in (slice(0, 64), slice(64, 128)):
            for xs in (slice(0, 64), slice(64, 128)):
                chunk = after[z, 0, ys, xs]
                assert (chunk == 7).all() or np.array_equal(chunk, first[z, 0, ys, xs])
    # the torn chunk kept its previous content; the half-written bytes stayed in staging
    np.testing.assert_array_equal(after[1, 0, :64, 64:], first[1, 0, :64, 64:])
    assert glob.glob(os.path.join(layer.path[len("file://"):], STAGING_DIR, "*"))
    # the next write of that box works and cleans only its own staging folder
    layer.write(BOX, np.full((2, 1, 128, 128), 9, np.uint8))
    assert (open_layer(layer.path).read(BOX) == 9).all()
