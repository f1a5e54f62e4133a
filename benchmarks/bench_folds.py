"""Alignment that tears: a fold across the whole section whose far side slid ``d`` px along it.

Cases (real EM, exact truth): a section ``R`` (centre crop, normalized), the source
``warp(R', A)`` with ``A`` = :func:`emcore.synthetic.torn_fold_field` (fold line at 30 deg, 10 % of
the size off centre, band ``size / 64`` px, far side slid ``d`` px along the line) and its defect
mask, the target ``warp(R, s)`` with a smooth 2 px elastic field ``s``; noise sigma 0.2 on both.
``R' = R`` for kind ``smooth``; for ``neighbour`` ``R'`` is the next section (real content
change, so its residual also holds the registered stack's own small misalignment). The truth is
``compose(s, truth_A)`` (``truth_A`` piecewise constant, exact); a pixel's side is that of
``p + s(p)``.

Methods (every one gets the source's defect mask where it takes one):

* ``sectionflow pieces + finetune``: :func:`emcore.coarse_pieces.coarse_align_pieces` (rigid),
  then :func:`emcore.finetune.finetune` from its torn field (``src_defects`` = the fold mask,
  ``tgt_defects`` = the field's seam and gap, so the springs are cut along the tear);
* ``sectionflow rigid + finetune``: today's path, one :func:`emcore.coarse_xcorr.coarse_align`
  rigid fit, then the finetuner from it;
* ``elastix rigid+grid32`` (:mod:`benchmarks.peers`), when itk-elastix imports.

Residual ``|field - truth|`` px per side (near / far), 16 px border and 4 px either side of the
fold line excluded, only where the truth reads source data: median / p95, and the worst side's
median. ``far corr``: median 64 px tile Pearson of the aligned source with the target over the
far side (:func:`emcore.quality.tile_correlation`). One CPU thread.

    .venv/bin/python -m benchmarks.bench_folds --quick   # bundled VNC, 256 px, d = 60
    .venv/bin/python -m benchmarks.bench_folds           # shared VNC (mip 1) + medulla, d = 20, 60, 150
    .venv/bin/python -m benchmarks.bench_folds --datasets vnc --slides 150   # a part of it
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from benchmarks.cases import NOISE_SIGMA, load_sections
from emcore.coarse_pieces import coarse_align_pieces
from emcore.coarse_xcorr import coarse_align
from emcore.field import compose, warp, warp_mask
from emcore.finetune import finetune
from emcore.normalize import normalize, section_stats
from emcore.quality import tile_correlation
from emcore.synthetic import smooth_field, torn_fold_field

ANGLE = 30.0
BORDER = 16
LINE_MARGIN = 4


@dataclass(frozen=True)
class FoldCase:
    name: str
    src: torch.Tensor  # (1, 1, S, S)
    tgt: torch.Tensor
    mask: torch.Tensor  # (S, S) bool, source frame
    truth: torch.Tensor  # (1, 2, S, S)
    far: np.ndarray  # (S, S) bool, target frame
    keep: np.ndarray  # (S, S) bool: evaluated pixels


def _normalized(section: np.ndarray) -> torch.Tensor:
    stats = section_stats(section)
    return torch.from_numpy(normalize(section.astype(np.float32), stats.mean, stats.std))[None, None]


def _noisy(image: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    out = image + NOISE_SIGMA * torch.randn(image.shape, generator=gen)
    out = torch.where(image != 0, out, torch.zeros_like(out))
    return torch.where((image != 0) & (out == 0), torch.full_like(out, 1e-6), out)


def make_fold_case(
    name: str, section: np.ndarray, moving: np.ndarray, slide: float, seed: int = 0
) -> FoldCase:
    """One case from two ``(S, S)`` sections (``moving`` = ``section`` for kind ``smooth``)."""
    size = section.shape[0]
    offset = 0.1 * size
    applied, mask, truth_a = torn_fold_field(
        size, size, angle_deg=ANGLE, offset_px=offset, fold_width_px=size / 64, slide_px=slide
    )
    smooth = smooth_field(size, size, 2.0, seed=seed)
    reg = _normalized(section)
    src = _noisy(warp(_normalized(moving), applied), 1000 + seed)
    tgt = _noisy(warp(reg, smooth), 2000 + seed)
    truth = compose(smooth, truth_a)
    nx, ny = math.cos(math.radians(ANGLE)), math.sin(math.radians(ANGLE))
    c = (size - 1) / 2.0
    ys, xs = np.meshgrid(np.arange(size) - c, np.arange(size) - c, indexing="ij")
    far_reg = torch.from_numpy(xs * nx + ys * ny - offset >= 0)[None, None]
    far = warp_mask(far_reg, smooth)[0, 0].numpy()
    line = ndimage.binary_dilation(far, iterations=LINE_MARGIN) & ndimage.binary_dilation(
        ~far, iterations=LINE_MARGIN
    )
    reads = warp((src != 0).float(), truth)[0, 0].numpy() > 0.999
    keep = reads & ~line
    keep[:BORDER] = keep[-BORDER:] = False
    keep[:, :BORDER] = keep[:, -BORDER:] = False
    return FoldCase(name, src, tgt, mask[0, 0], truth, far, keep)


def _side_stats(field: torch.Tensor, case: FoldCase) -> dict[str, tuple[float, float]]:
    err = (field.double() - case.truth.double())[0].norm(dim=0).numpy()
    out = {}
    for side, sel in (("near", ~case.far), ("far", case.far)):
        values = err[sel & case.keep]
        out[side] = (float(np.median(values)), float(np.percentile(values, 95)))
    return out


def _far_corr(field: torch.Tensor, case: FoldCase) -> float:
    aligned = warp(case.src, field)[0, 0].numpy()
    return tile_correlation(aligned, case.tgt[0, 0].numpy(), mask_a=~case.far).median


def _pieces(case: FoldCase) -> tuple[torch.Tensor, torch.Tensor, str]:
    coarse = coarse_align_pieces(case.src, case.tgt, case.mask)
    moved = warp(case.src, coarse.field)
    result = finetune(moved, case.tgt, src_defects=coarse.tear_mask(case.mask), max_motion=8.0)
    note = "; ".join(f"piece {t.label}: {'own' if not t.fallback else 'whole'}" for t in coarse.transforms)
    return coarse.field, coarse.compose_residual(result.field), note


def _rigid(case: FoldCase) -> tuple[torch.Tensor, torch.Tensor, str]:
    coarse = coarse_align(case.src, case.tgt, src_mask=case.mask, model="rigid")
    result = finetune(case.src, case.tgt, init_field=coarse.field, src_defects=case.mask[None, None])
    return coarse.field, result.field, coarse.reason


def _elastix(case: FoldCase) -> tuple[torch.Tensor | None, torch.Tensor, str]:
    from benchmarks.peers import elastix_field

    src = case.src[0, 0].numpy().copy()
    src[case.mask.numpy()] = 0.0
    return None, elastix_field(src, case.tgt[0, 0].numpy(), parameter_map="rigid+grid32"), "mask zeroed"


def _methods() -> dict:
    methods = {"sectionflow pieces + finetune": _pieces, "sectionflow rigid + finetune": _rigid}
    try:
        import itk  # noqa: F401

        methods["elastix rigid+grid32"] = _elastix
    except ImportError:
        print("itk-elastix not importable: elastix skipped")
    return methods


def _cases(quick: bool, slides: list[float], datasets: list[str]) -> list[FoldCase]:
    cases = []
    if quick:
        stack = load_sections("bundled", [3, 4], 1024)
        small = F.avg_pool2d(torch.from_numpy(stack).float()[:, None], 4)[:, 0].numpy()
        sets = [("bundled vnc z3 mip2", small)]
    else:
        sets = []
        if "vnc" in datasets:
            vnc = torch.from_numpy(load_sections("vnc", [4, 5], 1024)).float()[:, None]
            sets.append(("vnc z4 mip1", F.avg_pool2d(vnc, 2)[:, 0].numpy()))
        if "medulla" in datasets:
            sets.append(("medulla z4 mip0", load_sections("medulla", [4, 5], 512).astype(np.float32)))
    for label, stack in sets:
        for slide in slides:
            for kind, moving in (("smooth", stack[0]), ("neighbour", stack[1])):
                cases.append(make_fold_case(f"{label} d={slide:g} {kind}", stack[0], moving, slide))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="bundled VNC at 256 px, d = 60 only")
    parser.add_argument("--slides", default=None, help="comma-separated slides d in px (default 20,60,150)")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the method names")
    parser.add_argument("--datasets", default="vnc,medulla", help="full mode: comma-separated vnc, medulla")
    args = parser.parse_args()
    torch.set_num_threads(1)
    slides = [float(s) for s in (args.slides or ("60" if args.quick else "20,60,150")).split(",")]
    methods = _methods()
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",")]
        methods = {k: v for k, v in methods.items() if k in wanted}
    columns = ["case", "method", "coarse near / far median px", "near median / p95", "far median / p95",
               "worst side", "far corr", "s"]  # fmt: skip
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * 8)
    for case in _cases(args.quick, slides, args.datasets.split(",")):
        for name, method in methods.items():
            start = time.perf_counter()
            coarse, field, _ = method(case)
            seconds = time.perf_counter() - start
            stats = _side_stats(field, case)
            coarse_text = "-"
            if coarse is not None:
                c = _side_stats(coarse, case)
                coarse_text = f"{c['near'][0]:.2f} / {c['far'][0]:.2f}"
            worst = max(stats["near"][0], stats["far"][0])
            near, far = stats["near"], stats["far"]
            print(
                f"| {case.name} | {name} | {coarse_text} | {near[0]:.2f} / {near[1]:.2f} | "
                f"{far[0]:.2f} / {far[1]:.2f} | {worst:.2f} | {_far_corr(field, case):.3f} | {seconds:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
