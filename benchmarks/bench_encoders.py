"""Does aligning on encodings beat aligning on raw images? Residual vs a known field, held-out EM.

For every shipped encoder, on held-out section pairs of real EM it was not trained on
(``emcore.models.em_data.HELD_OUT``: vnc 16-19, medulla 56-63) at the mip it was trained for:

* ``fixed`` = section ``z`` and ``moving`` = section ``z - 1`` deformed by a known smooth field
  (``emcore.synthetic.smooth_field``), both corrupted by random EM artifacts
  (``emcore.models.artifacts.add_artifacts``, seeded);
* the finetuner (``emcore.finetune.finetune``, its defaults) aligns ``moving`` onto ``fixed`` once on
  the raw normalized images and once on their encodings (``emcore.models.encode_tiled``, then
  normalized to tissue mean 0 / std 1 with ``emcore.normalize`` so both runs see the same scale);
* the residual ``|field - true|`` (``emcore.metrics.field_residual``, px at the pair's mip, over
  tissue, border excluded) is reported for both, and for no alignment at all (identity).

Both numbers are printed whatever they are. Ratio = encoded / raw (below 1: encodings help).

    .venv/bin/python -m benchmarks.bench_encoders [--quick] [--pairs N] [--seed S] [--sm SM] [--only NAME]

``--sm`` overrides the finetuner's rigidity weight (both runs), to see how robust a win is.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import torch

from emcore.field import identity, warp, warp_mask
from emcore.finetune import DEFAULT_SM, finetune
from emcore.metrics import ResidualStats, field_residual
from emcore.models import encode_tiled, load_model
from emcore.models.artifacts import add_artifacts
from emcore.models.em_data import DATASETS, HELD_OUT, load_stack
from emcore.normalize import normalize, section_stats
from emcore.synthetic import smooth_field, true_alignment_field

# (encoder, dataset, mip, max displacement px at that mip)
SETTINGS = [
    ("encoder_16_64nm", "vnc", 2, 4.0),
    ("encoder_16_64nm", "vnc", 3, 3.0),
    ("encoder_64_256nm", "vnc", 4, 2.0),
    ("encoder_256_2048nm", "medulla", 4, 1.5),
]


@dataclass(frozen=True)
class Pair:
    fixed: torch.Tensor
    moving: torch.Tensor
    true: torch.Tensor
    tissue: torch.Tensor


def make_pairs(dataset: str, mip: int, max_displacement: float, count: int, seed: int) -> list[Pair]:
    """``count`` held-out pairs ``(z, z - 1)`` of ``dataset`` at ``mip`` with a known field and
    artifacts; past the last section the neighbour pairs repeat with new fields and artifacts."""
    held = HELD_OUT[dataset]
    stack = load_stack(dataset, mip, held)
    _, _, h, w = stack.shape
    size = min(h, w) // 4 * 4
    stack = stack[..., :size, :size]
    gen = torch.Generator().manual_seed(seed)
    pairs = []
    for j in range(count):
        i = 1 + j % (len(held) - 1)
        applied = smooth_field(size, size, max_displacement, grid=min(4, size // 32 + 1), seed=seed + j + 1)
        # The inverse is extrapolated where the field reads outside the image: check the interior.
        true = true_alignment_field(applied, border=max(2 * round(max_displacement) + 4, size // 4))
        fixed = add_artifacts(stack[i : i + 1], gen)
        moving = add_artifacts(warp(stack[i - 1 : i], applied), gen)
        tissue = (fixed != 0) & warp_mask(moving != 0, true)
        pairs.append(Pair(fixed, moving, true, tissue))
    return pairs


def standardized(image: torch.Tensor) -> torch.Tensor:
    """Tissue mean 0 / std 1 with emcore.normalize (the same scale as the raw normalized images)."""
    array = image[0, 0].numpy()
    stats = section_stats(array)
    return torch.from_numpy(normalize(array, stats.mean, stats.std)).view_as(image)


def residual(field: torch.Tensor, pair: Pair, border: int) -> ResidualStats:
    return field_residual(field, pair.true, border=border, mask=pair.tissue)


def pooled(stats: list[ResidualStats]) -> tuple[float, float]:
    return float(np.mean([s.median for s in stats])), float(np.mean([s.p95 for s in stats]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one pair per setting (still the shared data)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pairs", type=int, default=8, help="pairs per setting (default 8)")
    parser.add_argument("--sm", type=float, default=None, help="finetuner rigidity weight (default: its own)")
    parser.add_argument("--only", default=None, help="benchmark only this encoder")
    args = parser.parse_args()
    settings = [s for s in SETTINGS if args.only in (None, s[0])]
    if not settings:
        parser.error(f"--only {args.only!r} is not one of {sorted({s[0] for s in SETTINGS})}")
    options = {} if args.sm is None else {"sm": args.sm}
    torch.set_num_threads(1)
    count = 1 if args.quick else args.pairs
    print("Encoder benchmark: finetuner residual vs the known field on held-out real EM with artifacts")
    print("(px at the pair's mip; mean over pairs of the per-pair median / p95; ratio = encoded / raw;")
    print("per-pair ratios of the medians: min-max, and on how many pairs the encodings won)")
    print(f"finetuner: emcore.finetune.finetune, sm = {options.get('sm', DEFAULT_SM):g}, other defaults\n")
    header = (
        f"{'encoder':<20} {'data':<30} {'pairs':>5} {'identity':>15} {'raw images':>15} "
        f"{'encodings':>15} {'ratio med':>9} {'per-pair':>11} {'won':>5} {'time raw/enc s':>15}"
    )
    print(header)
    print("-" * len(header))
    for name, dataset, mip, max_disp in settings:
        model = load_model(name)
        pairs = make_pairs(dataset, mip, max_disp, count, args.seed)
        size = pairs[0].fixed.shape[-1]
        border = max(4, size // 16)
        ident, raw, enc = [], [], []
        t_raw = t_enc = 0.0
        for pair in pairs:
            ident.append(residual(identity(1, size, size), pair, border))
            start = time.perf_counter()
            raw.append(residual(finetune(pair.moving, pair.fixed, **options).field, pair, border))
            t_raw += time.perf_counter() - start
            start = time.perf_counter()
            e_fixed = standardized(encode_tiled(model, pair.fixed))
            e_moving = standardized(encode_tiled(model, pair.moving))
            enc.append(residual(finetune(e_moving, e_fixed, **options).field, pair, border))
            t_enc += time.perf_counter() - start
        (im, ip), (rm, rp), (em, ep) = pooled(ident), pooled(raw), pooled(enc)
        per_pair = [e.median / r.median for e, r in zip(enc, raw, strict=True)]
        spread = f"{min(per_pair):.2f}-{max(per_pair):.2f}"
        won = f"{sum(p < 1 for p in per_pair)}/{len(per_pair)}"
        nm = DATASETS[dataset].base_nm * 2**mip
        data = f"{dataset} mip {mip} ({nm:g} nm, {size}px)"
        print(
            f"{name:<20} {data:<30} {len(pairs):>5} {im:>7.3f}/{ip:<7.3f} {rm:>7.3f}/{rp:<7.3f} "
            f"{em:>7.3f}/{ep:<7.3f} {em / rm:>9.2f} {spread:>11} {won:>5} {t_raw:>7.1f}/{t_enc:<7.1f}"
        )


if __name__ == "__main__":
    main()
