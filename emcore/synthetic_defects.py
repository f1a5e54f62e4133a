"""Synthetic folds and cracks made from real sections, with their exact truth.

A smooth random curve splits the section into side A (kept in place) and side B (moved). The
tissue tears along the curve (along all of it, or, with ``partial=True``, along part of it only:
the tear ends inside the section and the tissue beyond its tip is intact). Side B moves by a rigid
+ smooth motion of ``displacement_px`` px at the curve (across and along it):

* a **fold** pushes side B over side A: where the two layers overlap, a band of ``width_px`` px
  across the curve, the section shows a dark, low-contrast mix of both (doubled tissue);
* a **crack** pulls side B away from side A: the gap of ``width_px`` px between them holds no data
  (0) or bright resin (``crack_fill``).

Conventions
-----------
* Images are ``(N, 1, H, W)`` float tensors, 0 = no data (normalized sections, tissue mean 0 /
  std 1, are what the models use; the overlay and resin levels are set from each section's own
  tissue mean and std, so any scale works). Lengths are pixels of the input image.
* Fields follow :mod:`emcore.field`: ``(N, 2, H, W)``, channel 0 = x, pixels, pull semantics
  (``warp(img, f)(p) = img(p + f(p))``).
* The **truth field** ``field`` lives in the **clean frame**: it is the "recovered field", the
  field that maps the defected section back onto the clean one,
  ``warp(defected.image, defected.field) ~= clean`` wherever ``defected.valid`` (to interpolation
  error). It is 0 on side A and the inverse of side B's motion on side B (one field per side,
  discontinuous at the tear). ``valid`` (clean frame) is False where no truth exists: clean tissue
  hidden under a fold, tissue that side B's motion moved outside the image, pixels whose
  interpolation would mix in the band/gap or the other side.
* ``mask`` (defected frame) marks the fold band or crack gap: the pixels a detector must find.
* ``applied`` (defected frame) is the motion that made it: ``image(q) = clean(q + applied(q))``
  outside the mask (0 on side A).
* ``labels`` (defected frame, int8): 0 = side A, 1 = side B, -1 = mask.

All randomness comes from the ``torch.Generator`` passed in, so a seed reproduces the defect
exactly. Pure torch; inputs are never modified.

Geometry and guarantees
-----------------------
The curve is ``y = f(x)`` in a frame rotated by a random angle (``x`` along the curve's mean
direction ``along``, ``y`` across it along ``across``, origin at the image centre), ``f`` = a random
offset (within a quarter of the section of the centre) plus three random sines whose slope stays
below ``max_slope``. Side B is ``y >= f(x)`` in the clean section. Band / gap width is measured at
each curve point along ``across``; the drawn motion is accepted only if, on the torn part of the
curve inside the section, every width is within ``width_px`` and every displacement magnitude is
within ``displacement_px`` (otherwise waviness, rotation and the smooth part are halved until it
is; at the end a straight tear moved by a pure translation meets both exactly). For partial tears
the motion tapers to 0 (cosine, over ``2.5 x`` the displacement) beyond the tear's tip, so the
band closes to nothing there; the displacement is then capped at 0.24 x the curve's length in the
section, so that the tip, its taper and an untorn part all fit.

API summary
-----------
* :class:`DefectSettings` - kind, ranges, fill, partial tear, shape limits.
* :class:`SyntheticDefect` - ``image, mask, field, valid, applied, labels`` and the measured
  ``widths`` / ``displacements`` / ``torn`` per curve sample (``curve_points`` in (x, y) px).
* :func:`make_defect(clean, generator, settings) -> SyntheticDefect` (one defect per section).
* :func:`random_settings(generator, ...) -> DefectSettings` - a random kind / fill / partial tear.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from emcore.field import warp, warp_mask

__all__ = ["DefectSettings", "SyntheticDefect", "make_defect", "random_settings"]

_KINDS = ("fold", "crack")
_FILLS = ("zero", "resin")
_TISSUE_FLOOR = 1e-6  # the value of emcore.normalize.TISSUE_FLOOR, so 0 keeps meaning "no data"


@dataclass(frozen=True)
class DefectSettings:
    """What :func:`make_defect` draws (lengths in px of the input image).

    Attributes:
        kind: ``"fold"`` (side B over side A, dark band) or ``"crack"`` (side B pulled away, gap).
        displacement_px: range of side B's displacement magnitude at the torn curve.
        width_px: range of the band (fold) or gap (crack) width across the curve.
        partial: the tear stops inside the section; beyond its tip the tissue is intact.
        crack_fill: ``"zero"`` (no data) or ``"resin"`` (bright) in a crack's gap.
        max_slope: largest slope of the curve's waviness relative to its mean direction.
        max_rotation_deg: largest rotation of side B (about a point of the curve).
        smooth_fraction: largest smooth (non-rigid) part, as a fraction of the displacement.
        mode: interpolation used to move side B (``"bilinear"`` or ``"bicubic"``).
        resin_level: range of a resin-filled gap's brightness, in tissue std above the tissue mean
            (plus noise of 0.1 std).
    """

    kind: str = "fold"
    displacement_px: tuple[float, float] = (20.0, 200.0)
    width_px: tuple[float, float] = (5.0, 40.0)
    partial: bool = False
    crack_fill: str = "zero"
    max_slope: float = 0.15
    max_rotation_deg: float = 1.0
    smooth_fraction: float = 0.1
    mode: str = "bilinear"
    resin_level: tuple[float, float] = (1.5, 3.0)

    def check(self) -> None:
        """Raise ``ValueError`` naming the bad parameter."""
        if self.kind not in _KINDS:
            raise ValueError(f"DefectSettings.kind must be one of {_KINDS}, got {self.kind!r}")
        if self.crack_fill not in _FILLS:
            raise ValueError(f"DefectSettings.crack_fill must be one of {_FILLS}, got {self.crack_fill!r}")
        if self.mode not in ("bilinear", "bicubic"):
            raise ValueError(f"DefectSettings.mode must be 'bilinear' or 'bicubic', got {self.mode!r}")
        d_lo, d_hi = self.displacement_px
        w_lo, w_hi = self.width_px
        if not 0 < w_lo <= w_hi:
            raise ValueError(f"DefectSettings.width_px must be 0 < min <= max, got {self.width_px}")
        if not w_lo <= d_lo <= d_hi:
            raise ValueError(
                "DefectSettings.displacement_px must be min <= max with min >= the smallest width "
                f"(the width is the across part of the displacement), got {self.displacement_px} "
                f"with width_px {self.width_px}"
            )
        if self.max_slope < 0 or self.max_rotation_deg < 0 or self.smooth_fraction < 0:
            raise ValueError("DefectSettings.max_slope, max_rotation_deg and smooth_fraction must be >= 0")


@dataclass(frozen=True)
class SyntheticDefect:
    """One defected batch and its truth (see the module docstring for frames and semantics).

    Attributes:
        image: ``(N, 1, H, W)`` defected sections (input dtype).
        mask: ``(N, 1, H, W)`` bool, the fold band / crack gap (defected frame).
        field: ``(N, 2, H, W)`` float32 truth field (clean frame): ``warp(image, field) ~= clean``.
        valid: ``(N, 1, H, W)`` bool, where ``field`` is the truth (clean frame).
        applied: ``(N, 2, H, W)`` float32 motion (defected frame): ``image(q) = clean(q + applied(q))``
            outside the mask.
        labels: ``(N, 1, H, W)`` int8 (defected frame): 0 side A, 1 side B, -1 mask.
        widths: per item, ``(K,)`` float32 band (fold, > 0) / gap (crack, reported > 0) width in px
            at each curve sample, measured along ``across``; 0 where untorn.
        displacements: per item, ``(K,)`` float32 ``|applied|`` at each curve sample (px).
        torn: per item, ``(K,)`` bool, the curve sample is on the fully torn part (tapered and
            untorn samples are False).
        curve_points: per item, ``(K, 2)`` float32 (x, y) px of the curve samples inside the image.
        across: per item, the unit vector (x, y) across the curve, pointing into side B.
        settings: per item, the settings given (a partial tear's displacement cap is not in them:
            ``displacements`` says what was drawn).
    """

    image: torch.Tensor
    mask: torch.Tensor
    field: torch.Tensor
    valid: torch.Tensor
    applied: torch.Tensor
    labels: torch.Tensor
    widths: tuple[torch.Tensor, ...]
    displacements: tuple[torch.Tensor, ...]
    torn: tuple[torch.Tensor, ...]
    curve_points: tuple[torch.Tensor, ...]
    across: tuple[tuple[float, float], ...]
    settings: tuple[DefectSettings, ...]


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen, dtype=torch.float64))


@dataclass
class _Geometry:
    """Curve, motion and taper of one defect (float64, image px)."""

    height: int
    width: int
    along: tuple[float, float]
    across: tuple[float, float]
    offset: float
    amps: torch.Tensor  # (3,) sine amplitudes (px)
    freqs: torch.Tensor  # (3,) angular frequencies (rad/px)
    phases: torch.Tensor  # (3,)
    translation: tuple[float, float]  # (x, y) px
    rotation: float  # rad
    pivot: tuple[float, float]  # (x, y) px
    smooth: torch.Tensor  # (1, 2, g, g) lattice, px
    tip: float | None  # x (along) of the tear tip; None = torn everywhere
    taper: float  # px

    def frame(self, pts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x along, y across) of points ``(..., 2)`` (x, y) px, origin at the image centre."""
        cx, cy = (self.width - 1) / 2.0, (self.height - 1) / 2.0
        px, py = pts[..., 0] - cx, pts[..., 1] - cy
        return px * self.along[0] + py * self.along[1], px * self.across[0] + py * self.across[1]

    def curve(self, x: torch.Tensor) -> torch.Tensor:
        return self.offset + (self.amps * torch.sin(x[..., None] * self.freqs + self.phases)).sum(-1)

    def side(self, pts: torch.Tensor) -> torch.Tensor:
        """Signed across distance to the curve (``>= 0`` = side B) of clean-frame points."""
        x, y = self.frame(pts)
        return y - self.curve(x)

    def point(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Image (x, y) px of frame coordinates."""
        cx, cy = (self.width - 1) / 2.0, (self.height - 1) / 2.0
        return torch.stack(
            (cx + x * self.along[0] + y * self.across[0], cy + x * self.along[1] + y * self.across[1]), -1
        )

    def weight(self, pts: torch.Tensor) -> torch.Tensor:
        """The taper: 1 on the torn part, cosine down to 0 over ``taper`` px beyond the tip."""
        if self.tip is None:
            return torch.ones(pts.shape[:-1], dtype=pts.dtype)
        x, _ = self.frame(pts)
        t = ((x - self.tip) / self.taper).clamp(0.0, 1.0)
        return 0.5 * (1.0 + torch.cos(math.pi * t))

    def motion(self, pts: torch.Tensor) -> torch.Tensor:
        """Side B's pull displacement ``(..., 2)`` (x, y) px at defected-frame points ``(..., 2)``."""
        c, s = math.cos(self.rotation), math.sin(self.rotation)
        rx, ry = pts[..., 0] - self.pivot[0], pts[..., 1] - self.pivot[1]
        dx = (c - 1.0) * rx - s * ry + self.translation[0]
        dy = s * rx + (c - 1.0) * ry + self.translation[1]
        grid = torch.stack(
            (
                2.0 * pts[..., 0] / max(self.width - 1, 1) - 1.0,
                2.0 * pts[..., 1] / max(self.height - 1, 1) - 1.0,
            ),
            -1,
        ).reshape(1, -1, 1, 2)
        sm = F.grid_sample(self.smooth, grid, mode="bicubic", padding_mode="border", align_corners=True)
        sm = sm.reshape(2, *pts.shape[:-1])
        w = self.weight(pts)
        return torch.stack(((dx + sm[0]) * w, (dy + sm[1]) * w), -1)


def _pixel_points(height: int, width: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64), indexing="ij"
    )
    return torch.stack((xs, ys), -1)


def _inside(pts: torch.Tensor, height: int, width: int, margin: float = 0.0) -> torch.Tensor:
    return (
        (pts[..., 0] >= margin)
        & (pts[..., 0] <= width - 1 - margin)
        & (pts[..., 1] >= margin)
        & (pts[..., 1] <= height - 1 - margin)
    )


def _curve_samples(geo: _Geometry) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x along, image points)`` of the curve, 1 px apart, inside the image (2 px margin)."""
    half = math.hypot(geo.height, geo.width) / 2 + 2
    x = torch.arange(-half, half + 1, 1.0, dtype=torch.float64)
    pts = geo.point(x, geo.curve(x))
    keep = _inside(pts, geo.height, geo.width, margin=2.0)
    return x[keep], pts[keep]


def _measure(geo: _Geometry, x: torch.Tensor, pts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed band width along ``across`` (fold > 0, crack < 0) and ``|motion|`` at curve samples.

    The width at curve point ``p`` is ``s`` with ``p - s * across`` on side B's moved edge (its
    source ``q + motion(q)`` on the clean curve), solved by fixed-point iteration.
    """
    v = torch.tensor(geo.across, dtype=torch.float64)
    s = torch.zeros_like(x)
    for _ in range(60):
        q = pts - s[:, None] * v
        step = geo.side(q + geo.motion(q))
        s = s + step
        if step.abs().max() < 1e-4:
            break
    return s, geo.motion(pts).norm(dim=-1)


def _draw_geometry(height: int, width: int, gen: torch.Generator, st: DefectSettings) -> _Geometry:
    angle = _uniform(gen, 0.0, 2 * math.pi)
    along = (math.cos(angle), math.sin(angle))
    across = (-math.sin(angle), math.cos(angle))
    offset = _uniform(gen, -0.25, 0.25) * min(height, width)
    length = math.hypot(height, width)
    freqs = torch.tensor([2 * math.pi * k / length * _uniform(gen, 0.7, 1.3) for k in (1, 2, 3)])
    phases = torch.tensor([_uniform(gen, 0, 2 * math.pi) for _ in range(3)])
    # Amplitudes whose summed slope is at most max_slope.
    raw = torch.tensor([_uniform(gen, 0.2, 1.0) for _ in range(3)], dtype=torch.float64)
    amps = raw / (raw * freqs).sum() * st.max_slope * _uniform(gen, 0.5, 1.0)
    rotation = math.radians(_uniform(gen, -st.max_rotation_deg, st.max_rotation_deg))
    smooth = torch.randn(1, 2, 3, 3, generator=gen, dtype=torch.float64)
    geo = _Geometry(
        height,
        width,
        along,
        across,
        offset,
        amps,
        freqs,
        phases,
        (0.0, 0.0),
        rotation,
        (0.0, 0.0),
        smooth,
        None,
        1.0,
    )
    xs, pts = _curve_samples(geo)
    if len(xs) < 8:
        raise ValueError(f"section {height} x {width} px is too small for a synthetic defect")
    extent = float(xs[-1] - xs[0])
    d_lo, d_hi = st.displacement_px
    if st.partial:
        cap = 0.24 * extent
        if cap < d_lo:
            raise ValueError(
                f"a partial tear with displacement >= {d_lo} px needs a curve of at least "
                f"{d_lo / 0.24:.0f} px inside the section; this {height} x {width} px section has "
                f"{extent:.0f} px: lower DefectSettings.displacement_px or use a larger section"
            )
        d_hi = min(d_hi, cap)
    magnitude = _uniform(gen, d_lo, d_hi)
    w_lo, w_hi = st.width_px
    w = _uniform(gen, w_lo, min(w_hi, magnitude))
    slide = math.sqrt(max(magnitude**2 - w**2, 0.0)) * (1 if _uniform(gen, 0, 1) < 0.5 else -1)
    across_part = w if st.kind == "fold" else -w
    geo.translation = (
        slide * along[0] + across_part * across[0],
        slide * along[1] + across_part * across[1],
    )
    mid = len(pts) // 2
    geo.pivot = (float(pts[mid, 0]), float(pts[mid, 1]))
    peak = float(geo.smooth.norm(dim=1).max())
    geo.smooth = geo.smooth * (st.smooth_fraction * magnitude * _uniform(gen, 0.0, 1.0) / max(peak, 1e-12))
    if st.partial:
        geo.taper = 2.5 * magnitude
        lo, hi = float(xs[0]) + 0.25 * extent, float(xs[-1]) - 0.15 * extent - geo.taper
        geo.tip = _uniform(gen, lo, max(lo, hi))
    return geo


def _accept(geo: _Geometry, st: DefectSettings) -> tuple[_Geometry, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shrink waviness, rotation and smooth part until widths and displacements are in range."""
    w_lo, w_hi = st.width_px
    d_lo, d_hi = st.displacement_px
    sign = 1.0 if st.kind == "fold" else -1.0
    for attempt in range(8):
        if attempt == 7:  # a straight tear moved by a pure translation meets the ranges exactly
            geo.amps, geo.rotation, geo.smooth = geo.amps * 0, 0.0, geo.smooth * 0
        xs, pts = _curve_samples(geo)
        torn = geo.weight(pts) >= 1.0 - 1e-9
        widths, disp = _measure(geo, xs, pts)
        widths = widths * sign
        tw, td = widths[torn], disp[torn]
        tol = 1e-3
        if (
            tw.numel()
            and tw.min() >= w_lo - tol
            and tw.max() <= w_hi + tol
            and td.min() >= d_lo - tol
            and td.max() <= d_hi + tol
        ):
            return geo, widths.clamp_min(0.0), disp, torn
        geo.amps, geo.rotation, geo.smooth = geo.amps / 2, geo.rotation / 2, geo.smooth / 2
    raise AssertionError("unreachable: the straight, translated tear is always in range")


def _one(clean: torch.Tensor, gen: torch.Generator, st: DefectSettings) -> dict[str, object]:
    _, _, h, w = clean.shape
    geo, widths, disp, torn = _accept(_draw_geometry(h, w, gen, st), st)
    pix = _pixel_points(h, w)
    applied = geo.motion(pix)  # (H, W, 2), defected frame
    in_a = geo.side(pix) < 0  # side A stays: defected frame = clean frame there
    in_b = geo.side(pix + applied) >= 0
    band = in_a & in_b
    gap = ~in_a & ~in_b
    mask = band | gap
    applied_field = applied.permute(2, 0, 1)[None].to(torch.float32)

    image_b = warp(clean.to(torch.float32), applied_field, mode=st.mode).to(clean.dtype)
    data = clean != 0
    tissue = clean[data]
    mean = float(tissue.mean()) if tissue.numel() else 0.0
    std = float(tissue.std()) if tissue.numel() > 1 else 1.0
    out = torch.where(in_a, clean, image_b)
    if st.kind == "fold":
        contrast = _uniform(gen, 0.3, 0.6)
        darkness = _uniform(gen, 1.5, 3.0)
        overlap = mean + contrast * (0.5 * (clean + image_b) - mean) - darkness * std
        out = torch.where(band, overlap, out)
    fill = torch.zeros_like(clean)
    if st.crack_fill == "resin" or st.kind == "fold":
        level = _uniform(gen, *st.resin_level)
        noise = torch.randn(clean.shape, generator=gen, dtype=torch.float64).to(clean.dtype)
        fill = mean + (level + 0.1 * noise) * std
    out = torch.where(gap, fill, out)
    keep_nonzero = mask & (out == 0) & ((st.kind == "fold") | (st.crack_fill == "resin"))
    out = torch.where(keep_nonzero, torch.full_like(out, _TISSUE_FLOOR), out)

    # Truth in the clean frame: 0 on side A, the inverse of side B's motion on side B.
    inverse = -geo.motion(pix)
    for _ in range(200):
        new = -geo.motion(pix + inverse)
        step = float((new - inverse).abs().max())
        inverse = new
        if step < 1e-5:
            break
    residual = (inverse + geo.motion(pix + inverse)).norm(dim=-1)
    clean_b = geo.side(pix) >= 0
    truth = torch.where(clean_b[..., None], inverse, torch.zeros_like(inverse))
    truth_field = truth.permute(2, 0, 1)[None].to(torch.float32)
    # Pixels side B's truth may interpolate from: side B's own, and side A's where side B's motion
    # is nil (intact tissue beyond a partial tear's tip: both sides show the same there).
    still = applied.norm(dim=-1) < 1e-2
    only_b = ((in_b & ~in_a) | (in_a & ~mask & still)).to(torch.float32)[None, None]
    inv_field = inverse.permute(2, 0, 1)[None].to(torch.float32)
    reach = 2.0 if st.mode == "bicubic" else 1.0  # bicubic reads 2 px around a position
    seen_b = warp_mask(_dilate_clear(only_b, reach), inv_field, threshold=1.0)[0, 0] > 0
    valid_b = clean_b & seen_b & (residual < 1e-2)
    valid_a = in_a & ~mask  # side A is not moved: its truth (0) reads each pixel exactly
    valid = (valid_a | valid_b)[None, None]
    labels = torch.where(in_a, 0, 1).to(torch.int8)
    labels = torch.where(mask, torch.tensor(-1, dtype=torch.int8), labels)
    return {
        "image": out,
        "mask": mask[None, None],
        "field": truth_field,
        "valid": valid,
        "applied": torch.where(in_a, 0.0, applied_field[0]).unsqueeze(0),
        "labels": labels[None, None],
        "widths": widths.to(torch.float32) * torn,
        "displacements": disp.to(torch.float32),
        "torn": torn,
        "curve_points": _curve_samples(geo)[1].to(torch.float32),
        "across": geo.across,
    }


def _dilate(mask: torch.Tensor, radius: float) -> torch.Tensor:
    r = math.ceil(radius)
    if r <= 0:
        return mask
    grown = F.max_pool2d(mask.to(torch.float32)[None, None], 2 * r + 1, stride=1, padding=r)
    return grown[0, 0] > 0


def _dilate_clear(inside: torch.Tensor, radius: float) -> torch.Tensor:
    """``inside`` minus a border of ``ceil(radius) - 1`` px (bicubic needs 2 px of clean taps)."""
    r = math.ceil(radius) - 1
    if r <= 0:
        return inside
    return 1.0 - F.max_pool2d(1.0 - inside, 2 * r + 1, stride=1, padding=r)


def make_defect(
    clean: torch.Tensor, generator: torch.Generator, settings: DefectSettings | None = None
) -> SyntheticDefect:
    """One synthetic fold or crack per section of ``clean``.

    Args:
        clean: ``(N, 1, H, W)`` float sections, 0 = no data (e.g. normalized, see
            :mod:`emcore.normalize`); lengths in its pixels.
        generator: the only source of randomness (seed it: the same seed gives the same defect).
        settings: what to draw (default :class:`DefectSettings`: a full fold, 20-200 px motion,
            5-40 px band). Use :func:`random_settings` to draw kinds, fills and partial tears too.

    Returns:
        :class:`SyntheticDefect` (frames and semantics in the module docstring).
    """
    if clean.ndim != 4 or clean.shape[1] != 1 or not clean.is_floating_point():
        raise ValueError(
            f"make_defect needs a float (N, 1, H, W) section tensor, got {clean.dtype} {tuple(clean.shape)}"
        )
    settings = settings or DefectSettings()
    settings.check()
    items = []
    used = []
    for i in range(clean.shape[0]):
        items.append(_one(clean[i : i + 1].detach().cpu(), generator, settings))
        used.append(settings)
    cat = {
        k: torch.cat([it[k] for it in items])
        for k in ("image", "mask", "field", "valid", "applied", "labels")
    }
    return SyntheticDefect(
        **cat,
        widths=tuple(it["widths"] for it in items),
        displacements=tuple(it["displacements"] for it in items),
        torn=tuple(it["torn"] for it in items),
        curve_points=tuple(it["curve_points"] for it in items),
        across=tuple(it["across"] for it in items),
        settings=tuple(used),
    )


def random_settings(
    generator: torch.Generator,
    base: DefectSettings | None = None,
    *,
    fold_probability: float = 0.5,
    partial_probability: float = 0.5,
    resin_probability: float = 0.5,
) -> DefectSettings:
    """``base`` with a random kind, partial tear and crack fill (ranges and limits kept)."""
    base = base or DefectSettings()
    kind = "fold" if _uniform(generator, 0, 1) < fold_probability else "crack"
    partial = _uniform(generator, 0, 1) < partial_probability
    fill = "resin" if _uniform(generator, 0, 1) < resin_probability else "zero"
    return replace(base, kind=kind, partial=partial, crack_fill=fill)
