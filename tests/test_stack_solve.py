"""Global stack solve on a synthetic stack with known per-section fields and one corrupted pair."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from emcore.field import compose, invert, warp
from emcore.metrics import field_residual
from emcore.stack_solve import sequential_composition, solve_stack
from emcore.synthetic import affine_field, smooth_field

SIZE = 96
Z = 6
BORDER = 12


def _true_and_applied() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-section applied deformations ``A[z]`` (``A[0] = 0``) and true fields ``G[z] = A[z]^-1``."""
    applied = [torch.zeros(1, 2, SIZE, SIZE)]
    for z in range(1, Z):
        motion = affine_field(SIZE, SIZE, rotation_deg=0.5 * z, translation=(1.5 * z, -1.0 * z))
        applied.append(compose(motion, smooth_field(SIZE, SIZE, 2.0, seed=z)))
    true = [invert(a, num_iter=100, tol=1e-4).inverse for a in applied]
    return applied, true


def _pairs(applied, true, corrupt: dict[tuple[int, int], torch.Tensor]) -> dict:
    """Exact ``P[z, k] = compose(A[z - k], G[z])`` plus a small smooth estimation error per pair."""
    pairs = {}
    for z in range(1, Z):
        for k in (1, 2, 3):
            if z - k < 0:
                continue
            noise = smooth_field(SIZE, SIZE, 0.3, seed=100 + 10 * z + k)
            pairs[(z, k)] = compose(applied[z - k], true[z]) + noise + corrupt.get((z, k), 0.0)
    return pairs


@pytest.fixture(scope="module")
def stack():
    applied, true = _true_and_applied()
    return applied, torch.cat(true)


def _worst(fields: torch.Tensor, true: torch.Tensor, zs) -> float:
    return max(field_residual(fields[z : z + 1], true[z : z + 1], border=BORDER).median for z in zs)


def test_solve_beats_sequential_composition_with_a_corrupted_pair(stack):
    applied, true = stack
    bad = smooth_field(SIZE, SIZE, 8.0, seed=7)
    pairs = _pairs(applied, list(true.split(1)), {(3, 1): bad})
    sequential = sequential_composition(pairs, Z)
    solution = solve_stack(pairs, Z)
    assert solution.fixed == 0
    assert torch.equal(solution.fields[0], torch.zeros(2, SIZE, SIZE))
    seq_err = _worst(sequential, true, range(3, Z))
    solve_err = _worst(solution.fields, true, range(3, Z))
    # Sequential alignment carries the bad pair into every section above it; the solve does not.
    print(f"worst median residual z>=3: sequential {seq_err:.3f} px, solve {solve_err:.3f} px")
    assert seq_err > 2.5
    assert solve_err < 0.1 * seq_err
    good_weights = [w for key, w in solution.pair_weight.items() if key != (3, 1)]
    assert solution.pair_weight[(3, 1)] < 0.6 < 0.9 < min(good_weights), solution.pair_weight
    assert max(solution.pair_residual_px, key=solution.pair_residual_px.get) == (3, 1)


def test_zero_weight_pair_and_blank_section(stack):
    applied, true = stack
    pairs = _pairs(applied, list(true.split(1)), {(2, 1): smooth_field(SIZE, SIZE, 10.0, seed=3)})
    solution = solve_stack(pairs, Z, weights={(2, 1): 0.0}, blank=[4], robust_px=None)
    assert (2, 1) in solution.ignored_pairs
    assert {(4, 1), (4, 2), (4, 3), (5, 1)} <= set(solution.ignored_pairs)
    assert solution.interpolated == (4,)
    assert _worst(solution.fields, true, [1, 2, 3, 5]) < 0.6
    # Section 4 is the z-average of sections 3 and 5.
    assert torch.allclose(solution.fields[4], 0.5 * (solution.fields[3] + solution.fields[5]), atol=1e-5)


def test_aligned_real_section_matches(stack, vnc_sections: np.ndarray):
    """Warping each deformed section by its solved field gives back the registered section."""
    applied, true = stack
    section = F.avg_pool2d(torch.from_numpy(vnc_sections[0]).float()[None, None] / 255, 8)[..., :SIZE, :SIZE]
    pairs = _pairs(applied, list(true.split(1)), {})
    solution = solve_stack(pairs, Z, smoothness=0.05)
    assert solution.converged
    inner = (slice(None), slice(None), slice(BORDER, -BORDER), slice(BORDER, -BORDER))
    for z in range(1, Z):
        deformed = warp(section, applied[z])
        aligned = warp(deformed, solution.fields[z : z + 1])
        before = (deformed - section)[inner].abs().mean()
        after = (aligned - section)[inner].abs().mean()
        assert after < 0.35 * before, (z, float(before), float(after))


def test_fixed_section_in_the_middle(stack):
    applied, true = stack
    pairs = _pairs(applied, list(true.split(1)), {})
    solution = solve_stack(pairs, Z, fixed=2)
    assert torch.equal(solution.fields[2], torch.zeros(2, SIZE, SIZE))
    # Frame of section 2: G'[z] = compose(G[2]^-1 ... ) ~ aligning onto section 2; check z = 1 vs 2.
    expected = compose(stack[0][2], true[1:2])
    assert field_residual(solution.fields[1:2], expected, border=BORDER).median < 0.6


def test_bad_input_errors(stack):
    applied, true = stack
    pairs = _pairs(applied, list(true.split(1)), {})
    with pytest.raises(ValueError, match="z - k"):
        solve_stack({(1, 2): pairs[(1, 1)]}, Z)
    with pytest.raises(ValueError, match="fixed section 0 is blank"):
        solve_stack(pairs, Z, blank=[0], fixed=0)
    with pytest.raises(ValueError, match=r"sections \[4, 5\] have no chain"):
        solve_stack({(z, 1): pairs[(z, 1)] for z in (1, 2, 3)}, Z)
    with pytest.raises(ValueError, match="one mip and size"):
        solve_stack({(1, 1): pairs[(1, 1)], (2, 1): pairs[(2, 1)][..., :64, :64]}, Z)


def test_anchor_stops_residual_drift_along_z():
    """Residual pairs that all carry the same small content shift (a registered stack): chained they
    drift linearly with z; with the anchor the sections stay within about one pair's shift."""
    num, shift = 24, 0.3
    pair = torch.zeros(1, 2, 32, 32)
    pair[:, 1] = shift
    pairs = {(z, k): pair * k for z in range(1, num) for k in (1, 2) if z - k >= 0}
    free = solve_stack(pairs, num, robust_px=None).fields
    assert float(free[-1, 1].mean()) > 0.8 * shift * (num - 1)
    anchored = solve_stack(pairs, num, anchor=1.0, robust_px=None).fields
    assert float(anchored[:, 1].abs().max()) < 2 * shift
    with pytest.raises(ValueError, match="anchor"):
        solve_stack(pairs, num, anchor=-1.0)


def test_anchored_solve_is_local_in_z_so_blocks_with_overlap_equal_the_whole_stack():
    num, overlap = 30, 8
    keys = [(z, k) for z in range(1, num) for k in (1, 2) if z - k >= 0]
    pairs = {key: smooth_field(32, 32, 1.0, seed=i).reshape(1, 2, 32, 32) for i, key in enumerate(keys)}
    whole = solve_stack(pairs, num, anchor=1.0).fields
    lo, hi = 12, 18  # one block's core, read with `overlap` sections on each side
    a, b = lo - overlap, hi + overlap
    sub = {(z - a, k): f for (z, k), f in pairs.items() if a <= z - k and z < b}
    block = solve_stack(sub, b - a, anchor=1.0).fields[lo - a : hi - a]
    error = (block - whole[lo:hi]).norm(dim=1)
    assert float(error.max()) < 0.05 * float(whole[lo:hi].norm(dim=1).max())


def test_uniform_weights_given_as_numbers_equal_the_same_weights_as_maps(stack):
    """A number weight is kept as one value that broadcasts (no H x W map per pair): the solution,
    residuals and robust weights are bitwise those of the same weights given as full maps."""
    applied, true = stack
    pairs = _pairs(applied, list(true.split(1)), {(3, 1): smooth_field(SIZE, SIZE, 8.0, seed=7)})
    numbers = {key: 0.5 + 0.1 * key[1] for key in pairs}
    maps = {key: torch.full((1, 1, SIZE, SIZE), w) for key, w in numbers.items()}
    a = solve_stack(pairs, Z, weights=numbers, anchor=0.2, blank=[], max_sweeps=12)
    b = solve_stack(pairs, Z, weights=maps, anchor=0.2, blank=[], max_sweeps=12)
    assert torch.equal(a.fields, b.fields)
    assert a.pair_weight == b.pair_weight and a.pair_residual_px == b.pair_residual_px
    # mean robust weights over the pair's pixels (a per-pair mean of 0..1, not a sum)
    assert min(a.pair_weight, key=a.pair_weight.get) == (3, 1)
    assert max(a.pair_weight.values()) <= 1.0
