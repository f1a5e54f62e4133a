"""The shipped models: present, small, verified, documented, and doing what they claim."""

from __future__ import annotations

import math

import pytest
import torch

from emcore.field import warp
from emcore.models import encode_tiled, load_model
from emcore.models.em_data import load_stack
from emcore.models.format import sha256_file
from emcore.models.registry import AUTO_ENCODERS, SHIPPED_MODELS, WEIGHTS_DIR
from emcore.synthetic import affine_field, true_alignment_field

ENCODERS = [name for name in SHIPPED_MODELS if name.startswith("encoder_")]


@pytest.mark.parametrize("name", sorted(SHIPPED_MODELS))
def test_shipped_model_loads_with_provenance(name: str) -> None:
    model = load_model(name)
    weights = WEIGHTS_DIR / model.config.weights
    assert weights.stat().st_size < 5 * 2**20
    assert sha256_file(weights) == model.config.weights_sha256
    provenance = model.config.provenance
    assert provenance["command"].startswith(f"python -m emcore.models.train {name}")
    assert provenance["steps"] > 0 and provenance["data"] and provenance["code_version"]
    assert all(math.isfinite(v) for v in provenance["final_losses"].values())
    assert name in (WEIGHTS_DIR / "README.md").read_text()


def test_auto_encoders_are_shipped_encoders() -> None:
    assert AUTO_ENCODERS and set(AUTO_ENCODERS) <= set(ENCODERS)


@pytest.mark.parametrize("name", ENCODERS)
def test_shipped_encoder_keeps_size_and_no_data(name: str) -> None:
    model = load_model(name)
    image = torch.randn(1, 1, 45, 37)
    image[..., :5, :] = 0
    encoded = encode_tiled(model, image)
    assert encoded.shape == image.shape and encoded.dtype == torch.float32
    assert (encoded[..., :5, :] == 0).all() and (encoded[..., 5:, :] != 0).all()
    assert encoded[..., 5:, :].std() > 0


def test_shipped_aligner_recovers_most_of_a_large_shift() -> None:
    model = load_model("pyramid_aligner")
    tgt = load_stack("vnc", 3, [17])[..., :128, :128]  # held out
    applied = affine_field(128, 128, rotation_deg=2.0, translation=(7.0, -5.0))
    true = true_alignment_field(applied, border=24)
    moving = warp(load_stack("vnc", 3, [16])[..., :128, :128], applied)
    with torch.no_grad():
        field = model.network(moving, tgt)
    inner = (slice(None), slice(None), slice(24, -24), slice(24, -24))
    before = true[inner].norm(dim=1).median()
    after = (field - true)[inner].norm(dim=1).median()
    assert after < 0.5 * before
