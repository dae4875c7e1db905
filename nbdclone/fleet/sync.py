"""Moving versions between a host's store and the fleet.

    publish   a version the host imported (under the number the fleet reserved for it) goes to RADOS:
              its chunks put-if-absent under their SHA-256, then its map object; then etcd names it
              (host.py, "import")
    stage     a version the fleet names comes to the host: its map object is read and checked, and the
              local store commits it under the fleet's number at once, without its bytes: each chunk
              the host's pack holds (found by its local digest, confirmed by SHA-256) shares that slot,
              every other one gets a slot left a hole, which the host's fetcher fills when something
              first reads it (store/remote.py, fetch.py)
    traces    the first host whose clone booted a version gives the fleet its trace, and the trace's
              chunks as a few large objects (TRACE_OBJECT chunks each, in boot order); every other host
              that stages the version reads those objects into its pack and its cache: a cold host's
              first boot costs a few large reads, not one request per chunk
    sync      every fleet base's current version is staged, then the host's pointer is set to it: a
              following clone moves at its next first connection, as after a local flip

etcd down stops nothing that runs: sync and fleet commands fail with a clear error and serving goes on
with the last view. Ceph down stops only first reads of chunks the host has not fetched yet (EIO, in
bounded time); what a host has fetched, and every version's boot trace it staged, it serves on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nbdclone import errors
from nbdclone.fleet import catalog as fleet_catalog
from nbdclone.fleet.catalog import FleetCatalog, FleetVersion
from nbdclone.fleet.config import FleetConfig
from nbdclone.fleet.objects import FleetMap, Objects, sha256
from nbdclone.store import Store
from nbdclone.store.cache import PackReader, digest
from nbdclone.store.catalog import BaseRecord
from nbdclone.store.chunks import CHUNK, ZERO_SLOT, VersionMap, load_trace, write_trace
from nbdclone.store.images import warm_version

log = logging.getLogger(__name__)
TRACE_OBJECT = 64  # chunks per trace object (4 MiB: a boot of 57 MiB is 15 reads)


@dataclass(slots=True)
class SyncReport:
    staged: list[str] = field(default_factory=list)  # NAME@VERSION brought to this host
    moved: list[tuple[str, str, str]] = field(default_factory=list)  # (base, old, new) local pointer moves
    clones: list[str] = field(default_factory=list)  # clones adopted or dropped (move.reconcile)
    traces: list[str] = field(default_factory=list)  # boot traces given to or taken from the fleet
    evicted: list[str] = field(default_factory=list)  # NAME@VERSION removed here to stay under the bound
    remote: int = 0  # chunks staged without their bytes (the fetcher fills them when first read)
    fetched: int = 0  # chunks filled from the fleet's trace objects
    reads: int = 0  # RADOS objects read (maps, traces, trace objects) and their bytes
    read_bytes: int = 0


def stage(store: Store, objects: Objects, name: str, version: FleetVersion, report: SyncReport) -> bool:
    """Bring fleet version `name`@`version.id` into this host's store, without its bytes (see the module's
    docstring). Returns False if it was here."""
    local = store.catalog().bases.get(name)
    if local is not None and version.id in local.versions:
        return False
    config = objects.config
    if not fleet_catalog.run(config, lambda c: c.bases.hold(name, version.id, config.host)):  # before any byte
        raise errors.VersionNotFound(name=name, version=version.id, store=f"fleet {config.name}")
    raw = objects.get(version.map_object, 64 << 20)
    if sha256(raw).hex() != version.map_sha256:
        raise errors.StorageError(5, what=f"reading {version.map_object}", detail="it does not match its record")
    fmap = FleetMap.decode(raw, version.map_object)
    with store.chunks.writer():
        existing = list(store.all_version_maps(digests=True))
        vmap, remote = store.chunks.map_remote(fmap.entries, fmap.size, existing)
        store.chunks.remote.add(remote)  # R1: named before the map and the catalog name the slots
        store.add_version(name, vmap, f"fleet {config.name}: {version.source}", 0, vid=version.id)
    report.staged.append(f"{name}@{version.id}")
    report.remote += len(remote)
    return True


@dataclass(slots=True)
class BaseView:
    """One fleet base as a sync reads it."""

    versions: dict[str, FleetVersion]
    current: str | None
    traces: dict[str, str]  # version -> its boot trace object
    retiring: set[str]  # versions being removed from the fleet


def parse_bases(keys: dict[str, bytes], host: str) -> tuple[dict[str, BaseView], set[tuple[str, str]]]:
    """The fleet's bases from the keys under bases/ (catalog.bases.listing, or a follower's view of them), and
    the (base, version) pairs `host` holds."""
    out: dict[str, BaseView] = {}
    held: set[tuple[str, str]] = set()
    for key, value in keys.items():
        name, _, rest = key.partition("/")
        kind, _, tail = rest.partition("/")
        b = out.setdefault(name, BaseView({}, None, {}, set()))
        if kind == "current":
            b.current = value.decode()
        elif kind == "versions":
            b.versions[tail] = FleetVersion(**json.loads(value))
        elif kind == "traces":
            b.traces[tail] = value.decode()
        elif kind == "retiring":
            b.retiring.add(tail)
        elif kind == "holds" and tail.partition("/")[2] == host:
            held.add((name, tail.partition("/")[0]))
    return out, held


def sync(
    store: Store,
    config: FleetConfig,
    *,
    also: dict[str, set[str]] | None = None,
    only: bool = False,
    new_clone: bool = False,
    warmed: set[str] | None = None,
    bases: dict[str, bytes] | None = None,
    objects: Callable[[], Objects] | None = None,
) -> SyncReport:
    """Stage every fleet base's current version and the versions newer than it (so a flip finds every
    host ready), and the `also` versions (base -> ids; for a `new_clone`, not one being removed); share
    boot traces both ways; read each staged version's trace into the cache once (`warmed` remembers
    which) and say so in etcd; point this host's bases where the fleet's point; remove the versions the
    fleet is removing that no clone here uses, and tell etcd which versions this host holds. With `only`,
    stage just the `also` versions and do nothing else. `objects`: gives the RADOS handle to use (a
    server's, for its life), else one is opened for this sync."""

    async def read(c: FleetCatalog) -> tuple[dict[str, BaseView], dict[str, Any], set[tuple[str, str]]]:
        """The fleet's state, over one etcd connection: the bases from `bases` (a follower's view: no
        read) or one paged list of them."""
        out, held = parse_bases(bases if bases is not None else (await c.bases.listing())[1], config.host)
        # This host's clones, and the records of those it has or should have: not the fleet's every record.
        owned, local = await c.clones.owned(config.host), store.catalog().clones.keys()
        clones = {n: r for n in sorted(owned.keys() ^ local) if (r := await c.clones.get(n)) is not None}
        return out, clones, held

    view, clones, held = fleet_catalog.run(config, read)
    report = SyncReport()
    warmed = set() if warmed is None else warmed
    if not only:  # a flip to a version staged here already (newer ones are, ahead) waits on nothing in Ceph
        _follow_pointers(store, view, report)
    with contextlib.nullcontext(objects()) if objects is not None else Objects(config) as rados:
        reads, read_bytes = rados.reads, rados.read_bytes  # (a shared handle counts other work too)
        for base, b in sorted(view.items()):
            wanted = (also or {}).get(base, set())
            if new_clone and wanted & b.retiring:
                raise errors.InvalidArgument(
                    detail=f"{base}@{min(wanted & b.retiring)} is being removed from the fleet; use another version"
                )
            if b.current and not only:
                newer = {v for v in b.versions if int(v) > int(b.current)}
                wanted = wanted | {b.current} | (newer - b.retiring)
            for vid in sorted(wanted, key=int):
                if vid not in b.versions:
                    raise errors.VersionNotFound(name=base, version=vid, store=f"fleet {config.name}")
                stage(store, rados, base, b.versions[vid], report)
                if not only:
                    _share_trace(store, config, rados, base, vid, b.traces.get(vid), warmed, report)
        if not only:
            _follow_pointers(store, view, report)  # (those whose version was staged just now)
            from nbdclone.fleet.move import reconcile

            report.clones = reconcile(store, config, rados, clones)
            if config.pack_bound:
                report.evicted = evict(store, config.pack_bound, {b: v.current for b, v in view.items()})
            report.evicted += _drop_retiring(store, view)
            _tell_held(store, config, view, held)
        report.reads, report.read_bytes = rados.reads - reads, rados.read_bytes - read_bytes
    return report


def _follow_pointers(store: Store, view: dict[str, BaseView], report: SyncReport) -> None:
    """Point each local base at the fleet's current version, where this store holds that version."""
    current = {base: b.current for base, b in view.items() if b.current is not None}
    report.moved += follow_flips(store, current)[0]


def follow_flips(store: Store, current: dict[str, str]) -> tuple[list[tuple[str, str, str]], list[str]]:
    """Point each base of `current` (base -> the fleet's current version) at it, where this store holds it:
    (the moves made as (base, old, new), the bases whose version is not here)."""
    moved, missing = [], []
    for base, vid in sorted(current.items()):
        record = store.catalog().bases.get(base)
        if record is None or vid not in record.versions:
            missing.append(base)
            continue
        old = store.current_version(record)
        if old != vid:
            store.promote(base, vid)
            moved.append((base, old, vid))
    return moved, missing


def _drop_retiring(store: Store, view: dict[str, BaseView]) -> list[str]:
    """Remove the versions the fleet is removing that no clone here uses."""
    users = store.version_users()
    dropped = []
    for base, b in view.items():
        record = store.catalog().bases.get(base)
        for vid in sorted(b.retiring & set(record.versions if record else ())):
            if (base, vid) in users or vid == store.current_version(record):  # type: ignore[arg-type]
                continue
            try:
                store.remove_version(f"{base}@{vid}")
            except errors.VersionNotFound:  # the server's sync and `base rm`'s both drop it: one wins
                continue
            dropped.append(f"{base}@{vid}")
    return dropped


def _tell_held(store: Store, config: FleetConfig, view: dict[str, BaseView], held: set[tuple[str, str]]) -> None:
    """Make this host's holds keys say which fleet versions its store holds (catalog.py: removing versions).
    A version is held from before it is staged (stage) until after it is removed here (this)."""
    cat = store.catalog()
    here = {
        (base, vid)
        for base, b in view.items()
        if base in cat.bases
        for vid in cat.bases[base].versions
        if vid in b.versions
    }

    async def tell(c: FleetCatalog) -> None:
        for base, vid in sorted(here - held):
            if not await c.bases.hold(base, vid, config.host):
                log.error("fleet %s: %s@%s is held here but the fleet removed it", config.name, base, vid)
        for base, vid in sorted(held - here):
            await c.bases.let_go(base, vid, config.host)

    if here != held:
        fleet_catalog.run(config, tell)


def fetch_all(store: Store, batch: int = 1024) -> int:
    """Fetch every chunk the host's versions map and it has not fetched yet (through the running server's
    fetcher if there is one). Returns how many chunks that was."""
    fetch = store.fetcher()
    remote = store.chunks.remote.load()
    if fetch is None or not remote:
        return 0
    wanted: dict[int, bytes] = {}
    for vmap in store.all_version_maps(digests=True):
        wanted.update((slot, key) for _, slot, key in vmap.stored() if slot in remote)
    missing = store.chunks.remote.lacking(sorted(wanted.items()), digest)
    for at in range(0, len(missing), batch):
        fetch(missing[at : at + batch])
    return len(missing)


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
    (`obj`: the fleet's, if it has one; a boot recorded once serves every host's prefetch), with its
    chunks. Then the trace is read into this host's cache."""
    record = store.get_base(base)
    path = store.trace_path(record, vid)
    local = load_trace(path)
    ref = f"{base}@{vid}"
    if obj is None and local:
        from nbdclone.fleet.gc import excluding_gc

        name = f"trace.{base}.{vid}.{config.host}"
        with excluding_gc(config):  # a gc would take objects etcd does not name yet
            _put_trace_chunks(store, objects, record, vid, local, name)
            objects.put(name, local.tobytes())  # after its chunks: a trace the fleet names has them
            if fleet_catalog.run(config, lambda c: c.bases.set_trace(base, vid, name)):
                report.traces.append(f"gave the fleet the boot trace of {ref}")
    elif obj is not None and not local:
        trace = array("I")
        trace.frombytes(objects.get(obj, 64 << 20))
        report.fetched += _get_trace_chunks(store, objects, record, vid, trace, obj)
        write_trace(path, trace)
        report.traces.append(f"took the fleet's boot trace of {ref}")
    if ref not in warmed and load_trace(path):
        warm_version(store, ref)  # fetches what the trace objects did not bring (none, unless one was bad)
        warmed.add(ref)
        fleet_catalog.run(config, lambda c: c.warm.put(base, vid, config.host))


def _trace_chunks(vmap: VersionMap, trace: array[int]) -> list[int]:
    """The chunks a trace's objects hold, in boot order: each chunk of the trace once, zeros left out."""
    return [i for i in dict.fromkeys(trace) if i < vmap.nchunks and vmap.slot(i) != ZERO_SLOT]


def _put_trace_chunks(
    store: Store, objects: Objects, record: BaseRecord, vid: str, trace: array[int], name: str
) -> None:
    """Put the trace's chunks in the fleet as objects `name`.K of TRACE_OBJECT chunks each."""
    vmap = store.version_map(record, vid)
    chunks = _trace_chunks(vmap, trace)
    reader = PackReader(store.chunks.pack, fetch=store.fetcher())
    try:
        reader.ensure(store.chunks.nslots())
        for k in range(0, len(chunks), TRACE_OBJECT):
            group = [(vmap.slot(i), vmap.key(i)) for i in chunks[k : k + TRACE_OBJECT]]
            reader.verify_all(group)  # what this host serves is what it gives
            objects.put(
                f"{name}.{k // TRACE_OBJECT}", b"".join(os.pread(reader.fd, CHUNK, s * CHUNK) for s, _ in group)
            )
    finally:
        reader.close()


def _get_trace_chunks(
    store: Store, objects: Objects, record: BaseRecord, vid: str, trace: array[int], name: str
) -> int:
    """Read the trace's chunk objects (those holding a chunk this host lacks) and fill the pack from them.
    Returns the chunks filled. A chunk that does not check out is left to the fetcher."""
    vmap = store.version_map(record, vid)
    chunks = _trace_chunks(vmap, trace)
    remote = store.chunks.remote.load()
    staged = [(vmap.slot(i), vmap.key(i)) for i in chunks if vmap.slot(i) in remote]
    unfilled = {slot for slot, _ in store.chunks.remote.lacking(staged, digest)}
    lacking = {i for i in chunks if vmap.slot(i) in unfilled}
    groups = [chunks[k : k + TRACE_OBJECT] for k in range(0, len(chunks), TRACE_OBJECT)]
    wanted = [k for k, group in enumerate(groups) if lacking.intersection(group)]
    filled = 0
    try:
        for k, data in zip(
            wanted, objects.get_many((f"{name}.{k}" for k in wanted), TRACE_OBJECT * CHUNK), strict=True
        ):
            got = [
                (vmap.slot(i), vmap.key(i), data[n * CHUNK : (n + 1) * CHUNK])
                for n, i in enumerate(groups[k])
                if i in lacking
            ]
            filled += store.chunks.remote.fill(got, digest)
    except errors.StorageError as exc:  # a trace from before trace objects, or one lost: chunk by chunk then
        log.warning(
            "boot trace %s: its chunk objects cannot be read (%s); the fetcher fetches them one by one", name, exc
        )
    return filled
