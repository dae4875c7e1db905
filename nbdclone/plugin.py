"""nbdkit glue: the only module that imports nbdkit.

Each clone of the store is an export named after the clone. The store core does the work; this module
turns nbdkit's callbacks into core calls and core errors into the errno the client should see
(an exception without nbdkit.set_error would reach the client as EIO).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
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

from nbdclone.errors import CloneNotFound, NbdcloneError, StorageError
from nbdclone.store.catalog import Catalog, Store, is_valid_name, worker_of, write_atomic
from nbdclone.store.clone import Clone
from nbdclone.store.registry import Registry

API_VERSION = 2
log = logging.getLogger("nbdclone")
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class Settings:
    store: Path
    worker: int = 0
    workers: int = 1
    cpu: int | None = None


@dataclass(frozen=True, slots=True)
class Handle:
    name: str
    clone: Clone
    thread: int  # the connection's thread, which holds a Python thread state for the connection's life
    tid: int  # its native id (for its CPU affinity)
    gil_state: int


# nbdkit enters Python with PyGILState_Ensure and leaves with PyGILState_Release around every callback. On
# one of its own threads that holds no Python thread state, each call creates one and deletes it again
# (an allocation, a fresh frame stack mapped and unmapped: a page fault per request; 4 KiB random writes
# spent 10% of their time clearing those pages, and reads ran at half speed). Holding one extra Ensure
# from open to close keeps the connection thread's state alive between requests. With one nbdkit thread
# per connection (how the supervisor runs workers) open, every request and close run on that thread.
_ensure = ctypes.pythonapi.PyGILState_Ensure
_ensure.restype = ctypes.c_int
_release = ctypes.pythonapi.PyGILState_Release
_release.argtypes = [ctypes.c_int]


_config: dict[str, str] = {}
_settings: Settings | None = None
_registry: Registry | None = None


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


_KEYS = ("store", "worker", "workers", "cpu")


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
    except ValueError:
        raise ValueError("nbdclone: worker, workers and cpu are numbers") from None
    if not 0 <= worker < workers:
        raise ValueError(f"nbdclone: worker={worker} is not in 0..{workers - 1}")
    _settings = Settings(store=Path(_config["store"]), worker=worker, workers=workers, cpu=cpu)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format=f"nbdclone[worker {worker}]: %(message)s")


def _worker_of(name: str, cat: Catalog | None = None) -> int:
    assert _settings is not None
    return worker_of(cat or _reg().store.catalog(), name, _settings.workers)


def _mine(name: str, cat: Catalog | None = None) -> bool:
    assert _settings is not None
    return _worker_of(name, cat) == _settings.worker


def thread_model() -> int:
    return int(nbdkit.THREAD_MODEL_PARALLEL)


def _reg() -> Registry:
    # Opened lazily, after nbdkit has forked: RocksDB starts threads, and so do we.
    global _registry
    if _registry is None:
        assert _settings is not None
        _registry = Registry(Store(_settings.store))
        threading.Thread(target=_publish_stats, args=(_registry, _settings), daemon=True).start()
    return _registry


def _publish_stats(registry: Registry, settings: Settings) -> None:
    """Every second, write this worker's counters where `nbdclone stats` reads them."""
    path = settings.store / "run" / f"stats-worker-{settings.worker}.json"
    while True:
        try:
            write_atomic(
                path, json.dumps({"worker": settings.worker, "pid": os.getpid(), **registry.stats()}), path.parent
            )
        except OSError as exc:
            log.warning("cannot write %s: %s", path, exc)
        time.sleep(1.0)


@_errors
def list_exports(readonly: bool, is_tls: bool) -> list[tuple[str, str]]:
    cat = _reg().store.catalog()
    return [(n, f"clone of {c.base}" if c.base else "blank disk") for n, c in cat.clones.items() if _mine(n, cat)]


def default_export(readonly: bool, is_tls: bool) -> str:
    return ""


@_errors
def open(readonly: bool) -> Handle:  # noqa: A001 - nbdkit finds the callback by this name
    try:
        name = nbdkit.export_name()
    except UnicodeDecodeError:
        raise CloneNotFound(name="(not UTF-8)", store=_settings.store if _settings else "?") from None
    if not is_valid_name(name):
        # Checked before any lookup: a malformed name never reaches the store.
        raise CloneNotFound(name=name[:80], store=_settings.store if _settings else "?")
    if not _mine(name):
        # Another worker serves it: one RocksDB handle per clone, in one process (`nbdclone uri` says where).
        raise StorageError(errno.ENOENT, what=f"clone {name!r}", detail=f"is served by worker {_worker_of(name)}")
    clone = _reg().acquire(name)
    tid = threading.get_native_id()
    _pins().opened(tid)
    return Handle(name, clone, threading.get_ident(), tid, _ensure())  # last: nothing after it can fail


def close(h: Handle) -> None:
    _pins().closed(h.tid)
    _reg().release(h.name)
    if threading.get_ident() == h.thread:  # else leave it: releasing another thread's state is fatal
        _release(h.gil_state)


class _Pins:
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


_pin_state: _Pins | None = None


def _pins() -> _Pins:
    global _pin_state
    if _pin_state is None:
        _pin_state = _Pins(_settings.cpu if _settings is not None else None)
    return _pin_state


def export_description(h: Handle) -> str:
    return f"nbdclone clone {h.name}"


def get_size(h: Handle) -> int:
    return h.clone.size


def block_size(h: Handle) -> tuple[int, int, int]:
    return (1, 4096, 32 << 20)


def can_write(h: Handle) -> bool:
    return True


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
    # The hot path: no wrapper call, errors mapped inline (same as _errors).
    try:
        h.clone.pread_into(buf, offset)
    except (NbdcloneError, OSError) as exc:
        nbdkit.set_error(exc.errno or errno.EIO)
        raise


def pwrite(h: Handle, buf: memoryview, offset: int, flags: int) -> None:
    try:
        h.clone.pwrite(buf, offset, fua=bool(flags & _FUA))
    except (NbdcloneError, OSError) as exc:
        nbdkit.set_error(exc.errno or errno.EIO)
        raise


_FUA = nbdkit.FLAG_FUA


@_errors
def flush(h: Handle, flags: int) -> None:
    h.clone.flush()


@_errors
def trim(h: Handle, count: int, offset: int, flags: int) -> None:
    h.clone.trim(count, offset, fua=bool(flags & nbdkit.FLAG_FUA))


@_errors
def zero(h: Handle, count: int, offset: int, flags: int) -> None:
    h.clone.zero(count, offset, fua=bool(flags & nbdkit.FLAG_FUA))


@_errors
def extents(h: Handle, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
    if flags & nbdkit.FLAG_REQ_ONE:
        return h.clone.extents(count, offset)[:1]
    return h.clone.extents(count, offset)


@_errors
def cache(h: Handle, count: int, offset: int, flags: int) -> None:
    h.clone.prefetch(count, offset)


def cleanup() -> None:
    if _registry is not None:
        _registry.close_all()
