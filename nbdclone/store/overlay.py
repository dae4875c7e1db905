"""The per-clone overlay: the blocks a clone changed, as a block map plus the blocks' bytes.

    map (durable, atomic per batch)          data (addressed like the disk, sparse)
    block -> DATA    the clone wrote it   -> its bytes are at block * BLOCK_SIZE in the data
    block -> ZEROED  it reads as zeros, whatever the base holds
    (no entry)       it reads from the base

A write stores the bytes first (`write`, one call for the whole request, nothing copied) and then, only
for blocks whose state changes, one atomic batch of map changes (`apply`). Rewriting blocks that are
already DATA changes no map entry. So a crash between the two leaves the block reading as it did before:
its map entry still says where it read from. `apply(..., sync=True)` and `flush()` return only once the
data written so far and every batch applied so far are on stable storage.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

BLOCK_SIZE = 4096

#: Block states, in an overlay's map and in a clone's one-byte-per-block state array.
BASE, DATA, ZEROED = 0, 1, 2

#: One map change: (block, new state).
Change = tuple[int, int]


class Overlay(Protocol):
    """What a clone needs from its overlay. Implementations: MemoryOverlay here, RocksOverlay in _rocks."""

    def scan(self) -> Iterator[Change]:
        """Yield (block, DATA or ZEROED) for every map entry, in block order."""
        ...

    def read(self, buf: memoryview, offset: int) -> None:
        """Fill `buf` with the stored bytes at `offset` (any alignment); every block it covers must be DATA."""
        ...

    def write(self, bufs: Sequence[bytes | bytearray | memoryview], offset: int) -> None:
        """Store whole blocks, the concatenation of `bufs`, at the block-aligned `offset`."""
        ...

    def write_block(self, buf: memoryview, offset: int, *, new: bool, sync: bool) -> None:
        """Store one whole block at the block-aligned `offset` and count its bytes as written; if `new`, the
        block becomes DATA. The same as `write` then `apply`, in one call: the hot path of 4 KiB writes."""
        ...

    def apply(self, changes: Sequence[Change], *, written: int = 0, sync: bool = False) -> None:
        """Apply map `changes` atomically (releasing the bytes of blocks that stop being DATA) and add
        `written` to the bytes-written counter."""
        ...

    def flush(self) -> None:
        """Make every write and change so far durable."""
        ...

    def bytes_written(self) -> int:
        """Total bytes clients have written or zeroed through this overlay (a statistic: the count of
        writes after the last flush may be lost in a crash, the writes' data is not)."""
        ...

    def close(self) -> None: ...


class MemoryOverlay:
    """The reference overlay: dicts, for tests. `flush` snapshots what a crash would keep."""

    def __init__(self) -> None:
        self._map: dict[int, int] = {}
        self._data: dict[int, bytes] = {}
        self._written = 0
        self.durable: dict[int, int] = {}
        self.closed = False

    def scan(self) -> Iterator[Change]:
        for block in sorted(self._map):
            yield block, self._map[block]

    def read(self, buf: memoryview, offset: int) -> None:
        pos, end = offset, offset + len(buf)
        while pos < end:
            block, within = divmod(pos, BLOCK_SIZE)
            if self._map.get(block) != DATA:
                raise KeyError(f"block {block} is not DATA")
            n = min(BLOCK_SIZE - within, end - pos)
            buf[pos - offset : pos - offset + n] = self._data[block][within : within + n]
            pos += n

    def write(self, bufs: Sequence[bytes | bytearray | memoryview], offset: int) -> None:
        joined = b"".join(bufs)
        if offset % BLOCK_SIZE or len(joined) % BLOCK_SIZE:
            raise ValueError(f"write of {len(joined)} bytes at {offset} is not in whole blocks")
        for i in range(0, len(joined), BLOCK_SIZE):
            self._data[(offset + i) // BLOCK_SIZE] = joined[i : i + BLOCK_SIZE]

    def write_block(self, buf: memoryview, offset: int, *, new: bool, sync: bool) -> None:
        self.write((buf,), offset)
        self.apply([(offset // BLOCK_SIZE, DATA)] if new else [], written=len(buf), sync=sync)

    def apply(self, changes: Sequence[Change], *, written: int = 0, sync: bool = False) -> None:
        for block, state in changes:
            if state == DATA:
                self._map[block] = DATA
            else:
                self._data.pop(block, None)
                if state == BASE:
                    self._map.pop(block, None)
                else:
                    self._map[block] = ZEROED
        self._written += written
        if sync:
            self.flush()

    def flush(self) -> None:
        self.durable = dict(self._map)

    def bytes_written(self) -> int:
        return self._written

    def close(self) -> None:
        self.closed = True
