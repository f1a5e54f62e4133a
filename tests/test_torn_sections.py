"""A torn section's coarse field in the stack frame (emcore.torn_sections) on exact synthetic transforms."""

from __future__ import annotations

import numpy as np
import torch

from emcore.affine import (
    affine_displacement_field,
    compose_matrices,
    invert_matrix,
    rescale_matrix,
    rotation_matrix,
)
from emcore.field import compose, warp
from emcore.pieces import split_pieces
from emcore.torn_sections import piecewise_affine_field, section_piece_matrices, stack_piece_assignment

SIZE = 64


def _shift(dx: float, dy: float) -> torch.Tensor:
    return torch.tensor([[0.0, 0.0, dx], [0.0, 0.0, dy]], dtype=torch.float64)


def test_piece_matrix_order_matches_the_position_maps():
    # A[z - k] (stack -> raw z - k), pair matrices M_p (raw z - k -> raw z), A[z] follows piece 0.
    prev = compose_matrices(rotation_matrix(2.0, SIZE, SIZE), _shift(3.0, -2.0))
    m0 = compose_matrices(rotation_matrix(-1.5, SIZE, SIZE), _shift(-4.0, 1.0))
    m1 = compose_matrices(rotation_matrix(4.0, SIZE, SIZE), _shift(25.0, 18.0))
    a = compose_matrices(prev, m0)  # T_A = T_M0 o T_A[z-k]
    s0, s1 = section_piece_matrices(a, [m0, m1])
    assert torch.allclose(s0, a)
    # piece 1 seen from the stack frame: through A[z - k] into raw z - k, then M_1 into raw z
    assert torch.allclose(s1, compose_matrices(prev, m1), atol=1e-9)
    # the same with fields: warp(raw z, S_1) == warp(warp(raw z, M_1), A[z - k])
    image = torch.rand(1, 1, SIZE, SIZE, dtype=torch.float64).float()
    f1 = compose(affine_displacement_field(prev, SIZE, SIZE), affine_displacement_field(m1, SIZE, SIZE))
    direct = warp(image, affine_displacement_field(s1, SIZE, SIZE))
    assert (warp(image, f1) - direct)[..., 16:-16, 16:-16].abs().max() < 1e-3
    # the wrong order is measurably different (the test can fail)
    wrong = compose_matrices(compose_matrices(m1, invert_matrix(m0)), a)
    assert not torch.allclose(wrong, s1, atol=0.1)


def _split_section() -> tuple[np.ndarray, np.ndarray]:
    image = np.ones((SIZE, SIZE), np.float32)
    mask = np.zeros((SIZE, SIZE), bool)
    mask[:, 38:42] = True  # a vertical band: left piece 38 px wide (largest), right piece 22 px
    return image, mask


def test_stack_assignment_follows_each_piece():
    image, mask = _split_section()
    pieces = split_pieces(image, mask)
    assert pieces.count == 2 and pieces.labels[10, 5] == 1 and pieces.labels[10, 50] == 2
    # S_2 reads 10 px to the right: piece 2 (raw x 42..63) shows at stack x 32..53, over piece 1's edge
    mats = [torch.zeros(2, 3, dtype=torch.float64), _shift(10.0, 0.0)]
    assignment = stack_piece_assignment(pieces, mats)
    assert (assignment >= 1).all()
    assert (assignment[:, :30] == 1).all()  # only piece 1 lands there
    assert (assignment[:, 40:] == 2).all()  # piece 2, and past it (no data) the nearest piece, 2
    # a stack pixel of piece 2 reads a raw pixel of piece 2
    ys, xs = np.nonzero(assignment == 2)
    assert (pieces.labels[ys, np.clip(xs + 10, 0, SIZE - 1)][xs + 10 < SIZE] == 2).all()


def test_piecewise_field_at_a_finer_mip():
    image, mask = _split_section()
    pieces = split_pieces(image, mask)
    coarse = [rotation_matrix(1.0, SIZE, SIZE), _shift(10.0, -3.0)]
    assignment = stack_piece_assignment(pieces, coarse)
    fine = [rescale_matrix(m, 1, 0) for m in coarse]
    whole = piecewise_affine_field(fine, assignment, 2, (0, 0), (2 * SIZE, 2 * SIZE))
    # inside a piece's region it is that piece's affine at the fine mip, exactly
    for label, m in enumerate(fine, start=1):
        expected = affine_displacement_field(m, 2 * SIZE, 2 * SIZE)
        inside = torch.from_numpy(np.kron(assignment == label, np.ones((2, 2), bool)))
        assert torch.allclose(whole[0][:, inside], expected[0][:, inside], atol=1e-4)
    # a box is the crop of the whole; past the map the edge pieces' affines extend
    box = piecewise_affine_field(fine, assignment, 2, (40, 24), (32, 48))
    assert torch.equal(box, whole[..., 24:56, 40:88])
    outside = piecewise_affine_field(fine, assignment, 2, (-8, -8), (8, 8))
    expected = fine[0][:, :2] @ torch.tensor([-8.0, -8.0], dtype=torch.float64) + fine[0][:, 2]
    assert torch.allclose(outside[0, :, 0, 0].double(), expected, atol=1e-4)


def test_translation_only_piece_motion_at_the_centroid():
    prev = compose_matrices(rotation_matrix(1.2, SIZE, SIZE), _shift(3.0, -2.0))
    m0 = compose_matrices(rotation_matrix(-1.0, SIZE, SIZE), _shift(-4.0, 1.0))
    a = compose_matrices(prev, m0)
    slid = compose_matrices(m0, _shift(20.0, -12.0))  # piece 1 slid rigidly in raw z
    full = section_piece_matrices(a, [m0, slid])
    rigid = section_piece_matrices(a, [m0, slid], centroids=[(10.0, 10.0), (50.0, 40.0)])
    assert torch.allclose(full[1], rigid[1], atol=1e-9)  # a pure slide: both forms agree
    turned = compose_matrices(rotation_matrix(3.0, SIZE, SIZE), m0)  # piece 1 also turned 3 deg
    full = section_piece_matrices(a, [m0, turned])[1]
    rigid = section_piece_matrices(a, [m0, turned], centroids=[(10.0, 10.0), (50.0, 40.0)])[1]
    assert torch.allclose(rigid[:, :2], a[:, :2])  # A's linear part kept
    # both read the piece's centroid from the same stack-frame point
    c = torch.tensor([50.0, 40.0], dtype=torch.float64)
    eye = torch.eye(2, dtype=torch.float64)
    s = torch.linalg.solve(eye + full[:, :2], c - full[:, 2])  # T_full(s) = c
    assert torch.allclose(s + rigid[:, :2] @ s + rigid[:, 2], c, atol=1e-6)
    assert not torch.allclose(full, rigid, atol=0.01)


def test_torn_sections_pick_source_splits_with_own_piece_estimates():
    from tasks.torn import torn_sections

    def piece(matrix, fallback):
        return {"matrix": matrix, "fallback": fallback}

    m0, m1, whole = [[0, 0, 1.0], [0, 0, 2.0]], [[0, 0, 30.0], [0, 0, 2.0]], [[0, 0, 9.0], [0, 0, 9.0]]
    status = {
        "1-1": {"z": 1, "k": 1, "blank": False},
        "2-1": {"z": 2, "k": 1, "pieces": {
            "side": "source", "count": 3,
            "transforms": [piece(m0, False), piece(m1, False), piece(whole, True)]}},
        "2-2": {"z": 2, "k": 2, "pieces": {"side": "source", "count": 2,
                                           "transforms": [piece(m0, False), piece(m1, False)]}},
        "3-1": {"z": 3, "k": 1, "pieces": {"side": "target", "count": 2,
                                           "transforms": [piece(m0, False), piece(m1, False)]}},
        "4-1": {"z": 4, "k": 1, "pieces": {"side": "source", "count": 2,
                                           "transforms": [piece(m0, False), piece(whole, True)]}},
    }  # fmt: skip
    torn = torn_sections(status, [(1, 1), (2, 1), (2, 2), (3, 1), (4, 1)])
    assert sorted(torn) == [2]  # 3: target side only; 4: its other piece fell back
    assert torn[2]["pair"] == "2-1"
    assert torn[2]["pair_matrices"] == [m0, m1, m0]  # the fallback piece follows the largest one
