"""A blank section is reported, kept (fields interpolated) and does not derail its neighbours."""

from __future__ import annotations

from flows.align_stack import align_stack
from flows.demo import prepare_demo
from tests.flows.conftest import tiny_params


def test_blank_section_is_reported_and_neighbours_align(tmp_path, dask_address):
    paths = prepare_demo(tmp_path / "stack", sections=3, crop=256, fold_section=None, blank_section=1,
                         chunk=64, num_mips=3, truth_mip=1)
    # coarse at mip 1 (128 px sections): on this small crop the see-through pair 2 -> 0 needs it
    params = tiny_params(tmp_path / "run", paths, coarse_mip=1)
    result = align_stack(params, dask_address=dask_address)
    assert result["normalize"]["blank"] == [1]
    assert result["solve"]["interpolated"] == [1]
    rows = {r["z"]: r for r in result["report"]["rows"]}
    assert sorted(rows) == [0, 1, 2] and rows[1]["blank"]
    assert "Blank sections" in result["report"]["markdown"]
    for z in (2,):  # section 2 aligns through the blank section 1 (pair 2 -> 0)
        assert rows[z]["residual_after_median"] < 0.5 * rows[z]["residual_before_median"], rows[z]
