"""Moving versions between a host's store and the fleet.

    publish   a version the host imported (under the number the fleet reserved for it) goes to RADOS:
              its chunks put-if-absent under their SHA-256, then its map object; then etcd names it
    stage     a version the fleet names comes to the host: its map object is read and checked, each chunk
              the host's pack holds (found by its local digest, confirmed by SHA-256) is taken from the
              pack, each other one is fetched once and verified; then the local store commits it under
              the fleet's number (an import: chunks synced, map, catalog)
    sync      every fleet base's current version is staged, then the host's pointer is set to it: a
              following clone moves at its next first connection, as after a local flip

A host serves only what its own store holds, so etcd or Ceph being down stops nothing that runs: sync and
fleet commands fail with a clear error and serving goes on with the last view.
"""

from __future__ import annotations

import logging
import os
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from nbdclone import errors
from nbdclone.fleet import catalog as fleet_catalog
from nbdclone.fleet.catalog import FleetCatalog, FleetVersion
from nbdclone.fleet.config import FleetConfig
from nbdclone.fleet.objects import FleetMap, Objects, sha256
from nbdclone.store import Store
from nbdclone.store.catalog import now
from nbdclone.store.chunks import CHUNK, load_trace, write_trace
from nbdclone.store.images import warm_version

log = logging.getLogger(__name__)


@dataclass(slots=True)
class SyncReport:
    staged: list[str] = field(default_factory=list)  # NAME@VERSION brought to this host
    moved: list[tuple[str, str, str]] = field(default_factory=list)  # (base, old, new) local pointer moves
    clones: list[str] = field(default_factory=list)  # clones adopted or dropped (move.reconcile)
    traces: list[str] = field(default_factory=list)  # boot traces given to or taken from the fleet
    evicted: list[str] = field(default_factory=list)  # NAME@VERSION removed here to stay under the bound
    fetched: int = 0  # chunks read from RADOS
    local: int = 0  # chunks this host's pack already held


def import_version(
    store: Store, config: FleetConfig, name: str, local_import: Callable[[str], object]
) -> tuple[str, bool]:
    """Import a version of base `name` into the fleet: reserve its number in etcd, run `local_import(vid)`
    (an import into this host's store under that number), publish it. Returns the version and whether it
    became current (a new base's first version)."""
    from nbdclone.fleet.gc import excluding_gc

    with excluding_gc(config):  # its chunks are dedup hits a gc must not take away before the map is named
        vid = fleet_catalog.run(config, lambda c: c.reserve(name))
        local_import(vid)
        return vid, publish(store, config, name, vid)


def publish(store: Store, config: FleetConfig, name: str, vid: str) -> bool:
    """Put a local version's chunks and map in RADOS, then name it in etcd. Returns whether it became the
    base's current version."""
    record = store.get_base(name)
    vmap = store.version_map(record, vid, digests=True)
    with Objects(config) as objects:
        stored = list(vmap.stored())
        fd = os.open(store.chunks.pack, os.O_RDONLY | os.O_CLOEXEC)
        try:
            digests = objects.put_chunks(os.pread(fd, CHUNK, slot * CHUNK) for _, slot, _ in stored)
            entries = [(i, digest, key) for (i, _, key), digest in zip(stored, digests, strict=True)]
        finally:
            os.close(fd)
        raw = FleetMap(vmap.size, tuple(entries)).encode()
        map_object = f"map.{name}.{vid}.{sha256(raw).hex()[:16]}"
        objects.put_if_absent(map_object, raw)
    version = FleetVersion(vid, vmap.size, now(), record.versions[vid].source, map_object, sha256(raw).hex())
    current = fleet_catalog.run(config, lambda c: c.add_version(name, version))
    log.info("published %s@%s to fleet %s (%d chunks)", name, vid, config.name, len(entries))
    return current


def stage(store: Store, objects: Objects, name: str, version: FleetVersion, report: SyncReport) -> bool:
    """Bring fleet version `name`@`version.id` into this host's store. Returns False if it was here."""
    local = store.catalog().bases.get(name)
    if local is not None and version.id in local.versions:
        return False
    raw = objects.get(version.map_object, 64 << 20)
    if sha256(raw).hex() != version.map_sha256:
        raise errors.StorageError(5, what=f"reading {version.map_object}", detail="it does not match its record")
    fmap = FleetMap.decode(raw, version.map_object)
    with store.chunks.writer():
        existing = list(store.all_version_maps(digests=True))
        held: dict[bytes, list[int]] = {}
        for vm in existing:
            for _, slot, key in vm.stored():
                held.setdefault(key, []).append(slot)
        fd = os.open(store.chunks.pack, os.O_RDONLY | os.O_CLOEXEC) if held else -1
        # Which chunks this host holds (by the local digest, confirmed by SHA-256), then the rest fetched
        # with many reads in flight, in the order the import takes them.
        slots = [
            next((s for s in held.get(key, ()) if sha256(os.pread(fd, CHUNK, s * CHUNK)) == digest), -1)
            for _, digest, key in fmap.entries
        ]
        fetched = objects.get_chunks((e[1] for e, s in zip(fmap.entries, slots, strict=True) if s < 0), CHUNK)

        def chunks() -> Iterator[tuple[int, bytes | None]]:
            for (i, _, _), slot in zip(fmap.entries, slots, strict=True):
                if slot >= 0:
                    data = os.pread(fd, CHUNK, slot * CHUNK)
                    report.local += 1
                else:
                    data = next(fetched)
                    report.fetched += 1
                yield i, data[: min(CHUNK, fmap.size - i * CHUNK)]

        try:
            vmap, new_chunks = store.chunks.import_chunks(chunks(), fmap.size, existing)
        finally:
            if fd >= 0:
                os.close(fd)
        store.add_version(name, vmap, f"fleet {objects.config.name}: {version.source}", new_chunks, vid=version.id)
    report.staged.append(f"{name}@{version.id}")
    return True


def sync(
    store: Store,
    config: FleetConfig,
    *,
    also: dict[str, set[str]] | None = None,
    only: bool = False,
    warmed: set[str] | None = None,
) -> SyncReport:
    """Stage every fleet base's current version and the versions newer than it (so a flip finds every
    host ready), and the `also` versions (base -> ids); share boot traces both ways; read each staged
    version's trace into the cache once (`warmed` remembers which) and say so in etcd; then point this
    host's bases where the fleet's point. With `only`, stage just the `also` versions and move nothing."""

    View = dict[str, tuple[dict[str, FleetVersion], str | None, dict[str, str]]]

    async def read(c: FleetCatalog) -> tuple[View, dict[str, Any]]:
        """The fleet's state, over one etcd connection: per base its versions, current one and traces."""
        out = {}
        for base in await c.bases():
            current = await c.current(base)
            out[base] = (await c.versions(base), current[0] if current else None, await c.traces(base))
        return out, await c.clones()

    view, clones = fleet_catalog.run(config, read)
    report = SyncReport()
    warmed = set() if warmed is None else warmed
    with Objects(config) as objects:
        for base, (versions, current, traces) in sorted(view.items()):
            wanted = (also or {}).get(base, set())
            if current and not only:
                wanted = wanted | {current} | {v for v in versions if int(v) > int(current)}
            for vid in sorted(wanted, key=int):
                if vid not in versions:
                    raise errors.VersionNotFound(name=base, version=vid, store=f"fleet {config.name}")
                stage(store, objects, base, versions[vid], report)
                if not only:
                    _share_trace(store, config, objects, base, vid, traces.get(vid), warmed, report)
            if current is not None and not only and base in store.catalog().bases:
                old = store.current_version(store.get_base(base))
                if old != current:
                    store.promote(base, current)
                    report.moved.append((base, old, current))
        if not only:
            from nbdclone.fleet.move import reconcile

            report.clones = reconcile(store, config, objects, clones)
            if config.pack_bound:
                report.evicted = evict(store, config.pack_bound, {b: c for b, (_, c, _) in view.items()})
    return report


def evict(store: Store, bound: int, current: dict[str, str | None]) -> list[str]:
    """Remove, oldest first, the versions of fleet bases this host holds but no longer needs (not current,
    not newer than current, used by no clone here) while its chunk pack takes more than `bound` bytes. The
    fleet keeps them: a host stages one again if a clone wants it."""
    evicted: list[str] = []
    users = store.version_users()
    candidates = sorted(
        (
            (int(vid), base, vid)
            for base, cur in current.items()
            if cur is not None and base in store.catalog().bases
            for vid in store.get_base(base).versions
            if int(vid) < int(cur) and (base, vid) not in users
        ),
    )
    for _, base, vid in candidates:
        if _pack_bytes(store) <= bound:
            break
        store.remove_version(f"{base}@{vid}")
        evicted.append(f"{base}@{vid}")
    return evicted


def _pack_bytes(store: Store) -> int:
    try:
        return os.stat(store.chunks.pack).st_blocks * 512
    except FileNotFoundError:
        return 0


def _share_trace(
    store: Store,
    config: FleetConfig,
    objects: Objects,
    base: str,
    vid: str,
    obj: str | None,
    warmed: set[str],
    report: SyncReport,
) -> None:
    """The first host whose clone booted a version gives its trace to the fleet; every other host takes it
    (`obj`: the fleet's, if it has one; a boot recorded once serves every host's prefetch). Then the trace
    is read into this host's cache."""
    record = store.get_base(base)
    path = store.trace_path(record, vid)
    local = load_trace(path)
    if obj is None and local:
        name = f"trace.{base}.{vid}.{config.host}"
        objects.put(name, local.tobytes())
        if fleet_catalog.run(config, lambda c: c.set_trace(base, vid, name)):
            report.traces.append(f"gave the fleet the boot trace of {base}@{vid}")
    elif obj is not None and not local:
        trace = array("I")
        trace.frombytes(objects.get(obj, 64 << 20))
        write_trace(path, trace)
        report.traces.append(f"took the fleet's boot trace of {base}@{vid}")
    ref = f"{base}@{vid}"
    if ref not in warmed and load_trace(path):
        warm_version(store, ref)
        warmed.add(ref)
        fleet_catalog.run(config, lambda c: c.set_warm(base, vid, config.host))
