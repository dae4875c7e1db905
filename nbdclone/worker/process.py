"""What a worker process does around nbdkit's callbacks: CPU pins, the per-connection thread state, per-clone
counters and their publishing, and the stop the supervisor asks for.

The stop (drain). The supervisor writes "stop" on the control pipe, or dies (the pipe ends). Then: the worker
stops taking connections from the shared listening sockets (their descriptors in this process now name a
socket nobody can reach; the real ones stay open in the supervisor, and connections wait in their backlog
for the next worker); every new request and every new connection waits forever; the requests in flight
finish and are answered; every overlay is flushed and closed (the clean close); the process exits at once.
The clients' connections drop with no error reply, which is what QEMU's reconnect-delay (and nbd-client
-persist) reconnect from: the requests that were never answered are sent again to the next worker. An idle
client does not hold the stop up, and nothing is answered with an error.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import json
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from nbdclone.runtime import RunDir
from nbdclone.store.layout import write_atomic

log = logging.getLogger("nbdclone")

# nbdkit enters Python with PyGILState_Ensure and leaves with PyGILState_Release around every callback. On
# one of its own threads that holds no Python thread state, each call creates one and deletes it again
# (an allocation, a fresh frame stack mapped and unmapped: a page fault per request; 4 KiB random writes
# spent 10% of their time clearing those pages, and reads ran at half speed). Holding one extra Ensure
# from open to close keeps the connection thread's state alive between requests. With one nbdkit thread
# per connection (how the supervisor runs workers) open, every request and close run on that thread.
gil_ensure = ctypes.pythonapi.PyGILState_Ensure
gil_ensure.restype = ctypes.c_int
gil_release = ctypes.pythonapi.PyGILState_Release
gil_release.argtypes = [ctypes.c_int]

#: Request latency buckets (upper bounds, ns) of the histograms `nbdclone stats` and --metrics show.
LATENCY_BUCKETS = [
    b * 1000 for b in (50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000)
]
#: The largest request a client may send (advertised; nbdkit's blocksize-policy filter refuses larger ones,
#: and watch_connections drops a connection sending one): what a stalled write can hold in memory.
MAX_REQUEST = 8 << 20
REQUEST_HEADER = 28  # bytes of an NBD request header

OPS = ("read", "write", "flush", "trim", "zero", "extents", "cache")
TIMED = ("read", "write", "flush")


@dataclass(slots=True)
class OpStats:
    requests: int = 0
    bytes: int = 0
    errors: int = 0
    nanos: int = 0  # time spent serving them
    buckets: list[int] | None = None  # counts per LATENCY_BUCKETS bound, and one for beyond

    def count(self, nbytes: int, elapsed: int) -> None:
        self.requests += 1
        self.bytes += nbytes
        if self.buckets is not None:
            self.nanos += elapsed
            self.buckets[bisect.bisect_left(LATENCY_BUCKETS, elapsed)] += 1

    def add(self, other: OpStats) -> None:
        self.requests += other.requests
        self.bytes += other.bytes
        self.errors += other.errors
        self.nanos += other.nanos
        if other.buckets is not None:
            if self.buckets is None:
                self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
            for i, n in enumerate(other.buckets):
                self.buckets[i] += n


@dataclass(slots=True)
class ConnStats:
    """One connection's counters. Only its own thread writes them (one nbdkit thread per connection), so
    they need no lock; they are added into the clone's totals when the connection closes."""

    ops: dict[str, OpStats] = field(
        default_factory=lambda: {
            op: OpStats(buckets=[0] * (len(LATENCY_BUCKETS) + 1) if op in TIMED else None) for op in OPS
        }
    )


class Counters:
    """Per-clone request counters of this worker: the closed connections' totals plus the open ones'."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.totals: dict[str, ConnStats] = {}
        self.live: dict[int, tuple[str, ConnStats]] = {}  # id(handle) -> (clone, its counters)

    def opened(self, key: int, name: str) -> ConnStats:
        stats = ConnStats()
        with self.lock:
            self.live[key] = (name, stats)
        return stats

    def closed(self, key: int) -> None:
        with self.lock:
            name, stats = self.live.pop(key)
            total = self.totals.setdefault(name, ConnStats())
            for op, s in stats.ops.items():
                total.ops[op].add(s)

    def snapshot(self) -> dict[str, dict[str, dict[str, object]]]:
        with self.lock:
            merged: dict[str, ConnStats] = {}
            for name, total in self.totals.items():
                merged[name] = ConnStats()
                for op, s in total.ops.items():
                    merged[name].ops[op].add(s)
            for name, stats in self.live.values():
                acc = merged.setdefault(name, ConnStats())
                for op, s in stats.ops.items():
                    acc.ops[op].add(s)
        return {
            name: {
                op: {"requests": s.requests, "bytes": s.bytes, "errors": s.errors}
                | ({"buckets": s.buckets, "seconds": s.nanos / 1e9} if s.buckets is not None else {})
                for op, s in c.ops.items()
            }
            for name, c in merged.items()
        }


def publish_stats(run: RunDir, worker: int, stats: Callable[[], dict[str, object]], counters: Counters) -> None:
    """Every second, write this worker's counters where `nbdclone stats` and the metrics endpoint read them."""
    path = run.worker_stats(worker)
    while True:
        try:
            record = {"worker": worker, "pid": os.getpid(), **stats(), "clones": counters.snapshot()}
            write_atomic(path, json.dumps(record), path.parent)
        except OSError as exc:
            log.warning("cannot write %s: %s", path, exc)
        time.sleep(1.0)


class Pins:
    """Where this worker's connection threads may run. Connection threads share the worker's GIL, and
    handing it between cores doubles the CPU per request (FACTS): with two or more connections open, all of
    their threads are pinned to the worker's core. One connection alone runs unpinned, so the scheduler can
    keep it off the core its client runs on (measured, 4 KiB writes from fio on the same host: pinned, with
    fio on the same core, 40-41k requests/s; on the other core or unpinned, 62-73k). RocksDB's background
    threads are never pinned."""

    def __init__(self, cpu: int | None) -> None:
        self.cpu = cpu
        self.free = os.sched_getaffinity(0)  # taken on a connection thread before any pin: nbdkit's mask
        self.threads: set[int] = set()  # native thread ids of the open connections
        self.lock = threading.Lock()

    def opened(self, tid: int) -> None:
        with self.lock:
            self.threads.add(tid)
            self._apply()

    def closed(self, tid: int) -> None:
        with self.lock:
            self.threads.discard(tid)
            self._apply()

    def _apply(self) -> None:
        if self.cpu is None:
            return
        mask = {self.cpu} if len(self.threads) > 1 else self.free
        for tid in self.threads:
            try:
                os.sched_setaffinity(tid, mask)
            except OSError as exc:  # a cpuset without that core: serve unpinned rather than refuse the client
                log.warning("cannot set the CPUs of connection thread %d to %s: %s", tid, sorted(mask), exc)


class Drain:
    """The stop the supervisor asks for (see the module's docstring). Requests mark themselves in `inflight`
    (keyed by their thread) before they look at `draining`; the drain sets `draining` before it waits for
    `inflight` to empty, so every request either finishes before the overlays close or never starts."""

    def __init__(self) -> None:
        self.draining = False
        self.inflight: dict[int, int] = {}

    def park(self, thread: int) -> None:
        """A request or a connection that came after the stop began: wait for the exit, unanswered."""
        self.inflight[thread] = 0
        threading.Event().wait()

    def watch(self, control_fd: int, listeners: Iterable[int], close_all: Callable[[], None]) -> None:
        """Start the thread that waits for the supervisor's word (or its death) and then stops the worker."""
        fds = list(listeners)

        def run() -> None:
            with open(control_fd, "rb", buffering=0) as pipe:
                word = pipe.readline().strip()
            self.stop(fds, close_all, "asked to stop" if word == b"stop" else "its supervisor is gone")

        threading.Thread(target=run, name="nbdclone-control", daemon=True).start()

    def stop(self, listeners: list[int], close_all: Callable[[], None], why: str) -> None:
        started = time.monotonic()
        log.info("stopping (%s): finishing requests in flight, then closing every clone", why)
        self._deafen(listeners)
        self.draining = True
        while any(self.inflight.values()):
            time.sleep(0.001)
        try:
            close_all()
        except Exception:
            log.exception("closing the clones")
            os._exit(1)
        log.info("stopped in %.0f ms; clients reconnect to the next worker", (time.monotonic() - started) * 1e3)
        logging.shutdown()
        os._exit(0)

    @staticmethod
    def _deafen(listeners: list[int]) -> None:
        """Stop taking connections without closing the shared listening sockets: each descriptor nbdkit
        polls now names a listening socket in the abstract namespace that nobody connects to."""
        for fd in listeners:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dummy:
                dummy.bind("")  # autobind: a fresh abstract address
                dummy.listen(1)
                with contextlib.suppress(OSError):
                    os.dup2(dummy.fileno(), fd, inheritable=False)


def watch_connections(timeout: float, per_client: int, opened: Callable[[], dict[int, str]]) -> None:
    """Log each client's address once its clone is open; drop connections that have not opened a clone
    within `timeout` seconds (0: never), writes that stall half-sent for as long or that are larger than
    the advertised maximum, and a client's connections beyond `per_client` (0: no cap; a client is an IP
    address, or a uid on a Unix socket). Each silent connection costs a thread and a descriptor, and nbdkit
    reads a write's whole payload into memory before anything sees the request (measured: four writes of
    60 MiB, sent but for their last page and left there, held 242 MiB of the worker's memory for ever).

    nbdkit 1.32 has no timeouts, cannot drop one client from a plugin, and does not tell a Python plugin its
    client's address; but each connection is a thread of its own, and a thread blocked reading a socket is
    visible in /proc/self/task/TID/syscall: read (0) or recvfrom (45), the descriptor, the buffer, the
    count. A request header is 28 bytes: a larger read is a write's payload. A dropped connection's socket
    is shut down: nbdkit reads the end of the stream and closes it. A connection with a clone open and
    nothing in flight is never dropped, however idle (a VM may be), nor for the per-client cap (the
    newest connections without a clone go first). TLS connections read in records whose size says nothing
    of the request: for them the payload rules do not apply."""

    def run() -> None:
        first_seen: dict[tuple[int, int, str, int], float] = {}
        born: dict[str, float] = {}  # connection (its socket) -> when first seen
        peers: dict[str, tuple[str, str]] = {}  # connection -> (client, how to log it)
        named: set[tuple[int, str]] = set()
        while True:
            time.sleep(min(1.0, timeout / 4) if timeout else 1.0)
            now, live, clones = time.monotonic(), set(), opened()
            readers = list(_socket_readers())
            for _, fd, target, _ in readers:
                born.setdefault(target, now)
                if target not in peers:
                    peers[target] = _peer(fd)
            for tid, fd, target, count in readers:
                name = clones.get(tid)
                if name is not None and (tid, target) not in named:
                    named.add((tid, target))
                    log.info("clone %s: client %s connected", name, peers[target][1])
                if name is not None and count <= REQUEST_HEADER:
                    continue  # waiting for its next request
                if name is not None and count > MAX_REQUEST:
                    _shut(fd, target, f"clone {name}: a write of more than {MAX_REQUEST >> 20} MiB")
                    continue
                key = (tid, fd, target, count)
                live.add(key)
                if timeout and now - first_seen.setdefault(key, now) > timeout:
                    what = f"clone {name}: a write stalled half-sent" if name else "no clone opened"
                    _shut(fd, target, f"{what} for {timeout:g} s")
            if per_client:
                _cap_clients(readers, clones, peers, born, per_client)
            current = {target for _, _, target, _ in readers}
            first_seen = {k: v for k, v in first_seen.items() if k in live}
            born = {t: v for t, v in born.items() if t in current}
            peers = {t: v for t, v in peers.items() if t in current}
            named = {key for key in named if key[0] in clones}

    threading.Thread(target=run, name="nbdclone-connections", daemon=True).start()


def _cap_clients(
    readers: list[tuple[int, int, str, int]],
    clones: dict[int, str],
    peers: dict[str, tuple[str, str]],
    born: dict[str, float],
    cap: int,
) -> None:
    """Drop each client's newest connections without a clone open, down to `cap` connections."""
    by_client: dict[str, list[tuple[int, int, str, int]]] = {}
    for reader in readers:
        by_client.setdefault(peers[reader[2]][0], []).append(reader)
    for client, mine in by_client.items():
        excess = len({r[2] for r in mine}) - cap
        if excess <= 0 or client == "?":
            continue
        waiting = sorted((r for r in mine if r[0] not in clones), key=lambda r: born[r[2]], reverse=True)
        for _, fd, target, _ in waiting[:excess]:
            _shut(fd, target, f"client {peers[target][1]} has more than {cap} connections")


def _socket_readers() -> Iterator[tuple[int, int, str, int]]:
    """(thread id, descriptor, 'socket:[inode]', bytes asked) of each thread blocked reading a socket."""
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/syscall") as f:
                fields = f.read().split()
            if fields[0] not in ("0", "45"):
                continue
            fd, count = int(fields[1], 16), int(fields[3], 16)
            target = os.readlink(f"/proc/self/fd/{fd}")
        except (OSError, IndexError, ValueError):
            continue
        if target.startswith("socket:"):
            yield int(task), fd, target, count


def _peer(fd: int) -> tuple[str, str]:
    """A connection's client, as (who it is, how to log it): its IP address (TCP), or its uid (a Unix
    socket: logged with its pid)."""
    try:
        with socket.socket(fileno=os.dup(fd)) as s:
            if s.family == socket.AF_UNIX:
                pid, uid, _ = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
                return f"uid:{uid}", f"pid {pid} uid {uid}"
            host, port = s.getpeername()[:2]
            return host, f"{host}:{port}"
    except OSError:
        return "?", "(gone)"


def _shut(fd: int, target: str, why: str) -> None:
    try:
        copy = os.dup(fd)
    except OSError:
        return
    try:
        if os.readlink(f"/proc/self/fd/{copy}") != target:  # the descriptor was reused meanwhile
            return
        with socket.socket(fileno=copy) as s:
            copy = -1
            s.shutdown(socket.SHUT_RDWR)
        log.warning("dropped a connection: %s", why)
    except OSError:
        pass
    finally:
        if copy >= 0:
            os.close(copy)
