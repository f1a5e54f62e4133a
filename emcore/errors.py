"""Project exception types: catch these to tell sectionflow's own clear errors from bugs.

Every class also derives from the built-in exception a caller would naturally catch
(``ValueError`` for bad input, ``FileNotFoundError`` for a missing layer), so ``except ValueError``
keeps working.

API summary
-----------
* :class:`SectionflowError` - base class of all of them.
* :class:`GeometryError` - a bounding box / chunk size that does not fit a grid.
* :class:`LayerNotFoundError` - no precomputed layer (info file) at a path.
* :class:`IncompatibleLayerError` - a layer exists with an info that differs from the one asked for.
* :class:`UnalignedWriteError` - a write that does not start/end on the storage chunk grid.
* :class:`StackImportError` - section files that cannot be imported (none, unreadable, mixed).
* :class:`BlankSectionError` - a section with no tissue (or constant tissue); ``.section`` names it.
"""

from __future__ import annotations

__all__ = [
    "BlankSectionError",
    "GeometryError",
    "IncompatibleLayerError",
    "LayerNotFoundError",
    "SectionflowError",
    "StackImportError",
    "UnalignedWriteError",
]


class SectionflowError(Exception):
    """Base class of sectionflow's own errors."""


class GeometryError(SectionflowError, ValueError):
    """A bounding box or chunk size that does not fit the voxel or chunk grid it is used with."""


class LayerNotFoundError(SectionflowError, FileNotFoundError):
    """There is no precomputed layer (no ``info`` file) at the given path."""


class IncompatibleLayerError(SectionflowError, ValueError):
    """A layer already exists at the path with an info that differs from the one requested."""


class UnalignedWriteError(SectionflowError, ValueError):
    """A write region that does not start on the storage chunk grid or end on it / the bound."""


class StackImportError(SectionflowError, ValueError):
    """Section image files that cannot be imported as a stack."""


class BlankSectionError(SectionflowError, ValueError):
    """A section without usable tissue (all zero / masked, or constant intensity).

    Attributes:
        section: the section's name or z index, as given by the caller.
    """

    def __init__(self, section: object, reason: str) -> None:
        self.section = section
        super().__init__(f"section {section}: {reason}")
