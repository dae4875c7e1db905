"""nbdclone clone ...: create, list, inspect, reset, upgrade, rename, export and remove clones."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.table import Table

from nbdclone import errors
from nbdclone.cli._common import (
    DEFAULT_STORE,
    BaseFilter,
    JsonOpt,
    StoreOpt,
    clone_app,
    err,
    human,
    out,
    parse_size,
    print_json,
    progress_bar,
    record_dict,
)
from nbdclone.store import Store, images
from nbdclone.store.catalog import slot_of
from nbdclone.store.overlay import BLOCK_SIZE
from nbdclone.supervisor import server


@clone_app.command("create")
def clone_create(
    names: Annotated[list[str], typer.Argument(metavar="NAME...", help="Clone names; also their NBD export names.")],
    base: Annotated[
        str | None, typer.Option(help="BASE follows the base's current version; BASE@VERSION pins one.")
    ] = None,
    size: Annotated[str | None, typer.Option(help="Size of a blank clone with no base, like 10G.")] = None,
    read_only: Annotated[bool, typer.Option("--read-only", help="Serve these clones read-only.")] = False,
    store: StoreOpt = DEFAULT_STORE,
) -> None:
    """Create clones of BASE (or blank disks of SIZE). Many names make many clones in one step."""
    if (base is None) == (size is None):
        raise errors.InvalidArgument(detail="give exactly one of --base BASE or --size SIZE")
    records = Store(store).create_clones(names, base=base, size=parse_size(size) if size else None, readonly=read_only)
    for record in records[:20]:
        what = f"of {base}" if record.base else f"(blank, {human(record.size)})"
        out.print(f"created clone {record.name} {what}")
    if len(records) > 20:
        out.print(f"... and {len(records) - 20} more")


def _clone_row(st: Store, rec: Any) -> dict[str, Any]:
    try:
        return {**record_dict(rec), **record_dict(st.status(rec)), "damaged": ""}
    except errors.Damaged as exc:  # listed, not hidden, and the list goes on
        status = {"version": None, "size": rec.size, "follows": rec.pin is None, "move_pending": False}
        status |= {"held": False, "overlay_disk_bytes": 0, "open": False}
        return {**record_dict(rec), **status, "damaged": str(exc)}


def _version_label(r: dict[str, Any]) -> str:
    if r["damaged"]:
        return "DAMAGED (see 'nbdclone check')"
    if r["base"] is None:
        return "-"
    label = f"{r['base']}@{r['version']}" + ("" if r["follows"] else " (pinned)")
    if not r["move_pending"]:
        return label
    return label + (" (moves once its clients are gone)" if r["held"] else " (moves on next open)")


@clone_app.command("list")
def clone_list(store: StoreOpt = DEFAULT_STORE, as_json: JsonOpt = False, base: BaseFilter = None) -> None:
    """List the clones: base version, whether a move is pending, overlay size, whether it is open; with
    --json also each clone's NBD URI."""
    st = Store(store)
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
        print_json(rows)
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
def clone_info(name: str, store: StoreOpt = DEFAULT_STORE, as_json: JsonOpt = False) -> None:
    """Show a clone: its base version, bytes written and blocks held in its overlay."""
    st = Store(store)
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


NamesArg = Annotated[list[str] | None, typer.Argument(metavar="NAME...", help="Clone names.")]


def _each(names: list[str], store: Store, action: Any, done: str) -> None:
    """Do `action(name)` for each clone, all checked to exist first; report each; exit 1 if any failed."""
    if not names:
        raise errors.InvalidArgument(detail="name at least one clone")
    if len(set(names)) != len(names):
        raise errors.InvalidArgument(detail="a clone name is given twice")
    for name in names:
        store.get_clone(name)  # an unknown name fails the command before anything changes
    failed = 0
    for name in names:
        try:
            result = action(name)
        except errors.NbdcloneError as exc:
            err.print(f"[red]error:[/red] {exc}", soft_wrap=True)
            failed += 1
            continue
        out.print(done.format(name=name, result=result), soft_wrap=True)
    if failed:
        raise typer.Exit(1)


@clone_app.command("reset")
def clone_reset(names: NamesArg = None, store: StoreOpt = DEFAULT_STORE) -> None:
    """Drop every write of the clones: each reads as its base version again. Refused for a connected one."""
    st = Store(store)
    _each(names or [], st, st.reset_clone, "reset clone {name}: its writes are gone")


@clone_app.command("upgrade")
def clone_upgrade(
    names: NamesArg = None,
    to: Annotated[str | None, typer.Option("--to", help="Version to move to [default: the current one].")] = None,
    all_pending: Annotated[
        bool, typer.Option("--all-pending", help="Every clone whose base's current version it is not on.")
    ] = False,
    store: StoreOpt = DEFAULT_STORE,
) -> None:
    """Move clones to another version of their base now. Their writes are dropped."""
    st = Store(store)
    if all_pending:
        if names or to:
            raise errors.InvalidArgument(detail="--all-pending takes no names and no --to")
        names = [n for base in st.catalog().bases for group in st.moves(base) for n in group]
        if not names:
            out.print("no clone is waiting to move")
            return

    def upgrade(name: str) -> str:
        old, new = st.upgrade_clone(name, to)
        return f"{old} -> {new}"

    _each(names or [], st, upgrade, "clone {name}: version {result}; its writes were dropped")


@clone_app.command("rename")
def clone_rename(old: str, new: str, store: StoreOpt = DEFAULT_STORE) -> None:
    """Rename a clone (its NBD export name too); its writes and its socket stay. Refused while connected."""
    Store(store).rename_clone(old, new)
    out.print(f"renamed clone {old} to {new}")


@clone_app.command("rm")
def clone_rm(names: NamesArg = None, store: StoreOpt = DEFAULT_STORE) -> None:
    """Remove clones and their writes. Refused for a connected one."""
    st = Store(store)
    _each(names or [], st, st.remove_clone, "removed clone {name}")


class ExportFormat(enum.StrEnum):
    raw = "raw"
    qcow2 = "qcow2"


@clone_app.command("export")
def clone_export(
    name: str,
    dest: Annotated[Path, typer.Argument(help="The file to create.")],
    fmt: Annotated[ExportFormat, typer.Option("--format", help="Format of DEST.")] = ExportFormat.raw,
    store: StoreOpt = DEFAULT_STORE,
) -> None:
    """Write the clone's disk, as its clients see it, to a new sparse raw or qcow2 file."""
    st = Store(store)
    fmt_lit: Literal["raw", "qcow2"] = "qcow2" if fmt is ExportFormat.qcow2 else "raw"
    with progress_bar() as bar:
        task = bar.add_task(f"exporting {name}", total=None)
        images.export_clone(st, name, dest, fmt_lit, lambda d, t: bar.update(task, completed=d, total=t))
    out.print(f"exported clone {name} to {dest} ({fmt_lit})")
