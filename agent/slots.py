"""url_id → a dense slot number, without a Python object per URL.

An agent may hold a million URLs; a dict from int to anything costs about 100
bytes per entry (the key object, the value object, the table), more than the
whole per-URL budget. `Slots` maps ids to dense slot numbers in pages of
`array('i')`, indexed directly by id: url ids are the collector's row ids, so
the ids an agent holds are dense in ranges and most pages are full. A page is
4 KiB for 1,024 consecutive ids, so a million dense ids take 4 MiB, and the
sparsest assignment (one id per page) costs 4 KiB per id, which only a tiny
assignment can be. Released slots are reused, so callers keep their per-URL
data in parallel arrays indexed by slot, sized by `capacity`.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator

_PAGE_BITS = 10
_PAGE = 1 << _PAGE_BITS
_MASK = _PAGE - 1
_EMPTY_PAGE = array("i", [-1]) * _PAGE


class Slots:
    """A set of url ids, each with a slot in [0, capacity) until it is released."""

    __slots__ = ("_free", "_pages", "_used", "ids")

    def __init__(self) -> None:
        self._pages: dict[int, array[int]] = {}
        self._used: dict[int, int] = {}  # page → live ids in it, to free empty pages
        self._free = array("i")
        self.ids = array("q")  # slot → url id, -1 when the slot is free

    def __len__(self) -> int:
        return len(self.ids) - len(self._free)

    def __contains__(self, url_id: object) -> bool:
        return isinstance(url_id, int) and self.get(url_id) >= 0

    @property
    def capacity(self) -> int:
        """One more than the highest slot ever handed out: the length parallel arrays need."""
        return len(self.ids)

    def get(self, url_id: int) -> int:
        """The slot of url_id, or -1."""
        page = self._pages.get(url_id >> _PAGE_BITS)
        return -1 if page is None else page[url_id & _MASK]

    def add(self, url_id: int) -> tuple[int, bool]:
        """The slot of url_id, giving it one if it has none; and whether it is new."""
        key = url_id >> _PAGE_BITS
        page = self._pages.get(key)
        if page is None:
            page = self._pages[key] = array("i", _EMPTY_PAGE)
            self._used[key] = 0
        slot = page[url_id & _MASK]
        if slot >= 0:
            return slot, False
        if self._free:
            slot = self._free.pop()
            self.ids[slot] = url_id
        else:
            slot = len(self.ids)
            self.ids.append(url_id)
        page[url_id & _MASK] = slot
        self._used[key] += 1
        return slot, True

    def release(self, url_id: int) -> int:
        """Forget url_id; its former slot (free for reuse from now on), or -1 if unknown."""
        key = url_id >> _PAGE_BITS
        page = self._pages.get(key)
        if page is None:
            return -1
        slot = page[url_id & _MASK]
        if slot < 0:
            return -1
        page[url_id & _MASK] = -1
        self.ids[slot] = -1
        self._free.append(slot)
        self._used[key] -= 1
        if not self._used[key]:
            del self._pages[key], self._used[key]
        return slot

    def clear(self) -> None:
        """Forget every id; slots start from 0 again (callers' arrays may stay longer)."""
        self._pages = {}
        self._used = {}
        self._free = array("i")
        self.ids = array("q")

    def __iter__(self) -> Iterator[int]:
        """The ids held, in slot order (a snapshot: callers may add or release meanwhile)."""
        return (url_id for url_id in array("q", self.ids) if url_id >= 0)
