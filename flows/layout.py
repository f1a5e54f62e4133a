"""Where ``align_stack`` puts its layers: the output-directory naming convention.

Under the output path ``<out>`` (a local directory or a cloud path):

===============================  =====================================================================
``<out>/normalized``             float32 image: per-section tissue-normalized source (0 = no data),
                                 filled from the normalize mip upwards
``<out>/encodings/<mip>``        float32 image: encoder output at ``<mip>`` (absent with
                                 ``encoder="none"``: stages then read ``<out>/normalized``)
``<out>/fields/pairwise/z-<k>``  field: ``P[z, k]`` aligning section ``z`` onto ``z - k`` at the
                                 coarse mip (coarse stage); at the finetune mip the residual
                                 ``Q[z, k]`` between the affinely aligned sections (finetune stage)
``<out>/fields/pairwise/*.json`` ``pairs.json`` (coarse pairs' status, used pairs) and
                                 ``residual_affines.json`` (affine parts ``R[z, k]`` of the ``Q``)
``<out>/fields/affine.json``     the section affines ``G_affine[z]`` (global affine solve of the
                                 coarse pairs); ``affine_refined.json``: re-solved with the ``R``
                                 (solve stage), the affines the final fields are composed with
``<out>/fields/sections_coarse`` field: ``S[z]``, a torn section's coarse field (stack frame ->
                                 raw ``z``, each piece its own affine, :mod:`tasks.torn`) at the
                                 finetune mip; only torn sections are written. ``torn.json`` beside
                                 it (in ``<out>/fields``) lists them, with their pieces' matrices
``<out>/fields/final``           field: ``G[z]`` aligning section ``z`` into the stack frame (first
                                 non-blank section fixed), at the finetune mip
``<out>/aligned``                the source image rendered through ``G``, every mip
``<out>/masks/defects``          the input defect mask (the demo writes it here)
``<out>/masks/detected``         the detector's defect mask (``detect_defects="auto"`` without a
                                 ``defects`` layer), used as the defects layer, every mip
``<out>/masks/aligned_defects``  the defect mask rendered through ``G``, every mip
``<out>/report/``                report.md, quality.csv, run.json, PNG thumbnails and reslices
===============================  =====================================================================

Every layer gets a provenance record (inputs, parameters, code version) when its stage finishes.
"""

from __future__ import annotations

from dataclasses import dataclass

from emcore.layers import normalize_path

__all__ = ["Layout"]


@dataclass(frozen=True)
class Layout:
    """Layer paths under one output path ``root``."""

    root: str

    def _join(self, *parts: str) -> str:
        return "/".join([normalize_path(self.root), *parts])

    @property
    def normalized(self) -> str:
        return self._join("normalized")

    def encodings(self, mip: int) -> str:
        return self._join("encodings", str(mip))

    def pairwise(self, k: int) -> str:
        return self._join("fields", "pairwise", f"z-{k}")

    @property
    def fields_root(self) -> str:
        """``<out>/fields``: holds ``affine.json`` (the section affines, :mod:`tasks.affine`)."""
        return self._join("fields")

    @property
    def sections_coarse(self) -> str:
        """``<out>/fields/sections_coarse``: torn sections' coarse fields ``S[z]`` (:mod:`tasks.torn`)."""
        return self._join("fields", "sections_coarse")

    @property
    def final_fields(self) -> str:
        return self._join("fields", "final")

    @property
    def aligned(self) -> str:
        return self._join("aligned")

    @property
    def defects(self) -> str:
        return self._join("masks", "defects")

    @property
    def detected_defects(self) -> str:
        """``<out>/masks/detected``: the detector's mask (``detect_defects="auto"``, no ``defects``)."""
        return self._join("masks", "detected")

    @property
    def aligned_defects(self) -> str:
        return self._join("masks", "aligned_defects")

    @property
    def report_dir(self) -> str:
        """Local directory of the report files (``root`` must be local for the PNGs)."""
        path = normalize_path(self.root)
        return (path[len("file://") :] if path.startswith("file://") else path) + "/report"
