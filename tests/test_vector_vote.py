"""Vector voting rejects a wrong candidate field and ignores invalid ones."""

from __future__ import annotations

import pytest
import torch

from emcore.metrics import field_residual
from emcore.synthetic import affine_field, smooth_field
from emcore.vector_vote import vector_vote

SIZE = 64


@pytest.fixture
def truth() -> torch.Tensor:
    return affine_field(SIZE, SIZE, rotation_deg=3.0, translation=(4.0, -2.0)) + smooth_field(SIZE, SIZE, 2.0)


def _noisy(truth: torch.Tensor, seed: int, amount: float = 0.2) -> torch.Tensor:
    return truth + smooth_field(SIZE, SIZE, amount, grid=6, seed=seed)


def test_one_corrupted_candidate_of_three_is_rejected(truth):
    good1, good2 = _noisy(truth, 1), _noisy(truth, 2)
    bad = truth.clone()
    bad[..., 10:40, 20:60] += torch.tensor([9.0, -6.0]).view(1, 2, 1, 1)  # a wrong estimate near a defect
    result = vector_vote(torch.cat((good1, bad, good2)), temperature=0.5)
    assert result.valid.all()
    average_of_good = 0.5 * (good1 + good2)
    assert field_residual(result.field, average_of_good, border=0).max < 0.05
    assert result.weights[1, 0, 10:40, 20:60].max() < 1e-3
    # Where all three agree, all three vote.
    assert result.weights[:, 0, 50:, :10].min() > 0.2
    assert torch.allclose(result.weights.sum(dim=0), torch.ones(1, SIZE, SIZE), atol=1e-5)
    # Plain averaging would be off by ~3.6 px there.
    naive = (good1 + bad + good2) / 3
    assert field_residual(naive, truth, border=0).max > 3.0


def test_invalid_candidates_do_not_vote(truth):
    good = _noisy(truth, 1)
    bad1 = truth + torch.tensor([5.0, 0.0]).view(1, 2, 1, 1)
    bad2 = truth + torch.tensor([5.1, 0.0]).view(1, 2, 1, 1)  # agrees with bad1: a wrong majority
    valid = torch.ones(3, 1, SIZE, SIZE, dtype=torch.bool)
    valid[1:, :, :, :32] = False  # ... but both are invalid on the left half
    result = vector_vote(torch.cat((good, bad1, bad2)), valid)
    assert torch.allclose(result.field[..., :32], good[..., :32], atol=1e-5)
    assert result.weights[0, 0, :, :32].min() > 0.999
    # On the right half the (wrong) majority wins: voting trusts agreement.
    assert torch.allclose(result.field[..., 32:], 0.5 * (bad1 + bad2)[..., 32:], atol=0.1)


def test_per_candidate_flags_and_no_valid_candidate(truth):
    cands = torch.cat((_noisy(truth, 1), _noisy(truth, 2), truth + 20.0))
    result = vector_vote(cands, torch.tensor([True, True, False]))
    assert torch.allclose(result.field, 0.5 * (cands[0:1] + cands[1:2]), atol=1e-5)
    none = vector_vote(cands, torch.zeros(3, dtype=torch.bool))
    assert not none.valid.any()
    assert torch.equal(none.field, torch.zeros(1, 2, SIZE, SIZE))
    assert torch.equal(none.weights, torch.zeros(3, 1, SIZE, SIZE))


def test_five_candidates_two_wrong_in_different_ways(truth):
    goods = [_noisy(truth, s) for s in (1, 2, 3)]
    wrong_a = truth + torch.tensor([6.0, 0.0]).view(1, 2, 1, 1)
    wrong_b = truth + torch.tensor([0.0, -7.0]).view(1, 2, 1, 1)
    result = vector_vote(torch.cat((goods[0], wrong_a, goods[1], wrong_b, goods[2])), temperature=0.5)
    assert field_residual(result.field, truth, border=0).max < 0.25
    assert result.weights[[1, 3]].max() < 1e-3


def test_bad_input_errors(truth):
    with pytest.raises(ValueError, match="2..8 candidates"):
        vector_vote(truth)
    with pytest.raises(ValueError, match="temperature"):
        vector_vote(torch.cat((truth, truth)), temperature=0.0)
    with pytest.raises(ValueError, match=r"valid must have shape \(2,\)"):
        vector_vote(torch.cat((truth, truth)), torch.ones(3, dtype=torch.bool))
    nan = truth.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        vector_vote(torch.cat((truth, nan)))
