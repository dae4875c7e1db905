"""The nbdclone command line: parses, calls the core, turns errors into one line and an exit code.

Only this module prints.
"""

from __future__ import annotations

import enum
import json
import logging
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from nbdclone import errors
from nbdclone.store import images
from nbdclone.store._rocks import RocksOverlay, overlay_in_use
from nbdclone.store.catalog import Store, default_store
from nbdclone.supervisor import server

app = typer.Typer(
    help="Serve copy-on-write clones of read-only base images over NBD.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
base_app = typer.Typer(help="Import, list and remove base images.", no_args_is_help=True)
clone_app = typer.Typer(help="Create, inspect, reset, export and remove clones.", no_args_is_help=True)
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


def _progress(description: str) -> Progress:
    return Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    )


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


# -- bases ---------------------------------------------------------------------------------------------


@base_app.command("import")
def base_import(
    name: Annotated[str, typer.Argument(help="Name of the new base.")],
    source: Annotated[Path, typer.Argument(help="A raw or qcow2 disk image.")],
    store: StoreOpt = _DEFAULT_STORE,
) -> None:
    """Copy a raw or qcow2 disk image into the store as a read-only base. Holes stay holes."""
    st = Store(store)
    with _progress("importing") as bar:
        task = bar.add_task(f"importing {name}", total=None)
        record = images.import_base(st, name, source, lambda d, t: bar.update(task, completed=d, total=t))
    out.print(f"imported base {record.name}: {human(record.size)} from {source}")


@base_app.command("list")
def base_list(store: StoreOpt = _DEFAULT_STORE, as_json: JsonOpt = False) -> None:
    """List the bases of the store."""
    st = Store(store)
    cat = st.catalog()
    rows = []
    for rec in cat.bases.values():
        path = st.base_path(rec)
        allocated = path.stat().st_blocks * 512 if path.exists() else 0
        rows.append({**_asdict(rec), "allocated": allocated, "clones": len(cat.clones_of(rec.name))})
    if as_json:
        _print_json(rows)
        return
    table = Table("NAME", "SIZE", "ALLOCATED", "CLONES", "CREATED", "SOURCE", box=None)
    for r in rows:
        table.add_row(r["name"], human(r["size"]), human(r["allocated"]), str(r["clones"]), r["created"], r["source"])
    out.print(table)


@base_app.command("rm")
def base_rm(name: str, store: StoreOpt = _DEFAULT_STORE) -> None:
    """Remove a base. Refused while any clone uses it."""
    Store(store).remove_base(name)
    out.print(f"removed base {name}")


# -- clones --------------------------------------------------------------------------------------------


@clone_app.command("create")
def clone_create(
    name: Annotated[str, typer.Argument(help="Name of the new clone; also its NBD export name.")],
    base: Annotated[str | None, typer.Option(help="The base image the clone starts from.")] = None,
    size: Annotated[str | None, typer.Option(help="Size of a blank clone with no base, like 10G.")] = None,
    store: StoreOpt = _DEFAULT_STORE,
) -> None:
    """Create a clone of BASE (or a blank disk of SIZE)."""
    if (base is None) == (size is None):
        raise errors.InvalidArgument(detail="give exactly one of --base BASE or --size SIZE")
    record = Store(store).create_clone(name, base=base, size=parse_size(size) if size else None)
    what = f"of base {record.base}" if record.base else "(blank)"
    out.print(f"created clone {record.name} {what}: {human(record.size)}")


@clone_app.command("list")
def clone_list(store: StoreOpt = _DEFAULT_STORE, as_json: JsonOpt = False) -> None:
    """List the clones of the store."""
    st = Store(store)
    rows = []
    for rec in st.catalog().clones.values():
        path = st.clone_path(rec)
        disk = sum(f.stat().st_size for f in path.iterdir() if f.is_file()) if path.is_dir() else 0
        rows.append({**_asdict(rec), "overlay_disk_bytes": disk, "open": overlay_in_use(path)})
    if as_json:
        _print_json(rows)
        return
    table = Table("NAME", "BASE", "SIZE", "OVERLAY ON DISK", "OPEN", "CREATED", box=None)
    for r in rows:
        table.add_row(
            r["name"],
            r["base"] or "-",
            human(r["size"]),
            human(r["overlay_disk_bytes"]),
            "yes" if r["open"] else "no",
            r["created"],
        )
    out.print(table)


@clone_app.command("info")
def clone_info(name: str, store: StoreOpt = _DEFAULT_STORE, as_json: JsonOpt = False) -> None:
    """Show a clone: its base, bytes written and blocks held in its overlay."""
    st = Store(store)
    clone = images.open_clone_readonly(st, name)
    try:
        usage = clone.usage()
    finally:
        clone.close()
        clone.base.close()
    rec = st.get_clone(name)
    overlay = clone.overlay
    info = {
        **_asdict(rec),
        "bytes_written": usage.bytes_written,
        "data_blocks": usage.data_blocks,
        "zero_blocks": usage.zero_blocks,
        "block_size": 4096,
        "overlay_disk_bytes": overlay.disk_usage() if isinstance(overlay, RocksOverlay) else 0,
        "open": overlay_in_use(st.clone_path(rec)),
    }
    if as_json:
        _print_json(info)
        return
    table = Table(show_header=False, box=None)
    for key, value in info.items():
        table.add_row(key.replace("_", " "), str(value))
    out.print(table)


@clone_app.command("reset")
def clone_reset(name: str, store: StoreOpt = _DEFAULT_STORE) -> None:
    """Drop every write of a clone: it reads as its base again."""
    Store(store).reset_clone(name)
    out.print(f"reset clone {name}: its writes are gone")


@clone_app.command("rm")
def clone_rm(name: str, store: StoreOpt = _DEFAULT_STORE) -> None:
    """Remove a clone and its writes."""
    Store(store).remove_clone(name)
    out.print(f"removed clone {name}")


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
    with _progress("exporting") as bar:
        task = bar.add_task(f"exporting {name}", total=None)
        images.export_clone(st, name, dest, fmt_lit, lambda d, t: bar.update(task, completed=d, total=t))
    out.print(f"exported clone {name} to {dest} ({fmt_lit})")


# -- serving -------------------------------------------------------------------------------------------

SocketOpt = Annotated[Path | None, typer.Option(help="Unix socket to listen on [default: STORE/run/nbdclone.sock].")]
ListenOpt = Annotated[str | None, typer.Option(help="Listen on TCP HOST:PORT instead of a Unix socket.")]


def _serve_config(store: Path, socket: Path | None, listen: str | None, threads: int) -> server.ServeConfig:
    if socket is not None and listen is not None:
        raise errors.InvalidArgument(detail="give --socket or --listen, not both")
    endpoint = None
    if listen is not None:
        host, sep, port = listen.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise errors.InvalidArgument(detail=f"invalid --listen {listen!r}: use HOST:PORT")
        endpoint = (host.strip("[]") or "127.0.0.1", int(port))
    return server.ServeConfig(store=store, socket=socket, listen=endpoint, threads=threads)


@app.command()
def serve(
    store: StoreOpt = _DEFAULT_STORE,
    socket: SocketOpt = None,
    listen: ListenOpt = None,
    threads: Annotated[int, typer.Option(help="nbdkit threads per connection.", min=1)] = 16,
) -> None:
    """Serve every clone of the store over NBD until SIGTERM or Ctrl-C."""
    cfg = _serve_config(store, socket, listen, threads)

    def ready(prefix: str) -> None:
        n = len(Store(store).catalog().clones)
        where = server.clone_uri(prefix, "NAME")
        out.print(f"nbdclone: serving {n} clone(s) of {cfg.store} at {where}", soft_wrap=True)
        sys.stdout.flush()

    raise typer.Exit(server.run(cfg, ready))


@app.command()
def uri(name: str, store: StoreOpt = _DEFAULT_STORE) -> None:
    """Print the NBD URI of clone NAME on the running server."""
    st = Store(store)
    st.get_clone(name)
    out.print(server.clone_uri(st.server_info()["uri"], name), soft_wrap=True)


@app.command()
def demo(
    store: StoreOpt = _DEFAULT_STORE,
    socket: SocketOpt = None,
    listen: ListenOpt = None,
) -> None:
    """Import the built-in demo base, make two clones of it, and serve them."""
    from nbdclone.demo import build_demo_image

    st = Store(store)
    cfg = _serve_config(store, socket, listen, 16)
    cat = st.catalog()
    if "demo" not in cat.bases:
        image = build_demo_image(st.new_tmp_file(".raw"))
        try:
            images.import_base(st, "demo", image)
        finally:
            image.unlink(missing_ok=True)
        out.print("imported the demo base 'demo' (64 MiB, ext4)")
    for clone in ("demo-1", "demo-2"):
        if clone not in st.catalog().clones:
            st.create_clone(clone, base="demo")
            out.print(f"created clone {clone}")

    def ready(prefix: str) -> None:
        one, two = (server.clone_uri(prefix, n) for n in ("demo-1", "demo-2"))
        sock = str(cfg.endpoint()[1]).partition("socket=")[2]
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


def _asdict(record: Any) -> dict[str, Any]:
    return {name: getattr(record, name) for name in record.__slots__}


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="nbdclone: %(message)s")
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
