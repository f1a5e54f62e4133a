"""emcore.mip_plan: mips from physical units (nm/px, section size)."""

from __future__ import annotations

import pytest

from emcore.mip_plan import choose_mips, plan_warnings


@pytest.mark.parametrize(
    ("resolution", "size", "mips", "expected"),
    [
        (4.6, (1024, 1024), 5, (2, 2)),  # the VNC stack: 18.4 nm/px, 256 px sections: one mip
        (9.2, (512, 512), 4, (1, 1)),  # the same data 2x downsampled: the same physical choice
        (10.0, (520, 520), 4, (1, 1)),  # the medulla: 20 nm/px
        (20.0, (260, 260), 4, (0, 0)),
        (4.0, (250_000, 250_000), 12, (6, 2)),  # a 1 mm section at 4 nm: 256 nm/px coarse, 16 nm/px fine
        (4.0, (4096, 4096), 8, (4, 2)),  # 256 px at 64 nm/px: coarse stops at 256 px per section
    ],
)
def test_choose_mips(resolution, size, mips, expected):
    assert choose_mips(resolution, size, mips) == expected


def test_plan_warnings_name_the_setting():
    assert plan_warnings((4.6, 4.6, 50), (1024, 1024), 2, 2, 2) == []
    warnings = plan_warnings((4.6, 4.6, 80), (1024, 1024), 4, 0, 2)
    text = " ".join(warnings)
    assert "neighbours=2" in text and "finetune_mip 0" in text and "coarse_mip" in text
