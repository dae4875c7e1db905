"""A running server follows its fleet.

    lease   the host's key in etcd lives under a lease of LEASE_TTL seconds, refreshed every LEASE_TTL/5;
            after each refresh, run/fleet-lease.json says until when this host may serve and which clones
            it owns (lease.py: the workers' fence). A new supervisor resumes the lease etcd still has.
    view    the fleet's bases, as etcd's standard pattern keeps a copy: one paged list of bases/ at a
            revision R, then the watch of the fleet's prefix from R + 1, each event applied in order; a
            lost watch resumes from the last revision applied (its events again: applying one twice
            changes nothing), a compacted one lists again
    flip    an event that moves a base's pointer to a version this host holds moves this host's pointer
            at once (one catalog write: no etcd or RADOS request, whatever the number of bases, clones
            and hosts); a flip to a version not here yet wakes a sync to stage it
    sync    every other event wakes a sync of this host's store (sync.py) from the view, as do the start
            and every FOLLOW_EVERY seconds; it reads from etcd only this host's clones, so a sync costs a
            host the same with 10 clone records or 100,000

etcd or Ceph down: the error is logged and retried; serving goes on while the lease holds (an etcd restart
is far shorter than LEASE_TTL); flips and creates wait for etcd with a clear error.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from nbdclone import errors
from nbdclone.fleet import lease as lease_file
from nbdclone.fleet.catalog import Compacted, FleetCatalog, on_loop
from nbdclone.fleet.config import TIMEOUT, FleetConfig
from nbdclone.fleet.fetch import Fetcher
from nbdclone.fleet.sync import SyncReport, follow_flips, sync
from nbdclone.runtime import RunDir
from nbdclone.store import Store

log = logging.getLogger(__name__)
FOLLOW_EVERY = 30.0
RETRY = 1.0
LEASE_RETRY = 0.2  # seconds between attempts to refresh the lease while etcd does not answer
LOG_EVERY = 10.0


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass


async def leased(run_dir: RunDir, config: FleetConfig) -> None:
    """Wait (at most the fleet's timeout) until this host holds a lease its workers can read."""
    deadline = time.monotonic() + TIMEOUT
    while lease_file.read(run_dir.fleet_lease)[0] <= time.time():
        if time.monotonic() > deadline:
            log.warning("fleet %s: no lease yet (is etcd up?); serving nothing until there is one", config.name)
            return
        await asyncio.sleep(0.02)


async def resume_lease(run_dir: RunDir, config: FleetConfig) -> Any | None:
    """At start: the lease the last supervisor of this store held, if etcd still has it with this host's key
    on it, so that the workers it left serve on without a gap; None if not (keep_lease registers a new one).
    The file stays either way: its deadline is one etcd keeps whoever refreshes the lease (lease.py)."""
    if (lease_id := lease_file.lease_id(run_dir.fleet_lease)) is None:
        return None
    try:
        async with FleetCatalog(config) as catalog:
            lease = await catalog.hosts.resume(config.host, lease_id, lease_file.LEASE_TTL)
    except Exception as exc:  # etcd down: keep_lease retries with a new lease
        log.warning("fleet %s: cannot resume lease %x (%s)", config.name, lease_id, exc)
        return None
    if lease is not None:
        log.info("fleet %s: host %s resumed its lease %x", config.name, config.host, lease.id)
    return lease


async def keep_lease(
    store: Store,
    config: FleetConfig,
    stop: asyncio.Event,
    wake: asyncio.Event,
    changed: asyncio.Event,
    lease: Any = None,
) -> None:
    """Keep the lease (`lease`, if resumed); rewrite the lease file after each refresh, and at once when the
    fleet `changed`."""
    run_dir = RunDir(store.path)
    owned: dict[str, int] = {}
    indexed = False  # this host's part of the owner index agrees with the records (once per start)
    failing: float | None = None  # since when refreshes fail (logged once, then every LOG_EVERY seconds)
    logged = 0.0
    while not stop.is_set():
        try:
            async with FleetCatalog(config) as catalog:
                while not stop.is_set():
                    sent = time.time()
                    if lease is None or not await catalog.hosts.refresh(lease):
                        info = {"store": str(store.path), "pid": os.getpid()}
                        lease = await catalog.hosts.register(config.host, info, lease_file.LEASE_TTL)
                        log.info("fleet %s: host %s holds a lease of %d s", config.name, config.host, lease.ttl)
                    if not indexed:
                        if fixed := await catalog.clones.index_owners(config.host, store.catalog().clones):
                            log.info("fleet %s: %d owner index entries set", config.name, fixed)
                        indexed = True
                    now_owned = await catalog.clones.owned(config.host)
                    valid_until = sent + lease_file.LEASE_TTL - lease_file.MARGIN
                    lease_file.write(run_dir, config.host, valid_until, now_owned, lease.id)
                    if failing is not None:
                        log.info("fleet %s: lease refreshed again after %.1f s", config.name, time.time() - failing)
                        failing = None
                    if now_owned != owned:
                        owned = now_owned
                        wake.set()
                    try:
                        await asyncio.wait_for(changed.wait(), lease_file.LEASE_TTL / 5)
                    except TimeoutError:
                        pass
                    changed.clear()
        except Exception as exc:  # etcd down or the connection cut: retried; the lease file ages meanwhile
            now = time.time()
            if failing is None or now - logged >= LOG_EVERY:
                since = "" if failing is None else f" for {now - failing:.0f} s"
                log.warning("fleet %s: cannot refresh the lease%s (%s); retrying", config.name, since, exc)
                logged = now
            failing = failing or now
            await _sleep(stop, LEASE_RETRY)


class View:
    """The keys under the fleet's bases/ (without the prefix) as of `revision`, but other hosts' holds (a
    sync needs this host's only: the view stays the size of the bases' records, whatever the number of
    hosts); `listed` once a list has filled it. Kept by `follow` on its event loop; a sync gets a copy."""

    def __init__(self, host: str) -> None:
        self.mine = "/" + host
        self.keys: dict[str, bytes] = {}
        # Where a resumed watch starts: the last revision applied (its events again change nothing), or
        # the list's + 1.
        self.revision = 0
        self.listed = False

    def others(self, key: str) -> bool:
        """Whether `key` (under bases/) is another host's hold."""
        return "/holds/" in key and not key.endswith(self.mine)

    def load(self, revision: int, keys: dict[str, bytes]) -> None:
        self.keys = {k: v for k, v in keys.items() if not self.others(k)}
        self.revision, self.listed = revision + 1, True

    def apply(self, key: str | None, value: bytes | None, revision: int) -> None:
        """An event: `key` under the fleet's prefix (only those under bases/ are kept)."""
        if key is not None and key.startswith("bases/") and not self.others(key := key[len("bases/") :]):
            if value is None:
                self.keys.pop(key, None)
            else:
                self.keys[key] = value
        self.revision = revision

    async def keep(
        self, config: FleetConfig, stop: asyncio.Event, on_change: Callable[[str | None, bytes | None], None]
    ) -> None:
        """List, then follow the watch, until `stop`; `on_change(None, None)` after the list (anything may
        have changed), `on_change(key, value)` after each event."""
        while not stop.is_set():
            try:
                async with FleetCatalog(config) as catalog:
                    if not self.listed:
                        self.load(*await catalog.bases.listing())
                    on_change(None, None)  # whatever changed while the watch was down

                    def event(key: str | None, value: bytes | None, revision: int) -> None:
                        self.apply(key, value, revision)
                        on_change(key, value)

                    await catalog.watch(self.revision, event)
            except Compacted as exc:
                log.warning("fleet %s: %s; listing the bases again", config.name, exc)
                self.listed = False
            except Exception as exc:  # etcd down or the watch cut: resumed where it stopped
                log.warning("fleet %s: etcd watch lost (%s); retrying", config.name, exc)
                await _sleep(stop, RETRY)


async def follow(
    store: Store, config: FleetConfig, stop: asyncio.Event, fetcher: Fetcher | None = None, lease: Any = None
) -> None:
    """Follow the fleet until `stop`: flips at once, on this event loop (a catalog write each, no request to
    etcd or Ceph); everything else by a sync in a thread, one at a time, while flips go on."""
    kick = asyncio.Event()  # something to do: a flip, a sync wanted, a sync done
    wake = asyncio.Event()  # a sync is wanted (at start, after a change, every FOLLOW_EVERY seconds)
    wake.set()
    changed = asyncio.Event()
    flips: dict[str, str] = {}  # base -> the version the fleet's pointer moved to, not followed yet
    warmed: set[str] = set()  # versions whose trace this server has read into the cache
    view = View(config.host)
    mine = f"owners/{config.host}/"

    def on_change(key: str | None, value: bytes | None) -> None:
        """What an event (`key` under the fleet's prefix; None: anything may have changed) asks of this host."""
        if key is None or key.startswith(mine):  # this host's clones: the lease file, then a sync
            changed.set()
            wake.set()
        elif key.startswith("bases/"):
            base, _, rest = key[len("bases/") :].partition("/")
            if rest == "current" and value is not None:
                flips[base] = value.decode()
            elif not view.others(key[len("bases/") :]):
                wake.set()
            else:
                return
        else:  # other hosts' clones, holds and warm keys, hosts' leases, imports and gcs: nothing to do
            return
        kick.set()

    keeping = keep_lease(store, config, stop, wake, changed, lease)
    tasks = [asyncio.ensure_future(view.keep(config, stop, on_change)), asyncio.ensure_future(keeping)]
    # The syncs' etcd connection and RADOS handle, for the server's life (each connects when first used).
    shared, loop = FleetCatalog(config), asyncio.get_running_loop()
    rados = fetcher.objects if fetcher is not None else None

    def run_sync(bases: dict[str, bytes] | None) -> SyncReport:
        with on_loop(shared, loop):
            return sync(store, config, warmed=warmed, bases=bases, objects=rados)

    stopping = asyncio.ensure_future(stop.wait())
    syncing: asyncio.Future[SyncReport] | None = None
    not_before = 0.0  # after a failed sync: the next one waits RETRY seconds
    try:
        while not stop.is_set():
            due = wake.is_set() and syncing is None  # a sync to start, once `not_before` has passed
            if not kick.is_set() and not (due and time.monotonic() >= not_before):
                kicked = asyncio.ensure_future(kick.wait())
                waits = {stopping, kicked} | ({syncing} if syncing is not None else set())
                timeout = not_before - time.monotonic() if due else FOLLOW_EVERY
                done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                kicked.cancel()
                if not done:
                    wake.set()
            kick.clear()
            if stop.is_set():
                break
            if flips:
                _follow(store, config, dict(flips), wake)
                flips.clear()
            if syncing is not None and syncing.done():
                try:
                    _report(config, syncing.result(), fetcher)
                except errors.NbdcloneError as exc:
                    log.error("fleet %s: sync failed (%s); serving the last view", config.name, exc)
                    not_before = time.monotonic() + RETRY
                    wake.set()
                syncing = None
            if wake.is_set() and syncing is None and time.monotonic() >= not_before:
                wake.clear()
                bases = dict(view.keys) if view.listed else None  # (a copy: the watch goes on meanwhile)
                syncing = asyncio.ensure_future(asyncio.to_thread(run_sync, bases))
    finally:
        for task in [*tasks, stopping]:
            task.cancel()
        if syncing is not None:
            await asyncio.gather(syncing, return_exceptions=True)  # (a thread: it ends by itself)
        await shared.__aexit__()


def _follow(store: Store, config: FleetConfig, flips: dict[str, str], wake: asyncio.Event) -> None:
    """Move this host's pointers where the fleet's moved, on the event loop: one catalog write each, no
    etcd or Ceph request; a version not here yet wakes a sync to stage it."""
    try:
        moved, missing = follow_flips(store, flips)
    except errors.NbdcloneError as exc:
        log.error("fleet %s: following a flip failed (%s); a sync retries", config.name, exc)
        moved, missing = [], list(flips)
    for base, old, new in moved:
        log.info("fleet %s: base %s flipped %s -> %s", config.name, base, old, new)
    if missing:
        wake.set()


def _report(config: FleetConfig, report: SyncReport, fetcher: Fetcher | None) -> None:
    if fetcher is not None:
        fetcher.count_sync(report.fetched, report.reads, report.read_bytes)
    for ref in report.staged:
        log.info("fleet %s: staged %s (%d chunks to fetch when read)", config.name, ref, report.remote)
    if report.fetched:
        log.info("fleet %s: %d chunks fetched from boot traces", config.name, report.fetched)
    for line in report.traces + report.clones:
        log.info("fleet %s: %s", config.name, line)
    for base, old, new in report.moved:
        log.info("fleet %s: base %s flipped %s -> %s", config.name, base, old, new)
