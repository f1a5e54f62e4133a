"""Classical coarse aligner (``emcore.coarse_xcorr.coarse_align``) on large known deformations.

Real EM, neighbouring sections: the target is section ``z`` and the source is section ``z + 1``
(the stacks are already registered, so ``z + 1`` lies in ``z``'s frame) warped at base resolution
(mip 0) by a known deformation of 20-100 px. Both images are downsampled to a low mip (masked
2x2 means, :func:`emcore.pyramid.downsample_image`) and aligned there; the resulting field is
brought back to mip 0 (:func:`emcore.field.resample_field`) and compared with the true alignment
field (the exact inverse of the applied one). Residuals ``|field - true|`` are px at mip 0, over
the interior (``BORDER`` px at mip 0 excluded at each edge), via :func:`emcore.metrics.field_residual`.

Deformations (mip 0): translations of 20, 60 and 100 px; rotations of 3 deg and 5 deg about the
centre with 30-50 px translations (largest interior displacement ~60-100 px); an affine with 3%
scale; and a rigid motion composed with a smooth 10 px non-affine field (which an affine model
cannot follow: its residual is the floor of any coarse model).

Rows per deformation: ``identity`` (no alignment: the size of the problem), ``coarse`` (affine
model), and with ``--elastix`` the itk-elastix ``rigid+grid32`` peer (``benchmarks.peers``, 1
thread, same mip, first neighbour pair of each dataset only: ~10-30 s per pair here). ``vs id``
= median / identity median (lower is better); ``time x`` = time / coarse time, same pair set.

The ``none (floor)`` row aligns undeformed neighbours: the published stacks are registered, but
neighbouring sections still differ by a few px at mip 0 (content that runs obliquely through z,
residual registration error), so the best any aligner can reach against "true = inverse of the
applied field" on neighbour pairs is about that floor. The ``same`` block (source = the target
section itself) measures the aligner's own error.

Data: ``drosophila_vnc_stack1`` (1024 px, 4.6 nm, aligned at mip 2 = 256 px) and
``drosophila_medulla_fibsem`` (centre 512 px crop, 10 nm, aligned at mip 1 = 256 px) from
``$SECTIONFLOW_SHARED_DATA``; ``--quick`` uses two pairs of the bundled VNC copy.

    .venv/bin/python -m benchmarks.bench_coarse [--quick] [--elastix]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from benchmarks.cases import load_sections
from emcore.coarse_xcorr import affine_displacement_field, coarse_align, invert_matrix
from emcore.field import compose, identity, resample_field, warp
from emcore.metrics import field_residual
from emcore.normalize import normalize, section_stats
from emcore.pyramid import downsample_image
from emcore.synthetic import affine_field, smooth_field, true_alignment_field

BORDER = 128  # px at mip 0


@dataclass(frozen=True)
class Deformation:
    """A known motion at mip 0: rotation (deg) about the centre, scale, translation px, smooth px."""

    name: str
    rotation: float = 0.0
    scale: float = 1.0
    translation: tuple[float, float] = (0.0, 0.0)
    smooth_px: float = 0.0


DEFORMATIONS = (
    Deformation("none (floor)"),
    Deformation("translate 20 px", translation=(16.0, -12.0)),
    Deformation("translate 60 px", translation=(-36.0, 48.0)),
    Deformation("translate 100 px", translation=(80.0, 60.0)),
    Deformation("rotate 3 + 30 px", rotation=3.0, translation=(-24.0, 18.0)),
    Deformation("rotate -5 + 50 px", rotation=-5.0, translation=(30.0, -40.0)),
    Deformation("affine 3% + 40 px", rotation=2.0, scale=1.03, translation=(-32.0, -24.0)),
    Deformation("rigid + smooth 10", rotation=3.0, translation=(24.0, 24.0), smooth_px=10.0),
)

DATASETS = {  # name: (dataset for benchmarks.cases.load_sections, crop px at mip 0, mip)
    "vnc": ("vnc", 1024, 2),
    "medulla": ("medulla", 512, 1),
    "bundled": ("bundled", 1024, 2),
}


def _affine_matrix(d: Deformation, size: int) -> torch.Tensor:
    """Displacement matrix of ``affine_field(size, size, ...)`` for ``d`` (see emcore.synthetic)."""
    theta = np.radians(d.rotation)
    c, s = np.cos(theta) * d.scale, np.sin(theta) * d.scale
    lin = torch.tensor([[c - 1.0, -s], [s, c - 1.0]], dtype=torch.float64)
    centre = torch.full((2,), (size - 1) / 2.0, dtype=torch.float64)
    offset = torch.tensor(d.translation, dtype=torch.float64) - lin @ centre
    return torch.cat((lin, offset[:, None]), dim=1)


def applied_and_true(d: Deformation, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The applied field and the true alignment field, ``(1, 2, size, size)`` px at mip 0."""
    affine = affine_field(size, size, rotation_deg=d.rotation, translation=d.translation, scale=d.scale)
    if d.smooth_px == 0:
        true = affine_displacement_field(invert_matrix(_affine_matrix(d, size)), size, size)
        return affine, true
    applied = compose(affine, smooth_field(size, size, d.smooth_px, seed=seed))
    return applied, true_alignment_field(applied, border=BORDER)


def _normalized(section: np.ndarray) -> torch.Tensor:
    stats = section_stats(section)
    return torch.from_numpy(normalize(section, stats.mean, stats.std)).view(1, 1, *section.shape)


def _to_mip(image: torch.Tensor, mip: int) -> torch.Tensor:
    arr = image.numpy()
    for _ in range(mip):
        arr = downsample_image(arr)
    return torch.from_numpy(np.ascontiguousarray(arr))


def _time(fn: Callable[[], object]) -> tuple:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run_block(
    sections: dict[int, np.ndarray],
    pair_starts: list[int],
    mip: int,
    label: str,
    pairing: str,
    elastix: Callable[..., torch.Tensor] | None,
) -> None:
    """Print one table block: every deformation on every pair of one dataset and pairing.

    ``sections``: ``{z: (S, S) uint8}`` at mip 0; ``pairing``: ``"neighbour"`` (source = z + 1) or
    ``"same"`` (source = z itself, i.e. only the aligner's own error).
    """
    crop = next(iter(sections.values())).shape[0]
    for di, d in enumerate(DEFORMATIONS):
        rows: dict[str, list[tuple[float, float, float]]] = {"identity": [], "coarse": [], "elastix": []}
        reliable = 0
        coarse_times: list[float] = []
        for pi, z in enumerate(pair_starts):
            applied, true = applied_and_true(d, crop, seed=10 * di + pi)
            tgt0 = _normalized(sections[z])
            moving = sections[z + 1] if pairing == "neighbour" else sections[z]
            src0 = warp(_normalized(moving), applied)
            src, tgt = _to_mip(src0, mip), _to_mip(tgt0, mip)
            result, t_coarse = _time(lambda src=src, tgt=tgt: coarse_align(src, tgt, model="affine"))
            reliable += int(result.reliable)
            coarse_times.append(t_coarse)
            fields = {"identity": (identity(1, crop, crop), 0.0)}
            fields["coarse"] = (resample_field(result.field, mip, 0), t_coarse)
            if elastix is not None and pi == 0 and pairing == "neighbour":
                low_field, t_el = _time(
                    lambda src=src, tgt=tgt: elastix(
                        src[0, 0].numpy(), tgt[0, 0].numpy(), parameter_map="rigid+grid32"
                    )
                )
                fields["elastix"] = (resample_field(low_field, mip, 0), t_el)
            for name, (field, seconds) in fields.items():
                r = field_residual(field, true, border=BORDER)
                rows[name].append((r.median, r.p95, seconds))
        ident = float(np.mean([r[0] for r in rows["identity"]]))
        for name, values in rows.items():
            if not values:
                continue
            med, p95, secs = (float(v) for v in np.mean(values, axis=0))
            n = len(values)
            ref_time = float(np.mean(coarse_times[:n]))
            ok = f"{reliable}/{len(pair_starts)}" if name == "coarse" else ""
            time_cells = (
                f"{'':>7} {'':>7}" if name == "identity" else f"{secs:>7.2f} {secs / ref_time:>6.1f}x"
            )
            vs_id = f"{med / ident:>6.3f}" if ident > 0 else f"{'-':>6}"
            print(
                f"{label:<18} {d.name:<19} {name:<9} {n:>5} {med:>8.2f} {p95:>8.2f} "
                f"{vs_id} {time_cells} {ok:>4}"
            )
        print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two bundled VNC pairs only")
    parser.add_argument("--elastix", action="store_true", help="also run the itk-elastix peer (slow)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    datasets = ["bundled"] if args.quick else ["vnc", "medulla"]
    pair_starts = [0, 4]

    elastix = None
    if args.elastix:
        from benchmarks.peers import elastix_field

        warm = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32) + 3.0
        elastix_field(warm, warm, parameter_map="rigid+grid32")  # load itk once, outside the timings
        elastix = elastix_field

    print("# bench_coarse: emcore.coarse_xcorr.coarse_align(model='affine') on neighbouring real EM sections")
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"# torch {torch.__version__}, 1 thread; load average {load}")
    print("# residual |field - true| in px at mip 0 over the interior (border 128 px at mip 0);")
    print("# cells = mean over pairs of each pair's median / p95; time = mean seconds per pair at the mip\n")
    header = (
        f"{'data (mip, px)':<18} {'deformation':<19} {'method':<9} {'pairs':>5} {'median':>8} {'p95':>8} "
        f"{'vs id':>6} {'time s':>7} {'time x':>7} {'ok':>4}"
    )
    print(header)
    print("-" * len(header))
    for dataset in datasets:
        source, crop, mip = DATASETS[dataset]
        zs = sorted({z for s in pair_starts for z in (s, s + 1)})
        sections = dict(zip(zs, load_sections(source, zs, crop), strict=True))
        label = f"{dataset} ({mip}, {crop >> mip})"
        for pairing in ("neighbour", "same"):
            moving = "section z + 1" if pairing == "neighbour" else "section z itself"
            print(f"## {dataset}: target = section z, source = {moving}")
            run_block(sections, pair_starts, mip, label, pairing, elastix)


if __name__ == "__main__":
    main()
