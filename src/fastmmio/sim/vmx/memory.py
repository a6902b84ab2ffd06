"""Host-physical memory and a page allocator.

:class:`HostMemory` is a sparse store of 4 KiB pages (``bytearray`` each), keyed by page-frame
number. The walker reads EPT entries, guest paging-structure entries and data through it; the
KVM model builds its EPT tables (SPTEs) and backs memslots in it with :class:`PageAllocator`.

Memory is not coherent with the translation caches, exactly as on hardware: writing an entry
does not change a cached translation until software invalidates it (SDM 4.10.4, 28.3.3).

Reading or writing a page nobody backed raises :class:`HostMemoryError`: in the simulator it
always means a model bug (an SPTE or guest entry pointing at nothing).
"""

from __future__ import annotations

import struct

from fastmmio.sim.vmx.errors import HostMemoryError

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = PAGE_SIZE - 1

_U64 = struct.Struct("<Q")
_FMT = {1: struct.Struct("<B"), 2: struct.Struct("<H"), 4: struct.Struct("<I"), 8: _U64}


class HostMemory:
    """Sparse host-physical memory of 4 KiB pages.

    ``pages`` (pfn -> a writable buffer of 4096 bytes: a ``bytearray``, or a ``memoryview``
    slice of a multi-page run's buffer, see :meth:`back`) is public so that hot paths (the walker, a memslot
    backing view) can index it directly.
    """

    __slots__ = ("pages", "maxphyaddr")

    def __init__(self, maxphyaddr: int = 46):
        if not 32 <= maxphyaddr <= 52:
            raise HostMemoryError(f"MAXPHYADDR must be between 32 and 52, got {maxphyaddr}")
        self.maxphyaddr = maxphyaddr
        self.pages: dict[int, bytearray | memoryview] = {}

    # -- backing ----------------------------------------------------------------------------

    def back(self, hpa: int, size: int = PAGE_SIZE) -> None:
        """Back ``[hpa, hpa+size)`` with zeroed pages (pages already backed are kept).

        A run of several pages none of which is backed yet gets one buffer, each page a
        ``memoryview`` of its slice: the run is then contiguous in the host process too, so
        the CPU emulator maps it with one call (:meth:`runs`)."""
        self._check_range(hpa, size)
        first, end = hpa >> PAGE_SHIFT, (hpa + size + PAGE_MASK) >> PAGE_SHIFT
        pages = self.pages
        if end - first > 1 and not any(pfn in pages for pfn in range(first, end)):
            buf = memoryview(bytearray((end - first) * PAGE_SIZE))
            for i, pfn in enumerate(range(first, end)):
                pages[pfn] = buf[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
            return
        for pfn in range(first, end):
            if pfn not in pages:
                pages[pfn] = bytearray(PAGE_SIZE)

    def release(self, hpa: int, size: int = PAGE_SIZE) -> None:
        """Drop the backing of ``[hpa, hpa+size)`` (page-granular)."""
        self._check_range(hpa, size)
        for pfn in range(hpa >> PAGE_SHIFT, (hpa + size + PAGE_MASK) >> PAGE_SHIFT):
            self.pages.pop(pfn, None)

    def is_backed(self, hpa: int) -> bool:
        return (hpa >> PAGE_SHIFT) in self.pages

    def page(self, hpa: int) -> bytearray | memoryview:
        """The backing buffer of the page holding ``hpa`` (shared, not a copy)."""
        try:
            return self.pages[hpa >> PAGE_SHIFT]
        except KeyError:
            raise HostMemoryError(f"host-physical address {hpa:#x} is not backed") from None

    def _check_range(self, hpa: int, size: int) -> None:
        if hpa < 0 or size <= 0 or hpa + size > (1 << self.maxphyaddr):
            raise HostMemoryError(
                f"host-physical range {hpa:#x}+{size:#x} outside MAXPHYADDR={self.maxphyaddr}"
            )

    # -- accesses ---------------------------------------------------------------------------

    def read(self, hpa: int, size: int) -> int:
        """Little-endian read of 1, 2, 4 or 8 bytes (may cross a page boundary)."""
        fmt = _FMT.get(size)
        if fmt is None:
            raise HostMemoryError(f"read size must be 1, 2, 4 or 8, got {size}")
        off = hpa & PAGE_MASK
        if off + size <= PAGE_SIZE:
            return fmt.unpack_from(self.page(hpa), off)[0]
        return int.from_bytes(self.read_bytes(hpa, size), "little")

    def write(self, hpa: int, size: int, value: int) -> None:
        """Little-endian write of 1, 2, 4 or 8 bytes (``value`` truncated to the size)."""
        fmt = _FMT.get(size)
        if fmt is None:
            raise HostMemoryError(f"write size must be 1, 2, 4 or 8, got {size}")
        value &= (1 << (8 * size)) - 1
        off = hpa & PAGE_MASK
        if off + size <= PAGE_SIZE:
            fmt.pack_into(self.page(hpa), off, value)
        else:
            self.write_bytes(hpa, value.to_bytes(size, "little"))

    def read_u64(self, hpa: int) -> int:
        """Read an 8-byte-aligned 64-bit paging-structure entry."""
        if hpa & 7:
            raise HostMemoryError(f"entry address {hpa:#x} is not 8-byte aligned")
        try:
            return _U64.unpack_from(self.pages[hpa >> PAGE_SHIFT], hpa & PAGE_MASK)[0]
        except KeyError:
            raise HostMemoryError(f"host-physical address {hpa:#x} is not backed") from None

    def write_u64(self, hpa: int, value: int) -> None:
        """Write an 8-byte-aligned 64-bit paging-structure entry."""
        if hpa & 7:
            raise HostMemoryError(f"entry address {hpa:#x} is not 8-byte aligned")
        _U64.pack_into(self.page(hpa), hpa & PAGE_MASK, value & 0xFFFF_FFFF_FFFF_FFFF)

    def read_bytes(self, hpa: int, n: int) -> bytes:
        out = bytearray()
        while n > 0:
            off = hpa & PAGE_MASK
            chunk = min(n, PAGE_SIZE - off)
            out += self.page(hpa)[off:off + chunk]
            hpa += chunk
            n -= chunk
        return bytes(out)

    def write_bytes(self, hpa: int, data: bytes) -> None:
        mv = memoryview(data)
        while len(mv):
            off = hpa & PAGE_MASK
            chunk = min(len(mv), PAGE_SIZE - off)
            self.page(hpa)[off:off + chunk] = mv[:chunk]
            hpa += chunk
            mv = mv[chunk:]

    def fill(self, hpa: int, n: int, byte: int) -> None:
        """Set ``n`` bytes from ``hpa`` to ``byte``."""
        self.write_bytes(hpa, bytes([byte & 0xFF]) * n)


class PageAllocator:
    """Hands out zeroed, backed host-physical pages from ``[base, limit)``.

    A bump pointer with a free list of single pages. ``alloc_pages(n, align)`` returns a
    contiguous, aligned run (for memslot backing and large pages); freed runs go back to
    the single-page free list page by page.
    """

    def __init__(self, memory: HostMemory, base: int = 0x1_0000_0000,
                 limit: int | None = None):
        if base & PAGE_MASK:
            raise HostMemoryError(f"allocator base {base:#x} is not page-aligned")
        self.memory = memory
        self.base = base
        self.limit = (1 << memory.maxphyaddr) if limit is None else limit
        if not base < self.limit <= (1 << memory.maxphyaddr):
            raise HostMemoryError(f"allocator range {base:#x}-{self.limit:#x} is empty or "
                                  f"beyond MAXPHYADDR={memory.maxphyaddr}")
        self._next = base
        self._free: list[int] = []
        self.allocated = 0

    def alloc_page(self) -> int:
        """One zeroed 4 KiB page; returns its host-physical address."""
        if self._free:
            hpa = self._free.pop()
            self.memory.back(hpa)
            self.allocated += 1
            return hpa
        return self.alloc_pages(1)

    def alloc_pages(self, count: int, align: int = PAGE_SIZE) -> int:
        """``count`` contiguous zeroed pages aligned to ``align`` bytes (a power of two)."""
        hpa = self.reserve(count, align)
        self.memory.back(hpa, count * PAGE_SIZE)
        return hpa

    def reserve(self, count: int, align: int = PAGE_SIZE) -> int:
        """Like :meth:`alloc_pages` but without backing the pages: the caller backs what it
        touches with :meth:`HostMemory.back` (large, sparsely used memslots)."""
        if count <= 0 or align < PAGE_SIZE or align & (align - 1):
            raise HostMemoryError(f"bad allocation: {count} pages aligned to {align:#x}")
        hpa = (self._next + align - 1) & ~(align - 1)
        end = hpa + count * PAGE_SIZE
        if end > self.limit:
            raise HostMemoryError(
                f"host memory exhausted: {count} pages at {hpa:#x} exceed limit {self.limit:#x}"
            )
        self._next = end
        self.allocated += count
        return hpa

    def free_pages(self, hpa: int, count: int = 1) -> None:
        """Return pages; their contents are discarded."""
        if hpa & PAGE_MASK or count <= 0:
            raise HostMemoryError(f"bad free: {count} pages at {hpa:#x}")
        for i in range(count):
            p = hpa + i * PAGE_SIZE
            if not self.memory.is_backed(p):
                raise HostMemoryError(f"freeing page {p:#x} that is not allocated")
            self.memory.release(p)
            self._free.append(p)
        self.allocated -= count
