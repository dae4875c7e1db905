"""The nbdclone command line: parses, calls the core, turns errors into one line and an exit code.

Only this module prints.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import re
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

import nbdclone
from nbdclone import errors
from nbdclone.runtime import SLOTS, Address, RunDir
from nbdclone.store import images, publish
from nbdclone.store.cache import resident_bytes
from nbdclone.store.catalog import Store, default_store, slot_of
from nbdclone.store.chunks import CHUNK
from nbdclone.store.overlay import BLOCK_SIZE
from nbdclone.supervisor import metrics as metrics_view
from nbdclone.supervisor import server
from nbdclone.supervisor.sockets import Access
from nbdclone.worker.process import LATENCY_BUCKETS

app = typer.Typer(
    help="Serve copy-on-write clones of read-only base images over NBD.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)
base_app = typer.Typer(help="Base images and their versions: import, list, promote, remove.", no_args_is_help=True)
clone_app = typer.Typer(help="Create, inspect, reset, upgrade, export and remove clones.", no_args_is_help=True)
app.add_typer(base_app, name="base")
app.add_typer(clone_app, name="clone")

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

StoreOpt = Annotated[
    Path,
    typer.Option("--store", envvar="NBDCLONE_STORE", help="Store directory.", show_default=str(default_store())),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
_DEFAULT_STORE = default_store()


def _print_version(value: bool) -> None:
    if value:
        out.print(f"nbdclone {nbdclone.__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    store: Annotated[
        Path | None,
        typer.Option("--store", help="Store directory, for every command (also accepted after the command)."),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version.")
    ] = False,
    progress: Annotated[
        bool | None,
        typer.Option(
            "--progress/--no-progress",
            help="Show progress bars (bytes, rate, time left) on standard error.",
            show_default="on a terminal",
        ),
    ] = None,
) -> None:
    """Serve copy-on-write clones of read-only base images over NBD."""
    if store is not None:  # a command's own --store option reads it from here (an option after it still wins)
        os.environ["NBDCLONE_STORE"] = str(store)
    _show_progress[0] = progress


_show_progress: list[bool | None] = [None]  # --progress / --no-progress; None: only on a terminal


_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*", text.upper())
    if not m or int(m.group(1)) == 0:
        raise errors.InvalidArgument(detail=f"invalid size {text!r}: use a number with K, M, G or T, like 10G")
    size = int(m.group(1)) * _UNITS[m.group(2)]
    if size % 512:
        raise errors.InvalidArgument(detail=f"size {text!r} is not a multiple of 512 bytes")
    return size


def human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError


def _progress() -> Progress:
    return Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=err.is_terminal,
        disable=not (err.is_terminal if _show_progress[0] is None else _show_progress[0]),
    )


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


# -- bases ---------------------------------------------------------------------------------------------


@base_app.command("import")
def base_import(
    name: Annotated[str, typer.Argument(help="The base; created by its first import.")],
    source: Annotated[
        str, typer.Argument(help="A raw or qcow2 disk image, or an NBD URI (nbd://..., nbd+unix:///...).")
    ],
    allow_backing: Annotated[
        list[Path] | None,
        typer.Option(
            "--allow-backing",
            help="A backing file or external data file the qcow2 may read (repeat for a chain). "
            "Without it, an image that reads another file is refused.",
        ),
    ] = None,
    store: StoreOpt = _DEFAULT_STORE,
) -> None:
    """Add a raw or qcow2 image, or an NBD export, as a new, immutable version of base NAME. Prints the
    version id last. An NBD source is streamed into the store (no temporary file; holes are not read).

    Chunks the store already holds are not stored again. The first import makes its version current;
    later ones become current with 'nbdclone base promote'. The image is checked first: a damaged qcow2,
    or one that reads a file not named with --allow-backing, is refused.
    """
    st = Store(store)
    with _progress() as bar:
        task = bar.add_task(f"importing {name}", total=None)
        report = lambda d, t: bar.update(task, completed=d, total=t)  # noqa: E731
        if images.NBD_URI.match(source):
            if allow_backing:
                raise errors.InvalidArgument(detail="--allow-backing is for qcow2 files, not NBD sources")
            record, vid = images.import_nbd(st, name, source, report)
        else:
            record, vid = images.import_base(st, name, Path(source), report, allow_backing=allow_backing or ())
    version = record.versions[vid]
    current = st.current_version(record)
    state = (
        "current" if current == vid else f"current is still {current}; flip with: nbdclone base promote {name} {vid}"
    )
    new = human(version.new_chunks * CHUNK)
    out.print(f"imported {name}@{vid}: {human(version.size)} from {source}, {new} new data ({state})", soft_wrap=True)
    out.print(vid)


BaseFilter = Annotated[str | None, typer.Option("--base", help="Only this base (and its clones).")]


@base_app.command("list")
def base_list(store: StoreOpt = _DEFAULT_STORE, as_json: JsonOpt = False, base: BaseFilter = None) -> None:
    """List every version of every base: size, space shared with other versions and held only by it,
    which version is current, and how many clones use it."""
    st = Store(store)
    if base is not None:
        st.get_base(base)
    rows = [_asdict(v) for v in st.version_stats() if base is None or v.base == base]
    if as_json:
        _print_json(rows)
        return
    table = Table("BASE", "VERSION", "SIZE", "SHARED", "ONLY HERE", "CURRENT", "CLONES", "CREATED", box=None)
    for r in rows:
        table.add_row(
            r["base"],
            r["version"],
            human(r["size"]),
            human(r["shared"]),
            human(r["unique"]),
            "*" if r["current"] else "",
            str(r["clones"]),
            r["created"],
        )
    out.print(table)
    for r in rows:
        if r["damaged"]:
            out.print(f"{r['base']}@{r['version']}: {r['damaged']}", soft_wrap=True)
    pack = st.chunks.pack
    if pack.exists():
        out.print(f"chunk store: {human(pack.stat().st_blocks * 512)} on disk")


@base_app.command("promote")
def base_promote(
    name: str,
    version: Annotated[str, typer.Argument(help="The version to make current (an older one: a rollback).")],
    store: StoreOpt = _DEFAULT_STORE,
) -> None:
    """Make VERSION the current version of base NAME: every clone following NAME moves to it on its next
    first connection (dropping its writes), once no client may come back to the version it is on (its
    last connection closed while the server ran). One atomic rename, whatever the number of clones."""
    st = Store(store)
    old = st.promote(name, version)
    now, wait = st.moves(name)
    out.print(f"{name}: current version {old} -> {version}")
    out.print(
        f"{len(now)} clone(s) move at their next connection; {len(wait)} wait until their clients are gone"
        + (f" ({', '.join(wait[:10])}{', ...' if len(wait) > 10 else ''})" if wait else "")
    )


@base_app.command("publish")
def base_publish(
    name: str,
    clone: Annotated[str, typer.Option("--from", help="The clone whose contents become the new version.")],
    promote: Annotated[bool, typer.Option("--promote", help="Make the new version current too.")] = False,
    store: StoreOpt = _DEFAULT_STORE,
) -> None:
    """Make CLONE's contents (as a client reads them now) the next version of base NAME (a new base if NAME
    does not exist). Only the chunks the clone changed are read and stored. Refused while CLONE has clients."""
    st = Store(store)
    with _progress() as bar:
        task = bar.add_task(f"publishing {clone}", total=None)
        _, vid, written = publish.publish_clone(
            st, name, clone, lambda done, total: bar.update(task, completed=done, total=total)
        )
    out.print(f"{name}: version {vid} from clone {clone} ({human(written * CHUNK)} of new chunks stored)")
    if promote:
        old = st.promote(name, vid)
        now, wait = st.moves(name)
        out.print(f"{name}: current version {old} -> {vid}; {len(now)} clone(s) move now, {len(wait)} wait")
    out.print(vid)


@base_app.command("rm")
def base_rm(
    ref: Annotated[str, typer.Argument(metavar="NAME[@VERSION]", help="A base, or one version of it.")],
    store: StoreOpt = _DEFAULT_STORE,
) -> None:
    """Remove a base (refused while a clone uses it), or one version (refused if current or in use)."""
    st = Store(store)
    freed = st.remove_version(ref) if "@" in ref else st.remove_base(ref)
    out.print(f"removed {ref}; freed {human(freed)}")


@base_app.command("gc")
def base_gc(store: StoreOpt = _DEFAULT_STORE) -> None:
    """Remove every version that is not current and used by no clone, and free the chunks nothing uses."""
    removed, freed = Store(store).gc()
    out.print(f"removed {', '.join(removed) or 'no versions'}; freed {human(freed)}")


@base_app.command("warm")
def base_warm(
    ref: Annotated[str, typer.Argument(metavar="NAME[@VERSION]", help="A base (its current version) or a version.")],
    store: StoreOpt = _DEFAULT_STORE,
) -> None:
    """Read a version's recorded boot trace into the shared read cache now, before a boot storm."""
    t = time.monotonic()
    which, nbytes = images.warm_version(Store(store), ref)
    out.print(f"warmed {which}: {human(nbytes)} in {time.monotonic() - t:.2f} s")


# -- clones --------------------------------------------------------------------------------------------


@clone_app.command("create")
def clone_create(
    names: Annotated[list[str], typer.Argument(metavar="NAME...", help="Clone names; also their NBD export names.")],
    base: Annotated[
        str | None, typer.Option(help="BASE follows the base's current version; BASE@VERSION pins one.")
    ] = None,
    size: Annotated[str | None, typer.Option(help="Size of a blank clone with no base, like 10G.")] = None,
    read_only: Annotated[bool, typer.Option("--read-only", help="Serve these clones read-only.")] = False,
    store: StoreOpt = _DEFAULT_STORE,
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
        return {**_asdict(rec), **_asdict(st.status(rec)), "damaged": ""}
    except errors.Damaged as exc:  # listed, not hidden, and the list goes on
        status = {"version": None, "size": rec.size, "follows": rec.pin is None, "move_pending": False}
        status |= {"held": False, "overlay_disk_bytes": 0, "open": False}
        return {**_asdict(rec), **status, "damaged": str(exc)}


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
def clone_list(store: StoreOpt = _DEFAULT_STORE, as_json: JsonOpt = False, base: BaseFilter = None) -> None:
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
        _print_json(rows)
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
def clone_info(name: str, store: StoreOpt = _DEFAULT_STORE, as_json: JsonOpt = False) -> None:
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
        _print_json(info)
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
def clone_reset(names: NamesArg = None, store: StoreOpt = _DEFAULT_STORE) -> None:
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
    store: StoreOpt = _DEFAULT_STORE,
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
def clone_rename(old: str, new: str, store: StoreOpt = _DEFAULT_STORE) -> None:
    """Rename a clone (its NBD export name too); its writes and its socket stay. Refused while connected."""
    Store(store).rename_clone(old, new)
    out.print(f"renamed clone {old} to {new}")


@clone_app.command("rm")
def clone_rm(names: NamesArg = None, store: StoreOpt = _DEFAULT_STORE) -> None:
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
    store: StoreOpt = _DEFAULT_STORE,
) -> None:
    """Write the clone's disk, as its clients see it, to a new sparse raw or qcow2 file."""
    st = Store(store)
    fmt_lit: Literal["raw", "qcow2"] = "qcow2" if fmt is ExportFormat.qcow2 else "raw"
    with _progress() as bar:
        task = bar.add_task(f"exporting {name}", total=None)
        images.export_clone(st, name, dest, fmt_lit, lambda d, t: bar.update(task, completed=d, total=t))
    out.print(f"exported clone {name} to {dest} ({fmt_lit})")


# -- serving -------------------------------------------------------------------------------------------

SocketOpt = Annotated[
    Path | None,
    typer.Option(help="Slot 0's Unix socket; slot K listens on SOCKET.K.", show_default="STORE/run/nbdclone.sock"),
]
ListenOpt = Annotated[
    str | None, typer.Option(help="Listen on TCP HOST:PORT (ports PORT to PORT+15) instead of Unix sockets.")
]
WorkersOpt = Annotated[
    int | None, typer.Option(help="Worker processes (one per core), 1 to 16.", min=1, max=16, show_default="cores")
]


def _host_port(text: str, option: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise errors.InvalidArgument(detail=f"invalid {option} {text!r}: use HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def _address(store: Path, socket: Path | None, listen: str | None) -> Address | None:
    if socket is not None and listen is not None:
        raise errors.InvalidArgument(detail="give --socket or --listen, not both")
    if socket is None and listen is None:
        return None
    address = Address(
        store.absolute(),
        socket.absolute() if socket is not None else None,
        _host_port(listen, "--listen") if listen is not None else None,
    )
    address.check()
    return address


def _serve_config(
    store: Path, socket: Path | None, listen: str | None, workers: int | None = None, threads: int = 1
) -> server.ServeConfig:
    address = _address(store, socket, listen)
    n = workers or min(os.cpu_count() or 1, SLOTS)
    return server.ServeConfig(store=store.absolute(), address=address, workers=n, threads=threads)


class Tls(enum.StrEnum):
    off = "off"
    on = "on"
    require = "require"


class LogLevel(enum.StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


def _mode(text: str) -> int:
    if not re.fullmatch(r"0?[0-7]{3}", text):
        raise errors.InvalidArgument(detail=f"invalid --socket-mode {text!r}: use an octal mode like 0660")
    mode = int(text, 8)
    if mode & 0o111 or not mode & 0o200:
        raise errors.InvalidArgument(detail=f"--socket-mode {text}: the owner needs write (0600 and up, no x bits)")
    return mode


@app.command()
def serve(
    store: StoreOpt = _DEFAULT_STORE,
    socket: SocketOpt = None,
    listen: ListenOpt = None,
    workers: WorkersOpt = None,
    threads: Annotated[int, typer.Option(help="nbdkit threads per connection.", min=1)] = 1,
    pin: Annotated[
        bool, typer.Option(help="Pin a worker's connection threads to its core while it has more than one.")
    ] = True,
    cache_size: Annotated[str, typer.Option(help="Bound of the shared read cache, like 2G.")] = "1G",
    create: Annotated[bool, typer.Option("--create", help="Make the store if it does not exist.")] = False,
    socket_mode: Annotated[
        str | None, typer.Option(help="Mode of the Unix sockets.", show_default="0660 with --socket-group, else 0600")
    ] = None,
    socket_group: Annotated[
        str | None, typer.Option(help="Group of the Unix sockets (for libvirt: libvirt-qemu or kvm).")
    ] = None,
    tls: Annotated[Tls, typer.Option(help="TLS: off, on (offered), require (plain clients refused).")] = Tls.off,
    tls_certificates: Annotated[
        Path | None, typer.Option(help="Folder with the server's X.509 certificates (see nbdkit-tls).")
    ] = None,
    tls_psk: Annotated[Path | None, typer.Option(help="Pre-shared keys file (psktool format).")] = None,
    allow: Annotated[
        list[str] | None,
        typer.Option(help="Only these clients (addresses, networks like 10.0.0.0/8, uid:N, gid:N); repeatable."),
    ] = None,
    max_connections: Annotated[int, typer.Option(help="Cap on open connections per worker (0: none).", min=0)] = 0,
    max_client_connections: Annotated[
        int,
        typer.Option(help="Cap on one client's connections per worker (its IP address, or its uid; 0: none).", min=0),
    ] = 0,
    handshake_timeout: Annotated[
        float, typer.Option(help="Seconds a new connection may take to open a clone (0: no limit).", min=0)
    ] = 10.0,
    exclusive: Annotated[
        bool, typer.Option("--exclusive", help="One client per clone at a time (two VMs writing one disk corrupt it).")
    ] = False,
    read_only: Annotated[bool, typer.Option("--read-only", help="Serve every clone read-only.")] = False,
    metrics: Annotated[str | None, typer.Option(help="Serve Prometheus metrics on HOST:PORT (/metrics).")] = None,
    grace: Annotated[
        float, typer.Option(help="Seconds a worker may take to stop before it is killed.", min=0.1)
    ] = 10.0,
    log_level: Annotated[LogLevel, typer.Option(help="Least severe messages logged.")] = LogLevel.info,
) -> None:
    """Serve every clone of the store over NBD until SIGTERM or Ctrl-C; SIGHUP reloads the workers.

    Each clone has one address for good (its slot's socket or port: 'nbdclone uri NAME' prints it, with
    or without a server running). A store that does not exist is refused (a mistyped path would serve
    nothing), unless --create.
    """
    if not create and not store.is_dir():
        raise errors.InvalidArgument(
            detail=f"store {store} does not exist; import a base or create a clone there first, or pass --create"
        )
    if tls == Tls.off and (tls_psk or tls_certificates):
        raise errors.InvalidArgument(detail="--tls-psk and --tls-certificates need --tls=on or --tls=require")
    for path in (tls_psk, tls_certificates):
        if path is not None and not path.exists():
            raise errors.InvalidArgument(detail=f"{path} does not exist")
    mode = _mode(socket_mode) if socket_mode else (0o660 if socket_group else 0o600)
    access = Access(mode, socket_group)
    access.gid  # noqa: B018 - an unknown group is refused now, not after the sockets exist
    security = server.Security(
        tls.value,
        tls_certificates,
        tls_psk,
        tuple(allow or ()),
        max_connections,
        max_client_connections,
        handshake_timeout,
        exclusive,
        read_only,
    )
    cfg = replace(
        _serve_config(store, socket, listen, workers, threads),
        pin=pin,
        cache_size=parse_size(cache_size),
        access=access,
        security=security,
        metrics=_host_port(metrics, "--metrics") if metrics else None,
        grace=grace,
        log_level=log_level.value,
    )
    _log_to_journal(log_level.value)

    def ready(address: Address) -> None:
        n = len(Store(store).catalog().clones)
        if address.listen is None:
            where = f"sockets {address.socket_path(0)}[.1-.{SLOTS - 1}]"
        else:
            where = f"ports {address.listen[1]}-{address.listen[1] + SLOTS - 1} of {address.listen[0]}"
        out.print(f"nbdclone: serving {n} clone(s) of {cfg.store} on {where} (see 'nbdclone uri NAME')", soft_wrap=True)
        sys.stdout.flush()

    raise typer.Exit(server.run(cfg, ready))


def _log_to_journal(level: str) -> None:
    """One line per event, with time and level; under systemd, journald adds the time itself."""
    fmt = (
        "%(levelname)s %(name)s: %(message)s"
        if os.environ.get("JOURNAL_STREAM")
        else ("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=level.upper(), format=fmt, force=True)


@app.command()
def uri(
    name: str,
    store: StoreOpt = _DEFAULT_STORE,
    socket: SocketOpt = None,
    listen: ListenOpt = None,
) -> None:
    """Print the NBD URI of clone NAME: the same with or without a server running, whatever its workers.

    Without --socket or --listen, the address is the running server's, or else the last server's."""
    st = Store(store)
    st.get_clone(name)
    address = _address(store, socket, listen) or server.address_of(st)
    out.print(address.uri(slot_of(st.catalog(), name), name), soft_wrap=True)


@app.command()
def reload(store: StoreOpt = _DEFAULT_STORE) -> None:
    """Restart the running server's workers one at a time (to load a new nbdclone): clients reconnect."""
    info = Store(store).server_info()
    os.kill(int(info["pid"]), signal.SIGHUP)
    out.print(f"asked the server (pid {info['pid']}) to restart its {len(info['workers'])} worker(s)")


@app.command()
def stats(store: StoreOpt = _DEFAULT_STORE, as_json: JsonOpt = False) -> None:
    """The running server: its shared read cache, its workers, and per clone the requests it served."""
    st = Store(store)
    _, workers = metrics_view.worker_records(st, RunDir(st.path))
    try:
        cache = json.loads(RunDir(st.path).cache_stats.read_text())
    except (FileNotFoundError, ValueError):
        cache = {}
    counters = ("hits", "misses", "hit_bytes", "miss_bytes", "prefetched_bytes", "open_clones", "connections")
    total = {c: sum(int(w.get(c, 0)) for w in workers) for c in counters}
    c: dict[str, Any] = {**cache, "resident_bytes": resident_bytes(st.chunks.pack), **total}
    clones = metrics_view.clone_totals(workers)
    if as_json:
        _print_json(
            {"cache": c, "workers": [{k: v for k, v in w.items() if k != "clones"} for w in workers], "clones": clones}
        )
        return
    lookups = c["hits"] + c["misses"]
    hit_rate = f"{c['hits'] / lookups:.1%}" if lookups else "-"
    out.print(
        f"cache: {human(c['resident_bytes'])} held of {human(c.get('limit', 0))}, hits {c['hits']} "
        f"misses {c['misses']} ({hit_rate} hits), evictions {c.get('evictions', 0)}, "
        f"prefetched {human(c['prefetched_bytes'])}",
        soft_wrap=True,
    )
    table = Table("WORKER", "PID", "CLONES OPEN", "CONNECTIONS", "HITS", "MISSES", box=None)
    for w in workers:
        table.add_row(*(str(w.get(k, "-")) for k in ("worker", "pid", "open_clones", "connections", "hits", "misses")))
    out.print(table)
    if clones:
        per = Table("CLONE", "READS", "READ", "WRITES", "WRITTEN", "FLUSHES", "ERRORS", "READ P50", box=None)
        for name, ops in sorted(clones.items()):
            per.add_row(
                name,
                str(ops["read"]["requests"]),
                human(ops["read"]["bytes"]),
                str(ops["write"]["requests"]),
                human(ops["write"]["bytes"]),
                str(ops["flush"]["requests"]),
                str(sum(o["errors"] for o in ops.values())),
                _p50(ops["read"]),
            )
        out.print(per)


def _p50(op: dict[str, Any]) -> str:
    """The bucket bound under which half of the requests finished."""
    buckets, n = op.get("buckets") or [], op["requests"]
    acc = 0
    for bound, count in zip([*LATENCY_BUCKETS, None], buckets, strict=False):
        acc += count
        if n and acc * 2 >= n:
            return f"<{bound // 1000} us" if bound is not None else "> 1 s"
    return "-"


@app.command("systemd-units")
def systemd_units(
    dest: Annotated[Path, typer.Option(help="Folder to write nbdclone.service and nbdclone.socket to.")],
    store: StoreOpt = Path("/var/lib/nbdclone"),
    group: Annotated[str, typer.Option(help="The group QEMU runs as (Debian: libvirt-qemu).")] = "libvirt-qemu",
) -> None:
    """Write a systemd service (Type=notify) and socket unit for serving STORE, for this installation."""
    from importlib.resources import files

    Address(store.absolute()).check()
    units = files("nbdclone") / "data" / "systemd"
    exe = Path(sys.argv[0]).absolute()
    for name in ("nbdclone.service", "nbdclone.socket"):
        text = (units / name).read_text()
        text = text.replace("/usr/local/bin/nbdclone", str(exe)).replace("/var/lib/nbdclone", str(store.absolute()))
        text = text.replace("libvirt-qemu", group)
        target = dest / name
        if target.exists():
            raise errors.InvalidArgument(detail=f"{target} exists; remove it first")
        dest.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(0o644)
        out.print(f"wrote {target}")
    out.print("then: systemctl daemon-reload && systemctl enable --now nbdclone.socket nbdclone.service")


DU_FORMAT = 1


@app.command()
def du(store: StoreOpt = _DEFAULT_STORE, as_json: JsonOpt = False, base: BaseFilter = None) -> None:
    """Space at a glance: per base version, what it holds, shares and alone holds; per clone, what its
    writes take; and the store's totals on disk."""
    st = Store(store)
    if base is not None:
        st.get_base(base)
    versions = [_asdict(v) for v in st.version_stats() if base is None or v.base == base]
    clones: list[dict[str, Any]] = []
    for rec in st.catalog().clones.values():
        if base is not None and rec.base != base:
            continue
        try:
            used, damaged = st.overlay_bytes(rec), ""
        except errors.NbdcloneError as exc:
            used, damaged = 0, str(exc)
        clones.append({"name": rec.name, "base": rec.base, "overlay_disk_bytes": used, "damaged": damaged})
    pack = st.chunks.pack
    totals = {
        "chunks_disk_bytes": pack.stat().st_blocks * 512 if pack.exists() else 0,
        "overlays_disk_bytes": sum(c["overlay_disk_bytes"] for c in clones),
        "store_disk_bytes": sum(p.lstat().st_blocks * 512 for p in st.path.rglob("*") if not p.is_symlink()),
    }
    if as_json:
        _print_json({"format": DU_FORMAT, "versions": versions, "clones": clones, "totals": totals})
        return
    table = Table("BASE", "VERSION", "HOLDS", "SHARED", "ONLY HERE", "CLONES", box=None)
    for v in versions:
        table.add_row(
            v["base"], v["version"], human(v["stored"]), human(v["shared"]), human(v["unique"]), str(v["clones"])
        )
    out.print(table)
    table = Table("CLONE", "BASE", "WRITES ON DISK", box=None)
    for c in clones:
        table.add_row(c["name"], c["base"] or "-", "DAMAGED" if c["damaged"] else human(c["overlay_disk_bytes"]))
    out.print(table)
    out.print(
        f"chunks {human(totals['chunks_disk_bytes'])}, clones' writes {human(totals['overlays_disk_bytes'])}, "
        f"store {human(totals['store_disk_bytes'])} on disk"
    )


@app.command()
def demo(
    store: StoreOpt = _DEFAULT_STORE,
    socket: SocketOpt = None,
    listen: ListenOpt = None,
) -> None:
    """Import the built-in demo base, make two clones of it, and serve them."""
    from nbdclone.demo import build_demo_image

    st = Store(store)
    cfg = _serve_config(store, socket, listen)
    cat = st.catalog()
    if "demo" not in cat.bases:
        with st.scratch(".raw") as image:
            images.import_base(st, "demo", build_demo_image(image))
        out.print("imported the demo base 'demo' (64 MiB, ext4)")
    missing = [c for c in ("demo-1", "demo-2") if c not in st.catalog().clones]
    if missing:
        st.create_clones(missing, base="demo")
        out.print(f"created clone(s) {', '.join(missing)}")

    def ready(address: Address) -> None:
        cat = st.catalog()
        one, two = (address.uri(slot_of(cat, n), n) for n in ("demo-1", "demo-2"))
        sock = one.partition("socket=")[2]
        out.print(
            f"""
nbdclone is serving the clones demo-1 and demo-2 of the demo base. Attach one with:

  nbdinfo '{one}'
  qemu-img info '{two}'
  nbdfuse /mnt/demo-1 '{one}' &     # then: mount /mnt/demo-1/nbd /mnt/x
  nbd-client -unix {sock or "<host> <port>"} -N demo-1 /dev/nbd0
  qemu-system-x86_64 -drive file={one},format=raw ...

Press Ctrl-C to stop.""",
            soft_wrap=True,
        )
        sys.stdout.flush()

    raise typer.Exit(server.run(cfg, ready))


@app.command()
def check(
    repair: Annotated[bool, typer.Option("--repair", help="Fix what can be fixed without guessing.")] = False,
    store: StoreOpt = _DEFAULT_STORE,
    as_json: JsonOpt = False,
) -> None:
    """Verify the store: catalog, pointers, version maps, every chunk against its digest, clones' states and
    overlays, orphans and leftovers of killed commands. Exits 1 if anything is still wrong."""
    from nbdclone.store.check import check as check_store

    report = check_store(Store(store), repair=repair)
    if as_json:
        _print_json(report.as_dict())
    else:
        counted = ", ".join(f"{n} {what}" for what, n in report.checked.items())
        if not report.findings:
            out.print(f"store {store} is whole: checked {counted}", soft_wrap=True)
        else:
            table = Table("FILE", "PROBLEM", "AFFECTS", "DONE / TO DO", box=None)
            for f in report.findings:
                table.add_row(f.path, f.problem, f.affects, f"repaired: {f.repaired}" if f.repaired else f.needs)
            out.print(table)
            left = sum(1 for f in report.findings if not f.repaired)
            out.print(f"checked {counted}: {len(report.findings)} problem(s), {left} left")
    if not report.clean:
        raise typer.Exit(1)


def _when(iso: str) -> str:
    return iso[:16].replace("T", " ")


def _asdict(record: Any) -> dict[str, Any]:
    return {name: getattr(record, name) for name in record.__slots__}


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="nbdclone: %(message)s")
    os.umask(0o077)  # the store is private: every file and folder nbdclone makes is its owner's only
    try:
        code = app(standalone_mode=False)
    except errors.NbdcloneError as exc:
        err.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        sys.exit(1)
    except typer.TyperException as exc:
        # Usage errors: one line naming the problem, and where to look (typer would print a panel).
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            out.print(ctx.get_help())
            sys.exit(0)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        err.print(f"[red]error:[/red] {exc.format_message()}{hint}", soft_wrap=True)
        sys.exit(2 if ctx is not None else 1)
    except typer.Abort:
        err.print("[red]aborted[/red]")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
