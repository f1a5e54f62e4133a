"""Self-supervised training of the learned coarse aligner on real EM with large known deformations.

Each step draws pairs of neighbouring sections ``(z, z - k)`` of the training sections at the
recipe's mip (``crop`` px, random rotations by 90 deg). The first is the target; the second is
deformed by :func:`large_deformation` (rotation + translation + a smooth field, and with
probability ``fold_probability`` a fold, :func:`emcore.synthetic.fold_field`) and both get EM
artifacts. The aligner sees only the images. Its loss is the finetuner's own loss
(:func:`emcore.finetune.losses.alignment_loss_terms`, shared, not rewritten): masked MSE of
``warp(moving, field)`` against the target plus ``sm`` x the 8-neighbour spring rigidity, with the
fold's band given as a target-frame defect (no MSE there and no springs across it, so the field
may tear there), without the finetuner's tiny L2 term (``l2_weight`` 0: large displacements are
the point here). It is summed over the pyramid levels: each level's field (px at that level)
against that level's images (:func:`emcore.pyramid.downsample_image_torch` pyramids, defects
downsampled by max). Only the images and the loss drive training: the known synthetic field is
used for logging the residual, never in the loss.

``REFINER_RECIPE`` (the shipped ``pyramid_refiner``) learns only what remains after the classical
affine aligner (:mod:`emcore.models.refine`); ``ALIGNER_RECIPE`` (``pyramid_aligner``) is the
stand-alone aligner for the whole deformation.

API summary
-----------
* ``AlignerRecipe``, ``ALIGNER_RECIPE`` (the stand-alone aligner), ``REFINER_RECIPE`` (the
  self-supervised refiner after the classical affine aligner), ``ALIGNER_RECIPES`` (by model name).
* ``large_deformation(size, gen, max_px, fold_probability, affine_scale=1) -> Deformation``
  (``applied`` field, ``true`` alignment field, ``defects`` mask in the target frame).
* ``aligner_training_loss(fields, src_pyramid, tgt_pyramid, tgt_defects, sm) -> (loss, mse, rigidity)``.
* ``train_aligner(recipe, *, steps=None, seed=0, log=print) -> (PyramidAligner, TrainingLog)``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from emcore.field import compose, warp
from emcore.finetune.losses import alignment_loss_terms
from emcore.models.artifacts import add_artifacts
from emcore.models.em_data import load_stack, training_sections
from emcore.models.pyramid_aligner import PyramidAligner
from emcore.models.training import Source, TrainingLog, start_training
from emcore.pyramid import downsample_mask_torch
from emcore.synthetic import affine_field, fold_field, smooth_field, true_alignment_field

__all__ = [
    "ALIGNER_RECIPE",
    "ALIGNER_RECIPES",
    "REFINER_RECIPE",
    "AlignerRecipe",
    "Deformation",
    "aligner_training_loss",
    "large_deformation",
    "train_aligner",
]


@dataclass(frozen=True)
class AlignerRecipe:
    """How a shipped aligner is trained (lengths in px at the sources' mip).

    ``sm`` is the rigidity weight of the finetuner's loss (its spring term, see
    :mod:`emcore.finetune.loss_reference`), applied at every pyramid level.
    """

    resolution_nm: tuple[float, float]
    sources: tuple[Source, ...]
    levels: int = 4
    channels: int = 8
    hidden: int = 16
    steps: int = 300
    batch: int = 8
    lr: float = 2e-3
    max_displacement: float = 14.0
    fold_probability: float = 0.5
    sm: float = 5.0
    gaps: tuple[int, ...] = (1, 2)
    threads: int = 1
    affine_scale: float = 1.0
    curriculum_fraction: float = 0.0

    @property
    def supervision_weight(self) -> float:
        """Always 0: the loss never sees the known field (kept for the recorded provenance)."""
        return 0.0


# sm and lr picked by a sweep (300 steps, seed 0, one process per recipe on a 16-core machine;
# median px at mip 0 over the 8 rows of the held-out benchmarks/bench_aligner.py; see
# emcore/models/weights/README.md): sm 1 / 5 / 25 / 100 at lr 2e-3 gave 7.0-9.6 / 12-40 / 13-44 /
# 13-44 px (sm >= 25: the network stayed near the identity); sm 5 at lr 5e-3: 4.8-8.4 px (shipped);
# sm 5 with a 40% curriculum at lr 2e-3: 6.9-13.8 px.
ALIGNER_RECIPE = AlignerRecipe(
    resolution_nm=(32.0, 80.0),
    sources=(Source("vnc", 3, 128), Source("medulla", 2, 128)),
    sm=5.0,
    lr=5e-3,
)

# The refiner runs after the classical affine aligner (emcore.coarse_xcorr.coarse_align), so it
# sees what that leaves: a small affine error (affine_scale 0.1: rotation <= 0.3 deg, translation
# <= 0.84 px), the non-affine smooth part (up to 0.25 x 14 = 3.5 px) and folds. The deformations
# grow from 30% to full size over the first 40% of the steps. Sweep (900 steps, seed 0, cls+refine
# / classical median ratio over the 8 benchmark rows): sm 5: 0.85-1.36 (follows content changes);
# sm 25 / 100 / 400 at lr 2e-3: 0.78-1.15 / 0.84-1.15 / 0.84-1.15; sm 25 at lr 5e-3: 0.74-1.03
# (shipped).
REFINER_RECIPE = AlignerRecipe(
    resolution_nm=(32.0, 80.0),
    sources=(Source("vnc", 3, 64), Source("medulla", 2, 64)),
    levels=3,
    steps=900,
    lr=5e-3,
    sm=25.0,
    affine_scale=0.1,
    curriculum_fraction=0.4,
)
ALIGNER_RECIPES = {"pyramid_aligner": ALIGNER_RECIPE, "pyramid_refiner": REFINER_RECIPE}


@dataclass(frozen=True)
class Deformation:
    """``applied`` ``(1, 2, S, S)``: moving = warp(section, applied); ``true``: warp(moving, true) ~
    section; ``defects`` ``(1, 1, S, S)`` bool, the fold band in the target (section) frame."""

    applied: torch.Tensor
    true: torch.Tensor | None
    defects: torch.Tensor


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def large_deformation(
    size: int,
    gen: torch.Generator,
    max_px: float,
    fold_probability: float = 0.5,
    *,
    with_true: bool = True,
    affine_scale: float = 1.0,
) -> Deformation:
    """A random large deformation of a ``size`` px square: up to about ``max_px`` px displacement.

    Rotation (up to +-3 deg), translation (up to ``0.6 * max_px``), a smooth field (up to
    ``0.25 * max_px``), and with probability ``fold_probability`` a fold of 1.5-4 px
    (:func:`emcore.synthetic.fold_field`) applied first (``moving = warp(warp(section, fold),
    smooth_affine)``). ``with_true=False`` skips computing ``true`` (an iterative inversion,
    the slowest part; the random draws are the same either way). ``affine_scale`` scales the
    rotation and translation only (0.1: what is left after an affine pre-alignment).
    """
    angle = _uniform(gen, -3.0, 3.0) * affine_scale
    direction = _uniform(gen, 0.0, 2 * math.pi)
    shift = _uniform(gen, 0.2, 0.6) * max_px * affine_scale
    translation = (shift * math.cos(direction), shift * math.sin(direction))
    affine = affine_field(size, size, rotation_deg=angle, translation=translation)
    seed = int(torch.randint(0, 2**31, (), generator=gen))
    smooth = smooth_field(size, size, _uniform(gen, 0.05, 0.25) * max_px, grid=3, seed=seed)
    smooth_affine = compose(affine, smooth)
    # The inverse is extrapolated where the field reads outside the image: check the interior only.
    border = min(size // 4, math.ceil(1.5 * max_px) + 4)
    true = true_alignment_field(smooth_affine, border=border) if with_true else None
    defects = torch.zeros(1, 1, size, size, dtype=torch.bool)
    applied = smooth_affine
    if _uniform(gen, 0.0, 1.0) < fold_probability:
        width = _uniform(gen, 1.5, 4.0)
        fold_angle = _uniform(gen, 0.0, 360.0)
        offset = _uniform(gen, -0.3, 0.3) * size
        fold, _ = fold_field(size, size, angle_deg=fold_angle, offset_px=offset, fold_width_px=width)
        # The inverse of the fold (target frame): +width beyond the line; the band before the line
        # appears twice in the moving image, so it is the defect in the target frame.
        _, defects = fold_field(
            size, size, angle_deg=fold_angle, offset_px=offset - width, fold_width_px=width
        )
        applied = compose(smooth_affine, fold)  # the fold first, in the section's frame
        true = compose(-fold, true) if true is not None else None
    return Deformation(applied=applied, true=true, defects=defects)


def aligner_training_loss(
    fields: list[torch.Tensor],
    src_pyramid: list[torch.Tensor],
    tgt_pyramid: list[torch.Tensor],
    tgt_defects: torch.Tensor,
    sm: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The self-supervised loss of one batch: ``(total, mse, rigidity)``.

    Args:
        fields: per level, finest first, ``(N, 2, H_l, W_l)`` px at level ``l``
            (:meth:`PyramidAligner.forward_levels`).
        src_pyramid, tgt_pyramid: the images at the same levels, ``(N, 1, H_l, W_l)``.
        tgt_defects: ``(N, 1, H, W)`` bool at level 0, target frame (fold bands: torn, not fitted).
        sm: rigidity weight of the finetuner's spring term.

    Returns:
        ``total``: scalar, the sum over levels of the batch mean of ``mse + sm * rigidity``
        (:func:`emcore.finetune.losses.alignment_loss_terms`); ``mse``, ``rigidity``: ``(N,)`` at
        level 0 (for logging).
    """
    total = fields[0].new_zeros(())
    defects = tgt_defects.bool()
    level0: tuple[torch.Tensor, torch.Tensor] | None = None
    for level, field in enumerate(fields):
        if level:
            defects = downsample_mask_torch(defects)
        terms = alignment_loss_terms(
            src_pyramid[level], tgt_pyramid[level], field, tgt_defects=defects, backend="auto"
        )
        total = total + (terms.mse + sm * terms.rigidity).mean()
        if level == 0:
            level0 = (terms.mse, terms.rigidity)
    assert level0 is not None
    return total, *level0


def train_aligner(
    recipe: AlignerRecipe,
    *,
    steps: int | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = print,
    log_every: int = 50,
    residual_every: int = 10,
) -> tuple[PyramidAligner, TrainingLog]:
    """Train a fresh :class:`PyramidAligner` by ``recipe``; returns it (eval mode) and its log.

    ``log_every`` must be a multiple of ``residual_every`` (the residual is logged on those steps).
    """
    if log_every % residual_every:
        raise ValueError(f"log_every ({log_every}) must be a multiple of residual_every ({residual_every})")
    steps, gen = start_training(recipe.steps if steps is None else steps, recipe.threads, seed)
    stacks = [load_stack(s.dataset, s.mip, training_sections(s.dataset)) for s in recipe.sources]
    net = PyramidAligner(levels=recipe.levels, channels=recipe.channels, hidden=recipe.hidden)
    ramp_steps = recipe.curriculum_fraction * steps
    optimizer = torch.optim.Adam(net.parameters(), lr=recipe.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    history = TrainingLog()
    start = time.perf_counter()
    net.train()
    for step in range(steps):
        which = step % len(recipe.sources)
        stack, crop = stacks[which], recipe.sources[which].crop
        z_count, _, height, width = stack.shape
        tgts, movings, trues, defects = [], [], [], []
        check = step % residual_every == 0 or step == steps - 1
        for _ in range(recipe.batch):
            gap = recipe.gaps[int(torch.randint(0, len(recipe.gaps), (), generator=gen))]
            z = int(torch.randint(gap, z_count, (), generator=gen))
            y = int(torch.randint(0, height - crop + 1, (), generator=gen))
            x = int(torch.randint(0, width - crop + 1, (), generator=gen))
            pair = stack[[z, z - gap], :, y : y + crop, x : x + crop]
            pair = pair.rot90(int(torch.randint(0, 4, (), generator=gen)), dims=(-2, -1))
            grown = min(1.0, 0.3 + 0.7 * step / ramp_steps) if ramp_steps else 1.0
            deformation = large_deformation(
                crop,
                gen,
                recipe.max_displacement * grown,
                recipe.fold_probability,
                with_true=check,
                affine_scale=recipe.affine_scale,
            )
            tgts.append(pair[:1])
            movings.append(warp(pair[1:], deformation.applied))
            trues.append(deformation.true)
            defects.append(deformation.defects)
        tgt = add_artifacts(torch.cat(tgts), gen)
        moving = add_artifacts(torch.cat(movings), gen)
        defect = torch.cat(defects)
        # The same loss at every level of the pyramid (each level's field against that level's
        # images), so coarse levels learn directly.
        fields, src_pyr, tgt_pyr = net.forward_levels(moving, tgt)
        field = fields[0]
        total, mse, rig = aligner_training_loss(fields, src_pyr, tgt_pyr, defect, recipe.sm)
        loss = mse + recipe.sm * rig
        optimizer.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        row = {"loss": float(loss.detach().mean()), "mse": float(mse.detach().mean())}
        row["rigidity"] = float(rig.detach().mean())
        if check:  # the residual against the known field, every residual_every steps
            with torch.no_grad():
                true = torch.cat(trues)
                err = (field - true).norm(dim=1)[..., 8:-8, 8:-8]
                row["residual_px"] = float(err.flatten(1).median(dim=1).values.mean())
                size = true.norm(dim=1)[..., 8:-8, 8:-8]
                row["identity_residual_px"] = float(size.flatten(1).median(dim=1).values.mean())
        history.rows.append(row)
        if log is not None and (step % log_every == 0 or step == steps - 1):
            r = history.rows[-1]
            log(
                f"aligner step {step:4d}/{steps}: loss {r['loss']:.3f} (mse {r['mse']:.3f}, "
                f"rigidity {r['rigidity']:.4f}); median residual {r['residual_px']:.2f} px "
                f"(identity {r['identity_residual_px']:.2f} px) [{time.perf_counter() - start:.0f} s]"
            )
    history.seconds = time.perf_counter() - start
    return net.eval(), history
