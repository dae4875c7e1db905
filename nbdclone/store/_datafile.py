"""An overlay's data file: a sparse file laid out like the disk, holding the bytes of the clone's DATA blocks.

It is only ever addressed through the block map (overlay invariant I1): what the file system says about the
file's extents or holes is never asked, so the file works the same on ext4, XFS, btrfs, tmpfs, FUSE or NFS.
Hole punching only gives space back; where the file system cannot punch, the space stays (probed once).
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from nbdclone.errors import StorageError
from nbdclone.store._fs import punch_hole, runs

log = logging.getLogger(__name__)

NAME = "blocks"  # a name RocksDB does not parse as one of its own files, so it never deletes it


class DataFile:
    def __init__(self, path: Path, block_size: int, *, readonly: bool) -> None:
        self.path = path
        self.block_size = block_size
        self.readonly = readonly
        self.fd = -1
        self.can_punch = True
        flags = os.O_RDONLY if readonly else os.O_RDWR | os.O_CREAT
        try:
            self.fd = os.open(path, flags | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            if not readonly:
                raise
        except OSError as exc:
            raise self._error(exc, "opening") from exc

    def _error(self, exc: OSError, doing: str) -> StorageError:
        return StorageError(exc.errno or errno.EIO, what=f"{doing} {self.path}", detail=exc.strerror or str(exc))

    def read(self, buf: memoryview, offset: int) -> None:
        if self.fd < 0:
            raise StorageError(errno.EIO, what=f"reading {self.path}", detail="the map has data the file lacks")
        try:
            n = os.preadv(self.fd, [buf], offset)
        except OSError as exc:
            raise self._error(exc, "reading") from exc
        if n != len(buf):  # never turn missing bytes into zeros
            raise StorageError(errno.EIO, what=f"reading {self.path}", detail=f"short read at {offset}: {n} bytes")

    def read_block(self, block: int) -> bytes:
        """What the file holds at `block` (zeros past its end): for recovery, which compares, never serves."""
        if self.fd < 0:
            return bytes(self.block_size)
        got = os.pread(self.fd, self.block_size, block * self.block_size)
        return got + bytes(self.block_size - len(got))

    def write(self, bufs: Sequence[bytes | bytearray | memoryview], offset: int, length: int) -> None:
        try:
            n = os.pwritev(self.fd, bufs, offset)
            while n < length:  # a regular file writes all or fails; never let a short count pass
                n += os.pwrite(self.fd, b"".join(bufs)[n:], offset + n)
        except OSError as exc:
            raise self._error(exc, "writing") from exc

    def sync(self) -> None:
        if self.fd < 0:
            return
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            raise self._error(exc, "syncing") from exc

    def size_blocks(self) -> int:
        if self.fd < 0:
            return 0
        return -(-os.fstat(self.fd).st_size // self.block_size)

    def punch(self, blocks: Sequence[int]) -> None:
        """Give back the space of `blocks` (their map entries say they are not DATA, durably: I4)."""
        if not self.can_punch or self.fd < 0:
            return
        for start, count in runs(sorted(blocks)):
            self.punch_range(start, count)

    def punch_range(self, start: int, count: int) -> None:
        if not self.can_punch:
            return
        try:
            punch_hole(self.fd, start * self.block_size, count * self.block_size, what=str(self.path))
        except StorageError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            # Only space is at stake: the map, not the file, says what the blocks hold.
            self.can_punch = False
            log.info("%s: the file system cannot punch holes; space of dropped blocks stays allocated", self.path)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
