"""The shipped fold/crack detector (emcore.models.detect) on held-out real sections."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from emcore.bundled import REDUCED_MIP
from emcore.field import warp
from emcore.models import load_model
from emcore.models.artifacts import ArtifactSettings, add_artifacts
from emcore.models.detect import (
    MIN_BRIGHT_CONTRAST,
    MIN_DEFECT_LENGTH_NM,
    component_contrasts,
    component_lengths,
    defect_probability,
    detect_defects,
    detect_defects_two_scales,
    drop_faint_bright_components,
    drop_short_components,
    min_length_px,
)
from emcore.models.detector_training import DETECTOR_RECIPE, defect_pool, train_detector
from emcore.models.em_data import DATASETS, HELD_OUT, load_stack
from emcore.models.training import Source
from emcore.synthetic import torn_fold_field
from emcore.synthetic_defects import DefectSettings, make_defect
from tasks.detect import detect_chunk_px, detection_mip

# Measured with the shipped weights (see emcore/models/weights/README.md); the floors leave room for
# floating-point differences between machines, and fail for an untrained network.
FOLD_IOU_FLOOR = 0.8
CLEAN_MARKED_CEILING = 0.005
THIN_CRACK_IOU_FLOOR = 0.5


@pytest.fixture(scope="module")
def detector():
    return load_model("defect_detector")


@pytest.fixture(scope="module")
def held_out() -> torch.Tensor:
    """Held-out vnc section 17 at mip 3 (36.8 nm/px, 128 px), normalized; from data/reduced_mip2."""
    assert 17 in HELD_OUT["vnc"]
    return load_stack("vnc", 3, [17])


def test_shipped_detector_finds_a_fold_on_a_held_out_section(detector, held_out):
    settings = DefectSettings(kind="fold", displacement_px=(10.0, 30.0), width_px=(6.0, 12.0))
    d = make_defect(held_out, torch.Generator().manual_seed(3), settings)
    target = d.mask & (d.image != 0)
    assert target.float().mean() > 0.02
    marked = detect_defects(d.image, detector)
    assert marked.shape == d.image.shape and marked.dtype == torch.bool
    iou = float((marked & target).sum() / (marked | target).sum())
    assert iou > FOLD_IOU_FLOOR, iou


def test_shipped_detector_finds_a_resin_crack_on_a_held_out_section(detector, held_out):
    settings = DefectSettings(
        kind="crack",
        crack_fill="resin",
        displacement_px=(10.0, 30.0),
        width_px=(6.0, 12.0),
        resin_level=DETECTOR_RECIPE.resin_level,  # resin brighter than the tissue, as in training
    )
    d = make_defect(held_out, torch.Generator().manual_seed(4), settings)
    target = d.mask & (d.image != 0)
    marked = detect_defects(d.image, detector)
    iou = float((marked & target).sum() / (marked | target).sum())
    assert iou > FOLD_IOU_FLOOR, iou


def test_shipped_detector_leaves_the_clean_held_out_sections_alone(detector):
    """All 12 held-out sections of both stacks, no defect: the marked fraction of their tissue, at
    each training resolution the repository ships (mip >= 2: vnc 18.4 and 36.8 nm, medulla 40 nm;
    medulla at 20 nm is mip 1, only in the shared data: ``bench_defect_detector`` measures it)."""
    marked = tissue = 0
    for source in [s for s in DETECTOR_RECIPE.sources if s.mip >= REDUCED_MIP]:
        clean = load_stack(source.dataset, source.mip, HELD_OUT[source.dataset])
        marked += int(detect_defects(clean, detector).sum())
        tissue += int((clean != 0).sum())
    assert marked / tissue < CLEAN_MARKED_CEILING, marked / tissue


def test_no_data_is_never_marked_and_tiles_do_not_matter(detector, held_out):
    d = make_defect(
        held_out,
        torch.Generator().manual_seed(5),
        DefectSettings(kind="crack", crack_fill="zero", displacement_px=(10.0, 30.0), width_px=(6.0, 12.0)),
    )
    image = d.image.clone()
    image[..., :20, :] = 0
    whole = defect_probability(image, detector, tile=None)
    tiled = defect_probability(image, detector, tile=48)
    assert torch.allclose(whole, tiled, atol=1e-5)
    marked = detect_defects(image, detector)
    assert not marked[image == 0].any()


def test_bad_input_is_a_clear_error(detector, held_out):
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        detect_defects(held_out[0], detector)
    with pytest.raises(ValueError, match="threshold"):
        detect_defects(held_out, detector, threshold=1.5)


def test_a_short_training_run_learns_something():
    recipe = dataclasses.replace(
        DETECTOR_RECIPE,
        sources=(Source("vnc", 3, 64),),
        defects_per_section=1,
        steps=2,
        batch=2,
    )
    pool = defect_pool(recipe, recipe.sources[0], [0, 1], seed=0)
    assert pool.images.shape == (2, 1, 128, 128) and pool.targets.dtype == torch.bool
    assert pool.targets.any() and not torch.equal(pool.images, pool.clean)
    net, history = train_detector(recipe, steps=2, seed=0, log=None)
    assert len(history.rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in history.rows)
    assert net(torch.zeros(1, 1, 64, 64)).shape == (1, 1, 64, 64)


# -- the length rule (emcore.models.detect.drop_short_components) -------------------------------------
VNC_MIP3_NM = DATASETS["vnc"].base_nm * 2**3  # 36.8 nm/px
MEDULLA_MIP2_NM = DATASETS["medulla"].base_nm * 2**2  # 40 nm/px
VNC_MIP2_NM = DATASETS["vnc"].base_nm * 2**2  # 18.4 nm/px


def test_component_lengths_are_max_feret_diameters():
    mask = np.zeros((60, 60), dtype=bool)
    mask[10, 5:45] = True  # a straight line of 40 px
    mask[np.arange(20, 50), np.arange(20, 50)] = True  # a diagonal of 30 px (8-connected)
    mask[50:55, 2:7] = True  # a 5 x 5 square
    mask[58, 58] = True  # one pixel
    labels, lengths = component_lengths(mask)
    by_pixel = {(10, 5): 40.0, (20, 20): 29 * 2**0.5 + 1, (50, 2): 4 * 2**0.5 + 1, (58, 58): 1.0}
    for (y, x), length in by_pixel.items():
        assert lengths[labels[y, x] - 1] == pytest.approx(length), (y, x)
    assert labels.max() == 4


def test_the_length_rule_keeps_a_fold_band_and_drops_a_blob_on_a_real_section(detector, held_out):
    """A synthetic fold on held-out vnc 17 with a 20 x 8 px dark blob pasted beside it (the look of
    the cell profiles the network marks on real clean sections): the band survives whole, the blob
    is dropped."""
    settings = DefectSettings(kind="fold", displacement_px=(10.0, 30.0), width_px=(6.0, 12.0))
    d = make_defect(held_out, torch.Generator().manual_seed(3), settings)
    target = d.mask & (d.image != 0)
    rule = min_length_px(VNC_MIP3_NM)
    assert 40 < rule < 45
    raw = detect_defects(d.image, detector)
    kept = detect_defects(d.image, detector, min_length=rule)
    assert torch.equal(kept & target, raw & target)  # nothing of the band is lost
    blob = torch.zeros_like(target)
    blob[..., 100:108, 10:30] = True
    assert not (blob & target).any()
    mask = raw | blob
    out = drop_short_components(mask, rule)
    assert not out[blob & ~raw].any() and torch.equal(out & target, raw & target)


def test_the_length_rule_clears_the_dark_process_of_medulla_0(detector):
    """Medulla section 0 (a clean real section): the network alone marks a dark, thick cell profile
    (measured 0.33 % of the section; 1.28 % by the detector before it was also trained at ~20 nm/px);
    every piece of it is shorter than 1.6 um."""
    section = load_stack("medulla", 2, [0])
    raw = detect_defects(section, detector)
    assert float(raw.float().mean()) > 0.002
    kept = detect_defects(section, detector, min_length=min_length_px(MEDULLA_MIP2_NM))
    assert not kept.any()


def test_the_length_rule_checks_its_input():
    with pytest.raises(ValueError, match=r"bool \(N, 1, H, W\)"):
        drop_short_components(torch.zeros(4, 4, dtype=torch.bool), 10.0)
    with pytest.raises(ValueError, match="resolution_nm"):
        min_length_px(0.0)
    assert min_length_px(40.0) == MIN_DEFECT_LENGTH_NM / 40.0


# -- the contrast rule (emcore.models.detect.drop_faint_bright_components) ------------------------------
def test_component_contrasts_compare_a_component_with_the_tissue_around_it():
    image = np.full((40, 60), 0.2, dtype=np.float32)
    image[5:8, 5:55] = 3.0  # a bright band on plain tissue: contrast 2.8
    image[20:36, 5:35] = 1.5  # a bright region, whose middle part alone is marked: contrast 0.5
    image[26:30, 10:30] = 2.0
    image[28:40, 40:60] = 0.0  # no data ...
    image[33:35, 45:55] = 3.0  # ... around a bright piece: no ring, kept
    mask = np.zeros_like(image, dtype=bool)
    mask[5:8, 5:55] = mask[26:30, 10:30] = mask[33:35, 45:55] = True
    labels, _ = component_lengths(mask)
    inside, ring = component_contrasts(image, labels)
    band, part, island = (labels[y, x] - 1 for y, x in ((5, 5), (26, 10), (33, 45)))
    assert inside[band] - ring[band] == pytest.approx(2.8, abs=1e-6)
    assert inside[part] - ring[part] == pytest.approx(0.5, abs=1e-6)
    assert np.isnan(ring[island])
    kept = drop_faint_bright_components(
        torch.from_numpy(mask)[None, None], torch.from_numpy(image)[None, None], MIN_BRIGHT_CONTRAST
    )[0, 0].numpy()
    assert kept[5:8, 5:55].all() and kept[33:35, 45:55].all() and not kept[26:30, 10:30].any()
    dark = drop_faint_bright_components(  # a dark component is never dropped, however faint
        torch.from_numpy(mask)[None, None], torch.from_numpy(-image)[None, None], MIN_BRIGHT_CONTRAST
    )
    assert torch.equal(dark[0, 0], torch.from_numpy(mask))


@pytest.mark.parametrize("kind", ["crack", "fold"])
def test_the_contrast_rule_drops_a_blurred_bright_process_and_keeps_the_defect(detector, kind):
    """Held-out medulla 57 with blur and a brightness gradient (the artifact draw of seed 19): with the
    length rule alone the detector before issue 16's ~20 nm training marked part of its large bright
    process at the bottom (56.7 px long, 1.22 std brighter than the tissue around it; benchmark seed
    1000 marks the same process), beside a resin crack (1.9 std) or a fold band; with the contrast
    rule the process goes, the band stays."""
    section = load_stack("medulla", 2, [57])
    settings = DefectSettings(
        kind=kind, crack_fill="resin", displacement_px=(10.0, 30.0), width_px=(6.0, 12.0),
        resin_level=DETECTOR_RECIPE.resin_level,
    )  # fmt: skip
    d = make_defect(section, torch.Generator().manual_seed(4), settings)
    blur_gradient = ArtifactSettings(noise=0.0, streaks=0, zeroed=0.0, probability=1.0)
    image = add_artifacts(d.image, torch.Generator().manual_seed(19), blur_gradient)
    target = d.mask & (image != 0)
    rule = min_length_px(MEDULLA_MIP2_NM)
    raw = detect_defects(image, detector, min_length=rule)
    kept = detect_defects(image, detector, min_length=rule, min_bright_contrast=MIN_BRIGHT_CONTRAST)
    # The process, marked without the rule: > 300 px by the detector before it was also trained at
    # ~20 nm/px, 29 px by the shipped one (measured); the rule never adds.
    assert int((kept & ~target).sum()) <= int((raw & ~target).sum())
    assert int((kept & ~target).sum()) < 0.05 * int(target.sum())
    assert torch.equal(kept & target, raw & target)  # nothing of the band is lost
    assert float((kept & target).sum() / (kept | target).sum()) > FOLD_IOU_FLOOR


def test_the_contrast_rule_checks_its_input():
    mask = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="float image of the mask's shape"):
        drop_faint_bright_components(mask, torch.zeros(1, 1, 8, 9), 1.0)
    with pytest.raises(ValueError, match=r"bool \(N, 1, H, W\)"):
        drop_faint_bright_components(mask.float(), torch.zeros(1, 1, 8, 8), 1.0)


# -- thin cracks (issue 16: a 10 px crack at 9.2 nm/px is 2.5 px at 36.8 nm/px, 5 px at 18.4 nm/px) -------
def _straight_resin_crack(section: torch.Tensor, gap_px: float) -> tuple[torch.Tensor, torch.Tensor]:
    """bench_folds' crack on a ``(1, 1, S, S)`` section: a straight gap of ``gap_px`` at 30 deg,
    10 % of the size off centre, bright resin (2.25 std) + noise 0.2; returns (image, gap mask)."""
    size = section.shape[-1]
    applied, mask, _ = torn_fold_field(size, size, angle_deg=30.0, offset_px=0.1 * size, fold_width_px=gap_px)
    moved = warp(section, applied)
    noise = 0.2 * torch.randn(section.shape, generator=torch.Generator().manual_seed(0))
    image = torch.where(mask, torch.full_like(moved, 2.25), moved) + noise
    return torch.where((moved != 0) | mask, image, torch.zeros_like(image)), mask


def test_the_detect_mip_of_a_fine_layer_is_near_20_nm():
    """A 4.6 nm/px layer (the VNC stack) with its finetune mip at 18.4 nm: the detector runs there,
    not at 36.8 nm (the range it was trained on before issue 16's thin cracks)."""
    assert detection_mip([4.6 * 2**k for k in range(6)], 2) == 2
    assert detection_mip([10.0 * 2**k for k in range(6)], 1) == 1  # medulla: 20 nm
    assert detection_mip([40.0 * 2**k for k in range(4)], 0) == 0
    assert detection_mip([60.0 * 2**k for k in range(4)], 0) is None


def test_a_thin_resin_crack_is_marked_at_the_detect_mip(detector):
    """Held-out vnc 17 at mip 2 (18.4 nm/px, the detect mip of the VNC stack) with a straight 5 px
    resin crack (bench_folds' 10 px crack at 9.2 nm/px), run with the pipeline's rules: the crack
    is marked (measured IoU 0.945 with the gap); the same section without it, nothing."""
    section = load_stack("vnc", 2, [17])
    cracked, gap = _straight_resin_crack(section, 5.0)
    rules = {"min_length": min_length_px(VNC_MIP2_NM), "min_bright_contrast": MIN_BRIGHT_CONTRAST}
    marked = detect_defects(cracked, detector, **rules)
    iou = float((marked & gap).sum() / (marked | gap).sum())
    assert iou > THIN_CRACK_IOU_FLOOR, iou
    assert not detect_defects(section, detector, **rules).any()


def test_two_scales_find_thin_and_wide_cracks(detector):
    """The pipeline's two scales (the detect mip and one coarser) on held-out vnc 17 at 18.4 nm/px:
    a 5 px crack is found at 18.4 nm, a 24 px one (wider than the 3-16 px of training) only at
    36.8 nm (measured IoU 0.000 at 18.4 nm alone, 0.959 with both); on the clean section nothing."""
    section = load_stack("vnc", 2, [17])
    for gap_px in (5.0, 24.0):
        cracked, gap = _straight_resin_crack(section, gap_px)
        marked = detect_defects_two_scales(cracked, detector, VNC_MIP2_NM)
        iou = float((marked & gap).sum() / (marked | gap).sum())
        assert iou > FOLD_IOU_FLOOR, (gap_px, iou)
        assert not marked[cracked == 0].any()
    assert not detect_defects_two_scales(section, detector, VNC_MIP2_NM).any()
    with pytest.raises(ValueError, match="outside the detector's range"):
        detect_defects_two_scales(section, detector, 9.2)


def test_detect_chunks_are_large_enough_that_the_context_costs_little():
    # At 18.4 nm/px the length rule's context is 88 px per side: at least 512 px chunks, a multiple
    # of the processing chunk (so they stay aligned with the storage chunks).
    assert [detect_chunk_px(c) for c in (64, 128, 256, 384, 1024)] == [512, 512, 512, 768, 1024]
