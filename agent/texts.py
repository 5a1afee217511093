"""Where an agent keeps the text of the URLs it holds: out of the Python heap.

A million URLs of 75 characters are 75 MB of text, and as `str` objects in a
dict about 150 MB: alone the whole memory budget of a small agent. The text is
needed only when a URL is probed, so it lives either in the spool's SQLite
file (`agent.spool.Spool`, with `--state-dir`: read back by primary key when
the URL is due, about 10 µs) or, without a state directory, in `Arena`: one
`bytearray` holding every URL's UTF-8 bytes, with offsets and lengths in
arrays (the text plus 16 bytes per URL).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from typing import Protocol

from agent.slots import Slots

_MIN_GARBAGE_BEFORE_COMPACT = 1 << 20


class UrlTexts(Protocol):
    """What `agent.assignment.Assignment` needs of a store of URL texts."""

    def url(self, url_id: int) -> str | None: ...

    def record_assignment(
        self, upsert: Iterable[tuple[int, str, float]], remove: Iterable[int]
    ) -> None: ...


class Arena:
    """URL texts in memory, compactly: one byte array, an offset and a length per URL.

    Replacing or removing a text leaves its bytes behind as garbage; once the garbage
    outweighs the live text (and 1 MiB), the live texts are copied into a new array.
    """

    __slots__ = ("_data", "_garbage", "_length", "_offset", "_slots")

    def __init__(self) -> None:
        self._slots = Slots()
        self._data = bytearray()
        self._offset = array("q")
        self._length = array("i")
        self._garbage = 0

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def nbytes(self) -> int:
        """Bytes of the text array, garbage included."""
        return len(self._data)

    def url(self, url_id: int) -> str | None:
        slot = self._slots.get(url_id)
        if slot < 0:
            return None
        start = self._offset[slot]
        return self._data[start : start + self._length[slot]].decode()

    def record_assignment(
        self, upsert: Iterable[tuple[int, str, float]], remove: Iterable[int]
    ) -> None:
        """Keep the texts of `upsert` (its intervals are not kept here), forget `remove`."""
        for url_id in remove:
            slot = self._slots.release(url_id)
            if slot >= 0:
                self._garbage += self._length[slot]
        for url_id, url, _ in upsert:
            self._put(url_id, url.encode())
        if self._garbage > max(len(self._data) - self._garbage, _MIN_GARBAGE_BEFORE_COMPACT):
            self._compact()

    def _put(self, url_id: int, text: bytes) -> None:
        slot, new = self._slots.add(url_id)
        if not new:
            start, n = self._offset[slot], self._length[slot]
            if self._data[start : start + n] == text:
                return
            self._garbage += n
        if slot == len(self._offset):
            self._offset.append(len(self._data))
            self._length.append(len(text))
        else:
            self._offset[slot], self._length[slot] = len(self._data), len(text)
        self._data += text

    def _compact(self) -> None:
        data = bytearray()
        for slot, url_id in enumerate(self._slots.ids):
            if url_id >= 0:
                start = self._offset[slot]
                self._offset[slot] = len(data)
                data += self._data[start : start + self._length[slot]]
        self._data = data
        self._garbage = 0
