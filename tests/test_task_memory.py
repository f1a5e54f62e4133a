"""Task memory estimates (emcore.task_memory): they cover the measured peaks and grow as stated."""

from __future__ import annotations

import pytest

from emcore.task_memory import coarse_task_bytes, finetune_task_bytes, solve_task_bytes

MIB = 2**20


def test_estimates_sit_above_the_measured_peaks() -> None:
    # the largest peaks benchmarks/bench_memory.py measured (module docstring), 2026-12-01
    assert coarse_task_bytes(1024, 1024) >= 864 * MIB
    assert coarse_task_bytes(512, 512) >= 278 * MIB
    assert finetune_task_bytes(768) >= 111 * MIB
    assert solve_task_bytes(384, 8, 2) >= 76 * MIB and solve_task_bytes(192, 8, 2) >= 24 * MIB


def test_estimates_grow_with_the_pixels_held() -> None:
    assert coarse_task_bytes(4096, 4096) > 12 * 2**30  # why MAX_COARSE_PX is a real limit
    assert solve_task_bytes(192, 16, 2) > solve_task_bytes(192, 8, 2) > solve_task_bytes(192, 8, 1)
    assert finetune_task_bytes(384) > finetune_task_bytes(192)


@pytest.mark.parametrize("call", [lambda: finetune_task_bytes(0), lambda: solve_task_bytes(64, 0, 2),
                                  lambda: coarse_task_bytes(64, 2.5)])  # fmt: skip
def test_bad_sizes_are_refused(call) -> None:
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        call()
