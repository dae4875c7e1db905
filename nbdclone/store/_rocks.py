"""The RocksDB overlay: a block map (`_blockmap`) beside a data file (`_datafile`), kept by the invariants
in `overlay` (I1-I6). The write paths, each with the order in which its parts reach the disk:

    path              when                                  order (-> : happens before; ack: the reply)
    rewrite           the block is DATA, durably            pwritev -> ack; its print is held in memory and
                                                              reaches the WAL (tentative(DATA, gen, print))
                                                              in one batch at the next flush's start
    first write       a block becomes DATA                  pwritev -> WAL: tentative(prev, gen, print) -> ack
    tentative rewrite the block became DATA since the       WAL: tentative(prev, gen, old print, new print)
                      last flush                              -> pwritev -> ack
    zero / trim       a block becomes ZEROED / BASE         WAL: z / delete -> ack; bytes kept (I4)
    flush, FUA        always (nothing to do if unchanged)   lock{gen += 1} -> fdatasync(data)
                                                              -> WAL: durable = gen -> WAL sync -> ack
                                                              -> lock{punch blocks that stopped being DATA}
    open              after a clean close                   WAL: open (unsynced: ordered before any entry)
    recovery          opened after any unclean stop         tentative entries after `durable` whose block
                                                              does not hold a fingerprinted content go back
                                                              to their previous state (I3) -> fdatasync(data)
                                                              -> WAL: fixes, durable (synced)
                                                              -> punch every block that is not DATA
    close             the last connection ends              flush -> WAL: closed (synced)

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
from collections.abc import Iterator, Sequence
from pathlib import Path

from nbdclone.errors import Damaged, StorageError
from nbdclone.store import _blockmap as bm
from nbdclone.store._datafile import NAME as DATA_FILE
from nbdclone.store._datafile import DataFile
from nbdclone.store._fs import fsync_dir, runs
from nbdclone.store._recovery import Recovered, decode, fingerprint, prints_of, recover, tentative, tentative_head
from nbdclone.store.overlay import BASE, BLOCK_SIZE, DATA, ZEROED, Change, Move

_SHIFT = BLOCK_SIZE.bit_length() - 1
_INDEX = bm.INDEX

log = logging.getLogger(__name__)

LEGACY_MARK = "EMPTY"  # nbdclone 0.1 kept some overlays' maps in the data file's extents (unreliable: I1)
_OPEN, _CLOSED = b"1", b"0"
PENDING_PRINTS = 16384  # prints of in-place rewrites held in memory (about 1.5 MiB) before a batch to the map


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
        self._full = False  # opened read-only for want of space: writes get ENOSPC until a reopen succeeds
        self.format: bytes | None = None
        self._reprinted = 0  # blocks whose print was refreshed after an unclean stop (see _mismatch)
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
        # Blocks that became DATA in a generation not yet durable: block -> (prev state, generation, print).
        self._tentative: dict[int, tuple[int, int, bytes]] = {}
        self._to_punch: set[int] = set()  # blocks that stopped being DATA; their entries are not yet durable
        self._pending: dict[int, bytes] = {}  # block -> print of bytes rewritten in place, not yet in the map
        self._punching: set[int] = set()  # ... whose entries the running (or last failed) flush makes durable

    # -- open and recovery ---------------------------------------------------------------------------

    def _start(self, create: bool) -> list[Change]:
        """Open the map and the data file, and recover if the last writer did not close."""
        self._map = bm.BlockMap(self.path, create=create, readonly=self._readonly)
        self._data: DataFile | None = None
        try:
            self._data = DataFile(self.path / DATA_FILE, BLOCK_SIZE, readonly=self._readonly)
            return self._open_map(create)
        except BaseException:
            if self._data is not None:
                self._data.close()
            self._map.close()
            raise

    def _retry_writable(self) -> None:
        """Opened read-only on a full disk: try to open for writing again (space may be back). Caller holds
        `lock`; nothing was written meanwhile, so the map it finds is the one the clone reads."""
        old_map, old_data = self._map, self._data
        self._readonly = False
        try:
            self._start(False)
        except StorageError:
            self._readonly = True
            self._map, self._data = old_map, old_data
            raise
        old_map.close()
        if old_data is not None:
            old_data.close()
        self._full = False
        log.info("overlay %s is writable again", self.path)

    def _open_map(self, create: bool) -> list[Change]:
        m, data = self._map, self._data
        assert data is not None
        old_format = self.format = self._check_format(create)
        self._written = int.from_bytes(m.get(bm.META_WRITTEN) or b"", "big")
        durable = int.from_bytes(m.get(bm.META_DURABLE) or b"", "big")
        self._trust = int.from_bytes(m.get(bm.META_TRUST) or b"", "big")
        unclean = m.get(bm.META_OPEN) == _OPEN
        rec = recover(m.entries(), unclean=unclean, durable=durable, read_block=data.read_block)
        last = max((block for block, state in rec.states if state == DATA), default=-1)
        if last >= data.size_blocks():  # the file was cut short under the map: its blocks are gone
            raise Damaged(path=data.path, detail=f"it ends before block {last}, which its map says holds data")
        self._gen = max(rec.last_generation, durable) + 1
        if unclean:
            # A power cut may have kept a rewrite's bytes and lost the WAL record naming them: every entry
            # from before this open is trusted only once its block has been read (or scrubbed) again.
            self._trust = self._gen
        if self._readonly:
            return rec.states
        if not unclean:
            m.write([(bm.META_OPEN, _OPEN)])  # unsynced: in the WAL before any entry of this session
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
            [
                *rec.fixes,
                (bm.META_DURABLE, (self._gen - 1).to_bytes(8, "big")),
                (bm.META_TRUST, self._trust.to_bytes(8, "big")),
            ],
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
        values = self._map.get_many([bm.key(b) for b in range(first, stop)])
        pending = self._pending
        for k, value in enumerate(values):
            prints = None if value is None else prints_of(value)
            if prints is None:
                continue
            mark = fingerprint(whole[k << _SHIFT : (k + 1) << _SHIFT])
            if pending and (newer := pending.get(first + k)) is not None:
                if mark == newer:  # rewritten in place since the last flush: the map's print is older
                    continue
                value = None  # what this process wrote there itself: any other bytes are damage
            elif mark in prints:
                continue
            self._mismatch(first + k, value, mark)
        if whole is not buf:
            at = offset - (first << _SHIFT)
            buf[:] = whole[at : at + len(buf)]

    def _mismatch(self, block: int, value: bytes | None, mark: bytes) -> None:
        """A block's bytes are not what its entry (`value`; None: this process's own last write) names.
        Damage, unless the entry is from before an unclean stop (a rewrite's bytes may have reached the disk
        without the record naming them): then the bytes are the block's (old or new, as after any crash), and
        its entry is made to say so."""
        if value is not None and decode(value).generation < self._trust:
            if not self._reprinted:
                log.warning(
                    "overlay %s: blocks rewritten around its last unclean stop get new prints as they are read "
                    "(first: block %d); 'nbdclone check --repair' does them all",
                    self.path,
                    block,
                )
            self._reprinted += 1
            if not self._readonly:
                self._map.put(bm.key(block), tentative(DATA, self._gen, mark))
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
        tentative_blocks = self._tentative
        if len(bufs) == 1 and len(bufs[0]) == BLOCK_SIZE and len(moves) <= 1:  # the hot path: one block
            block = offset >> _SHIFT
            buf = bufs[0]
            if moves:  # a first write
                data.write(bufs, offset, BLOCK_SIZE)
                self._first_writes([(block, moves[0][1])], memoryview(buf), block)
            elif block in tentative_blocks:
                self._rewrite_tentative([(block, buf)])
                data.write(bufs, offset, BLOCK_SIZE)
            else:
                self._write_in_place(bufs, offset, BLOCK_SIZE, [(block, buf)])
        else:
            self._update(bufs, offset, moves)
        self._written += written
        self._dirty = True  # after the map: a flush that sees it covers this update (I3)

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
        if len(firsts) < stop - first:  # rewrites: a tentative entry names the new bytes before they are written
            tentative_blocks = self._tentative
            changed = {block for block, _, _ in moves}
            pieces = [(b, whole[(b - first) << _SHIFT : (b - first + 1) << _SHIFT]) for b in range(first, stop)]
            again = [p for p in pieces if p[0] not in changed and p[0] in tentative_blocks]
            if again:
                self._rewrite_tentative(again)
            durable = [p for p in pieces if p[0] not in changed and p[0] not in tentative_blocks]
        if durable:
            self._write_in_place(bufs, offset, length, durable)  # their prints once the bytes are written
        else:
            data.write(bufs, offset, length)
        if firsts:
            self._first_writes(firsts, whole, first, others=moves)
        else:
            self._apply(moves)

    def _first_writes(
        self, firsts: Sequence[tuple[int, int]], whole: memoryview, first: int, others: Sequence[Move] = ()
    ) -> None:
        """Blocks whose bytes are written (`whole` holds them, from block `first` on) become DATA: tentative
        entries (I3), in one batch with the changes of `others` that are not first writes."""
        gen = self._gen
        heads = {BASE: tentative_head(BASE, gen), ZEROED: tentative_head(ZEROED, gen)}  # not DATA: KeyError
        tentative_blocks = self._tentative
        batch: list[tuple[bytes, bytes | None]] = []
        append = batch.append
        for block, old in firsts:
            at = (block - first) << _SHIFT
            mark = fingerprint(whole[at : at + BLOCK_SIZE])
            append((_INDEX + block.to_bytes(8, "big"), heads[old] + mark + mark))  # rewrites' size: in place
            tentative_blocks[block] = (old, gen, mark)
        if len(batch) == 1 and not others:
            self._map.put(*batch[0])  # type: ignore[arg-type]
        else:
            self._apply(others, batch)
        if self._to_punch or self._punching:
            for block, _ in firsts:
                self._to_punch.discard(block)
                self._punching.discard(block)

    def _rewrite_tentative(self, blocks: Sequence[tuple[int, bytes | bytearray | memoryview]]) -> None:
        """Blocks that are DATA since a generation not yet durable get new bytes: their entries name both the
        acknowledged and the new bytes before the new bytes are written (a kill in between keeps either)."""
        batch: list[tuple[bytes, bytes | None]] = []
        for block, buf in blocks:
            prev, gen, acked = self._tentative[block]
            mark = fingerprint(buf)
            batch.append((bm.key(block), tentative(prev, gen, acked, mark)))
            self._tentative[block] = (prev, gen, mark)
        if len(batch) == 1:
            self._map.put(*batch[0])  # type: ignore[arg-type]
        else:
            self._map.write(batch)

    def _write_in_place(
        self,
        bufs: Sequence[bytes | bytearray | memoryview],
        offset: int,
        length: int,
        durable: Sequence[tuple[int, bytes | bytearray | memoryview]],
    ) -> None:
        """Write `bufs` where `durable` blocks are DATA durably; their new prints are noted only once the
        bytes are written. A failed write (a full copy-on-write file system fails even overwrites) may have
        written some blocks: their prints are taken from what the file holds."""
        assert self._data is not None
        try:
            self._data.write(bufs, offset, length)
        except BaseException:
            for block, _ in durable:
                with contextlib.suppress(OSError, StorageError):
                    self._pending[block] = fingerprint(self._data.read_block(block))
            raise
        self._rewrite_durable(durable)

    def _rewrite_durable(self, blocks: Sequence[tuple[int, bytes | bytearray | memoryview]]) -> None:
        """Blocks that are DATA durably get new bytes in place. Their new prints are kept in memory
        (`_pending`, which reads check first) and reach the map in one batch at the start of the next flush
        (`_write_pending`), or sooner if many pile up. Nothing is lost to a kill or power cut before then:
        the block holds old or new bytes under its old entry, and after the unclean stop entries from before
        it are trusted again as their blocks are read (`_mismatch`)."""
        pending = self._pending
        for block, buf in blocks:
            pending[block] = fingerprint(buf)
        if len(pending) >= PENDING_PRINTS:
            self._write_pending()

    def _write_pending(self) -> None:
        """The prints of blocks rewritten in place, into the map (one batch, unsynced: the next flush's
        WAL sync makes them durable). Caller holds `lock`."""
        if self._pending:
            gen = self._gen
            self._map.write([(bm.key(b), tentative(DATA, gen, mark)) for b, mark in self._pending.items()])
            self._pending = {}

    def _apply(self, moves: Sequence[Move], batch: list[tuple[bytes, bytes | None]] | None = None) -> None:
        """Map changes of blocks that leave DATA, or stay out of it, in one batch (with `batch`, if given)."""
        batch = batch if batch is not None else []
        freed: list[int] = []
        for block, old, new in moves:
            if new == DATA:
                continue  # in `batch` already
            if new != old:
                batch.append((bm.key(block), bm.ZERO if new else None))
            self._tentative.pop(block, None)
            self._pending.pop(block, None)
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
                if not (self._dirty or self._pending or self._to_punch or self._punching or self._map.broken):
                    return  # nothing since the last flush: a boot flushes often, twice in a row at times
                if self._map.broken:
                    self._map.reopen()
                self._write_pending()  # in the generation being flushed: durable with it (I6)
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
                if self._tentative:  # what became DATA before this generation is durable now
                    self._tentative = {b: t for b, t in self._tentative.items() if t[1] > generation}

    def verify_data(self, *, scrub: bool = False) -> list[int] | None:
        """The DATA blocks whose bytes are none of the ones their entry fingerprints (damage), or None if the
        overlay is of an older format whose prints are not kept current (opened read-only, not upgraded).
        Entries from before an unclean stop are trusted as their blocks read (see `_mismatch`); `scrub`
        (writable) fixes them all and, if nothing is damaged, trusts every entry again. For `nbdclone check`,
        on an overlay nobody else has open."""
        if self.format != bm.FORMAT or self._data is None:
            return None
        bad = []
        fixes: list[tuple[bytes, bytes | None]] = []
        for block, value in self._map.entries():
            prints = prints_of(value)
            if prints is None:
                continue
            mark = fingerprint(self._data.read_block(block))
            newer = self._pending.get(block)
            if mark in prints if newer is None else mark == newer:
                continue
            if newer is not None:
                bad.append(block)
                continue
            if decode(value).generation < self._trust:
                fixes.append((bm.key(block), tentative(DATA, 0, mark)))
            else:
                bad.append(block)
        if scrub and not self._readonly:
            self._data.sync()
            self._map.write([*fixes, *([] if bad else [(bm.META_TRUST, None)])], sync=True)
            if not bad:
                self._trust = 0
        return bad

    def bytes_written(self) -> int:
        return self._written

    def close(self) -> None:
        try:
            if not self._readonly and not self._full:
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
