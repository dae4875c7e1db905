"""The RocksDB overlay: a block map (`_blockmap`) beside a data file (`_datafile`), kept by the invariants
in `overlay` (I1-I7). The write paths, each with the order in which its parts reach the disk:

    path              when                                  order (-> : happens before; ack: the reply)
    rewrite           the block is DATA, durably            (first in its region: WAL: mark, synced: I7)
                                                              -> pwritev -> ack; its print is held in memory and
                                                              reaches the WAL (tentative(DATA, gen, print))
                                                              in one batch at the next flush's start
    first write       a block becomes DATA                  (over bytes a durable DATA entry may still name:
                                                              WAL: mark, synced, first in its region: I7)
                                                              -> pwritev -> WAL: tentative(prev, gen, print)
                                                              -> ack
    tentative rewrite the block became DATA since the       WAL: tentative(prev, gen, old print, new print)
                      last flush                              -> pwritev -> ack
    zero / trim       a block becomes ZEROED / BASE         WAL: z / delete -> ack; bytes kept (I4)
    flush, FUA        always (nothing to do if unchanged)   lock{gen += 1} -> fdatasync(data)
                                                              -> WAL: durable = gen -> WAL sync -> ack
                                                              -> lock{punch blocks that stopped being DATA;
                                                              WAL: unmark durable regions idle 30 s}
    flush of rewrites since the last flush, only rewrites  lock{WAL: their prints; gen += 1}
      only            in place (16,384 prints at most       -> fdatasync(data) -> ack (no WAL sync: their
                      since the last WAL sync)              regions are marked: I7)
    open              after a clean close                   WAL: open, marks (unsynced: before any entry)
    recovery          opened after any unclean stop         tentative entries after `durable` whose block
                                                              does not hold a fingerprinted content go back
                                                              to their previous state (I3) -> fdatasync(data)
                                                              -> WAL: fixes, durable (synced)
                                                              -> punch every block that is not DATA
                                                              -> scrub the marked regions (I7): fdatasync
                                                              -> WAL: their prints, no marks (synced)
    close             the last connection ends              flush -> WAL: closed, no marks (synced)

Every DATA block's entry fingerprints what the block holds (a rewrite in place, from the next flush on;
until then its print is in memory), so a read checks each block it serves against its entry (a multi-get:
1 us for one block, 11 us for 16) and `nbdclone check` finds bytes that changed under the map. A 4 KiB
random-write workload is nearly all first writes and rewrites: a pwritev each, a fingerprint (0.17 us) and,
for a first write, one unsynced RocksDB put (3-4 us here). Bytes are not kept in RocksDB: a 4 KiB value
goes through the WAL, the memtable, an SST and every compaction; measured here that capped 4 KiB random
writes at 16k/s.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from nbdclone.errors import Damaged, StorageError
from nbdclone.store import _blockmap as bm
from nbdclone.store import _durable, _journal
from nbdclone.store._datafile import NAME as DATA_FILE
from nbdclone.store._datafile import DataFile
from nbdclone.store._fs import fsync_dir, runs
from nbdclone.store._recovery import Recovered, decode, fingerprint, prints_of, recover, tentative, tentative_head
from nbdclone.store.overlay import BASE, BLOCK_SIZE, DATA, ZEROED, Change, Move

_SHIFT = BLOCK_SIZE.bit_length() - 1
_INDEX = bm.INDEX
_Write = tuple[Sequence[bytes | bytearray | memoryview], int, int]  # DataFile.write's bufs, offset, length
_HEAD, _PRINT = 10, 8  # a tentative entry: tag, previous state, generation (8); then one or two prints

log = logging.getLogger(__name__)

LEGACY_MARK = "EMPTY"  # nbdclone 0.1 kept some overlays' maps in the data file's extents (unreliable: I1)
_OPEN, _CLOSED = b"1", b"0"
PENDING_PRINTS = 16384  # prints of in-place rewrites held in memory (about 1.5 MiB) before a batch to the map
UNSYNCED_PRINTS = 16384  # prints of rewrites a flush may leave in the WAL unsynced (recovery reads their blocks)
#: Marks (I7 in docs/overlay.md): a block rewritten in place may reach the disk before its print reaches
#: the map. Before the first such rewrite in a region (4096 blocks: 16 MiB), a synced map write marks the
#: region; an open after an unclean stop scrubs the marked regions only (each block's print taken from what
#: it holds: old or new bytes), and a block anywhere else that does not hold what its entry names is damage.
#: A mark goes once every rewrite of its region is durable and none came for MARK_IDLE seconds (a region
#: rewritten between every two flushes is not marked again at each).
REGION_SHIFT = 12
MARK_IDLE = 30.0
T = TypeVar("T")
#: Seconds between tries of what failed for want of space (see _Tries).
REOPEN_EVERY = 2.0
#: A scrub in the background (a server's open after an unclean stop) reads at most this many bytes a second,
#: SCRUB_BATCH blocks at a time under the overlay's lock.
SCRUB_RATE = 64 << 20
SCRUB_BATCH = 64


class RocksOverlay:
    """An overlay in one directory. One handle per clone per process, shared by all of its connections."""

    def __init__(
        self,
        path: Path,
        *,
        create: bool = False,
        readonly: bool = False,
        scrub: str = "now",
        lock: threading.Lock | None = None,
    ) -> None:
        """`scrub`: after an unclean stop, close the window of marked regions (I7) before the open returns
        ("now"), or while the clone serves ("background": a server's open, which must not wait for it).
        `lock`: the one to use as `lock` (a LateOverlay's, whose callers already hold it)."""
        self.path = path
        self.lock = lock or threading.Lock()  # I5: every change; flush takes it only to start and to punch
        self._flush_lock = threading.Lock()  # flushes one at a time: `durable` only ever grows
        self._readonly = readonly
        if (path / LEGACY_MARK).exists():
            raise StorageError(
                errno.EPROTO,
                what=f"overlay {path}",
                detail="keeps its map in the format of nbdclone 0.1; export it with that version, then reset",
            )
        self._full = False  # opened read-only for want of space: writes get ENOSPC until a reopen succeeds
        self._reopens = _Tries(f"overlay {path}")  # opening the map for writing again, after a failure
        self.format: bytes | None = None
        self._reprinted = 0  # blocks whose print was refreshed after an unclean stop (see _mismatch)
        # Opened read-only over a journal its writer left: the DATA entries only the journal holds (reads).
        self._journaled: dict[int, bytes] = {}
        try:
            self._states: list[Change] | None = self._start(create)
        except StorageError as exc:
            if exc.errno != errno.ENOSPC or readonly or create:
                raise
            # A full disk: RocksDB cannot open for writing (it makes new files), but the clone can be read.
            log.warning("overlay %s opened read-only: no space left to open it for writing", path)
            self._readonly = self._full = True
            self._states = self._start(False)
        self._dirty = False  # anything updated since the last flush began
        self._synced = self._gen - 1  # the newest generation the map holds durably (its WAL synced)
        self._unsynced_prints = 0  # prints of rewrites flushed since then without a WAL sync
        # Blocks that became DATA in a generation not yet durable: block -> its entry (tentative(prev, gen,
        # acked print, newest print)), the newest one, which the journal or the map holds too.
        self._tentative: dict[int, bytes] = {}
        self._to_punch: set[int] = set()  # blocks that stopped being DATA; their entries are not yet durable
        self._pending: dict[int, bytes] = {}  # block -> print of bytes rewritten in place, not yet in the map
        self._punching: set[int] = set()  # ... whose entries the running (or last failed) flush makes durable
        self._heads = (self._gen, _heads(self._gen))  # what first writes' entries start with, this generation
        self._marks: dict[int, int] = {}  # region marked (durably) -> generation of its last rewrite in place
        self._idle: dict[int, tuple[int, float]] = {}  # region -> (that generation, when first seen durable)
        # A flush took a generation and has not yet let its blocks leave `_tentative` (it runs, or failed).
        self._unpruned = False
        self._scrubber: threading.Thread | None = None
        self._stop_scrub = threading.Event()
        self.scrubbed = threading.Event()  # set once no window is left to scrub (I7)
        self._close_window(scrub)

    # -- open and recovery ---------------------------------------------------------------------------

    def _start(self, create: bool) -> list[Change]:
        """Open the map, the data file and the journal, and recover if the last writer did not close."""
        self._map = bm.BlockMap(self.path, create=create, readonly=self._readonly)
        self._data: DataFile | None = None
        self._journal: _journal.Journal | None = None
        self._sidecar: _durable.Record | None = None
        try:
            self._data = DataFile(self.path / DATA_FILE, BLOCK_SIZE, readonly=self._readonly)
            if not self._readonly:
                self._sidecar = _durable.Record(self.path)
            self._journal = self._open_journal(create)
            return self._open_map(create)
        except BaseException:
            if self._data is not None:
                self._data.close()
            if self._journal is not None:
                self._journal.close()
            if self._sidecar is not None:
                self._sidecar.close()
            self._map.close()
            raise

    def _open_journal(self, create: bool) -> _journal.Journal | None:
        """The journal the last writer left (see _journal), found by the id the map records; None if there
        is none (a clean close removes it), or no private folder in /dev/shm."""
        folder = _journal.folder()
        ident = None if create else self._map.get(bm.META_JOURNAL)
        if folder is None or ident is None or not (folder / ident.hex()).exists():
            return None
        return _journal.Journal(folder / ident.hex(), ident, create=False, owner=self.path)

    def _new_journal(self) -> None:
        """A journal of this session's own, once the last writer's is in the map: a new id, in the map's WAL
        before any record names it (unsynced: a power cut that loses it loses the journal too). So a journal
        this open did not see (another user's /dev/shm) never matches the map again, and is never replayed
        over entries written since. Where /dev/shm has no private folder, entries go straight to the map."""
        old, self._journal = self._journal, None
        if old is not None:
            old.close(remove=True)
        folder = _journal.folder()
        if folder is None:
            return
        ident = os.urandom(16)
        self._map.write([(bm.META_JOURNAL, ident)])
        try:
            self._journal = _journal.Journal(folder / ident.hex(), ident, create=True, owner=self.path)
        except StorageError as exc:
            log.warning("overlay %s: no journal (%s); map entries are written straight to the map", self.path, exc)

    def _retry_writable(self) -> None:
        """Opened read-only on a full disk: try to open for writing again (space may be back; at most every
        REOPEN_EVERY seconds). Caller holds `lock`; nothing was written meanwhile, so the map it finds is the
        one the clone reads."""
        old_map, old_data, old_journal, old_sidecar = self._map, self._data, self._journal, self._sidecar
        self._readonly = False
        try:
            self._reopens.attempt(lambda: self._start(False))
        except StorageError:
            self._readonly = True
            self._map, self._data, self._journal, self._sidecar = old_map, old_data, old_journal, old_sidecar
            raise
        old_map.close()
        if old_data is not None:
            old_data.close()
        if old_journal is not None:
            old_journal.close()
        self._full = False
        log.info("overlay %s is writable again", self.path)
        self._close_window("background")

    def _open_map(self, create: bool) -> list[Change]:
        m, data = self._map, self._data
        assert data is not None
        old_format = self.format = self._check_format(create)
        self._written = int.from_bytes(m.get(bm.META_WRITTEN) or b"", "big")
        durable = int.from_bytes(m.get(bm.META_DURABLE) or b"", "big")
        recorded = _durable.read(self.path)
        if recorded is not None and recorded > durable:
            raise Damaged(
                path=self.path,
                detail=f"its block map's write-ahead log lost records it had synced (the map says generation "
                f"{durable} is durable; {_durable.NAME} says {recorded} was)",
            )
        unclean = m.get(bm.META_OPEN) == _OPEN
        # The regions whose blocks may hold rewritten bytes their entries do not name (I7): those marked at
        # an unclean stop; every region (None) after a writer from before marks.
        window: set[int] | None = None
        if m.get(bm.META_TRUST) is None and (not unclean or m.get(bm.META_MARKS) is not None):
            window = set(m.marks())  # left by an unclean stop, or by a close before a background scrub ended
        self._window = window
        journaled = self._journal.entries() if self._journal is not None else []
        if journaled and not self._readonly:
            # A writer stopped with entries only its journal held: into the map first (synced: the journal
            # is reset next), then recovery as after any unclean stop.
            m.write(journaled, sync=True)
            journaled = []
        if not self._readonly:
            self._new_journal()
        entries = _merged(m.entries(), journaled) if journaled else m.entries()
        self._journaled = {}
        for k, value in journaled:  # (read-only: what reads check these blocks against)
            if value is not None and value[:1] == bm.TENTATIVE:
                self._journaled[int.from_bytes(k[1:], "big")] = value
            else:
                self._journaled.pop(int.from_bytes(k[1:], "big"), None)
        rec = recover(entries, unclean=unclean or bool(journaled), durable=durable, read_block=data.read_block)
        last = max((block for block, state in rec.states if state == DATA), default=-1)
        if last >= data.size_blocks():  # the file was cut short under the map: its blocks are gone
            raise Damaged(path=data.path, detail=f"it ends before block {last}, which its map says holds data")
        self._gen = max(rec.last_generation, durable) + 1
        if self._readonly:
            return rec.states  # (reads serve the window's blocks as they are: see _mismatch)
        if not unclean:  # unsynced: in the WAL before any entry (and mark) of this session
            m.write([(bm.META_OPEN, _OPEN), (bm.META_MARKS, b"1")])
        else:
            self._recover(rec)
        if old_format != bm.FORMAT:
            self._print_all()
            self.format = bm.FORMAT
        return rec.states

    def _recover(self, rec: Recovered) -> None:
        m, data = self._map, self._data
        assert data is not None
        log.warning(
            "overlay %s was not closed (the server was killed, or the system lost power): %d block(s) written "
            "since its last flush read their previous state",
            self.path,
            len(rec.fixes),
        )
        # What is kept must stay kept: data before the map (I3), then free what the map no longer holds (I4).
        data.sync()
        m.write(
            [*rec.fixes, (bm.META_DURABLE, (self._gen - 1).to_bytes(8, "big")), (bm.META_MARKS, b"1")],
            sync=True,
        )
        data_blocks = [block for block, state in rec.states if state == DATA]
        lo = 0
        for start, count in runs(data_blocks):
            if start > lo:
                data.punch_range(lo, start - lo)
            lo = start + count
        if data.size_blocks() > lo:
            data.punch_range(lo, data.size_blocks() - lo)

    def _close_window(self, scrub: str) -> None:
        """Scrub the window an unclean stop left, if any (I7): before returning ("now"), or while the clone
        serves ("background": a server's open, or a reopen inside a request, which must not wait for it)."""
        if self._readonly or self._window == set():
            self.scrubbed.set()
        elif scrub == "background":
            self._scrubber = threading.Thread(
                target=self._scrub_in_background, args=(self._window,), name="nbdclone-scrub", daemon=True
            )
            self._scrubber.start()
        else:
            self._scrub(self._window)
            self.scrubbed.set()

    def _misprinted(self, entries: Iterable[tuple[int, bytes]]) -> Iterator[tuple[int, bytes]]:
        """(block, print of what it holds) of each DATA block of `entries` whose bytes are none of those its
        entry names. Reads each of them."""
        data = self._data
        assert data is not None
        for block, value in entries:
            prints = prints_of(value)
            if prints is not None and (mark := fingerprint(data.read_block(block))) not in prints:
                yield block, mark

    def _window_spans(self, window: set[int] | None) -> list[tuple[int, int | None]]:
        """The block ranges of the marked regions `window` (None: every block)."""
        if window is None:
            return [(0, None)]
        return [(r << REGION_SHIFT, (r + 1) << REGION_SHIFT) for r in sorted(window)]

    def _scrub(self, window: set[int] | None) -> None:
        """Close the window an unclean stop left (I7), before the open returns: each DATA block of a marked
        region (`window`; None: every block, after a writer from before marks) whose bytes are none its entry
        names gets the print of what it holds, old or new bytes of a write that was not flushed, both
        acceptable; then the marks go. Blocks elsewhere are not read here: a mismatch there is damage, seen
        when they are read."""
        m, data = self._map, self._data
        assert data is not None
        started = time.monotonic()
        fixes = [
            (bm.key(block), tentative(DATA, 0, mark))
            for start, stop in self._window_spans(window)
            for block, mark in self._misprinted(m.entries(start, stop))
        ]
        data.sync()  # the bytes the new prints name are on disk before the map says so (generation 0)
        unmarks = [(bm.mark_key(r), None) for r in sorted(window or ())]
        m.write([*fixes, *unmarks, (bm.META_TRUST, None)], sync=True)
        self._window = set()
        self._scrub_done(window, started, len(fixes), "")

    def _scrub_in_background(self, window: set[int] | None) -> None:
        """`_scrub`, while the clone serves: SCRUB_BATCH blocks at a time under `lock`, at most SCRUB_RATE
        bytes a second. A block the session has written, zeroed or trimmed is skipped (its entry is the
        session's), and each block's entry is read again under the lock; a block read before the scrub came
        to it took its print then (_mismatch). New prints reach the map as a rewrite's do (`_pending`, at the
        next flush); the marks go once that flush has made them durable (but those of regions the session
        rewrote: they go when those rewrites are durable). Stopped by `close`, or failed: the marks stay,
        and the next open scrubs again."""
        started = time.monotonic()
        fixed = done = 0
        try:
            for start, stop in self._window_spans(window):
                with self.lock:
                    blocks = [b for b, _ in self._map.entries(start, stop)]
                for at in range(0, len(blocks), SCRUB_BATCH):
                    if self._stop_scrub.is_set():
                        return
                    with self.lock:
                        skip = (self._pending, self._tentative, self._to_punch, self._punching)
                        batch = [b for b in blocks[at : at + SCRUB_BATCH] if not any(b in s for s in skip)]
                        values = self._map.get_many([bm.key(b) for b in batch])
                        entries = [(b, v) for b, v in zip(batch, values, strict=True) if v is not None]
                        for block, mark in self._misprinted(entries):
                            self._pending[block] = mark
                            fixed += 1
                    done += SCRUB_BATCH * BLOCK_SIZE
                    if self._stop_scrub.wait(max(0.0, done / SCRUB_RATE - (time.monotonic() - started))):
                        return
            with self.lock:  # every block of the window now names what it holds: a mismatch is damage
                self._window = set()
            self.flush()  # the new prints are durable before the marks go
            with self.lock:
                unmarks = [(bm.mark_key(r), None) for r in sorted(window or ()) if r not in self._marks]
                self._map.write([*unmarks, (bm.META_TRUST, None)], sync=True)
        except Exception:
            log.exception("overlay %s: the scrub stopped; the next open scrubs again", self.path)
            return
        self.scrubbed.set()
        self._scrub_done(window, started, fixed, ", in the background")

    def _scrub_done(self, window: set[int] | None, started: float, fixed: int, how: str) -> None:
        log.warning(
            "overlay %s: scrubbed %s rewritten before its unclean stop%s (%.2f s); %d block(s) now name the "
            "bytes they hold (old or new)",
            self.path,
            "every region" if window is None else f"{len(window)} region(s) of 16 MiB",
            how,
            time.monotonic() - started,
            fixed,
        )

    def _in_window(self, block: int) -> bool:
        window = self._window
        return window is None or (block >> REGION_SHIFT) in window

    def _check_format(self, create: bool) -> bytes | None:
        """The format the overlay is in (None: new, or format 2); refuses formats it cannot read."""
        m = self._map
        fmt = m.get(bm.META_FORMAT)
        if create:
            m.write([(bm.META_FORMAT, bm.FORMAT)])
            return bm.FORMAT
        if fmt == bm.FORMAT:
            return fmt
        if m.has_prefix(bm.OLD_DATA) or (fmt is None and m.get(bm.META_OPEN) == _OPEN) or fmt not in (b"3", None):
            # Format 1 kept bytes in RocksDB; a format-2 overlay left open needs the old extent-based recovery.
            raise StorageError(
                errno.EPROTO,
                what=f"overlay {self.path}",
                detail="holds data in the format of an older nbdclone; export it with that version, then reset",
            )
        return fmt

    def _print_all(self) -> None:
        """Bring an overlay of an older format to the current: every DATA block's entry fingerprints what
        the block holds. Once, at its first writable open (after any recovery); reads every written block."""
        m, data = self._map, self._data
        assert data is not None
        log.info("overlay %s: fingerprinting every written block (once, for the current format)", self.path)
        data.sync()  # entries that name bytes as durable (generation 0) must not outrun them
        batch: list[tuple[bytes, bytes | None]] = []
        for block, value in m.entries():
            prints = prints_of(value)
            if decode(value).state != DATA:
                continue
            mark = fingerprint(data.read_block(block))
            if prints is None or mark not in prints:
                batch.append((bm.key(block), tentative(DATA, 0, mark)))
            if len(batch) >= 4096:
                m.write(batch)
                batch = []
        m.write([*batch, (bm.META_FORMAT, bm.FORMAT)], sync=True)

    # -- requests ------------------------------------------------------------------------------------

    def scan(self) -> Iterator[Change]:
        states, self._states = self._states or [], None
        yield from states

    def read(self, buf: memoryview, offset: int) -> None:
        """Fill `buf` from DATA blocks, each checked against the print its entry names: bytes that changed
        under the map are an error (EIO, logged), never data. Caller holds `lock` (no write is half done)."""
        data = self._data
        assert data is not None
        end = offset + len(buf)
        first, stop = offset >> _SHIFT, ((end - 1) >> _SHIFT) + 1
        if self.format != bm.FORMAT:  # an older overlay opened read-only: its prints may be stale
            data.read(buf, offset)
            return
        if not (offset | end) & (BLOCK_SIZE - 1):
            whole = buf
            data.read(whole, offset)
        else:
            whole = memoryview(bytearray((stop - first) << _SHIFT))
            data.read(whole, first << _SHIFT)
        pending, tentative_blocks = self._pending, self._tentative
        unknown: list[tuple[int, bytes]] = []  # (block, print) of blocks whose entry only the map holds
        for k in range(stop - first):
            block = first + k
            mark = fingerprint(whole[k << _SHIFT : (k + 1) << _SHIFT])
            if pending and (newer := pending.get(block)) is not None:
                if mark != newer:  # what this process wrote there itself: any other bytes are damage
                    self._mismatch(block, None, mark)
            elif (value := tentative_blocks.get(block) or self._journaled.get(block)) is not None:
                if mark != value[-_PRINT:] and mark != value[_HEAD : _HEAD + _PRINT]:
                    self._mismatch(block, value, mark)
            else:
                unknown.append((block, mark))
        if unknown:
            values = self._map.get_many([_INDEX + b.to_bytes(8, "big") for b, _ in unknown])
            for (block, mark), value in zip(unknown, values, strict=True):
                prints = None if value is None else prints_of(value)
                if prints is not None and mark not in prints:
                    self._mismatch(block, value, mark)
        if whole is not buf:
            at = offset - (first << _SHIFT)
            buf[:] = whole[at : at + len(buf)]

    def _mismatch(self, block: int, value: bytes | None, mark: bytes) -> None:
        """A block's bytes are not what its entry (`value`; None: this process's own last write) names.
        Damage, unless the overlay is open read-only after an unclean stop and the block is in a region
        marked then (I7): a rewrite's bytes may have reached the disk without the record naming them, so
        they are served as they are (old or new, as after any crash) until a writable open scrubs them."""
        if value is not None and self._in_window(block):
            if not self._reprinted:
                log.warning(
                    "overlay %s: blocks rewritten around its last unclean stop are served as they are until the "
                    "scrub has passed them (first: block %d)",
                    self.path,
                    block,
                )
            self._reprinted += 1
            if not self._readonly:  # (a scrub running in the background: the block's print is taken now)
                self._pending[block] = mark
            return
        assert self._data is not None
        log.error("%s: block %d does not hold what its map fingerprints; not served", self._data.path, block)
        raise Damaged(path=self._data.path, detail=f"block {block} does not hold what its map fingerprints")

    def update(
        self, bufs: Sequence[bytes | bytearray | memoryview], offset: int, moves: Sequence[Move], *, written: int
    ) -> None:
        if self._full:
            self._retry_writable()
        if self._readonly:
            raise StorageError(errno.EROFS, what=f"overlay {self.path}", detail="opened read-only")
        if self._map.broken:
            self._reopen_map()
        data = self._data
        assert data is not None
        if len(bufs) == 1 and len(bufs[0]) == BLOCK_SIZE and len(moves) <= 1:  # the hot path: one block
            block = offset >> _SHIFT
            buf = bufs[0]
            if moves:  # a first write: bytes, then the entry that names them (I2, I3)
                if (self._to_punch or self._punching) and (block in self._to_punch or block in self._punching):
                    self._note_rewrite(block)  # over bytes a durable DATA entry may still name (I7)
                data.write(bufs, offset, BLOCK_SIZE)
                mark = fingerprint(buf)
                gen, heads = self._heads
                if gen != self._gen:
                    self._heads = gen, heads = self._gen, _heads(self._gen)
                value = heads[moves[0][1]] + mark + mark
                key = _INDEX + block.to_bytes(8, "big")
                j = self._journal
                if j is None or j.allocated - j.pos < 64:  # (a record of one entry is 48 bytes)
                    self._record(key, value)
                else:
                    j.put(key, value)
                self._tentative[block] = value
                if self._to_punch or self._punching:
                    self._to_punch.discard(block)
                    self._punching.discard(block)
            elif block in self._tentative:
                self._rewrite_tentative([(block, buf)])
                data.write(bufs, offset, BLOCK_SIZE)
            else:
                self._write_in_place([(bufs, offset, BLOCK_SIZE)], [(block, buf)])
        else:
            self._update(bufs, offset, moves)
        self._written += written
        self._dirty = True  # after the map: a flush that sees it covers this update (I3)

    def _record(self, key: bytes, value: bytes) -> None:
        """One map entry of an acknowledged request: into the journal (or the map, where there is none)."""
        j = self._journal
        if j is None:
            self._map.put(key, value)
            return
        try:
            j.put(key, value)
        except _journal.Full:
            self._spill()
            j.put(key, value)

    def _record_all(self, entries: list[tuple[bytes, bytes | None]]) -> None:
        """A request's map entries, applied together (one journal record, or one map batch)."""
        if not entries:
            return
        j = self._journal
        if j is None:
            self._map.write(entries)
            return
        self._append(_journal.encode(entries), lambda: entries)

    def _append(self, payload: bytes, entries: Callable[[], list[tuple[bytes, bytes | None]]]) -> None:
        """One journal record (`payload`, which holds `entries()`); where there is no journal, or the record
        is larger than the journal, the entries go to the map in one batch."""
        j = self._journal
        if j is None:
            self._map.write(entries())
            return
        try:
            j.append(payload)
        except _journal.Full:
            self._spill()
            try:
                j.append(payload)
            except _journal.Full:
                self._map.write(entries())

    def _spill(self) -> None:
        """Every journal entry into the map, then the prints of rewrites in place (`_pending`, always the
        newest word on their blocks), in one batch; then a new journal epoch: the map's WAL holds the entries
        before the journal lets them go. Caller holds `lock`."""
        j = self._journal
        batch = j.entries() if j is not None else []
        if self._pending:
            batch += self._pending_entries()
            self._unsynced_prints += len(self._pending)
        if batch:
            self._map.write(batch)
        self._pending = {}
        if j is not None and len(j):
            j.reset()

    def _update(self, bufs: Sequence[bytes | bytearray | memoryview], offset: int, moves: Sequence[Move]) -> None:
        data = self._data
        assert data is not None
        firsts = [(block, old) for block, old, new in moves if new == DATA]
        if not bufs:
            if firsts:
                raise ValueError("a block cannot become DATA without its bytes")
            self._apply(moves)
            return
        length = sum(len(b) for b in bufs)
        whole = memoryview(bufs[0] if len(bufs) == 1 else b"".join(bufs))
        first, stop = offset >> _SHIFT, (offset + length) >> _SHIFT
        durable: list[tuple[int, memoryview]] = []
        if not moves and all(map(self._tentative.__contains__, range(first, stop))):
            # A run of blocks all rewritten before the flush (a large write, again): one run record.
            self._rewrite_tentative_run(first, whole, stop - first)
            data.write(bufs, offset, length)
            return
        writes: list[_Write] = [(bufs, offset, length)]
        if len(firsts) < len(moves):
            # Blocks that leave DATA in this request (zeros among written blocks) keep their bytes until
            # their new entry is durable (I4): their old bytes stay readable under their old entry, so a
            # kill before the entry leaves each block old or new. The others are written run by run.
            leaving = {block for block, _, new in moves if new != DATA}
            writes = [
                (
                    [whole[(start - first) << _SHIFT : (start - first + count) << _SHIFT]],
                    start << _SHIFT,
                    count << _SHIFT,
                )
                for start, count in runs([b for b in range(first, stop) if b not in leaving])
            ]
        if len(firsts) < stop - first:  # rewrites: a tentative entry names the new bytes before they are written
            tentative_blocks = self._tentative
            changed = {block for block, _, _ in moves}
            pieces = [(b, whole[(b - first) << _SHIFT : (b - first + 1) << _SHIFT]) for b in range(first, stop)]
            again = [p for p in pieces if p[0] not in changed and p[0] in tentative_blocks]
            if again:
                self._rewrite_tentative(again)
            durable = [p for p in pieces if p[0] not in changed and p[0] not in tentative_blocks]
        if firsts and (self._to_punch or self._punching):
            for block, _ in firsts:  # over bytes a durable DATA entry may still name (I7)
                if block in self._to_punch or block in self._punching:
                    self._note_rewrite(block)
        if durable:
            self._write_in_place(writes, durable)  # their prints once the bytes are written
        else:
            for piece in writes:
                data.write(*piece)
        if firsts:
            self._first_writes(firsts, whole, first, others=() if len(firsts) == len(moves) else moves)
        else:
            self._apply(moves)

    def _first_writes(
        self, firsts: Sequence[tuple[int, int]], whole: memoryview, first: int, others: Sequence[Move] = ()
    ) -> None:
        """Blocks whose bytes are written (`whole` holds them, from block `first` on) become DATA: tentative
        entries (I3), recorded with the changes of `others` that are not first writes."""
        heads = _heads(self._gen)  # not DATA: KeyError
        # Comprehensions, not one loop: a 1 MiB write does this for 256 blocks.
        marks = [fingerprint(whole[(b - first) << _SHIFT : (b + 1 - first) << _SHIFT]) for b, _ in firsts]
        values = [heads[old] + m + m for (_, old), m in zip(firsts, marks, strict=True)]  # rewrites: same size
        blocks = [b for b, _ in firsts]
        self._tentative.update(zip(blocks, values, strict=True))
        if not others and blocks[-1] - blocks[0] == len(blocks) - 1:  # a run of first writes: one run record
            self._append(
                _journal.encode_run(blocks[0], values),
                lambda: [(_INDEX + b.to_bytes(8, "big"), v) for b, v in zip(blocks, values, strict=True)],
            )
        else:
            batch: list[tuple[bytes, bytes | None]] = [
                (_INDEX + b.to_bytes(8, "big"), v) for b, v in zip(blocks, values, strict=True)
            ]
            self._apply(others, batch)
        if self._to_punch or self._punching:
            for block, _ in firsts:
                self._to_punch.discard(block)
                self._punching.discard(block)

    def _rewrite_tentative_run(self, first: int, whole: memoryview, n: int) -> None:
        """`_rewrite_tentative` of blocks first .. first + n - 1, whose new bytes `whole` holds, in one
        run record (comprehensions: a 1 MiB write does this for 256 blocks)."""
        tentative_blocks = self._tentative
        blocks = range(first, first + n)
        marks = [fingerprint(whole[i : i + BLOCK_SIZE]) for i in range(0, n << _SHIFT, BLOCK_SIZE)]
        olds = map(tentative_blocks.__getitem__, blocks)
        values = [v[:_HEAD] + v[-_PRINT:] + m for v, m in zip(olds, marks, strict=True)]
        tentative_blocks.update(zip(blocks, values, strict=True))
        self._append(
            _journal.encode_run(first, values),
            lambda: [(_INDEX + b.to_bytes(8, "big"), v) for b, v in zip(blocks, values, strict=True)],
        )
        if self._unpruned:  # as in _rewrite_tentative
            gen = self._gen
            for block, value, mark in zip(blocks, values, marks, strict=True):
                if int.from_bytes(value[2:_HEAD], "big") < gen:
                    self._pending[block] = mark
                    self._note_rewrite(block)

    def _rewrite_tentative(self, blocks: Sequence[tuple[int, bytes | bytearray | memoryview]]) -> None:
        """Blocks that are DATA since a generation not yet durable get new bytes: their entries name both the
        acknowledged and the new bytes before the new bytes are written (a kill in between keeps either)."""
        tentative_blocks, gen = self._tentative, self._gen
        if len(blocks) == 1:
            block, buf = blocks[0]
            value = tentative_blocks[block]
            mark = fingerprint(buf)
            tentative_blocks[block] = value = value[:_HEAD] + value[-_PRINT:] + mark
            self._record(_INDEX + block.to_bytes(8, "big"), value)
            if self._unpruned and int.from_bytes(value[2:_HEAD], "big") < gen:
                # A flush has taken the journal since the block became DATA: when it ends, the block leaves
                # `_tentative`, and the map does not have this entry yet. Its print is in memory until the
                # next flush, as a rewrite in place's is (reads check `_pending` first), and its region is
                # marked as one's is (I7).
                self._pending[block] = mark
                self._note_rewrite(block)
            return
        marks = [fingerprint(buf) for _, buf in blocks]
        olds = [tentative_blocks[b] for b, _ in blocks]
        values = [v[:_HEAD] + v[-_PRINT:] + m for v, m in zip(olds, marks, strict=True)]
        tentative_blocks.update(zip([b for b, _ in blocks], values, strict=True))
        self._record_all([(_INDEX + b.to_bytes(8, "big"), v) for (b, _), v in zip(blocks, values, strict=True)])
        if self._unpruned:
            for (block, _), value, mark in zip(blocks, values, marks, strict=True):
                if int.from_bytes(value[2:_HEAD], "big") < gen:  # as above
                    self._pending[block] = mark
                    self._note_rewrite(block)

    def _write_in_place(
        self, writes: Sequence[_Write], durable: Sequence[tuple[int, bytes | bytearray | memoryview]]
    ) -> None:
        """Do `writes`, which cover `durable` blocks (DATA durably); their new prints are noted only once the
        bytes are written, and their regions are marked before (I7). A failed write (a full copy-on-write file
        system fails even overwrites) may have written some blocks: their prints are taken from what the file
        holds."""
        assert self._data is not None
        for region in {block >> REGION_SHIFT for block, _ in durable}:  # (a 1 MiB write: one region)
            self._note_rewrite(region << REGION_SHIFT)
        try:
            for piece in writes:
                self._data.write(*piece)
        except BaseException:
            for block, _ in durable:
                with contextlib.suppress(OSError, StorageError):
                    self._pending[block] = fingerprint(self._data.read_block(block))
            raise
        self._rewrite_durable(durable)

    def _rewrite_durable(self, blocks: Sequence[tuple[int, bytes | bytearray | memoryview]]) -> None:
        """Blocks that are DATA durably get new bytes in place. Their new prints are kept in memory
        (`_pending`, which reads check first) and reach the map in one batch at the start of the next flush
        (`_spill`), or sooner if many pile up. Nothing is lost to a kill or power cut before then:
        the block holds old or new bytes under its old entry, and after the unclean stop entries from before
        it are trusted again as their blocks are read (`_mismatch`)."""
        pending = self._pending
        if len(blocks) == 1:
            pending[blocks[0][0]] = fingerprint(blocks[0][1])
        else:
            pending.update([(block, fingerprint(buf)) for block, buf in blocks])
        if len(pending) >= PENDING_PRINTS:
            self._spill()  # unsynced: the next flush's WAL sync makes them durable

    def _note_rewrite(self, block: int) -> None:
        """`block` is about to get bytes that a durable entry naming other bytes may outlive (a rewrite in
        place, whose print only memory holds; a first write over a block whose leaving DATA is not durable
        yet): its region is marked (a synced map write, the first time) before the bytes are written (I7)."""
        region = block >> REGION_SHIFT
        if region not in self._marks:
            self._map.write([(bm.mark_key(region), b"")], sync=True)
        self._marks[region] = self._gen

    def _unmark_idle(self, flushed: int) -> None:
        """Drop the marks of regions whose last rewrite is durable (generation <= `_synced`: its bytes were
        synced, its print is in the synced map) and idle: no rewrite since a flush MARK_IDLE seconds or more
        before synced its bytes (generation <= `flushed`). Unsynced: a mark whose removal a crash loses only
        widens the next scrub. Caller holds `lock`."""
        now = time.monotonic()
        idle, gone, window, synced = self._idle, [], self._window, self._synced
        for region, gen in self._marks.items():
            if gen > flushed or window is None or region in window:  # (a window's marks go with its scrub)
                continue
            seen = idle.get(region)
            if seen is None or seen[0] != gen:
                idle[region] = (gen, now)
            elif gen <= synced and now - seen[1] >= MARK_IDLE:
                gone.append(region)
        if gone:
            self._map.write([(bm.mark_key(r), None) for r in gone])
            for region in gone:
                del self._marks[region], idle[region]

    def _pending_entries(self) -> list[tuple[bytes, bytes | None]]:
        head = tentative_head(DATA, self._gen)  # (a comprehension: a spill does this for 16,384 blocks)
        return [(_INDEX + b.to_bytes(8, "big"), head + mark) for b, mark in self._pending.items()]

    def _apply(self, moves: Sequence[Move], batch: list[tuple[bytes, bytes | None]] | None = None) -> None:
        """Map changes of blocks that leave DATA, or stay out of it, recorded together (with `batch`)."""
        batch = batch if batch is not None else []
        freed: list[int] = []
        for block, old, new in moves:
            if new == DATA:
                continue  # in `batch` already
            if new != old:
                batch.append((_INDEX + block.to_bytes(8, "big"), bm.ZERO if new else None))
            self._tentative.pop(block, None)
            self._pending.pop(block, None)
            freed.append(block)  # its bytes, if any, are released once its entry is durable (I4)
        self._record_all(batch)
        self._to_punch.update(freed)

    def _reopen_map(self) -> None:
        """A map write failed (RocksDB refuses writes after ENOSPC until reopened): reopen it, once no flush
        is using the handle. Caller holds `lock`."""
        if not self._flush_lock.acquire(blocking=False):
            raise StorageError(errno.EAGAIN, what=f"overlay {self.path}", detail="recovering from a failed write")
        try:
            self._reopens.attempt(self._map.reopen)
        finally:
            self._flush_lock.release()

    def flush(self) -> None:
        if self._readonly:
            return
        with self._flush_lock:
            with self.lock:
                journaled = self._journal is not None and len(self._journal)
                if not (self._dirty or journaled or self._pending or self._to_punch or self._punching):
                    if not self._map.broken:
                        return  # nothing since the last flush: a boot flushes often, twice in a row at times
                if self._map.broken:
                    self._reopens.attempt(self._map.reopen)
                # A generation whose only changes are rewrites in place of durable DATA blocks (and a
                # scrub's prints) needs its bytes synced, not its prints: their regions are marked (synced
                # before the first rewrite, I7), and after a power cut the scrub gives each block the print
                # of what it holds. Such a flush skips the WAL sync (on ext4 a second journal commit), as
                # the file plugin's flush is one fdatasync; `durable` stays at the last synced generation.
                # An unclean stop's recovery reads each block whose entry is newer than `durable`: at most
                # UNSYNCED_PRINTS of them (64 MiB) before a flush syncs the WAL again.
                rewrites_only = not (journaled or self._tentative or self._to_punch or self._punching) and (
                    self._unsynced_prints + len(self._pending) <= UNSYNCED_PRINTS
                )
                # In the generation being flushed, in one batch: what the journal holds and the prints of
                # rewrites (I6): the map's WAL has them all before the journal starts again.
                self._spill()
                unsynced = self._unsynced_prints
                self._dirty = False
                generation, self._gen = self._gen, self._gen + 1
                self._unpruned = True
                self._punching |= self._to_punch
                self._to_punch = set()
                written = self._written
            assert self._data is not None
            try:
                self._data.sync()  # I3: every byte of generation <= `generation` is on disk...
                if not rewrites_only:
                    self._map.write(  # ...before the map says so
                        [
                            (bm.META_DURABLE, generation.to_bytes(8, "big")),
                            (bm.META_WRITTEN, written.to_bytes(8, "big")),
                        ],
                        sync=True,
                    )
            except BaseException:
                self._dirty = True  # the next flush must not take this for synced
                raise
            if self._sidecar is not None and not rewrites_only:  # (never names what the WAL had not synced)
                self._sidecar.write(generation)
            with self.lock:  # I4: their entries are durable now; blocks written since left the set
                if not rewrites_only:
                    self._synced = generation
                    self._unsynced_prints -= unsynced
                self._data.punch(sorted(self._punching))
                self._punching.clear()
                if self._marks:
                    self._unmark_idle(generation)
                if self._tentative:  # what became DATA before this generation is durable now
                    self._tentative = {
                        b: v for b, v in self._tentative.items() if int.from_bytes(v[2:_HEAD], "big") > generation
                    }
                self._unpruned = False

    def verify_data(self) -> list[int] | None:
        """The DATA blocks whose bytes are none of the ones their entry fingerprints (damage), or None if the
        overlay is of an older format whose prints are not kept current (opened read-only, not upgraded).
        Opened read-only after an unclean stop, blocks of the regions its next writable open scrubs (I7) are
        not counted. For `nbdclone check`, on an overlay nobody else has open."""
        if self.format != bm.FORMAT or self._data is None:
            return None
        if not self._readonly:
            with self.lock:
                self._spill()  # the map holds every entry and print
            entries: Iterable[tuple[int, bytes]] = self._map.entries()
        else:  # what a writer's journal holds overlays the map
            journaled = self._journal.entries() if self._journal is not None else []
            entries = _merged(self._map.entries(), journaled) if journaled else self._map.entries()
        # (`_pending` is empty: spilled above, or read-only)
        return [block for block, _ in self._misprinted(entries) if not self._in_window(block)]

    def bytes_written(self) -> int:
        return self._written

    def close(self) -> None:
        closed = False
        self._stop_scrub.set()
        if self._scrubber is not None:
            self._scrubber.join()
        window = self._window
        try:
            if not self._readonly and not self._full:
                self.flush()
                self._map.write(  # every rewrite is durable now: no mark is needed but a window's (I7)
                    [
                        (bm.META_OPEN, _CLOSED),
                        # (every byte is synced: the last flush may have skipped the WAL sync for rewrites)
                        (bm.META_DURABLE, (self._gen - 1).to_bytes(8, "big")),
                        (bm.META_WRITTEN, self._written.to_bytes(8, "big")),
                        *[(bm.mark_key(r), None) for r in self._marks if window is not None and r not in window],
                    ],
                    sync=True,
                )
                closed = True
                if self._sidecar is not None:
                    self._sidecar.write(self._gen - 1, sync=True)
        finally:
            if self._sidecar is not None:
                self._sidecar.close()
            if self._data is not None:
                self._data.close()
            if self._journal is not None:  # kept unless the map holds all it held, durably
                self._journal.close(remove=closed)
            self._map.close()


def _heads(generation: int) -> dict[int, bytes]:
    """The start of the tentative entry of a block that was BASE or ZEROED, in `generation`."""
    return {BASE: tentative_head(BASE, generation), ZEROED: tentative_head(ZEROED, generation)}


def _merged(
    entries: Iterator[tuple[int, bytes]], journaled: list[tuple[bytes, bytes | None]]
) -> list[tuple[int, bytes]]:
    """The map's (block, value) entries with a journal's entries laid over them, in block order (read-only
    opens: the journal stays as the writer left it)."""
    out = dict(entries)
    for k, value in journaled:
        block = int.from_bytes(k[1:], "big")
        if value is None:
            out.pop(block, None)
        else:
            out[block] = value
    return sorted(out.items())


class _Tries:
    """Something that failed for want of space (a writable open of the map, an overlay's start), tried again
    at most every REOPEN_EVERY seconds: each try writes (RocksDB's info log, some 25 KB), which on a full
    disk ate the space the writes waited for. Between tries, `attempt` fails at once with the last error."""

    def __init__(self, what: str) -> None:
        self._what = what
        self.next = 0.0  # (monotonic) when the next try may run
        self._failed: BaseException | None = None

    def attempt(self, fn: Callable[[], T]) -> T:
        now = time.monotonic()
        failed = self._failed
        if failed is not None and now < self.next:
            raise StorageError(getattr(failed, "errno", None) or errno.EIO, what=self._what, detail=str(failed))
        self.next = now + REOPEN_EVERY
        try:
            done = fn()
        except (OSError, StorageError) as exc:
            self._failed = exc
            raise
        self._failed = None
        return done


class LateOverlay:
    """The overlay of a clone whose own could not be started for want of space (a new clone, or one moving
    to a new version, on a full disk). Nothing is written yet, so every block reads from the base; a write
    first tries to start the overlay (`start(lock)`, at most every REOPEN_EVERY seconds) and gets ENOSPC
    until that finds room; from then on the started overlay serves, under the same lock."""

    def __init__(self, start: Callable[[threading.Lock], RocksOverlay], path: str) -> None:
        self.lock = threading.Lock()
        self._start = start
        self._path = path
        self._started: RocksOverlay | None = None
        self._starts = _Tries(path)

    def scan(self) -> Iterator[Change]:
        return iter(())

    def read(self, buf: memoryview, offset: int) -> None:
        assert self._started is not None, "no block is DATA before the overlay starts"
        self._started.read(buf, offset)

    def update(
        self, bufs: Sequence[bytes | bytearray | memoryview], offset: int, moves: Sequence[Move], *, written: int
    ) -> None:
        started = self._started
        if started is None:
            # (an error, ENOSPC or other, goes to the client)
            started = self._started = self._starts.attempt(lambda: self._start(self.lock))
            log.info("%s: its overlay started", self._path)
        started.update(bufs, offset, moves, written=written)

    def flush(self) -> None:
        if self._started is not None:
            self._started.flush()

    def bytes_written(self) -> int:
        return 0 if self._started is None else self._started.bytes_written()

    def close(self) -> None:
        if self._started is not None:
            self._started.close()


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
