"""Accuracy and speed of the online finetuner vs elastix, SOFIMA and the plain autograd reference.

Cases: :mod:`benchmarks.cases` (512 px crops of real EM, known deformations ``smooth``, ``large``,
``neighbour``, ``strain``, ``capture``, ``translation``, noise sigma 0.2). Residual =
``|recovered - true|`` px over the interior (32 px border excluded),
:func:`emcore.metrics.field_residual`. Every method runs on one CPU thread
(``torch.set_num_threads(1)``, elastix ``number_of_threads=1``; JAX as it comes).
Peak MiB = peak RSS above the start of the call (``benchmarks.bench_kernels.PeakMemory``), one
pair.

The plain reference is the published method: one level at full resolution, ``backend="reference"``
(``grid_sample`` + autograd), ``torch.optim.Adam(lr=0.1)``, ``sm=200``, 2000 iterations. Full mode
runs it once on the first ``smooth`` pair; ``--quick`` runs it on a 128 px crop for 200 iterations
and compares throughput in Mpx*it/s (megapixels times iterations per second).

    .venv/bin/python -m benchmarks.bench_finetune           # vnc + medulla, 2 pairs per kind
    .venv/bin/python -m benchmarks.bench_finetune --quick   # bundled vnc, 1 pair per kind
    .venv/bin/python -m benchmarks.bench_finetune --resample bicubic --no-reference  # bicubic sources
    .venv/bin/python -m benchmarks.bench_finetune --kinds strain,capture --no-reference  # a subset

Besides the defaults, ``sectionflow finetune (bending soft fits)`` runs the default before the
fourth-order smoothness energy of the last level's soft fits (issue 17, fifth pass; the fourth
pass's default: the soft candidate and its refits with the bending energy, weight 2e2),
``sectionflow finetune (no refits)`` the default before the last
level's refits of its soft items (issue 17, fourth pass; the third pass's default),
``sectionflow finetune (no pre-filter)`` runs the default before the last
level's pre-filter (issue 17, third pass: held-out selection 5e3 -> 5e2 on the images as they are)
and ``sectionflow finetune (fixed stiffness)`` the default before the held-out selection (4
levels, bending weight 5e3 on every pair) in the same run, so the closing note can compare each
row with each (``--no-previous`` skips them). ``capture``: the share of
interior pixels off by more than 1 px is printed per pair (a capture failure when > 0; the
closing note takes the worst ``capture`` or ``translation`` pair).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from benchmarks.bench_kernels import PeakMemory, return_freed_memory_to_the_os
from benchmarks.cases import KINDS, RESAMPLING, Case, make_cases
from benchmarks.peers import check_conventions, peers, sofima_available
from emcore.field import identity
from emcore.finetune import DEFAULT_MAX_MOTION, finetune
from emcore.finetune.coarse_to_fine import default_levels, pyramid_depth
from emcore.finetune.losses import alignment_loss, prepare_masks
from emcore.finetune.translation_start import translation_start
from emcore.metrics import ResidualStats, field_residual

OURS = "sectionflow finetune (defaults)"
BENDING_SOFT = "sectionflow finetune (bending soft fits)"
NO_REFITS = "sectionflow finetune (no refits)"
UNFILTERED = "sectionflow finetune (no pre-filter)"
FIXED = "sectionflow finetune (fixed stiffness)"


@dataclass
class Row:
    method: str
    case: Case
    residual: ResidualStats
    seconds: float
    off_1px: float  # % of the interior (32 px border excluded) off by more than 1 px


def _ours(case: Case) -> torch.Tensor:
    return finetune(case.src, case.tgt).field


def _automatic(case: Case, **last: object) -> torch.Tensor:
    """The default call with the last level's settings ``last`` changed: the same automatic depth
    and translation start."""
    h, w = case.src.shape[-2:]
    levels = default_levels(h, w, pyramid_depth(h, w, DEFAULT_MAX_MOTION))
    levels[-1] = replace(levels[-1], **last)
    start, _ = translation_start(
        case.src, case.tgt, identity(1, h, w), top_mip=levels[0].mip, max_motion=DEFAULT_MAX_MOTION
    )
    return finetune(case.src, case.tgt, init_field=start, levels=levels).field


#: The last level's soft candidate before the fifth pass: a weight of the bending energy (order 2).
_BENDING_SOFT = {"bending_candidates": (2e2,), "candidate_order": 2}


def _bending_soft(case: Case) -> torch.Tensor:
    """The default before the fourth-order energy of the soft fits (issue 17, fifth pass): the
    fourth pass's (soft candidate and refits with the bending energy, 2e2)."""
    return _automatic(case, **_BENDING_SOFT)


def _no_refits(case: Case) -> torch.Tensor:
    """The default before the last level's refits (issue 17, fourth pass): the third pass's."""
    return _automatic(case, refits=0, **_BENDING_SOFT)


def _unfiltered(case: Case) -> torch.Tensor:
    """The default before the last level's pre-filter (issue 17, third pass): the same automatic
    schedule and translation start, the last level without ``prefilter`` or refits and with the
    soft candidate 5e2 it had then."""
    return _automatic(case, prefilter=0.0, bending_candidates=(5e2,), refits=0, candidate_order=2)


def _fixed(case: Case) -> torch.Tensor:
    """The previous default: 4 levels, the last one's bending weight fixed at 5e3."""
    h, w = case.src.shape[-2:]
    levels = [replace(lv, bending_candidates=()) for lv in default_levels(h, w, 4)]
    return finetune(case.src, case.tgt, levels=levels).field


def _off_1px(field: torch.Tensor, true: torch.Tensor, border: int = 32) -> float:
    err = (field - true).norm(dim=1)[..., border:-border, border:-border]
    return float((err > 1.0).double().mean()) * 100.0


def _as_numpy(image: torch.Tensor) -> np.ndarray:
    return image[0, 0].numpy()


def methods(include_sofima: bool, previous: bool = True) -> dict[str, Callable[[Case], torch.Tensor]]:
    out: dict[str, Callable[[Case], torch.Tensor]] = {OURS: _ours}
    if previous:
        out[BENDING_SOFT] = _bending_soft
        out[NO_REFITS] = _no_refits
        out[UNFILTERED] = _unfiltered
        out[FIXED] = _fixed
    for name, fn in peers(include_sofima).items():
        out[name] = lambda c, fn=fn: fn(_as_numpy(c.src), _as_numpy(c.tgt))
    return out


def plain_reference(src: torch.Tensor, tgt: torch.Tensor, num_iter: int) -> tuple[torch.Tensor, float]:
    """The published finetuner: Adam(lr=0.1) on a full-resolution field, sm=200, reference loss."""
    start = time.perf_counter()
    masks = prepare_masks(src, tgt)
    field = torch.zeros(src.shape[0], 2, *src.shape[-2:], requires_grad=True)
    opt = torch.optim.Adam([field], lr=0.1)
    for _ in range(num_iter):
        opt.zero_grad()
        alignment_loss(src, tgt, field, masks=masks, sm=200.0, backend="reference").backward()
        opt.step()
    return field.detach(), time.perf_counter() - start


def _warm_up(all_methods: dict[str, Callable[[Case], torch.Tensor]], case: Case) -> None:
    """Load libraries and build kernels (elastix's lazy modules, the C++ loss, JAX) off the clock."""
    small = Case(
        "warm-up", case.kind, case.src[..., :64, :64], case.tgt[..., :64, :64],
        case.applied[..., :64, :64], case.true[..., :64, :64],
    )  # fmt: skip
    for fn in all_methods.values():
        fn(small)


def run(
    quick: bool,
    include_sofima: bool = True,
    resample: str = "bilinear",
    reference: bool = True,
    kinds: tuple[str, ...] = KINDS,
    previous: bool = True,
) -> None:
    torch.set_num_threads(1)
    return_freed_memory_to_the_os()
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"# bench_finetune{' --quick' if quick else ''}: 512 px pairs, sources resampled {resample}, "
          f"one CPU thread per method; load average {load}")  # fmt: skip
    if include_sofima and not sofima_available():
        print("# note: SOFIMA not importable (set SOFIMA_PATH to a dir holding the sofima package and "
              "install jax): skipped")  # fmt: skip
        include_sofima = False
    found = check_conventions(include_sofima=include_sofima)
    print(f"# conventions (translation +3, -2 px -> aligning field -3, +2): {found}")
    cases = make_cases(quick, resample=resample, kinds=kinds)
    all_methods = methods(include_sofima, previous)
    _warm_up(all_methods, cases[0])

    rows: list[Row] = []
    memory: dict[str, float | None] = {}
    # Case by case, every method on the case in turn: on a shared machine the load drifts, and
    # interleaving keeps each comparison within the same minute.
    for i, case in enumerate(cases):
        for name, fn in all_methods.items():
            meter = PeakMemory("cpu")
            with meter:
                start = time.perf_counter()
                field = fn(case)
                seconds = time.perf_counter() - start
            if i == 0:
                memory[name] = meter.mib
            res = field_residual(field, case.true, border=32)
            rows.append(Row(name, case, res, seconds, _off_1px(field, case.true)))

    rows.sort(key=lambda r: list(all_methods).index(r.method))
    print("\n## per pair: median / p95 / max residual px, seconds")
    print(f"{'method':<42} {'case':<24} {'median':>7} {'p95':>7} {'max':>7} {'s':>7} {'% >1px':>7}")
    for r in rows:
        res = r.residual
        print(f"{r.method:<42} {r.case.name:<24} {res.median:7.3f} {res.p95:7.3f} {res.max:7.2f} "
              f"{r.seconds:7.2f} {r.off_1px:7.2f}")  # fmt: skip

    ref_time = statistics.mean(r.seconds for r in rows if r.method == "elastix default")
    print("\n## summary: mean over pairs of the per-pair median / p95 px; time = mean s per pair; "
          "speed = elastix default's s/pair / the method's (> 1: faster)")  # fmt: skip
    header = f"{'method':<42}" + "".join(f" {k + ' med/p95':>18}" for k in kinds)
    header += f" {'s/pair':>7} {'speed vs elastix default':>25} {'peak MiB':>9}"
    print(header)
    print("-" * len(header))
    for name in all_methods:
        line = f"{name:<42}"
        for kind in kinds:
            sel = [r.residual for r in rows if r.method == name and r.case.kind == kind]
            med = statistics.mean(s.median for s in sel)
            p95 = statistics.mean(s.p95 for s in sel)
            line += f" {med:8.3f} / {p95:7.3f}"
        secs = statistics.mean(r.seconds for r in rows if r.method == name)
        mib = memory.get(name)
        mem = f"{mib:9.1f}" if mib is not None else f"{'n/a':>9}"
        line += f" {secs:7.2f} {ref_time / secs:24.2f}x {mem}"
        print(line)

    targets(rows, kinds, ref_time)

    # Where our time goes: one more run on the first smooth pair, per level.
    our_rows = [r for r in rows if r.method == OURS]
    smooth = next((c for c in cases if c.kind == "smooth"), None)
    if smooth is None:
        return
    result = finetune(smooth.src, smooth.tgt)
    per_level = ", ".join(
        f"mip {mip}: {int(n)} it {s:.2f} s"
        for mip, n, s in zip(result.mips, result.iterations[:, 0], result.level_seconds, strict=True)
    )
    print(f"\n## ours per level on {smooth.name}: {per_level}; total {result.seconds:.2f} s")

    # The plain reference, for the speed ratio.
    if not reference:
        return
    if quick:
        size, iters = 128, 200
        src, tgt = smooth.src[..., 192:320, 192:320], smooth.tgt[..., 192:320, 192:320]
        _, secs = plain_reference(src, tgt, iters)
        ref_rate = size * size * iters / 1e6 / secs
        work = sum(
            (512 >> mip) ** 2 * int(n) for mip, n in zip(result.mips, result.iterations[:, 0], strict=True)
        )
        our_rate = work / 1e6 / result.seconds
        equiv = 512 * 512 * 2000 / 1e6 / ref_rate
        ours_s = statistics.mean(r.seconds for r in our_rows)
        print(f"\n## plain reference (sm=200, Adam lr 0.1, reference backend) on a {size} px crop, "
              f"{iters} it: {ref_rate:.3f} Mpx*it/s -> 2000 it at 512 px: {equiv:.0f} s")  # fmt: skip
        its = result.iterations[:, 0].tolist()
        print(f"## ours: {our_rate:.3f} Mpx*it/s on the smooth pair ({its} it at mips {result.mips}); "
              f"wall time per pair {ours_s:.2f} s = {equiv / ours_s:.0f}x faster than the plain "
              "reference's estimated 2000 it")  # fmt: skip
    else:
        field, secs = plain_reference(smooth.src, smooth.tgt, 2000)
        res = field_residual(field, smooth.true, border=32)
        again = finetune(smooth.src, smooth.tgt)  # timed right after, under the same load
        ours = field_residual(again.field, smooth.true, border=32)
        print(f"\n## plain reference (sm=200, Adam lr 0.1, 2000 it, reference backend) on {smooth.name}: "
              f"{res}, {secs:.1f} s; ours on the same pair (run right after it): {ours}, "
              f"{again.seconds:.2f} s = {secs / again.seconds:.0f}x faster")  # fmt: skip


def _mean(rows: list[Row], method: str, kind: str | None, attr: str) -> float | None:
    """Mean over the pairs of ``method`` (and ``kind``) of a residual stat or ``seconds``."""
    sel = [r for r in rows if r.method == method and (kind is None or r.case.kind == kind)]
    if not sel:
        return None
    return statistics.mean(r.seconds if attr == "seconds" else getattr(r.residual, attr) for r in sel)


def targets(rows: list[Row], kinds: tuple[str, ...], elastix_s: float) -> None:
    """The closing note: issue 17's targets, each with the numbers measured in this run."""
    print("\n## targets (issue 17; means over the pairs of this run)")

    def show(name: str, value: float | None, goal: str, met: bool | None, peer: str = "") -> None:
        verdict = "n/a" if met is None else ("met" if met else "MISSED")
        got = "n/a" if value is None else f"{value:.3f}"
        print(f"{name:<44} {got:>8}  target {goal:<24} {verdict:<7}{('  ' + peer) if peer else ''}")

    if "strain" in kinds:
        p95 = _mean(rows, OURS, "strain", "p95")
        rigid = _mean(rows, "elastix rigid+grid32", "strain", "p95")
        peer = f"elastix rigid+grid32 {rigid:.3f}" if rigid is not None else ""
        show("local strain p95 px", p95, "<= 0.12", None if p95 is None else p95 <= 0.12, peer)
    if "neighbour" in kinds:
        med = _mean(rows, OURS, "neighbour", "median")
        sof = _mean(rows, "sofima (patch 64, step 8)", "neighbour", "median")
        peer = f"sofima {sof:.3f}" if sof is not None else "sofima not run"
        show("neighbour median px", med, "<= 1.0", None if med is None else med <= 1.0, peer)
    baselines = (
        (BENDING_SOFT, "bending soft fits'"),
        (NO_REFITS, "no refits'"),
        (UNFILTERED, "no pre-filter's"),
        (FIXED, "fixed stiffness's"),
    )
    for baseline, label in baselines:
        for kind in kinds:
            for attr in ("median", "p95"):
                new, old = _mean(rows, OURS, kind, attr), _mean(rows, baseline, kind, attr)
                if new is None or old is None:
                    continue
                ratio = new / old
                show(f"{kind} {attr} / {label}", ratio, "<= 1.10 (no 10 % loss)", ratio <= 1.10,
                     f"{new:.3f} vs {old:.3f} px")  # fmt: skip
    if "capture" in kinds or "translation" in kinds:
        reach = ("capture", "translation")
        worst = max((r.off_1px for r in rows if r.method == OURS and r.case.kind in reach), default=None)
        met = None if worst is None else worst == 0
        show("capture: worst % of px off by > 1 px", worst, "0 (no failure)", met)
    ours = _mean(rows, OURS, None, "seconds")
    per_case = [
        (r.seconds, e.seconds)
        for r in rows
        if r.method == OURS
        for e in rows
        if e.method == "elastix default" and e.case.name == r.case.name
    ]
    slower = sum(o > e for o, e in per_case)
    show("s per pair / elastix default's", None if ours is None else ours / elastix_s, "<= 1",
         None if ours is None else ours <= elastix_s,
         f"{ours:.2f} vs {elastix_s:.2f} s; slower on {slower} of {len(per_case)} cases")  # fmt: skip


def main(quick: bool | None = None) -> None:
    if quick is None:
        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        parser.add_argument("--quick", action="store_true", help="bundled data, one pair per kind")
        parser.add_argument("--no-sofima", action="store_true", help="skip SOFIMA even if importable")
        parser.add_argument("--resample", choices=RESAMPLING, default="bilinear",
                            help="how the sources are resampled (benchmarks/cases.py)")  # fmt: skip
        parser.add_argument("--no-reference", action="store_true", help="skip the plain reference (~10 min)")
        parser.add_argument("--kinds", default=",".join(KINDS),
                            help=f"comma-separated case kinds (default all: {','.join(KINDS)})")  # fmt: skip
        parser.add_argument("--no-previous", action="store_true",
                            help="skip the previous defaults (bending soft fits, no refits, no pre-filter, "
                                 "fixed)")  # fmt: skip
        args = parser.parse_args()
        kinds = tuple(k for k in args.kinds.split(",") if k)
        unknown = [k for k in kinds if k not in KINDS]
        if unknown or not kinds:
            parser.error(f"--kinds: unknown kind(s) {unknown}; choose from {', '.join(KINDS)}")
        run(
            args.quick,
            include_sofima=not args.no_sofima,
            resample=args.resample,
            reference=not args.no_reference,
            kinds=kinds,
            previous=not args.no_previous,
        )
    else:
        run(quick)


if __name__ == "__main__":
    main()
