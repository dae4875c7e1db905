"""The fleet's objects in RADOS: chunks named by their SHA-256, version maps. The only module that imports
rados (Debian python3-rados). A librados connection starts a dozen threads: one per process, opened when
first needed (never before a fork).

Thread safety: one Objects may be used from many threads (librados' ioctx operations are thread safe).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import importlib
import itertools
import os
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

try:
    import rados  # Debian python3-rados (not on PyPI)
except ImportError:  # a single-host install: fleet commands say what to install
    rados = None

from nbdclone import errors
from nbdclone.fleet.config import TIMEOUT, FleetConfig

_ENTRY = struct.Struct("<Q32s16s")  # chunk index, SHA-256, the local digest (mmh3-128)
_HEADER = struct.Struct("<8sQQ")  # magic, size, entries
_MAGIC = b"NBDCFMAP"


@dataclass(frozen=True, slots=True)
class FleetMap:
    """A version as the fleet stores it: its size and, for each chunk that is not all zeros, its index,
    SHA-256 and local digest (so a host finds a chunk it holds without fetching it)."""

    size: int
    entries: tuple[tuple[int, bytes, bytes], ...]

    def encode(self) -> bytes:
        return _HEADER.pack(_MAGIC, self.size, len(self.entries)) + b"".join(_ENTRY.pack(*e) for e in self.entries)

    @classmethod
    def decode(cls, raw: bytes, what: str) -> FleetMap:
        try:
            magic, size, n = _HEADER.unpack_from(raw)
            if magic != _MAGIC or len(raw) != _HEADER.size + n * _ENTRY.size:
                raise ValueError("not a fleet map")
            entries = tuple(_ENTRY.iter_unpack(raw[_HEADER.size :]))
        except (struct.error, ValueError) as exc:
            raise errors.StorageError(5, what=f"reading {what}", detail=str(exc)) from None
        return cls(size, entries)


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def chunk_name(key: bytes) -> str:
    return "chunk." + key.hex()


def _load_rados() -> None:
    """Import librados now if it was missing when this module was (installed since: a test engine's setup)."""
    global rados
    if rados is None:
        importlib.invalidate_caches()
        with contextlib.suppress(ImportError):
            rados = importlib.import_module("rados")
    if rados is None:
        raise errors.NbdcloneError(detail="fleet mode needs librados for Python: apt install python3-rados")


class Objects:
    def __init__(self, config: FleetConfig) -> None:
        self.config = config
        _load_rados()
        try:
            limits = {k: str(TIMEOUT) for k in ("rados_osd_op_timeout", "rados_mon_op_timeout", "client_mount_timeout")}
            self._cluster = rados.Rados(conffile=config.ceph_conf, conf=limits)
            self._cluster.connect(timeout=TIMEOUT)
            self._io = self._cluster.open_ioctx(config.pool)
        except rados.Error as exc:
            detail = f"cannot reach Ceph ({config.ceph_conf}, pool {config.pool}): {exc}"
            raise errors.NbdcloneError(detail=detail) from None
        self._io.set_namespace(config.name)
        self.reads = 0  # objects read (and their bytes): what this connection cost the cluster
        self.read_bytes = 0
        self._counting = threading.Lock()

    def close(self) -> None:
        self._io.close()
        self._cluster.shutdown()

    def __enter__(self) -> Objects:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def put_if_absent(self, name: str, data: bytes) -> bool:
        """Write object `name` unless it exists. Returns whether it was written (False: a dedup hit)."""
        op = self._io.create_write_op()
        try:
            op.new(rados.LIBRADOS_CREATE_EXCLUSIVE)
            op.write_full(data)
            self._io.operate_write_op(op, name)
            return True
        except rados.ObjectExists:
            return False
        finally:
            self._io.release_write_op(op)

    def put(self, name: str, data: bytes) -> None:
        """Write object `name` whole (replacing it: one atomic write_full)."""
        try:
            self._io.write_full(name, data)
        except rados.Error as exc:
            raise errors.StorageError(5, what=f"writing object {name}", detail=str(exc)) from None

    def remove(self, name: str) -> None:
        with contextlib.suppress(rados.ObjectNotFound):
            self._io.remove_object(name)

    def exists(self, name: str) -> bool:
        try:
            self._io.stat(name)
        except rados.ObjectNotFound:
            return False
        return True

    def get(self, name: str, size: int) -> bytes:
        try:
            data = bytes(self._io.read(name, size))
            self._count(data)
            return data
        except rados.ObjectNotFound:
            raise errors.StorageError(2, what=f"reading object {name}", detail="it is not in the fleet") from None
        except rados.Error as exc:
            raise errors.StorageError(5, what=f"reading object {name}", detail=str(exc)) from None

    def put_chunk(self, data: bytes) -> tuple[bytes, bool]:
        """Store a chunk under its SHA-256; returns the digest and whether it was new."""
        key = sha256(data)
        return key, self.put_if_absent(chunk_name(key), data)

    def put_chunks(self, chunks: Iterable[bytes], window: int = 32) -> Iterator[bytes]:
        """Store each chunk under its SHA-256, put-if-absent, with up to `window` writes in flight; yields
        the digests in order once each write is durable (an existing object is a dedup hit)."""
        pending: collections.deque[tuple[bytes, Any, Any]] = collections.deque()

        def settle() -> bytes:
            key, completion, op = pending.popleft()
            completion.wait_for_complete_and_cb()
            status = completion.get_return_value()
            self._io.release_write_op(op)
            if status < 0 and -status != errno.EEXIST:
                raise errors.StorageError(-status, what=f"writing {chunk_name(key)}", detail=os.strerror(-status))
            return key

        for data in chunks:
            key = sha256(data)
            op = self._io.create_write_op()
            op.new(rados.LIBRADOS_CREATE_EXCLUSIVE)
            op.write_full(data)
            pending.append((key, self._io.operate_aio_write_op(op, chunk_name(key)), op))
            if len(pending) >= window:
                yield settle()
        while pending:
            yield settle()

    def get_chunk(self, key: bytes, size: int) -> bytes:
        """A chunk, verified against the digest that names it."""
        data = self.get(chunk_name(key), size)
        if sha256(data) != key:
            raise errors.StorageError(5, what=f"reading {chunk_name(key)}", detail="its bytes do not match its name")
        return data

    def get_chunks(self, keys: Iterable[bytes], size: int, window: int = 32) -> Iterator[bytes]:
        """The chunks named by `keys`, in order, each verified; up to `window` reads in flight at once (a
        cold host fetches at the cluster's pace, not one round trip per chunk)."""
        keys = list(keys)
        for key, data in zip(keys, self.get_many((chunk_name(k) for k in keys), size, window), strict=True):
            if sha256(data) != key:
                raise errors.StorageError(
                    5, what=f"reading {chunk_name(key)}", detail="its bytes do not match its name"
                )
            yield data

    def get_many(self, names: Iterable[str], size: int, window: int = 32) -> Iterator[bytes]:
        """The objects `names` (up to `size` bytes each), in order, with up to `window` reads in flight."""
        names = iter(names)
        pending: collections.deque[tuple[str, Any, dict[str, bytes]]] = collections.deque()

        def submit(name: str) -> None:
            box: dict[str, bytes] = {}

            def done(completion: Any, data: bytes, box: dict[str, bytes] = box) -> None:
                box["data"] = data

            pending.append((name, self._io.aio_read(name, size, 0, done), box))

        for name in itertools.islice(names, window):
            submit(name)
        while pending:
            name, completion, box = pending.popleft()
            completion.wait_for_complete_and_cb()
            status = completion.get_return_value()
            if status < 0:
                raise errors.StorageError(-status, what=f"reading {name}", detail=os.strerror(-status))
            data = bytes(box.get("data", b""))
            self._count(data)
            following = next(names, None)
            if following is not None:
                submit(following)
            yield data

    def _count(self, data: bytes) -> None:
        with self._counting:
            self.reads += 1
            self.read_bytes += len(data)

    def list_chunks(self) -> Iterator[str]:
        return self.list_objects(("chunk.",))

    def list_objects(self, prefixes: tuple[str, ...]) -> Iterator[str]:
        """The names of the fleet's objects that start with one of `prefixes`."""
        for obj in self._io.list_objects():
            if obj.key.startswith(prefixes):
                yield obj.key
