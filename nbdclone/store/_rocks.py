"""The RocksDB overlay: a block map (`_blockmap`) beside a data file (`_datafile`), kept by the invariants
in `overlay` (I1-I5). The write paths, each with the order in which its parts reach the disk:

    path           when                                   order (-> : happens before; ack: the reply)
    rewrite        every block written is DATA already     pwritev -> ack
    first write    a block becomes DATA                    pwritev -> WAL: tentative(prev, gen) -> ack
    zero / trim    a block becomes ZEROED / BASE           WAL: z / delete -> ack; bytes kept (I4)
    flush, FUA     always (nothing to do if unchanged)     lock{gen += 1} -> fdatasync(data)
                                                             -> WAL: durable = gen -> WAL sync -> ack
                                                             -> lock{punch blocks that stopped being DATA}
    open           after a clean close                     WAL: open, boot id (unsynced: ordered first)
    recovery       opened after a kill -9 / a power cut    undo tentative entries after `durable` if the
                                                             boot id changed (I3) -> fdatasync(data)
                                                             -> WAL: fixes, durable, open (synced)
                                                             -> punch every block that is not DATA
    close          the last connection ends                flush -> WAL: closed (synced)

A 4 KiB random-write workload is nearly all first writes and rewrites: a pwritev each, plus one unsynced
RocksDB put for a first write (3-4 us here). Bytes are not kept in RocksDB: a 4 KiB value goes through the
WAL, the memtable, an SST and every compaction; measured here that capped 4 KiB random writes at 16k/s.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from nbdclone.errors import StorageError
from nbdclone.store import _blockmap as bm
from nbdclone.store._datafile import NAME as DATA_FILE
from nbdclone.store._datafile import DataFile
from nbdclone.store._fs import fsync_dir, runs
from nbdclone.store._recovery import boot_id, recover, tentative
from nbdclone.store.overlay import BLOCK_SIZE, DATA, Change, Move

log = logging.getLogger(__name__)

BLOCK_CACHE_BYTES = bm.BLOCK_CACHE_BYTES
LEGACY_MARK = "EMPTY"  # nbdclone 0.1 kept some overlays' maps in the data file's extents (unreliable: I1)
_OPEN, _CLOSED = b"1", b"0"
_shared_resources = bm.shared_resources


class RocksOverlay:
    """An overlay in one directory. One handle per clone per process, shared by all of its connections."""

    def __init__(self, path: Path, *, create: bool = False, readonly: bool = False) -> None:
        self.path = path
        self.lock = threading.Lock()  # I5: every change; flush takes it only to start and to punch
        self._flush_lock = threading.Lock()  # flushes one at a time: `durable` only ever grows
        self._readonly = readonly
        if (path / LEGACY_MARK).exists():
            raise StorageError(
                errno.EPROTO,
                what=f"overlay {path}",
                detail="keeps its map in the format of nbdclone 0.1; export it with that version, then reset",
            )
        self._map = bm.BlockMap(path, create=create, readonly=readonly)
        self._data: DataFile | None = None
        try:
            self._data = DataFile(path / DATA_FILE, BLOCK_SIZE, readonly=readonly)
            self._states: list[Change] | None = self._open_map(create)
        except BaseException:
            if self._data is not None:
                self._data.close()
            self._map.close()
            raise
        self._dirty = False  # anything updated since the last flush began
        self._to_punch: set[int] = set()  # blocks that stopped being DATA; their entries are not yet durable
        self._punching: set[int] = set()  # ... whose entries the running (or last failed) flush makes durable

    # -- open and recovery ---------------------------------------------------------------------------

    def _open_map(self, create: bool) -> list[Change]:
        m, data = self._map, self._data
        assert data is not None
        self._check_format(create)
        self._written = int.from_bytes(m.get(bm.META_WRITTEN) or b"", "big")
        durable = int.from_bytes(m.get(bm.META_DURABLE) or b"", "big")
        was_open = m.get(bm.META_OPEN) == _OPEN
        boot = boot_id()
        lost_power = was_open and (not boot or m.get(bm.META_BOOT) != boot)
        rec = recover(m.entries(), lost_power=lost_power, durable=durable)
        self._gen = max(rec.last_generation, durable) + 1
        if self._readonly:
            return rec.states
        if not was_open:
            m.write([(bm.META_OPEN, _OPEN), (bm.META_BOOT, boot)])  # unsynced: in the WAL before any entry
            return rec.states
        log.warning(
            "overlay %s was not closed (%s): %d unflushed block(s) go back to their previous state",
            self.path,
            "power cut or system crash" if lost_power else "the server was killed",
            len(rec.fixes),
        )
        # The killed server's writes are in the page cache: make them durable, data before the map (I2, I3).
        data.sync()
        m.write([*rec.fixes, (bm.META_DURABLE, (self._gen - 1).to_bytes(8, "big")), (bm.META_BOOT, boot)], sync=True)
        # Free what the dead server had not punched yet: every block that is not DATA (I4: the map is durable).
        data_blocks = [block for block, state in rec.states if state == DATA]
        lo = 0
        for start, count in runs(data_blocks):
            if start > lo:
                data.punch_range(lo, start - lo)
            lo = start + count
        if data.size_blocks() > lo:
            data.punch_range(lo, data.size_blocks() - lo)
        return rec.states

    def _check_format(self, create: bool) -> None:
        m = self._map
        fmt = m.get(bm.META_FORMAT)
        if fmt == bm.FORMAT:
            return
        if m.has_prefix(bm.OLD_DATA) or (fmt is not None and m.get(bm.META_OPEN) == _OPEN):
            # Format 1 kept bytes in RocksDB; a format-2 overlay left open needs the old extent-based recovery.
            raise StorageError(
                errno.EPROTO,
                what=f"overlay {self.path}",
                detail="holds data in the format of an older nbdclone; export it with that version, then reset",
            )
        if not self._readonly:  # a new overlay, or a cleanly closed format-2 one (its d/z entries are ours)
            m.write([(bm.META_FORMAT, bm.FORMAT)], sync=not create)

    # -- requests ------------------------------------------------------------------------------------

    def scan(self) -> Iterator[Change]:
        states, self._states = self._states or [], None
        yield from states

    def read(self, buf: memoryview, offset: int) -> None:
        assert self._data is not None
        self._data.read(buf, offset)

    def update(
        self, bufs: Sequence[bytes | bytearray | memoryview], offset: int, moves: Sequence[Move], *, written: int
    ) -> None:
        if self._readonly:
            raise StorageError(errno.EROFS, what=f"overlay {self.path}", detail="opened read-only")
        if self._map.broken:
            self._reopen_map()
        if bufs:  # I2: the bytes first
            assert self._data is not None
            self._data.write(bufs, offset, len(bufs[0]) if len(bufs) == 1 else sum(len(b) for b in bufs))
        if len(moves) == 1 and moves[0][2] == DATA:  # the hot path: one first write
            block, old, _ = moves[0]
            self._map.put(bm.key(block), tentative(old, self._gen))
            if self._to_punch or self._punching:
                self._to_punch.discard(block)
                self._punching.discard(block)
        elif moves:
            self._apply(moves)
        self._written += written
        self._dirty = True  # after the map: a flush that sees it covers this update (I3)

    def _apply(self, moves: Sequence[Move]) -> None:
        batch: list[tuple[bytes, bytes | None]] = []
        freed: list[int] = []
        for block, old, new in moves:
            if new == DATA:
                assert old != DATA, f"block {block} is DATA already"
                batch.append((bm.key(block), tentative(old, self._gen)))
                self._to_punch.discard(block)
                self._punching.discard(block)
                continue
            if new != old:
                batch.append((bm.key(block), bm.ZERO if new else None))
            freed.append(block)  # its bytes, if any, are released once its entry is durable (I4)
        if batch:
            self._map.write(batch)
        self._to_punch.update(freed)

    def _reopen_map(self) -> None:
        """A map write failed (RocksDB refuses writes after ENOSPC until reopened): reopen it, once no flush
        is using the handle. Caller holds `lock`."""
        if not self._flush_lock.acquire(blocking=False):
            raise StorageError(errno.EAGAIN, what=f"overlay {self.path}", detail="recovering from a failed write")
        try:
            self._map.reopen()
        finally:
            self._flush_lock.release()

    def flush(self) -> None:
        if self._readonly:
            return
        with self._flush_lock:
            with self.lock:
                if not (self._dirty or self._to_punch or self._punching or self._map.broken):
                    return  # nothing since the last flush: a boot flushes often, twice in a row at times
                if self._map.broken:
                    self._map.reopen()
                self._dirty = False
                generation, self._gen = self._gen, self._gen + 1
                self._punching |= self._to_punch
                self._to_punch = set()
                written = self._written
            assert self._data is not None
            try:
                self._data.sync()  # I3: every byte of generation <= `generation` is on disk...
                self._map.write(  # ...before the map says so
                    [(bm.META_DURABLE, generation.to_bytes(8, "big")), (bm.META_WRITTEN, written.to_bytes(8, "big"))],
                    sync=True,
                )
            except BaseException:
                self._dirty = True  # the next flush must not take this for synced
                raise
            with self.lock:  # I4: their entries are durable now; blocks written since left the set
                self._data.punch(sorted(self._punching))
                self._punching.clear()

    def bytes_written(self) -> int:
        return self._written

    def close(self) -> None:
        try:
            if not self._readonly:
                self.flush()
                self._map.write(
                    [(bm.META_OPEN, _CLOSED), (bm.META_WRITTEN, self._written.to_bytes(8, "big"))], sync=True
                )
        finally:
            if self._data is not None:
                self._data.close()
            self._map.close()


def create_overlay(path: Path) -> None:
    """Make a new, empty overlay at `path`, durable before anything points to it."""
    RocksOverlay(path, create=True).close()
    fsync_dir(path)
    fsync_dir(path.parent)


def overlay_in_use(path: Path) -> bool:
    """True if some process holds the RocksDB lock of the overlay at `path` (a server has it open)."""
    lock = path / "LOCK"
    if not lock.exists():
        return False
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.lockf(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)
