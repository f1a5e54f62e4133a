"""Classical coarse alignment + learned refiner: composition, input checks, self-supervised loss, recipe."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from emcore.coarse_xcorr import coarse_align
from emcore.errors import BlankSectionError
from emcore.field import warp
from emcore.finetune.losses import alignment_loss
from emcore.models.aligner_training import (
    REFINER_RECIPE,
    aligner_training_loss,
    large_deformation,
    train_aligner,
)
from emcore.models.em_data import load_stack
from emcore.models.format import Model, ModelConfig
from emcore.models.pyramid_aligner import PyramidAligner
from emcore.models.refine import coarse_then_refine, learned_coarse_align
from emcore.models.training import Source
from emcore.pyramid import downsample_image_torch, downsample_mask_torch
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


def test_training_loss_is_the_finetuners_loss_summed_over_levels() -> None:
    """aligner_training_loss = sum over levels of alignment_loss(l2_weight=0); tears are free at folds."""
    gen = torch.Generator().manual_seed(5)
    deformation = large_deformation(64, gen, 6.0, fold_probability=1.0)
    tgt = load_stack("vnc", 3, [17])[..., :64, :64]
    moving = warp(load_stack("vnc", 3, [16])[..., :64, :64], deformation.applied)
    src_pyr = [moving, downsample_image_torch(moving)]
    tgt_pyr = [tgt, downsample_image_torch(tgt)]
    true = deformation.true
    fields = [true, 0.5 * torch.nn.functional.avg_pool2d(true, 2)]
    total, mse, rig = aligner_training_loss(fields, src_pyr, tgt_pyr, deformation.defects, sm=10.0)
    defects = [deformation.defects, downsample_mask_torch(deformation.defects)]
    expected = sum(
        alignment_loss(s, t, f, tgt_defects=d, sm=10.0, l2_weight=0.0)
        for s, t, f, d in zip(src_pyr, tgt_pyr, fields, defects, strict=True)
    )
    assert torch.allclose(total, expected, rtol=1e-5)
    assert mse.shape == rig.shape == (1,)
    zero = [torch.zeros_like(f) for f in fields]
    assert aligner_training_loss(zero, src_pyr, tgt_pyr, deformation.defects, sm=10.0)[0] > total
    torn = aligner_training_loss(fields, src_pyr, tgt_pyr, deformation.defects, sm=10.0)[2]
    glued = aligner_training_loss(fields, src_pyr, tgt_pyr, torch.zeros_like(deformation.defects), sm=10.0)[2]
    assert torn < 0.5 * glued  # the fold's tear costs (almost) no rigidity inside the band


def test_learned_coarse_align_pads_any_size_and_reports_blank_sections() -> None:
    moving, fixed = _pair()
    moving, fixed = moving[..., :90, :94], fixed[..., :90, :94]  # not multiples of 4
    model = _model(PyramidAligner(levels=3))
    result = learned_coarse_align(moving[0, 0], fixed[0, 0], method="learned", network=model)
    assert result.field.shape == (1, 2, 90, 94) and torch.count_nonzero(result.field) == 0  # untrained
    assert 0.0 <= result.confidence <= 1.0 and result.reliable == (result.reason == "")
    refined = learned_coarse_align(moving, fixed, method="classical+refine", network=model, model="affine")
    classical = coarse_align(moving, fixed, model="affine").field
    assert torch.allclose(refined.field, classical, atol=1e-3)
    with pytest.raises(BlankSectionError, match="moving"):
        learned_coarse_align(torch.zeros(90, 94), fixed, method="learned", network=model)
    with pytest.raises(ValueError, match="method"):
        learned_coarse_align(moving, fixed, method="deep", network=model)
