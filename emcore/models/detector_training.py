"""Training and evaluation of the shipped fold/crack detector on synthetic defects in real EM.

Data: every training section (:func:`emcore.models.em_data.training_sections`; the benchmark
sections are held out) of both stacks at about 40 nm/px (``vnc`` mip 3, 36.8 nm, 128 px;
``medulla`` mip 2, 40 nm, 130 px) and at about 20 nm/px (``vnc`` mip 2, 18.4 nm, 256 px;
``medulla`` mip 1, 20 nm, 260 px: issue 16, a 10 px crack at 9-10 nm/px is a 2.5 px line at
40 nm/px, too thin to tell from a knife streak, and a 5 px one at 20 nm/px), normalized. Each
section gets ``defects_per_section`` synthetic defects (:func:`emcore.synthetic_defects.make_defect`
with :func:`emcore.synthetic_defects.random_settings`: folds or cracks, half of them partial tears,
cracks filled with resin or left empty; ``displacement_px`` and ``width_px`` of the recipe, px at
that mip, and its ``resin_level``: resin brighter than the brightest tissue), drawn once into a
pool. Each step draws ``batch`` items from the pool (a fraction ``clean_fraction`` of them clean
sections, no defect), cuts a random ``crop`` px square, flips / rotates it and adds random EM
artifacts (:func:`emcore.models.artifacts.add_artifacts`).

Target: the defect mask on tissue, ``mask & (image != 0)``: a fold band or a resin-filled gap;
a crack gap left empty is no data (0), which every consumer already treats as "nothing here", so
it is not a target (and :func:`emcore.models.detect.detect_defects` never marks no-data pixels).
Loss: binary cross-entropy on the logits + ``dice_weight`` x (1 - soft Dice over the batch).

Network: :class:`emcore.models.encoder.EncoderUNet` (``"unet_encoder"``) with one output channel,
the defect logit; trained on bare crops (zero padding at the crop edge).

All randomness comes from ``seed`` (one ``torch.Generator`` plus ``torch.manual_seed`` for the
initial weights), on ``threads`` CPU threads.

API summary
-----------
* ``DetectorRecipe`` / ``DETECTOR_RECIPE``.
* ``defect_pool(recipe, source, sections=None, count=None, seed=0, settings=None) -> DefectPool``
  (images, targets).
* ``train_detector(recipe, *, steps=None, seed=0, log=print) -> (EncoderUNet, TrainingLog)``.
* ``evaluate_detector(model, recipe, *, seed=1000, threshold=0.5, settings=None) -> dict`` on the
  held-out sections: pixel precision / recall / IoU on synthetic defects, and the false-positive area on
  the clean sections (with and without artifacts).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from emcore.models.artifacts import ArtifactSettings, add_artifacts
from emcore.models.em_data import DATASETS, HELD_OUT, load_stack, training_sections
from emcore.models.encoder import EncoderUNet
from emcore.models.training import Source, TrainingLog, start_training
from emcore.synthetic_defects import DefectSettings, make_defect, random_settings

__all__ = [
    "DETECTOR_RECIPE",
    "DefectPool",
    "DetectorRecipe",
    "defect_pool",
    "evaluate_detector",
    "train_detector",
]


@dataclass(frozen=True)
class DetectorRecipe:
    """How the shipped detector is trained (lengths in px at the sources' mips, ~37-40 nm/px).

    ``encoder``: a shipped encoder name to train on its encodings (the images, artifacts
    included, go through :func:`emcore.models.encode.encode_tiled` first); ``None`` = the
    normalized images themselves (the shipped detector).
    """

    name: str = "defect_detector"
    resolution_nm: tuple[float, float] = (15.0, 50.0)
    sources: tuple[Source, ...] = (
        Source("vnc", 3, 96), Source("medulla", 2, 96), Source("vnc", 2, 96), Source("medulla", 1, 96),
    )  # fmt: skip
    channels: int = 8
    levels: int = 4
    steps: int = 4000
    batch: int = 8
    lr: float = 3e-3
    displacement_px: tuple[float, float] = (4.0, 40.0)
    width_px: tuple[float, float] = (3.0, 16.0)
    resin_level: tuple[float, float] = (2.5, 4.0)
    defects_per_section: int = 6
    clean_fraction: float = 0.2
    dice_weight: float = 1.0
    artifacts: ArtifactSettings = ArtifactSettings()
    encoder: str | None = None
    threads: int = 1

    @property
    def defects(self) -> DefectSettings:
        return DefectSettings(
            displacement_px=self.displacement_px, width_px=self.width_px, resin_level=self.resin_level
        )


DETECTOR_RECIPE = DetectorRecipe()


@dataclass(frozen=True)
class DefectPool:
    """Defected sections ``(M, 1, S, S)`` and their tissue defect targets (bool), plus clean ones."""

    images: torch.Tensor
    targets: torch.Tensor
    clean: torch.Tensor


def defect_pool(
    recipe: DetectorRecipe,
    source: Source,
    sections: Sequence[int] | None = None,
    *,
    count: int | None = None,
    seed: int = 0,
    settings: DefectSettings | None = None,
) -> DefectPool:
    """``count`` (default ``recipe.defects_per_section``) synthetic defects per section of ``source``.

    ``sections`` defaults to the training sections. Sections are cropped to a common square (the
    smaller side), so the pool stacks. ``settings``: every defect drawn with these (kind, fill,
    ranges) instead of the recipe's random ones (e.g. thin resin cracks only).
    """
    sections = training_sections(source.dataset) if sections is None else list(sections)
    stack = load_stack(source.dataset, source.mip, sections)
    size = min(stack.shape[-2:])
    stack = stack[..., :size, :size]
    gen = torch.Generator().manual_seed(seed)
    count = recipe.defects_per_section if count is None else count
    images, targets = [], []
    for z in range(stack.shape[0]):
        for _ in range(count):
            drawn = random_settings(gen, recipe.defects) if settings is None else settings
            d = make_defect(stack[z : z + 1], gen, drawn)
            images.append(d.image)
            targets.append(d.mask & (d.image != 0))
    return DefectPool(torch.cat(images), torch.cat(targets), stack)


def _randint(gen: torch.Generator, lo: int, hi: int) -> int:
    return int(torch.randint(lo, hi, (), generator=gen))


def _sample(
    pool: DefectPool, recipe: DetectorRecipe, crop: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of ``(images, targets)`` ``(B, 1, crop, crop)`` (float, bool), with artifacts."""
    images, targets = [], []
    size = pool.images.shape[-1]
    for _ in range(recipe.batch):
        if float(torch.rand((), generator=gen)) < recipe.clean_fraction:
            i = _randint(gen, 0, pool.clean.shape[0])
            image, target = pool.clean[i : i + 1], torch.zeros_like(pool.clean[i : i + 1], dtype=torch.bool)
        else:
            i = _randint(gen, 0, pool.images.shape[0])
            image, target = pool.images[i : i + 1], pool.targets[i : i + 1]
        y, x = _randint(gen, 0, size - crop + 1), _randint(gen, 0, size - crop + 1)
        pair = torch.cat((image, target.to(image.dtype)), 1)[..., y : y + crop, x : x + crop]
        if _randint(gen, 0, 2):
            pair = pair.flip(-1)
        pair = pair.rot90(_randint(gen, 0, 4), dims=(-2, -1))
        images.append(pair[:, :1])
        targets.append(pair[:, 1:] > 0.5)
    image = add_artifacts(torch.cat(images), gen, recipe.artifacts)
    target = torch.cat(targets) & (image != 0)  # a zeroed region is no data, not a defect
    return image, target


def _inputs(recipe: DetectorRecipe) -> Callable[[torch.Tensor], torch.Tensor]:
    """The detector's input from normalized images: themselves, or ``recipe.encoder``'s encodings."""
    if recipe.encoder is None:
        return lambda image: image
    from emcore.models import encode_tiled, load_model

    encoder = load_model(recipe.encoder)
    return lambda image: encode_tiled(encoder, image)


def _loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float) -> tuple[torch.Tensor, float]:
    t = target.to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, t)
    p = torch.sigmoid(logits)
    dice = (2 * (p * t).sum() + 1.0) / (p.sum() + t.sum() + 1.0)
    return bce + dice_weight * (1 - dice), float(dice.detach())


def train_detector(
    recipe: DetectorRecipe = DETECTOR_RECIPE,
    *,
    steps: int | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = print,
    log_every: int = 100,
) -> tuple[EncoderUNet, TrainingLog]:
    """Train a fresh detector by ``recipe`` (``steps`` overrides ``recipe.steps``).

    Returns:
        The network (eval mode; output = defect logit) and the per-step log (``loss``, ``dice``).
    """
    steps, gen = start_training(recipe.steps if steps is None else steps, recipe.threads, seed)
    start = time.perf_counter()
    pools = [defect_pool(recipe, s, seed=seed + 1 + k) for k, s in enumerate(recipe.sources)]
    prepare = _inputs(recipe)
    if log is not None:
        sizes = ", ".join(
            f"{s.dataset}: {p.images.shape[0]}" for s, p in zip(recipe.sources, pools, strict=True)
        )
        log(f"{recipe.name}: defect pools ({sizes}) in {time.perf_counter() - start:.0f} s")
    net = EncoderUNet(channels=recipe.channels, levels=recipe.levels, out_channels=1)
    optimizer = torch.optim.Adam(net.parameters(), lr=recipe.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=recipe.lr, total_steps=steps, pct_start=0.1
    )
    history = TrainingLog()
    net.train()
    for step in range(steps):
        which = step % len(recipe.sources)
        image, target = _sample(pools[which], recipe, recipe.sources[which].crop, gen)
        loss, dice = _loss(net(prepare(image)), target, recipe.dice_weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        history.rows.append({"loss": float(loss.detach()), "dice": dice})
        if log is not None and (step % log_every == 0 or step == steps - 1):
            tail = history.rows[-log_every:]
            mean_loss = sum(r["loss"] for r in tail) / len(tail)
            mean_dice = sum(r["dice"] for r in tail) / len(tail)
            log(
                f"{recipe.name} step {step:4d}/{steps}: loss {mean_loss:.3f}, dice {mean_dice:.3f} "
                f"(means of the last {len(tail)} steps) [{time.perf_counter() - start:.0f} s]"
            )
    history.seconds = time.perf_counter() - start
    return net.eval(), history


def _detect(
    model: object,
    prepare: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    threshold: float,
    min_length: float | None,
    min_bright_contrast: float | None,
) -> torch.Tensor:
    """:func:`emcore.models.detect.detect_defects` on ``prepare(images)``, its contrast rule on
    ``images`` themselves (the normalized sections, also when the detector reads encodings)."""
    from emcore.models.detect import detect_defects, drop_faint_bright_components

    marked = detect_defects(prepare(images), model, threshold=threshold, min_length=min_length)
    if min_bright_contrast is None:
        return marked
    return drop_faint_bright_components(marked, images, min_bright_contrast)


def evaluate_detector(
    model: object,
    recipe: DetectorRecipe = DETECTOR_RECIPE,
    *,
    seed: int = 1000,
    threshold: float = 0.5,
    defects_per_section: int = 4,
    min_length_nm: float | None = None,
    min_bright_contrast: float | None = None,
    sections: dict[str, Sequence[int]] | None = None,
    settings: DefectSettings | None = None,
) -> dict[str, float]:
    """Pixel metrics of ``model`` on the held-out sections (:data:`emcore.models.em_data.HELD_OUT`).

    ``min_length_nm``: the length rule of :func:`emcore.models.detect.detect_defects` (components
    shorter than this are dropped; the pipeline uses
    :data:`emcore.models.detect.MIN_DEFECT_LENGTH_NM`), converted to px at each source's
    resolution; ``min_bright_contrast``: its contrast rule (the pipeline uses
    :data:`emcore.models.detect.MIN_BRIGHT_CONTRAST`); ``None`` = no such rule. ``sections``: per
    dataset, other sections than the held-out ones (e.g. the training sections, to choose a rule
    on sections that are not reported). ``settings``: every case drawn with these instead of the
    recipe's random draws (:func:`defect_pool`; e.g. thin resin cracks only).

    Synthetic defects (the recipe's, ``defects_per_section`` per held-out section, seeded by
    ``seed``), on whole sections, without and with artifacts; targets as in training. Returns
    pooled ``precision``, ``recall``, ``iou`` (over all pixels of all cases), ``iou_median``
    (per case), and ``clean_fp`` / ``clean_fp_artifacts``: the fraction of tissue pixels marked
    on the clean held-out sections (no defect), without / with artifacts. Keys with
    ``_artifacts`` are the same with artifacts added.
    """
    from emcore.models.detect import min_length_px

    gen = torch.Generator().manual_seed(seed + 7)
    prepare = _inputs(recipe)
    out: dict[str, float] = {}
    for suffix, artifacts in (("", None), ("_artifacts", recipe.artifacts)):
        tp = fp = fn = 0
        per_case = []
        clean_marked = clean_tissue = 0
        for k, source in enumerate(recipe.sources):
            nm = DATASETS[source.dataset].base_nm * 2**source.mip
            rule = None if min_length_nm is None else min_length_px(nm, min_length_nm)
            pool = defect_pool(
                replace(recipe, defects_per_section=defects_per_section),
                source,
                (HELD_OUT if sections is None else sections)[source.dataset],
                seed=seed + k,
                settings=settings,
            )
            images, targets, clean = pool.images, pool.targets, pool.clean
            if artifacts is not None:
                images = add_artifacts(images, gen, artifacts)
                targets = targets & (images != 0)
                clean = add_artifacts(clean, gen, artifacts)
            marked = _detect(model, prepare, images, threshold, rule, min_bright_contrast)
            tp += int((marked & targets).sum())
            fp += int((marked & ~targets).sum())
            fn += int((~marked & targets).sum())
            inter = (marked & targets).flatten(1).sum(1).float()
            union = (marked | targets).flatten(1).sum(1).float()
            per_case.append(inter[union > 0] / union[union > 0])
            clean_mask = _detect(model, prepare, clean, threshold, rule, min_bright_contrast)
            clean_marked += int(clean_mask.sum())
            clean_tissue += int((clean != 0).sum())
        out["precision" + suffix] = tp / max(tp + fp, 1)
        out["recall" + suffix] = tp / max(tp + fn, 1)
        out["iou" + suffix] = tp / max(tp + fp + fn, 1)
        out["iou_median" + suffix] = float(torch.cat(per_case).median())
        out["clean_fp" + suffix] = clean_marked / max(clean_tissue, 1)
    return {k: float(f"{v:.4g}") for k, v in out.items()}
