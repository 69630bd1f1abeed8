"""A sorted set of ids that no operation sorts: the catalog's keyset index.

ListPlugins pages start after the last id of the page before (a keyset), so what
a page costs is finding that id and walking on from it. :class:`SortedIds` keeps
ids sorted in chunks (as ``sortedcontainers`` does, without the dependency): a
change moves at most one chunk, a seek is a bisection, a walk is a walk.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator

# Ids per chunk of a SortedIds: a chunk splits at twice this, and merges into a
# neighbour below a quarter of it. Inserting or deleting moves at most one chunk.
_CHUNK = 512


class SortedIds:
    """A set of ids kept in sorted order, in chunks: no operation sorts the whole set.

    ``add`` and ``discard`` cost O(log n + chunk); :meth:`after` finds its start in
    O(log n) and then walks, so reading k ids from anywhere costs O(log n + k). New
    ULIDs sort last (almost always), so they land at the end of the last chunk.
    """

    __slots__ = ("_chunks", "_len", "_maxes", "_version")

    def __init__(self, ids: Iterable[str] = ()) -> None:
        # Bumped by every change, so that a walk in progress finds its place again.
        self._version = 0
        if ids == ():  # the common case, one per source: nothing to sort
            self._chunks: list[list[str]] = []
            self._maxes: list[str] = []
            self._len = 0
            return
        ordered = sorted(set(ids))
        self._chunks = [ordered[i : i + _CHUNK] for i in range(0, len(ordered), _CHUNK)]
        self._maxes = [chunk[-1] for chunk in self._chunks]
        self._len = len(ordered)

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __iter__(self) -> Iterator[str]:
        return self.after("")

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        i = bisect_left(self._maxes, key)
        if i == len(self._maxes):
            return False
        chunk = self._chunks[i]
        j = bisect_left(chunk, key)
        return j < len(chunk) and chunk[j] == key

    def add(self, key: str) -> None:
        """Insert ``key`` in its place; nothing happens if it is there already."""
        chunks, maxes = self._chunks, self._maxes
        if not chunks:
            chunks.append([key])
            maxes.append(key)
        elif key > maxes[-1]:  # the common case: a new ULID goes last
            chunks[-1].append(key)
            maxes[-1] = key
            self._split_if_full(len(chunks) - 1)
        else:
            # The first chunk whose largest id is not below the key.
            i = bisect_left(maxes, key)
            chunk = chunks[i]
            j = bisect_left(chunk, key)
            if chunk[j] == key:
                return
            chunk.insert(j, key)
            self._split_if_full(i)
        self._len += 1
        self._version += 1

    def _split_if_full(self, i: int) -> None:
        chunk = self._chunks[i]
        if len(chunk) > 2 * _CHUNK:
            tail = chunk[_CHUNK:]
            del chunk[_CHUNK:]
            self._chunks.insert(i + 1, tail)
            self._maxes[i] = chunk[-1]
            self._maxes.insert(i + 1, tail[-1])

    def discard(self, key: str) -> None:
        """Remove ``key`` if present."""
        i = bisect_left(self._maxes, key)
        if i == len(self._maxes):
            return
        chunk = self._chunks[i]
        j = bisect_left(chunk, key)
        if j == len(chunk) or chunk[j] != key:
            return
        del chunk[j]
        self._len -= 1
        self._version += 1
        if not chunk:
            del self._chunks[i]
            del self._maxes[i]
            return
        self._maxes[i] = chunk[-1]
        if len(chunk) < _CHUNK // 4 and len(self._chunks) > 1:
            self._merge(i)

    def _merge(self, i: int) -> None:
        """Fold the small chunk ``i`` into a neighbour (splitting that again if too big)."""
        left = i - 1 if i + 1 == len(self._chunks) else i
        merged = self._chunks[left] + self._chunks[left + 1]
        if len(merged) > 2 * _CHUNK:
            half = len(merged) // 2
            self._chunks[left : left + 2] = [merged[:half], merged[half:]]
            self._maxes[left : left + 2] = [merged[half - 1], merged[-1]]
        else:
            self._chunks[left : left + 2] = [merged]
            self._maxes[left : left + 2] = [merged[-1]]

    def after(self, key: str) -> Iterator[str]:
        """The ids greater than ``key``, in order ("" for all of them).

        Safe against changes between two ids it yields: it then seeks its place
        again after the last id it gave, so it never repeats an id nor skips one
        that was there all along.
        """
        version = self._version
        i = bisect_right(self._maxes, key)
        j = bisect_right(self._chunks[i], key) if i < len(self._chunks) else 0
        while i < len(self._chunks):
            chunk = self._chunks[i]
            if j >= len(chunk):
                i, j = i + 1, 0
                continue
            last = chunk[j]
            yield last
            if self._version == version:
                j += 1
                continue
            version = self._version
            i = bisect_right(self._maxes, last)
            j = bisect_right(self._chunks[i], last) if i < len(self._chunks) else 0
