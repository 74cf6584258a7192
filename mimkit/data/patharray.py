"""Image paths as one byte buffer plus offsets (numpy), not a list of Python strings.

Data-loader workers are forked: a Python list of a million strings is copied page by page into every worker as the
reference counts of its items are touched, while these two numpy arrays are shared and never written
(docs/data.md has the measured per-worker memory)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


class PathArray(Sequence):
    """An immutable sequence of paths (``str``); indexing with a slice gives a list."""

    def __init__(self, paths: Iterable[str] = ()):
        encoded = [p.encode("utf-8", "surrogateescape") for p in paths]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self.offsets[1:])
        self.buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(0, np.uint8)

    @classmethod
    def from_arrays(cls, buffer: np.ndarray, offsets: np.ndarray) -> PathArray:
        """Wrap an existing byte buffer and offsets (e.g. from an index file) without copying."""
        obj = cls.__new__(cls)
        obj.buffer, obj.offsets = buffer, offsets
        return obj

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        start, end = self.offsets[index], self.offsets[index + 1]
        return self.buffer[start:end].tobytes().decode("utf-8", "surrogateescape")

    def __eq__(self, other) -> bool:
        return list(self) == list(other)

    def __repr__(self) -> str:
        return f"PathArray({len(self)} paths)"
