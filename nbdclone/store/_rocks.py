"""The RocksDB overlay: the only module that imports rocksdict.

An overlay directory holds a RocksDB database, the clone's block map, and DATA_FILE, a sparse file laid
out like the disk that holds the bytes of the clone's DATA blocks:

    RocksDB  b"i" + block (8 bytes, big-endian) -> b"d" (data) or b"z" (zero)
             b"m/written" -> bytes-written counter   b"m/format" -> b"2"   b"m/open" -> b"1" while served
    blocks   block * BLOCK_SIZE -> the block's bytes   (holes everywhere else)

Why the bytes are not in RocksDB: a 4 KiB value goes through the WAL, the memtable, an SST and every
compaction that rewrites it; measured here that capped 4 KiB random writes at 16k/s and 1 MiB writes at
0.11x a plain file. A write is one pwritev of the client's buffer instead.

Why "became DATA" is not written to RocksDB per request: a batch per first write of a block cost half the
4 KiB random-write rate. A block holds data in the data file exactly when the map says (or will say) DATA:
blocks that stop being DATA are punched out *before* their new map entry is written, and a block's bytes
are written before it becomes DATA. So the map's DATA entries can be written lazily (with the next flush,
FUA write, batch of other changes, or every _PENDING_MAX blocks) and recovered after a crash from the data
file itself: b"m/open" is set while an overlay is open for writing, and an open that finds it set (the
server was killed) adds every block the data file holds to the map as DATA before anything reads the map.
Other changes (zero markers, trims) are written before the request is acknowledged; pending blocks among
them are mapped before their punch.

Space: where the file system can say which extents were written (FIEMAP: ext4, XFS, btrfs), the data file's
space is reserved 1 MiB at a time ahead of the writes (unwritten extents, which read as zeros): a first write
into reserved space skips the block allocation, the largest cost of a 4 KiB write after the request itself.
Recovery then goes by FIEMAP's written extents, not by SEEK_DATA, which also counts cached pages of reserved
space as data (a reader of the file would turn never-written blocks into zero "data"); reserved space that
was not written is released when the overlay closes, so a closed clone holds only its data. Elsewhere (tmpfs)
the file stays sparse and recovery uses SEEK_DATA.

Durability: an acknowledged write's bytes are in the page cache and its other map changes in the WAL, so it
survives kill -9 of the server; a flush or FUA write fdatasyncs the data file, writes the pending entries
and syncs the WAL, so everything acknowledged before it survives power loss as well.

The file as the map: a new overlay is marked EMPTY_MARK, which says that the data file alone is the map
(a written extent is DATA, a hole is BASE) and the database holds none of it. Opening a marked overlay opens
no database (only its lock is taken), and where FIEMAP tells written extents apart, writes and trims keep it
that way: a write is its pwritev, a trim its punch, a flush or FUA write one fdatasync, and the next open
reads the map off the file's extents. The first change the file cannot express (a zero marker over a
non-zero base block) moves the overlay to the database: every DATA block is written to the map, synced,
and only then is the mark removed (durably), so a crash in between leaves a marked overlay whose database
entries are ignored (and cleared by the next move). So a clone that a boot reads and writes without
zeroing costs no RocksDB open or close (3.4 + 1.4 ms, most of it holding the GIL), and its syncs no WAL
sync. A marked overlay reserves no space ahead: ext4 may turn a reserved extent written in part into a
written one, zeroing the rest (when splitting it fails for lack of space, or on a nodelalloc mount), and
the file would then claim those blocks as zero data. So once _FILEMAP_MAX blocks are DATA (a clone that
writes a lot, not a boot), the overlay moves to the database too, and reserves from then on. The
bytes-written counter of a marked overlay is kept in WRITTEN_FILE, saved at every flush and close.

All overlays of a process share one block cache and one write-buffer budget (FACTS: per-database defaults of
32 MiB + 128 MiB would not scale to hundreds of clones).
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import rocksdict

from nbdclone.errors import StorageError
from nbdclone.store._fs import data_ranges, extents, fsync_dir, has_extent_map, preallocate, punch_hole, runs
from nbdclone.store.overlay import BLOCK_SIZE, DATA, ZEROED, Change

DATA_FILE = "blocks"  # a name RocksDB does not parse as one of its own files, so it never deletes it
EMPTY_MARK = "EMPTY"  # present while the map is the data file alone (the database holds none of it)
WRITTEN_FILE = "written"  # a marked overlay's bytes-written counter (8 bytes, big-endian)
_OLD_DATA = b"b"  # format 1 kept block bytes in RocksDB under this prefix
_INDEX = b"i"
_VALUE = {DATA: b"d", ZEROED: b"z"}
_STATE = {v: k for k, v in _VALUE.items()}
_META_WRITTEN = b"m/written"
_META_FORMAT, _FORMAT = b"m/format", b"2"
_META_OPEN, _OPEN, _CLOSED = b"m/open", b"1", b"0"
_PENDING_MAX = 8192  # blocks that became DATA before their map entries are written anyway (~0.5 MiB)
_GROUP_SHIFT = 20  # the data file's space is reserved 1 MiB at a time (measured: 64 KiB groups gain nothing)
_FILEMAP_MAX = 4096  # DATA blocks (16 MiB) a marked overlay holds before it moves to the database
_BLOCK_SHIFT = BLOCK_SIZE.bit_length() - 1
_GROUP_BLOCKS = _GROUP_SHIFT - _BLOCK_SHIFT  # block >> _GROUP_BLOCKS: its group

BLOCK_CACHE_BYTES = 32 << 20  # the block cache every overlay of a process shares
_shared_lock = threading.Lock()
_shared: tuple[rocksdict.Cache, rocksdict.WriteBufferManager] | None = None


def _shared_resources() -> tuple[rocksdict.Cache, rocksdict.WriteBufferManager]:
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = (rocksdict.Cache(BLOCK_CACHE_BYTES), rocksdict.WriteBufferManager(64 << 20, False))
        return _shared


def _ikey(block: int) -> bytes:
    return _INDEX + block.to_bytes(8, "big")


def _options(create: bool) -> rocksdict.Options:
    cache, wbm = _shared_resources()
    opts = rocksdict.Options(raw_mode=True)
    opts.create_if_missing(create)
    opts.set_max_open_files(64)
    opts.set_write_buffer_manager(wbm)
    opts.set_write_buffer_size(32 << 20)
    opts.set_keep_log_file_num(2)
    # An overlay has a handful of SST files: opening them on 16 threads started and joined at every open
    # cost more than it saved (open 4.3 -> 3.4 ms, most of it holding the GIL), as did the stats update.
    opts.set_max_file_opening_threads(1)
    opts.set_skip_stats_update_on_db_open(True)
    # Compression costs more CPU than anything else a write does here (perf: snappy was 13% of a random
    # 4 KiB write workload) and guest blocks are often already compressed or encrypted.
    opts.set_compression_type(rocksdict.DBCompressionType.none())
    table = rocksdict.BlockBasedOptions()
    table.set_block_cache(cache)
    opts.set_block_based_table_factory(table)
    return opts


def _errno_of(exc: Exception) -> int:
    text = str(exc)
    if "No space left" in text or "ENOSPC" in text:
        return errno.ENOSPC
    if "Read-only file system" in text:
        return errno.EROFS
    if "lock" in text.lower() and ("LOCK" in text or "Resource temporarily" in text):
        return errno.EBUSY
    return errno.EIO


class RocksOverlay:
    """An overlay in one directory: RocksDB block map + sparse data file. One handle per clone per process."""

    def __init__(self, path: Path, *, create: bool = False, readonly: bool = False) -> None:
        self.path = path
        self._readonly = readonly
        if not create and not (path / "CURRENT").is_file():
            # rocksdict creates the directory even when create_if_missing is off: check first.
            raise StorageError(errno.ENOENT, what=f"overlay {path}", detail="does not exist")
        self._db: rocksdict.Rdict
        self._fd = -1
        self._lock_fd = -1  # while marked and writable: our hold of the database's LOCK (in use, to others)
        self._pending: set[int] = set()  # blocks that became DATA; their map entries are not written yet
        self._recovered: set[int] = set()  # read-only open of a crashed overlay: DATA blocks found by allocation
        self._fiemap = False  # whether the data file's file system tells written extents apart (FIEMAP)
        self._reserve = False  # whether the data file's space is reserved ahead of writes
        self._filemap_blocks = 0  # a marked overlay's DATA blocks (those of its open, plus those since)
        self._reserved: set[int] = set()  # groups (1 << _GROUP_SHIFT bytes) reserved since the open
        self._written = 0
        self._changed = False  # whether anything was written or changed since the last flush began
        self._needs_reopen = False
        self._start_lock = threading.Lock()
        self._filemap = not create and (path / EMPTY_MARK).exists()
        self._saved_written = 0
        if not self._filemap:
            self._start(create)
            return
        if not readonly:
            self._lock_fd = _hold_lock(path)
        if (path / DATA_FILE).exists():
            self._open_data_file()
        try:
            self._written = self._saved_written = int.from_bytes((path / WRITTEN_FILE).read_bytes(), "big")
        except FileNotFoundError:
            pass

    def _start(self, create: bool) -> None:
        """Open the database and the data file (recovering after a kill)."""
        self._db = self._open(create)
        try:
            self._check_format()
            raw = self._db.get(_META_WRITTEN)
            self._written = int.from_bytes(raw, "big") if raw else 0
            try:
                self._open_data_file()
            except FileNotFoundError:  # read-only, and nothing was ever written
                pass
            if self._db.get(_META_OPEN) == _OPEN:
                self._recover()
            if not self._readonly:
                # Not synced: a kill -9 finds it in the WAL (which the process does not buffer), and the WAL
                # sync of the first flush makes it durable before anything written after it is (syncing
                # here took 0-12 ms of every clone's open: the opening of a 32-clone storm).
                self._db.put(_META_OPEN, _OPEN)
        except BaseException:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            self._db.close()
            raise

    def _open_data_file(self) -> None:
        flags = os.O_RDONLY if self._readonly else os.O_RDWR | os.O_CREAT
        self._fd = os.open(self.path / DATA_FILE, flags | os.O_CLOEXEC, 0o644)
        self._fiemap = has_extent_map(self._fd)
        self._reserve = not self._readonly and self._fiemap and not self._filemap

    def _to_database(self) -> None:
        """Move a marked overlay's map into the database (see the module's docstring for the order)."""
        with self._start_lock:
            if not self._filemap:
                return
            found = self.stored_blocks()
            self._db = self._open(False)  # RocksDB locks LOCK again: one process, so our hold stays until close
            try:
                self._check_format()
                batch = rocksdict.WriteBatch(raw_mode=True)
                for block, _ in list(self._scan_map()):  # left by a move that a crash cut short
                    batch.delete(_ikey(block))
                for block in found:
                    batch.put(_ikey(block), _VALUE[DATA])
                batch.put(_META_WRITTEN, self._written.to_bytes(8, "big"))
                batch.put(_META_OPEN, _OPEN)
                self._db.write(batch)
                self._db.flush_wal(True)
                (self.path / EMPTY_MARK).unlink()
                fsync_dir(self.path)
            except BaseException as exc:
                self._db.close()
                if isinstance(exc, OSError):
                    raise StorageError(exc.errno or errno.EIO, what=f"overlay {self.path}", detail=str(exc)) from exc
                raise
            (self.path / WRITTEN_FILE).unlink(missing_ok=True)  # the database keeps the counter from now on
            self._filemap = False
            if self._fd < 0:
                self._open_data_file()
            self._reserve = not self._readonly and self._fiemap

    def _close_lock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # after the database's close: closing it drops this process's lock
            self._lock_fd = -1

    def _open(self, create: bool) -> rocksdict.Rdict:
        # The column family's options are passed too: without them rocksdict reopens an existing database
        # with the ones its OPTIONS file records, and a block cache of its own (8 MiB per overlay) instead
        # of the process's shared one.
        opts = _options(create and not self._readonly)
        access = rocksdict.AccessType.read_only() if self._readonly else rocksdict.AccessType.read_write()
        try:
            return rocksdict.Rdict(str(self.path), opts, column_families={"default": opts}, access_type=access)
        except Exception as exc:
            raise StorageError(_errno_of(exc), what=f"opening overlay {self.path}", detail=str(exc)) from exc

    def _check_format(self) -> None:
        if self._db.get(_META_FORMAT) == _FORMAT:
            return
        it = self._db.iter()
        it.seek(_OLD_DATA)
        if it.valid() and it.key().startswith(_OLD_DATA):
            raise StorageError(
                errno.EPROTO,
                what=f"overlay {self.path}",
                detail="holds data in the format of an older nbdclone; export it with that version, then reset",
            )
        if not self._readonly:  # empty or zero-only overlays of format 1 are already format 2
            self._db.put(_META_FORMAT, _FORMAT)

    def _recover(self) -> None:
        """The overlay was not closed (the server was killed): blocks written since the map was last
        written hold data in the data file but may lack their DATA entries. Add them."""
        mapped = {block for block, state in self._scan_map() if state == DATA}
        found = self.stored_blocks() - mapped
        if self._readonly:
            self._recovered = found
            return
        if found:
            batch = rocksdict.WriteBatch(raw_mode=True)
            for block in found:
                batch.put(_ikey(block), _VALUE[DATA])
            self._db.write(batch)
            self._db.flush_wal(True)
        self._release_reserved()  # what the killed server reserved and never wrote

    def stored_blocks(self) -> set[int]:
        """The blocks whose bytes the data file holds: those the map says (or will say) are DATA."""
        found: set[int] = set()
        if self._fd < 0:
            return found
        if has_extent_map(self._fd):
            # A marked overlay never reserved space: its extents are exact without a write-back.
            sync = not self._filemap
            if sync:
                os.fsync(self._fd)  # written back, the written parts of reserved space are written extents
            for start, end, unwritten in extents(self._fd, sync=sync):
                if not unwritten:
                    found.update(range(start // BLOCK_SIZE, -(-end // BLOCK_SIZE)))
            return found
        st = os.fstat(self._fd)
        reported = 0
        for start, end in data_ranges(self._fd, st.st_size):
            found.update(range(start // BLOCK_SIZE, -(-end // BLOCK_SIZE)))
            reported += end - start
        if reported > st.st_blocks * 512 + (1 << 20):
            # A file system that reports holes as data would turn every unwritten block into zeros here.
            raise StorageError(
                errno.EOPNOTSUPP,
                what=f"overlay {self.path}",
                detail="its file system does not report holes (SEEK_HOLE), so the blocks written before "
                "the server was killed cannot be told apart; put the store on ext4, XFS, btrfs or tmpfs",
            )
        return found

    def _scan_map(self) -> Iterator[Change]:
        it = self._db.iter()
        it.seek(_INDEX)
        while it.valid():
            key = it.key()
            if not key.startswith(_INDEX):
                break
            yield int.from_bytes(key[1:], "big"), _STATE[it.value()]
            it.next()

    def scan(self) -> Iterator[Change]:
        if self._filemap:
            found = self.stored_blocks()
            self._filemap_blocks = len(found)
            yield from ((block, DATA) for block in sorted(found))
            return
        if not self._recovered:
            yield from self._scan_map()
            return
        merged = dict(self._scan_map())
        merged.update(dict.fromkeys(self._recovered, DATA))
        yield from sorted(merged.items())

    def read(self, buf: memoryview, offset: int) -> None:
        try:
            n = os.preadv(self._fd, [buf], offset)
        except OSError as exc:
            raise StorageError(exc.errno or errno.EIO, what=f"reading overlay {self.path}", detail=str(exc)) from exc
        if n != len(buf):
            raise StorageError(errno.EIO, what=f"overlay {self.path}", detail=f"short read at {offset}: {n} bytes")

    def write(self, bufs: Sequence[bytes | bytearray | memoryview], offset: int) -> None:
        if self._readonly:
            raise StorageError(errno.EROFS, what=f"overlay {self.path}", detail="opened read-only")
        if self._filemap and not self._fiemap:
            if self._fd < 0:
                try:
                    self._open_data_file()
                except OSError as exc:
                    raise StorageError(exc.errno or errno.EIO, what=f"overlay {self.path}", detail=str(exc)) from exc
            if not self._fiemap:  # the file cannot be the map: holes and data would blur
                self._to_database()
        length = len(bufs[0]) if len(bufs) == 1 else sum(len(b) for b in bufs)
        if self._reserve:
            group = offset >> _GROUP_SHIFT
            if group not in self._reserved or (offset + length - 1) >> _GROUP_SHIFT != group:
                self._reserve_groups(offset, length)
        self._changed = True
        self._store(bufs, offset, length)

    def _store(self, bufs: Sequence[bytes | bytearray | memoryview], offset: int, length: int) -> None:
        try:
            n = os.pwritev(self._fd, bufs, offset)
            if n != length:  # a regular file writes all or fails; never let a short count pass
                os.pwrite(self._fd, b"".join(bufs)[n:], offset + n)
        except OSError as exc:
            raise StorageError(exc.errno or errno.EIO, what=f"writing overlay {self.path}", detail=str(exc)) from exc

    def write_block(self, buf: memoryview, offset: int, *, new: bool, sync: bool) -> None:
        if self._filemap or sync or self._readonly or self._needs_reopen or self._fd < 0:
            self.write((buf,), offset)
            self.apply([(offset >> _BLOCK_SHIFT, DATA)] if new else (), written=len(buf), sync=sync)
            return
        # In the database, unsynced: a pwrite, and a first write of the block joins the pending entries.
        if self._reserve and offset >> _GROUP_SHIFT not in self._reserved:
            self._reserve_groups(offset, BLOCK_SIZE)
        self._changed = True
        self._store((buf,), offset, BLOCK_SIZE)
        self._written += BLOCK_SIZE
        if new:
            self._pending.add(offset >> _BLOCK_SHIFT)
            if len(self._pending) >= _PENDING_MAX:
                self._write_map((), sync=False)

    def _reserve_groups(self, offset: int, length: int) -> None:
        """Reserve the groups a write of `length` bytes at `offset` covers in part (a write that fills a
        group allocates it in one go: reserving it first only costs a system call)."""
        end = offset + length
        for group in range(offset >> _GROUP_SHIFT, ((end - 1) >> _GROUP_SHIFT) + 1):
            lo, hi = group << _GROUP_SHIFT, (group + 1) << _GROUP_SHIFT
            if group not in self._reserved and not (offset <= lo and hi <= end):
                # Failing (no space left) only costs speed: the write itself reports what is wrong.
                preallocate(self._fd, group << _GROUP_SHIFT, 1 << _GROUP_SHIFT)
                self._reserved.add(group)

    def _release_reserved(self) -> None:
        """Give back the reserved space that holds no data: every unwritten extent, after write-back."""
        if not self._reserve:
            return
        for start, end, unwritten in list(extents(self._fd)):
            if unwritten:
                punch_hole(self._fd, start, end - start, what=f"overlay {self.path}")
        self._reserved.clear()

    def apply(self, changes: Sequence[Change], *, written: int = 0, sync: bool = False) -> None:
        if self._filemap:
            self._filemap_blocks += sum(state == DATA for _, state in changes)
            if self._filemap_blocks <= _FILEMAP_MAX and not any(state == ZEROED for _, state in changes):
                self._apply_to_file(changes, written=written, sync=sync)
                return
            self._to_database()
        self._written += written
        if not changes and not sync:  # rewriting written blocks: nothing to record
            return
        if changes:
            self._changed = True
        if self._needs_reopen:
            self._reopen()
        if len(changes) == 1:  # a write of one block: no comprehension
            others = [] if changes[0][1] == DATA else list(changes)
        else:
            others = [change for change in changes if change[1] != DATA]
        if others and self._pending and not self._pending.isdisjoint(block for block, _ in others):
            # Blocks written since the map was are about to be punched: map them first, or a crash right
            # after the punch would leave them reading as they did before those acknowledged writes.
            self._write_map((), sync=False)
        for block, state in changes:
            if state == DATA:
                self._pending.add(block)
            else:
                self._pending.discard(block)
        # Punch first: a crash before the batch must not leave bytes where the map says zero or base.
        if others:
            self._punch([block for block, _ in others])
        if sync:
            self._changed = False
        try:
            if sync:
                self._datasync()
            if others or sync or len(self._pending) >= _PENDING_MAX:
                self._write_map(others, sync=sync)
        except BaseException:
            self._changed = True  # the next flush must not take this for synced
            raise

    def _punch(self, blocks: list[int]) -> None:
        for start, count in runs(sorted(blocks)):
            punch_hole(self._fd, start * BLOCK_SIZE, count * BLOCK_SIZE, what=f"overlay {self.path}")
            # Punched space is no longer reserved: the next write there reserves its group again.
            self._reserved.difference_update(range(start >> _GROUP_BLOCKS, ((start + count - 1) >> _GROUP_BLOCKS) + 1))

    def _apply_to_file(self, changes: Sequence[Change], *, written: int, sync: bool) -> None:
        """A marked overlay's changes: a block that became DATA has its bytes written already, one that went
        back to the base is punched out, and a sync is an fdatasync of the data file."""
        self._written += written
        if changes:
            self._changed = True
            if self._fd >= 0:
                self._punch([block for block, state in changes if state != DATA])
        if sync:
            self._sync_file()

    def _sync_file(self) -> None:
        self._changed = False  # before syncing: what is written meanwhile waits for the next flush
        try:
            self._datasync()
            if self._written != self._saved_written:
                fd = os.open(self.path / WRITTEN_FILE, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
                try:
                    os.pwrite(fd, self._written.to_bytes(8, "big"), 0)
                finally:
                    os.close(fd)
                self._saved_written = self._written
        except BaseException:
            self._changed = True  # the next flush must not take this for synced
            raise

    def _write_map(self, others: Sequence[Change], *, sync: bool) -> None:
        """One batch: the pending DATA entries, `others`, and the counter; synced to disk if `sync`."""
        batch = rocksdict.WriteBatch(raw_mode=True)
        data = _VALUE[DATA]
        for block in self._pending:
            batch.put(_ikey(block), data)
        for block, state in others:
            if state in _VALUE:
                batch.put(_ikey(block), _VALUE[state])
            else:
                batch.delete(_ikey(block))
        batch.put(_META_WRITTEN, self._written.to_bytes(8, "big"))
        try:
            self._db.write(batch)
            if sync:
                self._db.flush_wal(True)
        except Exception as exc:
            self._failed(exc, "writing")
        self._pending.clear()

    def flush(self) -> None:
        if self._readonly or not (self._changed or self._needs_reopen):
            return  # nothing written since the last flush: a boot flushes often, twice in a row at times
        if self._filemap:
            self._sync_file()
            return
        self._changed = False  # before syncing: what is written meanwhile waits for the next flush
        try:
            if self._needs_reopen:
                self._reopen()
            self._datasync()
            self._write_map((), sync=True)
        except BaseException:
            self._changed = True
            raise

    def _datasync(self) -> None:
        if self._fd < 0:  # a marked overlay never written
            return
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            raise StorageError(exc.errno or errno.EIO, what=f"syncing overlay {self.path}", detail=str(exc)) from exc

    def _failed(self, exc: Exception, doing: str) -> None:
        # After a write error RocksDB stays read-only until resumed; rocksdict has no Resume(), so the
        # next request reopens the database (which recovers from the WAL) once space is back.
        self._needs_reopen = True
        raise StorageError(_errno_of(exc), what=f"{doing} overlay {self.path}", detail=str(exc)) from exc

    def _reopen(self) -> None:
        try:
            self._db.close()
        except Exception:  # noqa: S110 - the handle is being replaced; its close error adds nothing
            pass
        self._db = self._open(False)
        self._needs_reopen = False

    def bytes_written(self) -> int:
        return self._written

    def close(self) -> None:
        try:
            if not self._readonly:
                self.flush()
                if self._reserved:
                    self._release_reserved()
                if not self._filemap:
                    try:
                        self._db.put(_META_OPEN, _CLOSED)
                        self._db.flush_wal(True)
                    except Exception as exc:
                        raise StorageError(
                            _errno_of(exc), what=f"closing overlay {self.path}", detail=str(exc)
                        ) from exc
        finally:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            if not self._filemap:
                self._db.close()
            self._close_lock()


def create_overlay(path: Path) -> None:
    """Make a new, empty overlay at `path`, marked: its data file is its map, so opening it, and writing
    and trimming it, need no database until a change the file cannot hold (see the module docstring)."""
    RocksOverlay(path, create=True).close()
    (path / EMPTY_MARK).touch()
    fsync_dir(path)


def _hold_lock(path: Path) -> int:
    """Take the lock RocksDB takes on the overlay, so other processes see the overlay in use."""
    fd = os.open(path / "LOCK", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        raise StorageError(errno.EBUSY, what=f"opening overlay {path}", detail="another process has it open") from exc
    return fd


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
