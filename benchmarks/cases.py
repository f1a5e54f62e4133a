"""Benchmark cases on real EM: a registered section, a known deformation, the field to recover.

Every case is one pair ``(src, tgt)`` of ``(1, 1, S, S)`` float32 normalized sections (mean 0, std 1
over tissue, 0 = no data) with ``src = warp(section, applied)`` and the ground truth
``true = emcore.synthetic.true_alignment_field(applied)`` (``warp(src, true) ~ tgt``), px at mip 0.
Gaussian noise (sigma 0.2) is added to both images, on data pixels only.

Resampling of the source (``resample``): ``"bilinear"`` (default, the tables in
benchmarks/README.md) or ``"bicubic"``. Bilinear resampling blurs the source by an amount that
follows ``frac(applied)`` (a half-pixel sample averages two pixels), a pattern real sections
don't have and that intensity-based aligners partly read as displacement: noise-free, the
finetuner's default leaves 0.033 px median on bilinear sources and 0.012 px on bicubic ones
(benchmarks/README.md).

Kinds (``S`` = 512 by default):

* ``smooth``: ``smooth_field(S, S, 2.0)`` (max 2 px, strain ~1.4%); tgt = section z.
* ``large``: rotation 3 deg + translation (12, -7) px, composed with a smooth 8 px field
  (``compose(affine, smooth)``: ~30 px at the corners); tgt = section z.
* ``neighbour``: tgt = section z, src = section z + 1 (already registered to z) warped by the
  smooth field. The recovered field should still be the known one: anything else is deformation
  invented from the content difference between neighbours.
* ``strain``: locally varying strain, ``smooth_field(S, S, 1.5, grid=g)`` with ``g`` = 12 for the
  first pair of a dataset and 14 for the second (:data:`STRAIN_GRIDS`; features of ~35-45 px,
  strain up to 5-7 %); tgt = section z.
* ``capture``: capture range, a rotation about the centre (+ translation) composed with a smooth
  4 px field (:data:`CAPTURE_MOTIONS`, per pair): 7 deg (46 px at the corners, 41 px at those of
  the evaluated interior), then -5 deg + (-8, 6) px (42 px, 39 px); tgt = section z. A 4-level
  pyramid (mips 3..0) failed on such pairs (7 deg on the vnc crop: 89 % of the interior off by
  > 1 px); 5 levels recover them (benchmarks/README.md).
* ``translation``: capture range for a pure translation (:data:`TRANSLATIONS`: (28, -28) px =
  39.6 px, then (-30, 24) px = 38.4 px; each component below the 32 px border, so the truth
  inverts to 0.01 px) composed with a smooth 4 px field; tgt = section z. Descent from the
  coarsest level finds no slope there at any depth (issue 17);
  ``emcore.finetune.translation_start`` captures it.

Data: the full run uses ``drosophila_vnc_stack1`` (1024 px TIFFs, centre 512 px crop) and
``drosophila_medulla_fibsem`` (520 px PNGs, centre 512 px crop) from
``emcore.bundled.shared_data_dir()`` (``$SECTIONFLOW_SHARED_DATA``); ``quick`` uses the bundled
``data/vnc_stack1`` copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from emcore.bundled import load_vnc_sections, shared_data_dir
from emcore.field import compose, warp
from emcore.normalize import normalize, section_stats
from emcore.stack_import import read_section
from emcore.synthetic import affine_field, smooth_field, true_alignment_field

__all__ = ["KINDS", "RESAMPLING", "Case", "load_sections", "make_case", "make_cases"]

KINDS = ("smooth", "large", "neighbour", "strain", "capture", "translation")
#: Lattice size of the ``strain`` field per pair index (cycled).
STRAIN_GRIDS = (12, 14)
#: ``(rotation deg, translation px)`` of the ``capture`` field per pair index (cycled).
CAPTURE_MOTIONS = ((7.0, (0.0, 0.0)), (-5.0, (-8.0, 6.0)))
#: Translation px of the ``translation`` field per pair index (cycled).
TRANSLATIONS = ((28.0, -28.0), (-30.0, 24.0))
#: How a case's source may be resampled (see the module docstring).
RESAMPLING = ("bilinear", "bicubic")
NOISE_SIGMA = 0.2


@dataclass(frozen=True)
class Case:
    """One benchmark pair. Images ``(1, 1, S, S)`` float32; fields ``(1, 2, S, S)`` px at mip 0."""

    name: str
    kind: str
    src: torch.Tensor
    tgt: torch.Tensor
    applied: torch.Tensor
    true: torch.Tensor


def _centre_crop(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape
    if h < size or w < size:
        raise ValueError(f"section {h}x{w} is smaller than the {size} px crop")
    y, x = (h - size) // 2, (w - size) // 2
    return image[y : y + size, x : x + size]


def load_sections(dataset: str, indices: list[int], size: int) -> np.ndarray:
    """``(Z, size, size)`` uint8 centre crops of ``dataset`` ("vnc", "medulla" or "bundled")."""
    if dataset == "bundled":
        return np.stack([_centre_crop(s, size) for s in load_vnc_sections(indices)])
    folder, pattern = {
        "vnc": ("drosophila_vnc_stack1", "{:02d}.tif"),
        "medulla": ("drosophila_medulla_fibsem", "{:02d}.png"),
    }[dataset]
    root = shared_data_dir() / folder
    if not root.is_dir():
        raise FileNotFoundError(
            f"{root} not found: set SECTIONFLOW_SHARED_DATA to the shared data folder, or use --quick"
        )
    return np.stack([_centre_crop(read_section(root / pattern.format(i)), size) for i in indices])


def _normalized(section: np.ndarray) -> torch.Tensor:
    stats = section_stats(section)
    return torch.from_numpy(normalize(section, stats.mean, stats.std)).view(1, 1, *section.shape)


def _noisy(image: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    noise = NOISE_SIGMA * torch.randn(image.shape, generator=gen)
    out = torch.where(image != 0, image + noise, torch.zeros_like(image))
    return torch.where((image != 0) & (out == 0), torch.full_like(out, 1e-6), out)


def applied_field(kind: str, size: int, seed: int = 0) -> torch.Tensor:
    """The known deformation of a case kind, ``(1, 2, size, size)`` px (``seed``: the pair index
    within a dataset)."""
    if kind in ("smooth", "neighbour"):
        return smooth_field(size, size, 2.0, seed=seed)
    if kind == "large":
        affine = affine_field(size, size, rotation_deg=3.0, translation=(12.0, -7.0))
        return compose(affine, smooth_field(size, size, 8.0, seed=seed))
    if kind == "strain":
        grid = STRAIN_GRIDS[seed % len(STRAIN_GRIDS)]
        return smooth_field(size, size, 1.5, grid=grid, seed=100 + seed)
    if kind == "capture":
        rotation, translation = CAPTURE_MOTIONS[seed % len(CAPTURE_MOTIONS)]
        affine = affine_field(size, size, rotation_deg=rotation, translation=translation)
        return compose(affine, smooth_field(size, size, 4.0, seed=200 + seed))
    if kind == "translation":
        shift = TRANSLATIONS[seed % len(TRANSLATIONS)]
        affine = affine_field(size, size, translation=shift)
        return compose(affine, smooth_field(size, size, 4.0, seed=300 + seed))
    raise ValueError(f"unknown case kind {kind!r}; expected one of {KINDS}")


def make_case(
    kind: str,
    section: np.ndarray,
    next_section: np.ndarray | None,
    name: str,
    seed: int,
    resample: str = "bilinear",
) -> Case:
    """Build one case from ``(S, S)`` uint8 sections (``next_section`` for ``neighbour``);
    ``resample``: how the source is resampled (:data:`RESAMPLING`)."""
    if resample not in RESAMPLING:
        raise ValueError(f"resample must be one of {RESAMPLING}, got {resample!r}")
    size = section.shape[0]
    applied = applied_field(kind, size, seed=seed)
    tgt = _normalized(section)
    moving = tgt if kind != "neighbour" else _normalized(next_section)
    src = warp(moving, applied, mode=resample)
    gen = torch.Generator().manual_seed(1000 + seed)
    true = true_alignment_field(applied, border=32)
    return Case(name, kind, _noisy(src, gen), _noisy(tgt, gen), applied, true)


def make_cases(
    quick: bool,
    *,
    size: int = 512,
    pairs: int = 2,
    kinds: tuple[str, ...] = KINDS,
    resample: str = "bilinear",
) -> list[Case]:
    """The benchmark cases: ``pairs`` sections per dataset and kind (quick: 1, bundled data)."""
    datasets = ["bundled"] if quick else ["vnc", "medulla"]
    pairs = 1 if quick else pairs
    cases = []
    for dataset in datasets:
        zs = [2 * i for i in range(pairs)]
        stack = load_sections(dataset, sorted({z for z in zs} | {z + 1 for z in zs}), size)
        index = {z: i for i, z in enumerate(sorted({z for z in zs} | {z + 1 for z in zs}))}
        for kind in kinds:
            for k, z in enumerate(zs):
                name = f"{dataset} z{z} {kind}"
                cases.append(make_case(kind, stack[index[z]], stack[index[z + 1]], name, k, resample))
    return cases
