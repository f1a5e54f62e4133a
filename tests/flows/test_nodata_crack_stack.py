"""An empty (no-data) crack through every stage without any mask (issue 16): the torn section of
``tests/flows/test_torn_stack.py`` with its band emptied (0 = no data) instead of repeated tissue,
aligned by a real ``align_stack`` run with ``defects`` unset and ``detect_defects: none``. No mask
marks the crack, so only the coarse stage's no-data split (:func:`tasks.coarse.section_defects`)
can tear the section; the run must still give it a torn coarse field ``S[z]`` and align its far
side as well as the untorn run does.
"""

from __future__ import annotations

import json

from cloudfiles import CloudFiles

import flows.demo
from emcore.geometry import VoxelBox
from emcore.layers import open_layer
from flows.align_stack import align_stack
from flows.demo import prepare_demo
from flows.layout import Layout
from tests.flows.conftest import tiny_params
from tests.flows.test_torn_stack import TORN, _medians_beside_plain, _torn_deformation


def _empty_crack(paths: dict[str, str]) -> None:
    """Zero the torn section's band (its defects-layer pixels) in the misaligned layer, all mips."""
    image, defects = open_layer(paths["misaligned"]), open_layer(paths["defects"])
    bounds = image.bounds(0)
    section = VoxelBox((bounds.start[0], bounds.start[1], TORN), (bounds.stop[0], bounds.stop[1], TORN + 1))
    data = image.read(section, 0)
    band = defects.read(section, 0) != 0
    assert band.any()
    data[band] = 0
    image.write(section, data, 0)
    image.downsample(section, 0)


def test_empty_crack_without_a_mask_tears(tmp_path, dask_address, monkeypatch):
    root = tmp_path / "empty"
    with monkeypatch.context() as patch:
        patch.setattr(flows.demo, "deformation", _torn_deformation(flows.demo.deformation))
        paths = prepare_demo(root / "stack", sections=4, crop=256, fold_section=None, chunk=64, num_mips=3,
                             truth_mip=1)  # fmt: skip
    _empty_crack(paths)
    params = tiny_params(root / "run", paths, coarse_mip=1, defects=None, detect_defects="none")
    result = align_stack(params, dask_address=dask_address)
    record = json.loads(CloudFiles(Layout(params.output).fields_root).get("torn.json"))
    assert sorted(record["sections"]) == [str(TORN)], record
    assert result["coarse_align"]["torn"] == [TORN]
    got, _ = _medians_beside_plain(params, paths, tmp_path / "plain", dask_address, monkeypatch)
    print("empty crack, no mask: median misalignment vs the section below px:",
          ", ".join(f"{k} {v:.3f}" for k, v in got.items()))  # fmt: skip
    assert got["far"] <= got["plain_far"] + 1.0, got
    assert got["near"] <= got["plain_near"] + 0.3, got
