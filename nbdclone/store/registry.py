"""The clones a server process has open: one Clone (one RocksDB handle) per clone, shared by all of its
connections, opened by the first connection and closed by the last.

Sharing one handle is what makes a flush on one connection cover every connection's writes, so the server
may advertise multi-conn. Bases are shared the same way between the clones that read them.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from nbdclone.store._rocks import RocksOverlay
from nbdclone.store.base import Base, BaseImage, ZeroBase
from nbdclone.store.catalog import Store, validate_name
from nbdclone.store.clone import Clone

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Open:
    clone: Clone
    base_key: str | None
    users: int


class Registry:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._clones: dict[str, _Open] = {}
        self._bases: dict[str, tuple[Base, int]] = {}

    def acquire(self, name: str) -> Clone:
        """Open clone `name` for one more connection. Unknown or malformed names raise and create nothing."""
        validate_name("clone", name)
        with self._lock:
            entry = self._clones.get(name)
            if entry is None:
                entry = self._open(name)
                self._clones[name] = entry
            entry.users += 1
            return entry.clone

    def _open(self, name: str) -> _Open:
        with self.store.lock(shared=True):
            record = self.store.get_clone(name)
            base_key = None if record.base is None else self.store.get_base(record.base).id
            base = self._get_base(base_key, record.size)
            try:
                overlay = RocksOverlay(self.store.clone_path(record))
                clone = Clone(base, overlay, record.size)
            except BaseException:
                self._put_base(base_key)
                raise
        log.info("opened clone %s", name)
        return _Open(clone, base_key, 0)

    def _get_base(self, key: str | None, size: int) -> Base:
        if key is None:
            return ZeroBase(size)
        base, users = self._bases.get(key, (None, 0))
        if base is None:
            record = next(r for r in self.store.catalog().bases.values() if r.id == key)
            base = BaseImage(self.store.base_path(record))
        self._bases[key] = (base, users + 1)
        return base

    def _put_base(self, key: str | None) -> None:
        if key is None:
            return
        base, users = self._bases[key]
        if users == 1:
            del self._bases[key]
            base.close()
        else:
            self._bases[key] = (base, users - 1)

    def release(self, name: str) -> None:
        with self._lock:
            entry = self._clones[name]
            entry.users -= 1
            if entry.users:
                return
            del self._clones[name]
            try:
                entry.clone.close()
            finally:
                self._put_base(entry.base_key)
        log.info("closed clone %s", name)

    def close_all(self) -> None:
        with self._lock:
            for name, entry in list(self._clones.items()):
                try:
                    entry.clone.close()
                except Exception:
                    log.exception("closing clone %s", name)
                self._put_base(entry.base_key)
            self._clones.clear()
