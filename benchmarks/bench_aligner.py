"""Learned pyramid aligner vs the classical FFT coarse aligner on large known deformations.

Held-out real EM (``drosophila_vnc_stack1`` sections 16-19, never trained on) at mip 3 (36.8 nm/px,
whole 128 px sections). For each pair ``(z, z - k)``, ``k`` in {1, 2}, section ``z - k`` is
deformed by :func:`emcore.models.aligner_training.large_deformation` (rotation, translation,
smooth field; in the "fold" rows also a fold, a tear the field must follow) scaled so the
displacements reach about ``N`` px at mip 0 (4.6 nm), and both images get EM artifacts. Each
aligner returns a field with ``warp(moving, field) ~ fixed``; the residual ``|field - true|`` is
taken over the interior (24 px border excluded) outside the fold band (dilated by 2 px).

* ``classical``: ``emcore.coarse_xcorr.coarse_align(moving, fixed, model="affine")``.
* ``learned``: the shipped ``pyramid_aligner`` alone (one forward pass,
  :func:`emcore.models.refine.learned_align`; trained self-supervised with the finetuner's loss).
* ``cls+refine``: the classical field, then the shipped ``pyramid_refiner`` (self-supervised too) on
  what it leaves (:func:`emcore.models.refine.coarse_then_refine`).
* ``identity``: no alignment (the size of the deformation).

Residuals are printed in px at mip 0 (4.6 nm; = 8 x px at mip 3): the mean over cases of each case's
median / p95. Ratios = learned / classical and cls+refine / classical medians (below 1: better
than the classical aligner alone).

    .venv/bin/python -m benchmarks.bench_aligner [--quick] [--model CONFIG] [--refiner CONFIG]

``--model`` / ``--refiner`` take another model's config path (e.g. an earlier version) to compare.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from emcore.coarse_xcorr import coarse_align
from emcore.field import identity, warp
from emcore.metrics import field_residual
from emcore.models import load_model
from emcore.models.aligner_training import large_deformation
from emcore.models.artifacts import add_artifacts
from emcore.models.em_data import HELD_OUT, load_stack
from emcore.models.refine import coarse_then_refine, learned_align

MIP = 3
SCALE = 2**MIP  # px at mip 0 per px at MIP
MAGNITUDES = (20, 40, 60, 100)  # nominal largest displacement, px at mip 0
BORDER = 24


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="two pairs per row instead of five (still the shared data)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="pyramid_aligner", help="model name or config path")
    parser.add_argument("--refiner", default="pyramid_refiner", help="model name or config path")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_model(args.model)
    refiner = load_model(args.refiner)
    held = list(HELD_OUT["vnc"])
    stack = load_stack("vnc", MIP, held)
    pairs = [(i, i - 1) for i in range(1, len(held))] + [(i, i - 2) for i in range(2, len(held))]
    pairs = pairs[:2] if args.quick else pairs
    print("Coarse aligner benchmark: held-out vnc sections 16-19 at mip 3 (36.8 nm, 128 px), with artifacts")
    print("residual |field - true| in px at mip 0 (4.6 nm): mean over cases of median / p95\n")
    header = (
        f"{'deformation':<18} {'cases':>5} {'identity':>17} {'classical':>17} {'learned':>17} "
        f"{'cls+refine':>17} {'ratio lrn':>9} {'ratio c+r':>9} {'time cls/lrn/c+r ms':>20}"
    )
    print(header)
    print("-" * len(header))
    for fold in (False, True):
        for magnitude in MAGNITUDES:
            gen = torch.Generator().manual_seed(args.seed * 1000 + magnitude + 7 * fold)
            names = ("identity", "classical", "learned", "cls+refine")
            stats: dict[str, list[tuple[float, float]]] = {k: [] for k in names}
            t_cls = t_lrn = t_ref = 0.0
            for fixed_i, moving_i in pairs:
                size = stack.shape[-1]
                d = large_deformation(size, gen, magnitude / SCALE, fold_probability=1.0 if fold else 0.0)
                fixed = add_artifacts(stack[fixed_i : fixed_i + 1], gen)
                moving = add_artifacts(warp(stack[moving_i : moving_i + 1], d.applied), gen)
                keep = ~(F.max_pool2d(d.defects.float(), 5, 1, 2) > 0)
                start = time.perf_counter()
                classical = coarse_align(moving, fixed, model="affine").field
                t_cls += time.perf_counter() - start
                start = time.perf_counter()
                learned = learned_align(moving, fixed, model)
                t_lrn += time.perf_counter() - start
                start = time.perf_counter()
                refined = coarse_then_refine(moving, fixed, refiner)
                t_ref += time.perf_counter() - start
                fields = {
                    "identity": identity(1, size, size),
                    "classical": classical,
                    "learned": learned,
                    "cls+refine": refined,
                }
                for name, field in fields.items():
                    r = field_residual(field, d.true, border=BORDER, mask=keep)
                    stats[name].append((r.median * SCALE, r.p95 * SCALE))
            means = {k: np.mean(v, axis=0) for k, v in stats.items()}
            label = f"{magnitude:>3} px{' + fold' if fold else ''}"
            cells = " ".join(f"{means[k][0]:>8.2f}/{means[k][1]:<8.2f}" for k in stats)
            ratio = means["learned"][0] / means["classical"][0]
            ratio_ref = means["cls+refine"][0] / means["classical"][0]
            n = len(pairs)
            times = f"{1000 * t_cls / n:>7.0f}/{1000 * t_lrn / n:.0f}/{1000 * t_ref / n:<8.0f}"
            print(f"{label:<18} {n:>5} {cells} {ratio:>9.2f} {ratio_ref:>9.2f} {times}")


if __name__ == "__main__":
    main()
