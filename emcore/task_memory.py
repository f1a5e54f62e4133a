"""How much memory one chunk task of each stage needs: measured per-pixel costs of the kernels.

A task's peak memory above its worker's resting size grows with the pixels it holds, so each estimate
is a fixed part plus a measured cost per pixel times those pixels (float32 images and fields; the
kernels' buffers, pyramids, FFTs and optimizer states included), fitted to peaks measured with
``benchmarks/bench_memory.py`` (each kernel in a fresh process, several sizes; it prints the measured
peak beside these estimates) and rounded up: the same case measured twice varies by up to ~30 %
(the allocator), and every estimate sits above every measurement taken.

* coarse alignment (:func:`emcore.coarse_xcorr.coarse_align`, whole sections at the coarse mip):
  :data:`COARSE_FIXED_BYTES` + :data:`COARSE_BYTES_PER_PX` per px of one section (measured
  255-278 MiB at 512^2 px and 798-864 MiB at 1024^2 px; 4096^2 px sections would need ~13 GiB);
* finetune (:func:`emcore.finetune.finetune` on one pair): :data:`FINETUNE_FIXED_BYTES` +
  :data:`FINETUNE_BYTES_PER_PX` per px of the padded chunk (``chunk_xy + 2 pad``) at the finetune
  mip (measured 19-20 / 33-39 / 103-111 MiB at 192^2 / 384^2 / 768^2 px);
* stack solve (:func:`emcore.stack_solve.solve_stack` on one xy chunk x z-block):
  :data:`SOLVE_FIXED_BYTES` + :data:`SOLVE_BYTES_PER_PX` per px of the padded chunk, per section and
  per field it holds (the section's own and its ``neighbours`` pairs). The kernel alone measured
  16 / 27 / 39 MiB for 8 sections x 192^2, 16 x 192^2 and 8 x 384^2 px with 2 neighbours (since it
  sweeps in place and keeps number weights as numbers; 21-24 / 32-36 / 58-82 MiB before); the
  estimate keeps its margin for the pair fields the task reads besides (16 B/px per section).

:data:`WORKER_BASE_BYTES` is a worker's resting size with torch and the models loaded (about 430-460
MiB measured by ``benchmarks/bench_scale.py``). All sizes in bytes.
"""

from __future__ import annotations

__all__ = [
    "COARSE_BYTES_PER_PX",
    "COARSE_FIXED_BYTES",
    "FINETUNE_BYTES_PER_PX",
    "FINETUNE_FIXED_BYTES",
    "SOLVE_BYTES_PER_PX",
    "SOLVE_FIXED_BYTES",
    "WORKER_BASE_BYTES",
    "coarse_task_bytes",
    "finetune_task_bytes",
    "solve_task_bytes",
]

COARSE_FIXED_BYTES = 100 * 2**20
COARSE_BYTES_PER_PX = 800  # slope between 512^2 and 1024^2: 724-770 B/px
FINETUNE_FIXED_BYTES = 16 * 2**20
FINETUNE_BYTES_PER_PX = 200  # slope between 384^2 and 768^2: 170-184 B/px
SOLVE_FIXED_BYTES = 8 * 2**20
SOLVE_BYTES_PER_PX = 24  # per section and field; kernel slope 9-12 B/px, + the task's inputs
WORKER_BASE_BYTES = 512 * 2**20


def _check(name: str, value: int, low: int = 1) -> None:
    if not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def coarse_task_bytes(height: int, width: int) -> int:
    """Peak bytes of one coarse pair on ``height x width`` px sections (at the coarse mip)."""
    _check("height", height)
    _check("width", width)
    return COARSE_FIXED_BYTES + COARSE_BYTES_PER_PX * height * width


def finetune_task_bytes(side: int) -> int:
    """Peak bytes of one finetune chunk of ``side x side`` px with its context (at the finetune mip)."""
    _check("side", side)
    return FINETUNE_FIXED_BYTES + FINETUNE_BYTES_PER_PX * side * side


def solve_task_bytes(side: int, sections: int, neighbours: int) -> int:
    """Peak bytes of one solve chunk: ``side x side`` px with context, ``sections`` sections read
    (z-block plus overlap), each with its own field and ``neighbours`` pair fields."""
    _check("side", side)
    _check("sections", sections)
    _check("neighbours", neighbours)
    return SOLVE_FIXED_BYTES + SOLVE_BYTES_PER_PX * side * side * sections * (1 + neighbours)
