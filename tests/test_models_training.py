"""Artifacts, training losses, the aligner architecture and short real training runs."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from emcore.field import compose, warp, warp_mask
from emcore.models import load_model
from emcore.models.aligner_training import large_deformation
from emcore.models.artifacts import ArtifactSettings, add_artifacts
from emcore.models.em_data import HELD_OUT, load_stack, training_sections
from emcore.models.encode import encode_tiled
from emcore.models.encoder import EncoderUNet
from emcore.models.losses import basin_shifts, encoder_pair_loss
from emcore.models.pyramid_aligner import PyramidAligner
from emcore.models.train import main as train_main
from emcore.models.training import ENCODER_RECIPES, Source, encode_crops, train_encoder
from emcore.synthetic import smooth_field


def _image(seed: int = 0, size: int = 64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(2, 1, size, size, generator=gen)
    image[:, :, :, :8] = 0  # no data on the left
    return image


def test_artifacts_are_seeded_keep_no_data_and_change_tissue() -> None:
    image = _image()
    every = ArtifactSettings(probability=1.0)
    a = add_artifacts(image, torch.Generator().manual_seed(3), every)
    b = add_artifacts(image, torch.Generator().manual_seed(3), every)
    c = add_artifacts(image, torch.Generator().manual_seed(4), every)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a[..., :8] == 0).all()
    tissue = a[..., 8:] != 0
    zeroed = (~tissue).float().mean()
    assert 0.0 < zeroed <= every.zeroed + 0.01  # a zeroed region, no larger than asked
    assert (a[..., 8:][tissue] - image[..., 8:][tissue]).abs().mean() > 0.05
    untouched = add_artifacts(image, torch.Generator().manual_seed(3), ArtifactSettings(probability=0.0))
    assert torch.equal(untouched, image)


def test_encoder_loss_rewards_matching_encodings_and_punishes_constant_ones() -> None:
    # Band-limited "encodings" (so resampling them does not change their variance much).
    src = torch.nn.functional.interpolate(_image(1, 32), scale_factor=2, mode="bilinear")
    src[..., :16] = 0
    applied = smooth_field(64, 64, 3.0, seed=1).expand(2, 2, 64, 64)
    shift = torch.zeros(2, 2, 64, 64)
    shift[:, 0] = 4.0
    data = src != 0
    tgt = warp(src, applied)
    tgt_data = warp_mask(data, applied)
    good = encoder_pair_loss(src, tgt, applied, shift, data, tgt_data, tile=8)
    assert good.aligned.max() < 0.05
    assert good.misaligned_low.min() > 0.5  # 2 px correlation length, shifted by 4 px
    ones = torch.ones_like(src)
    flat = encoder_pair_loss(ones, ones, applied, shift, data, tgt_data, tile=8)
    assert torch.allclose(flat.collapse, torch.full((2,), 2.0))
    assert (flat.loss > good.loss + 5).all()


def test_basin_term_punishes_flat_and_false_minima_not_a_steep_basin() -> None:
    gen = torch.Generator().manual_seed(5)
    applied = smooth_field(64, 64, 2.0, seed=3).expand(2, 2, 64, 64)
    noise = 0.2 * torch.randn(2, 1, 64, 64, generator=gen)  # the neighbour section is not identical

    def pair(src: torch.Tensor, off: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        shift = torch.zeros(2, 2, 64, 64)
        shift[:, 0] = off
        return src, warp(src, compose(shift, applied)) + noise

    shifts = basin_shifts((0.5, 1.0, 2.0))
    assert len(shifts) == 12 and {round(math.hypot(*s), 6) for s in shifts} == {0.5, 1.0, 2.0}
    zero, data = torch.zeros(2, 2, 64, 64), torch.ones(2, 1, 64, 64, dtype=torch.bool)
    kwargs = dict(tile=16, basin=shifts, basin_weight=1.0, contrast_weight=0.0)
    # Fine texture: the MSE grows fast with a sub-pixel shift (a steep basin around 0).
    sharp = F.interpolate(torch.randn(2, 1, 32, 32, generator=gen), scale_factor=2, mode="bilinear")
    steep = encoder_pair_loss(*pair(sharp), applied, zero, data, data, **kwargs)
    # Very smooth encodings: a shift changes them less than the noise does (a flat basin).
    smooth = F.interpolate(torch.randn(2, 1, 4, 4, generator=gen), size=64, mode="bicubic")
    flat = encoder_pair_loss(*pair(smooth), applied, zero, data, data, **kwargs)
    # The target matches the source 1 px off: the minimum is not at the true field.
    wrong = encoder_pair_loss(*pair(sharp, 1.0), applied, zero, data, data, **kwargs)
    assert (flat.basin > steep.basin + 0.1).all() and (wrong.basin > steep.basin + 0.1).all()
    assert torch.equal(steep.loss, steep.basin + 10.0 * steep.collapse)
    no_basin = encoder_pair_loss(*pair(sharp), applied, zero, data, data, tile=16)
    assert torch.equal(no_basin.basin, torch.zeros(2))


def test_large_deformation_true_field_undoes_it_outside_the_fold() -> None:
    section = load_stack("vnc", 3, [0])
    gen = torch.Generator().manual_seed(5)
    deformation = large_deformation(128, gen, 12.0, fold_probability=1.0)
    assert deformation.defects.any()
    # warp(warp(x, applied), true) == warp(x, compose(true, applied)): ~0 outside the fold band.
    error = compose(deformation.true, deformation.applied).norm(dim=1, keepdim=True)
    keep = ~deformation.defects
    keep[..., :24, :] = keep[..., -24:, :] = keep[..., :, :24] = keep[..., :, -24:] = False
    assert error[keep].max() < 0.01
    assert deformation.applied.norm(dim=1, keepdim=True)[keep].median() > 3.0
    restored = warp(warp(section, deformation.applied), deformation.true)
    assert (restored - section).abs()[keep & (restored != 0)].median() < 0.5 * (
        (section - warp(section, deformation.applied)).abs()[keep].median()
    )


def test_untrained_aligner_is_the_identity_and_checks_sizes() -> None:
    net = PyramidAligner(levels=3)
    x = _image(3, 32)
    assert torch.equal(net(x[:1], x[1:]), torch.zeros(1, 2, 32, 32))
    with pytest.raises(ValueError, match="multiple of 4"):
        net(torch.zeros(1, 1, 30, 32), torch.zeros(1, 1, 30, 32))


def test_held_out_sections_are_not_trained_on() -> None:
    assert not set(training_sections("vnc")) & set(HELD_OUT["vnc"])
    assert not set(training_sections("medulla")) & set(HELD_OUT["medulla"])


def test_training_with_context_padding_sees_what_encode_tiled_gives() -> None:
    torch.manual_seed(0)
    net = EncoderUNet(channels=4, levels=3)
    with torch.no_grad():
        net.down[0][0].bias.fill_(5.0)  # an offset the next convs see cut off by their zero padding
    crops = load_stack("vnc", 5, [0, 1])
    tissue = crops != 0
    with torch.no_grad():
        padded = encode_crops(net, crops, context_padding=True)
        bare = encode_crops(net, crops, context_padding=False)
    tiled = encode_tiled(net, crops)
    torch.testing.assert_close(padded[tissue], tiled[tissue], atol=1e-5, rtol=1e-5)
    assert (bare - tiled)[tissue].abs().max() > 1000 * (padded - tiled)[tissue].abs().max()


def test_encoder_training_is_reproducible_from_the_seed() -> None:
    recipe = dataclasses.replace(
        ENCODER_RECIPES["encoder_64_256nm"], sources=(Source("vnc", 5, 32),), batch=2, channels=4
    )
    net_a, log_a = train_encoder(recipe, steps=3, seed=7, log=None)
    net_b, _ = train_encoder(recipe, steps=3, seed=7, log=None)
    for (name, a), (_, b) in zip(net_a.state_dict().items(), net_b.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert len(log_a.rows) == 3
    assert all(torch.isfinite(torch.tensor(list(r.values()))).all() for r in log_a.rows)


def test_train_command_writes_a_loadable_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train_main(["encoder_64_256nm", "--steps", "2", "--seed", "1", "--out", str(tmp_path)]) == 0
    model = load_model(tmp_path / "encoder_64_256nm.json")
    provenance = model.config.provenance
    assert provenance["command"] == "python -m emcore.models.train encoder_64_256nm --steps 2 --seed 1"
    assert provenance["steps"] == 2
    assert {"loss", "aligned", "misaligned_low", "raw_loss"} <= set(provenance["final_losses"])
    assert "wrote" in capsys.readouterr().out
    assert json.loads((tmp_path / "encoder_64_256nm.json").read_text())["architecture"] == "unet_encoder"
