"""File-system helpers the store shares: syncing a directory, punching holes, runs of numbers, and the data
ranges of a source image (SEEK_DATA; never used for an overlay, whose map is its own: overlay I1)."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from nbdclone.errors import StorageError

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
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
            if exc.errno == errno.EINVAL and pos == 0:  # a block device: no holes to find, all of it is read
                yield 0, size
                return
            raise
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        yield data, min(hole, size)
        pos = hole
