"""etcd and RADOS in memory, for the fleet model (test_fleet_model.py).

Each keeps its state in files under one folder, changed one call at a time under a lock, so a process
killed between two calls (a SIGKILL at a crash point) leaves exactly the calls it made, as a real engine
would; and every process of a test sees one engine.

MemoryEtcd is what aetcd.Client is to nbdclone's catalog.py (get, put, delete, delete_prefix, transactions
with compares of value, version and mod revision over a key or a range, leases, watch_prefix, and paged
range reads at a revision, through `kvstub.Range`): every change is a revision, and the history keeps
them all (so a read at an old revision and a watch from one replay it), back to the compaction point.
memory_rados(folder) is a stand-in for the `rados` module objects.py uses: objects are files, an exclusive
create is a link (put-if-absent), a write_full a rename.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import pickle
import types
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aetcd
from aetcd import rpc, transactions

# -- etcd -------------------------------------------------------------------------------------------------


@dataclass
class _Entry:
    value: bytes
    create: int
    mod: int
    version: int
    lease: int


@dataclass
class _State:
    rev: int = 1
    kv: dict[bytes, _Entry] = field(default_factory=dict)
    leases: dict[int, int] = field(default_factory=dict)  # id -> TTL
    history: list[tuple[int, bytes, _Entry | None]] = field(default_factory=list)  # (rev, key, entry or deleted)
    compacted: int = 0
    next_lease: int = 1000


def _kv(key: bytes, e: _Entry) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        key=key, value=e.value, create_revision=e.create, mod_revision=e.mod, version=e.version, lease=e.lease
    )


def _in(key: bytes, start: bytes, end: bytes | None) -> bool:
    if end is None or end == b"":
        return key == start
    if end == b"\0":
        return key >= start
    return start <= key < end


class MemoryEtcd:
    """One etcd, its state in `folder`/etcd. `client()` makes what aetcd.Client(...) would."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "etcd"
        self._lock = folder / "etcd.lock"
        if not self.path.exists():
            self.path.write_bytes(pickle.dumps(_State()))

    @contextlib.contextmanager
    def state(self, write: bool = True) -> Iterator[_State]:
        with open(self._lock, "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            st: _State = pickle.loads(self.path.read_bytes())
            yield st
            if write:
                tmp = self.path.with_suffix(f".{uuid.uuid4().hex}")
                tmp.write_bytes(pickle.dumps(st))
                os.replace(tmp, self.path)

    def read(self) -> _State:
        with self.state(write=False) as st:
            return st

    # -- what tests do to it

    def expire(self, lease: int) -> None:
        with self.state() as st:
            _revoke(st, lease)

    def compact(self, revision: int) -> None:
        with self.state() as st:
            st.compacted = revision
            st.history = [h for h in st.history if h[0] > revision]

    def client(self, *args: Any, **kwargs: Any) -> MemoryClient:
        return MemoryClient(self)


def _put(st: _State, key: bytes, value: bytes, lease: int = 0) -> None:
    st.rev += 1
    old = st.kv.get(key)
    e = _Entry(value, old.create if old else st.rev, st.rev, (old.version if old else 0) + 1, lease)
    st.kv[key] = e
    st.history.append((st.rev, key, e))


def _delete(st: _State, start: bytes, end: bytes | None) -> int:
    keys = [k for k in st.kv if _in(k, start, end)]
    if keys:
        st.rev += 1
    for k in sorted(keys):
        del st.kv[k]
        st.history.append((st.rev, k, None))
    return len(keys)


def _revoke(st: _State, lease: int) -> None:
    st.leases.pop(lease, None)
    for k in sorted(k for k, e in st.kv.items() if e.lease == lease):
        _delete(st, k, None)


def _at(st: _State, revision: int) -> dict[bytes, _Entry]:
    """The keys as they were at `revision` (the current ones, less the history after it, replayed back)."""
    if not revision or revision >= st.rev:
        return st.kv
    if revision < st.compacted:
        raise rpc.AioRpcError(rpc.StatusCode.OUT_OF_RANGE, None, None, details="compacted")  # type: ignore[arg-type]
    out: dict[bytes, _Entry] = {}
    for rev, key, e in st.history:  # (complete above the compaction point, which is below `revision`)
        if rev > revision:
            break
        if e is None:
            out.pop(key, None)
        else:
            out[key] = e
    return out


def _value(lease: Any) -> int:
    return 0 if lease is None else int(getattr(lease, "id", lease))


class _KV:
    def __init__(self, etcd: MemoryEtcd) -> None:
        self.etcd = etcd

    async def Range(self, request: Any, timeout: float = 0, metadata: Any = None) -> Any:
        with self.etcd.state(write=False) as st:
            view = _at(st, request.revision)
            keys = sorted(k for k in view if _in(k, request.key, request.range_end))
            limit = request.limit or len(keys)
            kvs = [_kv(k, view[k]) for k in keys[:limit]]
            if request.keys_only:
                kvs = [types.SimpleNamespace(**{**vars(kv), "value": b""}) for kv in kvs]
            header = types.SimpleNamespace(revision=request.revision or st.rev)
            return types.SimpleNamespace(header=header, kvs=kvs, more=len(keys) > limit)


class MemoryClient:
    """The part of aetcd.Client that catalog.py uses."""

    def __init__(self, etcd: MemoryEtcd) -> None:
        self.etcd = etcd
        self.kvstub = _KV(etcd)
        self.metadata = None
        self.transactions = aetcd.client.Transactions()

    async def connect(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def get(self, key: bytes) -> Any:
        with self.etcd.state(write=False) as st:
            e = st.kv.get(key)
            return None if e is None else _kv(key, e)

    async def put(self, key: bytes, value: bytes, lease: Any = None) -> None:
        with self.etcd.state() as st:
            _put(st, key, value, _value(lease))

    async def delete(self, key: bytes) -> bool:
        with self.etcd.state() as st:
            return _delete(st, key, None) > 0

    async def delete_prefix(self, prefix: bytes) -> None:
        with self.etcd.state() as st:
            _delete(st, prefix, aetcd.utils.prefix_range_end(prefix))

    async def transaction(self, compare: list[Any], success: list[Any], failure: list[Any]) -> tuple[bool, list[Any]]:
        with self.etcd.state() as st:
            ok = all(_holds(st, c) for c in compare)
            responses = []
            for op in success if ok else failure:
                if isinstance(op, transactions.Put):
                    _put(st, op.key, op.value, _value(op.lease))
                    responses.append(types.SimpleNamespace())
                elif isinstance(op, transactions.Delete):
                    responses.append(types.SimpleNamespace(deleted=_delete(st, op.key, op.range_end)))
                elif isinstance(op, transactions.Get):
                    found = sorted(k for k in st.kv if _in(k, op.key, op.range_end))
                    responses.append([(st.kv[k].value, _kv(k, st.kv[k])) for k in found])
                else:
                    raise TypeError(f"the memory etcd has no {type(op).__name__} in transactions")
            return ok, responses

    async def lease(self, ttl: int) -> aetcd.Lease:
        with self.etcd.state() as st:
            st.next_lease += 1
            st.leases[st.next_lease] = ttl
            return aetcd.Lease(st.next_lease, ttl, self)

    async def refresh_lease(self, lease_id: int) -> Any:
        with self.etcd.state(write=False) as st:
            return types.SimpleNamespace(TTL=st.leases.get(lease_id, 0))

    async def revoke_lease(self, lease_id: int) -> None:
        with self.etcd.state() as st:
            _revoke(st, lease_id)

    async def watch_prefix(self, prefix: bytes, start_revision: int = 0) -> AsyncIterator[Any]:
        end = aetcd.utils.prefix_range_end(prefix)
        with self.etcd.state(write=False) as st:
            if start_revision and start_revision <= st.compacted:
                raise aetcd.exceptions.RevisionCompactedError(st.compacted)
            seen = (start_revision or st.rev + 1) - 1

        async def events() -> AsyncIterator[Any]:
            nonlocal seen
            while True:
                with self.etcd.state(write=False) as st:
                    new = [h for h in st.history if h[0] > seen and _in(h[1], prefix, end)]
                for rev, key, e in new:
                    kind = "PUT" if e is not None else "DELETE"
                    kv = _kv(key, e) if e is not None else types.SimpleNamespace(key=key, value=b"", mod_revision=rev)
                    yield types.SimpleNamespace(kind=kind, kv=kv)
                    seen = rev
                await asyncio.sleep(0.01)

        return events()


def _holds(st: _State, c: Any) -> bool:
    """Whether compare `c` holds: over a range, for every key in it (etcd's rule; no key: version 0)."""
    keys = [k for k in st.kv if _in(k, c.key, c.range_end)] if c.range_end else [c.key]
    for key in keys or [c.key]:
        e = st.kv.get(key)
        if isinstance(c, transactions.Value):
            have: Any = e.value if e else None
            if have is None:  # etcd: a compare of the value of a missing key fails
                return False
        elif isinstance(c, transactions.Version):
            have = e.version if e else 0
        elif isinstance(c, transactions.Mod):
            have = e.mod if e else 0
        elif isinstance(c, transactions.Create):
            have = e.create if e else 0
        else:
            raise TypeError(type(c).__name__)
        want = c.value.encode() if isinstance(c.value, str) else c.value
        ok = {
            rpc.Compare.EQUAL: have == want,
            rpc.Compare.NOT_EQUAL: have != want,
            rpc.Compare.LESS: have < want,
            rpc.Compare.GREATER: have > want,
        }[c.op]
        if not ok:
            return False
    return True


# -- RADOS ------------------------------------------------------------------------------------------------


class _RadosError(Exception):
    pass


class _ObjectExists(_RadosError):
    pass


class _ObjectNotFound(_RadosError):
    pass


class _Completion:
    def __init__(self, status: int, callback: Callable[[], None] | None = None) -> None:
        self.status = status
        self.callback = callback

    def wait_for_complete_and_cb(self) -> None:
        if self.callback is not None:
            self.callback()
            self.callback = None

    def get_return_value(self) -> int:
        return self.status


class _WriteOp:
    def __init__(self) -> None:
        self.exclusive = False
        self.data = b""

    def new(self, flag: int) -> None:
        self.exclusive = True

    def write_full(self, data: bytes) -> None:
        self.data = bytes(data)


class _Ioctx:
    def __init__(self, folder: Path) -> None:
        self.root = folder
        self.folder = folder / "_"

    def set_namespace(self, ns: str) -> None:
        self.folder = self.root / ns
        self.folder.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        pass

    def _path(self, name: str) -> Path:
        return self.folder / name.encode().hex()

    def _write(self, name: str, data: bytes, exclusive: bool) -> None:
        tmp = self.folder / f".tmp.{uuid.uuid4().hex}"
        tmp.write_bytes(data)
        try:
            if exclusive:
                try:
                    os.link(tmp, self._path(name))
                except FileExistsError:
                    raise _ObjectExists(name) from None
            else:
                os.replace(tmp, self._path(name))
        finally:
            tmp.unlink(missing_ok=True)

    def create_write_op(self) -> _WriteOp:
        return _WriteOp()

    def release_write_op(self, op: _WriteOp) -> None:
        pass

    def operate_write_op(self, op: _WriteOp, name: str) -> None:
        self._write(name, op.data, op.exclusive)

    def operate_aio_write_op(self, op: _WriteOp, name: str) -> _Completion:
        try:
            self._write(name, op.data, op.exclusive)
        except _ObjectExists:
            return _Completion(-errno.EEXIST)
        return _Completion(0)

    def write_full(self, name: str, data: bytes) -> None:
        self._write(name, data, False)

    def remove_object(self, name: str) -> None:
        try:
            self._path(name).unlink()
        except FileNotFoundError:
            raise _ObjectNotFound(name) from None

    def stat(self, name: str) -> tuple[int, float]:
        try:
            return self._path(name).stat().st_size, 0.0
        except FileNotFoundError:
            raise _ObjectNotFound(name) from None

    def read(self, name: str, size: int) -> bytes:
        try:
            return self._path(name).read_bytes()[:size]
        except FileNotFoundError:
            raise _ObjectNotFound(name) from None

    def aio_read(self, name: str, size: int, offset: int, done: Callable[[Any, bytes], None]) -> _Completion:
        try:
            data = self._path(name).read_bytes()[offset : offset + size]
        except FileNotFoundError:
            return _Completion(-errno.ENOENT)
        completion = _Completion(0)
        completion.callback = lambda: done(completion, data)
        return completion

    def list_objects(self) -> Iterator[Any]:
        for p in sorted(self.folder.iterdir()):
            if not p.name.startswith("."):
                yield types.SimpleNamespace(key=bytes.fromhex(p.name).decode())


def memory_rados(folder: Path) -> types.SimpleNamespace:
    """A `rados` module whose cluster is `folder` (a folder per namespace, a file per object)."""
    folder.mkdir(parents=True, exist_ok=True)

    class Rados:
        def __init__(self, conffile: str = "", conf: Any = None) -> None:
            pass

        def connect(self, timeout: float = 0) -> None:
            pass

        def open_ioctx(self, pool: str) -> _Ioctx:
            return _Ioctx(folder / pool)

        def shutdown(self) -> None:
            pass

    return types.SimpleNamespace(
        Rados=Rados,
        Error=_RadosError,
        ObjectExists=_ObjectExists,
        ObjectNotFound=_ObjectNotFound,
        LIBRADOS_CREATE_EXCLUSIVE=1,
    )


def objects_in(folder: Path, pool: str, namespace: str) -> dict[str, bytes]:
    """Every object of a memory RADOS: name -> bytes."""
    where = folder / pool / namespace
    if not where.is_dir():
        return {}
    return {bytes.fromhex(p.name).decode(): p.read_bytes() for p in where.iterdir() if not p.name.startswith(".")}
