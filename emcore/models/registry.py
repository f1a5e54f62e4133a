"""Names of the models shipped inside the package (``emcore/models/weights/<name>.json``).

A shipped model is a config ``<name>.json`` plus its weights ``<name>.safetensors`` (see
:mod:`emcore.models.format`). ``load_model("encoder_16_64nm")`` finds them through this registry.

API summary
-----------
* ``SHIPPED_MODELS``: the names, with a one-line description each.
* ``AUTO_ENCODERS``: the shipped encoders measured to help the finetuner (``encoder="auto"`` should
  pick only these; the others are shipped but not used by default).
* ``WEIGHTS_DIR``: the folder holding them.
* ``shipped_config_path(name) -> Path``: the config file of a shipped model; a clear error for an
  unknown name (listing the known ones) or a missing file (an incomplete install).
"""

from __future__ import annotations

from pathlib import Path

from emcore.errors import SectionflowError

__all__ = ["AUTO_ENCODERS", "SHIPPED_MODELS", "WEIGHTS_DIR", "UnknownModelError", "shipped_config_path"]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

SHIPPED_MODELS: dict[str, str] = {
    "encoder_16_64nm": "encoder for sections at 16-64 nm/px (trained at mip 2-3 of 4.6 nm ssTEM)",
    "encoder_64_256nm": "encoder for sections at 64-256 nm/px (trained at mip 4-5 of 4.6 nm ssTEM)",
    "encoder_256_2048nm": "encoder for sections at 256-2048 nm/px (trained at 147-160 nm: see README)",
    "pyramid_aligner": "learned multi-level coarse aligner for large deformations and folds",
    "pyramid_refiner": "learned refinement after the classical affine coarse aligner (folds, "
    "non-affine residual); self-supervised",
    "defect_detector": "fold/crack detector for normalized sections at 15-50 nm/px (output: defect logit; "
    "use emcore.models.detect.detect_defects), trained on synthetic folds and cracks in real EM",
}

# On held-out pairs with artifacts (benchmarks/bench_encoders.py, 8 pairs per row, finetuner defaults,
# see weights/README.md): encoder_64_256nm (ratio encoded/raw of the median residual 0.67, of the
# p95 0.57) and the retrained encoder_256_2048nm (0.56, 0.66) lower the finetuner's residual, also
# at sm 1.5 and 6; encoder_16_64nm does not (1.00 at 18.4 nm, 1.12 at 36.8 nm): shipped, not auto.
AUTO_ENCODERS: tuple[str, ...] = ("encoder_64_256nm", "encoder_256_2048nm")


class UnknownModelError(SectionflowError, ValueError):
    """A model name that is neither shipped nor a path."""


def shipped_config_path(name: str) -> Path:
    """The config file ``WEIGHTS_DIR / f"{name}.json"`` of a shipped model.

    Raises:
        UnknownModelError: ``name`` is not a shipped model.
        FileNotFoundError: the model is known but its files are missing from this install.
    """
    if name not in SHIPPED_MODELS:
        known = ", ".join(sorted(SHIPPED_MODELS))
        raise UnknownModelError(
            f"unknown model {name!r}: shipped models are {known}; "
            "or pass a path / URL to a model config (.json)"
        )
    path = WEIGHTS_DIR / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"shipped model {name!r} has no config at {path}: the package was installed without its "
            "weights (reinstall sectionflow, or train it with `python -m emcore.models.train`)"
        )
    return path
