"""``_memory.py``: pages of mapped files given back without changing what anyone reads, never anonymous or
written pages; the /proc/self/status reader. (The quantizer's use of it while loading is ``test_hf.py``'s.)"""

from __future__ import annotations

import ctypes
import os
import mmap

import pytest
import torch

from helpers import resident_bytes
from llm_int8 import _memory

PAGE = _memory.PAGE_SIZE
needs_page_release = pytest.mark.skipif(not _memory.supported(), reason="needs Linux and a readable /proc/self/pagemap")


def _private_mapping(path, nbytes):
    """A uint8 tensor over a private, writable mapping of the file: how safetensors maps a shard."""
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=nbytes)
    return torch.empty(0, dtype=torch.uint8).set_(storage)


def _page_file(tmp_path, pages):
    data = torch.randint(0, 256, (pages * PAGE,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "pages.bin"
    path.write_bytes(data.numpy().tobytes())
    return path, data


def _resident_pages(address, pages):
    return [resident_bytes(address + i * PAGE, 1) // PAGE for i in range(pages)]


def test_release_pages_never_touches_anonymous_memory():
    heap = torch.arange(16 * PAGE // 4, dtype=torch.int32)
    expected = heap.clone()
    assert _memory.release_pages(heap.data_ptr(), heap.nbytes) == 0
    assert torch.equal(heap, expected)
    anonymous = mmap.mmap(-1, 16 * PAGE)
    anonymous.write(bytes(range(256)) * (16 * PAGE // 256))
    view = ctypes.c_char.from_buffer(anonymous)
    try:
        assert _memory.release_pages(ctypes.addressof(view), 16 * PAGE) == 0
    finally:
        del view
    assert anonymous[:] == bytes(range(256)) * (16 * PAGE // 256)
    anonymous.close()


@needs_page_release
def test_release_pages_drops_clean_file_pages_and_keeps_written_ones(tmp_path):
    pages = 8
    path, data = _page_file(tmp_path, pages)
    mapped = _private_mapping(path, pages * PAGE)
    assert torch.equal(mapped, data)  # reads every page
    assert _resident_pages(mapped.data_ptr(), pages) == [1] * pages
    mapped[3 * PAGE + 5] += 1  # copy-on-write: page 3 is now private anonymous memory, not the file's
    expected = data.clone()
    expected[3 * PAGE + 5] += 1
    assert _memory.release_pages(mapped.data_ptr(), pages * PAGE) == (pages - 1) * PAGE
    assert _resident_pages(mapped.data_ptr(), pages) == [0, 0, 0, 1, 0, 0, 0, 0]
    assert torch.equal(mapped, expected)  # the file pages fault back in; the write is kept


@needs_page_release
def test_release_pages_keeps_pages_shared_with_neighbouring_data(tmp_path):
    path, data = _page_file(tmp_path, 4)
    mapped = _private_mapping(path, 4 * PAGE)
    mapped.sum()
    # [100, 3 PAGE + 100) covers pages 1 and 2 whole, pages 0 and 3 only in part: those stay.
    assert _memory.release_pages(mapped.data_ptr() + 100, 3 * PAGE) == 2 * PAGE
    assert _resident_pages(mapped.data_ptr(), 4) == [1, 0, 0, 1]
    assert torch.equal(mapped, data)


@needs_page_release
def test_release_file_range_maps_file_offsets_to_addresses(tmp_path):
    path, data = _page_file(tmp_path, 6)
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 4 * PAGE, offset=2 * PAGE, access=mmap.ACCESS_COPY)  # file pages 2..5
    assert mapped[:] == data[2 * PAGE:].numpy().tobytes()
    inode = os.stat(path).st_ino
    (mapping,) = [m for m in _memory.mappings() if m.inode == inode]
    assert mapping.offset == 2 * PAGE and mapping.end - mapping.start == 4 * PAGE
    # File bytes [3 PAGE, 5 PAGE) are the mapping's pages 1 and 2; file pages 0 and 1 are not mapped.
    assert _memory.release_file_range([mapping], 0, 2 * PAGE) == 0
    assert _memory.release_file_range([mapping], 3 * PAGE, 2 * PAGE) == 2 * PAGE
    assert _resident_pages(mapping.start, 4) == [1, 0, 0, 1]
    assert mapped[:] == data[2 * PAGE:].numpy().tobytes()
    mapped.close()


def test_status_bytes_reads_sizes_in_bytes():
    rss, peak = _memory.status_bytes("VmRSS"), _memory.status_bytes("VmHWM")
    if not rss:
        pytest.skip("no /proc/self/status here")
    assert 0 < rss <= peak and rss % 1024 == 0
    assert _memory.status_bytes("NoSuchField") == 0
