"""emcore.affine_solve: the global affine stack solve stops drift and still undoes misalignment."""

from __future__ import annotations

import torch

from emcore.affine import compose_matrices, decompose, invert_matrix, rotation_matrix
from emcore.affine_solve import solve_affine_stack

H = W = 256


def _px_error(a: torch.Tensor, b: torch.Tensor) -> float:
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64),
                            indexing="ij")
    p = torch.stack((xs, ys, torch.ones_like(xs))).reshape(3, -1)
    return float(((a - b) @ p).norm(dim=0).median())


BIAS_DEG = {1: -0.06, 2: -0.19}  # content rotation of z-1 / z-2 pairs as measured on the medulla


def _weights(pairs: dict) -> dict:
    return {key: 1.0 / key[1] ** 2 for key in pairs}


def _biased_pairs(num: int) -> dict:
    """A registered stack whose neighbour pairs all see the same small rotation (content bias)."""
    return {(z, k): rotation_matrix(BIAS_DEG[k], H, W) for z in range(1, num) for k in (1, 2) if z - k >= 0}


def _misaligned(num: int, seed: int = 0) -> tuple[dict, list[torch.Tensor]]:
    """Independent rigid misalignment per section (+-1 deg, +-20 px); exact pairs and true G."""
    g = torch.Generator().manual_seed(seed)
    truth = [torch.zeros(2, 3, dtype=torch.float64)]
    for _ in range(1, num):
        m = rotation_matrix(float(torch.rand(1, generator=g)) * 2 - 1, H, W)
        m[:, 2] += (torch.rand(2, generator=g) * 40 - 20).double()
        truth.append(invert_matrix(m))
    pairs = {
        (z, k): compose_matrices(invert_matrix(truth[z - k]), truth[z])
        for z in range(1, num) for k in (1, 2) if z - k >= 0
    }  # fmt: skip
    return pairs, truth


def _rotations(matrices: torch.Tensor) -> list[float]:
    return [decompose(m, H, W).rotation_deg for m in matrices]


def test_a_consistent_pair_bias_does_not_become_a_drift():
    pairs = _biased_pairs(64)
    chained = solve_affine_stack(pairs, 64, H, W, weights=_weights(pairs), drift_sections_linear=float("inf"),
                                 drift_sections_translation=float("inf"))
    rot = _rotations(chained.matrices)
    assert max(rot) - min(rot) > 3.0  # plain least squares chains the bias: about -0.07 deg x 63
    solved = _rotations(solve_affine_stack(pairs, 64, H, W, weights=_weights(pairs)).matrices)
    assert max(solved) - min(solved) < 0.1


def test_independent_misalignment_is_undone():
    pairs, truth = _misaligned(40)
    biased = {key: compose_matrices(m, rotation_matrix(BIAS_DEG[key[1]], H, W)) for key, m in pairs.items()}
    solution = solve_affine_stack(biased, 40, H, W, weights=_weights(pairs))
    errors = [_px_error(solution.matrices[z], truth[z]) for z in range(40)]
    before = [_px_error(torch.zeros(2, 3, dtype=torch.float64), truth[z]) for z in range(1, 40)]
    assert sorted(errors)[20] < 0.1 * sorted(before)[20]
    assert max(errors) < 1.5
    assert solution.fixed == 0 and float(solution.matrices[0].abs().max()) == 0.0


def test_one_wrong_pair_is_outvoted():
    pairs, truth = _misaligned(12, seed=3)
    wrong = dict(pairs)
    bad = rotation_matrix(5.0, H, W)
    bad[:, 2] += 30.0
    wrong[(6, 1)] = compose_matrices(pairs[(6, 1)], bad)
    solution = solve_affine_stack(wrong, 12, H, W)
    assert solution.pair_weight[(6, 1)] < 0.05
    assert max(_px_error(solution.matrices[z], truth[z]) for z in range(12)) < 1.5


def test_sections_without_pairs_are_interpolated_and_listed():
    pairs, _ = _misaligned(6)
    kept = {key: m for key, m in pairs.items() if 3 not in (key[0], key[0] - key[1])}
    solution = solve_affine_stack(kept, 6, H, W)
    assert solution.interpolated == (3,)
    expected = 0.5 * (solution.matrices[2] + solution.matrices[4])
    assert torch.allclose(solution.matrices[3], expected)
