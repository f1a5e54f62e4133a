"""Architecture names used in model configs -> the network classes that build them.

A config says ``"architecture": "unet_encoder", "kwargs": {...}``; :func:`build` turns that into
an ``nn.Module`` with freshly initialized parameters (weights are loaded afterwards). Only the
classes listed here can be built from a config: a config can never name arbitrary code.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["ARCHITECTURE_NAMES", "build"]

_CLASSES = {
    "unet_encoder": ("emcore.models.encoder", "EncoderUNet"),
    "pyramid_aligner": ("emcore.models.pyramid_aligner", "PyramidAligner"),
}
ARCHITECTURE_NAMES = tuple(_CLASSES)


def _factory(architecture: str) -> Callable[..., nn.Module]:
    module, cls = _CLASSES[architecture]
    return getattr(importlib.import_module(module), cls)


def build(architecture: str, kwargs: dict[str, Any]) -> nn.Module:
    """Instantiate ``architecture`` with ``kwargs``; ``ValueError`` naming what is wrong otherwise."""
    if architecture not in _CLASSES:
        raise ValueError(
            f"unknown architecture {architecture!r}; known architectures: {', '.join(ARCHITECTURE_NAMES)}"
        )
    try:
        return _factory(architecture)(**kwargs)
    except TypeError as err:
        raise ValueError(f"architecture {architecture!r} does not accept kwargs {kwargs}: {err}") from None
