"""nbdclone clone ...: create, list, inspect, reset, upgrade, rename, export and remove clones."""

from __future__ import annotations

import enum
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.table import Table

from nbdclone import errors
from nbdclone.cli._common import (
    DEFAULT_STORE,
    BaseFilter,
    CloneArg,
    JsonOpt,
    StoreOpt,
    clone_app,
    complete_clone,
    done,
    err,
    host_of,
    human,
    open_store,
    out,
    parse_size,
    print_json,
    progress_bar,
    record_dict,
    updater,
)
from nbdclone.store import Store, diff, images, lineage
from nbdclone.store.catalog import is_own_base, slot_of
from nbdclone.store.chunks import CHUNK
from nbdclone.store.overlay import BLOCK_SIZE
from nbdclone.supervisor import server


@clone_app.command("create")
def clone_create(
    names: Annotated[list[str], typer.Argument(metavar="NAME...", help="Clone names; also their NBD export names.")],
    base: Annotated[
        str | None, typer.Option(help="BASE follows the base's current version; BASE@VERSION pins one.")
    ] = None,
    size: Annotated[str | None, typer.Option(help="Size of a blank clone with no base, like 10G.")] = None,
    source: Annotated[
        str | None,
        typer.Option(
            "--from", help="CLONE: start as that clone reads now (it must be closed); CLONE@SNAP: as its snapshot."
        ),
    ] = None,
    read_only: Annotated[bool, typer.Option("--read-only", help="Serve these clones read-only.")] = False,
    store: StoreOpt = DEFAULT_STORE,
    as_json: JsonOpt = False,
) -> None:
    """Create clones of BASE (or blank disks of SIZE, or copies of another clone). Many names make many
    clones in one step."""
    if sum(x is not None for x in (base, size, source)) != 1:
        raise errors.InvalidArgument(detail="give exactly one of --base BASE, --size SIZE or --from CLONE[@SNAP]")
    host = host_of(store)
    host.create_clones(names, base, lambda: _create(host.store, names, base, size, source, read_only))


def _create(st: Store, names: list[str], base: str | None, size: str | None, source: str | None, ro: bool) -> None:
    if source is not None:
        for name in names:
            with progress_bar() as bar:
                task = bar.add_task(f"copying {source}", total=None)
                lineage.create_from(st, name, source, readonly=ro, progress=updater(bar, task))
            done(f"created clone {name} from {source}", clone=name, source=source)
        return
    records = st.create_clones(names, base=base, size=parse_size(size) if size else None, readonly=ro)
    for k, record in enumerate(records):
        what = f"of {base}" if record.base else f"(blank, {human(record.size)})"
        if k < 20 or done.as_json:
            blank = {} if record.base else {"size": record.size}
            done(f"created clone {record.name} {what}", clone=record.name, base=base, **blank)
    if len(records) > 20 and not done.as_json:
        done.note(f"... and {len(records) - 20} more")


def _clone_row(st: Store, rec: Any) -> dict[str, Any]:
    try:
        row = {**record_dict(rec), **record_dict(st.status(rec)), "damaged": ""}
        if is_own_base(rec.base):  # its own versions: shown by snapshot, not by an internal base name
            own = st.get_base(rec.base)
            row |= {"base": None, "snapshot": own.versions[row["version"]].snapshot if row["version"] else ""}
        return row
    except errors.Damaged as exc:  # listed, not hidden, and the list goes on
        status = {"version": None, "size": rec.size, "follows": rec.pin is None, "move_pending": False}
        status |= {"held": False, "overlay_disk_bytes": 0, "open": False}
        return {**record_dict(rec), **status, "damaged": str(exc)}


def _version_label(r: dict[str, Any]) -> str:
    if r["damaged"]:
        return "DAMAGED (see 'nbdclone check')"
    if r.get("snapshot"):
        return f"snapshot {r['snapshot']}"
    if r["base"] is None:
        return "own version" if r["version"] else "-"
    label = f"{r['base']}@{r['version']}" + ("" if r["follows"] else " (pinned)")
    if not r["move_pending"]:
        return label
    return label + (" (moves once its clients are gone)" if r["held"] else " (moves on next open)")


@clone_app.command("list")
def clone_list(store: StoreOpt = DEFAULT_STORE, as_json: JsonOpt = False, base: BaseFilter = None) -> None:
    """List the clones: base version, whether a move is pending, overlay size, whether it is open; with
    --json also each clone's NBD URI."""
    st = open_store(store)
    if base is not None:
        st.get_base(base)
    cat = st.catalog()
    address = server.address_of(st)
    rows = [
        {**_clone_row(st, rec), "uri": address.uri(slot_of(cat, rec.name), rec.name)}
        for rec in cat.clones.values()
        if base is None or rec.base == base
    ]
    if as_json:
        print_json(rows, items="clones")
        return
    table = Table("NAME", "BASE", "SIZE", "OVERLAY ON DISK", "OPEN", "CREATED", box=None)
    for r in rows:
        table.add_row(
            r["name"] + (" (read-only)" if r.get("readonly") else ""),
            _version_label(r),
            human(r["size"]),
            human(r["overlay_disk_bytes"]),
            "yes" if r["open"] else "no",
            r["created"],
        )
    out.print(table)


@clone_app.command("info")
def clone_info(name: CloneArg, store: StoreOpt = DEFAULT_STORE, as_json: JsonOpt = False) -> None:
    """Show a clone: its base version, bytes written and blocks held in its overlay."""
    st = open_store(store)
    clone = images.open_clone_readonly(st, name)
    try:
        usage = clone.usage()
    finally:
        clone.close()
        clone.base.close()
    info = {
        **_clone_row(st, st.get_clone(name)),
        "bytes_written": usage.bytes_written,
        "data_blocks": usage.data_blocks,
        "zero_blocks": usage.zero_blocks,
        "block_size": BLOCK_SIZE,
    }
    if as_json:
        print_json(info)
        return
    table = Table(show_header=False, box=None)
    for key, value in info.items():
        table.add_row(key.replace("_", " "), str(value))
    out.print(table)


NamesArg = Annotated[
    list[str] | None, typer.Argument(metavar="NAME...", help="Clone names.", autocompletion=complete_clone)
]


def _each(names: list[str], check: Callable[[str], object], action: Any, text: str) -> None:
    """Do `action(name)` for each clone, all checked to exist first (`check`); report each (`text` formatted
    with the clone's name and the fields the action returns, if any); exit 1 if any failed."""
    if not names:
        raise errors.InvalidArgument(detail="name at least one clone")
    if len(set(names)) != len(names):
        raise errors.InvalidArgument(detail="a clone name is given twice")
    for name in names:
        check(name)  # an unknown name fails the command before anything changes
    failed = 0
    for name in names:
        try:
            result = action(name)
            fields = result if isinstance(result, dict) else {}  # (what the core returns otherwise: not shown)
        except errors.NbdcloneError as exc:
            err.print(f"[red]error:[/red] {exc}", soft_wrap=True)
            if done.as_json:
                done.records.append({"clone": name, "error": str(exc)})
            failed += 1
            continue
        done(text.format(name=name, **fields), clone=name, **fields)
    if failed:
        raise typer.Exit(1)


@clone_app.command("reset")
def clone_reset(names: NamesArg = None, store: StoreOpt = DEFAULT_STORE, as_json: JsonOpt = False) -> None:
    """Drop every write of the clones: each reads as its base version again. Refused for a connected one."""
    st = open_store(store)
    _each(names or [], st.get_clone, st.reset_clone, "reset clone {name}: its writes are gone")


@clone_app.command("upgrade")
def clone_upgrade(
    names: NamesArg = None,
    to: Annotated[str | None, typer.Option("--to", help="Version to move to [default: the current one].")] = None,
    all_pending: Annotated[
        bool, typer.Option("--all-pending", help="Every clone whose base's current version it is not on.")
    ] = False,
    store: StoreOpt = DEFAULT_STORE,
    as_json: JsonOpt = False,
) -> None:
    """Move clones to another version of their base now. Their writes are dropped."""
    st = open_store(store)
    if all_pending:
        if names or to:
            raise errors.InvalidArgument(detail="--all-pending takes no names and no --to")
        names = [n for base in st.catalog().public_bases() for group in st.moves(base) for n in group]
        if not names:
            done.note("no clone is waiting to move")
            return

    def upgrade(name: str) -> dict[str, str | None]:
        old, new = st.upgrade_clone(name, to)
        return {"old": old, "new": new}

    _each(names or [], st.get_clone, upgrade, "clone {name}: version {old} -> {new}; its writes were dropped")


@clone_app.command("rename")
def clone_rename(old: CloneArg, new: str, store: StoreOpt = DEFAULT_STORE, as_json: JsonOpt = False) -> None:
    """Rename a clone (its NBD export name too); its writes and its socket stay. Refused while connected."""
    open_store(store).rename_clone(old, new)
    done(f"renamed clone {old} to {new}", clone=new, old=old)


@clone_app.command("rm")
def clone_rm(names: NamesArg = None, store: StoreOpt = DEFAULT_STORE, as_json: JsonOpt = False) -> None:
    """Remove clones and their writes. Refused for a connected one."""
    host = host_of(store)
    _each(names or [], host.check_clone, host.remove_clone, "removed clone {name}")


class ExportFormat(enum.StrEnum):
    raw = "raw"
    qcow2 = "qcow2"


@clone_app.command("export")
def clone_export(
    name: CloneArg,
    dest: Annotated[Path, typer.Argument(help="The file to create.")],
    fmt: Annotated[ExportFormat, typer.Option("--format", help="Format of DEST.")] = ExportFormat.raw,
    store: StoreOpt = DEFAULT_STORE,
    as_json: JsonOpt = False,
) -> None:
    """Write the clone's disk, as its clients see it, to a new sparse raw or qcow2 file."""
    st = open_store(store)
    fmt_lit: Literal["raw", "qcow2"] = "qcow2" if fmt is ExportFormat.qcow2 else "raw"
    with progress_bar() as bar:
        task = bar.add_task(f"exporting {name}", total=None)
        images.export_clone(st, name, dest, fmt_lit, lambda d, t: bar.update(task, completed=d, total=t))
    done(f"exported clone {name} to {dest} ({fmt_lit})", clone=name, file=str(dest), format=fmt_lit)


@clone_app.command("snapshot")
def clone_snapshot(
    args: Annotated[list[str], typer.Argument(metavar="NAME SNAP | rm NAME SNAP", help="The clone and the snapshot.")],
    store: StoreOpt = DEFAULT_STORE,
    as_json: JsonOpt = False,
) -> None:
    """Take snapshot SNAP of clone NAME (its contents now, shared by content with everything else; refused
    while it has clients), or with 'rm', remove one."""
    st = open_store(store)
    if len(args) == 3 and args[0] == "rm":
        freed = lineage.remove_snapshot(st, args[1], args[2])
        text = f"removed snapshot {args[2]} of clone {args[1]} ({human(freed)} freed)"
        done(text, clone=args[1], snapshot=args[2], removed=True, freed=freed)
        return
    if len(args) != 2:
        raise errors.InvalidArgument(detail="use: clone snapshot NAME SNAP, or clone snapshot rm NAME SNAP")
    name, snap = args
    with progress_bar() as bar:
        task = bar.add_task(f"snapshot {snap} of {name}", total=None)
        _, written = lineage.snapshot(st, name, snap, updater(bar, task))
    text = f"clone {name}: snapshot {snap} taken ({human(written * CHUNK)} of new chunks stored)"
    done(text, clone=name, snapshot=snap, new_chunks=written)


@clone_app.command("diff")
def clone_diff(
    name: CloneArg,
    since: Annotated[
        str | None,
        typer.Option("--from", help="A snapshot. [default: the version the clone's writes started from]"),
    ] = None,
    until: Annotated[str | None, typer.Option("--to", help="A snapshot. [default: the clone now]")] = None,
    store: StoreOpt = DEFAULT_STORE,
    as_json: JsonOpt = False,
) -> None:
    """The extents that differ between two states of clone NAME, and whether the newer one reads data or
    zeros there: found from the snapshots' maps (64 KiB chunks) and the clone's overlay (4 KiB blocks),
    without reading any data. Works while the clone has clients (what they have flushed is counted)."""
    d = diff.diff(open_store(store), name, since, until)
    rows = [{"offset": e.offset, "length": e.length, "kind": "zero" if e.zero else "data"} for e in d.extents]
    if as_json:
        print_json(
            {"clone": name, "from": d.since, "to": d.until, "size": d.size, "changed": d.changed, "extents": rows}
        )
        return
    out.print(f"clone {name}: {human(d.changed)} in {len(rows)} extent(s) differ from {d.since} to {d.until}")
    for r in rows:
        out.print(f"  {r['offset']:>16} +{r['length']:<12} {r['kind']}")


@clone_app.command("snapshots")
def clone_snapshots(name: CloneArg, store: StoreOpt = DEFAULT_STORE, as_json: JsonOpt = False) -> None:
    """List clone NAME's snapshots, oldest first, and the one its writes started from; for each, the space
    only it holds (what removing it frees, unless a clone made from it reads it) and the space it shares
    with other versions and snapshots (kept while any of them is)."""
    st = open_store(store)
    snaps = lineage.snapshots(st, name)
    space = {v.version: v for v in st.version_stats() if v.owner == name} if snaps else {}
    rows: list[dict[str, Any]] = [
        {
            "name": snap,
            "version": v.id,
            "size": v.size,
            "created": v.created,
            "new_chunks": v.new_chunks,
            "own": space[v.id].unique,
            "shared": space[v.id].shared,
            "on": on,
        }
        for snap, v, on in snaps
    ]
    if as_json:
        print_json(rows, items="snapshots")
        return
    table = Table("SNAPSHOT", "SIZE", "ONLY IN IT", "SHARED", "CREATED", "CLONE STARTED FROM IT", box=None)
    for r in rows:
        table.add_row(
            r["name"], human(r["size"]), human(r["own"]), human(r["shared"]), r["created"], "*" if r["on"] else ""
        )
    out.print(table)


@clone_app.command("rollback")
def clone_rollback(name: CloneArg, snap: str, store: StoreOpt = DEFAULT_STORE, as_json: JsonOpt = False) -> None:
    """Make clone NAME read as its snapshot SNAP again; its writes since are dropped. Refused while connected."""
    lineage.rollback(open_store(store), name, snap)
    done(f"clone {name}: rolled back to snapshot {snap}", clone=name, snapshot=snap)


@clone_app.command("flatten")
def clone_flatten(names: NamesArg = None, store: StoreOpt = DEFAULT_STORE, as_json: JsonOpt = False) -> None:
    """Make clones independent of their base's version (which can then be removed): each one's contents
    become a version of its own, sharing every chunk by content. A clone stops following its base."""
    st = open_store(store)

    def flatten(name: str) -> dict[str, Any]:
        vid = lineage.flatten(st, name)
        said = "it reads no base version already" if vid is None else "it no longer uses its base version"
        return {"version": vid, "result": said}

    _each(names or [], st.get_clone, flatten, "flattened clone {name}: {result}")


@clone_app.command("resize")
def clone_resize(
    name: CloneArg,
    size: Annotated[str, typer.Argument(help="The new size, like 20G.")],
    shrink: Annotated[
        bool, typer.Option("--shrink", help="Allow a smaller size: the bytes past it are dropped.")
    ] = False,
    store: StoreOpt = DEFAULT_STORE,
    as_json: JsonOpt = False,
) -> None:
    """Give clone NAME a new size; the new bytes read as zeros. A clone of a base gets a version of its own
    (as flatten does). Refused while connected."""
    new = parse_size(size)
    with progress_bar() as bar:
        task = bar.add_task(f"resizing {name}", total=None)
        old = lineage.resize(open_store(store), name, new, shrink=shrink, progress=updater(bar, task))
    text = f"clone {name}: {human(old)} -> {human(new)}" if old != new else f"clone {name} is {human(new)} already"
    done(text, clone=name, old_size=old, size=new)


@clone_app.command("move")
def clone_move(
    name: CloneArg,
    to: Annotated[str, typer.Option("--to", help="The fleet host to give it to.")],
    force: Annotated[
        bool,
        typer.Option("--force", help="Take it over from a host whose lease is gone (its store must be readable)."),
    ] = False,
    drain: Annotated[
        float,
        typer.Option(
            "--drain",
            min=0.0,
            metavar="SECONDS",
            help="Refuse new clients here and wait up to SECONDS for the connected ones to leave.",
        ),
    ] = 0.0,
    store: StoreOpt = DEFAULT_STORE,
    as_json: JsonOpt = False,
) -> None:
    """Give a clone to another host of the fleet: its changes go through Ceph, its owner and epoch change
    in one etcd transaction, and the new host's server takes it up. Refused while it has clients here
    (with --drain, once they have had SECONDS to leave)."""
    epoch = host_of(store).move_clone(name, to, force=force, drain=drain)
    done(f"clone {name} is host {to}'s now (epoch {epoch})", clone=name, host=to, epoch=epoch)
