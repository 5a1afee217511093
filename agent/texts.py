"""Where an agent keeps the text of the URLs it holds: out of the Python heap.

A million URLs of 75 characters are 75 MB of text, and as `str` objects in a
dict about 150 MB: alone the whole memory budget of a small agent. The text is
needed only when a URL is probed, so it lives on disk, read back when the URL
is due:

* with `--state-dir`, in the spool's SQLite file (`agent.spool.Spool`: read by
  primary key, about 20 µs), where it survives restarts;
* without one, in `TempTexts`: an unnamed temporary file in the system's
  temporary directory, appended to, with an offset and a length per URL in
  memory (8 bytes per URL) and read back with one `pread`. The file
  has no name from the start (`O_TMPFILE`, or created and unlinked at once
  where the file system lacks it), so nothing is left on disk once the
  process is gone, however it ends: SIGKILL included. Its pages sit in the
  kernel's page cache, which is not the agent's RSS and is reclaimed under
  memory pressure.

Replaced and removed texts leave garbage in the file; once it outweighs the live
text, the live texts are copied into a new file (a compaction: over a second for a
million URLs). An agent must not stop for that long, so with
`TempTexts(compact_in_steps=True)` a due compaction is only started where it
falls due, and `compact_step` carries it on a few pages of ids at a time
(`agent.main` runs the steps on the event loop, yielding between them).
Meanwhile the store works as usual: each URL's entry says which of the two files
holds its text (a generation bit), new texts go to the new file, and the old file
is closed once every live text has left it.

`Arena` keeps the same layout with the bytes in memory (one `bytearray`):
`agent.assignment.Assignment`'s default store, for tests and tools.
"""

from __future__ import annotations

import os
import tempfile
from array import array
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import IO, Protocol

from agent.slots import Slots

_MIN_GARBAGE_BEFORE_COMPACT = 1 << 20
_WRITE_CHUNK = 1 << 20  # bytes gathered before one write to the temporary file
_ID_BITS = 8  # TempTexts: a page holds 1 << _ID_BITS consecutive ids
_ID_MASK = (1 << _ID_BITS) - 1
# TempTexts: packed = generation | offset << _LENGTH_BITS | length, -1 for no text: 16 MiB
# texts, 256 GiB files, and the generation bit tells which file of a compaction holds it
_LENGTH_BITS = 24
_MAX_LENGTH = (1 << _LENGTH_BITS) - 1
_GENERATION = 1 << 62
_MAX_END = 1 << (62 - _LENGTH_BITS)  # a file stays shorter than this
_OFFSET_MASK = _MAX_END - 1
_EMPTY_PAGE = array("q", [-1]) * (1 << _ID_BITS)
COMPACT_STEP_PAGES = 8  # pages of ids one compaction step copies: 2,048 ids, a few ms


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


class TextsError(Exception):
    """The temporary file of URL texts cannot be created, written or read. The message names
    the directory and the OS error, never a URL."""


class TempTexts:
    """URL texts in an unnamed temporary file; in memory 8 bytes per URL: its offset and
    length packed in one int64, in pages of `array('q')` indexed directly by url id.

    No `Slots` here (which costs 12 bytes per URL more): url ids are dense (collector row
    ids), so a page of 256 consecutive ids (2 KiB) is mostly full; an empty page is freed.
    Texts are appended; replacing or removing one leaves its bytes behind as garbage, and
    once the garbage outweighs the live text (and 1 MiB) the live texts are copied into a
    new file, in id order: inside `record_assignment`, or with `compact_in_steps` a few
    pages at each `compact_step` (the module docstring). After a failed write (a full disk)
    the store refuses further use: its offsets no longer match the file. `close()` (or the
    process ending) frees the file.
    """

    __slots__ = (
        "_closed", "_count", "_end", "_failure", "_fd", "_file", "_garbage", "_generation",
        "_old_end", "_old_fd", "_old_file", "_pages", "_todo", "_used", "compact_in_steps",
        "directory",
    )  # fmt: skip

    def __init__(
        self, directory: str | Path | None = None, *, compact_in_steps: bool = False
    ) -> None:
        """`directory`: where the file's blocks go (default: the system's temporary directory,
        `tempfile.gettempdir()`: $TMPDIR if usable, else /tmp, ...). TextsError if no file
        can be made there. `compact_in_steps`: `record_assignment` only starts a due
        compaction, and `compact_step` must carry it on (else it runs to its end there)."""
        self.compact_in_steps = compact_in_steps
        self._closed = False
        self._failure: str | None = None
        try:
            self.directory = str(directory) if directory is not None else tempfile.gettempdir()
        except OSError as exc:
            raise TextsError(f"URL texts: no usable temporary directory: {exc}") from exc
        self._file = self._new_file()
        self._fd = self._file.fileno()
        self._end = 0
        self._generation = 0  # 0 or _GENERATION: the bit of the entries whose text is in _file
        self._pages: dict[int, array[int]] = {}  # id >> _ID_BITS → packed (offset, length)
        self._used: dict[int, int] = {}  # page → ids held in it, to free empty pages
        self._count = 0
        self._garbage = 0  # bytes of _file that no entry points to
        # While compacting: the previous file, its size, and the keys of the pages still to
        # copy from it (largest first: pop() takes them in id order).
        self._old_file: IO[bytes] | None = None
        self._old_fd = -1
        self._old_end = 0
        self._todo: list[int] = []

    def _new_file(self) -> IO[bytes]:
        """A file without a name (O_TMPFILE, or created and unlinked at once), mode 0600."""
        try:
            return tempfile.TemporaryFile(dir=self.directory, prefix="takedown-agent-urls-")
        except OSError as exc:
            raise TextsError(
                f"URL texts: cannot create a temporary file in {self.directory}: {exc}"
                " (set TMPDIR to a writable directory, or use --state-dir)"
            ) from exc

    def __len__(self) -> int:
        return self._count

    @property
    def nbytes(self) -> int:
        """Bytes of the file (of both files while compacting), garbage included."""
        return self._end + self._old_end

    @property
    def compacting(self) -> bool:
        """A compaction has started and `compact_step` has not finished it yet."""
        return self._old_file is not None

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise TextsError(f"URL texts: unusable after an earlier error: {self._failure}")
        if self._closed:
            raise TextsError("URL texts: closed")

    def url(self, url_id: int) -> str | None:
        self._check_usable()
        page = self._pages.get(url_id >> _ID_BITS)
        packed = -1 if page is None else page[url_id & _ID_MASK]
        if packed < 0:
            return None
        n = packed & _MAX_LENGTH
        fd = self._fd if packed & _GENERATION == self._generation else self._old_fd
        try:
            data = os.pread(fd, n, (packed >> _LENGTH_BITS) & _OFFSET_MASK)
        except OSError as exc:
            raise TextsError(f"URL texts: cannot read the temporary file: {exc}") from exc
        if len(data) != n:
            raise TextsError("URL texts: the temporary file is shorter than written")
        return data.decode()

    def record_assignment(
        self, upsert: Iterable[tuple[int, str, float]], remove: Iterable[int]
    ) -> None:
        """Keep the texts of `upsert` (its intervals are not kept here), forget `remove`.
        TextsError if the file cannot be written (the store is unusable from then on)."""
        self._check_usable()
        pages, used, generation = self._pages, self._used, self._generation
        for url_id in remove:
            key = url_id >> _ID_BITS
            page = pages.get(key)
            if page is None or page[url_id & _ID_MASK] < 0:
                continue
            self._forget(page[url_id & _ID_MASK])
            page[url_id & _ID_MASK] = -1
            self._count -= 1
            used[key] -= 1
            if not used[key]:
                del pages[key], used[key]
        pending = bytearray()
        try:
            for url_id, url, _ in upsert:
                text = url.encode()
                if len(text) > _MAX_LENGTH:
                    raise OSError(f"a URL text of {len(text)} bytes (at most {_MAX_LENGTH})")
                key = url_id >> _ID_BITS
                page = pages.get(key)
                if page is None:
                    page = pages[key] = array("q", _EMPTY_PAGE)
                    used[key] = 0
                old = page[url_id & _ID_MASK]
                if old >= 0:
                    self._forget(old)
                else:
                    self._count += 1
                    used[key] += 1
                offset = self._end + len(pending)
                page[url_id & _ID_MASK] = generation | offset << _LENGTH_BITS | len(text)
                pending += text
                if len(pending) >= _WRITE_CHUNK:
                    self._end = self._write(self._fd, pending, self._end)
                    pending.clear()
            self._end = self._write(self._fd, pending, self._end)
        except OSError as exc:
            self._failure = f"cannot write in {self.directory}: {exc}"
            raise TextsError(f"URL texts: {self._failure}") from exc
        if self._old_file is None and self._compaction_due():
            self._start_compaction()
            if not self.compact_in_steps:
                while self.compact_step(len(self._todo)):
                    pass

    def _forget(self, packed: int) -> None:
        """An entry stops pointing to its text: garbage if the text is in the current file
        (the old file of a compaction goes away whole)."""
        if packed & _GENERATION == self._generation:
            self._garbage += packed & _MAX_LENGTH

    def _compaction_due(self) -> bool:
        return self._garbage > max(self._end - self._garbage, _MIN_GARBAGE_BEFORE_COMPACT)

    @staticmethod
    def _write(fd: int, data: bytes | bytearray, offset: int) -> int:
        """Write all of data at offset; the offset after it."""
        if offset + len(data) >= _MAX_END:
            raise OSError(f"the file of URL texts would reach {_MAX_END >> 30} GiB")
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n
        return offset

    def _start_compaction(self) -> None:
        """A new file becomes the current one; the texts stay in the old one until copied."""
        new = self._new_file()
        self._old_file, self._old_fd, self._old_end = self._file, self._fd, self._end
        self._file, self._fd, self._end = new, new.fileno(), 0
        self._generation ^= _GENERATION
        self._garbage = 0
        self._todo = sorted(self._pages, reverse=True)

    def compact_step(self, pages: int = COMPACT_STEP_PAGES) -> bool:
        """Copy the live texts of up to `pages` pages of ids from the old file to the new one;
        True while the compaction has more to do. Once it is done the old file is closed (and
        the next compaction started if so much was replaced meanwhile that one is due). False
        at once when no compaction runs. On an error the store is unusable, as after any
        failed write (TextsError)."""
        if self._old_file is None:
            return False
        self._check_usable()
        old_fd, generation, todo, end = self._old_fd, self._generation, self._todo, self._end
        pending = bytearray()
        try:
            for _ in range(min(pages, len(todo))):
                page = self._pages.get(todo.pop())
                if page is None:  # emptied meanwhile
                    continue
                for i, packed in enumerate(page):
                    if packed >= 0 and packed & _GENERATION != generation:
                        n = packed & _MAX_LENGTH
                        text = os.pread(old_fd, n, (packed >> _LENGTH_BITS) & _OFFSET_MASK)
                        if len(text) != n:
                            raise OSError("the temporary file is shorter than written")
                        page[i] = generation | (end + len(pending)) << _LENGTH_BITS | n
                        pending += text
                        if len(pending) >= _WRITE_CHUNK:
                            end = self._write(self._fd, pending, end)
                            pending.clear()
            self._end = self._write(self._fd, pending, end)
        except OSError as exc:
            self._failure = f"cannot copy the texts to a new file in {self.directory}: {exc}"
            raise TextsError(f"URL texts: {self._failure}") from exc
        if todo:
            return True
        self._old_file.close()
        self._old_file, self._old_fd, self._old_end = None, -1, 0
        if self._compaction_due():  # so much was replaced while it ran
            self._start_compaction()
            return True
        return False

    def close(self) -> None:
        """Close (and so free) the file; later calls raise TextsError. Twice is harmless."""
        if not self._closed:
            self._closed = True
            self._file.close()
            if self._old_file is not None:
                self._old_file.close()

    def __enter__(self) -> TempTexts:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
