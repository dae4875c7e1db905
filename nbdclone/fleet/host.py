"""A fleet host: each verb's order across etcd, RADOS and this host's store, written once.

Each verb is a table of steps (ORDERS) that `perform` runs in order. Before each step is a crash point
(NBDCLONE_CRASH_AT=VERB-STEP kills the process there: the e2e tests and the fleet model,
tests/fleet/test_fleet_model.py, use them); a step's undo, where it has one, runs if a later step fails
with an error (a kill runs nothing). The model runs every verb killed before each of its steps against
in-memory etcd and RADOS, and fails for any two steps swapped.

    verb            steps, in order                   the rule the order keeps
    import/publish  reserve, import, chunks, map, name  a version etcd names is whole in RADOS: its map,
                                                        and every chunk the map names
    promote         fleet, here                         a host's pointer is never on a version the
                                                        fleet's never was
    clone create    claim, create, serve                a clone a fleet host holds is recorded in etcd
    clone rm        remove, release                     as that host's
    clone move      ship, switch, clean                 the owner etcd names holds the clone, or the
                                                        manifest etcd names for it is in RADOS
    base rm N@V     retire, drop, forget                no host holds a version etcd forgot (the holds
                                                        keys, catalog.py)

What a kill leaves, verb by verb: an import, a number no version uses and chunks and a map etcd does not
name (fleet gc frees them); a promote, the fleet's pointer moved and this host's not yet (its next sync
moves it); a create or rm, a claim and no clone here (`clone rm NAME` here releases it); a move, before
the switch the source owning the clone as it was, after it the target owning it (its sync adopts the
shipped copy, the source's drops its own); a base rm, a version marked retiring (no flip to it, no new
clone of it) that hosts drop and a later base rm forgets.

Staging a version a verb needs (a promote's, a new clone's base) happens before its table: that is what
the host needs to serve, not part of any order.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Generic, TypeVar

from nbdclone import errors
from nbdclone.fleet import catalog as fleet_catalog
from nbdclone.fleet import clones as fleet_clones
from nbdclone.fleet import move as fleet_move
from nbdclone.fleet import sync as fleet_sync
from nbdclone.fleet.catalog import FleetCatalog, FleetVersion
from nbdclone.fleet.config import FleetConfig
from nbdclone.fleet.fetch import fetch_here
from nbdclone.fleet.gc import excluding_gc
from nbdclone.fleet.objects import FleetMap, Objects, sha256
from nbdclone.host import Host, Removed
from nbdclone.store import Store
from nbdclone.store.catalog import now, parse_base_ref, validate_name
from nbdclone.store.chunks import CHUNK
from nbdclone.store.layout import crash_point

log = logging.getLogger(__name__)
C = TypeVar("C")


@dataclass(frozen=True, slots=True)
class Step(Generic[C]):
    name: str
    do: Callable[[C], None]
    undo: Callable[[C], None] | None = None


def perform(verb: str, ctx: C) -> C:
    """Run verb `verb`'s steps (ORDERS[verb]) on `ctx`, a crash point before each; if one fails, the undo
    of each step done, newest first."""
    order: Sequence[Step[C]] = ORDERS[verb]
    done: list[Step[C]] = []
    try:
        for step in order:
            crash_point(f"{verb}-{step.name}")
            step.do(ctx)
            done.append(step)
    except BaseException:
        for step in reversed(done):
            if step.undo is not None:
                try:
                    step.undo(ctx)
                except errors.NbdcloneError as exc:  # the first error is the one to report
                    log.error("%s: undoing %s failed: %s", verb, step.name, exc)
        raise
    return ctx


# -- import and publish ---------------------------------------------------------------------------------


@dataclass(slots=True)
class _Import:
    store: Store
    config: FleetConfig
    name: str
    make: Callable[[str | None], str]
    objects: Objects
    vid: str = ""
    entries: list[tuple[int, bytes, bytes]] = field(default_factory=list)
    size: int = 0
    raw: bytes = b""
    map_object: str = ""
    current: bool = False


def _reserve(c: _Import) -> None:
    c.vid = fleet_catalog.run(c.config, lambda cat: cat.bases.reserve(c.name))


def _import_here(c: _Import) -> None:
    c.make(c.vid)


def _put_chunks(c: _Import) -> None:
    """The version's chunks, put-if-absent under their SHA-256 (a chunk staged from the fleet is there)."""
    vmap = c.store.version_map(c.store.get_base(c.name), c.vid, digests=True)
    remote = c.store.chunks.remote.load()
    stored = list(vmap.stored())
    local = [(i, slot) for i, slot, _ in stored if slot not in remote]
    fd = os.open(c.store.chunks.pack, os.O_RDONLY | os.O_CLOEXEC)
    try:
        digests = c.objects.put_chunks(os.pread(fd, CHUNK, slot * CHUNK) for _, slot in local)
        shas = {i: digest for (i, _), digest in zip(local, digests, strict=True)}
    finally:
        os.close(fd)
    c.entries = [(i, shas[i] if slot not in remote else remote[slot], key) for i, slot, key in stored]
    c.size = vmap.size
    c.raw = FleetMap(vmap.size, tuple(c.entries)).encode()
    c.map_object = f"map.{c.name}.{c.vid}.{sha256(c.raw).hex()[:16]}"


def _put_map(c: _Import) -> None:
    c.objects.put_if_absent(c.map_object, c.raw)


def _name_version(c: _Import) -> None:
    source = c.store.get_base(c.name).versions[c.vid].source
    version = FleetVersion(c.vid, c.size, now(), source, c.map_object, sha256(c.raw).hex())
    c.current = fleet_catalog.run(c.config, lambda cat: cat.bases.add_version(c.name, version))
    log.info("published %s@%s to fleet %s (%d chunks)", c.name, c.vid, c.config.name, len(c.entries))


# -- promote ----------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Promote:
    store: Store
    config: FleetConfig
    name: str
    vid: str
    old: str = ""


def _flip_fleet(c: _Promote) -> None:
    fleet_catalog.run(c.config, lambda cat: cat.bases.promote(c.name, c.vid))


def _flip_here(c: _Promote) -> None:
    c.old = c.store.promote(c.name, c.vid)


# -- clones -----------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Clones:
    store: Store
    config: FleetConfig
    names: list[str]
    make: Callable[[], None] = lambda: None


def _claim(c: _Clones) -> None:
    fleet_clones.claim(c.config, c.store.path, c.names)


def _release(c: _Clones) -> None:
    fleet_clones.release(c.config, c.names)


def _create_here(c: _Clones) -> None:
    c.make()


def _remove_here(c: _Clones) -> None:
    cat = c.store.catalog()
    for name in c.names:
        if name in cat.clones:  # (absent: a claim a killed create or rm left)
            c.store.remove_clone(name)


def _served(c: _Clones) -> None:
    fleet_clones.wait_served(c.store, c.names)


# -- moving a clone ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Move:
    store: Store  # the store the clone is shipped from (another host's, for a takeover)
    config: FleetConfig
    objects: Objects
    name: str
    record: dict[str, Any]  # etcd's record, as read before
    to: str
    target_store: str
    force: bool
    manifest: str = ""
    epoch: int = 0


def _ship(c: _Move) -> None:
    epoch = int(c.record["epoch"]) + 1
    c.manifest = fleet_move.ship(c.store, c.objects, c.name, fleet_move.ship_name(c.name, c.record, epoch))


def _switch(c: _Move) -> None:
    extra = {"ship": c.manifest, "store": c.target_store, "id": c.record.get("id", "")}
    c.epoch = fleet_catalog.run(
        c.config, lambda cat: cat.clones.move(c.name, c.record, c.to, extra, owner_gone=c.force)
    )


def _clean(c: _Move) -> None:
    if c.force:  # the old owner's sync drops its copy, if it ever comes back
        return
    cat = c.store.catalog()
    local = cat.clones[c.name]
    c.store.write_catalog(replace(cat, clones={n: r for n, r in cat.clones.items() if n != c.name}))
    shutil.rmtree(c.store.clone_dir(local), ignore_errors=True)


# -- removing a version from the fleet --------------------------------------------------------------------


@dataclass(slots=True)
class _Retire:
    store: Store
    config: FleetConfig
    name: str
    vid: str
    wait: float
    holders: list[str] = field(default_factory=list)


def _retire(c: _Retire) -> None:
    fleet_catalog.run(c.config, lambda cat: cat.bases.retire(c.name, c.vid))


def _drop_here(c: _Retire) -> None:
    fleet_sync.sync(c.store, c.config)  # this host lets go now (its server may not run)


def _forget(c: _Retire) -> None:
    deadline = time.monotonic() + c.wait
    while True:
        if fleet_catalog.run(c.config, lambda cat: cat.bases.forget(c.name, c.vid)):
            log.info("fleet %s: removed %s@%s (fleet gc frees its chunks)", c.config.name, c.name, c.vid)
            c.holders = []
            return
        c.holders = fleet_catalog.run(c.config, lambda cat: cat.bases.holders(c.name, c.vid))
        if time.monotonic() > deadline:
            return
        time.sleep(0.2)


ORDERS: dict[str, Sequence[Step[Any]]] = {
    "import": (
        Step("reserve", _reserve),
        Step("import", _import_here),
        Step("chunks", _put_chunks),
        Step("map", _put_map),
        Step("name", _name_version),
    ),
    "promote": (Step("fleet", _flip_fleet), Step("here", _flip_here)),
    "create": (Step("claim", _claim, undo=_release), Step("create", _create_here), Step("serve", _served)),
    "remove": (Step("remove", _remove_here), Step("release", _release)),
    "move": (Step("ship", _ship), Step("switch", _switch), Step("clean", _clean)),
    "retire": (Step("retire", _retire), Step("drop", _drop_here), Step("forget", _forget)),
}


class FleetHost(Host):
    """A host of a fleet: its verbs run in the orders above."""

    def __init__(self, path: Path, config: FleetConfig, say: Callable[[str], None] = lambda text: None) -> None:
        super().__init__(Store(path, fetch_here=fetch_here), say)
        self.config = config
        self.fleet = config.name

    def import_version(self, name: str, make: Callable[[str | None], str]) -> str:
        validate_name("base", name)
        with excluding_gc(self.config), Objects(self.config) as objects:
            # (a gc must not take away the dedup hits among its chunks before its map is named)
            return perform("import", _Import(self.store, self.config, name, make, objects)).vid

    def current(self, name: str) -> str:
        current = fleet_catalog.run(self.config, lambda c: c.bases.current(name))
        return current[0] if current is not None else "-"

    def promote(self, name: str, vid: str, *, wait_warm: float | None = None, wait_timeout: float = 0.0) -> str:
        validate_name("base", name)
        local = self.store.catalog().bases.get(name)
        if local is None or vid not in local.versions:  # here first (a version here needs no Ceph to flip to)
            fleet_sync.sync(self.store, self.config, also={name: {vid}})
        if wait_warm is not None:
            self._wait_warm(name, vid, wait_warm, wait_timeout)
        return self.flip(name, vid)

    def flip(self, name: str, vid: str) -> str:
        return perform("promote", _Promote(self.store, self.config, name, vid)).old

    def _wait_warm(self, name: str, vid: str, share: float, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            warm, live = fleet_catalog.run(self.config, lambda c: c.warm.share(name, vid))
            if live and warm >= share * live:
                self.say(f"{name}@{vid} is warm on {warm} of {live} live host(s)")
                return
            if time.monotonic() > deadline:
                raise errors.NbdcloneError(
                    detail=f"{name}@{vid} is warm on {warm} of {live} live host(s) after {timeout:.0f} s; "
                    "nothing flipped"
                )
            time.sleep(0.5)

    def remove_base(self, ref: str, wait: float) -> Removed:
        name, vid = parse_base_ref(ref)
        if name not in fleet_catalog.run(self.config, lambda c: c.bases.names()):
            return super().remove_base(ref, wait)
        if vid is None:
            raise errors.InvalidArgument(
                detail=f"base {name!r} is the fleet's: remove its old versions with base rm {name}@VERSION"
            )
        done = perform("retire", _Retire(self.store, self.config, name, vid, wait))
        return Removed(fleet=self.config.name, holders=tuple(done.holders))

    def clear_trace(self, name: str, vid: str) -> None:
        super().clear_trace(name, vid)
        fleet_catalog.run(self.config, lambda c: c.bases.clear_trace(name, vid))

    def create_clones(self, names: list[str], base: str | None, make: Callable[[], None]) -> None:
        if base is not None:
            self._stage(base)
        for name in names:
            validate_name("clone", name)
        perform("create", _Clones(self.store, self.config, names, make))

    def _stage(self, ref: str) -> None:
        """Bring the base version a new clone needs here first (nothing if it is here)."""
        name, vid = parse_base_ref(ref)
        local = self.store.catalog().bases.get(name)
        if local is not None and vid is None:
            return
        if vid:  # even if it is here: not a version the fleet is removing
            fleet_sync.sync(self.store, self.config, also={name: {vid}}, only=True, new_clone=True)
        else:
            fleet_sync.sync(self.store, self.config)

    def check_clone(self, name: str) -> None:
        """Raise CloneNotFound unless the clone is here, or the fleet records it as this host's (a claim a
        killed create or rm left: removing it releases the claim)."""
        if name in self.store.catalog().clones:
            return
        record = fleet_catalog.run(self.config, lambda c: c.clones.get(name))
        if record is None or record["host"] != self.config.host:
            self.store.get_clone(name)  # raises

    def remove_clone(self, name: str) -> None:
        self.check_clone(name)
        perform("remove", _Clones(self.store, self.config, [name]))

    def move_clone(self, name: str, to: str, *, force: bool, drain: float) -> int:
        """Give clone `name` to host `to`. Without `force`, this host must own it and it must be closed
        here, or close within `drain` seconds (no new client may open it meanwhile); with `force` (a
        takeover), its owner's lease must be gone and its store readable from here (shared storage).
        Returns the new epoch."""
        config = self.config

        async def look(c: FleetCatalog) -> tuple[dict[str, Any], dict[str, Any] | None]:
            record = await c.clones.get(name)
            if record is None:
                raise errors.CloneNotFound(name=name, store=f"fleet {config.name}")
            return record, await c.hosts.get(to)

        record, target = fleet_catalog.run(config, look)
        if target is None:
            raise errors.InvalidArgument(
                detail=f"host {to!r} holds no lease in fleet {config.name}: is its server running?"
            )
        with Objects(config) as objects, contextlib.ExitStack() as held, excluding_gc(config):
            if force:
                if record["host"] == config.host and to == config.host:
                    raise errors.InvalidArgument(detail=f"clone {name!r} is this host's already")
                source = Store(record["store"], fetch_here=fetch_here)
            else:
                if record["host"] != config.host:
                    raise errors.InvalidArgument(detail=f"clone {name!r} is host {record['host']}'s: move it there")
                if drain > 0:
                    held.enter_context(fleet_move.draining(self.store, name, to, drain))
                # Held to the end: no first connection here from the ship until the clone is gone from here.
                held.enter_context(self.store.lock())
                if self.store.is_open(self.store.get_clone(name)):
                    raise errors.CloneInUse(name=name)
                source = self.store
            move = _Move(source, config, objects, name, record, to, target.get("store", ""), force)
            return perform("move", move).epoch
