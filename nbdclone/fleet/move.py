"""Moving a clone between hosts, and taking one over from a host whose lease is gone.

    ship    under the source store's lock (held to the end), the clone closed: each chunk holding a block the clone
            changed is read as a client reads it (base under overlay) and put in RADOS under its SHA-256
            (all-zero chunks are marked, not stored); a small manifest object ship.NAME.EPOCH names them,
            with the clone's base version, pin and size. For a clone of its own versions (snapshots) or a
            blank one, every chunk that holds data is shipped; its snapshots stay behind.
    switch  one etcd transaction gives the clone to the target with the next epoch and the manifest's
            name, if nothing changed since it was read (and, for a takeover, if the old owner's lease key
            is gone)
    adopt   the target (its server's sync, or `fleet sync`) stages the base version, writes the shipped
            chunks into a new overlay on it, marks a following clone held (its clients come back to the
            same disk), and only then names the clone in its catalog
    clean   the source drops the clone from its catalog and deletes its files; a host that finds a clone
            it holds owned by another (a takeover while it was frozen) deletes its copy once no
            connection has it open

The order (ship, switch, clean) is host.py's: a crash before the switch leaves the source the owner, with
the clone as it was (the manifest is unused); a crash after it leaves the target the owner, and its sync
adopts; the source's sync drops its copy. So there is exactly one owner at every step, and the owner
always has, or can get, the data.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import struct
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from nbdclone.fleet.config import FleetConfig
from nbdclone.fleet.objects import FleetMap, Objects
from nbdclone.store import Store
from nbdclone.store._rocks import RocksOverlay
from nbdclone.store.base import Base, ZeroBase
from nbdclone.store.catalog import CloneRecord, is_own_base, now
from nbdclone.store.chunks import CHUNK, ChunkedBase
from nbdclone.store.clone import EXTENT_DATA
from nbdclone.store.images import open_clone_readonly

log = logging.getLogger(__name__)
ZERO = bytes(32)  # the SHA-256 slot of an all-zero chunk in a shipped map
_LEN = struct.Struct("<I")


def ship_name(name: str, record: dict[str, Any], epoch: int) -> str:
    """The manifest of a move of clone `name` (as etcd records it) to `epoch`: the record's id keeps a
    later clone of the same name from ever reading an old one's."""
    return f"ship.{name}.{record.get('id', '')}.{epoch}"


def ship(store: Store, objects: Objects, name: str, target: str) -> str:
    """Put clone `name`'s changes (all its data, for a clone with no fleet base) in RADOS. Caller holds
    the store's lock, or the store is another host's whose lease is gone."""
    record = store.get_clone(name)
    state = store.clone_state(record)
    base, vid = store.state_on(record, state) if state is not None else store.target_on(record)
    clone = open_clone_readonly(store, name)
    try:
        if base is not None and not is_own_base(base):
            chunks = sorted(clone.changed_chunks(CHUNK))
        else:  # no base the fleet knows: every chunk that holds data
            base, vid = None, None
            chunks = sorted(
                {
                    i
                    for off, length, kind in clone.extents(clone.size, 0)
                    if kind == EXTENT_DATA
                    for i in range(off // CHUNK, -(-(off + length) // CHUNK))
                }
            )
        entries = []
        buf = bytearray(CHUNK)
        for i in chunks:
            n = min(CHUNK, clone.size - i * CHUNK)
            view = memoryview(buf)
            view[n:] = bytes(CHUNK - n)
            clone.pread_into(view[:n], i * CHUNK)
            if buf == bytes(CHUNK):
                entries.append((i, ZERO, bytes(16)))
            else:
                digest, _ = objects.put_chunk(bytes(buf))
                entries.append((i, digest, bytes(16)))
        size = clone.size
    finally:
        clone.close()
        clone.base.close()
    head = {
        "name": name,
        "base": base,
        "version": vid,
        "follows": record.pin is None and base is not None and not is_own_base(record.base),
        "size": size,
        "readonly": record.readonly,
        "shipped": now(),
    }
    raw = json.dumps(head).encode()
    objects.put(target, _LEN.pack(len(raw)) + raw + FleetMap(size, tuple(entries)).encode())
    log.info("shipped clone %s (%d chunks) as %s", name, len(entries), target)
    return target


def adopt(store: Store, config: FleetConfig, objects: Objects, name: str, manifest: str) -> CloneRecord:
    """Make clone `name` this host's from its shipped manifest (see the module's docstring)."""
    from nbdclone.fleet.sync import sync  # stage the base version first

    raw = objects.get(manifest, 256 << 20)
    (n,) = _LEN.unpack_from(raw)
    head = json.loads(raw[_LEN.size : _LEN.size + n])
    fmap = FleetMap.decode(raw[_LEN.size + n :], manifest)
    if head["base"] is not None:
        sync(store, config, also={head["base"]: {head["version"]}}, only=True)
    with store.lock():
        cat = store.catalog()
        if name in cat.clones:
            return cat.clones[name]
        pin = None if head["follows"] else head["version"]
        size = 0 if head["base"] is not None else head["size"]
        record = CloneRecord(name, uuid.uuid4().hex, head["base"], pin, size, now(), cat.next_seq(), head["readonly"])
        state = store.start_overlay(record, head["version"])
        base: Base
        if head["base"] is not None:
            vmap = store.version_map(store.get_base(head["base"]), head["version"])
            base = ChunkedBase(store.chunks.pack, vmap, fetch=store.fetcher())
        else:
            base = ZeroBase(head["size"])
        from nbdclone.store.clone import Clone

        overlay = RocksOverlay(store.overlay_path(record, state))
        clone = Clone(base, overlay, head["size"])
        try:
            for i, digest, _ in fmap.entries:
                data = bytes(CHUNK) if digest == ZERO else objects.get_chunk(digest, CHUNK)
                length = min(CHUNK, head["size"] - i * CHUNK)
                clone.pwrite(memoryview(data)[:length], i * CHUNK)
            clone.flush()
        finally:
            clone.close()
            base.close()
        if head["follows"]:
            store.hold(record)  # its clients come back to this disk, whatever was flipped meanwhile
        store.write_catalog(replace(cat, clones={**cat.clones, name: record}))
    log.info("adopted clone %s from %s", name, manifest)
    return record


@contextlib.contextmanager
def draining(store: Store, name: str, to: str, seconds: float) -> Iterator[None]:
    """Refuse new clients of the clone (clones/ID/leaving, lapsing at the deadline if this process dies)
    and wait up to `seconds` for its clients to go. The marker goes with the clone, or when the move fails."""
    record = store.get_clone(name)
    marker = store.leaving_path(record)
    deadline = time.time() + seconds
    marker.write_text(f"{to} {deadline + 5}\n")  # the last few seconds cover the ship under the lock
    try:
        while store.is_open(record) and time.time() < deadline:
            time.sleep(0.1)
        yield
    finally:
        marker.unlink(missing_ok=True)


def reconcile(store: Store, config: FleetConfig, objects: Objects, clones: dict[str, dict[str, Any]]) -> list[str]:
    """Bring this host's clones in line with etcd: adopt the ones it owns and lacks, delete its copies of
    ones another host owns now (once closed). Returns what it did, one line each."""
    done = []
    local = store.catalog().clones
    for name, rec in sorted(clones.items()):
        if rec["host"] != config.host or name in local:
            continue
        candidates = [m for m in (rec.get("ship"), ship_name(name, rec, int(rec["epoch"]) + 1)) if m]
        manifest = next((m for m in candidates if objects.exists(m)), None)
        if manifest is None:
            continue  # being created here right now (claimed before it is made)
        adopt(store, config, objects, name, manifest)
        done.append(f"adopted clone {name}")
    for name, record in sorted(local.items()):
        owner = clones.get(name)
        if owner is None or owner["host"] == config.host or store.is_open(record):
            continue
        with store.lock():
            cat = store.catalog()
            store.write_catalog(replace(cat, clones={n: r for n, r in cat.clones.items() if n != name}))
            shutil.rmtree(store.clone_dir(record), ignore_errors=True)
        done.append(f"dropped this host's copy of clone {name} (host {owner['host']} owns it)")
    return done
