"""Pictures for reports: pure functions from sections/fields to uint8 arrays, plus ``save_png``.

Inputs are sections ``(Y, X)`` (or ``(1, 1, Y, X)``), numpy or torch, any real dtype (raw uint8
or normalized float32), where 0 means "no data"; stacks are ``(Z, Y, X)``; fields follow
:mod:`emcore.field` (``(1, 2, H, W)`` or ``(2, H, W)``, channel 0 = x, px). Outputs are numpy
``uint8`` arrays: grey ``(Y, X)`` or RGB ``(Y, X, 3)``. Grey pictures are contrast-stretched over
the data pixels (percentiles ``low``..``high`` -> 1..255); no-data pixels are 0 (black).

API summary
-----------
* :func:`stretch` -> grey uint8 of one section (contrast-stretched; 0 stays 0).
* :func:`thumbnail` -> grey uint8, area-downsampled so the longer side is at most ``size`` px.
* :func:`side_by_side` -> uint8 ``before | after`` (any number of panels, grey or RGB) with labels.
* :func:`line_plot` -> RGB uint8 plot of series over z (e.g. the rotation drift).
* :func:`checkerboard` -> grey uint8 alternating ``square`` px squares of two sections.
* :func:`red_cyan` -> RGB uint8: first section red, second cyan (aligned structure looks grey).
* :func:`xz_reslice` -> grey uint8 ``(Z * z_scale, X)``: the stack cut at row ``y`` (sections as rows).
* :func:`field_colors` -> RGB uint8: colour-wheel field (hue = direction, brightness = magnitude).
* :func:`save_png` writes a uint8 grey or RGB array as PNG (pillow).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "checkerboard",
    "field_colors",
    "line_plot",
    "red_cyan",
    "save_png",
    "side_by_side",
    "stretch",
    "thumbnail",
    "xz_reslice",
]

ArrayLike = np.ndarray | torch.Tensor


def _numpy(data: ArrayLike) -> np.ndarray:
    return data.detach().cpu().numpy() if isinstance(data, torch.Tensor) else np.asarray(data)


def _section(image: ArrayLike, name: str = "image") -> np.ndarray:
    arr = _numpy(image)
    if arr.ndim == 4 and arr.shape[:2] == (1, 1):
        arr = arr[0, 0]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2D (Y, X) section, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) and arr.dtype != bool:
        raise ValueError(f"{name} must be numeric, got {arr.dtype}")
    return arr.astype(np.float64)


def stretch(image: ArrayLike, *, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """Grey uint8 ``(Y, X)``: data pixels mapped from their ``low``..``high`` percentiles to 1..255.

    No-data pixels (0) are 0. A section without data is all 0; constant data maps to 128.
    """
    arr = _section(image)
    if not 0 <= low < high <= 100:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {low}, {high}")
    data = (arr != 0) & np.isfinite(arr)
    out = np.zeros(arr.shape, dtype=np.uint8)
    if not data.any():
        return out
    lo, hi = np.percentile(arr[data], [low, high])
    if hi <= lo:
        out[data] = 128
        return out
    scaled = 1.0 + 254.0 * np.clip((arr - lo) / (hi - lo), 0.0, 1.0)
    out[data] = np.round(scaled[data]).astype(np.uint8)
    return out


def _area_downsample(arr: np.ndarray, factor: int) -> np.ndarray:
    """Mean of ``factor x factor`` blocks over data pixels only (0 where a block has no data)."""
    if factor == 1:
        return arr
    h, w = (arr.shape[0] // factor) * factor, (arr.shape[1] // factor) * factor
    blocks = arr[:h, :w].reshape(h // factor, factor, w // factor, factor)
    data = (blocks != 0).sum(axis=(1, 3))
    total = blocks.sum(axis=(1, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(data > 0, total / np.maximum(data, 1), 0.0)
    return np.where((data > 0) & (mean == 0), 1e-6, mean)


def thumbnail(image: ArrayLike, *, size: int = 256, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """Grey uint8 thumbnail: area-averaged by an integer factor so the longer side is <= ``size``."""
    arr = _section(image)
    if size < 1:
        raise ValueError(f"thumbnail size must be >= 1 px, got {size}")
    factor = max(1, math.ceil(max(arr.shape) / size))
    return stretch(_area_downsample(arr, factor), low=low, high=high)


def _grey_panel(panel: ArrayLike) -> np.ndarray:
    arr = _numpy(panel)
    if arr.dtype == np.uint8 and arr.ndim == 2:
        return arr  # already a picture
    return stretch(panel)


def side_by_side(
    panels: Sequence[ArrayLike], *, gap: int = 4, labels: Sequence[str] | None = None
) -> np.ndarray:
    """Panels next to each other (``gap`` px of white between them): grey uint8, or RGB uint8
    ``(Y, X, 3)`` when any panel is RGB (grey panels are then repeated over the channels).

    Panels that are uint8 pictures are used as they are; others go through :func:`stretch`. Panels
    of different heights are top-aligned (padded with black). ``labels`` (one per panel) are drawn
    in the top-left corner of each panel.
    """
    if not panels:
        raise ValueError("side_by_side needs at least one panel")
    if labels is not None and len(labels) != len(panels):
        raise ValueError(f"got {len(labels)} labels for {len(panels)} panels")
    rgb = any(_numpy(p).ndim == 3 for p in panels)
    greys = [_numpy(p) if _numpy(p).ndim == 3 else _grey_panel(p) for p in panels]
    if rgb:
        greys = [g if g.ndim == 3 else np.repeat(g[..., None], 3, axis=2) for g in greys]
    height = max(g.shape[0] for g in greys)
    width = sum(g.shape[1] for g in greys) + gap * (len(greys) - 1)
    out = np.full((height, width, 3) if rgb else (height, width), 255, dtype=np.uint8)
    x = 0
    starts = []
    for g in greys:
        out[:, x : x + g.shape[1]] = 0
        out[: g.shape[0], x : x + g.shape[1]] = g
        starts.append(x)
        x += g.shape[1] + gap
    if labels:
        picture = Image.fromarray(out)
        draw = ImageDraw.Draw(picture)
        font = ImageFont.load_default()
        white, black = ((255, 255, 255), (0, 0, 0)) if rgb else (255, 0)
        for x0, text in zip(starts, labels, strict=True):
            box = draw.textbbox((x0 + 4, 4), text, font=font)
            draw.rectangle((box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2), fill=black)
            draw.text((x0 + 4, 4), text, fill=white, font=font)
        out = np.asarray(picture)
    return out


def line_plot(
    series: dict[str, Sequence[float]],
    *,
    x: Sequence[float] | None = None,
    title: str = "",
    width: int = 480,
    height: int = 240,
) -> np.ndarray:
    """RGB uint8 ``(height, width, 3)`` line plot of one or more series over ``x`` (default 0..n-1).

    White background, a zero line, the y range and the x range printed at the axes, one colour
    per series with a legend. NaN values leave a gap.
    """
    colours = [(200, 30, 30), (30, 90, 200), (20, 150, 60), (160, 90, 10)]
    values = [np.asarray(v, dtype=np.float64) for v in series.values()]
    if not values or not all(len(v) for v in values):
        raise ValueError("line_plot needs at least one non-empty series")
    n = max(len(v) for v in values)
    xs = np.arange(n, dtype=np.float64) if x is None else np.asarray(x, dtype=np.float64)
    finite = np.concatenate([v[np.isfinite(v)] for v in values] + [np.zeros(1)])
    lo, hi = float(finite.min()), float(finite.max())
    if hi - lo < 1e-9:
        lo, hi = lo - 1.0, hi + 1.0
    left, right, top, bottom = 56, 10, 24, 22
    picture = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    x0, x1 = float(xs.min()), float(xs.max()) if len(xs) > 1 else float(xs.min()) + 1

    def to_px(xv: float, yv: float) -> tuple[float, float]:
        px = left + (xv - x0) / max(x1 - x0, 1e-9) * (width - left - right)
        py = top + (hi - yv) / (hi - lo) * (height - top - bottom)
        return px, py

    draw.rectangle((left, top, width - right, height - bottom), outline=(0, 0, 0))
    zy = to_px(x0, 0.0)[1]
    draw.line((left, zy, width - right, zy), fill=(170, 170, 170))
    draw.text((2, top - 4), f"{hi:.3g}", fill=(0, 0, 0), font=font)
    draw.text((2, height - bottom - 8), f"{lo:.3g}", fill=(0, 0, 0), font=font)
    draw.text((left, height - bottom + 4), f"{x0:g}", fill=(0, 0, 0), font=font)
    draw.text((width - right - 30, height - bottom + 4), f"{x1:g}", fill=(0, 0, 0), font=font)
    draw.text((left + 4, 4), title, fill=(0, 0, 0), font=font)
    for i, (name, v) in enumerate(zip(series, values, strict=True)):
        colour = colours[i % len(colours)]
        points = [to_px(float(xs[j]), float(v[j])) if np.isfinite(v[j]) else None for j in range(len(v))]
        for a, b in zip(points[:-1], points[1:], strict=True):
            if a is not None and b is not None:
                draw.line((*a, *b), fill=colour, width=2)
        for p in points:
            if p is not None:
                draw.ellipse((p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2), fill=colour)
        draw.text((width - right - 150, top + 4 + 12 * i), name, fill=colour, font=font)
    return np.asarray(picture)


def _pair(a: ArrayLike, b: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    sa, sb = _section(a, "a"), _section(b, "b")
    if sa.shape != sb.shape:
        raise ValueError(f"the two sections must have the same shape, got {sa.shape} and {sb.shape}")
    return stretch(sa), stretch(sb)


def checkerboard(a: ArrayLike, b: ArrayLike, *, square: int = 32) -> np.ndarray:
    """Grey uint8: squares of ``square`` px taken alternately from ``a`` (top-left) and ``b``.

    Misalignment shows as broken structures at the square edges.
    """
    if square < 1:
        raise ValueError(f"square must be >= 1 px, got {square}")
    ga, gb = _pair(a, b)
    ys, xs = np.indices(ga.shape)
    from_a = ((ys // square) + (xs // square)) % 2 == 0
    return np.where(from_a, ga, gb)


def red_cyan(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """RGB uint8 overlay: ``a`` in red, ``b`` in green and blue. Aligned structure appears grey;
    misaligned structure shows red and cyan fringes."""
    ga, gb = _pair(a, b)
    return np.stack((ga, gb, gb), axis=-1)


def xz_reslice(
    stack: ArrayLike, y: int, *, z_scale: int = 1, low: float = 1.0, high: float = 99.0
) -> np.ndarray:
    """Grey uint8 ``(Z * z_scale, X)``: row ``y`` of every section, section 0 at the top.

    ``z_scale`` repeats each section's row (e.g. ``round(z_nm / xy_nm)`` for a true-aspect view).
    Contrast is stretched over the whole reslice, so sections stay comparable.
    """
    arr = _numpy(stack)
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 3:
        raise ValueError(f"stack must have shape (Z, Y, X) or (Z, 1, Y, X), got {arr.shape}")
    if not 0 <= y < arr.shape[1]:
        raise ValueError(f"row y={y} is outside the stack's 0..{arr.shape[1] - 1}")
    if z_scale < 1:
        raise ValueError(f"z_scale must be >= 1, got {z_scale}")
    return stretch(np.repeat(arr[:, y, :].astype(np.float64), z_scale, axis=0), low=low, high=high)


def field_colors(field: ArrayLike, *, max_px: float | None = None) -> np.ndarray:
    """RGB uint8 ``(H, W, 3)`` colour-wheel picture of a displacement field.

    Hue = direction of the displacement (0 deg = +x red, 90 deg = +y, i.e. down in the picture,
    yellow-green ... as the HSV wheel turns), brightness = magnitude / ``max_px`` (default: the
    field's largest magnitude), full saturation. Zero displacement is black.
    """
    arr = _numpy(field).astype(np.float64)
    if arr.ndim == 4:
        if arr.shape[0] != 1:
            raise ValueError(f"field_colors draws one field, got a batch of {arr.shape[0]}")
        arr = arr[0]
    if arr.ndim != 3 or arr.shape[0] != 2:
        raise ValueError(f"field must have shape (1, 2, H, W) or (2, H, W), got {arr.shape}")
    dx, dy = arr[0], arr[1]
    magnitude = np.hypot(dx, dy)
    scale = float(magnitude.max()) if max_px is None else float(max_px)
    if not scale > 0:
        return np.zeros((*magnitude.shape, 3), dtype=np.uint8)
    hue = (np.arctan2(dy, dx) / (2 * math.pi)) % 1.0
    value = np.clip(magnitude / scale, 0.0, 1.0)
    # HSV -> RGB with saturation 1.
    h6 = hue * 6.0
    sector = np.floor(h6).astype(int) % 6
    f = h6 - np.floor(h6)
    p = np.zeros_like(value)
    q, t = value * (1 - f), value * f
    r = np.choose(sector, [value, q, p, p, t, value])
    g = np.choose(sector, [t, value, value, q, p, p])
    b = np.choose(sector, [p, p, t, value, value, q])
    return np.round(255 * np.stack((r, g, b), axis=-1)).astype(np.uint8)


def save_png(path: str | Path, array: np.ndarray) -> Path:
    """Write a uint8 grey ``(Y, X)`` or RGB ``(Y, X, 3)`` array as a PNG; returns the path.

    The parent folder must exist (this never creates folders).
    """
    arr = np.asarray(array)
    if arr.dtype != np.uint8:
        raise ValueError(f"save_png needs a uint8 array (use stretch() first), got {arr.dtype}")
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ValueError(f"save_png needs a (Y, X) or (Y, X, 3) array, got shape {arr.shape}")
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"folder {path.parent} does not exist; create it before saving {path.name}")
    Image.fromarray(arr).save(path, format="PNG")
    return path
