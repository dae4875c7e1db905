"""One fetcher per host: it fills the pack's staged slots from the fleet when a reader needs them.

    worker ─┐  (slot, digest) pairs it could     ┌─ a slot already on its way: wait for it
    worker ─┼─ not verify, over a Unix socket ───┤  a slot filled meanwhile: nothing to do
    CLI    ─┘  (store/remote.py FetchClient)     └─ the rest: read from RADOS, WINDOW reads in flight,
                                                    checked and written in place (RemoteSlots.fill)

However many clones wait for a chunk, the host reads it from the fleet once. The fetcher runs in the
server's supervisor (serve_fetches); with no server running, a CLI command fetches in its own process
(fetch_here). Every read is bounded by the fleet's timeout, so a cold read with an OSD down fails (EIO to
the client) in bounded time, and succeeds once the OSD is back. Counters go to run/stats-fetch.json.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from nbdclone import errors
from nbdclone.fleet import config as fleet_config
from nbdclone.fleet.config import FleetConfig
from nbdclone.fleet.objects import Objects
from nbdclone.runtime import RunDir
from nbdclone.store.cache import digest
from nbdclone.store.layout import Layout
from nbdclone.store.remote import CHUNK, COUNT, REQUEST_SIZE, RemoteSlots, encode_reply, fetch_address, read_request

log = logging.getLogger(__name__)

MAX_PAIRS = 1 << 16  # a request names at most this many chunks (4 GiB)
#: Slots fetched after each missed one when they are not here either: a staged version's slots follow its
#: chunks, so this is readahead for a boot nobody recorded yet (its reads in flight at once cost about one).
AHEAD = 8
THREADS = 64  # requests served at once (each waits on RADOS or on another's fetch, never on the CPU)


@dataclass(slots=True)
class FetchStats:
    requests: int = 0
    chunks: int = 0  # filled from the fleet
    bytes: int = 0
    waits: int = 0  # chunks a request found on their way for another one
    failures: int = 0
    ahead: int = 0  # of `chunks`, fetched as readahead (AHEAD)
    refetched: int = 0  # chunks fetched again after this fetcher had filled them (a torn fill, damage)
    trace_chunks: int = 0  # filled by the server's syncs from boot-trace objects
    sync_reads: int = 0  # objects the server's syncs read (maps, traces, trace objects), and their bytes
    sync_bytes: int = 0


class _Pending:
    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: errors.NbdcloneError | None = None


class Fetcher:
    """Fills a store's staged slots from its fleet (thread safe: many requests at once)."""

    def __init__(self, store: Path, config: FleetConfig) -> None:
        layout = Layout(store)
        self.stats_path = RunDir(store).path / "stats-fetch.json"
        self.remote = RemoteSlots(layout.chunks_dir)
        self.config = config
        self.stats = FetchStats()
        self._lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._filled = bytearray()  # a bit per slot this fetcher has filled
        self._objects: Objects | None = None

    def close(self) -> None:
        if self._objects is not None:
            self._objects.close()
            self._objects = None

    def publish(self) -> None:
        """Write the counters to run/stats-fetch.json (read by tests, benchmarks and operators)."""
        with self._lock:
            data = {**asdict(self.stats), "pid": os.getpid(), "time": time.time()}
        tmp = self.stats_path.with_name(f".{self.stats_path.name}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.stats_path)

    def count_sync(self, filled: int, reads: int, read_bytes: int) -> None:
        with self._lock:
            self.stats.trace_chunks += filled
            self.stats.sync_reads += reads
            self.stats.sync_bytes += read_bytes
        self.publish()

    def objects(self) -> Objects:
        with self._lock:
            if self._objects is None:
                self._objects = Objects(self.config)
            return self._objects

    def fetch(self, pairs: list[tuple[int, bytes]]) -> None:
        """Return once every (slot, digest) holds its chunk; raise StorageError if one cannot."""
        mine: list[tuple[int, bytes | None, _Pending]] = []
        theirs: list[_Pending] = []
        with self._lock:
            self.stats.requests += 1
            asked = dict(pairs)
            for slot, key in asked.items():
                if slot in self._pending:
                    theirs.append(self._pending[slot])
                else:
                    self._pending[slot] = p = _Pending()
                    mine.append((slot, key, p))
            self.stats.waits += len(theirs)
            for slot in sorted(
                {s + k for s in asked for k in range(1, AHEAD + 1)} - asked.keys() - self._pending.keys()
            ):
                self._pending[slot] = _Pending()  # readahead: nobody waits for it, but nobody fetches it twice
                mine.append((slot, None, self._pending[slot]))
        try:
            if mine:
                self._fetch([(slot, key) for slot, key, _ in mine])
        except Exception as exc:
            error = (
                exc
                if isinstance(exc, errors.NbdcloneError)
                else errors.StorageError(errno.EIO, what=f"filling {self.remote.pack}", detail=str(exc))
            )
            for _, _, p in mine:
                p.error = error
            with self._lock:
                self.stats.failures += 1
            raise error from None
        finally:
            with self._lock:
                for slot, _, p in mine:
                    del self._pending[slot]
                    p.done.set()
        for p in theirs:
            p.done.wait()
            if p.error is not None:
                raise p.error

    def _fetch(self, pairs: list[tuple[int, bytes | None]]) -> None:
        table = self.remote.load()
        # A slot another request filled since its reader looked is not fetched again.
        asked = [(slot, key) for slot, key in pairs if key is not None]
        missing: list[tuple[int, bytes | None]] = list(self.remote.lacking(asked, digest))
        fd = os.open(self.remote.pack, os.O_RDONLY | os.O_CLOEXEC)
        try:
            missing += [(slot, None) for slot, key in pairs if key is None and slot in table and _hole(fd, slot)]
        finally:
            os.close(fd)
        unknown = [slot for slot, _ in missing if slot not in table]
        if unknown:
            raise errors.StorageError(
                errno.EIO,
                what=f"chunk {unknown[0]} of {self.remote.pack}",
                detail="it is damaged and not a fleet chunk",
            )
        if not missing:
            return
        try:
            data = list(self.objects().get_chunks((table[slot] for slot, _ in missing), CHUNK))
        except errors.StorageError:
            if all(key is not None for _, key in missing):
                raise
            missing = [
                (slot, key) for slot, key in missing if key is not None
            ]  # a readahead's failure is not the reader's
            data = list(self.objects().get_chunks((table[slot] for slot, _ in missing), CHUNK))
        filled = self.remote.fill(((slot, key, d) for (slot, key), d in zip(missing, data, strict=True)), digest)
        with self._lock:
            self.stats.chunks += filled
            self.stats.bytes += filled * CHUNK
            self.stats.ahead += sum(key is None for _, key in missing)
            for slot, _ in missing:
                if slot >> 3 >= len(self._filled):
                    self._filled.extend(bytes((slot >> 3) + 1 - len(self._filled)))
                self.stats.refetched += self._filled[slot >> 3] >> (slot & 7) & 1
                self._filled[slot >> 3] |= 1 << (slot & 7)
        if filled < len(missing):
            raise errors.StorageError(
                errno.EIO,
                what=f"filling {self.remote.pack}",
                detail="a fetched chunk does not match what the version holds",
            )


def _hole(fd: int, slot: int) -> bool:
    """Slot `slot` holds no data yet (a readahead's test: no digest to compare with)."""
    try:
        return os.lseek(fd, slot * CHUNK, os.SEEK_DATA) >= (slot + 1) * CHUNK
    except OSError:  # ENXIO: no data from there to the end
        return True


def fetch_here(store: Path, pairs: list[tuple[int, bytes]]) -> None:
    """With no server running: fetch in this process (a CLI command reading a staged version)."""
    config = fleet_config.load(store)
    if config is None:
        raise errors.StorageError(
            errno.EIO, what=f"chunks of {store}", detail="they were staged from a fleet this store is not in any more"
        )
    fetcher = Fetcher(store, config)
    try:
        fetcher.fetch(pairs)
    finally:
        fetcher.close()


async def serve_fetches(store: Path, fetcher: Fetcher, ready: asyncio.Event, stop: asyncio.Event) -> None:
    """The host's fetcher, on its socket, until `stop` (set `ready` once it listens)."""
    pool = ThreadPoolExecutor(THREADS, thread_name_prefix="nbdclone-fetch")
    loop = asyncio.get_running_loop()
    uid = os.geteuid()
    config = fetcher.config

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        pid, peer_uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        try:
            if peer_uid not in (uid, 0):
                raise errors.StorageError(
                    errno.EPERM, what="a fetch request", detail=f"from another user's process {pid}"
                )
            (n,) = COUNT.unpack(await reader.readexactly(COUNT.size))
            if not 0 < n <= MAX_PAIRS:
                raise errors.StorageError(errno.EINVAL, what="a fetch request", detail=f"of {n} chunks")
            pairs = read_request(await reader.readexactly(n * REQUEST_SIZE))
            await loop.run_in_executor(pool, fetcher.fetch, pairs)
            reply = encode_reply(0)
        except errors.NbdcloneError as exc:
            log.error("fleet %s: %s", config.name, exc)
            reply = encode_reply(exc.errno or errno.EIO, str(exc))
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        try:
            writer.write(reply)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
        fetcher.publish()

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.bind(fetch_address(store))
    server = await asyncio.start_unix_server(handle, sock=sock, backlog=1024)
    fetcher.publish()
    ready.set()
    try:
        await stop.wait()
    finally:
        server.close()
        await server.wait_closed()
        pool.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(fetcher.close)
        fetcher.stats_path.unlink(missing_ok=True)


def read_stats(store: Path) -> dict[str, int]:
    """The running fetcher's counters ({} with none)."""
    try:
        data: dict[str, int] = json.loads((RunDir(store).path / "stats-fetch.json").read_text())
        return data
    except (FileNotFoundError, ValueError):
        return {}
