"""File-system helpers the store shares: finding data and holes, punching holes, runs of numbers."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

from nbdclone.errors import StorageError

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FS_IOC_FIEMAP = 0xC020660B
_FIEMAP_FLAG_SYNC = 0x1
_FIEMAP_EXTENT_LAST = 0x1
_FIEMAP_EXTENT_UNWRITTEN = 0x800
_FIEMAP_HEAD = struct.Struct("=QQIIII")  # start, length, flags, mapped extents, extent count, reserved
_FIEMAP_EXTENT = struct.Struct("=QQQ16xI12x")  # logical, physical, length, flags
_FIEMAP_BATCH = 512
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def punch_hole(fd: int, offset: int, length: int, *, what: str) -> None:
    """Free the disk space of [offset, offset + length) of `what` without changing the file's size."""
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise StorageError(err, what=f"punching a hole in {what}", detail=os.strerror(err))


def preallocate(fd: int, offset: int, length: int) -> bool:
    """Reserve disk space for [offset, offset + length) as unwritten extents, which read as zeros and hold
    no data, keeping any data there. The file grows to cover the range (FIEMAP does not report extents
    past the end of a file). Writing into reserved space skips the file system's block allocation
    (measured here: a 4 KiB pwrite into a fresh sparse file 5.5-6.8 us, into reserved space 3.0-3.9 us).
    False where the space cannot be reserved (no space left, or the file system cannot)."""
    return bool(_libc.fallocate(fd, 0, offset, length) == 0)


def extents(fd: int, *, sync: bool = True) -> Iterator[tuple[int, int, bool]]:
    """(start, end, unwritten) of each allocated extent of the file (FIEMAP), after writing its dirty
    pages back if `sync`: then an unwritten extent holds nothing that was ever written, whatever the page
    cache holds (SEEK_DATA reports cached pages of unwritten extents as data, including pages that were only
    read). A file with no unwritten extents needs no write-back: blocks not yet allocated are reported as
    (delayed-allocation) extents. Raises OSError(EOPNOTSUPP) where the file system has no FIEMAP (tmpfs)."""
    start, flags = 0, _FIEMAP_FLAG_SYNC if sync else 0
    while True:
        buf = bytearray(_FIEMAP_HEAD.size + _FIEMAP_EXTENT.size * _FIEMAP_BATCH)
        _FIEMAP_HEAD.pack_into(buf, 0, start, (1 << 64) - 1 - start, flags, 0, _FIEMAP_BATCH, 0)
        fcntl.ioctl(fd, _FS_IOC_FIEMAP, buf)
        mapped = _FIEMAP_HEAD.unpack_from(buf)[3]
        if not mapped:
            return
        for i in range(mapped):
            logical, _, length, eflags = _FIEMAP_EXTENT.unpack_from(buf, _FIEMAP_HEAD.size + i * _FIEMAP_EXTENT.size)
            yield logical, logical + length, bool(eflags & _FIEMAP_EXTENT_UNWRITTEN)
            if eflags & _FIEMAP_EXTENT_LAST:
                return
        start, flags = logical + length, 0


def has_extent_map(fd: int) -> bool:
    """Whether `extents` works on this file's file system."""
    buf = bytearray(_FIEMAP_HEAD.size)
    _FIEMAP_HEAD.pack_into(buf, 0, 0, 1, 0, 0, 0, 0)
    try:
        fcntl.ioctl(fd, _FS_IOC_FIEMAP, buf)
    except OSError:
        return False
    return True


def runs(sorted_numbers: Iterable[int]) -> Iterator[tuple[int, int]]:
    """(start, length) of each run of consecutive numbers."""
    start = prev = None
    for n in sorted_numbers:
        if prev is not None and n == prev + 1:
            prev = n
            continue
        if start is not None and prev is not None:
            yield start, prev - start + 1
        start = prev = n
    if start is not None and prev is not None:
        yield start, prev - start + 1


def data_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each range of the file below `size` that holds data (SEEK_DATA / SEEK_HOLE)."""
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos
                return
            raise
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        yield data, min(hole, size)
        pos = hole
