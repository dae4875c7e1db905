"""An overlay's journal: the map entries of acknowledged requests, in shared memory, until the next flush
writes them into the map (RocksDB) in one batch.

    /dev/shm/nbdclone-journals-UID/ID      a private folder of the user's; ID: the overlay's `m/journal`
      0    magic b"NBDCJNL1"
      8    the overlay's id (16 bytes): a journal is replayed only into the overlay that wrote it
      24   epoch (8, little-endian): bumped each time the map has taken every record (`reset`)
      32   the overlay's directory (2 bytes of length, then the path): `collect` removes the journals of
           overlays that are gone (a clone removed or reset after its server died)
      4096 records, one per request, back to back:
             length (4, little-endian) | seal (8) | payload (length bytes)
           payload: entries, each key (9: b"i" + block, big-endian) | n (1) | value (n bytes; n = 255: delete);
                    or a run: b"r" | first block (8, big-endian) | n (1) | a value of n bytes per block
           seal: xxh3-64 of the payload, seeded with (epoch << 32 | the record's offset) ^ the id's first 8 bytes

Why a journal (docs/performance.md): an acknowledged write must leave its map entry somewhere that outlives
the process (overlay I2). A RocksDB put is a system call, a memtable insert and the GIL held for 3-4 us; a
store into a shared mapping is a memcpy. The file lives in /dev/shm (tmpfs): a kill -9 of the worker leaves
it, as it leaves the page cache, and the next open of the overlay replays it into the map before anything
else reads the map. A power cut or an OS crash loses it with the page cache, which loses only writes that
were not flushed: the protocol allows that, and the map's own recovery (I3) already reads such blocks as
their previous state. A file-system shutdown without a reboot keeps the journal and loses dirty data pages:
the replayed entries are tentative, fingerprinted ones, and I3's check puts back the previous state of every
block whose bytes did not reach the disk.

Order (-> : before). append: bytes written (pwritev) -> record (one memcpy) -> ack. take + reset, under
the overlay's lock: records -> map batch (WAL written) -> epoch + 1; a kill between the two replays records
the map holds already, which is harmless (each entry sets a value; replayed in order, the result is the same).
A record cut short by a kill, or one left from an earlier epoch, does not match its seal: the log ends there.

Thread-safety: one writer at a time (the overlay's lock); `take` and `reset` also under that lock.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import stat
import struct
from collections.abc import Sequence
from pathlib import Path

import xxhash

from nbdclone.errors import StorageError
from nbdclone.store._fs import punch_hole

log = logging.getLogger(__name__)

MAGIC = b"NBDCJNL1"
HEADER = 4096
_PATH = 32
CAPACITY = 64 << 20  # bytes of records before a write spills them into the map (1.4M one-block records)
GROW = 1 << 20  # memory is allocated (and given back at a reset) this much at a time
# The largest record `append` writes (a request of 8 MiB makes at most 74 KiB of entries; larger go to the
# map). The scan stops at a longer length without reading it: past the last record lie records of older
# epochs, and a length read from the middle of one is any number (one of 32 MiB cost every flush a 32 MiB
# copy and hash, and made tmpfs allocate the holes it read).
MAX_RECORD = 256 << 10
DELETE = 255
_EPOCH = struct.Struct("<Q")
_RECORD = struct.Struct("<IQ")  # length, seal
_KEY = 9
_ENTRY = ord("i")  # a payload of entries starts with a key (b"i" + block); a run with b"r"
_SHM = Path("/dev/shm")

Entry = tuple[bytes, "bytes | None"]


class Full(Exception):
    """The journal has no room for a record: its entries must go to the map first."""


def folder() -> Path | None:
    """This user's journal folder in /dev/shm, or None where there is no private one (then overlays write
    their entries straight into the map, as before the journal)."""
    if not _SHM.is_dir():
        return None
    path = _SHM / f"nbdclone-journals-{os.geteuid()}"
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        st = path.lstat()
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        # /dev/shm is everyone's: a folder someone else made (or a link) must not receive our map entries.
        log.warning("%s is not a private folder of this user: overlays write their map without a journal", path)
        return None
    return path


_LENGTHS = [bytes((n,)) for n in range(256)]
_DELETE = _LENGTHS[DELETE]


def encode(entries: Sequence[Entry]) -> bytes:
    """The payload of one record."""
    n = _LENGTHS
    return b"".join([k + _DELETE if v is None else k + n[len(v)] + v for k, v in entries])


def encode_run(first: int, values: Sequence[bytes]) -> bytes:
    """The payload of one record of entries for blocks first, first + 1, ...: values all of one length."""
    return b"r" + first.to_bytes(8, "big") + _LENGTHS[len(values[0])] + b"".join(values)


def decode(payload: bytes) -> list[Entry]:
    if payload[:1] == b"r":
        first, n = int.from_bytes(payload[1:9], "big"), payload[9]
        count, rest = divmod(len(payload) - 10, n)
        if rest or not n or n == DELETE:
            raise ValueError("a journal run's values do not fill it")
        return [(b"i" + (first + k).to_bytes(8, "big"), payload[10 + k * n : 10 + (k + 1) * n]) for k in range(count)]
    out: list[Entry] = []
    pos, end = 0, len(payload)
    while pos < end:
        key = payload[pos : pos + _KEY]
        n = payload[pos + _KEY]
        pos += _KEY + 1
        if n == DELETE:
            out.append((key, None))
        else:
            out.append((key, payload[pos : pos + n]))
            pos += n
    if pos != end:
        raise ValueError("a journal record's entries overrun it")
    return out


def owner(path: Path) -> Path | None:
    """The overlay directory a journal file says it belongs to (None: not a journal, or unreadable)."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER)
    except OSError:
        return None
    if head[:8] != MAGIC or len(head) < _PATH + 2:
        return None
    n = int.from_bytes(head[_PATH : _PATH + 2], "little")
    return Path(os.fsdecode(head[_PATH + 2 : _PATH + 2 + n])) if n else None


def collect(store: Path) -> int:
    """Remove the journals of overlays under `store` that no longer exist (their clone was removed or reset
    while a journal was left by a server that died). Returns how many. A journal of an overlay that exists
    is kept whatever its age: it may hold the only record of acknowledged writes."""
    where = folder()
    if where is None:
        return 0
    root = store.absolute()
    removed = 0
    for path in where.iterdir():
        own = owner(path)
        if own is not None and own.is_relative_to(root) and not own.is_dir():
            path.unlink(missing_ok=True)
            removed += 1
    return removed


class Journal:
    """One overlay's journal file, mapped. `append` is the hot path: one seal and one memcpy."""

    def __init__(
        self, path: Path, ident: bytes, *, create: bool, owner: Path | None = None, capacity: int = CAPACITY
    ) -> None:
        self.path = path
        self.ident = ident
        flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | (os.O_CREAT if create else 0)
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as exc:
            raise StorageError(exc.errno or errno.EIO, what=f"opening journal {path}", detail=exc.strerror) from exc
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid() or not stat.S_ISREG(st.st_mode):
                raise StorageError(errno.EPERM, what=f"journal {path}", detail="is not a file of this user's")
            fresh = st.st_size < HEADER
            if st.st_size < capacity:
                os.ftruncate(fd, capacity)  # sparse: memory is taken GROW bytes at a time, as records need it
            # A store into a page tmpfs cannot give is a SIGBUS: pages are allocated before records use them.
            self.size = os.fstat(fd).st_size
            self.allocated = min(GROW, self.size)
            os.posix_fallocate(fd, 0, self.allocated)
            self._fd = fd
            self.mm = mmap.mmap(fd, self.size)
            # What the last writer allocated (GROW at a time, from the start): records lie only there.
            self.allocated = max(self.allocated, min(self.size, os.lseek(fd, 0, os.SEEK_HOLE)))
        except OSError as exc:
            os.close(fd)
            raise StorageError(exc.errno or errno.EIO, what=f"opening journal {path}", detail=exc.strerror) from exc
        except BaseException:
            os.close(fd)
            raise
        if fresh or self.mm[:8] != MAGIC or self.mm[8:24] != ident:
            where = os.fsencode(owner.absolute())[: HEADER - _PATH - 2] if owner is not None else b""
            head = MAGIC + ident + _EPOCH.pack(0) + len(where).to_bytes(2, "little") + where
            self.epoch = 0
            self.mm[:HEADER] = head + bytes(HEADER - len(head))
        else:
            self.epoch = _EPOCH.unpack_from(self.mm, 24)[0]
        self._seed = (self.epoch << 32) ^ int.from_bytes(self.ident[:8], "little")
        self.pos = HEADER
        self.pos = self._scan()[1]

    def _grow(self, end: int) -> None:
        """Allocate the pages up to `end` (rounded up to GROW), or raise Full if the journal cannot grow."""
        if end > self.size:
            raise Full
        want = min(self.size, -(-end // GROW) * GROW)
        try:
            os.posix_fallocate(self._fd, self.allocated, want - self.allocated)
        except OSError as exc:
            log.warning("journal %s cannot grow (%s): its entries go to the map now", self.path, exc)
            raise Full from exc
        self.allocated = want

    def append(self, payload: bytes) -> None:
        """Add one record (`encode`, `encode_run`): the entries of one request. Raises Full if it does not
        fit."""
        if len(payload) > MAX_RECORD:
            raise Full
        pos = self.pos
        end = pos + 12 + len(payload)
        if end > self.allocated:
            self._grow(end)
        self.mm[pos:end] = _RECORD.pack(len(payload), xxhash.xxh3_64_intdigest(payload, self._seed ^ pos)) + payload
        self.pos = end

    def put(self, key: bytes, value: bytes) -> None:
        """Add one entry (the hot path of a one-block write)."""
        payload = key + _LENGTHS[len(value)] + value
        pos = self.pos
        end = pos + 12 + len(payload)
        if end > self.allocated:
            self._grow(end)
        self.mm[pos:end] = _RECORD.pack(len(payload), xxhash.xxh3_64_intdigest(payload, self._seed ^ pos)) + payload
        self.pos = end

    def _scan(self) -> tuple[list[Entry], int]:
        """The entries of every record that matches its seal, in order, and where the next record goes.
        Reads only allocated memory (a read of a hole would allocate it)."""
        mm, seed, pos, limit = self.mm, self._seed, HEADER, self.allocated
        out: list[Entry] = []
        while pos + 12 <= limit:
            length, seal = _RECORD.unpack_from(mm, pos)
            end = pos + 12 + length
            if not length or length > MAX_RECORD or end > limit:
                break
            payload = mm[pos + 12 : end]
            if xxhash.xxh3_64_intdigest(payload, seed ^ pos) != seal:
                break
            if payload[0] == _ENTRY and length == _KEY + 1 + payload[_KEY] and payload[_KEY] != DELETE:  # one entry
                out.append((payload[:_KEY], payload[_KEY + 1 :]))
            else:
                try:
                    out += decode(payload)
                except (ValueError, IndexError):
                    break
            pos = end
        return out, pos

    def entries(self) -> list[Entry]:
        """The newest entry of each key recorded since the last reset (a spill writes them in one batch: the
        keys are distinct, so their order does not matter). Parsed from the records: nothing is kept per
        entry while requests are served."""
        return list(dict(self._scan()[0]).items())

    def __len__(self) -> int:
        return self.pos - HEADER

    def reset(self) -> None:
        """The map holds every entry now: start a new epoch (older records no longer match their seals)."""
        used = self.pos
        self.epoch += 1
        self._seed = (self.epoch << 32) ^ int.from_bytes(self.ident[:8], "little")
        _EPOCH.pack_into(self.mm, 24, self.epoch)
        self.pos = HEADER
        if used > GROW:  # give back the memory of a long stretch between flushes
            try:
                punch_hole(self._fd, GROW, self.size - GROW, what=str(self.path))
                self.allocated = GROW
            except StorageError as exc:
                log.debug("journal %s: memory not given back: %s", self.path, exc)

    def close(self, *, remove: bool = False) -> None:
        if self._fd < 0:
            return
        self.mm.close()
        os.close(self._fd)
        self._fd = -1
        if remove:
            self.path.unlink(missing_ok=True)
