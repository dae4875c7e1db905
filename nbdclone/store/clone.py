"""A clone: a read-only base under a writable overlay, addressed in bytes, stored in blocks.

    client request (any offset, any length)
          |
    [ state: one byte per block ]  BASE: read the base   DATA: read the overlay   ZERO: reads as zeros
          |                    \\
    overlay (RocksDB, per clone)  base (shared, read-only)

The state array is built from the overlay at open, so a read of blocks the clone never wrote is one base
read with no database lookup. A write is one overlay batch: whole blocks are stored as given, a partial
block is merged with what the block reads as now (read-modify-write, under the clone's write lock so two
partial writes to one block cannot lose each other's bytes). All-zero blocks are stored as zero markers,
or as nothing where the base block is a hole, so a zeroed clone stays small and its extents stay sparse.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from nbdclone.store.base import Base
from nbdclone.store.overlay import BLOCK_SIZE, ZERO, Change, Overlay

BASE, DATA, ZEROED = 0, 1, 2
_OTHERS = {BASE: (DATA, ZEROED), DATA: (BASE, ZEROED), ZEROED: (BASE, DATA)}
_ZERO_BLOCK = bytes(BLOCK_SIZE)
_SHIFT = BLOCK_SIZE.bit_length() - 1
assert 1 << _SHIFT == BLOCK_SIZE

#: Extent types, as NBD (and nbdkit) number them.
EXTENT_DATA = 0
EXTENT_HOLE_ZERO = 3

#: extents() stops after this many entries; NBD lets a reply cover less than was asked.
MAX_EXTENTS = 4096


@dataclass(frozen=True, slots=True)
class CloneUsage:
    data_blocks: int
    zero_blocks: int
    bytes_written: int


class Clone:
    def __init__(self, base: Base, overlay: Overlay, size: int) -> None:
        self.base = base
        self.overlay = overlay
        self.size = size
        self.nblocks = -(-size // BLOCK_SIZE)
        self._state = bytearray(self.nblocks)
        for block, is_zero in overlay.scan():
            if block < self.nblocks:
                self._state[block] = ZEROED if is_zero else DATA
        self._base_zero = base.zero_bitmap(0, self.nblocks, BLOCK_SIZE)
        self._lock = threading.Lock()

    # -- reads ---------------------------------------------------------------------------------------

    def pread_into(self, buf: memoryview, offset: int) -> None:
        n = len(buf)
        if not n:
            return
        first, stop = offset >> _SHIFT, ((offset + n - 1) >> _SHIFT) + 1
        state = self._state
        # The hot path: blocks the clone never wrote are one base read, with no database lookup.
        if state[first] == BASE if stop - first == 1 else state.count(BASE, first, stop) == stop - first:
            self.base.pread_into(buf, offset)
            return
        with self._lock:
            self._read_runs(buf, offset, first, stop)

    def _read_runs(self, buf: memoryview, offset: int, first: int, stop: int) -> None:
        end = offset + len(buf)
        i = first
        while i < stop:
            j = self._run_end(i, stop)
            lo, hi = max(offset, i * BLOCK_SIZE), min(end, j * BLOCK_SIZE)
            dst = buf[lo - offset : hi - offset]
            kind = self._state[i]
            if kind == BASE:
                self.base.pread_into(dst, lo)
            elif kind == ZEROED:
                dst[:] = bytes(hi - lo)
            else:
                for k, value in enumerate(self.overlay.get(range(i, j))):
                    start = (i + k) * BLOCK_SIZE
                    a, b = max(lo, start), min(hi, start + BLOCK_SIZE)
                    dst[a - lo : b - lo] = memoryview(value)[a - start : b - start]
            i = j

    def _run_end(self, i: int, stop: int) -> int:
        """The first block after i, before stop, whose state differs from block i's."""
        end = stop
        for other in _OTHERS[self._state[i]]:
            at = self._state.find(other, i, end)
            if at != -1:
                end = at
        return end

    def _block(self, block: int) -> bytes:
        """What `block` reads as now, as BLOCK_SIZE bytes. Caller holds the lock."""
        kind = self._state[block]
        if kind == DATA:
            return self.overlay.get([block])[0]
        if kind == ZEROED:
            return _ZERO_BLOCK
        buf = bytearray(BLOCK_SIZE)
        self.base.pread_into(memoryview(buf), block * BLOCK_SIZE)
        return bytes(buf)

    # -- writes --------------------------------------------------------------------------------------

    def pwrite(self, buf: memoryview, offset: int, *, fua: bool = False) -> None:
        self._modify(offset, len(buf), buf, fua=fua)

    def zero(self, length: int, offset: int, *, fua: bool = False) -> None:
        self._modify(offset, length, None, fua=fua)

    def _modify(self, offset: int, length: int, buf: memoryview | None, *, fua: bool) -> None:
        """Write `buf` (or zeros, if None) at offset as one overlay batch."""
        if not length:
            return
        end = offset + length
        first, stop = offset // BLOCK_SIZE, (end - 1) // BLOCK_SIZE + 1
        with self._lock:
            changes: list[Change] = []
            for block in range(first, stop):
                start = block * BLOCK_SIZE
                lo, hi = max(offset, start), min(end, start + BLOCK_SIZE)
                if hi - lo == BLOCK_SIZE:
                    data = _ZERO_BLOCK if buf is None else bytes(buf[lo - offset : hi - offset])
                else:
                    merged = bytearray(self._block(block))
                    merged[lo - start : hi - start] = bytes(hi - lo) if buf is None else buf[lo - offset : hi - offset]
                    data = bytes(merged)
                change = self._change_for(block, data)
                if change is not None:
                    changes.append(change)
            self._commit(changes, written=length, sync=fua)

    def _change_for(self, block: int, data: bytes) -> Change | None:
        """The overlay change that makes `block` read as `data`, or None if it already does for free."""
        if data != _ZERO_BLOCK:
            return (block, data)
        if self._base_zero[block]:
            return None if self._state[block] == BASE else (block, None)
        return None if self._state[block] == ZEROED else (block, ZERO)

    def trim(self, length: int, offset: int, *, fua: bool = False) -> None:
        """Drop the clone's copies of whole blocks in the range: they read from the base again.

        NBD makes trim a hint whose range may read as anything afterwards; returning the block to the
        base frees its overlay space, which is what the guest asked for.
        """
        first = -(-offset // BLOCK_SIZE)
        stop = (offset + length) // BLOCK_SIZE
        if offset + length == self.size:
            stop = self.nblocks
        with self._lock:
            changes: list[Change] = [(b, None) for b in range(first, stop) if self._state[b] != BASE]
            self._commit(changes, written=0, sync=fua)

    def _commit(self, changes: list[Change], *, written: int, sync: bool) -> None:
        if changes or written or sync:
            self.overlay.apply(changes, written=written, sync=sync)
        for block, data in changes:
            self._state[block] = BASE if data is None else ZEROED if data == ZERO else DATA

    def flush(self) -> None:
        self.overlay.flush()

    # -- maps ----------------------------------------------------------------------------------------

    def extents(self, length: int, offset: int) -> list[tuple[int, int, int]]:
        """(offset, length, type) covering at least the start of [offset, offset + length)."""
        end = offset + length
        out: list[tuple[int, int, int]] = []

        def add(off: int, n: int, kind: int) -> None:
            if out and out[-1][2] == kind and out[-1][0] + out[-1][1] == off:
                out[-1] = (out[-1][0], out[-1][1] + n, kind)
            else:
                out.append((off, n, kind))

        first, stop = offset // BLOCK_SIZE, (end - 1) // BLOCK_SIZE + 1
        i = first
        while i < stop and len(out) < MAX_EXTENTS:
            j = self._run_end(i, stop)
            lo, hi = max(offset, i * BLOCK_SIZE), min(end, j * BLOCK_SIZE)
            kind = self._state[i]
            if kind == BASE:
                for ext in self.base.extents(lo, hi - lo):
                    add(ext.offset, ext.length, EXTENT_HOLE_ZERO if ext.zero else EXTENT_DATA)
            else:
                add(lo, hi - lo, EXTENT_DATA if kind == DATA else EXTENT_HOLE_ZERO)
            i = j
        return out

    def prefetch(self, length: int, offset: int) -> None:
        self.base.prefetch(offset, length)

    def usage(self) -> CloneUsage:
        return CloneUsage(
            data_blocks=self._state.count(DATA),
            zero_blocks=self._state.count(ZEROED),
            bytes_written=self.overlay.bytes_written(),
        )

    def close(self) -> None:
        self.overlay.close()
