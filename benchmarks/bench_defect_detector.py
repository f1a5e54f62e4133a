"""How well does the shipped fold/crack detector find synthetic defects in held-out real EM?

On the held-out sections (``emcore.models.em_data.HELD_OUT``: vnc 16-19 at mip 3, 36.8 nm/px;
medulla 56-63 at mip 2, 40 nm/px), ``--defects`` synthetic folds / cracks per section
(``emcore.synthetic_defects``, the training recipe's ranges, seeded by ``--seed``: other defects
than the training ones, on sections the detector never saw), without and with EM artifacts
(``emcore.models.artifacts``): pixel precision, recall and IoU pooled over all cases, the median
per-case IoU, and the fraction of tissue the detector marks on the same sections without a defect.
Targets: IoU >= 0.7, clean false-positive area <= 0.1 %.

    .venv/bin/python -m benchmarks.bench_defect_detector [--seed S] [--defects N] [--threshold T]
"""

from __future__ import annotations

import argparse
import time

import torch

from emcore.models import load_model
from emcore.models.detector_training import DETECTOR_RECIPE, evaluate_detector


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--defects", type=int, default=4, help="synthetic defects per held-out section")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--model", default="defect_detector", help="shipped name or config path")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = load_model(args.model)
    start = time.perf_counter()
    m = evaluate_detector(
        model, DETECTOR_RECIPE, seed=args.seed, threshold=args.threshold, defects_per_section=args.defects
    )
    print(
        f"# bench_defect_detector: {args.model}, threshold {args.threshold}, seed {args.seed}, "
        f"{args.defects} defects x 12 held-out sections ({time.perf_counter() - start:.0f} s)"
    )
    print(f"{'':12} {'precision':>9} {'recall':>7} {'IoU':>6} {'IoU med':>8} {'clean FP %':>10}")
    for label, suffix in (("plain", ""), ("artifacts", "_artifacts")):
        print(
            f"{label:12} {m['precision' + suffix]:9.3f} {m['recall' + suffix]:7.3f} {m['iou' + suffix]:6.3f} "
            f"{m['iou_median' + suffix]:8.3f} {100 * m['clean_fp' + suffix]:10.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
