"""Choose the pipeline's mips from a layer's resolution and section size (physical units).

Published EM pipelines run the coarse alignment around 256-1024 nm/px and the finetuner (and the
final fields) around 16-64 nm/px. A section must also keep enough pixels for each stage to see
structure: the coarse aligner's correlation wants at least ``MIN_COARSE_PX`` px across, the
finetuner at least ``MIN_FINETUNE_PX``. The rules (resolutions are the x/y nm/px of mip 0;
mip ``m`` has ``2**m`` times that):

* **finetune mip**: the finest mip at or above ``FINETUNE_NM[0]`` nm/px (the finest mip if even
  mip 0 is coarser), made finer while its section is under ``MIN_FINETUNE_PX`` px;
* **coarse mip**: the finest mip at or above ``COARSE_NM[0]`` nm/px, but never so coarse that
  the section is under ``MIN_COARSE_PX`` px (then the coarsest mip that keeps it), and never finer
  than the finetune mip.

Small sections (a few micrometres) therefore run both stages at one mip; a 1 mm section at 4 nm
gets coarse ~512 nm/px (2000 px) and finetune ~16 nm/px. :func:`plan_warnings` names settings
outside what the benchmarks measured.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["COARSE_NM", "FINETUNE_NM", "MIN_COARSE_PX", "MIN_FINETUNE_PX", "choose_mips", "plan_warnings"]

COARSE_NM = (256.0, 1024.0)
FINETUNE_NM = (16.0, 64.0)
MIN_COARSE_PX = 256
MIN_FINETUNE_PX = 128


def _nm(resolution_xy: float, mip: int) -> float:
    return resolution_xy * 2**mip


def _px(size_xy: Sequence[int], mip: int) -> int:
    return min(int(size_xy[0]), int(size_xy[1])) // 2**mip


def choose_mips(resolution_xy: float, size_xy: Sequence[int], num_mips: int) -> tuple[int, int]:
    """``(coarse_mip, finetune_mip)`` for a layer of ``resolution_xy`` nm/px at mip 0, sections of
    ``size_xy = (x, y)`` px at mip 0 and mips ``0 .. num_mips - 1`` (see the module docstring)."""
    if not resolution_xy > 0 or num_mips < 1:
        raise ValueError(f"need a positive resolution and at least one mip, got {resolution_xy}, {num_mips}")
    mips = range(num_mips)
    finetune = next((m for m in mips if _nm(resolution_xy, m) >= FINETUNE_NM[0]), num_mips - 1)
    while finetune > 0 and _px(size_xy, finetune) < MIN_FINETUNE_PX:
        finetune -= 1
    coarse = next((m for m in mips if _nm(resolution_xy, m) >= COARSE_NM[0]), num_mips - 1)
    while coarse > finetune and _px(size_xy, coarse) < MIN_COARSE_PX:
        coarse -= 1
    return max(coarse, finetune), finetune


def plan_warnings(
    resolution: Sequence[float], size_xy: Sequence[int], coarse_mip: int, finetune_mip: int, neighbours: int
) -> list[str]:
    """Plain-language warnings for settings outside what was measured (empty when all is usual).

    ``resolution`` is ``(x, y, z)`` nm at mip 0.
    """
    out = []
    rx, rz = float(resolution[0]), float(resolution[2])
    fnm, cnm = _nm(rx, finetune_mip), _nm(rx, coarse_mip)
    if not FINETUNE_NM[0] / 2 <= fnm <= FINETUNE_NM[1]:
        out.append(
            f"finetune_mip {finetune_mip} is {fnm:g} nm/px, outside "
            f"{FINETUNE_NM[0]:g}-{FINETUNE_NM[1]:g} nm/px where the finetuner was measured"
        )
    if cnm > COARSE_NM[1]:
        out.append(f"coarse_mip {coarse_mip} is {cnm:g} nm/px, coarser than {COARSE_NM[1]:g} nm/px")
    if _px(size_xy, coarse_mip) < MIN_COARSE_PX // 2:
        out.append(
            f"sections are only {_px(size_xy, coarse_mip)} px at coarse_mip {coarse_mip}: the coarse "
            f"correlation needs about {MIN_COARSE_PX} px; use a finer coarse_mip"
        )
    if neighbours >= 2 and rz > 50:
        out.append(
            f"neighbours={neighbours} with {rz:g} nm sections: pairs z -> z-{neighbours} were measured only "
            "up to 50 nm section spacing and are often unreliable beyond; consider neighbours=1"
        )
    return out
