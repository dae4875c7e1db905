"""The clones a server process has open: one Clone (one RocksDB handle) per clone, shared by all of its
connections, opened by the first connection and closed by the last.

The first connection also decides the version: a following clone takes its base's current version, a
pinned clone its pin. If that is not the version its overlay was started on, the clone moves (a new empty
overlay on the new version; its old writes are dropped), but only if no client may come back to the old
one: a following clone is *held* (durably, before its first connection is served) until its last connection
closes while the server runs. A server that is stopped, or dies, or a worker that dies, leaves it held, so a
client that reconnects after the restart (QEMU's reconnect-delay, nbd-client -persist) finds the same disk.
Later connections join the open clone, so every connection of a clone sees one version until the last one
closes, whatever flips happen meanwhile.

Sharing one handle is also what makes a flush on one connection cover every connection's writes, so the
server may advertise multi-conn. Base versions are shared the same way between the clones that read them,
and a version no clone reads any more stays open for a while (the IDLE_VERSIONS most recently used): a
client that connects, asks the size and disconnects before connecting again (fio does, for every job) would
otherwise load the version's map again each time (measured: 6.4 ms per connect of a 1 GiB base, 0.2 ms for
nbdkit's file plugin).
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from dataclasses import dataclass

from nbdclone import errors
from nbdclone.store import Store
from nbdclone.store._rocks import LateOverlay, RocksOverlay
from nbdclone.store.base import Base, ZeroBase
from nbdclone.store.cache import PackReader
from nbdclone.store.catalog import CloneRecord, validate_name
from nbdclone.store.chunks import ChunkedBase, TraceRecorder, load_trace
from nbdclone.store.clone import Clone
from nbdclone.store.overlay import Overlay

log = logging.getLogger(__name__)

BaseKey = tuple[str, str]  # (base id, version id)
PREFETCH_EVERY = 30.0  # seconds: a version's trace is read in again at most this often per process
IDLE_VERSIONS = 8  # versions kept open with no clone reading them, least recently used closed first


@dataclass(slots=True)
class _Open:
    clone: Clone
    base_key: BaseKey | None
    version: str | None
    users: int
    record: CloneRecord


class Registry:
    def __init__(self, store: Store, *, record_traces: bool = True) -> None:
        self.store = store
        self.record_traces = record_traces
        self._lock = threading.Lock()
        self._clones: dict[str, _Open] = {}
        self._bases: dict[BaseKey, tuple[ChunkedBase, int]] = {}
        self._idle: dict[BaseKey, ChunkedBase] = {}  # open versions no clone reads, oldest first
        self._traces: dict[BaseKey, list[tuple[int, int]]] = {}
        self._prefetched: dict[BaseKey, float] = {}
        self._reader: PackReader | None = None

    @property
    def reader(self) -> PackReader | None:
        """This process's reader of the chunk pack (the shared cache), once a base version is open."""
        return self._reader

    def acquire(self, name: str, *, exclusive: bool = False) -> Clone:
        """Open clone `name` for one more connection. Unknown or malformed names raise and create nothing.
        `exclusive`: refuse (EBUSY) while another connection has it open."""
        validate_name("clone", name)
        with self._lock:
            entry = self._clones.get(name)
            if entry is not None and exclusive:
                raise errors.CloneBusy(name=name)
            record = entry.record if entry is not None else self.store.get_clone(name)
            if (leaving := self.store.leaving(record)) is not None:
                raise errors.CloneLeaving(name=name, to=leaving)  # a move drains it: no new client
            if entry is None:
                entry = self._open(name)
                self._clones[name] = entry
            entry.users += 1
            return entry.clone

    def version_of(self, name: str) -> str | None:
        with self._lock:
            return self._clones[name].version

    def _open(self, name: str) -> _Open:
        with self.store.lock(shared=True):
            record = self.store.get_clone(name)
            version = self.store.target_version(record)  # a checked pointer: a version the base has
            state = self.store.clone_state(record)  # checked: a damaged state raises, and nothing moves
            on = self.store.state_on(record, state) if state is not None else None
            follows = record.base is not None and record.pin is None
            moving = False
            if state is not None and on != (record.base, version) and follows and self.store.is_held(record):
                log.info(
                    "clone %s stays on version %s (its clients may come back); it moves to %s after its last "
                    "connection closes",
                    name,
                    state.version,
                    version,
                )
                version = state.version
            elif on != (record.base, version):  # never opened, or its base moved (or it changed base: lineage.py)
                moving = True
            # The version is opened (its map read and checked) before any overlay is dropped for it.
            key, base = self._get_base(record, version)
            try:
                overlay: Overlay
                if moving:
                    if state is not None:
                        log.info(
                            "clone %s moves from version %s to %s; its writes are dropped",
                            name,
                            state.version,
                            version,
                        )
                    overlay = self._start_overlay(record, version, follows)
                else:
                    assert state is not None
                    overlay = RocksOverlay(self.store.overlay_path(record, state), scrub="background")
                    if follows:
                        self._hold(record)
                if key is not None and self._traces.get(key) and self._reader is not None:
                    self._prefetch(key, f"{record.base}@{version}")
                clone = Clone(base, overlay, base.size)
            except BaseException:
                self._put_base(key)
                raise
        log.info("opened clone %s (version %s)", name, version)
        return _Open(clone, key, version, 0, record)

    def _start_overlay(self, record: CloneRecord, version: str | None, follows: bool) -> Overlay:
        """A new empty overlay for the clone on `version` (its old one dropped), held if it `follows` its
        base. On a full disk the clone is served with nothing written (LateOverlay): reads from the version,
        ENOSPC to writes until one finds room to start it; it is held only then (a reconnect after a crash
        before then finds it where it was, and moves it as this open did). Caller holds the store's shared
        lock."""

        def start(lock: threading.Lock | None = None) -> RocksOverlay:
            state = self.store.start_overlay(record, version)
            if follows:
                self._hold(record)
            return RocksOverlay(self.store.overlay_path(record, state), lock=lock)

        def start_late(lock: threading.Lock) -> RocksOverlay:
            with self.store.lock(shared=True):
                return start(lock)

        try:
            return start()
        except (OSError, errors.StorageError) as exc:  # (RocksDB's is a StorageError)
            if exc.errno != errno.ENOSPC:
                raise
        log.warning("clone %s: no space left to start its overlay; served unwritten, writes get ENOSPC", record.name)
        return LateOverlay(start_late, f"clone {record.name}")

    def _hold(self, record: CloneRecord) -> None:
        try:
            self.store.hold(record)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            # A full disk: serve the clone (reads) rather than refuse it; it is not marked held, so a crash
            # before its clients leave could let a pending promote move it.
            log.warning("clone %s: cannot mark it held (%s); serving it unmarked", record.name, exc)

    def _prefetch(self, key: BaseKey, label: str) -> None:
        """A clone of a version with a boot trace connects: read the trace into the cache, in the order the
        boot will want it, on a thread of its own (reads release the GIL), so it stays ahead of the boot.
        A storm of clones connecting at once starts one prefetch per version, not one each."""
        now = time.monotonic()
        if now - self._prefetched.get(key, -PREFETCH_EVERY) < PREFETCH_EVERY:
            return
        self._prefetched[key] = now
        reader, ranges = self._reader, self._traces[key]
        assert reader is not None

        def load() -> None:
            started = time.monotonic()
            loaded = reader.load(ranges)
            log.info(
                "prefetched %s: %.1f MiB in %.0f ms", label, loaded / (1 << 20), (time.monotonic() - started) * 1e3
            )

        threading.Thread(target=load, name="nbdclone-prefetch", daemon=True).start()

    def _get_base(self, record: CloneRecord, version: str | None) -> tuple[BaseKey | None, Base]:
        if record.base is None or version is None:
            return None, ZeroBase(record.size)
        base_record = self.store.get_base(record.base)
        key = (base_record.id, version)
        base, users = self._bases.get(key, (None, 0))
        if base is None:
            base = self._idle.pop(key, None)
            if base is None:
                if self._reader is None:
                    self._reader = PackReader(self.store.chunks.pack, self.store.clock_path, self.store.fetcher())
                base = ChunkedBase(self.store.chunks.pack, self.store.version_map(base_record, version), self._reader)
            if key not in self._traces:
                trace_path = self.store.trace_path(base_record, version)
                trace = load_trace(trace_path)
                if trace:
                    self._traces[key] = base.slot_ranges(trace, ordered=True)
                elif self.record_traces and base.recorder is None:
                    base.recorder = TraceRecorder(trace_path, stored=len(base.map.used_slots()))
        self._bases[key] = (base, users + 1)
        return key, base

    def _put_base(self, key: BaseKey | None) -> None:
        if key is None:
            return
        base, users = self._bases[key]
        if users > 1:
            self._bases[key] = (base, users - 1)
            return
        del self._bases[key]
        if base.recorder is not None:  # the first boot ended: its recording is written now (or, a probe's, dropped)
            base.recorder.finish()
            base.recorder = None  # the next first connection takes up the trace, or records again
        self._idle[key] = base
        while len(self._idle) > IDLE_VERSIONS:
            self._idle.pop(next(iter(self._idle))).close()

    def release(self, name: str) -> None:
        with self._lock:
            entry = self._clones[name]
            entry.users -= 1
            if entry.users:
                return
            del self._clones[name]
            try:
                entry.clone.close()
                self.store.unhold(entry.record)  # its last client left while we run: it may move now
            finally:
                self._put_base(entry.base_key)
        log.info("closed clone %s", name)

    def stats(self) -> dict[str, object]:
        with self._lock:
            return {
                "open_clones": len(self._clones),
                "open_versions": len(self._bases),
                "idle_versions": len(self._idle),
                "connections": sum(e.users for e in self._clones.values()),
                **(self._reader.stats.as_dict() if self._reader is not None else {}),
            }

    def close_all(self) -> None:
        with self._lock:
            for name, entry in list(self._clones.items()):
                try:
                    entry.clone.close()
                except Exception:
                    log.exception("closing clone %s", name)
                self._put_base(entry.base_key)
            self._clones.clear()
            for base in self._idle.values():
                base.close()
            self._idle.clear()
            if self._reader is not None:
                self._reader.close()
                self._reader = None
