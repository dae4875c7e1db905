"""The per-clone overlay: the blocks a clone changed, as a block map plus the blocks' bytes.

    map (RocksDB, the only authority)        data file (addressed like the disk, sparse)
    block -> DATA    the clone wrote it   -> its bytes are at block * BLOCK_SIZE
    block -> ZEROED  it reads as zeros, whatever the base holds
    (no entry)       it reads from the base

The invariants (RocksOverlay keeps them; docs/overlay.md says why each one holds, and which test shows it):

I1  The map alone says what a block is. Nothing is ever inferred from the file system's view of the data
    file (extents, holes, SEEK_DATA): those differ by file system and by mount option, and lie after a crash.
I2  Acknowledged means recorded. Before a write is acknowledged, its bytes are in the data file (pwritev) and
    every map entry it changes is in the write-ahead log: a kill -9 of the server keeps every acknowledged
    write (the page cache and the WAL's written records survive the process).
I3  Tentative until synced. An entry that makes a block DATA carries the block's previous state, the flush
    generation it was written in, and a fingerprint of the bytes (of the acknowledged bytes and of the ones
    being written over them, for a block rewritten before a flush). A flush takes a new generation,
    fdatasyncs the data file, then records "generations up to G are durable" and syncs the WAL. An open after
    any unclean stop (kill -9, power cut, OS crash, file-system shutdown) keeps a tentative entry of a later
    generation only if its block holds fingerprinted bytes, and otherwise puts the previous state back:
    every block reads its old or its new contents, never zeros nobody wrote, and recovery never has to guess
    what kind of stop it was.
I4  Entry before free. A block that stops being DATA (zero, trim, all-zero write) keeps its bytes in the data
    file until the entry saying so is durable (after the next flush's WAL sync); only then is it punched out,
    and only if it did not become DATA again meanwhile. So no crash can leave a DATA entry over freed bytes.
I5  One lock per overlay. `lock` serialises every change (callers hold it around `update`); `flush` takes it
    only to start a generation and to punch, so writes go on while it syncs; flushes run one at a time.
I6  The map fingerprints every block it holds: a rewrite in place names its new bytes' print (in memory
    until the next flush writes it), and `read` checks every block it serves (bytes that changed under the
    map are EIO, never data).
I7  Only marked regions may hold bytes their entries do not name: a region is marked (synced) before a block
    in it gets bytes a durable entry naming others may outlive; the first writable open after an unclean
    stop scrubs the marked regions, and a mismatch anywhere else is damage, never adopted.

Thread-safety contract: `update` is called with `lock` held, and so is `read` (a read checks bytes against
the map, which must not be half way through a write). `flush` and `bytes_written` may be called from any
thread, without `lock`. `scan` before serving; `close` when no other call is in flight.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Protocol

BLOCK_SIZE = 4096

#: Block states, in an overlay's map and in a clone's per-block state.
BASE, DATA, ZEROED = 0, 1, 2

#: One map entry: (block, state).
Change = tuple[int, int]
#: One state change: (block, old state, new state).
Move = tuple[int, int, int]


class Overlay(Protocol):
    """What a clone needs from its overlay. Implementations: MemoryOverlay here, RocksOverlay in _rocks."""

    lock: threading.Lock

    def scan(self) -> Iterator[Change]:
        """Yield (block, DATA or ZEROED) for every map entry, in block order."""
        ...

    def read(self, buf: memoryview, offset: int) -> None:
        """Fill `buf` with the stored bytes at `offset` (any alignment); every block it covers must be DATA."""
        ...

    def update(
        self, bufs: Sequence[bytes | bytearray | memoryview], offset: int, moves: Sequence[Move], *, written: int
    ) -> None:
        """Store whole blocks (the concatenation of `bufs`, at the block-aligned `offset`; none if `bufs` is
        empty), then apply `moves` to the map in one atomic batch, and count `written` bytes. Every block that
        becomes DATA must be among the stored ones. Caller holds `lock`."""
        ...

    def flush(self) -> None:
        """Make every update that returned before this call durable (I3, I4)."""
        ...

    def bytes_written(self) -> int:
        """Total bytes clients have written or zeroed through this overlay (a statistic: the count of
        writes after the last flush may be lost in a crash, the writes' data is not)."""
        ...

    def close(self) -> None: ...


class MemoryOverlay:
    """The reference overlay: dicts, for tests. `durable` is what a power cut would keep after a flush."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
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

    def update(
        self, bufs: Sequence[bytes | bytearray | memoryview], offset: int, moves: Sequence[Move], *, written: int
    ) -> None:
        joined = b"".join(bufs)
        if offset % BLOCK_SIZE or len(joined) % BLOCK_SIZE:
            raise ValueError(f"write of {len(joined)} bytes at {offset} is not in whole blocks")
        for i in range(0, len(joined), BLOCK_SIZE):
            self._data[(offset + i) // BLOCK_SIZE] = joined[i : i + BLOCK_SIZE]
        for block, _, state in moves:
            if state == BASE:
                self._map.pop(block, None)
            else:
                self._map[block] = state
            if state != DATA:
                self._data.pop(block, None)
        self._written += written

    def flush(self) -> None:
        self.durable = dict(self._map)

    def bytes_written(self) -> int:
        return self._written

    def close(self) -> None:
        self.closed = True
