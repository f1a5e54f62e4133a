"""Classical coarse alignment without a model: masked FFT cross-correlation and a patch affine fit.

Images are normalized float32 sections ``(H, W)`` or ``(1, 1, H, W)`` at a low-resolution mip
(typically 256-1024 px), where 0 means "no data" (see :mod:`emcore.normalize`). Optional defect
masks have the image's shape; nonzero = do not use this pixel. All shifts and fields are in pixels
at the images' mip and follow :mod:`emcore.field`: the returned field ``f`` aligns ``src`` onto
``tgt``, ``warp(src, f) ~= tgt``, i.e. ``tgt(p) ~= src(p + f(p))``.

Method
------
* **Translation** (:func:`estimate_translation`): masked normalized cross-correlation (Padfield,
  "Masked object registration in the Fourier domain", IEEE TIP 2012) computed with real FFTs. For
  every candidate shift ``d`` it is the Pearson correlation of ``tgt(p)`` and ``src(p + d)`` over
  the pixels where *both* have data (weighted by an optional Tukey apodization window), so blank
  borders, missing regions and masked defects cannot create a false peak at 0 shift. Shifts whose
  overlap is below ``min_overlap`` of the smaller data area are excluded. The integer peak is
  refined to sub-pixel accuracy by a parabola through its neighbours along each axis.
* **Peak quality**: ``peak`` is the correlation at the peak; ``second_peak`` the highest
  correlation at least ``exclusion_px`` away from it; ``margin = peak - second_peak``. A result
  is *reliable* when ``peak >= min_peak`` and ``margin >= min_margin``.
* **Affine / rigid** (:func:`coarse_align`): a global translation first, then the translations
  of a grid of patches of the translation-corrected source, robust model fit (RANSAC over point
  triples, then least squares on the inliers), repeated ``iterations`` times on the source
  warped by the current estimate. Models: ``"translation"``, ``"rigid"`` (rotation + translation,
  Procrustes) and ``"affine"``.

API summary
-----------
* :func:`estimate_translation` -> :class:`TranslationEstimate` ``(dx, dy, peak, second_peak,
  margin, overlap, reliable, reason)``; ``.field(H, W)`` gives the constant field.
* :func:`masked_ncc` -> ``(ncc, overlap)``: the full correlation surface (for inspection).
* :func:`coarse_align` -> :class:`CoarseAlignment` ``(field (1, 2, H, W), matrix (2, 3),
  translation, confidence, reliable, reason, num_patches, num_inliers, residual_px)``; call
  ``.raise_if_unreliable(section)`` to turn a flag into :class:`UnreliableAlignmentError`.
* :func:`affine_displacement_field` -> the ``(1, 2, H, W)`` field of a ``(2, 3)`` displacement matrix;
  :func:`compose_matrices` / :func:`invert_matrix`: :func:`emcore.field.compose` / ``invert`` for
  such matrices (exact).
* Blank sections (no data, or constant) raise :class:`~emcore.errors.BlankSectionError`
  (:func:`check_has_data`).

Affine matrices here are *displacement* matrices ``M`` (2 x 3) acting on pixel-centre coordinates
``(x, y, 1)`` relative to the image's top-left pixel: ``field(x, y) = M @ (x, y, 1)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from emcore.affine import (
    affine_displacement_field,
    compose_matrices,
    invert_matrix,
)
from emcore.affine import rotation_matrix as _rotation_matrix
from emcore.errors import BlankSectionError, SectionflowError
from emcore.field import warp, warp_mask
from emcore.pyramid import downsample_image_torch, downsample_mask_torch

__all__ = [
    "MODELS",
    "CoarseAlignment",
    "TranslationEstimate",
    "UnreliableAlignmentError",
    "affine_displacement_field",
    "check_has_data",
    "compose_matrices",
    "coarse_align",
    "estimate_translation",
    "invert_matrix",
    "masked_ncc",
]

MODELS = ("translation", "rigid", "affine")


class UnreliableAlignmentError(SectionflowError, ValueError):
    """The correlation is too weak or ambiguous to trust (see ``reason`` in the message)."""


# ----------------------------------------------------------------------------------------------
# Input handling
# ----------------------------------------------------------------------------------------------


def _as_2d(image: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(image).__name__}")
    if image.ndim == 4 and image.shape[:2] == (1, 1):
        image = image[0, 0]
    if image.ndim != 2:
        raise ValueError(f"{name} must have shape (H, W) or (1, 1, H, W), got {tuple(image.shape)}")
    if not image.is_floating_point():
        raise ValueError(f"{name} must be a float (normalized) image, got {image.dtype}")
    if not torch.isfinite(image).all():
        raise ValueError(f"{name} contains NaN or inf; normalize it first (0 = no data)")
    return image


def _data_weight(image: torch.Tensor, mask: torch.Tensor | None, name: str) -> torch.Tensor:
    """1.0 where ``image`` has data and ``mask`` is not set, else 0.0 (float64, ``(H, W)``)."""
    keep = image != 0
    if mask is not None:
        mask = _as_2d(mask.to(torch.float32) if not mask.is_floating_point() else mask, f"{name}_mask")
        if mask.shape != image.shape:
            raise ValueError(f"{name}_mask {tuple(mask.shape)} must match {name} {tuple(image.shape)}")
        keep = keep & (mask == 0)
    return keep.to(torch.float64)


def _check_not_blank(image: torch.Tensor, weight: torch.Tensor, name: str, min_pixels: int) -> None:
    count = int(weight.sum().item())
    if count < min_pixels:
        raise BlankSectionError(name, f"only {count} pixels with data (need {min_pixels}); skip it")
    values = image.to(torch.float64)[weight > 0]
    if float(values.std()) <= 1e-6:
        raise BlankSectionError(name, "data has constant intensity; skip it")


def check_has_data(image: torch.Tensor, mask: torch.Tensor | None = None, name: str = "image") -> None:
    """Raise :class:`~emcore.errors.BlankSectionError` unless ``image`` (``(H, W)`` or ``(1, 1, H,
    W)``, 0 = no data; ``mask`` nonzero = ignore) has at least ``max(16, H W / 100)`` usable pixels
    of non-constant intensity: what every aligner here needs."""
    image = _as_2d(image, name)
    h, w = image.shape
    _check_not_blank(image, _data_weight(image, mask, name), name, max(16, (h * w) // 100))


def tukey_window(height: int, width: int, alpha: float = 0.5) -> torch.Tensor:
    """2D separable Tukey window ``(height, width)`` float64: flat centre, cosine-tapered edges.

    ``alpha`` is the tapered fraction of each axis (0 = flat, 1 = Hann). Values are > 0 at every
    pixel centre.
    """

    def one(n: int) -> torch.Tensor:
        t = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        w = torch.ones(n, dtype=torch.float64)
        if alpha <= 0:
            return w
        edge = alpha / 2
        lo, hi = t < edge, t > 1 - edge
        w[lo] = 0.5 * (1 - torch.cos(math.pi * t[lo] / edge))
        w[hi] = 0.5 * (1 - torch.cos(math.pi * (1 - t[hi]) / edge))
        return w

    return one(height)[:, None] * one(width)[None, :]


# ----------------------------------------------------------------------------------------------
# Masked normalized cross-correlation
# ----------------------------------------------------------------------------------------------


def _fft_size(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n (fast pocketfft sizes)."""
    best = 1 << max(0, (n - 1).bit_length())
    p5 = 1
    while p5 < 2 * n:
        p35 = p5
        while p35 < 2 * n:
            p = p35
            while p < n:
                p *= 2
            best = min(best, p)
            p35 *= 3
        p5 *= 5
    return best


def _masked_ncc_batch(
    tgt: torch.Tensor,
    src: torch.Tensor,
    w_tgt: torch.Tensor,
    w_src: torch.Tensor,
    max_shift: int,
    min_overlap: float,
    window: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched masked NCC over shifts ``|d| <= max_shift``.

    Args: ``(B, h, w)`` float64 images and data weights (1 = data, 0 = none or masked), and an
    optional ``(h, w)`` apodization window multiplied into the weights. The overlap is counted
    on the data weights alone (unwindowed).

    Returns:
        ``(ncc, overlap)`` both ``(B, 2 s + 1, 2 s + 1)`` with index ``[s + dy, s + dx]`` for shift
        ``d = (dx, dy)`` meaning ``tgt(p) ~ src(p + d)``. ``overlap`` is the number of pixels where both
        have data, as a fraction of the smaller data area; ``ncc`` is ``-inf`` where it is below
        ``min_overlap`` (or where either side has no variance).
    """
    b, h, w = tgt.shape
    s = max_shift
    size = (_fft_size(h + s), _fft_size(w + s))

    d_tgt, d_src = w_tgt, w_src
    if window is not None:
        w_tgt, w_src = w_tgt * window, w_src * window
    f1, f2 = tgt * w_tgt, src * w_src

    def spec(t: torch.Tensor) -> torch.Tensor:
        return torch.fft.rfft2(t, s=size)

    a_w, a_f, a_q = spec(w_tgt), spec(f1), spec(f1 * tgt)
    b_w, b_f, b_q = spec(w_src), spec(f2), spec(f2 * src)

    def corr(a: torch.Tensor, bb: torch.Tensor) -> torch.Tensor:
        # sum_p a(p) b(p + d), shifts d in [-s, s] gathered from the circular result.
        full = torch.fft.irfft2(a.conj() * bb, s=size)
        ys = torch.arange(-s, s + 1) % size[0]
        xs = torch.arange(-s, s + 1) % size[1]
        return full[:, ys][:, :, xs]

    n = corr(a_w, b_w)
    count = corr(spec(d_tgt), spec(d_src)) if window is not None else n
    s1, s2 = corr(a_f, b_w), corr(a_w, b_f)
    q1, q2 = corr(a_q, b_w), corr(a_w, b_q)
    c = corr(a_f, b_f)

    total = torch.minimum(d_tgt.sum(dim=(1, 2)), d_src.sum(dim=(1, 2))).clamp_min(1e-12)[:, None, None]
    overlap = count / total
    n_safe = n.clamp_min(1e-9)
    cov = c - s1 * s2 / n_safe
    var1 = (q1 - s1 * s1 / n_safe).clamp_min(0)
    var2 = (q2 - s2 * s2 / n_safe).clamp_min(0)
    denom = torch.sqrt(var1 * var2)
    # Relative floor: FFT round-off makes tiny variances noisy; treat them as no information.
    floor = 1e-6 * torch.sqrt(q1.abs() * q2.abs()).amax(dim=(1, 2), keepdim=True).clamp_min(1e-30)
    ok = (overlap >= min_overlap) & (denom > floor)
    ncc = torch.where(ok, cov / denom.clamp_min(1e-30), torch.full_like(cov, -math.inf))
    return ncc.clamp(max=1.0), overlap


def masked_ncc(
    src: torch.Tensor,
    tgt: torch.Tensor,
    *,
    src_mask: torch.Tensor | None = None,
    tgt_mask: torch.Tensor | None = None,
    max_shift: int | None = None,
    window: float = 0.5,
    min_overlap: float = 0.25,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The masked normalized cross-correlation surface of two images.

    Args:
        src, tgt: ``(H, W)`` or ``(1, 1, H, W)`` float images, same shape, 0 = no data.
        src_mask, tgt_mask: optional defect masks (nonzero = ignore), same shape.
        max_shift: largest ``|dx|``, ``|dy|`` searched (px); default ``min(H, W) // 2``.
        window: Tukey apodization fraction (0 = none).
        min_overlap: minimum overlap, as a fraction of the smaller data area.

    Returns:
        ``(ncc, overlap)``, float64 ``(2 s + 1, 2 s + 1)``; ``ncc[s + dy, s + dx]`` correlates
        ``tgt(p)`` with ``src(p + (dx, dy))`` and is ``-inf`` where the overlap is too small.
    """
    src, tgt = _as_2d(src, "src"), _as_2d(tgt, "tgt")
    if src.shape != tgt.shape:
        raise ValueError(f"src {tuple(src.shape)} and tgt {tuple(tgt.shape)} must have the same shape")
    h, w = src.shape
    s = min(h, w) // 2 if max_shift is None else int(max_shift)
    if not 0 <= s < max(h, w):
        raise ValueError(f"max_shift must be in [0, {max(h, w) - 1}], got {max_shift}")
    win = tukey_window(h, w, window) if window > 0 else None
    w_src = _data_weight(src, src_mask, "src")
    w_tgt = _data_weight(tgt, tgt_mask, "tgt")
    ncc, overlap = _masked_ncc_batch(
        tgt.to(torch.float64)[None], src.to(torch.float64)[None], w_tgt[None], w_src[None], s,
        min_overlap, win,
    )  # fmt: skip
    return ncc[0], overlap[0]


# ----------------------------------------------------------------------------------------------
# Peak finding
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TranslationEstimate:
    """A translation ``(dx, dy)`` px with ``tgt(p) ~= src(p + (dx, dy))`` and its peak quality.

    Attributes:
        dx, dy: the shift in px at the images' mip (sub-pixel).
        peak: correlation at the peak (-1..1).
        second_peak: highest correlation at least ``exclusion_px`` from the peak (-1 if none).
        margin: ``peak - second_peak``: how much the peak stands out.
        overlap: data overlap at the peak, fraction of the smaller data area.
        reliable: ``peak >= min_peak and margin >= min_margin``.
        reason: why it is unreliable ("" when reliable).
    """

    dx: float
    dy: float
    peak: float
    second_peak: float
    margin: float
    overlap: float
    reliable: bool
    reason: str

    def field(self, height: int, width: int) -> torch.Tensor:
        """The constant ``(1, 2, height, width)`` float32 field of this translation."""
        out = torch.empty(1, 2, height, width, dtype=torch.float32)
        out[:, 0] = self.dx
        out[:, 1] = self.dy
        return out


def _parabola_offset(left: float, centre: float, right: float) -> float:
    """Vertex offset (-0.5..0.5) of the parabola through three equally spaced samples."""
    if not (math.isfinite(left) and math.isfinite(right)):
        return 0.0
    denom = left - 2 * centre + right
    if denom >= 0:
        return 0.0
    return float(max(-0.5, min(0.5, 0.5 * (left - right) / denom)))


def _peaks(
    ncc: torch.Tensor,
    overlap: torch.Tensor,
    exclusion_px: int,
    min_peak: float,
    min_margin: float,
) -> list[TranslationEstimate]:
    """Sub-pixel peak and quality of each surface in a ``(B, 2 s + 1, 2 s + 1)`` batch."""
    b, n, _ = ncc.shape
    s = n // 2
    flat = ncc.reshape(b, -1)
    best = flat.argmax(dim=1)
    out = []
    ys = torch.arange(n)[:, None]
    xs = torch.arange(n)[None, :]
    for i in range(b):
        peak = float(flat[i, best[i]])
        if not math.isfinite(peak):
            none = TranslationEstimate(0.0, 0.0, -1.0, -1.0, 0.0, 0.0, False, "no shift has enough overlap")
            out.append(none)
            continue
        iy, ix = divmod(int(best[i]), n)
        surf = ncc[i]
        up = float(surf[iy - 1, ix]) if iy > 0 else -math.inf
        down = float(surf[iy + 1, ix]) if iy < n - 1 else -math.inf
        left = float(surf[iy, ix - 1]) if ix > 0 else -math.inf
        right = float(surf[iy, ix + 1]) if ix < n - 1 else -math.inf
        oy, ox = _parabola_offset(up, peak, down), _parabola_offset(left, peak, right)
        far = ((ys - iy).abs() > exclusion_px) | ((xs - ix).abs() > exclusion_px)
        rest = surf[far]
        rest = rest[torch.isfinite(rest)]
        second = float(rest.max()) if rest.numel() else -1.0
        margin = peak - second
        reasons = []
        if peak < min_peak:
            reasons.append(f"peak correlation {peak:.3f} < {min_peak}")
        if margin < min_margin:
            reasons.append(f"peak margin {margin:.3f} < {min_margin} (ambiguous: second peak {second:.3f})")
        if max(abs(iy - s), abs(ix - s)) == s and s > 0:
            reasons.append(f"peak at the search limit ({s} px): the shift may be larger")
        out.append(
            TranslationEstimate(
                dx=ix - s + ox,
                dy=iy - s + oy,
                peak=peak,
                second_peak=second,
                margin=margin,
                overlap=float(overlap[i, iy, ix]),
                reliable=not reasons,
                reason="; ".join(reasons),
            )
        )
    return out


def estimate_translation(
    src: torch.Tensor,
    tgt: torch.Tensor,
    *,
    src_mask: torch.Tensor | None = None,
    tgt_mask: torch.Tensor | None = None,
    max_shift: int | None = None,
    window: float = 0.5,
    min_overlap: float = 0.25,
    min_peak: float = 0.15,
    min_margin: float = 0.05,
    exclusion_px: int | None = None,
) -> TranslationEstimate:
    """The translation that aligns ``src`` onto ``tgt``: ``tgt(p) ~= src(p + (dx, dy))``.

    Args:
        src, tgt: ``(H, W)`` or ``(1, 1, H, W)`` normalized float images, 0 = no data.
        src_mask, tgt_mask: optional defect masks, nonzero = ignore.
        max_shift: search radius in px (default ``min(H, W) // 2``).
        window: Tukey apodization fraction (0 = none).
        min_overlap: shifts with less data overlap (fraction of the smaller data area) are excluded.
        min_peak, min_margin: reliability thresholds (see :class:`TranslationEstimate`).
        exclusion_px: radius around the peak ignored for the second peak (default
            ``max(3, min(H, W) // 32)``).

    Raises:
        BlankSectionError: ``src`` or ``tgt`` has (almost) no data or constant data.
    """
    src, tgt = _as_2d(src, "src"), _as_2d(tgt, "tgt")
    h, w = src.shape
    check_has_data(src, src_mask, "src")
    check_has_data(tgt, tgt_mask, "tgt")
    ncc, overlap = masked_ncc(
        src, tgt, src_mask=src_mask, tgt_mask=tgt_mask, max_shift=max_shift, window=window,
        min_overlap=min_overlap,
    )  # fmt: skip
    excl = max(3, min(h, w) // 32) if exclusion_px is None else exclusion_px
    return _peaks(ncc[None], overlap[None], excl, min_peak, min_margin)[0]


# ----------------------------------------------------------------------------------------------
# Affine from patches
# ----------------------------------------------------------------------------------------------


def _fit(points: torch.Tensor, disp: torch.Tensor, weights: torch.Tensor, model: str) -> torch.Tensor:
    """Weighted least-squares displacement matrix ``(2, 3)`` for ``disp ~= M @ (p, 1)``."""
    w = weights / weights.sum()
    if model == "translation":
        t = (w[:, None] * disp).sum(0)
        return torch.tensor([[0.0, 0.0, float(t[0])], [0.0, 0.0, float(t[1])]], dtype=torch.float64)
    if model == "affine":
        design = torch.cat((points, torch.ones(len(points), 1, dtype=torch.float64)), dim=1)
        sw = w.sqrt()[:, None]
        sol = torch.linalg.lstsq(design * sw, disp * sw).solution  # (3, 2)
        return sol.T.contiguous()
    # rigid: Procrustes (Kabsch) on p -> q = p + disp, weighted.
    q = points + disp
    pc, qc = (w[:, None] * points).sum(0), (w[:, None] * q).sum(0)
    cov = ((q - qc) * w[:, None]).T @ (points - pc)
    u, _, vt = torch.linalg.svd(cov)
    d = torch.sign(torch.linalg.det(u @ vt))
    rot = u @ torch.diag(torch.tensor([1.0, float(d)], dtype=torch.float64)) @ vt
    t = qc - rot @ pc
    lin = rot - torch.eye(2, dtype=torch.float64)
    return torch.cat((lin, t[:, None]), dim=1)


def _predict(matrix: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    return points @ matrix[:, :2].T + matrix[:, 2]


def _robust_fit(
    points: torch.Tensor, disp: torch.Tensor, weights: torch.Tensor, model: str, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """RANSAC over minimal samples, then least squares on the inliers (twice). Returns (M, inliers)."""
    n = len(points)
    minimal = {"translation": 1, "rigid": 2, "affine": 3}[model]
    gen = torch.Generator().manual_seed(0)
    best_inliers = torch.ones(n, dtype=torch.bool)
    best_score = -1.0
    trials = 1 if n <= minimal else 100
    for _ in range(trials):
        idx = torch.randperm(n, generator=gen)[:minimal] if n > minimal else torch.arange(n)
        if model == "affine":
            # Degenerate (collinear) triples give no affine; skip them.
            p = points[idx]
            area = (p[1, 0] - p[0, 0]) * (p[2, 1] - p[0, 1]) - (p[2, 0] - p[0, 0]) * (p[1, 1] - p[0, 1])
            if abs(float(area)) < 1e-6:
                continue
        m = _fit(points[idx], disp[idx], weights[idx], model)
        err = (_predict(m, points) - disp).norm(dim=1)
        inliers = err <= threshold
        score = float(weights[inliers].sum())
        if score > best_score:
            best_score, best_inliers = score, inliers
    inliers = best_inliers
    m = _fit(points[inliers], disp[inliers], weights[inliers], model)
    for _ in range(2):
        err = (_predict(m, points) - disp).norm(dim=1)
        new = err <= threshold
        if int(new.sum()) < minimal:
            break
        inliers = new
        m = _fit(points[inliers], disp[inliers], weights[inliers], model)
    return m, inliers


def _rotated(
    src: torch.Tensor, src_mask: torch.Tensor | None, angle: float
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``src`` (and its mask) warped by a rotation about the centre: (image, mask, matrix)."""
    h, w = src.shape
    rot = _rotation_matrix(angle, h, w)
    if angle == 0:
        return src, src_mask, rot
    field = affine_displacement_field(rot, h, w)
    moved = warp(src[None, None], field)[0, 0]
    # Pixels interpolated from the no-data border are not data.
    data = warp((src != 0).to(src.dtype)[None, None], field)[0, 0] >= 0.999
    moved = torch.where(data, moved, torch.zeros_like(moved))
    moved_mask = None if src_mask is None else warp_mask_2d(src_mask, field)
    return moved, moved_mask, rot


def _half(image: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """2x2 mean of ``image`` where all four pixels are data and unmasked, else 0 (no data).

    An odd last row / column is dropped. The mean is :func:`emcore.pyramid.downsample_image_torch`
    of the usable pixels; blocks with any unusable pixel are cleared
    (:func:`emcore.pyramid.downsample_mask_torch` of the unusable pixels).
    """
    h, w = (image.shape[0] // 2) * 2, (image.shape[1] // 2) * 2
    usable = _data_weight(image, mask, "image")[:h, :w] > 0
    mean = downsample_image_torch(torch.where(usable, image[:h, :w], 0.0)[None, None])
    partial = downsample_mask_torch(~usable[None, None])
    return torch.where(partial, 0.0, mean)[0, 0].to(torch.float32)


def _global_estimate(
    src: torch.Tensor,
    tgt: torch.Tensor,
    src_mask: torch.Tensor | None,
    tgt_mask: torch.Tensor | None,
    max_shift: int | None,
    angles: tuple[float, ...],
    *,
    min_peak: float,
    min_margin: float,
) -> tuple[TranslationEstimate, torch.Tensor]:
    """Best rotation (of ``angles``) + translation of the whole image: (estimate, matrix).

    With several angles and images of at least 128 px, the angle is chosen on 2x downsampled
    images (4x cheaper); the translation is then measured at full resolution for that angle.
    """
    if not angles:
        raise ValueError("angles must name at least one rotation (use (0.0,) for translation only)")
    h, w = src.shape
    if len(angles) > 1 and min(h, w) >= 128:
        small_src, small_tgt = _half(src, src_mask), _half(tgt, tgt_mask)
        small_shift = None if max_shift is None else max(1, max_shift // 2)
        peaks = []
        for angle in angles:
            moved, _, _ = _rotated(small_src, None, angle)
            est = estimate_translation(moved, small_tgt, max_shift=small_shift, min_peak=-1, min_margin=-1)
            peaks.append(est.peak)
        angles = (angles[max(range(len(angles)), key=peaks.__getitem__)],)
    best: tuple[TranslationEstimate, torch.Tensor] | None = None
    for angle in angles:
        moved, moved_mask, rot = _rotated(src, src_mask, angle)
        est = estimate_translation(
            moved, tgt, src_mask=moved_mask, tgt_mask=tgt_mask, max_shift=max_shift,
            min_peak=min_peak, min_margin=min_margin,
        )  # fmt: skip
        if best is None or est.peak > best[0].peak:
            shift = torch.tensor([[0.0, 0.0, est.dx], [0.0, 0.0, est.dy]], dtype=torch.float64)
            best = (est, compose_matrices(shift, rot))
    assert best is not None
    return best


def warp_mask_2d(mask: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
    """Warp an ``(H, W)`` defect mask (nonzero = defect) by a field; any touch of a defect counts."""
    m = _as_2d(mask.to(torch.float32) if not mask.is_floating_point() else mask, "mask")
    return warp_mask(m[None, None] != 0, field, threshold=1e-3)[0, 0]


@dataclass(frozen=True)
class CoarseAlignment:
    """Result of :func:`coarse_align`.

    Attributes:
        field: ``(1, 2, H, W)`` float32 px at the images' mip; ``warp(src, field) ~= tgt``.
        matrix: ``(2, 3)`` float64 displacement matrix of ``field`` (``field(x, y) = M @ (x, y, 1)``).
        translation: the global translation estimate (whole images) at the best trial rotation;
            its ``peak``/``margin`` describe the global correlation.
        confidence: 0..1, fraction of the patch weight that agrees with the model times the global
            peak correlation clamped to [0, 1] (0 when nothing could be measured).
        reliable: False when the global peak is unreliable or too few patches agree.
        reason: why it is unreliable ("" when reliable).
        num_patches: patches with a usable (reliable) correlation in the last iteration.
        num_inliers: of those, patches that agree with the model within ``inlier_px``.
        residual_px: RMS distance (px) of the inlier patch shifts from the model, last iteration.
    """

    field: torch.Tensor
    matrix: torch.Tensor
    translation: TranslationEstimate
    confidence: float
    reliable: bool
    reason: str
    num_patches: int
    num_inliers: int
    residual_px: float

    def raise_if_unreliable(self, section: object = "?") -> None:
        """Raise :class:`UnreliableAlignmentError` naming ``section`` unless ``reliable``."""
        if not self.reliable:
            raise UnreliableAlignmentError(
                f"section {section}: coarse alignment is unreliable ({self.reason}); mark the section "
                "as a defect/blank or check its neighbours"
            )


def _patch_grid(height: int, width: int, patch: int, grid: int) -> list[tuple[int, int]]:
    """Top-left corners of a ``grid x grid`` lattice of ``patch``-size patches spanning the image."""

    def starts(n: int) -> list[int]:
        if grid == 1 or n <= patch:
            return [max(0, (n - patch) // 2)]
        return [round(i * (n - patch) / (grid - 1)) for i in range(grid)]

    return [(y, x) for y in starts(height) for x in starts(width)]


def coarse_align(
    src: torch.Tensor,
    tgt: torch.Tensor,
    *,
    src_mask: torch.Tensor | None = None,
    tgt_mask: torch.Tensor | None = None,
    model: str = "affine",
    max_shift: int | None = None,
    grid: int = 5,
    patch_size: int | None = None,
    patch_max_shift: int | None = None,
    iterations: int = 2,
    inlier_px: float | None = None,
    min_inliers: int = 6,
    angles: tuple[float, ...] = (-8.0, -6.0, -4.0, -2.0, 0.0, 2.0, 4.0, 6.0, 8.0),
    min_peak: float = 0.15,
    min_margin: float = 0.05,
) -> CoarseAlignment:
    """Coarse (translation / rigid / affine) alignment of ``src`` onto ``tgt``.

    Args:
        src, tgt: ``(H, W)`` or ``(1, 1, H, W)`` normalized float images at a low mip, 0 = no data.
        src_mask, tgt_mask: optional defect masks (nonzero = ignore), each in its own image's frame.
        model: ``"translation"``, ``"rigid"`` or ``"affine"``.
        max_shift: search radius (px) of the global translation; default ``min(H, W) // 2``.
        grid: patches per axis (``grid * grid`` patches).
        patch_size: patch side in px (default ``min(H, W) // 3``, at least 32).
        patch_max_shift: patch search radius in px around the current estimate (default
            ``patch_size // 4``).
        iterations: rounds of (warp by current estimate, measure patches, fit).
        inlier_px: a patch agrees with the model within this distance (default
            ``max(1.5, min(H, W) / 128)`` px).
        min_inliers: fewer agreeing patches make the result unreliable (for ``model !=
            "translation"``; then the field falls back to the global translation).
        angles: rotations (degrees, about the image centre) tried for the global estimate; the one
            with the highest correlation peak starts the patch fit (``(0.0,)`` = translation only).
        min_peak, min_margin: reliability thresholds of every correlation.

    Returns:
        :class:`CoarseAlignment`; its ``field`` is ``(1, 2, H, W)`` px with ``warp(src, field) ~= tgt``.

    Raises:
        BlankSectionError: ``src`` or ``tgt`` has no usable data.
    """
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    src, tgt = _as_2d(src, "src"), _as_2d(tgt, "tgt")
    if src.shape != tgt.shape:
        raise ValueError(f"src {tuple(src.shape)} and tgt {tuple(tgt.shape)} must have the same shape")
    h, w = src.shape
    if min(h, w) < 32:
        raise ValueError(f"images must be at least 32 x 32 px for coarse alignment, got {h} x {w}")
    trial_angles = (0.0,) if model == "translation" else tuple(angles)
    trans, matrix = _global_estimate(
        src, tgt, src_mask, tgt_mask, max_shift, trial_angles, min_peak=min_peak, min_margin=min_margin
    )
    global_quality = max(0.0, min(1.0, trans.peak))
    if not trans.reliable:
        return CoarseAlignment(
            affine_displacement_field(matrix, h, w), matrix, trans, 0.0, False,
            f"global translation: {trans.reason}", 0, 0, math.nan,
        )  # fmt: skip

    patch = max(32, min(h, w) // 3) if patch_size is None else int(patch_size)
    patch = min(patch, h, w)
    pshift = max(2, patch // 4) if patch_max_shift is None else int(patch_max_shift)
    thr = max(1.5, min(h, w) / 128) if inlier_px is None else float(inlier_px)
    corners = _patch_grid(h, w, patch, grid)
    win = tukey_window(patch, patch, 0.5)
    src_w = _data_weight(src, src_mask, "src")
    tgt_w = _data_weight(tgt, tgt_mask, "tgt")
    src64 = src.to(torch.float64)
    tgt_patches = torch.stack([tgt.to(torch.float64)[y : y + patch, x : x + patch] for y, x in corners])
    tgt_wp = torch.stack([tgt_w[y : y + patch, x : x + patch] for y, x in corners])
    centres = torch.tensor(
        [[x + (patch - 1) / 2, y + (patch - 1) / 2] for y, x in corners], dtype=torch.float64
    )
    num_patches = num_inliers = 0
    residual = math.nan
    inlier_weight = 0.0
    reason = ""
    if model == "translation":
        iterations_to_run = 0
        num_patches = num_inliers = 1
        residual, inlier_weight = 0.0, 1.0
    else:
        iterations_to_run = iterations
    for _ in range(iterations_to_run):
        field = affine_displacement_field(matrix, h, w)
        moved = warp(src64[None, None], field.to(torch.float64))[0, 0]
        moved_w = (warp(src_w[None, None], field.to(torch.float64))[0, 0] >= 0.999).to(torch.float64)
        src_patches = torch.stack([moved[y : y + patch, x : x + patch] for y, x in corners])
        src_wp = torch.stack([moved_w[y : y + patch, x : x + patch] for y, x in corners])
        usable_patch = (tgt_wp > 0).flatten(1).float().mean(1) > 0.25
        usable_patch &= (src_wp > 0).flatten(1).float().mean(1) > 0.25
        ncc, overlap = _masked_ncc_batch(tgt_patches, src_patches, tgt_wp, src_wp, pshift, 0.25, win)
        ests = _peaks(ncc, overlap, max(2, patch // 16), min_peak, min_margin)
        good = [i for i, e in enumerate(ests) if e.reliable and bool(usable_patch[i])]
        num_patches = len(good)
        minimal = {"rigid": 2, "affine": 3}[model]
        if num_patches < max(minimal, min_inliers):
            reason = f"only {num_patches} of {len(corners)} patches correlate reliably (need {min_inliers})"
            break
        pts = centres[good]
        # tgt(c) ~ moved(c + d) = src(c + d + f(c + d)): the displacement at the patch centre c is
        # d + f(c + d) for the current model f.
        shift = torch.tensor([[ests[i].dx, ests[i].dy] for i in good], dtype=torch.float64)
        disp = shift + _predict(matrix, pts + shift)
        weights = torch.tensor([max(ests[i].peak, 1e-3) for i in good], dtype=torch.float64)
        new_matrix, inliers = _robust_fit(pts, disp, weights, model, thr)
        num_inliers = int(inliers.sum())
        if num_inliers < min_inliers:
            reason = f"only {num_inliers} of {num_patches} reliable patches agree on one {model} model"
            break
        matrix = new_matrix
        err = (_predict(matrix, pts[inliers]) - disp[inliers]).norm(dim=1)
        residual = float(err.square().mean().sqrt())
        all_weight = sum(max(e.peak, 0.0) for e in ests)
        inlier_weight = float(weights[inliers].sum()) / max(all_weight, 1e-9)
    reliable = not reason
    if not reliable:
        # The patches do not support the model: fall back to the smallest transform the evidence
        # supports, a translation measured without rotation (the best trial angle is a grid value,
        # e.g. exactly -2 deg, not a measurement). It is reliable only if that correlation is.
        zero = estimate_translation(
            src, tgt, src_mask=src_mask, tgt_mask=tgt_mask, max_shift=max_shift,
            min_peak=min_peak, min_margin=min_margin,
        )  # fmt: skip
        matrix = torch.tensor([[0.0, 0.0, zero.dx], [0.0, 0.0, zero.dy]], dtype=torch.float64)
        if zero.reliable:
            reason = f"translation only ({reason})"
            return CoarseAlignment(
                affine_displacement_field(matrix, h, w), matrix, zero, max(0.0, min(1.0, zero.peak)) * 0.5,
                True, reason, num_patches, num_inliers, residual,
            )  # fmt: skip
        reason = f"{reason}; translation without rotation: {zero.reason}"
    confidence = global_quality * min(1.0, inlier_weight) if reliable else 0.0
    return CoarseAlignment(
        field=affine_displacement_field(matrix, h, w),
        matrix=matrix,
        translation=trans,
        confidence=confidence,
        reliable=reliable,
        reason=reason,
        num_patches=num_patches,
        num_inliers=num_inliers,
        residual_px=residual,
    )
