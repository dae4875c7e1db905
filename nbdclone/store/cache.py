"""The shared read cache: the kernel's page cache over the chunk pack, measured, bounded and warmed by us.

    worker 1 ─┐                          ┌─ pack pages held in memory (one copy, whoever read them)
    worker 2 ─┼─ PackReader ── preadv ───┤
    CLI warm ─┘   hit: preadv2(RWF_NOWAIT)└─ the clock (/dev/shm): a byte per chunk slot, shared by every
                  miss: preadv (the GIL       process: ACCESSED (the supervisor's CLOCK hand evicts
                  released while the disk     unreferenced chunks, fadvise DONTNEED, past --cache-size) and
                  works)                      VERIFIED (its bytes matched their digest since they were
                                              last read in from the disk: each chunk is checked once per
                                              host, not once per worker)

Why the page cache: chunks are stored once by content, so a block that two versions (or a thousand clones)
share is one slot of one file, cached once and still hot after a flip. The kernel already shares those
pages between processes and makes concurrent misses of one page wait for a single read. What it does not
give, we add: hit/miss counters (preadv2 with RWF_NOWAIT says whether the data was in memory), a bound
(--cache-size, enforced by a CLOCK sweep over the shared access bytes), and prefetch (boot traces).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import mmap
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mmh3

from nbdclone import errors
from nbdclone.store._fs import runs
from nbdclone.store.remote import Fetch

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
_SHIFT = 16
_HEADER = 8  # cache.clock starts with a byte that counts eviction passes, then padding
#: The bits of a slot's byte in the clock. VERIFIED is set by a reader once the chunk matched its digest, and
#: cleared with the rest of the byte when the chunk's pages are dropped (Evictor) or its slot gets another
#: chunk (ChunkStore): a chunk read back from the disk is checked again. ACCESSED is the CLOCK's bit.
ACCESSED, VERIFIED = 1, 2
_SEEN = ACCESSED | VERIFIED  # what a read leaves: it reads only chunks checked already
_KEEP_VERIFIED = bytes(b & VERIFIED for b in range(256))  # the hand's pass: accessed bits cleared
PAGE = mmap.PAGESIZE
_LOAD_CHUNKS = 32  # a prefetch reads up to this many chunks (2 MiB) at a time


def digest(data: bytes | bytearray | memoryview) -> bytes:
    """The 128-bit content key of a chunk. Tests replace chunks.digest to force collisions; this one is
    what the pack is checked against."""
    return bytes(mmh3.mmh3_x64_128_digest(data))


@dataclass(slots=True)
class CacheStats:
    hits: int = 0
    misses: int = 0
    hit_bytes: int = 0
    miss_bytes: int = 0
    prefetched_bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class PackReader:
    """Reads of the chunk pack for one process, shared by every base version the process serves.

    Every read is a system call (preadv2 with RWF_NOWAIT first, to count hits): the pack is never mapped
    into the process, so a pack cut short under a running server is an EIO for the clones that read past
    its end, not a SIGBUS that kills the worker. A chunk is checked against its content digest before it
    is first served (`verify`), and again after its pages were dropped or its slot reused: bytes changed on
    disk are refused, never served. `marks` holds the VERIFIED bits: the clock's bytes, shared by the host's
    workers (one check per host), or without a clock this process's own."""

    def __init__(self, pack: Path, clock: Path | None = None, fetch: Fetch | None = None) -> None:
        self.pack = pack
        self.fetch = fetch  # a fleet host's: fills slots staged but not fetched yet (remote.py)
        self.clock_path = clock
        self.fd = os.open(pack, os.O_RDONLY | os.O_CLOEXEC)
        self.stats = CacheStats()
        self._lock = threading.Lock()
        self._slots = 0
        self._clock: mmap.mmap | None = None
        # From _HEADER on, a byte per slot (ACCESSED, VERIFIED): the clock, or this process's own bytes.
        self.marks: mmap.mmap | bytearray = bytearray(_HEADER)
        # preadv2(RWF_NOWAIT) says whether a read was served from memory; tmpfs, FUSE and NFS do not take
        # the flag (EOPNOTSUPP). There every read counts as a miss, and is a plain preadv.
        self._nowait = os.RWF_NOWAIT

    def ensure(self, nslots: int) -> None:
        """Track at least `nslots` slots of the pack (it grows as versions are imported)."""
        with self._lock:
            if nslots <= self._slots:
                return
            self._slots = nslots
            if self.clock_path is not None:
                self._clock = open_clock(self.clock_path, nslots)
            if self._clock is not None:
                self.marks = self._clock
            else:
                own = self.marks if isinstance(self.marks, bytearray) else bytearray(_HEADER)
                own.extend(bytes(_HEADER + nslots - len(own)))
                self.marks = own

    def verify(self, slot: int, key: bytes) -> None:
        """Check chunk `slot` against its content digest `key` (sets its VERIFIED bit if it matches).
        Damage raises Damaged, for the clone that read it; nothing is marked good."""
        self.verify_all([(slot, key)])

    def verify_all(self, pairs: list[tuple[int, bytes]]) -> None:
        """Check each (slot, digest). On a fleet host, the slots that do not match (staged, not fetched
        yet) are fetched in one request and checked again; what still does not match raises Damaged."""
        wrong = [(slot, key) for slot, key in pairs if not self._matches(slot, key)]
        if wrong and self.fetch is not None:
            self.fetch(wrong)
            wrong = [(slot, key) for slot, key in wrong if not self._matches(slot, key)]
        if wrong:
            slot = wrong[0][0]
            log.error("chunk pack %s: chunk %d does not match its digest; it is not served", self.pack, slot)
            raise errors.Damaged(path=self.pack, detail=f"chunk {slot} does not match its digest")

    def _matches(self, slot: int, key: bytes) -> bool:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        got = 0
        while got < CHUNK:
            n = os.preadv(self.fd, [view[got:]], (slot << _SHIFT) + got)
            if n == 0:
                return False  # the pack ends inside it
            got += n
        if digest(buf) != key:
            return False
        marks = self.marks
        marks[_HEADER + slot] |= VERIFIED
        return True

    def verified(self, slot: int) -> bool:
        return bool(self.marks[_HEADER + slot] & VERIFIED)

    def read(self, dst: memoryview, at: int) -> None:
        """Fill `dst` with the pack's bytes at `at` (within tracked slots). The caller has checked the
        chunks (verify where their VERIFIED bit is not set)."""
        first, last = at >> _SHIFT, (at + len(dst) - 1) >> _SHIFT
        marks = self.marks
        if first == last:
            if marks[_HEADER + first] != _SEEN:  # (a store to a shared line only when it changes)
                marks[_HEADER + first] = _SEEN
        else:
            marks[_HEADER + first : _HEADER + last + 1] = bytes((_SEEN,)) * (last + 1 - first)
        n = len(dst)
        got = 0
        if self._nowait:
            try:
                got = os.preadv(self.fd, [dst], at, self._nowait)
            except BlockingIOError:
                pass
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self._nowait = 0
                log.info("%s: no RWF_NOWAIT on its file system; every read counts as a miss", self.pack)
        if got == n:
            self.stats.hits += 1
            self.stats.hit_bytes += n
            return
        self.stats.misses += 1
        self.stats.miss_bytes += n - got
        while got < n:  # the GIL is released while the disk works
            more = os.preadv(self.fd, [dst[got:]], at + got)
            if more == 0:
                raise errors.Damaged(path=self.pack, detail=f"it ends at {at + got}, inside data a version holds")
            got += more

    def prefetch(self, ranges: list[tuple[int, int]]) -> int:
        """Ask the kernel to read (slot, count) ranges into memory now, without waiting. Returns bytes."""
        total = 0
        for slot, count in ranges:
            os.posix_fadvise(self.fd, slot << _SHIFT, count << _SHIFT, os.POSIX_FADV_WILLNEED)
            total += count << _SHIFT
        self.stats.prefetched_bytes += total
        return total

    def load(self, ranges: list[tuple[int, int]]) -> int:
        """Read (slot, count) ranges into memory, in order, and wait until they are there. Returns bytes.

        All of them are asked for first, without waiting (the disk gets a deep queue instead of one 64 KiB
        read at a time); the ordered reads then wait for each range in the order a boot wants them."""
        buf = memoryview(bytearray(_LOAD_CHUNKS * CHUNK))
        total = 0
        try:
            for slot, count in ranges:
                os.posix_fadvise(self.fd, slot << _SHIFT, count << _SHIFT, os.POSIX_FADV_WILLNEED)
            for slot, count in ranges:  # a read per range, of at most _LOAD_CHUNKS (a boot trace: 2.6 per range)
                for s in range(slot, slot + count, _LOAD_CHUNKS):
                    n = min(_LOAD_CHUNKS, slot + count - s)
                    total += os.preadv(self.fd, [buf[: n * CHUNK]], s << _SHIFT)
        except OSError as exc:  # the reader was closed under a background prefetch: stop quietly
            log.debug("prefetch stopped: %s", exc)
        self.stats.prefetched_bytes += total
        return total

    def close(self) -> None:
        os.close(self.fd)


def forget_verified(clock: Path, slots: Iterable[int]) -> None:
    """Clear the bytes of `slots` in the clock at `clock` (if there is one): they get other chunks, which
    must be checked before they are served."""
    try:
        fd = os.open(clock, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return  # no server runs (the clock goes with it), or no clock: nothing marks the slots
    try:
        if os.fstat(fd).st_uid != os.geteuid():
            return
        size = os.fstat(fd).st_size
        for start, count in runs(sorted(slots)):
            if _HEADER + start < size:
                os.pwrite(fd, bytes(min(count, size - _HEADER - start)), _HEADER + start)
    finally:
        os.close(fd)


def open_clock(path: Path, nslots: int) -> mmap.mmap | None:
    """The shared access bytes, grown to cover `nslots` slots, or None where they cannot be (no space).

    The file's blocks are allocated before it is mapped: a store of a sparse shared mapping whose page
    needs a block on a full disk kills the process with SIGBUS instead of failing a system call."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        log.warning("cache access bytes %s unavailable (%s): the cache bound is not enforced", path, exc)
        return None
    try:
        if os.fstat(fd).st_uid != os.geteuid():  # /dev/shm is everyone's: someone else's file is not ours
            log.warning("cache access bytes %s belong to another user: the cache bound is not enforced", path)
            return None
        want = _HEADER + nslots
        os.posix_fallocate(fd, 0, want)
        return mmap.mmap(fd, want)
    except OSError as exc:
        log.warning("cache access bytes %s unavailable (%s): the cache bound is not enforced", path, exc)
        return None
    finally:
        os.close(fd)


# -- residency and eviction (the supervisor and `nbdclone stats`) -------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


def resident_pages(pack: Path) -> bytes:
    """One byte per page of the pack: bit 0 set where the page is in memory (mincore)."""
    try:
        fd = os.open(pack, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return b""
    try:
        size = os.fstat(fd).st_size
        if not size:
            return b""
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap of the chunk pack failed")
        try:
            vec = ctypes.create_string_buffer(-(-size // PAGE))
            if _libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
            return vec.raw
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


_RESIDENT_BIT = bytes(i & 1 for i in range(256))  # mincore's byte per page: bit 0 says "in memory"


def count_resident(pages: bytes) -> int:
    """Bytes in memory, from `resident_pages` (done in C: a Python loop over a 2 GiB pack's 512k pages took
    a few percent of a core every second)."""
    return pages.translate(_RESIDENT_BIT).count(1) * PAGE


def resident_bytes(pack: Path) -> int:
    return count_resident(resident_pages(pack))


_REMEASURE = 10.0  # seconds between residency scans of a pack that fits the limit whole


class Evictor:
    """Keeps the pack's pages in memory under `limit` bytes with a CLOCK sweep over the shared access bytes:
    a region read since the hand last passed gets a second chance; one that was not is dropped.

    The unit is a 2 MiB region (32 chunks), not a chunk: the page cache holds files in folios of up to
    2 MiB, and the kernel drops only folios a DONTNEED range covers whole (measured: per-chunk DONTNEED left
    most of the pack in memory)."""

    REGION = 32  # chunks

    def __init__(self, pack: Path, clock: Path, limit: int) -> None:
        self.pack, self.clock_path, self.limit = pack, clock, limit
        self.hand = 0
        self.evictions = 0
        self.evicted_bytes = 0
        self._resident, self._measured = 0, -_REMEASURE

    def run_once(self) -> int:
        try:
            whole = self.pack.stat().st_size
        except FileNotFoundError:
            whole = 0
        if whole <= self.limit and time.monotonic() - self._measured < _REMEASURE:
            # All of the pack fits: nothing to evict, and the resident count is a statistic (the mincore
            # scan of a large pack costs a few percent of a core).
            return self._resident
        pages = resident_pages(self.pack)
        resident = count_resident(pages)
        self._resident, self._measured = resident, time.monotonic()
        if resident <= self.limit:
            return resident
        per_region = self.REGION * CHUNK // PAGE
        nregions = -(-len(pages) // per_region)
        clock = open_clock(self.clock_path, nregions * self.REGION)
        if clock is None:
            return resident
        fd = os.open(self.pack, os.O_RDONLY | os.O_CLOEXEC)
        try:
            target = int(self.limit * 0.9)
            for _ in range(2 * nregions):  # at most two turns: the first may only clear access bytes
                if resident <= target:
                    break
                region = self.hand
                self.hand = (self.hand + 1) % nregions
                held = count_resident(pages[region * per_region : (region + 1) * per_region])
                if not held:
                    continue
                first = _HEADER + region * self.REGION
                marks = clock[first : first + self.REGION]
                if any(b & ACCESSED for b in marks):  # a second chance: the accessed bits go, VERIFIED stays
                    clock[first : first + self.REGION] = marks.translate(_KEEP_VERIFIED)
                    continue
                # Not VERIFIED before the pages go: what is read back in from the disk is checked again.
                clock[first : first + self.REGION] = bytes(self.REGION)
                os.posix_fadvise(fd, region * self.REGION * CHUNK, self.REGION * CHUNK, os.POSIX_FADV_DONTNEED)
                resident -= held
                self.evictions += 1
                self.evicted_bytes += held
            clock[0] = (clock[0] + 1) % 256  # a pass: its count, for tests and tools
        finally:
            os.close(fd)
            clock.close()
        return resident
