"""A fleet's clones: each one is owned by one host, recorded in etcd with an epoch (catalog.py); the
owner's workers serve it only while its lease holds (lease.py). The orders that create, remove and move
clones are in host.py."""

from __future__ import annotations

import time
from pathlib import Path

from nbdclone import errors
from nbdclone.fleet import catalog as fleet_catalog
from nbdclone.fleet import lease
from nbdclone.fleet.catalog import FleetCatalog
from nbdclone.fleet.config import FleetConfig
from nbdclone.runtime import RunDir
from nbdclone.store import Store


def claim(config: FleetConfig, store_path: Path, names: list[str]) -> None:
    """Record `names` in etcd as this host's clones: all, or none (the ones taken are given back)."""

    async def claim_all(c: FleetCatalog) -> None:
        done: list[str] = []
        try:
            for name in names:
                await c.clones.claim(name, config.host, str(store_path))
                done.append(name)
        except BaseException:
            for name in done:
                await c.clones.release(name, config.host)
            raise

    fleet_catalog.run(config, claim_all)


def release(config: FleetConfig, names: list[str]) -> None:
    """Forget clones `names` of this host in etcd."""

    async def release_all(c: FleetCatalog) -> None:
        for name in names:
            await c.clones.release(name, config.host)

    fleet_catalog.run(config, release_all)


def wait_served(store: Store, names: list[str], timeout: float = 15) -> None:
    """If this host's server runs, wait until its lease names `names` (so a client may connect now)."""
    try:
        store.server_info()
    except errors.ServerNotRunning:
        return
    path = RunDir(store.path).fleet_lease
    deadline = time.monotonic() + timeout
    while not set(names) <= set(lease.read(path)[1]):
        if time.monotonic() > deadline:
            raise errors.NbdcloneError(
                detail=f"the server did not take up clone(s) {', '.join(names)} in {timeout:.0f} s"
            )
        time.sleep(0.02)
