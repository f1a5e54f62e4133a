"""Adam on a displacement field, with a per-item plateau schedule and early stop (one pyramid level).

What it does
------------
Minimizes :func:`emcore.finetune.losses.alignment_loss` over a batch of fields ``(N, 2, H, W)`` (px at
the images' mip, :mod:`emcore.field` convention) with Adam. Every batch item has its own schedule:

* its learning rate (px per step) starts at ``lr`` and halves when its loss has not improved by a
  relative ``rel_tol`` for ``patience`` consecutive iterations;
* it stops (its field is frozen) after ``max_halvings`` halvings, i.e. at the plateau that would
  need one more halving, or when ``num_iter`` loss evaluations are reached;
* the field returned is the best one seen (lowest loss), and ``loss`` is its loss.

Items in a batch do not influence each other: a batch run gives each item the field that a single
run gives it (tested), so one hard pair does not keep easy ones iterating or vice versa.

No host synchronization per iteration: the schedule state lives in tensors and is updated with
``torch.where``; the loop asks the device whether every item has stopped only every ``check_every``
iterations. Freezing happens on the device at the exact iteration an item stops, so the result does
not depend on ``check_every`` (only the wall time does).

Counting: ``iterations`` is the number of loss evaluations of an item; ``n`` evaluations make at
most ``n - 1`` Adam steps (no step after the last evaluation, so the returned loss always belongs to
a field that was evaluated).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch

from emcore.finetune.bending import MAX_ORDER, bending_energy, smoothness_energy
from emcore.finetune.losses import LossMasks, alignment_loss, resolve_backend
from emcore.finetune.parameters import FieldParameters

__all__ = ["AdamSchedule", "LevelOutcome", "adam_finetune"]

#: Eager iterations on CUDA before the iteration is captured into a CUDA graph.
_GRAPH_WARMUP = 3


def _use_cuda_graph(device: torch.device, backend: str, requested: bool | None, steps: int) -> bool:
    """Whether to replay the iteration as a CUDA graph: with the Triton backend on CUDA by default
    (``requested=None``), when there are iterations left after the warm-up, unless
    ``SECTIONFLOW_CUDA_GRAPHS=0``. (The fused torch fallback builds small host tensors per call,
    which a graph cannot capture.)"""
    if device.type != "cuda" or steps <= _GRAPH_WARMUP or backend != "triton":
        return False
    if requested is None:
        return os.environ.get("SECTIONFLOW_CUDA_GRAPHS", "1") != "0"
    return requested


@dataclass(frozen=True)
class AdamSchedule:
    """Settings of one Adam run (one pyramid level). The defaults are the measured ones that
    :func:`emcore.finetune.finetune` uses (sweep in benchmarks/README.md).

    Attributes:
        num_iter: most loss evaluations per item (>= 1).
        lr: initial Adam learning rate in px (at the level's mip) per step (> 0).
        patience: iterations without a relative improvement of ``rel_tol`` before the lr halves.
        max_halvings: the item stops when its lr would halve for the ``max_halvings + 1``-th time.
        rel_tol: an iteration "improves" when ``loss < best * (1 - rel_tol)``.
        betas, eps: Adam's constants.
    """

    num_iter: int = 2000
    lr: float = 0.01
    patience: int = 10
    max_halvings: int = 1
    rel_tol: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if not (isinstance(self.num_iter, int) and self.num_iter >= 1):
            raise ValueError(f"num_iter must be an int >= 1, got {self.num_iter!r}")
        if not (isinstance(self.patience, int) and self.patience >= 1):
            raise ValueError(f"patience must be an int >= 1, got {self.patience!r}")
        if not (isinstance(self.max_halvings, int) and self.max_halvings >= 0):
            raise ValueError(f"max_halvings must be an int >= 0, got {self.max_halvings!r}")
        for name in ("lr", "eps"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if not (0 <= self.rel_tol < 1):
            raise ValueError(f"rel_tol must be in [0, 1), got {self.rel_tol!r}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {self.betas!r}")


@dataclass(frozen=True)
class LevelOutcome:
    """Result of :func:`adam_finetune`.

    Attributes:
        field: ``(N, 2, H, W)`` best field per item (px at the level's mip), detached.
        loss: ``(N,)`` loss of that field.
        iterations: ``(N,)`` int64 loss evaluations per item.
        halvings: ``(N,)`` int64 lr halvings per item (``max_halvings + 1`` = stopped on a plateau).
        seconds: wall time of the run (host clock; on GPU it includes waiting for the device only
            at the stop checks, so it is approximate until the caller synchronizes).
    """

    field: torch.Tensor
    loss: torch.Tensor
    iterations: torch.Tensor
    halvings: torch.Tensor
    seconds: float


def adam_finetune(
    src: torch.Tensor,
    tgt: torch.Tensor,
    field: torch.Tensor,
    *,
    masks: LossMasks,
    sm: float,
    l2_weight: float = 1e-4,
    schedule: AdamSchedule | None = None,
    backend: str = "auto",
    check_every: int | None = None,
    cuda_graph: bool | None = None,
    field_mip: int = 0,
    sample_offsets: torch.Tensor | None = None,
    bending: float | torch.Tensor = 0.0,
    detail_mask: torch.Tensor | None = None,
    detail_mip: int | None = None,
    bending_order: int = 2,
) -> LevelOutcome:
    """Run Adam on ``field`` to minimize the alignment loss of each ``(src, tgt)`` pair.

    Args:
        src, tgt: ``(N, C, H, W)`` float images or encodings (0 = no data), already validated.
        field: ``(N, 2, H, W)`` starting field, px at the images' mip (not modified).
        masks: :func:`emcore.finetune.losses.prepare_masks` of the pair (defects included).
        sm: rigidity weight; ``l2_weight``: weight of the field's mean square.
        schedule: :class:`AdamSchedule` (default settings when ``None``).
        backend: loss backend (see :func:`emcore.finetune.losses.alignment_loss`).
        check_every: iterations between "has every item stopped?" checks (the only host sync);
            default 1 on CPU, 50 on other devices. Does not change the result.
        cuda_graph: on CUDA, replay one iteration as a CUDA graph after a few eager ones (one
            launch per iteration instead of dozens: small chunks are launch-bound otherwise);
            ``None`` = yes unless ``SECTIONFLOW_CUDA_GRAPHS=0``. Ignored on CPU.
        field_mip: mips (relative to the images) at which the field is parametrized: ``0`` = one
            vector per pixel; ``k > 0`` = a control grid ``2**k`` times coarser (Adam runs on it, in
            its own px; ``schedule.lr`` is in those px) that is upsampled bilinearly
            (:func:`emcore.field.resample_field`) to the images' resolution for the loss. Fewer
            degrees of freedom: the field cannot fit the noise pixel by pixel, so a lower ``sm``
            suffices. ``H`` and ``W`` must be divisible by ``2**k``.
        sample_offsets: optional ``(1 or N, 2, H, W)`` px added to the field where the MSE samples
            the source (see :func:`emcore.finetune.losses.alignment_loss`).
        bending: weight of the optimized field's bending energy
            (:func:`emcore.finetune.bending.bending_energy`, in px at the images' mip), added to
            each item's loss; 0 = off; a ``(N,)`` tensor gives each item its own weight. With a
            control grid it applies to the grid.
        detail_mask, detail_mip: optional local detail field next to the control grid
            (:class:`emcore.finetune.parameters.FieldParameters`): ``(N, 1, H / 2**detail_mip, W /
            2**detail_mip)`` 0/1, 1 where the field may vary faster than the grid (near defects),
            ``detail_mip < field_mip``. Adam runs on grid and detail together.
        bending_order: derivative order of that smoothness term (2 = the bending energy; 3 or 4:
            :func:`emcore.finetune.bending.smoothness_energy`, ``bending`` then weighs it).

    Returns:
        :class:`LevelOutcome`.
    """
    start = time.perf_counter()
    if not (isinstance(bending_order, int) and 2 <= bending_order <= MAX_ORDER):
        raise ValueError(f"bending_order must be an int in [2, {MAX_ORDER}], got {bending_order!r}")
    s = schedule or AdamSchedule()
    if check_every is None:
        check_every = 1 if field.device.type == "cpu" else 50
    n = field.shape[0]
    dev, dtype = field.device, field.dtype
    beta1, beta2 = s.betas

    # The state: every tensor below is updated in place, so one iteration is a fixed sequence of
    # device operations on fixed memory (what a CUDA graph replays).
    # ``current`` is the optimized parameter, packed ``(N, P)``: the field itself, or its control
    # grid at field_mip (and the detail near defects).
    parameters = FieldParameters(tuple(field.shape), field_mip, detail_mask, detail_mip)
    current = parameters.pack(field.detach())
    best_field = current.clone()
    best_loss = torch.full((n,), math.inf, dtype=dtype, device=dev)
    plateau_ref = torch.full((n,), math.inf, dtype=dtype, device=dev)
    since = torch.zeros(n, dtype=torch.int64, device=dev)
    halvings = torch.zeros(n, dtype=torch.int64, device=dev)
    iterations = torch.zeros(n, dtype=torch.int64, device=dev)
    active = torch.ones(n, dtype=torch.bool, device=dev)
    lr = torch.full((n,), float(s.lr), dtype=dtype, device=dev)
    m = torch.zeros_like(current)
    v = torch.zeros_like(current)
    # Adam's bias corrections 1 - beta**t for steps t = 1..num_iter (computed in float64 like a
    # Python float, then rounded to the field's dtype), indexed by the step counter.
    steps = torch.arange(1, s.num_iter + 1, dtype=torch.float64)
    bias1 = (1.0 - beta1**steps).to(dtype=dtype, device=dev)
    bias2 = (1.0 - beta2**steps).to(dtype=dtype, device=dev)
    step_index = torch.zeros((), dtype=torch.int64, device=dev)

    def per_item(t: torch.Tensor) -> torch.Tensor:
        return t.view(n, 1)

    expand = parameters.expand  # the field at the images' resolution from the parameter

    def evaluate() -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and gradient at ``current``; the per-item schedule update. Returns ``(grad, loss)``."""
        f = current.detach().requires_grad_(True)
        loss = alignment_loss(
            src,
            tgt,
            expand(f),
            masks=masks,
            sm=sm,
            l2_weight=l2_weight,
            backend=backend,
            reduction="none",
            sample_offsets=sample_offsets,
        )
        if isinstance(bending, torch.Tensor) or bending:
            grid = parameters.grid(f)
            if bending_order == 2:
                energy = bending_energy(grid, mip=field_mip)
            else:
                energy = smoothness_energy(grid, mip=field_mip, order=bending_order)
            loss = loss + bending * energy
        (grad,) = torch.autograd.grad(loss.sum(), f)
        loss = loss.detach()
        iterations.add_(active.to(torch.int64))
        # Best field so far (the one just evaluated, before this iteration's step). lerp with a
        # weight of exactly 0 or 1 returns one of its ends bit for bit.
        better = active & (loss < best_loss)
        best_loss.copy_(torch.where(better, loss, best_loss))
        best_field.lerp_(current, per_item(better.to(dtype)))
        # Plateau schedule.
        improved = loss < plateau_ref * (1.0 - s.rel_tol)
        plateau_ref.copy_(torch.where(active & improved, loss, plateau_ref))
        since.copy_(torch.where(improved, torch.zeros_like(since), since + 1))
        halve = active & (since >= s.patience)
        lr.copy_(torch.where(halve, lr * 0.5, lr))
        halvings.add_(halve.to(torch.int64))
        since.copy_(torch.where(halve, torch.zeros_like(since), since))
        active.copy_(active & (halvings <= s.max_halvings))
        return grad, loss

    def adam_step(grad: torch.Tensor) -> None:
        """One Adam step for the items still running (all have taken the same number of steps);
        stopped items get weight 0 everywhere, so their state and field stay bit for bit."""
        step = per_item(active.to(dtype))
        index = step_index.view(1)  # index_select, not [t]: indexing by a tensor syncs the host
        b1, b2 = bias1.index_select(0, index), bias2.index_select(0, index)
        m.lerp_(grad, step * (1.0 - beta1))
        v.lerp_(grad.square_(), step * (1.0 - beta2))
        denom = v.div(b2).sqrt_().add_(s.eps)
        current.sub_(m.div(denom).mul_(per_item(lr * active.to(dtype) / b1)))
        step_index.add_(1)

    def iteration() -> None:
        """One full iteration before the last: evaluate, then step."""
        grad, _ = evaluate()
        adam_step(grad)

    def all_stopped(it: int) -> bool:
        """The host check (a device sync), every ``check_every`` iterations."""
        return (it + 1) % check_every == 0 and not bool(active.any())

    last = s.num_iter - 1  # the last iteration evaluates only (no step after it)
    grad, loss = evaluate()  # iteration 0, eager: check the starting loss
    if not bool(torch.isfinite(loss).all()):
        raise FloatingPointError("the alignment loss is not finite at the starting field")
    if last > 0:
        adam_step(grad)
        del grad
        graphs = _use_cuda_graph(dev, resolve_backend(backend, field), cuda_graph, last)
        stopped, it, graph = all_stopped(0), 1, None
        while not stopped and it < last:
            if not graphs:
                iteration()
            elif it < _GRAPH_WARMUP:  # eager warm-up on a side stream, as graph capture needs
                side = torch.cuda.Stream(dev)
                side.wait_stream(torch.cuda.current_stream(dev))
                with torch.cuda.stream(side):
                    iteration()
                torch.cuda.current_stream(dev).wait_stream(side)
            else:
                if graph is None:  # recorded once (not run), then replayed for each iteration
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        iteration()
                graph.replay()
            stopped = all_stopped(it)
            it += 1
        if not stopped:
            evaluate()

    return LevelOutcome(expand(best_field), best_loss, iterations, halvings, time.perf_counter() - start)
