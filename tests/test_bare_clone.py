"""A bare clone (no ``../shared`` beside it) runs the tests: the mip-2 copies in data/ stand in."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from emcore.bundled import REDUCED_MIP2_DIR, shared_data_dir
from emcore.models.em_data import DATASETS, load_stack


def test_every_section_ships_at_mip_2() -> None:
    for info in DATASETS.values():
        files = sorted((REDUCED_MIP2_DIR / info.folder).glob("*.png"))
        assert [f.name for f in files] == [f"{i:02d}.png" for i in range(info.count)]


def test_load_stack_without_shared_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SECTIONFLOW_SHARED_DATA", str(tmp_path))
    stack = load_stack("vnc", 3, [16, 17])
    assert stack.shape == (2, 1, 128, 128) and (stack != 0).all()
    assert load_stack("medulla", 4, [0]).shape == (1, 1, 33, 33)
    with pytest.raises(FileNotFoundError, match="SECTIONFLOW_SHARED_DATA"):
        load_stack("vnc", 1, [0])  # below mip 2 only the full sections will do


@pytest.mark.skipif(not (shared_data_dir() / "drosophila_vnc_stack1").is_dir(), reason="no shared data")
def test_shipped_copies_equal_the_full_sections(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    full = {name: load_stack(name, 3, [0, 17]) for name in DATASETS}
    monkeypatch.setenv("SECTIONFLOW_SHARED_DATA", str(tmp_path))
    for name in DATASETS:
        assert torch.equal(load_stack(name, 3, [0, 17]), full[name]), name
