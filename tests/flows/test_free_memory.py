"""``flows.blocks.release_free_memory``: a worker hands the holes freed chunks leave back to the system."""

from __future__ import annotations

import pytest
import torch

from flows.blocks import _malloc_trim, release_free_memory, run_chunk_group
from tasks.markers import ChunkOutcome

MIB = 2**20


def _resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / MIB


def test_freed_holes_in_the_heap_go_back_to_the_system():
    if _malloc_trim() is None:
        pytest.skip("this C library has no malloc_trim (not glibc)")
    # 64 KiB tensors sit in glibc's heap (below its mmap threshold); freeing every other one
    # leaves ~64 MiB of holes that the heap keeps: only a trim gives them back.
    tensors = [torch.ones(16_000) for _ in range(2_000)]
    del tensors[::2]
    before = _resident_mib()
    release_free_memory()
    after = _resident_mib()
    assert before - after > 30, (before, after)
    assert all(float(t[0]) == 1.0 for t in tensors)  # what is still used stays


def test_a_group_releases_after_computed_chunks_and_returns_every_outcome():
    def chunk(i: int) -> ChunkOutcome:
        return ChunkOutcome("t", str(i), "skipped" if i % 2 else "done", {"i": i})

    results = run_chunk_group(chunk, [{"i": i} for i in range(5)])
    assert [r.detail["i"] for r in results] == list(range(5))
