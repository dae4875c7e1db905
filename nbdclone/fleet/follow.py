"""A running server follows its fleet: an etcd watch on the fleet's bases wakes a sync (sync.py) of this
host's store, at start, on every change, and every FOLLOW_EVERY seconds in case a watch event was lost.
etcd or Ceph down: the error is logged, the server goes on serving its last view, and it tries again."""

from __future__ import annotations

import asyncio
import logging

from nbdclone import errors
from nbdclone.fleet.catalog import FleetCatalog
from nbdclone.fleet.config import FleetConfig
from nbdclone.fleet.sync import sync
from nbdclone.store import Store

log = logging.getLogger(__name__)
FOLLOW_EVERY = 30.0
RETRY = 2.0


async def follow(store: Store, config: FleetConfig, stop: asyncio.Event) -> None:
    wake = asyncio.Event()
    wake.set()

    async def watch() -> None:
        while not stop.is_set():
            try:
                async with FleetCatalog(config) as catalog:
                    wake.set()  # whatever changed while the watch was down
                    await catalog.watch(wake.set)
            except Exception as exc:  # etcd down or the watch cut: retried
                log.warning("fleet %s: etcd watch lost (%s); retrying", config.name, exc)
                await asyncio.sleep(RETRY)

    watcher = asyncio.ensure_future(watch())
    try:
        while not stop.is_set():
            waits = {asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stop.wait())}
            await asyncio.wait(waits, timeout=FOLLOW_EVERY, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
            if stop.is_set():
                break
            wake.clear()
            try:
                report = await asyncio.to_thread(sync, store, config)
            except errors.NbdcloneError as exc:
                log.error("fleet %s: sync failed (%s); serving the last view", config.name, exc)
                await asyncio.sleep(RETRY)
                wake.set()
                continue
            for ref in report.staged:
                log.info("fleet %s: staged %s (%d chunks fetched)", config.name, ref, report.fetched)
            for base, old, new in report.moved:
                log.info("fleet %s: base %s flipped %s -> %s", config.name, base, old, new)
    finally:
        watcher.cancel()
