"""Give memory back to the system while loading: pages of mapped files, and the C heap's free memory.

**Mapped file pages.** Loading a safetensors checkpoint maps each shard into the process; every page a reader touches
stays in the mapping, and counts in the process's RSS, until the shard is unmapped. When a weight
has been read once and turned into something else (an int8 copy), its pages are dead weight.
``madvise(MADV_DONTNEED)`` removes them from this process's page tables. For clean pages of a file
mapping this changes nothing a reader can observe: the pages stay in the kernel's page cache and a
later access faults the same bytes back in. It would lose data only where the page is private
anonymous memory: an anonymous mapping, or a page of a private (``MAP_PRIVATE``) file mapping that
someone wrote to (copy-on-write). So :func:`release_pages` drops a page only when

* the range lies in one mapping of a file that exists on a file system (``/proc/self/maps``: not
  anonymous memory, heap, stack, shared memory or a device), and
* ``/proc/self/pagemap`` shows the page not swapped and either not present or a file page (bit 61):
  copy-on-written (anonymous) pages and swapped pages are kept, the pages around them still go.

Only whole pages inside the range are dropped; the pages it shares with neighbouring data stay.
The check and the ``madvise`` are two steps: a thread writing into the range between them would
lose that write, so callers pass ranges nobody writes to (checkpoint weights already consumed).

Linux only. Elsewhere, or where ``/proc/self/pagemap`` cannot be read, nothing is dropped and every
function returns 0.

**The C heap.** :func:`trim_heap` calls glibc's ``malloc_trim(0)``, which returns the free pages
inside the heap to the system. Quantizing a weight allocates float temporaries the size of the
weight; glibc serves those below its (adaptive, up to 32 MiB) mmap threshold from the heap, and
once they are freed the int8 results allocated among them keep the heap from shrinking, so the
freed space stays resident. It is always safe (only free memory is given back) and costs about
2 ms per call with a few hundred MiB of heap; it does nothing where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import sys
from array import array
from dataclasses import dataclass
from typing import Callable

from .checkpoint import read_safetensors_header

PAGE_SIZE = mmap.PAGESIZE
MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)
_PAGEMAP_PRESENT = 1 << 63
_PAGEMAP_SWAPPED = 1 << 62
_PAGEMAP_FILE_OR_SHARED = 1 << 61
_PAGEMAP_CHUNK_PAGES = 1 << 14  # read pagemap 64 MiB of address space (128 KiB of entries) at a time

_libc = None
_malloc_trim = None


@dataclass(frozen=True)
class Mapping:
    """One line of ``/proc/self/maps``: addresses [start, end) show the file from byte ``offset``."""

    start: int
    end: int
    perms: str
    offset: int
    inode: int
    path: str

    @property
    def file_backed(self) -> bool:
        """A mapping of a file that exists on a file system: not anonymous memory, heap or stack, nor
        shared memory (``/dev/zero``, memfd and SysV segments show as deleted files), nor a device."""
        return (self.inode != 0 and self.path.startswith("/") and not self.path.startswith("/dev/")
                and not self.path.endswith(" (deleted)"))


def supported() -> bool:
    """Whether this platform can release pages (Linux with madvise and a readable pagemap)."""
    return _madvise_fn() is not None and _can_read_pagemap()


def mappings() -> list[Mapping]:
    """This process's memory mappings, from ``/proc/self/maps`` (empty where there is none)."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) < 5:
            continue
        start, _, end = fields[0].partition("-")
        out.append(Mapping(int(start, 16), int(end, 16), fields[1], int(fields[2], 16), int(fields[4]),
                           fields[5] if len(fields) > 5 else ""))
    return out


def release_pages(address: int, nbytes: int) -> int:
    """Drop the whole pages inside [address, address + nbytes) from this process's page tables.

    Only clean pages of a file mapping are dropped (see the module docstring); returns the bytes of
    resident pages dropped, 0 when the range is not in a file-backed mapping or the platform is
    unsupported.
    """
    lo = -(-address // PAGE_SIZE) * PAGE_SIZE
    hi = (address + nbytes) // PAGE_SIZE * PAGE_SIZE
    if hi <= lo or _madvise_fn() is None:
        return 0
    if not any(m.file_backed and m.start <= lo and hi <= m.end for m in mappings()):
        return 0
    return _release_clean(lo, hi)


def release_file_range(file_mappings: list[Mapping], file_offset: int, nbytes: int) -> int:
    """Drop, from each of ``file_mappings`` (mappings of one file), the pages holding file bytes
    [file_offset, file_offset + nbytes); returns the bytes of resident pages dropped."""
    released = 0
    for m in file_mappings:
        lo = max(file_offset, m.offset)
        hi = min(file_offset + nbytes, m.offset + (m.end - m.start))
        if hi > lo:
            released += release_pages(m.start + (lo - m.offset), hi - lo)
    return released


class CheckpointPages:
    """Gives back the pages of the mapped safetensors shards that held tensors already loaded.

    transformers (5.x) opens every shard with ``safe_open`` (an ``mmap`` of the whole file) before
    loading and closes them all at the end. It loads the tensors one by one, in the order that
    ``order_key`` gives (``transformers.core_model_loading.dot_natural_key``); each is read from its mapping once,
    quantized (or cast, or moved to a GPU) and never read again, but the pages it was read from stay
    resident in the process until the shard is unmapped: after loading, or never while a float
    parameter (a norm, say) is still a view into it; a float checkpoint's worth of RSS, whatever the
    int8 model's size. So, each time a weight has been quantized, :meth:`release_through` drops
    the pages of that weight and of every tensor loaded before it (float ones included: those cast
    or moved to another device left their pages behind too) with
    :func:`release_file_range`: madvise ``MADV_DONTNEED`` on clean file pages
    only, which the page cache keeps. The bytes are located from the shards' headers, not from the
    tensors, so this works whether transformers handed us a view into the mapping or a copy.

    Dropping a clean page of a file mapping cannot change what anyone reads: a later access faults
    the same bytes back in. Float parameters that stay views into the mapping (same dtype, on the
    CPU) therefore remain correct; their pages were not read during loading and come back on first
    use. Pages written to (copy-on-write, anonymous) are never dropped. Only mappings of the shards
    that appear after this object is built (those transformers opens to load them) are touched;
    mappings that existed before, say of another model loaded from the same files, are left alone.
    """

    def __init__(self, checkpoint_files, order_key: Callable[[str], object]):
        self.where: dict[str, tuple[int, str, int, int]] = {}  # key -> (inode, path, begin, end) in the file
        for file in checkpoint_files:
            if not str(file).endswith(".safetensors"):
                continue
            try:
                path = os.path.realpath(file)
                inode = os.stat(path).st_ino
                header, data_start = read_safetensors_header(path)
            except (OSError, ValueError):
                continue
            for key, info in header.items():
                if key != "__metadata__" and isinstance(info, dict) and "data_offsets" in info:
                    begin, end = info["data_offsets"]
                    self.where[key] = (inode, path, data_start + begin, data_start + end)
        self.files = {(inode, path) for inode, path, _, _ in self.where.values()}
        self.order = sorted(self.where, key=order_key)  # the loader's order
        self.position = {key: i for i, key in enumerate(self.order)}
        self.released_up_to = 0  # self.order[:released_up_to] have been released
        self.preexisting = {(m.start, m.end, m.inode) for m in self._shard_mappings()}

    def _shard_mappings(self):
        # A mapping shows the file's inode (on overlay file systems, maybe the one underneath) and path.
        inodes = {inode for inode, _ in self.files}
        paths = {path for _, path in self.files}
        return [m for m in mappings() if m.file_backed and (m.inode in inodes or m.path in paths)]

    def release_through(self, key: str) -> int:
        """Drop the pages of checkpoint tensor ``key`` and of those loaded before it from this load's
        shard mappings; returns the bytes dropped."""
        position = self.position.get(key)
        if position is None or position < self.released_up_to:
            return 0
        keys = self.order[self.released_up_to : position + 1]
        self.released_up_to = position + 1
        mappings = [m for m in self._shard_mappings() if (m.start, m.end, m.inode) not in self.preexisting]
        released = 0
        for key in keys:
            inode, path, begin, end = self.where[key]
            ours = [m for m in mappings if m.inode == inode or m.path == path]
            released += release_file_range(ours, begin, end - begin)
        return released


def status_bytes(field: str) -> int:
    """A size field of ``/proc/self/status`` in bytes, e.g. ``VmRSS`` (resident now) or ``VmHWM`` (peak
    resident); 0 where it cannot be read."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _pagemap(lo: int, hi: int):
    """The pagemap entries of the pages in [lo, hi) (page-aligned), in order; stops early on errors."""
    try:
        pagemap = open("/proc/self/pagemap", "rb", buffering=0)
    except OSError:
        return
    with pagemap:
        page, last = lo // PAGE_SIZE, hi // PAGE_SIZE
        while page < last:
            count = min(_PAGEMAP_CHUNK_PAGES, last - page)
            entries = array("Q")
            try:
                pagemap.seek(page * 8)
                entries.frombytes(pagemap.read(count * 8))
            except (OSError, ValueError):
                return
            if len(entries) != count:
                return
            yield from entries
            page += count


def _release_clean(lo: int, hi: int) -> int:
    """madvise(DONTNEED) the runs of pages in [lo, hi) that hold no anonymous or swapped page;
    returns the bytes of the present pages so dropped."""
    released = 0
    first = page = lo // PAGE_SIZE  # the run [first, page) holds only pages safe to drop
    present = 0
    for entry in _pagemap(lo, hi):
        if entry & _PAGEMAP_SWAPPED or entry & (_PAGEMAP_PRESENT | _PAGEMAP_FILE_OR_SHARED) == _PAGEMAP_PRESENT:
            released += _madvise_dontneed(first, page, present)
            first, present = page + 1, 0
        elif entry & _PAGEMAP_PRESENT:
            present += 1
        page += 1
    # Pages past a pagemap read error were not checked: the run ends at the last checked page.
    return released + _madvise_dontneed(first, page, present)


def trim_heap() -> bool:
    """Return the C heap's free pages to the system (glibc ``malloc_trim``); False where unavailable."""
    global _malloc_trim
    if _malloc_trim is None:
        _malloc_trim = False
        if sys.platform.startswith("linux"):
            try:
                fn = ctypes.CDLL(None).malloc_trim  # the C library this process runs on, if it is glibc
                fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
                _malloc_trim = fn
            except (OSError, AttributeError):
                pass
    if not _malloc_trim:
        return False
    _malloc_trim(0)
    return True


def _madvise_dontneed(first_page: int, end_page: int, present: int) -> int:
    """madvise(DONTNEED) pages [first_page, end_page), of which ``present`` are resident; bytes dropped."""
    if end_page <= first_page or present == 0:
        return 0
    if _madvise_fn()(first_page * PAGE_SIZE, (end_page - first_page) * PAGE_SIZE, MADV_DONTNEED) != 0:
        return 0  # e.g. EINVAL on a locked mapping: the pages simply stay
    return present * PAGE_SIZE


def _madvise_fn():
    global _libc
    if not sys.platform.startswith("linux"):
        return None
    if _libc is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            libc.madvise.restype = ctypes.c_int
            _libc = libc
        except (OSError, AttributeError):
            _libc = False
    return _libc.madvise if _libc else None


def _can_read_pagemap() -> bool:
    try:
        with open("/proc/self/pagemap", "rb", buffering=0) as f:
            return len(f.read(8)) == 8
    except OSError:
        return False
