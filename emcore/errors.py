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
* :class:`NonFiniteSectionError` - a section holding NaN/inf pixels; ``.section`` names it.
* :class:`CorruptChunkError` - a stored chunk that cannot be decoded; ``.file`` and ``.layer`` name it.
* :class:`StorageIOError` - a storage read/write that failed (an ``OSError``, retried as transient;
  deliberately *not* a :class:`SectionflowError`).
* :class:`OutputLockedError` - another run holds the lock of the same output.
"""

from __future__ import annotations

__all__ = [
    "BlankSectionError",
    "CorruptChunkError",
    "GeometryError",
    "IncompatibleLayerError",
    "LayerNotFoundError",
    "NonFiniteSectionError",
    "OutputLockedError",
    "SectionError",
    "SectionflowError",
    "StackImportError",
    "StorageIOError",
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


class SectionError(SectionflowError, ValueError):
    """A problem with one section, named in the message (base of the section errors below).

    Attributes:
        section: the section's name or z index, as given by the caller.
        reason: what is wrong and what to do.
    """

    def __init__(self, section: object, reason: str) -> None:
        self.section = section
        self.reason = reason
        super().__init__(f"section {section}: {reason}")

    def __reduce__(self) -> tuple:  # picklable across dask / Prefect workers
        return (type(self), (self.section, self.reason))


class BlankSectionError(SectionError):
    """A section without usable tissue (all zero / masked, or constant intensity)."""


class NonFiniteSectionError(SectionError):
    """A section whose pixels include NaN or inf (a float layer written by other software)."""


class CorruptChunkError(SectionflowError, ValueError):
    """A stored chunk file that cannot be decoded (truncated, zero bytes, wrong size).

    Attributes:
        file: the chunk file's full path (cloud URL).
        layer: the layer's path.
    """

    def __init__(self, file: str, layer: str, reason: str) -> None:
        self.file = file
        self.layer = layer
        self.reason = reason
        super().__init__(
            f"corrupt chunk {file} of layer {layer} ({reason}): re-import the layer, or delete that file "
            "and rerun the stage that writes it (a missing chunk reads as 0 = no data)"
        )

    def __reduce__(self) -> tuple:  # picklable across dask / Prefect workers
        return (type(self), (self.file, self.layer, self.reason))


class StorageIOError(OSError):
    """A storage read or write that failed; names the layer and region. An ``OSError``, so chunk
    tasks retry it (:mod:`tasks.retry`); after the retries the stage stops and the chunks already
    written (and marked done) are kept for the rerun."""


class OutputLockedError(SectionflowError, RuntimeError):
    """Another sectionflow run holds the lock of this output (see :mod:`flows.lock`)."""
