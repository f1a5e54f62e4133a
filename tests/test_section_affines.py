"""tasks.affine.section_affines: reliable pairs only, fallback sections named, mips converted."""

from __future__ import annotations

import torch

from emcore.affine import compose_matrices, invert_matrix, rescale_matrix, rotation_matrix
from emcore.geometry import VoxelBox
from tasks.affine import affine_field, refine_section_affines, section_affines


def _detail(z: int, k: int, matrix: torch.Tensor, reliable: bool = True) -> dict:
    return {"z": z, "k": k, "blank": False, "reliable": reliable, "matrix": matrix.tolist()}


def test_unreliable_pairs_are_not_used_and_sections_without_evidence_are_named():
    shift = torch.zeros(2, 3, dtype=torch.float64)
    shift[0, 2] = 5.0  # each section 5 px (coarse mip) right of the one below
    wild = rotation_matrix(7.0, 64, 64)  # an unreliable estimate, e.g. a peak at the search limit
    status = {}
    for z in range(11, 16):
        status[f"{z}-1"] = _detail(z, 1, shift)
    status["13-1"] = _detail(13, 1, wild, reliable=False)
    status["14-1"] = _detail(14, 1, wild, reliable=False)
    status["14-2"] = _detail(14, 2, wild, reliable=False)
    status["15-1"] = _detail(15, 1, wild, reliable=False)
    out = section_affines(status, list(range(10, 16)), [], (64, 64), 2, 1,
                          drift_sections_linear=0.7, drift_sections_translation=64.0)
    rotations = [abs(out["parts"][str(z)]["rotation_deg"]) for z in range(10, 16)]
    assert max(rotations) < 1e-6  # the 7 deg estimates never reach a section
    assert out["fallback"] == [13, 14, 15]  # every pair touching them is unreliable
    assert out["fixed"] == 10
    # finetune-mip matrices are the coarse ones rescaled (x2 per mip)
    fine = torch.tensor(out["matrices"]["12"], dtype=torch.float64)
    coarse = torch.tensor(out["matrices_coarse"]["12"], dtype=torch.float64)
    assert torch.allclose(fine, rescale_matrix(coarse, 2, 1))
    assert float(coarse[0, 2]) > 9.0  # two 5 px steps above the fixed section 10, barely shrunk


def test_affine_field_is_relative_to_the_region():
    m = [[0.0, 0.0, 1.5], [0.01, 0.0, -2.0]]
    region = VoxelBox((100, 200, 0), (300, 400, 5))
    box = VoxelBox((150, 220, 3), (170, 250, 4))
    field = affine_field(m, box, region)
    assert field.shape == (1, 2, 30, 20)
    # at the box's first pixel, x = 50 px into the region: dy = 0.01 * 50 - 2
    assert abs(float(field[0, 1, 0, 0]) - (0.01 * 50 - 2.0)) < 1e-5


def _pair(g: dict, z: int, k: int) -> torch.Tensor:
    """``P[z, k]`` consistent with section affines ``g`` (``T_P = T_G[z] o T_G[z-k]^-1``)."""
    return compose_matrices(invert_matrix(g[z - k]), g[z])


def test_refined_affines_take_the_residuals_in_at_finetune_precision():
    """Coarse pairs 1.5 px off; the residuals' affine parts say by how much: the refined solve
    equals the solve of the exact pairs (the frames of A, R and P composed the right way round)."""
    gen = torch.Generator().manual_seed(0)
    sections, size = list(range(20, 26)), (128, 128)
    truth = {20: torch.zeros(2, 3, dtype=torch.float64)}
    for z in sections[1:]:
        m = rotation_matrix(float(torch.rand(1, generator=gen)) - 0.5, *size)
        m[:, 2] += (torch.rand(2, generator=gen) * 20 - 10).double()
        truth[z] = m
    keys = [(z, k) for z in sections for k in (1, 2) if z - k >= sections[0]]
    offset = torch.zeros(2, 3, dtype=torch.float64)
    offset[:, 2] = 1.5  # every coarse pair (finetune px) 1.5 px off in x and y
    status = {f"{z}-{k}": _detail(z, k, rescale_matrix(_pair(truth, z, k) + offset, 1, 2)) for z, k in keys}
    coarse = section_affines(status, sections, [], (64, 64), 2, 1,
                             drift_sections_linear=0.7, drift_sections_translation=64.0)
    a = {int(z): torch.tensor(m, dtype=torch.float64) for z, m in coarse["matrices"].items()}
    # what the finetuner measures between the affinely warped sections: T_R = T_A[z]^-1 o T_P o T_A[z-k]
    residual = {
        f"{z}-{k}": compose_matrices(compose_matrices(a[z - k], _pair(truth, z, k)),
                                     invert_matrix(a[z])).tolist()
        for z, k in keys
    }
    refined = refine_section_affines(coarse, residual, sections, [], size)
    exact = section_affines({f"{z}-{k}": _detail(z, k, _pair(truth, z, k)) for z, k in keys}, sections, [],
                            size, 1, 1, drift_sections_linear=0.7, drift_sections_translation=64.0)
    for z in sections:
        got = torch.tensor(refined["matrices"][str(z)], dtype=torch.float64)
        want = torch.tensor(exact["matrices"][str(z)], dtype=torch.float64)
        assert torch.allclose(got, want, atol=1e-3), z
        before = torch.tensor(coarse["matrices"][str(z)], dtype=torch.float64)
        if z != sections[0]:
            assert float((before - want)[:, 2].abs().max()) > 1.0  # the coarse affines were off
    assert refined["refined_from"] == sorted(residual)
