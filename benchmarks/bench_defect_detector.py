"""How well does the shipped fold/crack detector find defects, and what does it mark on clean real EM?

Synthetic (``emcore.models.detector_training.evaluate_detector``): on the held-out sections
(``emcore.models.em_data.HELD_OUT``: vnc 16-19 at mip 3, 36.8 nm/px; medulla 56-63 at mip 2,
40 nm/px), ``--defects`` synthetic folds / cracks per section (``emcore.synthetic_defects``, the
training recipe's ranges, seeded by ``--seed``: other defects than the training ones, on sections
the detector never saw), without and with EM artifacts (``emcore.models.artifacts``): pixel
precision, recall and IoU pooled over all cases, the median per-case IoU, and the fraction of
tissue marked on the same sections without a defect.

Real (``--real``, the default; ``--no-real`` skips it): every section of both shared stacks
(medulla 64, VNC 20; none has a fold or crack, so every marked pixel is a false positive) run as
``align-stack`` runs the detector: imported as ``benchmarks.bench_stack`` does
(``--resolution``: ``full``, the files as they are, or ``half``, 2x downsampled first), the real
``normalize`` stage flow (Prefect's temporary API, a dask ``LocalCluster`` of 2 single-threaded
workers, default parameters), then the detect stage's input, the normalized
layer at ``tasks.detect.detection_mip``, through ``emcore.models.detect.detect_defects_two_scales``
(that mip and one coarser, united) per whole section (each section fits one detect chunk at the
default ``chunk_xy``, so this is the stage's result). Printed per stack: the marked fraction of
tissue, max / median over sections, and the sections above 0.1 %.

Rows: the network's mask alone; with the length rule (components shorter than
``emcore.models.detect.MIN_DEFECT_LENGTH_NM`` dropped); with the length and the contrast rule (also
bright components less than ``emcore.models.detect.MIN_BRIGHT_CONTRAST`` tissue std brighter than
the tissue around them dropped): the pipeline's mask. Targets: IoU >= 0.7, false-positive area
<= 0.1 % on clean sections.

Synthetic case sets (``--cases``): ``standard``, the recipe's random folds / cracks at ~40 nm/px
(``vnc`` mip 3, ``medulla`` mip 2: bitwise the cases of the runs before the detector was also
trained at ~20 nm/px, so these rows compare across detector versions); ``fine``, the same draws at
~20 nm/px (``vnc`` mip 2, ``medulla`` mip 1, where the pipeline now detects when the layer has that
mip); ``thin``, resin-filled cracks with a gap of :data:`THIN_CRACK_PX` (2-3 px at ~40 nm/px: what a
10 px crack at 9-10 nm/px becomes there) only, full tears, the recipe's displacement and resin.

``--sections training``: the synthetic rows on the training sections instead of the held-out ones
(where the contrast rule's threshold was chosen; use ``--defects 1``, it is 72 sections).

    .venv/bin/python -m benchmarks.bench_defect_detector [--seed S] [--defects N] [--threshold T]
        [--no-real] [--resolution full|half] [--sections held-out|training] [--cases standard,fine,thin]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from emcore.models import load_model
from emcore.models.detect import MIN_BRIGHT_CONTRAST, MIN_DEFECT_LENGTH_NM, detect_defects_two_scales
from emcore.models.detector_training import DETECTOR_RECIPE, evaluate_detector
from emcore.models.em_data import training_sections
from emcore.synthetic_defects import DefectSettings

FP_TARGET = 0.001  # fraction of tissue
REAL_STACKS = (("medulla", 64), ("vnc", 20))
#: Row name -> (length rule nm, contrast rule tissue std); None = not applied.
Rules = dict[str, tuple[float | None, float | None]]
CASES = ("standard", "fine", "thin")
#: The gap of the ``thin`` cases, px at ~40 nm/px.
THIN_CRACK_PX = (2.0, 3.0)


def case_sets() -> dict[str, tuple[object, DefectSettings | None]]:
    """``--cases`` name -> (recipe, fixed defect settings or None = the recipe's random draws)."""
    coarse = tuple(s for s in DETECTOR_RECIPE.sources if s.resolution_nm >= 30.0)
    fine = tuple(s for s in DETECTOR_RECIPE.sources if s.resolution_nm < 30.0)
    thin = DefectSettings(
        kind="crack", crack_fill="resin", displacement_px=DETECTOR_RECIPE.displacement_px,
        width_px=THIN_CRACK_PX, resin_level=DETECTOR_RECIPE.resin_level,
    )  # fmt: skip
    return {
        "standard": (dataclasses.replace(DETECTOR_RECIPE, sources=coarse), None),
        "fine": (dataclasses.replace(DETECTOR_RECIPE, sources=fine), None),
        "thin": (dataclasses.replace(DETECTOR_RECIPE, sources=coarse), thin),
    }


def pipeline_rules() -> Rules:
    """The benchmark's rows: the network alone, + the length rule, + the contrast rule (the pipeline)."""
    return {
        "network": (None, None),
        f"+ length >= {MIN_DEFECT_LENGTH_NM / 1000:g} um": (MIN_DEFECT_LENGTH_NM, None),
        f"+ contrast >= {MIN_BRIGHT_CONTRAST:g} std": (MIN_DEFECT_LENGTH_NM, MIN_BRIGHT_CONTRAST),
    }


def real_clean_fractions(
    model: object, work: Path, threshold: float, rules: Rules, resolution: str = "full"
) -> dict[str, dict[str, object]]:
    """Per stack: detection mip / nm and, per rule, the marked tissue fraction of every section."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    from benchmarks.bench_stack import import_registered
    from emcore.layers import open_layer
    from flows.align_stack import run_stage
    from flows.layout import Layout
    from flows.params import AlignParams
    from flows.runtime import local_cluster
    from flows.stages import normalize_flow
    from tasks.detect import detection_mip

    out: dict[str, dict[str, object]] = {}
    with prefect_test_harness(server_startup_timeout=120):
        os.environ["PREFECT_API_URL"] = PREFECT_API_URL.value()
        with local_cluster(n_workers=2) as address:
            for stack, count in REAL_STACKS:
                registered = import_registered(stack, resolution, count, work)
                output = "file://" + str(work / f"{stack}-{resolution}-detect")
                params = AlignParams(source=registered.path, output=output)
                run_stage(normalize_flow, params, address)
                normalized = open_layer(Layout(params.output).normalized)
                resolutions = [normalized.resolution(m)[0] for m in range(normalized.num_mips)]
                mip = detection_mip(resolutions, params.finetune_mip)
                if mip is None:
                    raise SystemExit(f"{stack}: no mip in the detector's range ({resolutions} nm/px)")
                image = torch.from_numpy(normalized.read(normalized.bounds(mip), mip))  # (Z, 1, Y, X)
                tissue = (image != 0).flatten(1).sum(1).clamp(min=1)
                row: dict[str, object] = {"mip": mip, "nm": resolutions[mip], "sections": image.shape[0]}
                for name, (length_nm, contrast) in rules.items():
                    marked = detect_defects_two_scales(
                        image, model, resolutions[mip], threshold=threshold, min_length_nm=length_nm,
                        min_bright_contrast=contrast,
                    )
                    row[name] = (marked.flatten(1).sum(1) / tissue).numpy()
                out[stack] = row
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--defects", type=int, default=4, help="synthetic defects per held-out section")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--model", default="defect_detector", help="shipped name or config path")
    parser.add_argument("--real", action=argparse.BooleanOptionalAction, default=True,
                        help="also the clean real sections of both shared stacks (3-4 min here)")  # fmt: skip
    parser.add_argument("--resolution", choices=("full", "half"), default="full", help="of the real stacks")
    parser.add_argument("--work", default=None, help="folder for the imported stacks (default: temporary)")
    parser.add_argument("--sections", choices=("held-out", "training"), default="held-out",
                        help="sections of the synthetic rows")  # fmt: skip
    parser.add_argument("--cases", default=",".join(CASES),
                        help="synthetic case sets, comma-separated: standard, fine, thin")  # fmt: skip
    args = parser.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if not cases or any(c not in CASES for c in cases):
        parser.error(f"--cases: expected some of {CASES}, got {args.cases!r}")
    torch.set_num_threads(1)
    model = load_model(args.model)
    rules = pipeline_rules()
    sections = None
    if args.sections == "training":
        sections = {s.dataset: training_sections(s.dataset) for s in DETECTOR_RECIPE.sources}
    count = sum(len(v) for v in sections.values()) if sections else 12
    for case in cases:
        recipe, settings = case_sets()[case]
        start = time.perf_counter()
        metrics = {
            name: evaluate_detector(
                model, recipe, seed=args.seed, threshold=args.threshold,
                defects_per_section=args.defects, min_length_nm=length, min_bright_contrast=contrast,
                sections=sections, settings=settings,
            )
            for name, (length, contrast) in rules.items()
        }  # fmt: skip
        print(
            f"# bench_defect_detector: {args.model}, {case} cases, threshold {args.threshold}, seed "
            f"{args.seed}, {args.defects} defects x {count} {args.sections} sections "
            f"({time.perf_counter() - start:.0f} s)"
        )
        head = f"{'precision':>9} {'recall':>7} {'IoU':>6} {'IoU med':>8} {'clean FP %':>10}"
        print(f"{case + ' (' + args.sections + ')':34} {head}")
        for name, m in metrics.items():
            for label, suffix in (("plain", ""), ("artifacts", "_artifacts")):
                print(
                    f"{name + ', ' + label:34} {m['precision' + suffix]:9.3f} {m['recall' + suffix]:7.3f} "
                    f"{m['iou' + suffix]:6.3f} {m['iou_median' + suffix]:8.3f} "
                    f"{100 * m['clean_fp' + suffix]:10.4f}"
                )
        print(f"{'target':34} {'':9} {'':7} {'>= 0.7':>6} {'':8} {'<= 0.1':>10}\n")
    if not args.real:
        return 0
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_detector_") as tmp:
        real = real_clean_fractions(model, Path(args.work or tmp), args.threshold, rules, args.resolution)
    print(
        f"\n# clean real sections ({args.resolution} resolution), run as align-stack's detect stage "
        f"({time.perf_counter() - start:.0f} s): marked % of tissue (no section has a defect)"
    )
    print(f"{'stack':8} {'mip':>3} {'nm/px':>6} {'sections':>8} {'rule':22} {'max %':>7} {'median %':>8}  "
          "above 0.1 % (z (%))")  # fmt: skip
    for stack, row in real.items():
        for name in rules:
            f = np.asarray(row[name])
            over = [f"{z} ({100 * v:.2f})" for z, v in enumerate(f) if v > FP_TARGET]
            print(
                f"{stack:8} {row['mip']:>3} {row['nm']:6.1f} {row['sections']:>8} {name:22} "
                f"{100 * f.max():7.3f} {100 * float(np.median(f)):8.3f}  {', '.join(over) or 'none'}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
