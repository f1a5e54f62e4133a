"""Peer aligners for the accuracy benchmark: itk-elastix (B-spline) and SOFIMA (flow + elastic mesh).

Every peer is a function ``(src, tgt) -> field``: ``src``, ``tgt`` ``(S, S)`` float32 numpy images
(normalized, 0 = no data), the result a ``(1, 2, S, S)`` float32 torch field in our convention
(:mod:`emcore.field`: px at mip 0, channel 0 = x, pull: ``warp(src, field) ~ tgt``).

elastix
-------
``tgt`` is elastix's *fixed* image, ``src`` the *moving* one. elastix's transform maps fixed-image
points to moving-image points, ``T(x) = x + u(x)``: that is pull semantics, so our field is
``u`` sampled on the fixed grid (``itk.transformix_deformation_field``, physical units = px with
spacing 1 and origin 0, so pixel centres are integer coordinates as in ours; vector components in
(x, y) order = our channel order). :func:`check_conventions` verifies this on a pure translation.
Maps: ``default`` (``GetDefaultParameterMap("bspline")``: 4 resolutions, final grid 10 px),
``grid64`` (the same with final grid spacing 64 px), ``rigid+grid32`` (a rigid map, then a B-spline
map with final grid 32 px). elastix runs with ``threads`` threads (1 in the benchmark).

SOFIMA
------
google-research/sofima (not on PyPI in usable form): found through ``$SOFIMA_PATH`` (a directory
holding the ``sofima`` package) or ``/work/.mirror/sofima-pkg``; needs JAX. :func:`sofima_available`
says whether it imports. Pipeline as in SOFIMA's EM alignment example: masked cross-correlation
flow (patch 64, step 8), ``clean_flow``, then ``relax_mesh`` of an elastic mesh; the mesh's node
displacements (on the step-8 grid) are interpolated to every pixel (bilinear, edge values beyond
the outermost nodes). Optional defect masks go to the masked cross-correlation (``src_mask`` /
``tgt_mask``, True = ignore); the mesh is continuous, so SOFIMA's field cannot tear along them.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from emcore.field import warp
from emcore.synthetic import affine_field

__all__ = [
    "ELASTIX_MAPS",
    "check_conventions",
    "elastix_field",
    "peers",
    "sofima_available",
    "sofima_field",
]

ELASTIX_MAPS = ("default", "grid64", "rigid+grid32")
SOFIMA_DEFAULT_PATH = Path("/work/.mirror/sofima-pkg")


def _parameter_object(name: str):
    import itk

    params = itk.ParameterObject.New()
    if name == "default":
        params.AddParameterMap(params.GetDefaultParameterMap("bspline"))
    elif name == "grid64":
        params.AddParameterMap(params.GetDefaultParameterMap("bspline", 4, 64.0))
    elif name == "rigid+grid32":
        params.AddParameterMap(params.GetDefaultParameterMap("rigid"))
        params.AddParameterMap(params.GetDefaultParameterMap("bspline", 4, 32.0))
    else:
        raise ValueError(f"unknown elastix map {name!r}; expected one of {ELASTIX_MAPS}")
    for i in range(params.GetNumberOfParameterMaps()):
        params.SetParameter(i, "WriteResultImage", "false")
        params.SetParameter(i, "RandomSeed", "12345")
    return params


def elastix_field(
    src: np.ndarray, tgt: np.ndarray, *, parameter_map: str = "default", threads: int = 1
) -> torch.Tensor:
    """Register ``src`` (moving) onto ``tgt`` (fixed) with elastix; our ``(1, 2, S, S)`` field."""
    import itk

    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(threads)
    fixed = itk.GetImageFromArray(np.ascontiguousarray(tgt, dtype=np.float32))
    moving = itk.GetImageFromArray(np.ascontiguousarray(src, dtype=np.float32))
    _, transform = itk.elastix_registration_method(
        fixed,
        moving,
        parameter_object=_parameter_object(parameter_map),
        log_to_console=False,
        number_of_threads=threads,
    )
    # transformix writes deformationField.nii into its output directory (the cwd by default).
    with tempfile.TemporaryDirectory() as scratch:
        deformation = itk.transformix_deformation_field(moving, transform, output_directory=scratch)
        u = np.asarray(deformation, dtype=np.float32)  # (S, S, 2), components (x, y), px
    return torch.from_numpy(np.ascontiguousarray(u.transpose(2, 0, 1)))[None]


def sofima_available() -> bool:
    """Whether the ``sofima`` package (and JAX) can be imported (adds ``$SOFIMA_PATH`` to sys.path)."""
    path = Path(os.environ.get("SOFIMA_PATH", SOFIMA_DEFAULT_PATH))
    if (path / "sofima").is_dir() and str(path) not in sys.path:
        sys.path.insert(0, str(path))
    try:
        import jax  # noqa: F401
        from sofima import flow_field, flow_utils, mesh  # noqa: F401
    except ImportError:
        return False
    return True


def sofima_field(
    src: np.ndarray,
    tgt: np.ndarray,
    *,
    patch: int = 64,
    step: int = 8,
    src_mask: np.ndarray | None = None,
    tgt_mask: np.ndarray | None = None,
) -> torch.Tensor:
    """Align ``src`` onto ``tgt`` with SOFIMA flow + mesh; our ``(1, 2, S, S)`` field.

    ``src_mask`` / ``tgt_mask``: optional ``(S, S)`` bool, True = pixels to ignore (e.g. a fold
    band), handed to SOFIMA's masked cross-correlation (``post_mask`` / ``pre_mask``; a patch more
    than 75 % masked gets no flow). The elastic mesh itself is continuous: it cannot tear.
    """
    from sofima import flow_field, flow_utils, mesh

    size_y, size_x = tgt.shape
    calculator = flow_field.JAXMaskedXCorrWithStatsCalculator()
    masks = {}
    if src_mask is not None:
        masks["post_mask"] = np.asarray(src_mask, dtype=bool)
    if tgt_mask is not None:
        masks["pre_mask"] = np.asarray(tgt_mask, dtype=bool)
    flow = calculator.flow_field(tgt, src, (patch, patch), (step, step), batch_size=256, **masks)
    flow = flow_utils.clean_flow(
        flow[:, np.newaxis], min_peak_ratio=1.6, min_peak_sharpness=1.6, max_magnitude=80, max_deviation=10
    )
    config = mesh.IntegrationConfig(
        dt=0.001, gamma=0.0, k0=0.01, k=0.1, stride=(step, step), num_iters=1000, max_iters=100000,
        stop_v_max=0.005, dt_max=1000, start_cap=0.01, final_cap=10, prefer_orig_order=True,
    )
    solved, _, _ = mesh.relax_mesh(np.zeros_like(flow[:2]), np.nan_to_num(flow[:2]), config)
    nodes = torch.from_numpy(np.array(solved[:, 0], dtype=np.float32))[None]  # (1, 2, gy, gx), (x, y)
    # Node (i, j) sits at the centre of its patch: pixel (i * step + patch / 2, j * step + patch / 2).
    gy, gx = nodes.shape[-2:]
    ys = (torch.arange(size_y, dtype=torch.float32) - patch / 2) / step
    xs = (torch.arange(size_x, dtype=torch.float32) - patch / 2) / step
    grid_y = (2 * ys.clamp(0, gy - 1) + 1) / gy - 1
    grid_x = (2 * xs.clamp(0, gx - 1) + 1) / gx - 1
    grid = torch.stack(torch.meshgrid(grid_y, grid_x, indexing="ij")[::-1], dim=-1)[None]
    dense = F.grid_sample(nodes, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return SOFIMA_SIGN * dense


#: SOFIMA's flow(tgt, src) points from tgt to src content as a push; -1 turns it into our pull field
#: if check_conventions finds so (set below by measurement, see check_conventions).
SOFIMA_SIGN = -1.0


def check_conventions(
    size: int = 256, shift: tuple[float, float] = (3.0, -2.0), include_sofima: bool = True
) -> dict:
    """Recover a pure translation with each peer; return ``{peer: (mean x, mean y)}`` px.

    ``src = warp(tgt, t)`` with a constant field ``t = shift``: the aligning field is ``-shift``.
    Raises ``AssertionError`` if a peer's mean interior field is off by more than 0.5 px.
    """
    gen = torch.Generator().manual_seed(0)
    tgt = F.avg_pool2d(torch.randn(1, 1, size + 8, size + 8, generator=gen), 5, 1)[..., :size, :size] * 3
    tgt = torch.where(tgt == 0, torch.full_like(tgt, 1e-6), tgt)
    applied = affine_field(size, size, translation=shift)
    src = warp(tgt, applied)
    expected = (-shift[0], -shift[1])
    found = {}
    runs: list[tuple[str, Callable[[np.ndarray, np.ndarray], torch.Tensor]]] = [
        ("elastix default", lambda s, t: elastix_field(s, t))
    ]
    if include_sofima and sofima_available():
        runs.append(("sofima", lambda s, t: sofima_field(s, t)))
    for name, fn in runs:
        field = fn(src[0, 0].numpy(), tgt[0, 0].numpy())
        inner = field[..., 32:-32, 32:-32]
        mean = (float(inner[:, 0].mean()), float(inner[:, 1].mean()))
        found[name] = mean
        assert abs(mean[0] - expected[0]) < 0.5 and abs(mean[1] - expected[1]) < 0.5, (
            f"{name}: mean field {mean} on a translation whose aligning field is {expected}: "
            "the conversion to our convention is wrong"
        )
    return found


def peers(include_sofima: bool = True) -> dict[str, Callable[[np.ndarray, np.ndarray], torch.Tensor]]:
    """The peer aligners by name (SOFIMA only when importable)."""
    out: dict[str, Callable[[np.ndarray, np.ndarray], torch.Tensor]] = {
        f"elastix {name}": (lambda s, t, name=name: elastix_field(s, t, parameter_map=name))
        for name in ELASTIX_MAPS
    }
    if include_sofima and sofima_available():
        out["sofima (patch 64, step 8)"] = sofima_field
    return out
