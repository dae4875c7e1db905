"""Chunks a version maps before the store holds them: a fleet host's pack is a cache of the fleet's.

A fleet host stages a version by writing its map at once, with a slot for every chunk, and fetches a
chunk's bytes into its slot only when something reads it (a clone, a boot trace's prefetch). Until then
the slot is a hole of the pack, and chunks/remote says which fleet chunk belongs there:

    chunks/remote      slot -> SHA-256 of the chunk the slot holds or will hold (sealed; replaced whole)
    chunks/fetch.lock  flock: fill() holds it shared while it writes slots; forget() holds it exclusive

A reader checks every chunk against the version's digest before serving it (cache.PackReader.verify); a
slot that does not match, and that chunks/remote names, is asked of the fetcher (one per host, in the
server's supervisor: fleet/fetch.py), which reads the chunk from the fleet, checks it against the SHA-256
that names it and against the reader's digest, and writes it in place. A single-host store has no
chunks/remote and nothing here runs.

Invariants
  R1 every slot a committed version maps holds that chunk (its bytes match the version's digest), or
     chunks/remote names the slot with the SHA-256 of that chunk, which the fleet holds
  R2 fill() writes a slot only while holding fetch.lock shared, only while chunks/remote names the slot
     with the SHA-256 of the bytes it writes, and (for a reader's request) only bytes whose local digest
     is the reader's
  R3 a slot chunks/remote names is never given to other bytes: imports count it as used, and an entry is
     dropped (forget) only under the pack's writer lock and fetch.lock exclusive, once no live version
     maps its slot, before the slot is punched or reused
Order of a staging (under the writer lock): slots chosen, the pack extended over them (sparse), chunks/
remote written (fsync, rename), then the version's map, then the catalog. A crash leaves entries that no
version maps: harmless (R2 writes only bytes a reader asked for by digest) and dropped by the next gc.
A filled slot is not fsynced: if power fails first, it reads back as a hole or torn, fails its digest,
and is fetched again (R1 keeps its entry).
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import socket
import struct
import threading
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

from nbdclone import errors
from nbdclone.store._fs import data_ranges, fsync_dir
from nbdclone.store._sealed import seal_bytes, unseal_bytes

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
_MAGIC = b"NBDCRMT2"  # then every slot (8 bytes, ascending), then their SHA-256s (32 bytes each)
_MAGIC_ROWS = b"NBDCRMT1"  # then (slot, SHA-256) rows: as first written
_ROW = struct.Struct("<Q32s")
#: What a reader calls with the (slot, local digest) pairs it could not verify: on return each is filled,
#: or it raises StorageError.
Fetch = Callable[[list[tuple[int, bytes]]], None]
#: How a process with no server to ask fetches chunks itself: (the store, the (slot, digest) pairs). The
#: fleet's (fleet/fetch.py) is handed to the Store by whoever opens it (nbdclone/host.py): the storage core
#: never imports the fleet.
FetchHere = Callable[[Path, list[tuple[int, bytes]]], None]


def sha256(data: bytes | bytearray | memoryview) -> bytes:
    return hashlib.sha256(data).digest()


class RemoteTable(Mapping[int, bytes]):
    """slot -> SHA-256, sorted by slot, in two flat buffers: 40 bytes a chunk and no Python object per
    entry (a 50 GiB version not fetched yet: 32 MB, loaded without a loop)."""

    __slots__ = ("shas", "slots")

    def __init__(self, slots: array[int] | None = None, shas: bytes = b"") -> None:
        self.slots = slots if slots is not None else array("q")
        self.shas = shas

    @classmethod
    def of(cls, entries: Mapping[int, bytes]) -> RemoteTable:
        order = sorted(entries)
        return cls(array("q", order), b"".join(entries[s] for s in order))

    def encode(self) -> bytes:
        return _MAGIC + self.slots.tobytes() + self.shas

    @classmethod
    def decode(cls, raw: bytes, path: Path) -> RemoteTable:
        n, rest = divmod(len(raw) - len(_MAGIC), 8 + 32)
        if raw.startswith(_MAGIC) and not rest:
            slots = array("q")
            slots.frombytes(raw[len(_MAGIC) : len(_MAGIC) + 8 * n])  # ascending as written (the seal checks)
            return cls(slots, raw[len(_MAGIC) + 8 * n :])
        elif raw.startswith(_MAGIC_ROWS) and not (len(raw) - len(_MAGIC_ROWS)) % _ROW.size:
            return cls.of(dict(_ROW.iter_unpack(raw[len(_MAGIC_ROWS) :])))  # as first written
        raise errors.Damaged(path=path, detail="it is not a table of remote chunks")

    def _find(self, slot: int) -> int:
        i = bisect.bisect_left(self.slots, slot)
        return i if i < len(self.slots) and self.slots[i] == slot else -1

    def __getitem__(self, slot: int) -> bytes:
        i = self._find(slot)
        if i < 0:
            raise KeyError(slot)
        return self.shas[32 * i : 32 * i + 32]

    def __contains__(self, slot: object) -> bool:
        return isinstance(slot, int) and self._find(slot) >= 0

    def __iter__(self) -> Iterator[int]:
        return iter(self.slots)

    def __len__(self) -> int:
        return len(self.slots)


class RemoteSlots:
    """chunks/remote and chunks/fetch.lock of one store (R1-R3 above). Thread safe."""

    def __init__(self, root: Path) -> None:
        self.path = root / "remote"
        self.lock_path = root / "fetch.lock"
        self.pack = root / "pack"
        self._cached: tuple[tuple[int, int], RemoteTable] | None = None
        self._mutex = threading.Lock()

    def exists(self) -> bool:
        return self.path.exists()

    def load(self) -> RemoteTable:
        """slot -> SHA-256 as chunks/remote says now (read again only when it was replaced)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return RemoteTable()
        stamp = (st.st_ino, st.st_mtime_ns)
        with self._mutex:
            if self._cached is not None and self._cached[0] == stamp:
                return self._cached[1]
        table = RemoteTable.decode(unseal_bytes(self.path.read_bytes(), self.path), self.path)
        with self._mutex:
            self._cached = (stamp, table)
        return table

    def _save(self, table: RemoteTable) -> None:
        body = table.encode()
        tmp = self.path.with_name(f".remote.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "wb") as f:
            f.write(seal_bytes(body))
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, self.path)
        fsync_dir(self.path.parent)

    def unfetched(self) -> set[int]:
        """The named slots that are still holes of the pack (not fetched yet; a torn fill is not seen)."""
        table = self.load()
        if not table:
            return set()
        try:
            fd = os.open(self.pack, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return set(table)
        try:
            held: set[int] = set()
            for start, end in data_ranges(fd, os.fstat(fd).st_size):
                held.update(range(-(-start // CHUNK), end // CHUNK))
        finally:
            os.close(fd)
        return set(table) - held

    def lacking(
        self, pairs: Iterable[tuple[int, bytes]], local_digest: Callable[[bytes], bytes]
    ) -> list[tuple[int, bytes]]:
        """The (slot, local digest) pairs whose slot does not hold those bytes (not fetched yet, or torn)."""
        fd = os.open(self.pack, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return [(slot, key) for slot, key in pairs if local_digest(os.pread(fd, CHUNK, slot * CHUNK)) != key]
        finally:
            os.close(fd)

    def add(self, entries: dict[int, bytes]) -> None:
        """Name new slots (a staging's; caller holds the pack's writer lock; R1's order: before the map)."""
        if entries:
            self._save(RemoteTable.of({**self.load(), **entries}))

    def forget(self, keep: set[int]) -> int:
        """Drop the entries of slots not in `keep` (the slots live versions map), waiting for fills in
        flight. Caller holds the pack's writer lock (R3). Returns how many were dropped."""
        table = self.load()
        gone = [s for s in table if s not in keep]
        if gone:
            with self._locked(fcntl.LOCK_EX):
                self._save(RemoteTable.of({s: k for s, k in table.items() if s in keep}))
        return len(gone)

    @contextlib.contextmanager
    def _locked(self, how: int) -> Iterator[None]:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, how)
            yield
        finally:
            os.close(fd)

    def fill(self, chunks: Iterable[tuple[int, bytes | None, bytes]], local_digest: Callable[[bytes], bytes]) -> int:
        """Write (slot, local digest, bytes) chunks fetched from the fleet into their slots (R2): each is
        written only if chunks/remote names its slot with the bytes' SHA-256 and, where a reader asked for
        it (the digest is not None: a readahead's is), the bytes' local digest is the one given. Returns
        how many were written."""
        written = 0
        with self._locked(fcntl.LOCK_SH):
            table = self.load()
            fd = os.open(self.pack, os.O_WRONLY | os.O_CLOEXEC)
            try:
                for slot, key, data in chunks:
                    if len(data) != CHUNK or table.get(slot) != sha256(data) or key not in (None, local_digest(data)):
                        log.warning(
                            "chunk pack %s: not filling slot %d (no longer remote, or other bytes)", self.pack, slot
                        )
                        continue
                    view = memoryview(data)
                    at = slot * CHUNK
                    while view:
                        n = os.pwrite(fd, view, at)
                        view, at = view[n:], at + n
                    written += 1
            finally:
                os.close(fd)
        return written


def fetch_address(store: Path) -> bytes:
    """The fetcher's socket: in the abstract namespace (no file to go stale, no path length limit), named
    after the store."""
    return b"\0nbdclone-fetch-" + hashlib.sha256(os.fsencode(store.absolute())).hexdigest()[:24].encode()


_REQUEST = struct.Struct("<Q16s")
_COUNT = struct.Struct("<I")
_REPLY = struct.Struct("<II")  # errno (0: every chunk is in place), length of the message that follows


class FetchClient:
    """A reader's way to the store's fetcher: the running server's (one per host, shared by every worker),
    or, with no server running, one in this process (a CLI command reading a staged version)."""

    TIMEOUT = 120.0  # the fetcher bounds each fleet read itself (NBDCLONE_FLEET_TIMEOUT); this is a backstop

    def __init__(self, store: Path, here: FetchHere | None = None) -> None:
        self.store = store
        self.here = here

    def __call__(self, pairs: list[tuple[int, bytes]]) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(self.TIMEOUT)
            try:
                sock.connect(fetch_address(self.store))
            except ConnectionRefusedError:
                if self.here is None:
                    detail = "no server runs for this store and this process was given no way to fetch"
                    raise errors.StorageError(errno.EIO, what="fetching chunks from the fleet", detail=detail) from None
                log.info("no fetcher is running for %s: fetching %d chunk(s) in this process", self.store, len(pairs))
                self.here(self.store, pairs)
                return
            sock.sendall(_COUNT.pack(len(pairs)) + b"".join(_REQUEST.pack(s, k) for s, k in pairs))
            status, n = _REPLY.unpack(_recv(sock, _REPLY.size))
            detail = _recv(sock, n).decode(errors="replace")
        except OSError as exc:
            raise errors.StorageError(errno.EIO, what="fetching chunks from the fleet", detail=str(exc)) from None
        finally:
            sock.close()
        if status:  # the client sees EIO whatever the cause (NBD carries few errnos)
            detail = f"{os.strerror(status)}: {detail}"
            raise errors.StorageError(errno.EIO, what="fetching chunks from the fleet", detail=detail)


def read_request(raw: bytes) -> list[tuple[int, bytes]]:
    return [(s, k) for s, k in _REQUEST.iter_unpack(raw)]


def encode_reply(status: int, detail: str = "") -> bytes:
    body = detail.encode()
    return _REPLY.pack(status, len(body)) + body


def _recv(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        more = sock.recv(n - len(buf))
        if not more:
            raise ConnectionError("the fetcher closed the connection")
        buf += more
    return bytes(buf)


REQUEST_SIZE = _REQUEST.size
COUNT = _COUNT
