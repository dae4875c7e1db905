"""nbdkit's callbacks: the only module that imports nbdkit.

Each clone of the store is an export named after the clone. The store core does the work; this module
turns nbdkit's callbacks into core calls and core errors into the errno the client should see
(an exception without nbdkit.set_error would reach the client as EIO).
"""

from __future__ import annotations

import bisect
import errno
import functools
import ipaddress
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import nbdkit

from nbdclone.errors import CloneNotFound, Fenced, NbdcloneError, NotAllowed, NotOwned, StorageError
from nbdclone.fleet.lease import HOLD, NEVER, Fence, in_fleet
from nbdclone.runtime import RunDir
from nbdclone.store import Store
from nbdclone.store.catalog import Catalog, is_valid_name, worker_of
from nbdclone.store.clone import Clone
from nbdclone.store.registry import Registry
from nbdclone.worker.process import (
    LATENCY_BUCKETS,
    MAX_REQUEST,
    ConnStats,
    Counters,
    Drain,
    OpStats,
    Pins,
    Refusals,
    flush_stderr,
    gil_ensure,
    gil_release,
    keep_serving_when_orphaned,
    peer_address,
    publish_stats,
    watch_connections,
    watch_stderr,
)

API_VERSION = 2
log = logging.getLogger("nbdclone")
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class Settings:
    store: Path
    worker: int = 0
    workers: int = 1
    cpu: int | None = None
    control: int | None = None  # the supervisor's control pipe (see process.Drain)
    listeners: int = 0  # listening sockets passed by socket activation, from fd 3
    exclusive: bool = False  # one client per clone at a time
    readonly: bool = False  # every clone read-only
    log_level: str = "info"
    handshake_timeout: float = 0.0  # seconds; 0: none
    per_client: int = 0  # connections per client (IP address, or uid on a Unix socket); 0: no cap
    allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()  # TCP clients allowed; (): any


@dataclass(slots=True)
class Handle:
    name: str
    clone: Clone
    readonly: bool
    stats: ConnStats
    reads: OpStats  # stats.ops["read"] and ["write"], at hand for the hot paths
    writes: OpStats
    key: object
    thread: int  # the connection's thread, which holds a Python thread state for the connection's life
    tid: int  # its native id (for its CPU affinity)
    gil_state: int
    revoked: bool = False  # fleet mode: its clone is another host's now (fleet/lease.py)
    fence_ns: int = NEVER  # requests after this (time.monotonic_ns) are refused: the lease, or 0 if revoked


_config: dict[str, str] = {}
_settings: Settings | None = None
_registry: Registry | None = None
_first_open = threading.Lock()  # the lazily made globals below are made once
_drain = Drain()
_counters = Counters()
_refusals = Refusals()  # requests nbdkit refused before the plugin saw them
_connections: dict[int, str] = {}  # native id of each connection thread with a clone open -> the clone
_handles: dict[int, Handle] = {}  # the same threads' handles (fleet mode revokes them)
_fence: Fence = Fence(None)  # single-host mode: never fenced; fleet mode: the host's lease (fleet/lease.py)
_ns = time.perf_counter_ns
_me = threading.get_ident
_bucket = bisect.bisect_left
_BOUNDS = LATENCY_BUCKETS


def _one_line_errors() -> None:
    """nbdkit prints an exception leaving a callback with traceback.format_exception: a traceback for a
    client's unknown export name or a damaged file is noise in the log. Errors nbdclone raises on purpose
    (NbdcloneError: they name what failed) are printed as their one line; anything else keeps its traceback."""
    original = traceback.format_exception
    if getattr(original, "nbdclone", False):
        return

    def format_exception(exc: Any, /, *args: Any, **kwargs: Any) -> list[str]:
        value = args[0] if args else exc
        if isinstance(value, NbdcloneError):
            return [str(value)]  # nbdkit ends the line
        return original(exc, *args, **kwargs)

    format_exception.nbdclone = True  # type: ignore[attr-defined]
    traceback.format_exception = format_exception


_one_line_errors()


def _request(op: str, *, sized: bool = True) -> Callable[[F], F]:
    """Count a request's bytes, time and errors for its clone; give every error leaving it a deliberate
    errno; and make a request that comes after the worker began to stop wait, unanswered (process.Drain)."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(h: Handle, *args: Any) -> Any:
            me = _me()
            _drain.inflight[me] = 1
            if _drain.draining:
                _drain.park(me)
            started = _ns()
            try:
                if started > h.fence_ns:
                    _held(h, me)
                result = fn(h, *args)
                if _ns() > h.fence_ns:  # done while the lease lapsed: acknowledged only if it is back
                    _held(h, me)
            except NbdcloneError as exc:
                h.stats.ops[op].errors += 1
                nbdkit.set_error(exc.errno)
                nbdkit.debug(f"nbdclone: {exc}")
                raise
            except OSError as exc:
                h.stats.ops[op].errors += 1
                nbdkit.set_error(exc.errno or errno.EIO)
                raise
            finally:
                _drain.inflight[me] = 0
            h.stats.ops[op].count(args[0] if sized else 0, _ns() - started)
            return result

        return wrapper  # type: ignore[return-value]

    return wrap


def _held(h: Handle, me: int) -> None:
    """A request that came after its connection's lease deadline (fleet mode: etcd has not renewed this
    host's lease in time) waits, unanswered, for the supervisor to renew it: an etcd outage longer than the
    lease's margin costs the guest a pause, not an I/O error. It goes on once the lease is back with its
    clone still this host's at the same epoch (no other host can have written it: lease.py); it fails
    (ESHUTDOWN) at once if the clone went to another host. After HOLD seconds without a lease the worker
    stops as a reload stops it, dropping every connection without a reply (a worker under a supervisor:
    it starts another, which refuses new connections until the lease is back), so a client that
    reconnects (QEMU's reconnect-delay) sends its requests again once the lease is back instead of
    seeing an error; with no supervisor to start another worker, the request fails (ESHUTDOWN). It is
    parked if the worker stops meanwhile (its client reconnects to the next worker). A request that was
    done as the lease lapsed waits the same way before its reply: it is acknowledged only once the lease
    is back with its clone unmoved, when no other host can have written the clone in between."""
    until = time.monotonic() + HOLD
    while not h.revoked and time.monotonic() < until:
        if _drain.draining:
            _drain.park(me)
        time.sleep(0.02)
        if _ns() <= h.fence_ns:
            return
    if not h.revoked and _settings is not None and _settings.control is not None:
        _stop_fenced()
        _drain.park(me)
    raise Fenced(name=h.name)


_fenced_stop = threading.Lock()


def _stop_fenced() -> None:
    """Stop this worker (once) because the host has had no lease for HOLD seconds: its connections drop
    unanswered and the supervisor starts another worker."""
    if not _fenced_stop.acquire(blocking=False):
        return
    assert _settings is not None
    listeners = list(range(3, 3 + _settings.listeners))
    why = f"fleet: no lease for {HOLD:.0f} s; dropping every connection, to be served again once it is back"
    log.warning("%s", why)
    threading.Thread(
        target=_drain.stop, args=(listeners, _close_all_for_stop, why), name="nbdclone-fenced", daemon=True
    ).start()


def _errors(fn: F) -> F:
    """Give every error leaving a callback a deliberate errno."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except NbdcloneError as exc:
            nbdkit.set_error(exc.errno)
            nbdkit.debug(f"nbdclone: {exc}")
            raise
        except OSError as exc:
            nbdkit.set_error(exc.errno or errno.EIO)
            raise

    return wrapper  # type: ignore[return-value]


_KEYS = (
    "store",
    "worker",
    "workers",
    "cpu",
    "control",
    "listeners",
    "exclusive",
    "readonly",
    "log-level",
    "handshake-timeout",
    "per-client",
    "allow",
)
_LEVELS = ("debug", "info", "warning", "error")


def config(key: str, value: str) -> None:
    if key not in _KEYS:
        raise ValueError(f"nbdclone: unknown parameter {key!r} (known: {', '.join(_KEYS)})")
    _config[key] = value


def config_complete() -> None:
    global _settings
    if "store" not in _config:
        raise ValueError("nbdclone: the store=PATH parameter is required")
    try:
        worker, workers = int(_config.get("worker", "0")), int(_config.get("workers", "1"))
        cpu = int(_config["cpu"]) if "cpu" in _config else None
        control = int(_config["control"]) if "control" in _config else None
        listeners = int(_config.get("listeners", "0"))
        handshake = float(_config.get("handshake-timeout", "0"))
        per_client = int(_config.get("per-client", "0"))
        allow = tuple(ipaddress.ip_network(n) for n in _config["allow"].split(",")) if "allow" in _config else ()
    except ValueError:
        raise ValueError(
            "nbdclone: worker, workers, cpu, control, listeners and handshake-timeout are numbers, allow networks"
        ) from None
    if not 0 <= worker < workers:
        raise ValueError(f"nbdclone: worker={worker} is not in 0..{workers - 1}")
    level = _config.get("log-level", "info")
    if level not in _LEVELS:
        raise ValueError(f"nbdclone: log-level={level!r} is not one of {', '.join(_LEVELS)}")
    flag = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
    try:
        exclusive, readonly = (flag[_config.get(k, "0").lower()] for k in ("exclusive", "readonly"))
    except KeyError:
        raise ValueError("nbdclone: exclusive and readonly are true or false") from None
    _settings = Settings(
        Path(_config["store"]),
        worker,
        workers,
        cpu,
        control,
        listeners,
        exclusive,
        readonly,
        level,
        handshake,
        per_client,
        allow,
    )
    os.umask(0o077)  # nbdkit sets its own; what this worker writes in the store is private
    logging.basicConfig(
        stream=sys.stderr,
        level=level.upper(),
        format=f"%(asctime)s %(levelname)s nbdclone[worker {worker}]: %(message)s",
    )


def after_fork() -> None:
    # Threads start here, after nbdkit may have forked (FACTS).
    assert _settings is not None
    if _settings.control is not None:
        keep_serving_when_orphaned()
        _drain.watch(_settings.control, range(3, 3 + _settings.listeners), _close_all_for_stop)
    watch_connections(_settings.handshake_timeout, _settings.per_client, lambda: dict(_connections))
    if in_fleet(_settings.store):
        global _fence
        _fence = Fence(RunDir(_settings.store))
        _fence.watch(_apply_fence)


def _apply_fence(lost: set[str], deadline_ns: int) -> None:
    """A new lease deadline for every open connection; connections to clones another host owns now are
    refused from here on (fence_ns 0)."""
    for h in list(_handles.values()):
        if h.name in lost:
            h.revoked = True
        h.fence_ns = 0 if h.revoked else deadline_ns
    if lost:
        log.warning("fleet: clone(s) %s moved to another host; their connections here are refused", sorted(lost))


def _close_all_for_stop() -> None:
    if _registry is not None:
        _registry.close_all()


def _worker_of(name: str, cat: Catalog | None = None) -> int:
    assert _settings is not None
    return worker_of(cat or _reg().store.catalog(), name, _settings.workers)


def _mine(name: str, cat: Catalog | None = None) -> bool:
    assert _settings is not None
    return _worker_of(name, cat) == _settings.worker


def thread_model() -> int:
    return int(nbdkit.THREAD_MODEL_PARALLEL)


def _reg() -> Registry:
    # Opened lazily, after nbdkit has forked: RocksDB starts threads, and so do we. Under a lock: the
    # first connections open at once, and two registries would each open a clone's overlay (two writers
    # of one map, each taking the other's open for an unclean stop).
    global _registry
    if _registry is None:
        with _first_open:
            if _registry is None:
                assert _settings is not None
                registry = Registry(Store(_settings.store))
                watch_stderr(_refusals)
                threading.Thread(
                    target=publish_stats,
                    args=(RunDir(_settings.store), _settings.worker, registry.stats, _counters, _refusals),
                    name="nbdclone-stats",
                    daemon=True,
                ).start()
                _registry = registry
    return _registry


@_errors
def list_exports(readonly: bool, is_tls: bool) -> list[tuple[str, str]]:
    cat = _reg().store.catalog()
    return [(n, f"clone of {c.base}" if c.base else "blank disk") for n, c in cat.clones.items() if _mine(n, cat)]


def default_export(readonly: bool, is_tls: bool) -> str:
    return ""


@_errors
def preconnect(readonly: bool) -> None:
    """--allow with --listen: a client whose address is not allowed is dropped before its handshake (it
    learns nothing, not even the names of the clones)."""
    assert _settings is not None
    if not _settings.allow:
        return
    address = peer_address()
    if address is None or not any(address in network for network in _settings.allow):
        raise NotAllowed(address=address or "an unknown address")  # (logged as this one line)


def open(readonly: bool) -> Handle:  # noqa: A001 - nbdkit finds the callback by this name
    assert _settings is not None
    if _drain.draining:
        _drain.park(_me())
    try:
        name = nbdkit.export_name()
    except UnicodeDecodeError:
        raise CloneNotFound(name="(not UTF-8)", store=_settings.store) from None
    if not is_valid_name(name):
        # Checked before any lookup: a malformed name never reaches the store.
        raise CloneNotFound(name=name[:80], store=_settings.store)
    cat = _reg().store.catalog()
    if not _mine(name, cat):
        # Another worker serves it: one RocksDB handle per clone, in one process (`nbdclone uri` says where).
        raise StorageError(errno.ENOENT, what=f"clone {name!r}", detail=f"is served by worker {_worker_of(name)}")
    record = cat.clones.get(name)
    if not _fence.owns(name):
        _fence.refresh(_apply_fence)  # a clone created or moved here since the last look
    if not _fence.owns(name):
        raise NotOwned(name=name, why="its fleet lease ran out or another host owns it")
    clone = _reg().acquire(name, exclusive=_settings.exclusive)
    tid = threading.get_native_id()
    _pins().opened(tid)
    key = object()  # the connection, for its counters
    stats = _counters.opened(id(key), name)
    readonly = _settings.readonly or (record is not None and record.readonly)
    h = Handle(name, clone, readonly, stats, stats.ops["read"], stats.ops["write"], key, _me(), tid, 0)
    _connections[tid] = name
    h.fence_ns = _fence.deadline_ns
    _handles[tid] = h
    h.gil_state = gil_ensure()  # last: nothing after it can fail
    return h


def close(h: Handle) -> None:
    _connections.pop(h.tid, None)
    _handles.pop(h.tid, None)
    _counters.closed(id(h.key))
    _pins().closed(h.tid)
    _reg().release(h.name)
    _drain.inflight.pop(_me(), None)
    if threading.get_ident() == h.thread:  # else leave it: releasing another thread's state is fatal
        gil_release(h.gil_state)


_pin_state: Pins | None = None


def _pins() -> Pins:
    global _pin_state
    if _pin_state is None:
        with _first_open:
            if _pin_state is None:
                _pin_state = Pins(_settings.cpu if _settings is not None else None)
    return _pin_state


def export_description(h: Handle) -> str:
    return f"nbdclone clone {h.name}"


def get_size(h: Handle) -> int:
    return h.clone.size


def block_size(h: Handle) -> tuple[int, int, int]:
    return (1, 4096, MAX_REQUEST)


def can_write(h: Handle) -> bool:
    return not h.readonly


def can_flush(h: Handle) -> bool:
    return True


def can_trim(h: Handle) -> bool:
    return True


def can_zero(h: Handle) -> bool:
    return True


def can_fast_zero(h: Handle) -> bool:
    # A zero is always a metadata change (markers), never a data write.
    return True


def can_fua(h: Handle) -> int:
    return int(nbdkit.FUA_NATIVE)


def can_multi_conn(h: Handle) -> bool:
    # Every connection to a clone shares one overlay handle in this process; a flush syncs its data file
    # and its WAL, which covers every write acknowledged on any connection.
    return True


def can_extents(h: Handle) -> bool:
    return True


def can_cache(h: Handle) -> int:
    return int(nbdkit.CACHE_NATIVE)


def is_rotational(h: Handle) -> bool:
    return False


def pread(h: Handle, buf: memoryview, offset: int, flags: int) -> None:
    # The hot path: _request's work, inline.
    me = _me()
    _drain.inflight[me] = 1
    if _drain.draining:
        _drain.park(me)
    started = _ns()
    try:
        if started > h.fence_ns:
            _held(h, me)
        h.clone.pread_into(buf, offset)
    except (NbdcloneError, OSError) as exc:
        h.reads.errors += 1
        nbdkit.set_error(exc.errno or errno.EIO)
        raise
    finally:
        _drain.inflight[me] = 0
    elapsed = _ns() - started
    s = h.reads
    s.requests += 1
    s.bytes += len(buf)
    s.nanos += elapsed
    s.buckets[_bucket(_BOUNDS, elapsed)] += 1  # type: ignore[index]


def pwrite(h: Handle, buf: memoryview, offset: int, flags: int) -> None:
    me = _me()
    _drain.inflight[me] = 1
    if _drain.draining:
        _drain.park(me)
    started = _ns()
    try:
        if started > h.fence_ns:
            _held(h, me)
        h.clone.pwrite(buf, offset, fua=bool(flags & _FUA))
        ended = _ns()
        if ended > h.fence_ns:  # written while the lease lapsed: acknowledged only if it is back
            _held(h, me)
    except (NbdcloneError, OSError) as exc:
        h.writes.errors += 1
        nbdkit.set_error(exc.errno or errno.EIO)
        raise
    finally:
        _drain.inflight[me] = 0
    elapsed = ended - started
    s = h.writes
    s.requests += 1
    s.bytes += len(buf)
    s.nanos += elapsed
    s.buckets[_bucket(_BOUNDS, elapsed)] += 1  # type: ignore[index]


_FUA = nbdkit.FLAG_FUA


@_request("flush", sized=False)
def flush(h: Handle, flags: int) -> None:
    h.clone.flush()


@_request("trim")
def trim(h: Handle, count: int, offset: int, flags: int) -> None:
    h.clone.trim(count, offset, fua=bool(flags & nbdkit.FLAG_FUA))


@_request("zero")
def zero(h: Handle, count: int, offset: int, flags: int) -> None:
    h.clone.zero(count, offset, fua=bool(flags & nbdkit.FLAG_FUA))


@_request("extents")
def extents(h: Handle, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
    if flags & nbdkit.FLAG_REQ_ONE:
        return h.clone.extents(count, offset)[:1]
    return h.clone.extents(count, offset)


@_request("cache")
def cache(h: Handle, count: int, offset: int, flags: int) -> None:
    h.clone.prefetch(count, offset)


def cleanup() -> None:
    if _registry is not None:
        _registry.close_all()
    flush_stderr()
