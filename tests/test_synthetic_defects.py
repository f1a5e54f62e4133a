"""Synthetic folds and cracks (emcore.synthetic_defects) on a real bundled section."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from emcore.bundled import load_vnc_sections
from emcore.field import warp
from emcore.normalize import normalize, section_stats
from emcore.synthetic_defects import DefectSettings, make_defect, random_settings


@pytest.fixture(scope="module")
def section() -> torch.Tensor:
    """Bundled VNC section 3, the central 512 x 512 px at mip 0 (4.6 nm/px), normalized."""
    raw = load_vnc_sections([3], crop=(slice(256, 768), slice(256, 768))).astype(np.float32)[None]
    stats = section_stats(raw)
    return torch.from_numpy(normalize(raw, stats.mean, stats.std))


CASES = [
    DefectSettings(kind="fold"),
    DefectSettings(kind="crack", crack_fill="zero"),
    DefectSettings(kind="crack", crack_fill="resin", partial=True),
    DefectSettings(kind="fold", partial=True),
]


@pytest.fixture(scope="module")
def defects(section: torch.Tensor) -> list:
    return [make_defect(section, torch.Generator().manual_seed(10 + i), s) for i, s in enumerate(CASES)]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_truth_field_undoes_the_defect_outside_the_mask(section, defects, case):
    d = defects[case]
    back = warp(d.image, d.field)
    valid = d.valid[0, 0]
    assert valid.float().mean() > 0.7  # the truth covers most of the section
    side_a = valid & (d.field[0].abs().sum(0) == 0)
    side_b = valid & ~side_a
    assert side_a.sum() > 1000 and side_b.sum() > 1000
    # Side A is not moved: exact. Side B: bilinear interpolation error only (twice: defect, then back).
    assert torch.equal(back[0, 0][side_a], section[0, 0][side_a])
    err = (back - section)[0, 0][side_b].abs()
    # (bilinear resampling of raw 4.6 nm ssTEM, twice, at random sub-pixel positions: ~0.13 std)
    assert err.mean() < 0.2, err.mean()
    assert torch.quantile(err, 0.99) < 0.8
    # Not by chance: without the truth field, side B is far off.
    assert (d.image - section)[0, 0][side_b].abs().mean() > 0.4
    # No truth claimed under the mask: side A's band pixels are invalid.
    assert not (valid & d.mask[0, 0] & (d.labels[0, 0] == -1) & side_a).any()


@pytest.mark.parametrize("case", range(len(CASES)))
def test_widths_and_displacements_in_range_and_match_the_mask(defects, case):
    d, s = defects[case], CASES[case]
    torn = d.torn[0]
    assert torn.sum() > 50
    widths, disp = d.widths[0][torn], d.displacements[0][torn]
    assert widths.min() >= s.width_px[0] - 1e-2 and widths.max() <= s.width_px[1] + 1e-2
    assert disp.min() >= s.displacement_px[0] - 1e-2 and disp.max() <= s.displacement_px[1] + 1e-2
    # The mask's extent across the curve, walked along `across` through every 8th torn curve point.
    mask = d.mask[0, 0]
    h, w = mask.shape
    v = torch.tensor(d.across[0])
    sign = -1.0 if s.kind == "fold" else 1.0  # a fold's band lies on side A, a crack's gap on side B
    steps = torch.arange(-2.0, s.width_px[1] + 10.0, 0.25)
    checked = 0
    for p, width in zip(d.curve_points[0][torn][::8], widths[::8], strict=True):
        pts = p[None] + sign * steps[:, None] * v[None]
        xi, yi = pts[:, 0].round().long(), pts[:, 1].round().long()
        if xi.min() < 0 or yi.min() < 0 or xi.max() >= w or yi.max() >= h:
            continue
        run = float(mask[yi, xi].sum()) * 0.25
        assert abs(run - float(width)) < 2.0, (run, float(width))
        checked += 1
    assert checked >= 5
    # The truth field near the torn curve on side B moves by the stated range.
    side_b = d.valid[0, 0] & (d.field[0].abs().sum(0) > 0)
    near = torch.zeros_like(side_b)
    for p in d.curve_points[0][torn][::4]:
        x, y = int(p[0]), int(p[1])
        near[max(y - 30, 0) : y + 30, max(x - 30, 0) : x + 30] = True
    mags = d.field[0].norm(dim=0)[side_b & near]
    assert mags.numel() > 100
    assert mags.min() >= s.displacement_px[0] - 2.0 and mags.max() <= s.displacement_px[1] + 2.0


@pytest.mark.parametrize("case", [2, 3])
def test_partial_tear_leaves_part_of_the_curve_untorn(defects, case):
    d = defects[case]
    untorn = d.displacements[0] < 1e-3  # beyond the tip and its taper: nothing moved
    fraction = float(untorn.float().mean())
    assert 0.1 < fraction < 0.75, fraction
    assert float(d.torn[0].float().mean()) > 0.2
    mask, field = d.mask[0, 0], d.field[0]
    # Curve samples at least 10 samples (~10 px) inside the untorn part, clear of the taper's end.
    deep = F.max_pool1d((~untorn).float()[None, None], 21, stride=1, padding=10)[0, 0] == 0
    assert deep.sum() > 20
    for p in d.curve_points[0][deep][::4]:
        x, y = int(p[0]), int(p[1])
        box = (slice(max(y - 3, 0), y + 4), slice(max(x - 3, 0), x + 4))
        assert not mask[box].any()
        # Intact tissue: both sides (nearly) unmoved, so no jump across the curve (the taper's cosine
        # end leaves < 0.1 px just beyond it).
        assert field[:, box[0], box[1]].abs().max() < 0.25
        assert d.valid[0, 0][box].all()
    assert (d.widths[0][untorn] == 0).all()


def test_same_seed_same_defect_other_seed_other_defect(section):
    small = section[..., :256, :256]

    def draw(seed: int):
        gen = torch.Generator().manual_seed(seed)
        return make_defect(
            small, gen, random_settings(gen, DefectSettings(displacement_px=(10, 40), width_px=(3, 10)))
        )

    a, b, c = draw(4), draw(4), draw(5)
    for name in ("image", "mask", "field", "valid", "applied", "labels"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.image, c.image)


def test_batch_items_get_independent_defects(section):
    pair = torch.cat([section[..., :256, :256], section[..., 256:, 256:]])
    d = make_defect(
        pair, torch.Generator().manual_seed(0), DefectSettings(displacement_px=(10, 40), width_px=(3, 10))
    )
    assert d.image.shape == (2, 1, 256, 256) and d.field.shape == (2, 2, 256, 256)
    assert d.mask.dtype == torch.bool and d.valid.dtype == torch.bool and d.labels.dtype == torch.int8
    assert not torch.equal(d.mask[0], d.mask[1])


def test_bad_input_is_a_clear_error(section):
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        make_defect(section[0], gen)
    with pytest.raises(ValueError, match="kind"):
        make_defect(section, gen, DefectSettings(kind="tear"))
    with pytest.raises(ValueError, match="partial tear"):
        make_defect(section[..., :64, :64], gen, DefectSettings(partial=True))
