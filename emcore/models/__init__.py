"""Learned models: a safe on-disk format, the shipped encoders and the learned coarse aligner.

Modules
-------
* :mod:`emcore.models.format` - a model = JSON config + safetensors weights; load (local or any
  cloud-files path, cached, sha256-verified), save. Never unpickles or imports code by default.
* :mod:`emcore.models.registry` - names of the models shipped in ``emcore/models/weights/``.
* :mod:`emcore.models.architectures` - architecture names in configs -> network classes.
* :mod:`emcore.models.encoder` - the encoder network (a small U-Net).
* :mod:`emcore.models.encode` - apply an encoder to images in tiles with context (seamless).
* :mod:`emcore.models.pyramid_aligner` - the learned multi-level coarse aligner.
* :mod:`emcore.models.refine` - learned coarse alignment: stand-alone ``pyramid_aligner``, or
  classical + ``pyramid_refiner`` (``learned_coarse_align`` for pipelines).
* :mod:`emcore.models.artifacts` - realistic EM artifact augmentation for training and benchmarks.
* :mod:`emcore.models.em_data` - the real EM training stacks at a given mip (held-out sections).
* :mod:`emcore.models.losses` - metric-learning encoder loss.
* :mod:`emcore.models.training` - encoder recipes and training loop.
* :mod:`emcore.models.aligner_training` - large synthetic deformations (with folds) and the
  aligner's training loop.
* :mod:`emcore.models.detect` - ``detect_defects(image, model)``: the fold/crack detector's mask.
* :mod:`emcore.models.detector_training` - the detector's recipe (synthetic folds/cracks from
  :mod:`emcore.synthetic_defects` in real EM), training loop and held-out evaluation.
* :mod:`emcore.models.train` - ``python -m emcore.models.train <name>``; from Python
  ``train_and_save(name, steps=..., seed=..., out=...)``.

Quick use::

    from emcore.models import load_model, encode_tiled
    encoder = load_model("encoder_16_64nm")          # a shipped model, by name
    encoded = encode_tiled(encoder, image, tile=512)  # image: (N, 1, H, W) normalized float32
"""

from emcore.models.encode import encode_tiled
from emcore.models.format import (
    Model,
    ModelConfig,
    ModelLoadError,
    UntrustedModelError,
    load_model,
    save_model,
)

__all__ = [
    "Model",
    "ModelConfig",
    "ModelLoadError",
    "UntrustedModelError",
    "encode_tiled",
    "load_model",
    "save_model",
]
