"""Classical coarse alignment + learned refiner: composition, input checks, the self-supervised recipe."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from emcore.coarse_xcorr import coarse_align
from emcore.field import warp
from emcore.models.aligner_training import REFINER_RECIPE, train_aligner
from emcore.models.em_data import load_stack
from emcore.models.format import Model, ModelConfig
from emcore.models.pyramid_aligner import PyramidAligner
from emcore.models.refine import coarse_then_refine
from emcore.models.training import Source
from emcore.synthetic import affine_field


def _model(network: PyramidAligner) -> Model:
    config = ModelConfig(
        name="test_refiner",
        architecture="pyramid_aligner",
        kwargs=network.config_kwargs(),
        resolution_nm=(32.0, 80.0),
        normalization="test",
        input_channels=1,
        output_channels=2,
        weights="",
    )
    return Model(config=config, network=network.eval(), source="test")


def _pair() -> tuple[torch.Tensor, torch.Tensor]:
    fixed = load_stack("vnc", 3, [17])[..., :96, :96]  # held out
    applied = affine_field(96, 96, rotation_deg=1.5, translation=(6.0, -4.0))
    moving = warp(load_stack("vnc", 3, [16])[..., :96, :96], applied)
    return moving, fixed


def test_an_untrained_refiner_leaves_the_classical_field() -> None:
    moving, fixed = _pair()
    classical = coarse_align(moving, fixed, model="affine").field
    refined = coarse_then_refine(moving, fixed, _model(PyramidAligner(levels=3)))
    assert refined.shape == classical.shape and refined.dtype == torch.float32
    assert torch.allclose(refined, classical, atol=1e-3)


def test_refiner_residual_is_composed_after_the_classical_field() -> None:
    moving, fixed = _pair()
    classical = coarse_align(moving, fixed, model="affine").field
    net = PyramidAligner(levels=3)
    last = net.residuals[0][-1]
    with torch.no_grad():
        last.bias.copy_(torch.tensor([0.5, 0.0]))  # the finest level now adds ~+0.5 px in x
    refined = coarse_then_refine(moving, fixed, _model(net))
    shift = (refined - classical)[:, :, 16:-16, 16:-16]
    bounded = 4.0 * torch.tanh(torch.tensor(0.5 / 4.0)).item()  # residuals are bounded by radius + 1
    assert shift[:, 0].mean().item() == pytest.approx(bounded, abs=0.05)
    assert shift[:, 1].abs().max() < 0.05


def test_refine_rejects_batches_and_mismatched_shapes() -> None:
    model = _model(PyramidAligner(levels=3))
    with pytest.raises(ValueError, match=r"\(1, 1, H, W\)"):
        coarse_then_refine(torch.zeros(2, 1, 32, 32), torch.zeros(2, 1, 32, 32), model)
    with pytest.raises(ValueError, match="moving and fixed"):
        coarse_then_refine(torch.zeros(1, 1, 32, 32), torch.zeros(1, 1, 32, 36), model)


def test_refiner_recipe_is_self_supervised_and_reproducible() -> None:
    assert REFINER_RECIPE.supervision_weight == 0.0
    recipe = dataclasses.replace(
        REFINER_RECIPE, sources=(Source("vnc", 4, 32),), batch=2, hidden=4, max_displacement=4.0
    )
    net_a, log_a = train_aligner(recipe, steps=3, seed=3, log=None)
    net_b, _ = train_aligner(recipe, steps=3, seed=3, log=None)
    for (name, a), (_, b) in zip(net_a.state_dict().items(), net_b.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert len(log_a.rows) == 3 and "residual_px" in log_a.rows[-1]
