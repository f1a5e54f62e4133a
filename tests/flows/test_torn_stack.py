"""Alignment that tears through every stage (issue 16): a section torn by a fold whose far side slid
along the fold line is aligned on both sides by a real ``align_stack`` run.

The tiny demo stack (4 bundled sections, 256 px, mips 0-2; coarse and finetune at mip 1 = 128 px)
with section 2 also torn at mip 0 by :func:`emcore.synthetic.torn_fold_field` (far side slid
``SLIDE`` px at mip 0), its fold band given as the defects layer, and its true field composed with
the tear's exact inverse. The misalignment of section 2 against section 1 after the run (``|e[2] - e[1]|``,
``e = G - truth``) is measured on the far and the near side of the tear (a band around it left
out), against the same run without the tear. (The absolute ``|G - truth|`` of this tiny stack is
dominated by a drift common to the sections, mostly from the unreliable section 3: ~4.5 px on
section 2 with or without the tear.)
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch
from cloudfiles import CloudFiles
from scipy import ndimage

import flows.demo
from emcore.field import compose
from emcore.geometry import VoxelBox
from emcore.layers import open_layer
from emcore.synthetic import torn_fold_field
from flows.align_stack import align_stack
from flows.demo import prepare_demo
from flows.layout import Layout
from tests.flows.conftest import tiny_params

TORN = 2
SLIDE = 60.0  # px at mip 0: 30 px at the finetune mip
TEAR = {"angle_deg": 30.0, "offset_px": 25.0, "fold_width_px": 6.0}
BORDER = 28  # px at mip 1 left out at the edges (the demo's shift + elastic reach)
BAND = 4  # px at mip 1 left out on either side of the tear


def _torn_deformation(original: Any):
    def deformation(z: int, height: int, width: int, *, fold_section: int | None = None, truth_mip: int = 0):
        applied, truth, mask = original(z, height, width, fold_section=fold_section, truth_mip=truth_mip)
        if z != TORN:
            return applied, truth, mask
        f = 2**truth_mip
        tear, mask, _ = torn_fold_field(height, width, slide_px=SLIDE, **TEAR)
        undo = torn_fold_field(height // f, width // f, angle_deg=TEAR["angle_deg"],
                               offset_px=TEAR["offset_px"] / f, fold_width_px=TEAR["fold_width_px"] / f,
                               slide_px=SLIDE / f)[2]  # fmt: skip
        return compose(tear, applied), compose(truth, undo), mask

    return deformation


def _errors(params: Any, paths: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """``(|e[2] - e[1]|, truth[2])`` at mip 1 with ``e = G - truth``: ``(H, W)`` and ``(2, H, W)`` px.

    The torn section's misalignment against its neighbour below after the run (what a common drift
    of the stack, here mostly the unreliable section 3, does not change).
    """
    final = open_layer(Layout(params.output).final_fields)
    box = final.bounds(1)
    sections = VoxelBox((box.start[0], box.start[1], TORN - 1), (box.stop[0], box.stop[1], TORN + 1))
    t = torch.from_numpy(open_layer(paths["true_fields"]).read(sections, 1))
    e = torch.from_numpy(final.read(sections, 1)) - t
    return (e[1] - e[0]).norm(dim=0).numpy(), t[1].numpy()


def _sides(truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(far, near)`` ``(H, W)`` bool, stack frame: where the torn truth moved by the tear, and not."""
    _, h, w = truth.shape
    plain = flows.demo.deformation(TORN, 2 * h, 2 * w, fold_section=None, truth_mip=1)[1][0].numpy()
    moved = np.linalg.norm(truth - plain, axis=0) > 1.0
    inner = np.zeros((h, w), bool)
    inner[BORDER:-BORDER, BORDER:-BORDER] = True
    far = ndimage.binary_erosion(moved, iterations=BAND) & inner
    near = ndimage.binary_erosion(~moved, iterations=BAND) & inner
    return far, near


def _run(root: Any, dask_address: str, monkeypatch: pytest.MonkeyPatch, torn: bool) -> tuple[dict, Any, dict]:
    with monkeypatch.context() as patch:
        if torn:
            patch.setattr(flows.demo, "deformation", _torn_deformation(flows.demo.deformation))
        paths = prepare_demo(root / "stack", sections=4, crop=256, fold_section=None, chunk=64, num_mips=3,
                             truth_mip=1)  # fmt: skip
    params = tiny_params(root / "run", paths, coarse_mip=1)
    return align_stack(params, dask_address=dask_address), params, paths


def _medians_beside_plain(
    params: Any, paths: dict[str, str], root: Any, dask_address: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[dict[str, float], tuple[int, int]]:
    """Median misalignment (px) of the far and near sides of the run of ``params`` and, under
    ``plain_``, of an untorn run of the same stack (made under ``root``), on the same sides; and
    the sides' sizes ``(far, near)`` px."""
    error, truth = _errors(params, paths)
    far, near = _sides(truth)
    _, plain_params, plain_paths = _run(root, dask_address, monkeypatch, torn=False)
    plain, _ = _errors(plain_params, plain_paths)
    cases = (("far", error, far), ("near", error, near),
             ("plain_far", plain, far), ("plain_near", plain, near))  # fmt: skip
    return {name: float(np.median(e[m])) for name, e, m in cases}, (int(far.sum()), int(near.sum()))


def test_torn_section_aligns_on_both_sides(tmp_path, dask_address, monkeypatch):
    result, params, paths = _run(tmp_path / "torn", dask_address, monkeypatch, torn=True)
    plain_root = tmp_path / "plain"
    got, (far_px, near_px) = _medians_beside_plain(params, paths, plain_root, dask_address, monkeypatch)
    print(f"torn section {TORN} (slide {SLIDE / 2:.0f} px at mip 1), median misalignment vs section "
          f"{TORN - 1} px: "
          + ", ".join(f"{k} {v:.3f}" for k, v in got.items()))
    record = json.loads(CloudFiles(Layout(params.output).fields_root).get("torn.json"))
    assert sorted(record["sections"]) == [str(TORN)], record
    assert result["coarse_align"]["torn"] == [TORN]
    assert far_px > 500 and near_px > 500
    assert got["far"] <= got["plain_far"] + 1.0, got  # the slid side is aligned as if it had not slid
    assert got["near"] <= got["plain_near"] + 0.3, got
