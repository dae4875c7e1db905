"""An overlay's block map in RocksDB: the only module that imports rocksdict.

    b"i" + block (8 bytes, big-endian) -> DATA_DONE  b"d"                               DATA
                                          TENTATIVE  b"t" prev(1) gen(8) print(8) [print(8)]  DATA since
                                                     generation `gen`, its bytes fingerprinted (_recovery)
                                          ZERO       b"z"                               ZEROED
    b"m/format" -> b"4"    b"m/written" -> bytes written (8)    b"m/durable" -> last durable generation (8)
    b"m/open" -> b"1" while a server has it open, b"0" after a clean close
    b"m/trust" -> (left by nbdclone before marks) every entry below this generation may name stale bytes
    b"m/marks" -> b"1": the writer marks the regions it rewrites in place (a writer before marks did not)
    b"r" + region (8 bytes) -> b"": a mark, synced before a block of the region is rewritten in place (_rocks)
    b"m/journal" -> the id of the overlay's journal in /dev/shm (16), where entries wait for a flush (_journal)

One WriteBatch per request is atomic; the WAL is written (not synced) at every write, so a kill -9 of the
process keeps it; `sync` makes every earlier write durable. All overlays of a process share one block cache
and one write-buffer budget (FACTS: per-database defaults of 32 MiB + 128 MiB would not scale to hundreds of
clones).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import rocksdict

from nbdclone.errors import Damaged, StorageError

log = logging.getLogger(__name__)

INDEX = b"i"
DATA_DONE = b"d"
TENTATIVE = b"t"
ZERO = b"z"
META_FORMAT, FORMAT = b"m/format", b"4"
#: Format 3 is format 4 except that a block rewritten in place kept the print of its first bytes; format 2
#: had no prints. Both are brought to 4 at their first writable open (every DATA block fingerprinted).
UNPRINTED_FORMATS = (b"3", None)
META_WRITTEN = b"m/written"
META_DURABLE = b"m/durable"
#: Entries of a generation below this were made before an unclean stop, which may have kept a block's new
#: bytes but lost the WAL record naming them (a rewrite in place): their prints are trusted once read again.
META_TRUST = b"m/trust"
META_OPEN = b"m/open"
#: Present once a writer that marks its rewrites in place has opened the overlay (see REGION).
META_MARKS = b"m/marks"
#: Marks: a region of the disk where a block may hold rewritten bytes its entry does not name yet.
REGION = b"r"
#: The overlay's journal's id (16 random bytes): entries of acknowledged writes wait there until a flush
#: (_journal); a journal is replayed only into the map that names it.
META_JOURNAL = b"m/journal"
OLD_DATA = b"b"  # format 1 kept block bytes in RocksDB under this prefix

BLOCK_CACHE_BYTES = 32 << 20  # the block cache every overlay of a process shares
_shared_lock = threading.Lock()
_shared: tuple[rocksdict.Cache, rocksdict.WriteBufferManager] | None = None


def shared_resources() -> tuple[rocksdict.Cache, rocksdict.WriteBufferManager]:
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = (rocksdict.Cache(BLOCK_CACHE_BYTES), rocksdict.WriteBufferManager(64 << 20, False))
        return _shared


def key(block: int) -> bytes:
    return INDEX + block.to_bytes(8, "big")


def mark_key(region: int) -> bytes:
    return REGION + region.to_bytes(8, "big")


def _options(create: bool) -> rocksdict.Options:
    cache, wbm = shared_resources()
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
    # Map entries are tiny and incompressible enough; compression only costs CPU on the write path.
    opts.set_compression_type(rocksdict.DBCompressionType.none())
    # A block rewritten before the next flush gets its entry rewritten (two fingerprints, the same size
    # each time): updated in place, the memtable does not grow with rewrites and is not flushed to disk
    # for them (measured: a rewrite's put 5.7 -> 2.9 us, no level-0 file after 786k rewrites of 262k keys).
    # In-place updates need memtable writes from one writer at a time, which the overlay's lock gives.
    opts.set_allow_concurrent_memtable_write(False)
    opts.set_inplace_update_support(True)
    # Each memtable carries that many reader/updater lock stripes; RocksDB's default (10,000) took 530 of
    # the 730 KiB an open overlay's database cost (measured: 100 databases, RssAnon). 256 stripes: 200 KiB.
    opts.set_inplace_update_locks(256)
    # A damaged record in the middle of the WAL fails the open (the default, point-in-time recovery, stops
    # at it and silently drops every later record, synced ones too); a torn tail after a power cut is the
    # normal end of a log and is tolerated.
    opts.set_wal_recovery_mode(rocksdict.DBRecoveryMode.tolerate_corrupted_tail_records())
    opts.set_paranoid_checks(True)
    table = rocksdict.BlockBasedOptions()
    table.set_block_cache(cache)
    opts.set_block_based_table_factory(table)
    return opts


_CONFIG = "rocksdict-config.json"
_SHM = Path("/dev/shm")


def _readonly_logs() -> Path | None:
    """Where read-only opens put RocksDB's info log: a folder in memory of this user's only. /dev/shm is
    everyone's: a folder someone else made there (or a link) could send our log writes anywhere."""
    if not _SHM.is_dir():
        return None
    path = _SHM / f"nbdclone-rocksdb-logs-{os.geteuid()}"
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        st = path.lstat()
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        log.warning("%s is not a private folder of this user: read-only opens log into the overlay", path)
        return None
    return path


def _unwritten_config(path: Path) -> None:
    """rocksdict rewrites its config file (O_TRUNC) at every open, read-only ones included: on a full disk
    that fails the open and leaves the file empty. Every option is passed at open, so the file carries
    nothing (measured: rocksdict opens with it empty, missing or linked to /dev/null); linked to /dev/null,
    no open writes it."""
    config = path / _CONFIG
    if config.is_symlink() or not path.is_dir():
        return
    tmp = path / f".{_CONFIG}.tmp"
    try:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(os.devnull)
        tmp.rename(config)
    except OSError:  # no space for the link: rocksdict writes the file as before
        tmp.unlink(missing_ok=True)


def errno_of(exc: BaseException) -> int:
    text = str(exc)
    if "No space left" in text or "ENOSPC" in text or "NoSpace" in text:
        return errno.ENOSPC
    if "Read-only file system" in text:
        return errno.EROFS
    if "lock" in text.lower() and ("LOCK" in text or "Resource temporarily" in text):
        return errno.EBUSY
    return errno.EIO


class BlockMap:
    """One overlay's RocksDB database. Not thread-safe by itself: the overlay's lock orders its writers."""

    def __init__(self, path: Path, *, create: bool, readonly: bool) -> None:
        self.path = path
        self.readonly = readonly
        if not create and not (path / "CURRENT").is_file():
            # rocksdict creates the directory even when create_if_missing is off: check first.
            raise StorageError(errno.ENOENT, what=f"overlay {path}", detail="does not exist")
        self._db = self._open(create)
        self.broken = False  # a write failed: RocksDB refuses writes until reopened (rocksdict has no Resume)

    def _open(self, create: bool, *, readonly: bool | None = None) -> rocksdict.Rdict:
        # The column family's options are passed too: without them rocksdict reopens an existing database
        # with the ones its OPTIONS file records, and a block cache of its own instead of the shared one.
        readonly = self.readonly if readonly is None else readonly
        opts = _options(create and not readonly)
        if not readonly:
            _unwritten_config(self.path)
        elif (logs := _readonly_logs()) is not None:
            # A reader writes nothing to the store (it may be full): RocksDB's info log goes to memory.
            opts.set_db_log_dir(str(logs))
        access = rocksdict.AccessType.read_only() if readonly else rocksdict.AccessType.read_write()
        try:
            return rocksdict.Rdict(str(self.path), opts, column_families={"default": opts}, access_type=access)
        except Exception as exc:
            if "Corruption" in str(exc):
                raise Damaged(path=self.path, detail=f"its block map does not open: {exc}") from exc
            raise StorageError(errno_of(exc), what=f"opening overlay {self.path}", detail=str(exc)) from exc

    def reopen(self) -> None:
        """After a failed write: close and open again (RocksDB recovers from its WAL). If the writable open
        fails too (a full disk: RocksDB makes new files at open), the map is opened read-only so that reads
        of written blocks go on (E4: a closed handle failed every read), and stays `broken`: the next write
        tries again."""
        try:
            self._db.close()
        except Exception:  # noqa: S110 - the handle is being replaced; its close error adds nothing
            pass
        try:
            self._db = self._open(False)
        except StorageError:
            self._db = self._open(False, readonly=True)  # (if this fails too, the map is unreadable: raised)
            raise
        self.broken = False

    def _failed(self, exc: Exception, doing: str) -> StorageError:
        self.broken = True
        return StorageError(errno_of(exc), what=f"{doing} overlay {self.path}", detail=str(exc))

    def _unreadable(self, exc: Exception) -> StorageError | Damaged:
        if "Corruption" in str(exc):
            return Damaged(path=self.path, detail=f"its block map does not read: {exc}")
        return StorageError(errno_of(exc), what=f"reading overlay {self.path}", detail=str(exc))

    def get(self, k: bytes) -> bytes | None:
        try:
            value = self._db.get(k)
        except Exception as exc:
            raise self._unreadable(exc) from exc
        return value if value is None else bytes(value)

    def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        if len(keys) == 1:
            return [self.get(keys[0])]
        try:
            values: list[Any] = self._db.get(keys)  # type: ignore[arg-type,assignment]  # one multi-get
        except Exception as exc:
            raise self._unreadable(exc) from exc
        return [v if v is None else bytes(v) for v in values]

    def has_prefix(self, prefix: bytes) -> bool:
        it = self._db.iter()
        it.seek(prefix)
        found = bool(it.valid() and it.key().startswith(prefix))
        try:
            it.status()
        except Exception as exc:
            raise self._unreadable(exc) from exc
        return found

    def entries(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, bytes]]:
        """(block, value) of every map entry (of blocks start .. stop - 1), in block order. RocksDB checks
        each block's checksum as it reads it: damage raises Damaged, naming the overlay."""
        return self._numbered(INDEX, start, stop)

    def marks(self) -> list[int]:
        """The regions marked (REGION), in order."""
        return [region for region, _ in self._numbered(REGION, 0, None)]

    def _numbered(self, prefix: bytes, start: int, stop: int | None) -> Iterator[tuple[int, bytes]]:
        it = self._db.iter()
        it.seek(prefix + start.to_bytes(8, "big"))
        end = None if stop is None else prefix + stop.to_bytes(8, "big")
        while it.valid():
            k = it.key()
            if not k.startswith(prefix) or (end is not None and k >= end):
                break
            yield int.from_bytes(k[1:], "big"), it.value()
            it.next()
        try:
            it.status()
        except Exception as exc:
            raise self._unreadable(exc) from exc

    def put(self, k: bytes, value: bytes) -> None:
        try:
            self._db.put(k, value)
        except Exception as exc:
            raise self._failed(exc, "writing") from exc

    def write(self, puts: Iterable[tuple[bytes, bytes | None]], *, sync: bool = False) -> None:
        """One atomic batch: each (key, value) is put, or deleted where value is None; synced if `sync`."""
        batch = rocksdict.WriteBatch(raw_mode=True)
        put, delete = batch.put, batch.delete
        for k, value in puts:
            if value is None:
                delete(k)
            else:
                put(k, value)
        try:
            self._db.write(batch)
        except Exception as exc:
            raise self._failed(exc, "writing") from exc
        if sync:
            self.sync()

    def sync(self) -> None:
        try:
            self._db.flush_wal(True)
        except Exception as exc:
            raise self._failed(exc, "syncing") from exc

    def close(self) -> None:
        self._db.close()
