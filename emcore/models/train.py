"""Command line: train a shipped model and write its config + weights.

    python -m emcore.models.train encoder_16_64nm [--steps N] [--seed S] [--threads T] [--out DIR]
    python -m emcore.models.train pyramid_aligner [...]
    python -m emcore.models.train pyramid_refiner [...]
    python -m emcore.models.train defect_detector [...]

Writes ``<out>/<name>.json`` and ``<out>/<name>.safetensors`` (default ``out`` =
``emcore/models/weights``, i.e. replaces the shipped model) with the command, data, steps, final
losses, seed, wall time and code version recorded in the config's ``provenance``.
The function to call from Python (e.g. from a Prefect flow) is :func:`train_and_save`.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from emcore.models.format import ModelConfig, save_model
from emcore.models.registry import SHIPPED_MODELS, WEIGHTS_DIR

__all__ = ["NORMALIZATION", "code_version", "main", "train_and_save"]

NORMALIZATION = "per-section tissue mean 0 / std 1 (emcore.normalize), float32, 0 = no data"


def code_version() -> str:
    """``git describe`` of the checkout this runs from (``+dirty`` if modified), or ``unknown``."""
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty=+dirty"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _provenance(
    command: str, recipe: Any, history: Any, seed: int, note: str, **extra: Any
) -> dict[str, Any]:
    """The provenance every trained model records (the command, data, run and versions), plus
    ``extra`` recipe-specific entries; ``note`` says what ``final_losses`` are."""
    return {
        "command": command,
        "data": [s.describe() for s in recipe.sources],
        "steps": len(history.rows),
        "batch": recipe.batch,
        "seed": seed,
        "final_losses": history.final(),
        "final_losses_note": note,
        "seconds": round(history.seconds, 1),
        "threads": recipe.threads,
        "torch": torch.__version__,
        "code_version": code_version(),
        **extra,
    }


def train_and_save(
    name: str,
    *,
    steps: int | None = None,
    seed: int = 0,
    threads: int | None = None,
    out: str | Path = WEIGHTS_DIR,
    log: Callable[[str], None] | None = print,
) -> Path:
    """Train shipped model ``name`` and save it into ``out``; returns the config path."""
    command = f"python -m emcore.models.train {name}" + (f" --steps {steps}" if steps else "")
    command += f" --seed {seed}"
    if threads:
        command += f" --threads {threads}"
    if name.startswith("encoder_"):
        from emcore.models.training import ENCODER_RECIPES, train_encoder

        if name not in ENCODER_RECIPES:
            raise ValueError(f"no training recipe for {name!r}; encoders: {', '.join(ENCODER_RECIPES)}")
        recipe = ENCODER_RECIPES[name]
        if threads:
            recipe = dataclasses.replace(recipe, threads=threads)
        network, history = train_encoder(recipe, steps=steps, seed=seed, log=log)
        config = ModelConfig(
            name=name,
            architecture="unet_encoder",
            kwargs={"channels": recipe.channels, "levels": recipe.levels}
            | ({"residual": True} if recipe.residual else {}),
            resolution_nm=recipe.resolution_nm,
            normalization=NORMALIZATION,
            input_channels=1,
            output_channels=1,
            weights="",
            description=SHIPPED_MODELS[name] + (f"; {recipe.note}" if recipe.note else ""),
            provenance=_provenance(
                command, recipe, history, seed,
                "means over the last 10% of steps; raw_* = same loss on the raw images",
            ),  # fmt: skip
        )
    elif name in ("pyramid_aligner", "pyramid_refiner"):
        from emcore.models.aligner_training import ALIGNER_RECIPES, train_aligner

        recipe = ALIGNER_RECIPES[name]
        if threads:
            recipe = dataclasses.replace(recipe, threads=threads)
        network, history = train_aligner(recipe, steps=steps, seed=seed, log=log)
        config = ModelConfig(
            name=name,
            architecture="pyramid_aligner",
            kwargs=network.config_kwargs(),
            resolution_nm=recipe.resolution_nm,
            normalization=NORMALIZATION,
            input_channels=1,
            output_channels=2,
            weights="",
            description=SHIPPED_MODELS[name],
            provenance=_provenance(
                command, recipe, history, seed,
                "means over the last 10% of steps; residual_px = |field - true| median",
                supervision_weight=recipe.supervision_weight,
            ),  # fmt: skip
        )
    elif name == "defect_detector":
        from emcore.models.detector_training import DETECTOR_RECIPE, evaluate_detector, train_detector

        recipe = DETECTOR_RECIPE
        if threads:
            recipe = dataclasses.replace(recipe, threads=threads)
        network, history = train_detector(recipe, steps=steps, seed=seed, log=log)
        held_out = evaluate_detector(network, recipe)
        if log is not None:
            log(f"{name}: held-out synthetic defects {held_out}")
        config = ModelConfig(
            name=name,
            architecture="unet_encoder",
            kwargs={"channels": recipe.channels, "levels": recipe.levels, "out_channels": 1},
            resolution_nm=recipe.resolution_nm,
            normalization=NORMALIZATION,
            input_channels=1,
            output_channels=1,
            weights="",
            description=SHIPPED_MODELS[name],
            provenance=_provenance(
                command, recipe, history, seed,
                "means over the last 10% of steps; loss = BCE + (1 - soft Dice)",
                defects=(
                    f"{recipe.defects_per_section} synthetic defects per training section "
                    "(emcore.synthetic_defects.random_settings: fold or crack, half partial, resin or "
                    f"empty gap), displacement {recipe.displacement_px} px, width {recipe.width_px} px, "
                    f"resin {recipe.resin_level} tissue std above the mean; "
                    f"{recipe.clean_fraction:.0%} of items clean; emcore.models.artifacts augmentation"
                ),
                held_out=held_out,
                held_out_note=(
                    "emcore.models.detector_training.evaluate_detector: held-out sections (vnc 16-19, "
                    "medulla 56-63), 4 synthetic defects each, threshold 0.5; pixel precision/recall/IoU "
                    "pooled; clean_fp = marked fraction of clean tissue; *_artifacts = with artifacts"
                ),
            ),  # fmt: skip
        )
    else:
        raise ValueError(f"unknown model {name!r}; trainable: {', '.join(SHIPPED_MODELS)}")
    path = save_model(network, config, out)
    if log is not None:
        final = config.provenance["final_losses"]
        log(f"wrote {path} and {path.with_suffix('.safetensors')}; final losses {final}")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emcore.models.train", description=__doc__.split("\n")[0])
    parser.add_argument("name", choices=sorted(SHIPPED_MODELS))
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: the recipe's, 1)")
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="output folder (default: shipped)")
    args = parser.parse_args(argv)
    train_and_save(args.name, steps=args.steps, seed=args.seed, threads=args.threads, out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
