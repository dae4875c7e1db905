"""nbdclone fleet ...: join a fleet (etcd + Ceph), bring this host up to it, and look at it."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from nbdclone import errors
from nbdclone.cli._common import (
    DEFAULT_STORE,
    JsonOpt,
    StoreOpt,
    app,
    done,
    human,
    open_store,
    out,
    parse_size,
    print_json,
)
from nbdclone.fleet import config as fleet_config
from nbdclone.store import Store

fleet_app = typer.Typer(help="Many hosts, one catalog (etcd) and one copy of each base (Ceph).", no_args_is_help=True)
app.add_typer(fleet_app, name="fleet")


def _config(store: Path) -> fleet_config.FleetConfig:
    config = fleet_config.load(store)
    if config is None:
        raise errors.InvalidArgument(detail=f"store {store} is in no fleet; see 'nbdclone fleet join --help'")
    return config


@fleet_app.command("join")
def fleet_join(
    etcd: Annotated[str, typer.Argument(help="The fleet's etcd, http://HOST:PORT.")],
    ceph_conf: Annotated[Path, typer.Option("--ceph-conf", help="The Ceph cluster's ceph.conf.")],
    pool: Annotated[str, typer.Option(help="The RADOS pool of the fleet's objects.")] = "nbdclone",
    name: Annotated[str, typer.Option("--name", help="The fleet (an etcd prefix, a RADOS namespace).")] = "default",
    host: Annotated[str, typer.Option(help="This host's name in the fleet.", show_default="the host name")] = "",
    pack_bound: Annotated[
        str | None,
        typer.Option(
            "--pack-bound", help="Evict versions this host no longer needs while its chunks take more, like 50G."
        ),
    ] = None,
    store: StoreOpt = DEFAULT_STORE,
    as_json: JsonOpt = False,
) -> None:
    """Make this store a host of a fleet: its bases then come from, and go to, the fleet's etcd and Ceph.
    Both are checked before anything is written."""
    from nbdclone.fleet import catalog as fleet_catalog
    from nbdclone.fleet.objects import Objects

    bound = parse_size(pack_bound) if pack_bound else 0
    config = fleet_config.FleetConfig(etcd, str(ceph_conf), pool, name, host or socket.gethostname(), bound)
    config.etcd_address()
    fleet_catalog.run(config, lambda c: c.bases.names())
    Objects(config).close()
    st = Store(store)
    names = sorted(st.catalog().clones)
    if names:  # this host's clones become its own in the fleet (all, or none and no join)
        from nbdclone.fleet import clones as fleet_clones

        fleet_clones.claim(config, st.path, names)
    config = fleet_config.save(Path(store).absolute(), config)
    text = f"store {store} is host {config.host} of fleet {config.name} (etcd {config.etcd}, pool {pool})"
    done(text, store=str(store), host=config.host, fleet=config.name, etcd=config.etcd, pool=pool)


@fleet_app.command("sync")
def fleet_sync(
    store: StoreOpt = DEFAULT_STORE,
    all_chunks: Annotated[
        bool,
        typer.Option(
            "--all-chunks", help="Also fetch every chunk not fetched yet (a host that must serve on with Ceph down)."
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Bring this host up to the fleet now: stage each base's current version and newer ones (their maps;
    chunks are fetched when first read, a boot trace's at once) and move this host's pointers to the
    fleet's. A running server does it on every change by itself."""
    from nbdclone.fleet import sync

    st = open_store(store)
    report = sync.sync(st, _config(st.path))
    filled = sync.fetch_all(st) if all_chunks else 0
    if as_json:
        print_json(
            {
                "staged": report.staged,
                "moved": report.moved,
                "remote": report.remote,
                "fetched": report.fetched + filled,
                "reads": report.reads,
                "read_bytes": report.read_bytes,
                "evicted": report.evicted,
            }
        )
        return
    for ref in report.staged:
        out.print(f"staged {ref}")
    for base, old, new in report.moved:
        out.print(f"{base}: current version {old} -> {new}")
    for ref in report.evicted:
        out.print(f"evicted {ref} (the fleet keeps it)")
    out.print(
        f"{report.remote} chunk(s) staged to fetch when read, {report.fetched + filled} fetched; "
        f"{report.reads} object(s) read from the fleet ({human(report.read_bytes)})"
    )


@fleet_app.command("status")
def fleet_status(store: StoreOpt = DEFAULT_STORE, as_json: JsonOpt = False) -> None:
    """The fleet's bases and versions, which is current, and which this host holds."""
    from nbdclone.fleet import catalog as fleet_catalog

    st = open_store(store)
    config = _config(st.path)

    async def read(c: Any) -> list[dict[str, Any]]:
        rows = []
        for base in await c.bases.names():
            current = await c.bases.current(base)
            retiring = await c.bases.retiring(base)
            for vid, v in sorted((await c.bases.versions(base)).items(), key=lambda kv: int(kv[0])):
                row = {"base": base, "version": vid, "size": v.size, "current": bool(current and current[0] == vid)}
                rows.append({**row, "retiring": vid in retiring, "held_by": await c.bases.holders(base, vid)})
        return rows

    rows = fleet_catalog.run(config, read)
    local = st.catalog().bases
    unfetched = st.chunks.remote.unfetched()
    for r in rows:
        r["here"] = r["base"] in local and r["version"] in local[r["base"]].versions
        if r["here"]:  # the share of its stored chunks this host's pack holds now
            slots = st.version_map(local[r["base"]], r["version"], digests=False).used_slots()
            r["fetched"] = round(1 - len(slots & unfetched) / len(slots), 4) if slots else 1.0
    if as_json:
        print_json(rows, items="versions")
        return
    table = Table("BASE", "VERSION", "CURRENT", "ON THIS HOST", "HOSTS", "STATE", box=None)
    for r in rows:
        state = "retiring" if r["retiring"] else ""
        here = f"yes, {100 * r['fetched']:.0f}% fetched" if r["here"] else "no"
        table.add_row(r["base"], r["version"], "*" if r["current"] else "", here, str(len(r["held_by"])), state)
    out.print(table)
    out.print(f"host {config.host} of fleet {config.name}")


@fleet_app.command("forget")
def fleet_forget(
    host: Annotated[str, typer.Argument(help="A host gone for good.")],
    store: StoreOpt = DEFAULT_STORE,
    as_json: JsonOpt = False,
) -> None:
    """Forget a host that is gone for good: the versions it held may leave the fleet. Refused while it
    holds a lease or owns a clone (take those over first with 'clone move NAME --to HOST --force')."""
    from nbdclone.fleet import catalog as fleet_catalog

    held = fleet_catalog.run(_config(Path(store)), lambda c: c.forget_host(host))
    done(f"forgot host {host} (it held {held} version(s))", host=host, versions=held)


@fleet_app.command("gc")
def fleet_gc(store: StoreOpt = DEFAULT_STORE, as_json: JsonOpt = False) -> None:
    """Delete the fleet's chunks that no version and no clone's last move names. Refused while an import
    or a move runs anywhere in the fleet (imports and moves wait for a gc), so no chunk an import has
    found already stored is ever taken from it."""
    from nbdclone.fleet.gc import gc

    deleted, kept = gc(_config(Path(store)))
    done(f"fleet gc: {deleted} chunk(s) deleted, {kept} kept", deleted=deleted, kept=kept)
