"""The finetuner loss: every backend against the reference, analytic cases, gradients, input checks.

Backends under test: ``reference`` (autograd), ``fused`` with the C++ kernels and with the torch
fallback, and ``triton`` (CUDA when present, else the Triton interpreter on CPU tensors, which
needs ``TRITON_INTERPRET=1`` from the start of the process, as ``make test`` sets it).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from emcore.field import warp
from emcore.finetune import loss_fused
from emcore.finetune.loss_fused import CppKernels, TorchKernels, cpu_kernels, fused_terms
from emcore.finetune.losses import (
    LossMasks,
    alignment_loss,
    alignment_loss_terms,
    prepare_masks,
    resolve_backend,
)
from emcore.normalize import normalize, section_stats
from emcore.synthetic import smooth_field

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_RUNNABLE = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(
    not TRITON_RUNNABLE, reason="Triton needs CUDA or TRITON_INTERPRET=1 at process start (make test sets it)"
)


def _terms_fn(impl: str, knobs: dict | None = None):
    """``f(src, tgt, field, masks) -> (3, N)`` stacked terms for one backend / CPU kernel choice.

    ``knobs``: ``TritonKernels`` arguments for ``impl="triton"`` (default: a block small enough
    for several blocks per item, the default ``num_warps`` and ``fast_math``)."""

    def run(src, tgt, field, masks):
        if impl in ("cpp", "torch"):
            kernels = cpu_kernels(impl)
            terms = fused_terms(src, tgt, field, masks.src_flags, masks.tgt_flags, kernels=kernels)
        elif impl == "triton":
            from emcore.finetune.loss_triton import TritonKernels, triton_terms

            dev = TRITON_DEVICE
            block = 64 if src[0, 0].numel() <= 1024 else 1024  # several blocks per item
            terms = triton_terms(
                src.to(dev), tgt.to(dev), field if field.device.type == dev else field.to(dev),
                masks.src_flags.to(dev), masks.tgt_flags.to(dev),
                kernels=TritonKernels(**({"block": block} | (knobs or {}))),
            )  # fmt: skip
        else:
            terms = alignment_loss_terms(src, tgt, field, masks=masks, backend="reference")
        return torch.stack(tuple(terms))

    return run


FAST = [
    pytest.param("cpp", id="fused-cpp"),
    pytest.param("torch", id="fused-torch"),
    pytest.param("triton", id="triton", marks=needs_triton),
]


def _random_case(n: int, c: int, h: int, w: int, dtype: torch.dtype, seed: int = 0):
    """Random images with no-data borders, sparse defects in both frames, a rough field."""
    gen = torch.Generator().manual_seed(seed)
    src = torch.rand(n, c, h, w, generator=gen, dtype=dtype) + 0.1
    tgt = torch.rand(n, c, h, w, generator=gen, dtype=dtype) + 0.1
    src[:, :, :2] = 0  # no data at the top of the source
    tgt[:, :, :, -3:] = 0  # and at the right of the target
    src_defects = torch.rand(n, 1, h, w, generator=gen) < 0.04
    tgt_defects = torch.rand(n, 1, h, w, generator=gen) < 0.04
    field = torch.randn(n, 2, h, w, generator=gen, dtype=dtype) * 1.2
    masks = prepare_masks(src, tgt, src_defects=src_defects, tgt_defects=tgt_defects)
    return src, tgt, field, masks


def _value_and_grad(fn, src, tgt, field, masks):
    f = field.clone().requires_grad_(True)
    terms = fn(src, tgt, f, masks)
    (terms * torch.tensor([[1.3], [0.7], [2.0]], dtype=terms.dtype, device=terms.device)).sum().backward()
    return terms.detach().cpu(), f.grad.cpu()


# --------------------------------------------------------------------------- agreement


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_terms_and_gradients_match_reference(impl: str, dtype: torch.dtype) -> None:
    src, tgt, field, masks = _random_case(2, 3, 17, 23, dtype)
    ref_terms, ref_grad = _value_and_grad(_terms_fn("reference"), src, tgt, field, masks)
    terms, grad = _value_and_grad(_terms_fn(impl), src, tgt, field, masks)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert ref_terms.min() > 0  # every term is exercised
    torch.testing.assert_close(terms, ref_terms, rtol=tol, atol=tol)
    torch.testing.assert_close(grad, ref_grad, rtol=tol, atol=tol * ref_grad.abs().max().item())


@pytest.mark.parametrize("impl", ["reference", "cpp", "torch"])
def test_gradcheck_float64_with_masks_and_defects(impl: str) -> None:
    src, tgt, field, masks = _random_case(2, 2, 6, 7, torch.float64, seed=1)
    fn = _terms_fn(impl)
    assert torch.autograd.gradcheck(
        lambda f: fn(src, tgt, f, masks), (field.clone().requires_grad_(True),), eps=1e-6, atol=1e-6
    )


@needs_triton
@pytest.mark.parametrize("fast_math", [False, True], ids=["precise", "fast-math"])
def test_gradcheck_float64_triton(fast_math: bool) -> None:
    src, tgt, field, masks = _random_case(1, 1, 16, 20, torch.float64, seed=2)
    fn = _terms_fn("triton", {"fast_math": fast_math})
    f = field.to(TRITON_DEVICE).requires_grad_(True)
    check = torch.autograd.gradcheck
    assert check(lambda f: fn(src, tgt, f, masks), (f,), eps=1e-6, atol=1e-6, fast_mode=True)


# Triton knobs besides the defaults: both spring variants, other blocks and warps (17 x 23 px:
# 4-13 blocks). The other Triton tests use the default spring arithmetic.
KNOBS = [
    pytest.param({"block": 64, "fast_math": False}, id="precise"),
    pytest.param({"block": 32, "num_warps": 2, "fast_math": True}, id="block32-warps2-fast"),
    pytest.param({"block": 128, "num_warps": 8, "fast_math": False}, id="block128-warps8-precise"),
]


@needs_triton
@pytest.mark.parametrize("knobs", KNOBS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_triton_knobs_match_reference(knobs: dict, dtype: torch.dtype) -> None:
    src, tgt, field, masks = _random_case(2, 3, 17, 23, dtype)
    ref_terms, ref_grad = _value_and_grad(_terms_fn("reference"), src, tgt, field, masks)
    terms, grad = _value_and_grad(_terms_fn("triton", knobs), src, tgt, field, masks)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(terms, ref_terms, rtol=tol, atol=tol)
    torch.testing.assert_close(grad, ref_grad, rtol=tol, atol=tol * ref_grad.abs().max().item())


def test_triton_knobs_are_checked() -> None:
    from emcore.finetune.loss_triton import TritonKernels

    with pytest.raises(ValueError, match="block must be a power of two"):
        TritonKernels(block=100)
    with pytest.raises(ValueError, match="num_warps must be"):
        TritonKernels(num_warps=3)


def _real_pair(size: int, shift_px: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bundled VNC section 0, normalized; tgt = a crop, src = tgt deformed by a smooth field."""
    from emcore.bundled import load_vnc_sections

    raw = load_vnc_sections([0], crop=(slice(300, 300 + size), slice(200, 200 + size)))[0]
    stats = section_stats(raw)
    tgt = torch.from_numpy(normalize(raw, stats.mean, stats.std)).view(1, 1, size, size)
    applied = smooth_field(size, size, shift_px, seed=3)
    src = warp(tgt, applied)
    # A field near (not at) the aligning one: the inverse of `applied` is about -applied.
    return src, tgt, -0.8 * applied


@pytest.mark.parametrize(
    ("impl", "knobs"),
    [("cpp", None), ("torch", None), pytest.param("triton", None, marks=needs_triton, id="triton"),
     pytest.param("triton", {"fast_math": False}, marks=needs_triton, id="triton-precise")],
)  # fmt: skip
def test_float32_relative_error_on_real_em(impl: str, knobs: dict | None) -> None:
    size = 64 if impl == "triton" else 128  # interpreter: keep Triton inputs tiny (4 blocks)
    src, tgt, field = _real_pair(size, 4.0)
    defects = torch.zeros(1, 1, size, size, dtype=torch.bool)
    defects[..., size // 3 : size // 3 + 3, :] = True  # a crack across the target
    masks = prepare_masks(src, tgt, tgt_defects=defects)
    ref64_terms, ref64_grad = _value_and_grad(
        _terms_fn("reference"), src.double(), tgt.double(), field.double(), masks
    )
    ref_terms, ref_grad = _value_and_grad(_terms_fn("reference"), src, tgt, field, masks)
    terms, grad = _value_and_grad(_terms_fn(impl, knobs), src, tgt, field, masks)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.double() - b.double()).norm() / b.double().norm())

    assert rel(grad, ref_grad) < 1e-4
    assert rel(terms, ref_terms) < 1e-5
    # As close to the float64 truth as the float32 reference is (within a factor 3).
    assert rel(grad, ref64_grad) < 3 * rel(ref_grad, ref64_grad) + 1e-6


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 1, 1, 5), (2, 3, 5, 1), (1, 1, 2, 2)])
def test_degenerate_shapes_match_reference(impl: str, shape: tuple[int, int, int, int]) -> None:
    gen = torch.Generator().manual_seed(7)
    src = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.1
    tgt = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.1
    field = torch.randn(shape[0], 2, *shape[2:], generator=gen, dtype=torch.float64) * 0.4
    masks = prepare_masks(src, tgt)
    ref_terms, ref_grad = _value_and_grad(_terms_fn("reference"), src, tgt, field, masks)
    terms, grad = _value_and_grad(_terms_fn(impl), src, tgt, field, masks)
    torch.testing.assert_close(terms, ref_terms, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", FAST)
def test_fields_pointing_far_outside_read_nothing(impl: str) -> None:
    src, tgt, field, masks = _random_case(1, 2, 9, 12, torch.float64, seed=6)
    field[0, 0, 2, 3] = 1e6
    field[0, 1, 5, 5] = -1e7
    field[0, :, 7, 1] = 11.5  # just outside the bottom-right corner
    ref_terms, ref_grad = _value_and_grad(_terms_fn("reference"), src, tgt, field, masks)
    terms, grad = _value_and_grad(_terms_fn(impl), src, tgt, field, masks)
    assert torch.isfinite(terms).all()
    torch.testing.assert_close(terms, ref_terms, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------- analytic cases

ALL = ["reference", *FAST]


@pytest.mark.parametrize("impl", ALL)
def test_uniform_scaling_has_known_rigidity(impl: str) -> None:
    """Field ``s * p`` stretches every spring by ``s |d|``: energy ``s^2 |d|^2`` per directed spring."""
    h, w, s = 9, 13, 0.01
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")  # fmt: skip
    field = (s * torch.stack((xs, ys))).unsqueeze(0)
    img = torch.ones(1, 1, h, w, dtype=torch.float64)
    terms = _terms_fn(impl)(img, img, field, prepare_masks(img, img))
    springs = 2 * h * (w - 1) + 2 * w * (h - 1) + 2 * 2 * (h - 1) * (w - 1) * 2  # sum of |d|^2
    assert terms[1, 0].item() == pytest.approx(s * s * springs / (h * w), rel=1e-9)
    assert terms[2, 0].item() == pytest.approx(float(field.square().mean()), rel=1e-12)


@pytest.mark.parametrize("impl", ALL)
def test_translation_is_free_and_identity_is_zero(impl: str) -> None:
    img = torch.rand(1, 2, 12, 10, dtype=torch.float64) + 0.5
    masks = prepare_masks(img, img)
    zero = _terms_fn(impl)(img, img, torch.zeros(1, 2, 12, 10, dtype=torch.float64), masks)
    assert zero.abs().max().item() == pytest.approx(0.0, abs=1e-24)  # grid_sample rounds a little
    shifted = _terms_fn(impl)(img, img, torch.full((1, 2, 12, 10), 2.5, dtype=torch.float64), masks)
    assert shifted[1, 0].item() == pytest.approx(0.0, abs=1e-20)
    assert shifted[0, 0].item() > 0.01  # the images no longer match


@pytest.mark.parametrize("impl", ALL)
def test_defects_cut_springs_and_mse(impl: str) -> None:
    h, w = 10, 12
    img = torch.rand(1, 1, h, w, dtype=torch.float64) + 0.5
    defect = torch.zeros(1, 1, h, w, dtype=torch.bool)
    defect[..., 4:6, :] = True
    field = torch.zeros(1, 2, h, w, dtype=torch.float64)
    field[:, :, 4:6, :] = torch.randn(1, 2, 2, w, dtype=torch.float64)  # wild inside the defect only
    tgt = img.clone()
    tgt[..., 4:6, :] = 7.0  # target garbage inside the defect
    terms = _terms_fn(impl)(img, tgt, field, prepare_masks(img, tgt, tgt_defects=defect))
    assert terms[0, 0].item() == pytest.approx(0.0, abs=1e-24) and terms[1, 0].item() == 0.0
    without = _terms_fn(impl)(img, tgt, field, prepare_masks(img, tgt))
    assert without[0, 0].item() > 0 and without[1, 0].item() > 0


@pytest.mark.parametrize("impl", ALL)
def test_source_defects_and_no_data_are_warped_with_the_field(impl: str) -> None:
    h, w = 8, 10
    tgt = torch.rand(1, 1, h, w, dtype=torch.float64) + 0.5
    src = torch.roll(tgt, shifts=-1, dims=-1)  # src(x) = tgt(x + 1): field -1 in x aligns it
    src[..., -1] = 0  # the column that wrapped around has no data
    field = torch.zeros(1, 2, h, w, dtype=torch.float64)
    field[:, 0] = -1.0
    clean = _terms_fn(impl)(src, tgt, field, prepare_masks(src, tgt))
    assert clean[0, 0].item() == pytest.approx(0.0, abs=1e-24)  # x = 0 reads outside: not valid
    src_def = torch.zeros(1, 1, h, w, dtype=torch.bool)
    src_def[..., 3, 5] = True  # lands on target pixel (3, 6)
    tgt_bad = tgt.clone()
    tgt_bad[..., 3, 6] += 5.0
    masked = _terms_fn(impl)(src, tgt_bad, field, prepare_masks(src, tgt_bad, src_defects=src_def))
    assert masked[0, 0].item() == pytest.approx(0.0, abs=1e-24)
    unmasked = _terms_fn(impl)(src, tgt_bad, field, prepare_masks(src, tgt_bad))
    assert unmasked[0, 0].item() > 0.1


def test_no_data_target_pixels_weigh_one_millionth_per_spring() -> None:
    h, w, s = 6, 6, 0.02
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")  # fmt: skip
    field = (s * torch.stack((xs, ys))).unsqueeze(0)
    full = torch.ones(1, 1, h, w, dtype=torch.float64)
    empty = torch.zeros_like(full)
    for impl in ("reference", "cpp", "torch"):
        with_data = _terms_fn(impl)(full, full, field, prepare_masks(full, full))[1, 0]
        no_data = _terms_fn(impl)(full, empty, field, prepare_masks(full, empty))[1, 0]
        assert no_data.item() == pytest.approx(1e-6 * with_data.item(), rel=1e-9)


# --------------------------------------------------------------------------- batching, API


@pytest.mark.parametrize("backend", ["reference", "fused", pytest.param("triton", marks=needs_triton)])
def test_batch_items_are_independent_and_reductions_agree(backend: str) -> None:
    src, tgt, field, _ = _random_case(3, 2, 9, 11, torch.float64, seed=4)
    if backend == "triton":
        src, tgt, field = src.to(TRITON_DEVICE), tgt.to(TRITON_DEVICE), field.to(TRITON_DEVICE)
    per_item = alignment_loss(src, tgt, field, backend=backend, reduction="none")
    assert per_item.shape == (3,)
    for i in range(3):
        alone = alignment_loss(src[i : i + 1], tgt[i : i + 1], field[i : i + 1], backend=backend)
        assert alone.item() == pytest.approx(per_item[i].item(), rel=1e-12)
    mean = alignment_loss(src, tgt, field, backend=backend, sm=200.0, l2_weight=1e-4)
    assert mean.item() == pytest.approx(per_item.mean().item(), rel=1e-12)
    terms = alignment_loss_terms(src, tgt, field, backend=backend)
    torch.testing.assert_close(per_item, terms.mse + 200.0 * terms.rigidity + 1e-4 * terms.l2)


def test_only_the_field_gets_a_gradient_and_no_grad_mode_works() -> None:
    src, tgt, field, _ = _random_case(1, 1, 8, 9, torch.float32)
    src.requires_grad_(True)
    f = field.clone().requires_grad_(True)
    alignment_loss(src, tgt, f, backend="fused").backward()
    assert src.grad is None and f.grad is not None and f.grad.abs().sum() > 0
    with torch.no_grad():
        value = alignment_loss(src, tgt, field, backend="fused")
    reference = alignment_loss(src, tgt, field, backend="reference")
    assert value.item() == pytest.approx(reference.item(), rel=1e-5)


def test_double_backward_is_refused_not_wrong() -> None:
    src, tgt, field, _ = _random_case(1, 1, 6, 7, torch.float64)
    f = field.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(alignment_loss(src, tgt, f, backend="fused"), f, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        grad.sum().backward()


def test_cpp_kernels_are_thread_count_independent() -> None:
    src, tgt, field, masks = _random_case(2, 1, 200, 180, torch.float32, seed=5)
    fn = _terms_fn("cpp")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _value_and_grad(fn, src, tgt, field, masks)
        torch.set_num_threads(2)
        assert loss_fused._num_threads(src.numel()) == 2  # big enough to really use two
        two = _value_and_grad(fn, src, tgt, field, masks)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_cpp_build_is_cached_and_falls_back_without_a_compiler(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SECTIONFLOW_KERNEL_CACHE", str(tmp_path))
    library = loss_fused.build_cpp_library()
    assert library.parent == tmp_path and library.exists()
    assert loss_fused.build_cpp_library() == library  # second call: the cached file
    assert isinstance(CppKernels(library), CppKernels)

    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    loss_fused._cpp_kernels_or_error.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="torch fallback"):
            assert isinstance(cpu_kernels("auto"), TorchKernels)
        with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
            cpu_kernels("cpp")
    finally:
        loss_fused._cpp_kernels_or_error.cache_clear()


def test_auto_backend_picks_fused_on_cpu_even_under_the_triton_interpreter(monkeypatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("auto", torch.zeros(1, 2, 2, 2)) == "fused"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", torch.zeros(1, 2, 2, 2))


def _bad_calls() -> list[tuple[dict, type[Exception], str]]:
    img = torch.rand(2, 1, 6, 7)
    field = torch.zeros(2, 2, 6, 7)
    return [
        (dict(src=img[0], tgt=img, field=field), ValueError, "src must have shape"),
        (dict(src=img, tgt=img[:1], field=field), ValueError, "same shape"),
        (dict(src=img.double(), tgt=img, field=field), ValueError, "share dtype"),
        (dict(src=img.half(), tgt=img.half(), field=field), ValueError, "float32 or float64"),
        (dict(src=img, tgt=img, field=field[:, :1]), ValueError, "field must have shape"),
        (dict(src=img, tgt=img, field=field.double()), ValueError, "dtype and device"),
        (dict(src=img, tgt=img, field=field, tgt_defects=torch.zeros(2, 6, 7)), ValueError, "tgt_defects"),
        (dict(src=img, tgt=img, field=field, backend="cuda"), ValueError, "backend must be one of"),
        (dict(src=img, tgt=img, field=field, reduction="sum"), ValueError, "reduction"),
        (dict(src=img, tgt=img, field=field, sm=-1.0), ValueError, "sm must be"),
        (dict(src=img, tgt=img, field=field, l2_weight=math.nan), ValueError, "l2_weight must be"),
        (
            dict(src=img, tgt=img, field=field, masks=prepare_masks(img, img), src_defects=img > 0.5),
            ValueError,
            "not both",
        ),
        (
            dict(src=img, tgt=img, field=field, masks=LossMasks(img > 0, img > 0)),
            ValueError,
            "prepare_masks",
        ),
    ]


@pytest.mark.parametrize(("kwargs", "error", "match"), _bad_calls())
def test_bad_input_gets_a_clear_error(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        alignment_loss(**kwargs)


def test_prepare_masks_flags() -> None:
    src = torch.tensor([[[[0.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [2.0, 0.0]]]])  # (1, 2, 2, 2)
    defects = torch.tensor([[[[1, 0], [0, 1]]]])
    masks = prepare_masks(src, src, src_defects=defects)
    assert masks.src_flags.dtype == torch.uint8
    assert np.array_equal(masks.src_flags[0, 0].numpy(), [[2, 1], [1, 2]])
    assert np.array_equal(masks.tgt_flags[0, 0].numpy(), [[0, 1], [1, 0]])


@pytest.mark.parametrize("backend", ["reference", "fused", pytest.param("triton", marks=needs_triton)])
def test_sample_offsets_move_only_the_mse(backend: str) -> None:
    """With ``sample_offsets`` the MSE (and its masks) is that of ``field + offsets`` and the rigidity
    and L2 are those of ``field``, on every backend; the gradient flows to ``field``."""
    src, tgt, field, masks = _random_case(2, 1, 12, 14, torch.float64, seed=7)
    gen = torch.Generator().manual_seed(3)
    offsets = torch.rand(1, 2, 12, 14, generator=gen, dtype=torch.float64) - 0.5
    dev = TRITON_DEVICE if backend == "triton" else "cpu"
    moved = [t.to(dev) for t in (src, tgt, field, offsets)]
    masks = type(masks)(masks.src_flags.to(dev), masks.tgt_flags.to(dev))
    f = moved[2].clone().requires_grad_(True)
    got = alignment_loss_terms(moved[0], moved[1], f, masks=masks, backend=backend, sample_offsets=moved[3])
    at_sampled = alignment_loss_terms(src, tgt, field + offsets, masks=masks_cpu(masks), backend="reference")
    at_field = alignment_loss_terms(src, tgt, field, masks=masks_cpu(masks), backend="reference")
    torch.testing.assert_close(got.mse.cpu(), at_sampled.mse, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(got.l2.cpu(), at_field.l2, rtol=1e-6, atol=1e-9)
    # Rigidity weights come from the sampled positions' defect masks, the springs from the field.
    assert not torch.allclose(got.rigidity.cpu(), at_sampled.rigidity)
    (got.mse.sum() + got.rigidity.sum()).backward()
    assert f.grad is not None and bool(torch.isfinite(f.grad).all()) and float(f.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="sample_offsets must be"):
        alignment_loss_terms(src, tgt, field, masks=masks_cpu(masks), sample_offsets=offsets[..., :5])


def masks_cpu(masks):
    return type(masks)(masks.src_flags.cpu(), masks.tgt_flags.cpu())


def _kernels(impl: str):
    if impl == "triton":
        from emcore.finetune.loss_triton import TritonKernels

        return TritonKernels(block=64)
    return cpu_kernels(impl)


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("offset_items", [1, 3])
def test_kernels_sample_at_field_plus_offsets(impl: str, offset_items: int) -> None:
    """``warp_mse(field, sample_offsets=o)`` = ``warp_mse(field + o)`` (sums, ``w``, gradient), for
    offsets shaped ``(1, 2, H, W)`` (broadcast over the batch) and ``(N, 2, H, W)``; in the Triton
    kernel the offsets are read in place, with the same float additions (so: equal)."""
    src, tgt, field, masks = _random_case(3, 2, 11, 13, torch.float64, seed=8)
    gen = torch.Generator().manual_seed(9)
    offsets = torch.rand(offset_items, 2, 11, 13, generator=gen, dtype=torch.float64) * 2 - 1
    dev = TRITON_DEVICE if impl == "triton" else "cpu"
    src, tgt, field, offsets = (t.to(dev) for t in (src, tgt, field, offsets))
    flags = (masks.src_flags.to(dev), masks.tgt_flags.to(dev))
    kernels = _kernels(impl)
    inside = kernels.warp_mse(src, tgt, field, *flags, True, sample_offsets=offsets)
    added = kernels.warp_mse(src, tgt, (field + offsets).contiguous(), *flags, True)
    assert inside[1].min() > 0 and inside[1].max() < 11 * 13  # some pixels valid, some not
    for got, want in zip(inside, added, strict=True):
        assert torch.equal(got, want)


@needs_triton
@pytest.mark.parametrize("offset_items", [1, 3])
def test_triton_offsets_loss_and_gradient_match_fused(offset_items: int) -> None:
    """The full loss with ``sample_offsets`` (offsets in the Triton warp kernel, through ``WarpMSE``)
    against the fused CPU path (``field + offsets`` before its kernel): terms and gradient."""
    src, tgt, field, masks = _random_case(3, 1, 12, 14, torch.float64, seed=10)
    gen = torch.Generator().manual_seed(4)
    offsets = torch.rand(offset_items, 2, 12, 14, generator=gen, dtype=torch.float64) - 0.5

    def run(backend: str, dev: str) -> tuple[torch.Tensor, torch.Tensor]:
        f = field.to(dev).requires_grad_(True)
        dev_masks = LossMasks(masks.src_flags.to(dev), masks.tgt_flags.to(dev))
        terms = alignment_loss_terms(
            src.to(dev), tgt.to(dev), f, masks=dev_masks, backend=backend, sample_offsets=offsets.to(dev)
        )
        stacked = torch.stack(tuple(terms))
        (stacked * torch.tensor([[1.3], [0.7], [2.0]], dtype=stacked.dtype, device=dev)).sum().backward()
        return stacked.detach().cpu(), f.grad.cpu()

    terms, grad = run("triton", TRITON_DEVICE)
    want_terms, want_grad = run("fused", "cpu")
    torch.testing.assert_close(terms, want_terms, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-12)
