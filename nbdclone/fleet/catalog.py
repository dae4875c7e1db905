"""The fleet's catalog in etcd. The only module that imports aetcd.

Keys, under PREFIX = /nbdclone/FLEET/ (one etcd can hold several fleets), by family (one class each;
a FleetCatalog is one connection with a part per family: catalog.bases.promote(...), catalog.clones.get(...)):

    Bases   bases/NAME/next              the next version number: reserve compares its revision
            bases/NAME/versions/V        {size, created, source, map object, map sha256}: written only
                                         once the version's chunks and map are in RADOS (host.py)
            bases/NAME/current           V: a flip compares its revision, that V is recorded and not
                                         retiring (two hosts flipping at once: one wins, the loser
                                         learns the winner)
            bases/NAME/holds/V/HOST      HOST has V in its store (put before staging, deleted after
                                         removing it)
            bases/NAME/retiring/V        V is being removed: no flip to it, no new clone of it; its
                                         records go once no holds key is left (one range compare)
            bases/NAME/traces/V          the object holding V's boot trace (the first host's wins)
    Clones  clones/NAME                  {host, epoch, store, id, ship}: the owner and its epoch; every
                                         change compares the record's revision
            owners/HOST/NAME             the epoch, written in the transaction that writes the record:
                                         a host reads its own clones, never the fleet's every record
    Hosts   hosts/HOST                   {store, pid} under the host's lease: it may serve while it holds
    Warm    warm/NAME/V/HOST             HOST holds V with its boot trace in its cache
    Work    imports/ID, gc/ID            an import (or move) or a gc under way, under a lease

Every change is one etcd transaction that compares what it read. Records are small JSON (etcd requests
stop at 1.5 MiB); maps and chunks live in RADOS (objects.py). Every range read is paged (PAGE keys at one
revision). The methods are coroutines; `run` runs one on a private event loop for a command. One
FleetCatalog per event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import aetcd
from aetcd import rpc, rtypes

from nbdclone import errors
from nbdclone.fleet.config import TIMEOUT, FleetConfig

T = TypeVar("T")
#: Keys per range request. A reply over gRPC's 4 MiB limit fails, and an unpaged read of every clone record
#: did past about 24,000 of them: each host's lease refresh failed and the whole fleet stopped serving.
PAGE = 1000
#: gRPC shares a connection's reconnect backoff between channels to one address, growing to 120 s: a new
#: client made to retry after etcd came back failed at once ("connection refused", the last error) until
#: the shared backoff ran out (measured: leases renewed 4.6 s after etcd was healthy). Capped at 0.5 s,
#: so a host serves again within about a second of etcd's return.
CHANNEL_OPTIONS = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 500,
}


@dataclass(frozen=True, slots=True)
class FleetVersion:
    id: str
    size: int
    created: str
    source: str
    map_object: str
    map_sha256: str


class FlipLost(errors.NbdcloneError):
    errno = 16
    template = "base {base}: another host flipped it first (to version {winner}); nothing was changed"


class FleetCatalog:
    """One etcd connection to a fleet's catalog, with a part per key family (see the module's docstring),
    and what spans them: the watch of the whole prefix, forgetting a host."""

    def __init__(self, config: FleetConfig) -> None:
        self.config = config
        host, port = config.etcd_address()
        self._client = aetcd.Client(
            host=host, port=port, timeout=TIMEOUT, connect_wait_timeout=TIMEOUT, options=CHANNEL_OPTIONS
        )
        self.bases = Bases(self)
        self.clones = Clones(self)
        self.hosts = Hosts(self)
        self.warm = Warm(self)
        self.work = Work(self)

    async def __aenter__(self) -> FleetCatalog:
        try:
            await self._client.connect()
        except Exception as exc:  # aetcd raises its own types and grpc's
            raise errors.NbdcloneError(detail=f"cannot reach etcd at {self.config.etcd}: {exc}") from None
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.close()

    def _key(self, *parts: str) -> bytes:
        return self.config.prefix + "/".join(parts).encode()

    async def _call(self, what: str, call: Awaitable[T]) -> T:
        try:
            return await call
        except errors.NbdcloneError:
            raise
        except Exception as exc:
            raise self._failed(what, exc) from None

    def _failed(self, what: str, exc: object) -> errors.NbdcloneError:
        return errors.NbdcloneError(detail=f"etcd at {self.config.etcd} did not answer ({what}): {exc}")

    async def _scan(self, what: str, prefix: bytes, *, keys_only: bool = False) -> list[rtypes.KeyValue]:
        return (await self._scan_at(what, prefix, keys_only=keys_only))[1]

    async def _scan_at(self, what: str, prefix: bytes, *, keys_only: bool = False) -> tuple[int, list[rtypes.KeyValue]]:
        """(the revision, every key under `prefix` at it), in key order, read PAGE keys at a time at one
        revision (one consistent view). A revision compacted between two pages starts the read again at the
        newest."""
        end = aetcd.utils.prefix_range_end(prefix)
        for _ in range(3):
            start, revision = prefix, 0
            out: list[rtypes.KeyValue] = []
            try:
                while True:
                    request = rpc.RangeRequest(
                        key=start, range_end=end, limit=PAGE, revision=revision, keys_only=keys_only
                    )
                    await self._client.connect()
                    reply = await self._client.kvstub.Range(request, timeout=TIMEOUT, metadata=self._client.metadata)
                    revision = revision or reply.header.revision
                    out += map(rtypes.KeyValue, reply.kvs)
                    if not reply.more or not reply.kvs:
                        return revision, out
                    start = reply.kvs[-1].key + b"\0"
            except rpc.AioRpcError as exc:
                if exc.code() != rpc.StatusCode.OUT_OF_RANGE:  # (compacted)
                    raise self._failed(what, exc.details()) from None
            except Exception as exc:
                raise self._failed(what, exc) from None
        raise errors.NbdcloneError(detail=f"etcd at {self.config.etcd}: {what}: compacted under every read")

    async def forget_host(self, host: str) -> int:
        """Delete the holds and warm keys of a host gone for good: refused while it holds a lease or owns
        a clone. Returns how many versions it held."""
        if await self.hosts.get(host) is not None:
            raise errors.InvalidArgument(detail=f"host {host!r} holds a lease: it is alive")
        owned = sorted(n for n, r in (await self.clones.all()).items() if r["host"] == host)
        if owned:
            raise errors.InvalidArgument(
                detail=f"host {host!r} owns clone(s) {', '.join(owned)}: take them over first (clone move --force)"
            )
        held = 0
        for base in await self.bases.names():
            prefix = self._key("bases", base, "holds", "")
            for kv in await self._scan("holds", prefix, keys_only=True):
                if kv.key.endswith(b"/" + host.encode()):
                    await self._call("forget host", self._client.delete(kv.key))
                    held += 1
            for kv in await self._scan("warm", self._key("warm", base, ""), keys_only=True):
                if kv.key.endswith(b"/" + host.encode()):
                    await self._call("forget host", self._client.delete(kv.key))
        return held

    async def watch(self, start: int, on_event: Callable[[str, bytes | None, int], None]) -> None:
        """Follow every change of the fleet from revision `start` (forever): `on_event(key under the fleet's
        prefix, its new value or None if deleted, the event's revision)`. Raises Compacted if etcd no
        longer has revision `start`."""
        n = len(self.config.prefix)
        try:
            async for event in await self._client.watch_prefix(self.config.prefix, start_revision=start):
                kv = event.kv
                on_event(kv.key[n:].decode(), kv.value if event.kind == rtypes.EventKind.PUT else None, kv.mod_revision)
        except aetcd.exceptions.RevisionCompactedError as exc:
            raise Compacted(detail=f"revision {start} (compacted below {exc.compacted_revision})") from None


class Bases:
    """bases/NAME/...: versions, the current pointer, holds, retiring marks, boot traces."""

    def __init__(self, catalog: FleetCatalog) -> None:
        self._c = catalog

    async def reserve(self, base: str) -> str:
        """Take the next version number of `base` (one transaction; retried while another host takes one)."""
        key = self._c._key("bases", base, "next")
        tx = self._c._client.transactions
        while True:
            got = await self._c._call("reserve", self._c._client.get(key))
            vid = int(got.value) if got is not None else 1
            compare = [tx.mod(key) == got.mod_revision] if got is not None else [tx.version(key) == 0]
            ok, _ = await self._c._call(
                "reserve",
                self._c._client.transaction(compare=compare, success=[tx.put(key, str(vid + 1).encode())], failure=[]),
            )
            if ok:
                return str(vid)

    async def add_version(self, base: str, version: FleetVersion) -> bool:
        """Name a version whose chunks and map are in RADOS; the base's first version becomes current.
        Returns whether it became current."""
        tx = self._c._client.transactions
        current = self._c._key("bases", base, "current")
        record = self._c._key("bases", base, "versions", version.id)
        value = json.dumps(asdict(version)).encode()
        ok, _ = await self._c._call(
            "add version",
            self._c._client.transaction(
                compare=[tx.version(current) == 0],
                success=[tx.put(record, value), tx.put(current, version.id.encode())],
                failure=[tx.put(record, value)],
            ),
        )
        return bool(ok)

    async def versions(self, base: str) -> dict[str, FleetVersion]:
        prefix = self._c._key("bases", base, "versions", "")
        found = await self._c._scan("versions", prefix)
        return {kv.key[len(prefix) :].decode(): FleetVersion(**json.loads(kv.value)) for kv in found}

    async def names(self) -> list[str]:
        prefix = self._c._key("bases", "")
        found = await self._c._scan("bases", prefix, keys_only=True)
        return sorted({kv.key[len(prefix) :].decode().split("/")[0] for kv in found})

    async def current(self, base: str) -> tuple[str, int] | None:
        """(version, the pointer's revision), or None if the base has no version yet."""
        got = await self._c._call("current", self._c._client.get(self._c._key("bases", base, "current")))
        return None if got is None else (got.value.decode(), got.mod_revision)

    async def promote(self, base: str, vid: str, *, seen: int | None = None) -> str:
        """Flip `base` to `vid`: one transaction comparing the pointer's revision (the one `seen`, or the
        one read now) and that the version is recorded. Returns the old version; FlipLost if another flip
        came in between."""
        tx = self._c._client.transactions
        current_key = self._c._key("bases", base, "current")
        record = self._c._key("bases", base, "versions", vid)
        now = await self.current(base)
        if now is None:
            raise errors.BaseNotFound(name=base, store=f"fleet {self._c.config.name}")
        old, revision = now
        retiring = self._c._key("bases", base, "retiring", vid)
        compare = [
            tx.mod(current_key) == (seen if seen is not None else revision),
            tx.version(record) > 0,
            tx.version(retiring) == 0,
        ]
        ok, responses = await self._c._call(
            "promote",
            self._c._client.transaction(
                compare=compare,
                success=[tx.put(current_key, vid.encode())],
                failure=[tx.get(current_key), tx.get(record), tx.get(retiring)],
            ),
        )
        if ok:
            return old
        pointer, exists, leaving = responses
        if not exists:
            raise errors.VersionNotFound(name=base, version=vid, store=f"fleet {self._c.config.name}")
        if leaving:
            raise errors.InvalidArgument(
                detail=f"{base}@{vid} is being removed from the fleet; it cannot become current"
            )
        raise FlipLost(base=base, winner=pointer[0][0].decode() if pointer else "?")

    # Removing versions:
    #
    # A host that stages a version first puts bases/NAME/holds/V/HOST, then checks that the version is
    # still recorded (else it takes the key back and stages nothing); it deletes the key only after it has
    # removed the version from its store. Removing a version (retire) marks it retiring (no flip to it,
    # no new stagings for new clones), and the record goes in one transaction that compares that no holds
    # key is left (a range compare): a host's put comes before that transaction (which then fails) or
    # after it (and the host finds the record gone). So no host ever serves a version the fleet forgot,
    # and fleet gc takes its chunks only once no map names them.

    def _holds_prefix(self, base: str, vid: str) -> bytes:
        return self._c._key("bases", base, "holds", vid, "")

    async def hold(self, base: str, vid: str, host: str) -> bool:
        """Say `host` holds version `vid` (before staging it). Returns False, and takes it back, if the
        version is not recorded (any more)."""
        key = self._holds_prefix(base, vid) + host.encode()
        await self._c._call("hold", self._c._client.put(key, b"1"))
        if await self._c._call("hold", self._c._client.get(self._c._key("bases", base, "versions", vid))) is None:
            await self._c._call("hold", self._c._client.delete(key))
            return False
        return True

    async def let_go(self, base: str, vid: str, host: str) -> None:
        """`host` removed version `vid` from its store."""
        await self._c._call("let go", self._c._client.delete(self._holds_prefix(base, vid) + host.encode()))

    async def holders(self, base: str, vid: str) -> list[str]:
        prefix = self._holds_prefix(base, vid)
        found = await self._c._scan("holds", prefix, keys_only=True)
        return sorted(kv.key[len(prefix) :].decode() for kv in found)

    async def retiring(self, base: str) -> set[str]:
        prefix = self._c._key("bases", base, "retiring", "")
        found = await self._c._scan("retiring", prefix, keys_only=True)
        return {kv.key[len(prefix) :].decode() for kv in found}

    async def retire(self, base: str, vid: str) -> None:
        """Mark version `vid` retiring: one transaction comparing that it is recorded and not current."""
        tx = self._c._client.transactions
        record = self._c._key("bases", base, "versions", vid)
        current = self._c._key("bases", base, "current")
        ok, responses = await self._c._call(
            "retire",
            self._c._client.transaction(
                compare=[tx.version(record) > 0, tx.value(current) != vid.encode()],
                success=[tx.put(self._c._key("bases", base, "retiring", vid), b"1")],
                failure=[tx.get(record)],
            ),
        )
        if not ok:
            if not responses[0]:
                raise errors.VersionNotFound(name=base, version=vid, store=f"fleet {self._c.config.name}")
            raise errors.VersionInUse(name=base, version=vid, why="it is the fleet's current version")

    async def forget(self, base: str, vid: str) -> bool:
        """Delete a retiring version's records if no host holds it (one transaction). Returns whether it
        did; its map and chunks are then fleet gc's."""
        tx = self._c._client.transactions
        holds = self._holds_prefix(base, vid)
        retiring = self._c._key("bases", base, "retiring", vid)
        ok, _ = await self._c._call(
            "forget",
            self._c._client.transaction(
                compare=[tx.version(holds, aetcd.utils.prefix_range_end(holds)) == 0, tx.version(retiring) > 0],
                success=[
                    tx.delete(self._c._key("bases", base, "versions", vid)),
                    tx.delete(self._c._key("bases", base, "traces", vid)),
                    tx.delete(retiring),
                ],
                failure=[],
            ),
        )
        if ok:
            await self._c._call("forget", self._c._client.delete_prefix(self._c._key("warm", base, vid, "")))
        return bool(ok)

    async def traces(self, base: str) -> dict[str, str]:
        """Version -> the object holding its boot trace, for the versions of `base` that have one."""
        prefix = self._c._key("bases", base, "traces", "")
        found = await self._c._scan("traces", prefix)
        return {kv.key[len(prefix) :].decode(): kv.value.decode() for kv in found}

    async def set_trace(self, base: str, vid: str, obj: str) -> bool:
        """Name a version's trace object; the first host's wins. Returns whether this one did."""
        tx = self._c._client.transactions
        key = self._c._key("bases", base, "traces", vid)
        ok, _ = await self._c._call(
            "trace",
            self._c._client.transaction(
                compare=[tx.version(key) == 0], success=[tx.put(key, obj.encode())], failure=[]
            ),
        )
        return bool(ok)

    async def clear_trace(self, base: str, vid: str) -> None:
        await self._c._call("trace", self._c._client.delete(self._c._key("bases", base, "traces", vid)))

    async def listing(self) -> tuple[int, dict[str, bytes]]:
        """(the revision, every key under bases/ at it, without the prefix -> its value): a view's list."""
        prefix = self._c._key("bases", "")
        revision, found = await self._c._scan_at("bases", prefix)
        return revision, {kv.key[len(prefix) :].decode(): kv.value for kv in found}


class Clones:
    """clones/NAME and owners/HOST/NAME: which host owns each clone, at which epoch."""

    def __init__(self, catalog: FleetCatalog) -> None:
        self._c = catalog

    async def all(self) -> dict[str, dict[str, Any]]:
        """Every clone record of the fleet (fleet-wide commands; a host reads its own: `owned`)."""
        prefix = self._c._key("clones", "")
        found = await self._c._scan("clones", prefix)
        return {kv.key[len(prefix) :].decode(): {**json.loads(kv.value), "rev": kv.mod_revision} for kv in found}

    async def get(self, name: str) -> dict[str, Any] | None:
        """One clone's record (with its revision, "rev"), or None."""
        got = await self._c._call("clone", self._c._client.get(self._c._key("clones", name)))
        return None if got is None else {**json.loads(got.value), "rev": got.mod_revision}

    # Each clone record's owner is indexed under owners/HOST/NAME (value: the record's epoch), written in
    # the transaction that writes the record: a host reads its own clones, not the fleet's (a lease refresh
    # and a sync cost the same with 100 clone records or 100,000).

    def _owner_key(self, host: str, name: str) -> bytes:
        return self._c._key("owners", host, name)

    async def owned(self, host: str) -> dict[str, int]:
        """The clones `host` owns -> their epochs."""
        prefix = self._c._key("owners", host, "")
        return {kv.key[len(prefix) :].decode(): int(kv.value) for kv in await self._c._scan("owned", prefix)}

    async def index_owners(self, host: str, names: Iterable[str]) -> int:
        """Make `host`'s part of the owner index agree with the records of `names` (the clones its store
        holds) and of the entries it has (a fleet written before the index, or by hand): a read per clone
        of this host, never the fleet's every record; then a transaction per entry to add or drop, each
        comparing the record it follows. Returns how many entries it changed."""
        tx = self._c._client.transactions
        records = {n: r for n in sorted(set(names)) if (r := await self.get(n)) is not None and r["host"] == host}
        have = await self.owned(host)
        changed = 0
        for name, rec in records.items():
            if have.get(name) != int(rec["epoch"]):
                key = self._c._key("clones", name)
                ok, _ = await self._c._call(
                    "index owners",
                    self._c._client.transaction(
                        compare=[tx.mod(key) == rec["rev"]],
                        success=[tx.put(self._owner_key(host, name), str(rec["epoch"]).encode())],
                        failure=[],
                    ),
                )
                changed += bool(ok)
        for name in have.keys() - records.keys():
            key = self._c._key("clones", name)
            now = await self.get(name)
            compare = [tx.version(key) == 0] if now is None else [tx.mod(key) == now["rev"]]
            if now is None or now["host"] != host:
                ok, _ = await self._c._call(
                    "index owners",
                    self._c._client.transaction(
                        compare=compare, success=[tx.delete(self._owner_key(host, name))], failure=[]
                    ),
                )
                changed += bool(ok)
        return changed

    async def claim(self, name: str, host: str, store: str) -> None:
        """Record a new clone as `host`'s (epoch 1, its data in `store`); refused if the fleet has one of
        that name."""
        tx = self._c._client.transactions
        key = self._c._key("clones", name)
        value = json.dumps({"host": host, "epoch": 1, "store": store, "id": uuid.uuid4().hex}).encode()
        ok, responses = await self._c._call(
            "create clone",
            self._c._client.transaction(
                compare=[tx.version(key) == 0],
                success=[tx.put(key, value), tx.put(self._owner_key(host, name), b"1")],
                failure=[tx.get(key)],
            ),
        )
        if not ok:
            owner = json.loads(responses[0][0][0])["host"]
            raise errors.CloneExists(name=name, store=f"fleet {self._c.config.name} (on host {owner})")

    async def release(self, name: str, host: str) -> None:
        """Forget a clone this host owns."""
        tx = self._c._client.transactions
        key = self._c._key("clones", name)
        got = await self._c._call("remove clone", self._c._client.get(key))
        if got is None:
            return
        if json.loads(got.value)["host"] != host:
            raise errors.NbdcloneError(detail=f"clone {name!r} is owned by host {json.loads(got.value)['host']}")
        await self._c._call(
            "remove clone",
            self._c._client.transaction(
                compare=[tx.mod(key) == got.mod_revision],
                success=[tx.delete(key), tx.delete(self._owner_key(host, name))],
                failure=[],
            ),
        )

    async def move(
        self, name: str, seen: dict[str, Any], to: str, extra: dict[str, Any], *, owner_gone: bool = False
    ) -> int:
        """Give clone `name` (as `seen`: its record and revision) to host `to` with the next epoch, in one
        transaction that compares the record's revision and, with `owner_gone`, that the old owner's lease
        key is gone (a takeover). Returns the new epoch; raises if anything changed meanwhile."""
        tx = self._c._client.transactions
        key = self._c._key("clones", name)
        epoch = int(seen["epoch"]) + 1
        value = json.dumps({"host": to, "epoch": epoch, **extra}).encode()
        compare = [tx.mod(key) == seen["rev"]]
        if owner_gone:
            compare.append(tx.version(self._c._key("hosts", seen["host"])) == 0)
        success = [tx.put(key, value), tx.put(self._owner_key(to, name), str(epoch).encode())]
        if seen["host"] != to:
            success.append(tx.delete(self._owner_key(seen["host"], name)))
        ok, _ = await self._c._call("move", self._c._client.transaction(compare=compare, success=success, failure=[]))
        if not ok:
            raise errors.NbdcloneError(
                detail=f"clone {name!r} changed owner or its owner is alive; nothing was moved"
                if owner_gone
                else f"clone {name!r} changed while moving it; nothing was moved"
            )
        return epoch


class Hosts:
    """hosts/HOST: each live host's key, under its lease."""

    def __init__(self, catalog: FleetCatalog) -> None:
        self._c = catalog

    async def register(self, host: str, info: dict[str, Any], ttl: int) -> Any:
        """Put this host's key under a new lease of `ttl` seconds; returns the lease (refresh() it)."""
        lease = await self._c._call("lease", self._c._client.lease(ttl))
        await self._c._call(
            "register", self._c._client.put(self._c._key("hosts", host), json.dumps(info).encode(), lease)
        )
        return lease

    async def resume(self, host: str, lease_id: int, ttl: int) -> Any | None:
        """The lease `lease_id`, refreshed, if etcd still has it and `host`'s key is on it; else None."""
        got = await self._c._call("resume", self._c._client.get(self._c._key("hosts", host)))
        if got is None or int(got.lease) != lease_id:
            return None
        reply = await self._c._call("resume", self._c._client.refresh_lease(lease_id))
        return aetcd.Lease(lease_id, ttl, self._c._client) if int(reply.TTL) > 0 else None

    async def refresh(self, lease: Any) -> bool:
        """Keep a lease alive; False if etcd no longer has it (it expired)."""
        reply = await self._c._call("refresh", lease.refresh())
        return int(reply.TTL) > 0  # 0: etcd let it expire

    async def get(self, host: str) -> dict[str, Any] | None:
        got = await self._c._call("host", self._c._client.get(self._c._key("hosts", host)))
        return None if got is None else dict(json.loads(got.value))


#: Seconds: how long a crashed import or gc can block the other (Work).
WORK_TTL = 900


class Warm:
    """warm/NAME/V/HOST: the hosts that hold a version with its boot trace in their cache."""

    def __init__(self, catalog: FleetCatalog) -> None:
        self._c = catalog

    async def put(self, base: str, vid: str, host: str) -> None:
        await self._c._call("warm", self._c._client.put(self._c._key("warm", base, vid, host), b"1"))

    async def share(self, base: str, vid: str) -> tuple[int, int]:
        """(live hosts that have version `vid` staged and its trace in their cache, live hosts)."""
        hosts = await self._c._scan("hosts", self._c._key("hosts", ""), keys_only=True)
        live = {kv.key.rsplit(b"/", 1)[-1] for kv in hosts}
        warm = await self._c._scan("warm", self._c._key("warm", base, vid, ""), keys_only=True)
        return len(live & {kv.key.rsplit(b"/", 1)[-1] for kv in warm}), len(live)


class Work:
    """imports/ID and gc/ID: imports (and moves) and gcs under way, each under a lease of WORK_TTL.

    An import (or a move) puts chunks put-if-absent: an existing chunk is a dedup hit it will reference
    once its map is named. A gc deletes chunks nothing names. So neither may run while the other does: each
    announces itself (a key under a lease, which a crash lets expire), then looks for the other, and backs
    off if it is there. Both announce before they look, so at least one sees the other."""

    def __init__(self, catalog: FleetCatalog) -> None:
        self._c = catalog

    async def announce(self, kind: str) -> tuple[bytes, Any]:
        lease = await self._c._call("announce", self._c._client.lease(WORK_TTL))
        key = self._c._key(kind, uuid.uuid4().hex)
        await self._c._call("announce", self._c._client.put(key, b"1", lease))
        return key, lease

    async def others(self, kind: str) -> int:
        found = await self._c._scan("look", self._c._key(kind, ""), keys_only=True)
        return len(list(found))

    async def withdraw(self, lease: Any) -> None:
        await self._c._call("withdraw", lease.revoke())


class Compacted(errors.NbdcloneError):
    template = "etcd no longer has the changes a watch asked for: {detail}"


_thread = threading.local()  # .catalog, .loop: where `run` sends this thread's work (on_loop)


def run(config: FleetConfig, work: Callable[[FleetCatalog], Awaitable[T]]) -> T:
    """Run `work(catalog)`: on a private event loop and connection (how a command talks to etcd), or, in a
    thread inside `on_loop`, on that loop's long-lived connection."""
    shared: FleetCatalog | None = getattr(_thread, "catalog", None)
    if shared is not None and shared.config == config:

        async def on_shared() -> T:
            return await work(shared)

        return asyncio.run_coroutine_threadsafe(on_shared(), _thread.loop).result()

    async def main() -> T:
        async with FleetCatalog(config) as catalog:
            return await work(catalog)

    return asyncio.run(main())


@contextlib.contextmanager
def on_loop(catalog: FleetCatalog, loop: asyncio.AbstractEventLoop) -> Iterator[None]:
    """For the body, in this thread (not the loop's), `run` uses `catalog`, connected on `loop`: a server's
    syncs share one etcd connection for its life instead of opening one each."""
    _thread.catalog, _thread.loop = catalog, loop
    try:
        yield
    finally:
        _thread.catalog = _thread.loop = None
