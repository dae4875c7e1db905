"""Base versions stored once, by content.

    version map (one per version, in memory while served)      chunk store (one per store)
    chunk index -> slot                                          chunks/pack: slot s at offset s * CHUNK
      0 -> 17                                                    +----+----+----+----+----+----+
      1 -> ZERO_SLOT   (all zeros: no space)                     |    |    |... | 17 |    |    |
      2 -> 18          (slots of one import are consecutive,     +----+----+----+----+----+----+
                        so a long read is one pread)

A version is a flat map, never a chain: reading version 100 costs what reading version 1 does. Chunks are
keyed by a 128-bit mmh3 digest, and the bytes are compared before a chunk is shared, so a digest collision
can only cost space, never mix data. A slot that no version references is free: gc punches it out of the
pack (the store shrinks) and a later import fills it again. Slots written by an import that crashed before
its version was committed are unreferenced, so they are simply free.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import struct
import time
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import mmh3

from nbdclone.errors import StorageError
from nbdclone.store._fs import punch_hole, runs
from nbdclone.store.base import Extent
from nbdclone.store.cache import PackReader

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
_SHIFT = 16
_MASK = CHUNK - 1
ZERO_SLOT = -1
_ZERO_CHUNK = bytes(CHUNK)
_MAP_MAGIC = b"NBDCLMAP"
_MAP_HEADER = struct.Struct("<8sQQ")  # magic, size, number of chunks


def digest(data: bytes | memoryview) -> bytes:
    """The 128-bit content key of a chunk. Tests replace this to force collisions."""
    return bytes(mmh3.mmh3_x64_128_digest(data))


@dataclass(frozen=True, slots=True)
class VersionMap:
    """The chunks of one base version: slots[i] holds chunk i (ZERO_SLOT for an all-zero chunk)."""

    size: int
    slots: array[int]
    digests: bytes  # 16 bytes per chunk, zeros for ZERO_SLOT chunks

    @property
    def nchunks(self) -> int:
        return len(self.slots)

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(_MAP_HEADER.pack(_MAP_MAGIC, self.size, self.nchunks))
            f.write(self.slots.tobytes())
            f.write(self.digests)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)

    @classmethod
    def load(cls, path: Path) -> VersionMap:
        raw = path.read_bytes()
        magic, size, n = _MAP_HEADER.unpack_from(raw)
        if magic != _MAP_MAGIC or len(raw) != _MAP_HEADER.size + n * 24:
            raise StorageError(errno.EIO, what=f"version map {path}", detail="corrupt")
        slots = array("q")
        slots.frombytes(raw[_MAP_HEADER.size : _MAP_HEADER.size + 8 * n])
        return cls(size, slots, raw[_MAP_HEADER.size + 8 * n :])

    def used_slots(self) -> set[int]:
        return set(self.slots) - {ZERO_SLOT}


class ChunkStore:
    """The pack file and the lock that serialises writers (imports and gc). Readers take no lock: a slot
    is never rewritten while a committed version references it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pack = root / "pack"

    @contextlib.contextmanager
    def writer(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def import_chunks(
        self,
        chunks: Iterable[tuple[int, bytes | None]],
        size: int,
        existing: Iterable[VersionMap],
        progress: Callable[[int], None] = lambda n: None,
    ) -> tuple[VersionMap, int]:
        """Store `chunks` ((index, data or None for all-zero), in order), sharing what `existing` versions
        hold. Returns the new version's map and how many chunks it had to write. Caller holds writer()."""
        index: dict[bytes, list[int]] = {}
        used: set[int] = set()
        for vm in existing:
            for i, slot in enumerate(vm.slots):
                if slot != ZERO_SLOT:
                    index.setdefault(vm.digests[16 * i : 16 * i + 16], []).append(slot)
                    used.add(slot)
        for candidates in index.values():
            candidates[:] = sorted(set(candidates))
        nslots = self.nslots()
        free = sorted(set(range(nslots)) - used, reverse=True)
        n = -(-size // CHUNK)
        slots = array("q", [ZERO_SLOT]) * n
        digests = bytearray(16 * n)
        written = 0
        fd = os.open(self.pack, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            for i, data in chunks:
                progress(i)
                if data is None or data == _ZERO_CHUNK[: len(data)]:
                    continue
                if len(data) < CHUNK:
                    data = data + bytes(CHUNK - len(data))
                key = digest(data)
                digests[16 * i : 16 * i + 16] = key
                found = self._find(fd, index.get(key, ()), data)
                if found is not None:
                    slot = found
                else:
                    slot = free.pop() if free else nslots
                    nslots = max(nslots, slot + 1)
                    _pwrite_all(fd, data, slot * CHUNK)
                    index.setdefault(key, []).append(slot)
                    written += 1
                slots[i] = slot
            os.fsync(fd)
        finally:
            os.close(fd)
        return VersionMap(size, slots, bytes(digests)), written

    def _find(self, fd: int, candidates: Iterable[int], data: bytes) -> int | None:
        """A slot whose bytes equal `data`; the digest only nominates candidates."""
        for slot in candidates:
            if os.pread(fd, CHUNK, slot * CHUNK) == data:
                return slot
        return None

    def nslots(self) -> int:
        try:
            return -(-self.pack.stat().st_size // CHUNK)
        except FileNotFoundError:
            return 0

    def release_unused(self, live: Iterable[VersionMap]) -> int:
        """Punch every slot no live version references out of the pack. Returns the bytes freed. Caller
        holds writer() and has already removed the dead versions from the catalog."""
        used: set[int] = set()
        for vm in live:
            used |= vm.used_slots()
        nslots = self.nslots()
        if not nslots:
            return 0
        fd = os.open(self.pack, os.O_RDWR | os.O_CLOEXEC)
        freed = 0
        try:
            before = os.fstat(fd).st_blocks * 512
            last_used = max(used, default=-1)
            if last_used + 1 < nslots:
                os.ftruncate(fd, (last_used + 1) * CHUNK)
            for run_start, run_len in runs(sorted(set(range(last_used + 1)) - used)):
                punch_hole(fd, run_start * CHUNK, run_len * CHUNK, what="the chunk pack")
            os.fsync(fd)
            freed = before - os.fstat(fd).st_blocks * 512
        finally:
            os.close(fd)
        return freed


class ChunkedBase:
    """A base version as clones read it: the pack read through the version's chunk map and the process's
    PackReader (the shared cache). Optionally records a boot trace: the chunks read first, in order."""

    def __init__(self, pack: Path, vmap: VersionMap, reader: PackReader | None = None) -> None:
        self.size = vmap.size
        self.map = vmap
        self._slots = vmap.slots
        self._own_reader = reader is None
        used = vmap.used_slots()
        if reader is None and used:
            reader = PackReader(pack)
        self._reader = reader
        if reader is not None and used:
            reader.ensure(max(used) + 1)
        self.recorder: TraceRecorder | None = None

    def pread_into(self, buf: memoryview, offset: int) -> None:
        end = offset + len(buf)
        slots = self._slots
        i = offset >> _SHIFT
        recorder = self.recorder
        if recorder is not None:
            recorder.add(range(i, ((end - 1) >> _SHIFT) + 1))
            if recorder.done:  # off the hot path for the rest of the version's life
                self.recorder = None
        if end <= (i + 1) << _SHIFT and i < len(slots) and slots[i] >= 0:
            # The hot path: inside one stored chunk.
            self._reader.read(buf, (slots[i] << _SHIFT) + (offset & _MASK))  # type: ignore[union-attr]
            return
        pos = offset
        while pos < end:
            i = pos // CHUNK
            slot = slots[i] if i < len(slots) else ZERO_SLOT
            # Extend the run while the next chunk sits in the next slot (or is zero, with zeros).
            j = i + 1
            stop = min(end, (i + 1) * CHUNK)
            while (
                stop < end
                and j < len(slots)
                and (slots[j] == ZERO_SLOT if slot == ZERO_SLOT else slots[j] == slot + (j - i))
            ):
                j += 1
                stop = min(end, j * CHUNK)
            dst = buf[pos - offset : stop - offset]
            if slot == ZERO_SLOT:
                dst[:] = bytes(len(dst))
            else:
                self._reader.read(dst, slot * CHUNK + (pos - i * CHUNK))  # type: ignore[union-attr]
            pos = stop

    def slot_ranges(self, chunks: Iterable[int], *, ordered: bool = False) -> list[tuple[int, int]]:
        """The (first slot, count) runs that hold `chunks` (zero chunks have none): sorted by slot, or, if
        `ordered`, in the order of `chunks` (a boot trace), merging only slots that follow each other."""
        seen: set[int] = set()
        slots = []
        for i in chunks:
            if i < len(self._slots) and self._slots[i] != ZERO_SLOT and self._slots[i] not in seen:
                seen.add(self._slots[i])
                slots.append(self._slots[i])
        return list(runs(slots if ordered else sorted(slots)))

    def extents(self, offset: int, length: int) -> list[Extent]:
        out: list[Extent] = []
        end = offset + length
        pos = offset
        while pos < end:
            i = pos // CHUNK
            zero = i >= len(self._slots) or self._slots[i] == ZERO_SLOT
            stop = min(end, (i + 1) * CHUNK)
            if out and out[-1].zero == zero:
                out[-1] = Extent(out[-1].offset, stop - out[-1].offset, zero)
            else:
                out.append(Extent(pos, stop - pos, zero))
            pos = stop
        return out

    def zero_bitmap(self, first_block: int, nblocks: int, block_size: int) -> bytes:
        """One byte per block of the range: 1 where the block is in an all-zero chunk (or past the end)."""
        per = CHUNK // block_size
        first_chunk, stop_chunk = first_block // per, -(-(first_block + nblocks) // per)
        slots = self._slots
        out = bytearray(b"\x01" * ((stop_chunk - first_chunk) * per))
        data = b"\x00" * per
        for i in range(first_chunk, min(stop_chunk, len(slots))):
            if slots[i] != ZERO_SLOT:
                out[(i - first_chunk) * per : (i - first_chunk + 1) * per] = data
        skip = first_block - first_chunk * per
        return bytes(out[skip : skip + nblocks])

    def prefetch(self, offset: int, length: int) -> None:
        if self._reader is not None:
            self._reader.prefetch(self.slot_ranges(range(offset >> _SHIFT, ((offset + length - 1) >> _SHIFT) + 1)))

    def close(self) -> None:
        if self.recorder is not None:
            self.recorder.finish()
        if self._own_reader and self._reader is not None:
            self._reader.close()
            self._reader = None


class TraceRecorder:
    """The chunks a version's first boot reads, in first-read order, for `seconds` or up to `limit` bytes;
    then written beside the version (the first recording wins), for prefetching later boots."""

    #: A recording smaller than this is not a boot (a probe such as nbdinfo's): it is dropped, and the
    #: version's next first connection records again.
    MIN_CHUNKS = 16

    def __init__(self, path: Path, seconds: float = 30.0, limit: int = 512 << 20) -> None:
        self.path = path
        self._deadline = time.monotonic() + seconds
        self._max = limit // CHUNK
        self._seen: set[int] = set()
        self._order = array("I")
        self.done = False

    def add(self, chunks: Iterable[int]) -> None:
        if self.done:
            return
        for c in chunks:
            if c not in self._seen:
                self._seen.add(c)
                self._order.append(c)
        if len(self._order) >= self._max or time.monotonic() > self._deadline:
            self.finish()

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        if len(self._order) < self.MIN_CHUNKS:
            return
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(self._order.tobytes())
        try:
            os.link(tmp, self.path)  # never replaces a trace another worker finished first
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        log.info("recorded a boot trace of %d chunks: %s", len(self._order), self.path)


def load_trace(path: Path) -> array[int]:
    trace = array("I")
    try:
        trace.frombytes(path.read_bytes())
    except FileNotFoundError:
        pass
    return trace


def _pwrite_all(fd: int, data: bytes, at: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, at)
        view, at = view[n:], at + n
