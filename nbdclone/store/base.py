"""Read-only base images.

A base is a raw, sparse file that nothing writes after import. Its holes are found once, at open
(SEEK_DATA/SEEK_HOLE), and kept as a sorted list of data ranges, so extents and "is this block known zero"
cost no I/O. Reads are a single os.preadv into the caller's buffer.
"""

from __future__ import annotations

import bisect
import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from nbdclone.errors import ShortRead, StorageError
from nbdclone.store._fs import data_ranges


@dataclass(frozen=True, slots=True)
class Extent:
    offset: int
    length: int
    zero: bool


class Base(Protocol):
    """What a clone reads through: a base image file, or all zeros for a blank clone."""

    size: int

    def pread_into(self, buf: memoryview, offset: int) -> None: ...

    def extents(self, offset: int, length: int) -> list[Extent]: ...

    def zero_bitmap(self, first_block: int, nblocks: int, block_size: int) -> bytes: ...

    def prefetch(self, offset: int, length: int) -> None: ...

    def close(self) -> None: ...


class BaseImage:
    """A raw base image file opened read-only."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise StorageError(exc.errno or errno.EIO, what=f"opening base {path}", detail=exc.strerror) from exc
        self.size = os.lseek(self._fd, 0, os.SEEK_END)  # a block device's size too (its st_size is 0)
        ranges = list(data_ranges(self._fd, self.size))
        self._starts, self._ends = [r[0] for r in ranges], [r[1] for r in ranges]

    def pread_into(self, buf: memoryview, offset: int) -> None:
        """Fill `buf` exactly with the bytes at `offset`; past the end of the file reads as zeros."""
        want = len(buf)
        got = 0
        while got < want:
            n = os.preadv(self._fd, [buf[got:]], offset + got)
            if n == 0:
                if offset + got >= self.size:
                    buf[got:] = bytes(want - got)
                    return
                raise ShortRead(path=self.path, wanted=want, offset=offset, got=got)
            got += n

    def data_ranges(self) -> list[tuple[int, int]]:
        """The (start, end) byte ranges that are not holes, in order."""
        return list(zip(self._starts, self._ends, strict=True))

    def extents(self, offset: int, length: int) -> list[Extent]:
        """Data and zero (hole) extents covering [offset, offset + length)."""
        end = offset + length
        out: list[Extent] = []
        pos = offset
        i = bisect.bisect_right(self._ends, pos)
        while pos < end:
            if i < len(self._starts) and self._starts[i] <= pos:
                stop = min(self._ends[i], end)
                out.append(Extent(pos, stop - pos, False))
                i += 1
            else:
                stop = min(self._starts[i] if i < len(self._starts) else end, end)
                out.append(Extent(pos, stop - pos, True))
            pos = stop
        return out

    def zero_bitmap(self, first_block: int, nblocks: int, block_size: int) -> bytes:
        """One byte per block of [first_block, first_block + nblocks): 1 where the base block is a hole."""
        mask = bytearray(nblocks)
        start = first_block * block_size
        for ext in self.extents(start, nblocks * block_size):
            if ext.zero:
                lo = -(-(ext.offset - start) // block_size)
                hi = (ext.offset + ext.length - start) // block_size
                if hi > lo:
                    mask[lo:hi] = b"\x01" * (hi - lo)
        return bytes(mask)

    def prefetch(self, offset: int, length: int) -> None:
        os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        os.close(self._fd)


class ZeroBase:
    """The base of a blank clone: every byte reads as zero."""

    def __init__(self, size: int) -> None:
        self.size = size

    def pread_into(self, buf: memoryview, offset: int) -> None:
        buf[:] = bytes(len(buf))

    def extents(self, offset: int, length: int) -> list[Extent]:
        return [Extent(offset, length, True)]

    def zero_bitmap(self, first_block: int, nblocks: int, block_size: int) -> bytes:
        return b"\x01" * nblocks

    def prefetch(self, offset: int, length: int) -> None:
        pass

    def close(self) -> None:
        pass
