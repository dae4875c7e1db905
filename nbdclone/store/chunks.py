"""Base versions stored once, by content.

    version map (one per version, in memory while served)      chunk store (one per store)
    chunk index -> slot                                          chunks/pack: slot s at offset s * CHUNK
      0 -> 17                                                    +----+----+----+----+----+----+
      1 -> ZERO_SLOT   (all zeros: no space)                     |    |    |... | 17 |    |    |
      2 -> 18          (slots of one import are consecutive,     +----+----+----+----+----+----+
                        so a long read is one pread)

A version is one map, never a chain: reading version 100 costs what reading version 1 does. The map is
paged (PAGE chunks, 256 MiB of disk, per page) and a page exists only where the version holds data, so a
1 TiB base holding 12 MiB costs a page or two, in memory and on disk, and imports in the time its data
takes (an import reads only the source's data ranges). Chunks are
keyed by a 128-bit mmh3 digest, and the bytes are compared before a chunk is shared, so a digest collision
can only cost space, never mix data. A slot that no version references is free: gc punches it out of the
pack (the store shrinks) and a later import fills it again. Slots written by an import that crashed before
its version was committed are unreferenced, so they are simply free.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import struct
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from nbdclone.errors import Damaged
from nbdclone.store._fs import punch_hole, runs
from nbdclone.store._sealed import seal_bytes, unseal_bytes, unseal_view
from nbdclone.store.base import Extent
from nbdclone.store.cache import _HEADER as _MARKS
from nbdclone.store.cache import VERIFIED, PackReader, digest, forget_verified
from nbdclone.store.remote import Fetch, RemoteSlots, RemoteTable
from nbdclone.store.remote import sha256 as remote_sha256

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
_SHIFT = 16
_MASK = CHUNK - 1
ZERO_SLOT = -1
_ZERO_CHUNK = bytes(CHUNK)
PAGE_SHIFT = 12
PAGE = 1 << PAGE_SHIFT  # chunks per version-map page
PAGE_MASK = PAGE - 1
_FLAT_MAGIC = b"NBDCLMAP"
_MAP_MAGIC = b"NBDCLMP3"  # paged, with an xxh3 footer
_UNSEALED_MAGIC = b"NBDCLMP2"  # paged, as briefly written before maps had a checksum
_MAP_HEADER = struct.Struct("<8sQQ")  # magic, size, number of pages (flat maps: of chunks)
_PAGE_INDEX = struct.Struct("<Q")
_PAGE_BYTES = _PAGE_INDEX.size + 24 * PAGE  # index, slots, digests
_TRACE_MAGIC = b"NBDCTRC1"


@dataclass(frozen=True, slots=True, eq=False)
class VersionMap:
    """The chunks of one base version, paged: a page maps PAGE chunks (256 MiB of disk) and exists only where
    the version holds data, so a map costs what the base holds, not its size (a 1 TiB base with 12 MiB of
    data: one page). `pages[p][k]` is the slot of chunk p * PAGE + k, ZERO_SLOT for an all-zero chunk;
    `digest_pages[p]` holds 16 bytes per chunk of that page (zeros for ZERO_SLOT chunks), loaded only where
    an import needs them (serving never does)."""

    size: int
    pages: dict[int, array[int]] = field(default_factory=dict)
    digest_pages: dict[int, bytearray] | None = field(default_factory=dict)

    @property
    def nchunks(self) -> int:
        return -(-self.size // CHUNK)

    def slot(self, i: int) -> int:
        page = self.pages.get(i >> PAGE_SHIFT)
        return ZERO_SLOT if page is None else page[i & PAGE_MASK]

    def key(self, i: int) -> bytes:
        """The content digest of chunk i (a stored one; the map was loaded with digests)."""
        assert self.digest_pages is not None, "loaded without digests"
        k = 16 * (i & PAGE_MASK)
        return bytes(self.digest_pages[i >> PAGE_SHIFT][k : k + 16])

    def put(self, i: int, slot: int, key: bytes) -> None:
        """Record chunk i (an import's; i below nchunks) as stored in `slot` with digest `key`."""
        p = i >> PAGE_SHIFT
        page = self.pages.get(p)
        if page is None:
            page = self.pages[p] = array("q", [ZERO_SLOT]) * PAGE
            assert self.digest_pages is not None
            self.digest_pages[p] = bytearray(16 * PAGE)
        page[i & PAGE_MASK] = slot
        k = 16 * (i & PAGE_MASK)
        self.digest_pages[p][k : k + 16] = key  # type: ignore[index]

    def clear(self, i: int) -> None:
        """Record chunk i as all zeros."""
        page = self.pages.get(i >> PAGE_SHIFT)
        if page is not None:
            page[i & PAGE_MASK] = ZERO_SLOT
            assert self.digest_pages is not None
            k = 16 * (i & PAGE_MASK)
            self.digest_pages[i >> PAGE_SHIFT][k : k + 16] = bytes(16)

    def derived(self) -> VersionMap:
        """A new map with this one's chunks (loaded with digests): the start of a version made from it."""
        assert self.digest_pages is not None, "loaded without digests"
        return VersionMap(
            self.size,
            {p: array("q", page) for p, page in self.pages.items()},
            {p: bytearray(keys) for p, keys in self.digest_pages.items()},
        )

    def resized(self, size: int) -> VersionMap:
        """A new map of `size` bytes with this one's chunks below it (loaded with digests). Chunks past the
        old end read as zeros; a chunk the new end cuts keeps its bytes past the end (the caller stores it
        again, cut, if they must read as zeros)."""
        copy = self.derived()
        stop = -(-size // CHUNK)
        keep = [p for p in copy.pages if p << PAGE_SHIFT < stop]
        assert copy.digest_pages is not None
        vmap = VersionMap(size, {p: copy.pages[p] for p in keep}, {p: copy.digest_pages[p] for p in keep})
        for i in range(stop, min(((stop >> PAGE_SHIFT) + 1) << PAGE_SHIFT, self.nchunks)):
            vmap.clear(i)
        return vmap

    def stored(self) -> Iterator[tuple[int, int, bytes]]:
        """(chunk, slot, digest) of every chunk that is not all zeros, in chunk order."""
        assert self.digest_pages is not None, "loaded without digests"
        for p in sorted(self.pages):
            page, keys = self.pages[p], self.digest_pages[p]
            for k, slot in enumerate(page):
                if slot != ZERO_SLOT:
                    yield (p << PAGE_SHIFT) + k, slot, bytes(keys[16 * k : 16 * k + 16])

    def used_slots(self) -> set[int]:
        used: set[int] = set()
        for page in self.pages.values():
            used.update(page)
        used.discard(ZERO_SLOT)
        return used

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, VersionMap)
            and self.size == other.size
            and {p: list(s) for p, s in self.pages.items()} == {p: list(s) for p, s in other.pages.items()}
        )

    def save(self, path: Path) -> None:
        """Written once, beside the version, before the catalog names it (fsync, then rename)."""
        assert self.digest_pages is not None, "loaded without digests"
        parts = [_MAP_HEADER.pack(_MAP_MAGIC, self.size, len(self.pages))]
        for p in sorted(self.pages):
            parts += [_PAGE_INDEX.pack(p), self.pages[p].tobytes(), bytes(self.digest_pages[p])]
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(seal_bytes(b"".join(parts)))
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)

    @classmethod
    def load(cls, path: Path, *, digests: bool = False) -> VersionMap:
        """The map at `path`; with `digests`, also each chunk's digest (what an import compares against)."""
        corrupt = Damaged(path=path, detail="it is not a version map of its size")
        raw = path.read_bytes()
        if len(raw) < _MAP_HEADER.size:
            raise corrupt
        magic, size, n = _MAP_HEADER.unpack_from(raw)
        if magic == _FLAT_MAGIC:
            return cls._load_flat(raw[_MAP_HEADER.size :], size, n, corrupt)
        if magic not in (_MAP_MAGIC, _UNSEALED_MAGIC):
            raise corrupt
        view = unseal_view(raw, path) if magic == _MAP_MAGIC else memoryview(raw)
        if len(view) != _MAP_HEADER.size + n * _PAGE_BYTES:
            raise corrupt
        vm = cls(size, {}, {} if digests else None)
        for at in range(_MAP_HEADER.size, len(view), _PAGE_BYTES):
            (p,) = _PAGE_INDEX.unpack_from(view, at)
            if p << PAGE_SHIFT >= vm.nchunks or p in vm.pages:
                raise corrupt
            slots_at = at + _PAGE_INDEX.size
            page = vm.pages[p] = array("q")
            page.frombytes(view[slots_at : slots_at + 8 * PAGE])
            if vm.digest_pages is not None:
                vm.digest_pages[p] = bytearray(view[slots_at + 8 * PAGE : at + _PAGE_BYTES])
        return vm

    @classmethod
    def _load_flat(cls, raw: bytes, size: int, n: int, corrupt: Exception) -> VersionMap:
        """The first format (one slot and digest for every chunk), as stores before paged maps wrote it;
        it has no checksum."""
        if len(raw) != n * 24:
            raise corrupt
        slots = array("q", raw[: 8 * n])
        vm = cls(size)
        for i, slot in enumerate(slots):
            if slot != ZERO_SLOT:
                vm.put(i, slot, raw[8 * n + 16 * i : 8 * n + 16 * i + 16])
        return vm


class ChunkStore:
    """The pack file and the lock that serialises writers (imports and gc). Readers take no lock: a slot
    is never rewritten while a committed version references it."""

    def __init__(self, root: Path, clock: Path | None = None, make_store: Callable[[], None] | None = None) -> None:
        self.root = root
        self._make_store = make_store  # (the store's folder is made, or refused, before chunks/ is made in it)
        self.pack = root / "pack"
        self.clock = clock  # the running server's cache clock: slots given new chunks lose their VERIFIED bit
        self.remote = RemoteSlots(root)  # a fleet host's slots staged but not fetched yet (remote.py)

    @contextlib.contextmanager
    def writer(self) -> Iterator[None]:
        if self._make_store is not None:
            self._make_store()
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
        *,
        start: VersionMap | None = None,
    ) -> tuple[VersionMap, int]:
        """Store `chunks` ((index, data or None for all-zero), in order), sharing what `existing` versions
        hold (loaded with digests). A chunk not given is all zeros, or with `start` (a map of the same size,
        one of `existing`), what it is there. Returns the new version's map and how many chunks it had to
        write. Caller holds writer()."""
        index, _, free, nslots = self._slots(existing)
        vmap = start.derived() if start is not None else VersionMap(size)
        assert vmap.size == size, "a derived version keeps its size"
        written = 0
        renewed: list[int] = []  # slots given new bytes (a slot past the pack's end may have had others once)
        fd = os.open(self.pack, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            for i, data in chunks:
                progress(i)
                if data is None or data == _ZERO_CHUNK[: len(data)]:
                    vmap.clear(i)
                    continue
                if len(data) < CHUNK:
                    data = data + bytes(CHUNK - len(data))
                key = digest(data)
                found = self._find(fd, index.get(key, ()), data)
                if found is not None:
                    slot = found
                else:
                    slot = free.pop() if free else nslots
                    nslots = max(nslots, slot + 1)
                    _pwrite_all(fd, data, slot * CHUNK)
                    index.setdefault(key, []).append(slot)
                    written += 1
                    renewed.append(slot)
                vmap.put(i, slot, key)
            if renewed and self.clock is not None:  # before any version names them
                forget_verified(self.clock, renewed)
            os.fsync(fd)
        finally:
            os.close(fd)
        return vmap, written

    def map_remote(
        self, entries: Iterable[tuple[int, bytes, bytes]], size: int, existing: Iterable[VersionMap]
    ) -> tuple[VersionMap, dict[int, bytes]]:
        """Map a fleet version's chunks ((index, SHA-256, local digest), in order) without their bytes: a
        chunk a slot here holds (its bytes' SHA-256 checked) or will hold (chunks/remote names it) shares
        that slot; every other one gets a free slot, left a hole. Returns the map and the new slots'
        SHA-256s, for chunks/remote. The pack is extended over them (sparse). Caller holds writer() and
        writes chunks/remote, then the map, then the catalog (remote.py, R1)."""
        index, remote, free, nslots = self._slots(existing)
        vmap = VersionMap(size)
        new: dict[int, bytes] = {}
        shared: dict[bytes, int] = {}  # SHA-256 -> the slot this version already gave it
        fd = os.open(self.pack, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            for i, sha, key in entries:
                slot = shared.get(sha)
                if slot is None:
                    slot = next((s for s in index.get(key, ()) if _holds(fd, s, sha, remote)), None)
                if slot is None:
                    slot = free.pop() if free else nslots
                    nslots = max(nslots, slot + 1)
                    new[slot] = sha
                shared[sha] = slot
                vmap.put(i, slot, key)
            if os.fstat(fd).st_size < nslots * CHUNK:
                os.ftruncate(fd, nslots * CHUNK)
                os.fsync(fd)
            if new and self.clock is not None:
                forget_verified(self.clock, new)
        finally:
            os.close(fd)
        return vmap, new

    def _slots(self, existing: Iterable[VersionMap]) -> tuple[dict[bytes, list[int]], RemoteTable, list[int], int]:
        """What a new version is made against: local digest -> slots holding it (ascending), the remote
        table, the free slots (last to use first) and the pack's slot count. A slot chunks/remote names
        is never free (R3)."""
        index: dict[bytes, list[int]] = {}
        used: set[int] = set()
        for vm in existing:
            for _, slot, key in vm.stored():
                index.setdefault(key, []).append(slot)
                used.add(slot)
        for candidates in index.values():
            candidates[:] = sorted(set(candidates))
        remote = self.remote.load()
        used.update(remote)
        nslots = self.nslots()
        return index, remote, sorted(set(range(nslots)) - used, reverse=True), nslots

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
        self.remote.forget(used)  # R3: before a slot is punched or reused
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


def _holds(fd: int, slot: int, sha: bytes, remote: Mapping[int, bytes]) -> bool:
    """Slot `slot` holds, or chunks/remote says it will hold, the chunk of SHA-256 `sha`."""
    if slot in remote:
        return remote[slot] == sha
    return remote_sha256(os.pread(fd, CHUNK, slot * CHUNK)) == sha


class ChunkedBase:
    """A base version as clones read it: the pack read through the version's chunk map and the process's
    PackReader (the shared cache). Optionally records a boot trace: the chunks read first, in order."""

    def __init__(
        self, pack: Path, vmap: VersionMap, reader: PackReader | None = None, fetch: Fetch | None = None
    ) -> None:
        self.size = vmap.size
        self.map = vmap
        self._pages = vmap.pages
        self._own_reader = reader is None
        used = vmap.used_slots()
        if reader is None and used:
            reader = PackReader(pack, fetch=fetch)
        self._reader = reader
        if reader is not None and used:
            if vmap.digest_pages is None:
                raise ValueError("a version is served from a map loaded with its digests (to check chunks)")
            reader.ensure(max(used) + 1)
        self.recorder: TraceRecorder | None = None

    def pread_into(self, buf: memoryview, offset: int) -> None:
        end = offset + len(buf)
        i = offset >> _SHIFT
        recorder = self.recorder
        if recorder is not None:
            recorder.add(range(i, ((end - 1) >> _SHIFT) + 1))
            if recorder.done:  # off the hot path for the rest of the version's life
                self.recorder = None
        page = self._pages.get(i >> PAGE_SHIFT)
        if end <= (i + 1) << _SHIFT and page is not None and (slot := page[i & PAGE_MASK]) >= 0:
            # The hot path: inside one stored chunk.
            reader = self._reader
            assert reader is not None
            if not reader.marks[_MARKS + slot] & VERIFIED:
                reader.verify(slot, self.map.key(i))
            reader.read(buf, (slot << _SHIFT) + (offset & _MASK))
            return
        slot_of = self.map.slot
        pos = offset
        while pos < end:
            i = pos >> _SHIFT
            slot = slot_of(i)
            # Extend the run while the next chunk sits in the next slot (or is zero, with zeros).
            j = i + 1
            stop = min(end, j << _SHIFT)
            while stop < end and slot_of(j) == (ZERO_SLOT if slot == ZERO_SLOT else slot + (j - i)):
                j += 1
                stop = min(end, j << _SHIFT)
            dst = buf[pos - offset : stop - offset]
            if slot == ZERO_SLOT:
                dst[:] = bytes(len(dst))
            else:
                marks = self._reader.marks  # type: ignore[union-attr]
                unchecked = [
                    (slot + k, self.map.key(i + k)) for k in range(j - i) if not marks[_MARKS + slot + k] & VERIFIED
                ]
                if unchecked:
                    self._reader.verify_all(unchecked)  # type: ignore[union-attr]
                self._reader.read(dst, (slot << _SHIFT) + (pos - (i << _SHIFT)))  # type: ignore[union-attr]
            pos = stop

    def slot_ranges(self, chunks: Iterable[int], *, ordered: bool = False) -> list[tuple[int, int]]:
        """The (first slot, count) runs that hold `chunks` (zero chunks have none): sorted by slot, or, if
        `ordered`, in the order of `chunks` (a boot trace), merging only slots that follow each other."""
        seen: set[int] = set()
        slots = []
        for i in chunks:
            slot = self.map.slot(i)
            if slot != ZERO_SLOT and slot not in seen:
                seen.add(slot)
                slots.append(slot)
        return list(runs(slots if ordered else sorted(slots)))

    def _chunk_runs(self, first: int, stop: int) -> Iterator[tuple[int, int, bool]]:
        """(first chunk, end chunk, zero) runs covering chunks [first, stop): a missing page is one run."""
        i = first
        while i < stop:
            page = self._pages.get(i >> PAGE_SHIFT)
            page_end = min(stop, ((i >> PAGE_SHIFT) + 1) << PAGE_SHIFT)
            if page is None:
                yield i, page_end, True
                i = page_end
                continue
            while i < page_end:
                zero = page[i & PAGE_MASK] == ZERO_SLOT
                j = i + 1
                while j < page_end and (page[j & PAGE_MASK] == ZERO_SLOT) == zero:
                    j += 1
                yield i, j, zero
                i = j

    def extents(self, offset: int, length: int) -> list[Extent]:
        out: list[Extent] = []
        end = offset + length
        for first, stop, zero in self._chunk_runs(offset >> _SHIFT, ((end - 1) >> _SHIFT) + 1):
            lo, hi = max(offset, first << _SHIFT), min(end, stop << _SHIFT)
            if out and out[-1].zero == zero:
                out[-1] = Extent(out[-1].offset, hi - out[-1].offset, zero)
            else:
                out.append(Extent(lo, hi - lo, zero))
        return out

    def zero_bitmap(self, first_block: int, nblocks: int, block_size: int) -> bytes:
        """One byte per block of the range: 1 where the block is in an all-zero chunk (or past the end)."""
        per = CHUNK // block_size
        first_chunk, stop_chunk = first_block // per, -(-(first_block + nblocks) // per)
        out = bytearray(b"\x01" * ((stop_chunk - first_chunk) * per))
        for first, stop, zero in self._chunk_runs(first_chunk, stop_chunk):
            if not zero:
                out[(first - first_chunk) * per : (stop - first_chunk) * per] = bytes((stop - first) * per)
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
    then written beside the version (the first recording wins), for prefetching later boots.

    Not every first client boots. A recording is dropped, and the version's next first connection records
    again, when it is
      - too small to be a boot (under MIN_CHUNKS: a probe such as nbdinfo's), or
      - a scan, not a boot: more than SCAN_SHARE of the chunks the version holds, and more than SCAN_MIN
        of them (a client that copies or checks the whole disk; measured: a boot of a 1.5 GiB image read
        57 MiB, a whole-disk read in the same 30 s 410 MiB, which every later connection then prefetched).
    A small image's boot may read most of it: under SCAN_MIN chunks that is kept, and costs little."""

    MIN_CHUNKS = 16
    SCAN_SHARE = 0.5
    SCAN_MIN = (128 << 20) // CHUNK

    def __init__(self, path: Path, seconds: float = 30.0, limit: int = 512 << 20, *, stored: int = 0) -> None:
        self.path = path
        self.stored = stored  # chunks the version holds (0: unknown, no scan rule)
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
        n = len(self._order)
        if n < self.MIN_CHUNKS:
            return
        if self.stored and n > self.SCAN_SHARE * self.stored and n > self.SCAN_MIN:
            log.warning(
                "not keeping a boot trace of %d chunks for %s: its first client read %.0f%% of the version, a "
                "scan rather than a boot; the next first connection records again",
                n,
                self.path,
                100 * n / self.stored,
            )
            return
        write_trace(self.path, self._order)  # never replaces a trace another worker finished first
        log.info("recorded a boot trace of %d chunks: %s", len(self._order), self.path)


def write_trace(path: Path, trace: array[int]) -> bool:
    """Write a trace beside its version unless one is there (the first wins). Returns whether it was."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(seal_bytes(_TRACE_MAGIC + trace.tobytes()))
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def load_trace(path: Path, *, strict: bool = False) -> array[int]:
    """A version's boot trace (empty if it has none). A damaged one is a hint lost, not an error: it is
    logged and ignored (the next boot records again), unless `strict` (check) asks to hear of it."""
    trace = array("I")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return trace
    if raw.startswith(_TRACE_MAGIC):
        try:
            raw = unseal_bytes(raw, path)[len(_TRACE_MAGIC) :]
        except Damaged:
            if strict:
                raise
            log.error("boot trace %s is damaged; it is not used", path)
            return trace
    elif len(raw) % trace.itemsize:  # a trace from before checksums: only its length can be checked
        if strict:
            raise Damaged(path=path, detail="it is not a boot trace")
        return trace
    trace.frombytes(raw)
    return trace


def _pwrite_all(fd: int, data: bytes, at: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, at)
        view, at = view[n:], at + n
