"""What a worker process does around nbdkit's callbacks: CPU pins, the per-connection thread state, per-clone
counters and their publishing, and the stop the supervisor asks for.

The supervisor's death (the control pipe ends) is not a stop: the worker serves on, and waits on a control
socket (`control_address`, in the abstract namespace, only its own user or root admitted) for a new
supervisor to adopt it: it hands over its listening sockets (SCM_RIGHTS) and from then on takes the word
"stop" there. An adopter that dies in turn leaves it waiting for the next.

The stop (drain). The supervisor writes "stop" on the control pipe (or socket). Then: the worker
stops taking connections from the shared listening sockets (their descriptors in this process now name a
socket nobody can reach; the real ones stay open in the supervisor, and connections wait in their backlog
for the next worker); every new request and every new connection waits forever; the requests in flight
finish and are answered; every overlay is flushed and closed (the clean close); the process exits at once.
The clients' connections drop with no error reply, which is what QEMU's reconnect-delay (and nbd-client
-persist) reconnect from: the requests that were never answered are sent again to the next worker. An idle
client does not hold the stop up, and nothing is answered with an error.
"""

from __future__ import annotations

import array
import bisect
import contextlib
import ctypes
import functools
import ipaddress
import json
import logging
import os
import re
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from nbdclone.runtime import RunDir
from nbdclone.store.layout import write_atomic

log = logging.getLogger("nbdclone")

#: The symbols of this process: glibc's (prctl, malloc_trim) and, in a worker, nbdkit's own API.
_process = ctypes.CDLL(None, use_errno=True)

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


#: nbdkit's own refusals, as it logs them: requests it answers itself (EPERM, EINVAL, ENOSPC) before any
#: plugin code runs, so that no counter of the plugin sees them.
_REFUSAL = re.compile(rb"error: (?:invalid request: (?:NBD_CMD_(\w+): )?|client (\w+) request rejected: )(.*)")
_OPS = {b"READ": "read", b"WRITE": "write", b"WRITE_ZEROES": "zero", b"TRIM": "trim", b"FLUSH": "flush",
        b"BLOCK_STATUS": "extents", b"CACHE": "cache", b"pread": "read", b"pwrite": "write", b"zero": "zero",
        b"trim": "trim", b"cache": "cache", b"extents": "extents", b"flush": "flush"}  # fmt: skip


class Refusals:
    """Counts of the requests nbdkit refused itself, by "op:reason", from the lines it writes to stderr."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}

    def seen(self, line: bytes) -> None:
        found = _REFUSAL.search(line)
        if found is None:
            return
        cmd, client_op, text = found.groups()
        op = _OPS.get(cmd or client_op or b"", "other")
        reason = (
            "read-only" if b"readonly" in text
            else "out-of-range" if b"out of range" in text
            else "too-large" if b"larger than maximum" in text
            else "invalid"
        )  # fmt: skip
        with self.lock:
            key = f"{op}:{reason}"
            self.counts[key] = self.counts.get(key, 0) + 1

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return dict(self.counts)


class _Pump:
    """The thread that reads this process's stderr (watch_stderr), and what it needs to stop."""

    def __init__(self, real: int, thread: threading.Thread) -> None:
        self.real, self.thread = real, thread


_pump: _Pump | None = None


def watch_stderr(refusals: Refusals) -> None:
    """Make this process's stderr a pipe that a thread reads: each chunk goes on to the real stderr at once
    (the journal, the supervisor's log), and each refusal line of nbdkit's is counted. Should the thread
    ever fail, stderr is given back before it ends, so that a full pipe can never block a writer. Before
    the process ends on purpose, flush_stderr() passes on what is still in the pipe."""
    global _pump
    real = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        pending, failed = b"", None
        try:
            while chunk := os.read(read_end, 65536):
                with contextlib.suppress(OSError):  # stderr's reader gone (a supervisor that died): drop it
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(real, view) :]
                *lines, pending = (pending + chunk).split(b"\n")
                pending = pending[-4096:]
                for line in lines:
                    refusals.seen(line)
        except Exception as exc:
            failed = exc
        os.dup2(real, 2)  # first: the pipe has no reader from now on
        if failed is not None:
            log.error("stderr watcher failed (%s); stderr goes straight out from now on", failed)

    thread = threading.Thread(target=pump, name="nbdclone-stderr", daemon=True)
    thread.start()
    _pump = _Pump(real, thread)


def flush_stderr() -> None:
    """Give stderr back and wait (at most a second) until the pump has passed on what the pipe still held:
    its write end closes with fd 2, so the pump reads to the end and stops. For a process about to end."""
    if _pump is None:
        return
    sys.stderr.flush()
    os.dup2(_pump.real, 2)
    _pump.thread.join(1.0)


def publish_stats(
    run: RunDir, worker: int, stats: Callable[[], dict[str, object]], counters: Counters, refusals: Refusals
) -> None:
    """Every second, write this worker's counters where `nbdclone stats` and the metrics endpoint read them."""
    path = run.worker_stats(worker)
    was_open = 0
    while True:
        now = stats()
        try:
            record = {
                "worker": worker,
                "pid": os.getpid(),
                **now,
                "clones": counters.snapshot(),
                "refused": refusals.snapshot(),
            }
            write_atomic(path, json.dumps(record), path.parent)
        except OSError as exc:
            log.warning("cannot write %s: %s", path, exc)
        is_open = int(now.get("open_clones", 0))  # type: ignore[call-overload]
        if is_open < was_open:
            give_back_memory()
        was_open = is_open
        time.sleep(1.0)


def give_back_memory() -> None:
    """Hand the heap's free pages back to the system. glibc keeps what closed clones freed (RocksDB's
    memtables and tables, our maps): after 100 clones opened at once and closed, a worker kept 76 of the
    84 MiB they took. Called from the stats thread, within a second of clones closing, never on a request;
    ctypes lets the GIL go meanwhile."""
    with contextlib.suppress(AttributeError):
        _process.malloc_trim(0)


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


def keep_serving_when_orphaned() -> None:
    """Clear the parent-death signal this process was started with (measured: the workers got SIGTERM from
    the kernel the moment a supervisor was killed, so every client saw its connection reset): a worker
    outlives its supervisor and waits to be adopted (Drain)."""
    if _process.prctl(_PR_SET_PDEATHSIG, 0, 0, 0, 0) != 0:
        log.warning("cannot clear the parent-death signal: errno %d", ctypes.get_errno())


_PR_SET_PDEATHSIG = 1


def control_address(worker_pid: int) -> str:
    """Where a worker whose supervisor died waits to be adopted (the abstract socket namespace: no file)."""
    return f"\0nbdclone-worker-{worker_pid}"


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
        """Start the thread that waits for the supervisor's word and then stops the worker; if the supervisor
        dies instead, the worker serves on and waits to be adopted (see the module's docstring)."""
        fds = list(listeners)

        def run() -> None:
            with open(control_fd, "rb", buffering=0) as pipe:
                word = pipe.readline().strip()
            if word != b"stop":
                try:
                    self._await_adopters(fds)
                except OSError:
                    log.exception("cannot wait to be adopted: stopping, as the supervisor is gone")
            self.stop(fds, close_all, "asked to stop")

        threading.Thread(target=run, name="nbdclone-control", daemon=True).start()

    @staticmethod
    def _await_adopters(listeners: list[int]) -> None:
        """Serve on without a supervisor until one adopts this worker and tells it to stop (returns then)."""
        log.warning("its supervisor is gone: serving on until a new `nbdclone serve` adopts this worker")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
            server.bind(control_address(os.getpid()))
            server.listen(4)
            while True:
                conn, _ = server.accept()
                with conn:
                    _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
                    if uid not in (0, os.getuid()):
                        continue  # (another user's process: it learns nothing)
                    try:
                        conn.sendmsg(
                            [b"%d\n" % len(listeners)],
                            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", listeners))],
                        )
                        log.info("adopted by a new supervisor")
                        word = conn.makefile("rb").readline().strip()
                    except OSError:
                        continue
                    if word == b"stop":
                        return
                    log.warning("its new supervisor is gone too: serving on until another adopts this worker")

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
            flush_stderr()
            os._exit(1)
        log.info("stopped in %.0f ms; clients reconnect to the next worker", (time.monotonic() - started) * 1e3)
        logging.shutdown()
        flush_stderr()
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
    within `timeout` seconds of being first seen (0: never; however the client trickles its handshake or
    leaves the server's replies unread), writes that stall half-sent for as long or that are larger than
    the advertised maximum, replies the client leaves unread for as long, and a client's connections beyond
    `per_client` (0: no cap; a client is an IP address, or a uid on a Unix socket). Each silent connection
    costs a thread and a descriptor, and nbdkit reads a write's whole payload into memory before anything
    sees the request (measured: four writes of 60 MiB, sent but for their last page and left there, held
    242 MiB of the worker's memory for ever).

    nbdkit 1.32 has no timeouts, cannot drop one client from a plugin, and does not tell a Python plugin its
    client's address; but each connection is a thread of its own, and a thread blocked on a socket is
    visible in /proc/self/task/TID/syscall: read (0), recvfrom (45), write (1) or sendto (44), the
    descriptor, the buffer, the count. A request header is 28 bytes: a larger read is a write's payload. A
    dropped connection's socket is shut down: nbdkit reads the end of the stream and closes it. A
    connection with a clone open and nothing in flight is never dropped, however idle (a VM may be), nor
    for the per-client cap (the newest connections without a clone go first). TLS connections read in
    records whose size says nothing of the request: for them the payload rules do not apply. A pass that
    fails (out of descriptors: EMFILE) is logged and the next one runs: the watcher never stops."""

    def run() -> None:
        seen = _Seen()
        failing = False
        while True:
            time.sleep(min(1.0, timeout / 4) if timeout else 1.0)
            try:
                _watch_pass(seen, timeout, per_client, opened())
                failing = False
            except Exception:
                if not failing:  # (once per run of failing passes)
                    log.exception("the connection watcher's pass failed; it goes on")
                failing = True

    threading.Thread(target=run, name="nbdclone-connections", daemon=True).start()


_Wait = tuple[int, int, str, int, bool]  # a thread blocked on a socket: (tid, fd, 'socket:[inode]', count, reading)


@dataclass(slots=True)
class _Seen:
    """What the connection watcher remembers between passes."""

    first_seen: dict[tuple[int, int, str, int, bool], float] = field(default_factory=dict)  # a stall -> since
    born: dict[str, float] = field(default_factory=dict)  # connection (its socket) -> when first seen
    peers: dict[str, tuple[str, str]] = field(default_factory=dict)  # connection -> (client, how to log it)
    named: set[tuple[int, str]] = field(default_factory=set)


def _watch_pass(seen: _Seen, timeout: float, per_client: int, clones: dict[int, str]) -> None:
    now, live = time.monotonic(), set()
    waits = list(_socket_waits())
    for _, fd, target, _, _ in waits:
        seen.born.setdefault(target, now)
        if seen.peers.get(target, ("?", ""))[0] == "?":  # (not known yet, or out of descriptors last time)
            seen.peers[target] = _peer(fd)
    for tid, fd, target, count, reading in waits:
        name = clones.get(tid)
        if name is not None and (tid, target) not in seen.named:
            seen.named.add((tid, target))
            log.info("clone %s: client %s connected", name, seen.peers[target][1])
        if name is None:  # a handshake: one deadline for all of it, whatever the client sends or reads
            if timeout and now - seen.born[target] > timeout:
                _shut(fd, target, f"no clone opened within {timeout:g} s")
            continue
        if reading and count <= REQUEST_HEADER:
            continue  # waiting for its next request
        if reading and count > MAX_REQUEST:
            _shut(fd, target, f"clone {name}: a write of more than {MAX_REQUEST >> 20} MiB")
            continue
        key = (tid, fd, target, count, reading)
        live.add(key)
        if timeout and now - seen.first_seen.setdefault(key, now) > timeout:
            what = "a write stalled half-sent" if reading else "a reply left unread"
            _shut(fd, target, f"clone {name}: {what} for {timeout:g} s")
    if per_client:
        _cap_clients(waits, clones, seen.peers, seen.born, per_client)
    current = {target for _, _, target, _, _ in waits}
    seen.first_seen = {k: v for k, v in seen.first_seen.items() if k in live}
    seen.born = {t: v for t, v in seen.born.items() if t in current}
    seen.peers = {t: v for t, v in seen.peers.items() if t in current}
    seen.named = {key for key in seen.named if key[0] in clones}


def _cap_clients(
    waits: list[_Wait], clones: dict[int, str], peers: dict[str, tuple[str, str]], born: dict[str, float], cap: int
) -> None:
    """Drop each client's newest connections down to `cap`: those without a clone open first, then those
    with one (every connection counts: one local user must not hold the worker's threads from another)."""
    by_client: dict[str, list[_Wait]] = {}
    for wait in waits:
        by_client.setdefault(peers[wait[2]][0], []).append(wait)
    for client, mine in by_client.items():
        excess = len({r[2] for r in mine}) - cap
        if excess <= 0 or client == "?":
            continue
        newest = sorted(mine, key=lambda r: (r[0] not in clones, born[r[2]]), reverse=True)
        for _, fd, target, _, _ in newest[:excess]:
            _shut(fd, target, f"client {peers[target][1]} has more than {cap} connections")


def _socket_waits() -> Iterator[_Wait]:
    """(thread id, descriptor, 'socket:[inode]', bytes asked, reading) of each thread blocked reading or
    writing a socket."""
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/syscall") as f:
                fields = f.read().split()
            if fields[0] not in _SOCKET_CALLS:
                continue
            fd, count = int(fields[1], 16), int(fields[3], 16)
            target = os.readlink(f"/proc/self/fd/{fd}")
        except (OSError, IndexError, ValueError):
            continue
        if target.startswith("socket:"):
            yield int(task), fd, target, count, _SOCKET_CALLS[fields[0]]


_SOCKET_CALLS = {"0": True, "45": True, "1": False, "44": False}  # x86-64 syscall number -> reading


@functools.cache
def _nbdkit_peer_name() -> Any:
    call = _process.nbdkit_peer_name  # nbdkit's own API, as a C plugin would call it
    call.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)]
    return call


def peer_address() -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address of the client of the connection this thread serves (nbdkit_peer_name: the Python
    plugin API of nbdkit 1.32 has no call for it); None on a Unix socket, or if nbdkit cannot tell."""
    buf, size = ctypes.create_string_buffer(128), ctypes.c_uint32(128)
    if _nbdkit_peer_name()(buf, ctypes.byref(size)) != 0:
        return None
    family = struct.unpack_from("=H", buf.raw)[0]
    if family == socket.AF_INET:
        return ipaddress.IPv4Address(buf.raw[4:8])
    if family == socket.AF_INET6:
        address = ipaddress.IPv6Address(buf.raw[8:24])
        return address.ipv4_mapped or address  # (a dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d)
    return None


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
    except OSError:  # out of descriptors (EMFILE): shut it through its own, checked just before
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") == target:
                s = socket.socket(fileno=fd)
                try:
                    s.shutdown(socket.SHUT_RDWR)
                finally:
                    s.detach()
                log.warning("dropped a connection: %s", why)
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
