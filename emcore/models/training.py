"""Training of the shipped encoders on real EM (metric learning), reproducible from a seed.

Each step draws a batch of pairs of neighbouring sections ``(z, z - k)`` (``k`` in
``recipe.gaps``) from the training sections (:func:`emcore.models.em_data.training_sections`:
the benchmark sections are held out), cut at the same random place (``crop`` px at the recipe's
mip, random flips/rotations); the second section is deformed by a random smooth field
(:func:`emcore.synthetic.smooth_field`, up to ``max_displacement`` px) and both get random EM
artifacts (:func:`emcore.models.artifacts.add_artifacts`). The loss is
:func:`emcore.models.losses.encoder_pair_loss` with a random constant misalignment of
``shift_range`` px (weight ``contrast_weight``) and, when ``basin_magnitudes`` is set, the basin
term (weight ``basin_weight``): a steep MSE basin around the true alignment for constant
misalignments of those sizes (:func:`emcore.models.losses.basin_shifts`, 4 directions each), which
is what the finetuner needs. ``residual=True`` trains ``encoding = image + correction`` from the
identity. The same statistics on the raw images (no encoder) are logged for comparison.

All randomness comes from ``seed`` (one ``torch.Generator`` plus ``torch.manual_seed`` for the
initial weights), and runs use ``threads`` CPU threads, so a command reproduces its model (up to
floating-point differences between machines).

API summary
-----------
* ``EncoderRecipe`` and ``ENCODER_RECIPES`` (one per shipped encoder).
* ``train_encoder(recipe, *, steps=None, seed=0, log=print) -> (EncoderUNet, TrainingLog)``.
* ``encode_crops(net, crops, context_padding)``: the training forward pass.
* ``PairBatch`` / ``sample_pairs(...)``: the batches (also used by the benchmarks' style of cases).
* ``start_training(steps, threads, seed) -> (steps, generator)``: the seeded start every trainer
  (encoders, aligner, defect detector) shares.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from emcore.field import warp
from emcore.models.artifacts import ArtifactSettings, add_artifacts
from emcore.models.em_data import DATASETS, load_stack, training_sections
from emcore.models.encoder import EncoderUNet
from emcore.models.losses import basin_shifts, encoder_pair_loss
from emcore.synthetic import smooth_field

__all__ = [
    "ENCODER_RECIPES",
    "EncoderRecipe",
    "PairBatch",
    "TrainingLog",
    "encode_crops",
    "sample_pairs",
    "start_training",
    "train_encoder",
]


@dataclass(frozen=True)
class Source:
    """Training data: ``dataset`` at ``mip``, crops of ``crop`` px (at that mip)."""

    dataset: str
    mip: int
    crop: int

    @property
    def resolution_nm(self) -> float:
        return DATASETS[self.dataset].base_nm * 2**self.mip

    def describe(self) -> str:
        held = f"{len(training_sections(self.dataset))} training sections"
        return (
            f"{DATASETS[self.dataset].folder} mip {self.mip} ({self.resolution_nm:g} nm/px, "
            f"{self.crop} px crops, {held})"
        )


@dataclass(frozen=True)
class EncoderRecipe:
    """How one shipped encoder is trained (all lengths in px at the source's mip).

    The loss fields are those of :func:`emcore.models.losses.encoder_pair_loss`
    (``margin``, ``contrast_weight``, ``basin_weight``, ``basin_growth``, ``basin_floor``,
    ``basin_tile``); ``context_padding`` encodes each crop inside ``context_px`` px of zeros, as
    :func:`emcore.models.encode.encode_tiled` does (without it, the network's zero padding at the
    crop edge gives src and tgt the same edge pattern, which the loss rewards but
    ``encode_tiled`` never shows).
    ``basin_magnitudes`` are the basin term's shift sizes (empty = no basin term); ``residual``
    is :class:`~emcore.models.encoder.EncoderUNet`'s ``residual``.
    """

    name: str
    resolution_nm: tuple[float, float]
    sources: tuple[Source, ...]
    channels: int = 8
    levels: int = 3
    steps: int = 500
    batch: int = 8
    lr: float = 3e-3
    max_displacement: float = 4.0
    shift_range: tuple[float, float] = (2.0, 6.0)
    gaps: tuple[int, ...] = (1, 2)
    margin: float = 1.5
    residual: bool = False
    contrast_weight: float = 1.0
    basin_magnitudes: tuple[float, ...] = ()
    basin_weight: float = 0.0
    basin_growth: float = 0.5
    basin_floor: float = 1e-3
    basin_tile: int | None = None
    context_padding: bool = False
    threads: int = 1
    note: str = ""


#: The retrained recipe shared by encoder_16_64nm and encoder_256_2048nm: a residual U-Net (raw image
#: at init) trained with the basin term only, on crops with the context padding encode_tiled uses.
_RESIDUAL_BASIN_ONLY: dict[str, Any] = dict(
    residual=True,
    contrast_weight=0.0,
    basin_magnitudes=(0.5, 1.0, 2.0, 3.0),
    basin_weight=1.0,
    basin_growth=0.25,
    context_padding=True,
)

ENCODER_RECIPES = {
    "encoder_16_64nm": EncoderRecipe(
        name="encoder_16_64nm",
        resolution_nm=(16.0, 64.0),
        sources=(Source("vnc", 2, 96), Source("vnc", 3, 64)),
        **_RESIDUAL_BASIN_ONLY,
    ),
    "encoder_64_256nm": EncoderRecipe(
        name="encoder_64_256nm",
        resolution_nm=(64.0, 256.0),
        sources=(Source("vnc", 4, 64), Source("vnc", 5, 32)),
        shift_range=(1.5, 4.0),
        max_displacement=3.0,
    ),
    "encoder_256_2048nm": EncoderRecipe(
        name="encoder_256_2048nm",
        resolution_nm=(256.0, 2048.0),
        sources=(Source("vnc", 5, 32), Source("medulla", 4, 32)),
        shift_range=(1.5, 4.0),
        max_displacement=3.0,
        **_RESIDUAL_BASIN_ONLY,
        note=(
            "trained at 147-160 nm/px, below its range: the 4.7-5.2 um wide stacks give only 16-20 px "
            "per section at 256 nm and 2 px at 2048 nm"
        ),
    ),
}


@dataclass
class TrainingLog:
    """Per-step means over the batch: ``loss``, ``aligned``, ``misaligned_low`` and raw-image baselines."""

    rows: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    def final(self, fraction: float = 0.1) -> dict[str, float]:
        """Means over the last ``fraction`` of the steps (rounded to 4 significant digits)."""
        tail = self.rows[-max(1, math.ceil(len(self.rows) * fraction)) :]
        keys = dict.fromkeys(k for r in tail for k in r)  # rows may log some values only sometimes
        means = {k: sum(r[k] for r in tail if k in r) / sum(k in r for r in tail) for k in keys}
        return {k: float(f"{v:.4g}") for k, v in means.items()}


@dataclass(frozen=True)
class PairBatch:
    """``src``/``tgt`` ``(B, 1, S, S)`` normalized crops; ``tgt`` deformed by ``applied`` (px)."""

    src: torch.Tensor
    tgt: torch.Tensor
    applied: torch.Tensor
    shift: torch.Tensor


def _randint(gen: torch.Generator, lo: int, hi: int) -> int:
    """Uniform integer in ``[lo, hi)``."""
    return int(torch.randint(lo, hi, (), generator=gen))


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def sample_pairs(
    stack: torch.Tensor,
    batch: int,
    crop: int,
    gen: torch.Generator,
    *,
    gaps: Sequence[int],
    max_displacement: float,
    shift_range: tuple[float, float],
    artifacts: ArtifactSettings | None = None,
) -> PairBatch:
    """Draw a batch of deformed neighbour pairs from ``stack`` ``(Z, 1, Y, X)`` (see module doc)."""
    z_count, _, height, width = stack.shape
    if crop > min(height, width):
        raise ValueError(f"crop {crop} px is larger than the sections ({height}x{width} px)")
    usable = [g for g in gaps if g < z_count]
    if not usable:
        raise ValueError(f"stack of {z_count} sections has no pairs {tuple(gaps)} apart")
    srcs, tgts, fields, shifts = [], [], [], []
    for _ in range(batch):
        gap = usable[_randint(gen, 0, len(usable))]
        z = _randint(gen, gap, z_count)
        y, x = _randint(gen, 0, height - crop + 1), _randint(gen, 0, width - crop + 1)
        pair = stack[[z, z - gap], :, y : y + crop, x : x + crop]
        if _randint(gen, 0, 2):
            pair = pair.flip(-1)
        pair = pair.rot90(_randint(gen, 0, 4), dims=(-2, -1))
        magnitude = _uniform(gen, 0.3, 1.0) * max_displacement
        applied = smooth_field(crop, crop, magnitude, grid=_randint(gen, 3, 6), seed=_randint(gen, 0, 2**31))
        angle = _uniform(gen, 0.0, 2 * math.pi)
        size = _uniform(gen, *shift_range)
        shift = torch.tensor([size * math.cos(angle), size * math.sin(angle)]).view(1, 2, 1, 1)
        srcs.append(pair[:1])
        tgts.append(warp(pair[1:], applied))
        fields.append(applied)
        shifts.append(shift.expand(1, 2, crop, crop))
    src, tgt = torch.cat(srcs), torch.cat(tgts)
    return PairBatch(
        src=add_artifacts(src, gen, artifacts),
        tgt=add_artifacts(tgt, gen, artifacts),
        applied=torch.cat(fields),
        shift=torch.cat(shifts),
    )


def encode_crops(net: EncoderUNet, crops: torch.Tensor, context_padding: bool) -> torch.Tensor:
    """The network on ``(N, 1, S, S)`` crops, with gradients: ``(N, 1, S, S)`` raw output.

    ``context_padding=True`` surrounds each crop with ``net.context_px`` px of zeros first, which
    gives exactly what :func:`emcore.models.encode.encode_tiled` gives on tissue; ``False`` runs
    the network on the bare crop (its zero padding then sits at the crop edge).
    """
    if not context_padding:
        return net(crops)
    pad = net.context_px
    return net(F.pad(crops, (pad, pad, pad, pad)))[..., pad:-pad, pad:-pad]


def start_training(steps: int, threads: int, seed: int) -> tuple[int, torch.Generator]:
    """The start every trainer shares: check ``steps``, use ``threads`` CPU threads, seed torch's
    global generator (initial weights) and return ``(steps, generator)`` for the batches."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    return steps, torch.Generator().manual_seed(seed)


def train_encoder(
    recipe: EncoderRecipe,
    *,
    steps: int | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = print,
    log_every: int = 50,
) -> tuple[EncoderUNet, TrainingLog]:
    """Train a fresh encoder by ``recipe`` (``steps`` overrides ``recipe.steps``).

    Returns:
        The trained network (eval mode) and the per-step log.
    """
    steps, gen = start_training(recipe.steps if steps is None else steps, recipe.threads, seed)
    stacks = [load_stack(s.dataset, s.mip, training_sections(s.dataset)) for s in recipe.sources]
    net = EncoderUNet(channels=recipe.channels, levels=recipe.levels, residual=recipe.residual)
    optimizer = torch.optim.Adam(net.parameters(), lr=recipe.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=recipe.lr, total_steps=steps, pct_start=0.1
    )
    shifts = basin_shifts(recipe.basin_magnitudes)
    history = TrainingLog()
    start = time.perf_counter()
    net.train()
    for step in range(steps):
        which = step % len(recipe.sources)
        source = recipe.sources[which]
        batch = sample_pairs(
            stacks[which],
            recipe.batch,
            source.crop,
            gen,
            gaps=recipe.gaps,
            max_displacement=recipe.max_displacement,
            shift_range=recipe.shift_range,
        )
        src_data, tgt_data = batch.src != 0, batch.tgt != 0
        encoded = encode_crops(net, torch.cat((batch.src, batch.tgt)), recipe.context_padding)
        enc_src, enc_tgt = encoded[: recipe.batch], encoded[recipe.batch :]
        kwargs = dict(
            tile=max(8, source.crop // 8),
            margin=recipe.margin,
            contrast_weight=recipe.contrast_weight,
            basin=shifts,
            basin_weight=recipe.basin_weight,
            basin_growth=recipe.basin_growth,
            basin_floor=recipe.basin_floor,
            basin_tile=recipe.basin_tile,
        )
        terms = encoder_pair_loss(enc_src, enc_tgt, batch.applied, batch.shift, src_data, tgt_data, **kwargs)
        loss = terms.loss.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            raw = encoder_pair_loss(
                batch.src, batch.tgt, batch.applied, batch.shift, src_data, tgt_data, **kwargs
            )
        history.rows.append(
            {
                "loss": float(loss.detach()),
                "aligned": float(terms.aligned.detach().mean()),
                "misaligned_low": float(terms.misaligned_low.detach().mean()),
                "collapse": float(terms.collapse.detach().mean()),
                "raw_loss": float(raw.loss.mean()),
                "raw_aligned": float(raw.aligned.mean()),
                "raw_misaligned_low": float(raw.misaligned_low.mean()),
            }
        )
        if shifts:
            history.rows[-1]["basin"] = float(terms.basin.detach().mean())
            history.rows[-1]["raw_basin"] = float(raw.basin.mean())
        if log is not None and (step % log_every == 0 or step == steps - 1):
            r = history.rows[-1]
            basin = f", basin {r['basin']:.3f}" if shifts else ""
            raw_basin = f", basin {r['raw_basin']:.3f}" if shifts else ""
            log(
                f"{recipe.name} step {step:4d}/{steps}: loss {r['loss']:.3f} (aligned {r['aligned']:.3f}, "
                f"misaligned p10 {r['misaligned_low']:.3f}{basin}); raw images: loss {r['raw_loss']:.3f} "
                f"(aligned {r['raw_aligned']:.3f}, misaligned p10 {r['raw_misaligned_low']:.3f}{raw_basin}) "
                f"[{time.perf_counter() - start:.0f} s]"
            )
    history.seconds = time.perf_counter() - start
    return net.eval(), history
