"""The per-clone overlay: a durable map from block index to that block's bytes.

An overlay holds only what a clone changed. Each entry is one of:

    block -> BLOCK_SIZE bytes   the clone wrote this block
    block -> ZERO (b"")         the clone zeroed this block; it reads as zeros, whatever the base holds
    (no entry)                  the block reads from the base

A batch of changes (one NBD request) is applied atomically. `sync=True` returns only once that batch and
every batch applied before it are on stable storage; `flush()` does the same without a batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

BLOCK_SIZE = 4096
ZERO = b""

#: One change: (block, data). data is BLOCK_SIZE bytes, ZERO, or None to drop the entry.
Change = tuple[int, "bytes | None"]


class Overlay(Protocol):
    """What a clone needs from its overlay. Implementations: MemoryOverlay here, RocksOverlay in _rocks."""

    def scan(self) -> Iterator[tuple[int, bool]]:
        """Yield (block, is_zero) for every entry, in block order."""
        ...

    def get(self, blocks: Sequence[int]) -> list[bytes]:
        """Return the stored values of `blocks`, which must all have entries."""
        ...

    def apply(self, changes: Sequence[Change], *, written: int = 0, sync: bool = False) -> None:
        """Apply `changes` atomically and add `written` to the bytes-written counter."""
        ...

    def flush(self) -> None:
        """Make every change applied so far durable."""
        ...

    def bytes_written(self) -> int:
        """Total bytes clients have written or zeroed through this overlay."""
        ...

    def close(self) -> None: ...


class MemoryOverlay:
    """The reference overlay: a dict, for tests. `flush` snapshots what a crash would keep."""

    def __init__(self) -> None:
        self._blocks: dict[int, bytes] = {}
        self._written = 0
        self.durable: dict[int, bytes] = {}
        self.closed = False

    def scan(self) -> Iterator[tuple[int, bool]]:
        for block in sorted(self._blocks):
            yield block, self._blocks[block] == ZERO

    def get(self, blocks: Sequence[int]) -> list[bytes]:
        return [self._blocks[b] for b in blocks]

    def apply(self, changes: Sequence[Change], *, written: int = 0, sync: bool = False) -> None:
        for block, data in changes:
            if data is None:
                self._blocks.pop(block, None)
            else:
                self._blocks[block] = bytes(data)
        self._written += written
        if sync:
            self.flush()

    def flush(self) -> None:
        self.durable = dict(self._blocks)

    def bytes_written(self) -> int:
        return self._written

    def close(self) -> None:
        self.closed = True
