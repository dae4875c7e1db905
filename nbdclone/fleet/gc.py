"""Freeing the fleet's chunks that nothing names, without ever deleting one an import relies on.

A chunk is live if a version map object etcd names lists it, or the manifest of a clone's last move does.
`gc` announces itself and refuses if an import or move is announced (catalog.py); an import or move
announces itself first and waits while a gc is announced (`excluding_gc`). Map, trace and move manifest
objects that etcd does not name (left by killed imports and moves; no import or move runs while gc does)
go too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import struct
import time
from collections.abc import Iterator

from nbdclone import errors
from nbdclone.fleet import catalog as fleet_catalog
from nbdclone.fleet.catalog import FleetCatalog
from nbdclone.fleet.config import FleetConfig
from nbdclone.fleet.objects import FleetMap, Objects, chunk_name

log = logging.getLogger(__name__)
WAIT = 120.0  # seconds an import waits for a running gc


@contextlib.contextmanager
def excluding_gc(config: FleetConfig) -> Iterator[None]:
    """Announce an import (or move) for the body, and wait until no gc runs."""
    deadline = time.monotonic() + WAIT

    async def begin(c: FleetCatalog) -> object:
        while True:
            _, lease = await c.work.announce("imports")
            if not await c.work.others("gc"):
                return lease
            await c.work.withdraw(lease)
            if time.monotonic() > deadline:
                raise errors.NbdcloneError(detail=f"a fleet gc has run for over {WAIT:.0f} s; try again later")
            await asyncio.sleep(0.5)

    lease = fleet_catalog.run(config, begin)
    try:
        yield
    finally:
        with contextlib.suppress(errors.NbdcloneError):
            fleet_catalog.run(config, lambda c: c.work.withdraw(lease))


def gc(config: FleetConfig) -> tuple[int, int]:
    """Delete the chunks (and stray map and manifest objects) nothing names. Returns (chunks deleted,
    chunks kept)."""

    async def begin(c: FleetCatalog) -> tuple[object, list[str], list[str], list[str]]:
        _, lease = await c.work.announce("gc")
        if await c.work.others("imports"):
            await c.work.withdraw(lease)
            raise errors.NbdcloneError(detail="an import or a move is running in the fleet; gc again later")
        bases = await c.bases.names()
        maps = [v.map_object for base in bases for v in (await c.bases.versions(base)).values()]
        ships = [str(r["ship"]) for r in (await c.clones.all()).values() if r.get("ship")]
        traces = [t for base in bases for t in (await c.bases.traces(base)).values()]
        return lease, maps, ships, traces

    lease, maps, ships, traces = fleet_catalog.run(config, begin)
    try:
        with Objects(config) as objects:
            live: set[str] = set()
            for name in maps:
                live |= {chunk_name(e[1]) for e in FleetMap.decode(objects.get(name, 64 << 20), name).entries}
            for name in ships:
                if objects.exists(name):
                    raw = objects.get(name, 256 << 20)
                    (n,) = struct.unpack_from("<I", raw)
                    json.loads(raw[4 : 4 + n])
                    live |= {chunk_name(e[1]) for e in FleetMap.decode(raw[4 + n :], name).entries}
            deleted = kept = 0
            for name in list(objects.list_chunks()):
                if name in live:
                    kept += 1
                else:
                    objects.remove(name)
                    deleted += 1
            named = {*maps, *ships, *traces}
            for name in list(objects.list_objects(("map.", "ship.", "trace."))):
                stem, _, k = name.rpartition(".")
                if name not in named and not (k.isdigit() and stem in traces):  # a trace's chunk objects
                    objects.remove(name)
                    log.info("fleet %s gc: removed %s, which nothing names", config.name, name)
    finally:
        fleet_catalog.run(config, lambda c: c.work.withdraw(lease))
    log.info("fleet %s gc: %d chunks deleted, %d kept", config.name, deleted, kept)
    return deleted, kept
