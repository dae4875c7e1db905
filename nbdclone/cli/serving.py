"""nbdclone serve, demo, uri, reload, stats, systemd-units: running the server and looking at it."""

from __future__ import annotations

import enum
import json
import logging
import os
import re
import signal
import sys
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from nbdclone import errors, libvirt
from nbdclone.cli._common import (
    DEFAULT_STORE,
    CloneArg,
    JsonOpt,
    StoreOpt,
    app,
    done,
    err,
    human,
    open_store,
    out,
    parse_size,
    print_json,
)
from nbdclone.runtime import SLOTS, Address, RunDir
from nbdclone.store import images
from nbdclone.store.cache import resident_bytes
from nbdclone.store.catalog import slot_of
from nbdclone.supervisor import metrics as metrics_view
from nbdclone.supervisor import server
from nbdclone.supervisor.sockets import Access
from nbdclone.worker.process import LATENCY_BUCKETS

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
    """HOST:PORT (a PORT alone, or :PORT, is on 127.0.0.1)."""
    host, sep, port = text.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536 or (not sep and option != "--metrics"):
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


def _clone_address(store: Path, socket: Path | None, listen: str | None, name: str) -> tuple[Address, int]:
    """Where clone `name` is served: the given address, else the running server's, else the last one's."""
    st = open_store(store)
    st.get_clone(name)
    return _address(store, socket, listen) or server.address_of(st), slot_of(st.catalog(), name)


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


class DiskForm(enum.StrEnum):
    auto = "auto"
    disk = "disk"
    qemu_commandline = "qemu-commandline"


class LogLevel(enum.StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


def _token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise errors.InvalidArgument(detail=f"--metrics-token-file {path}: {exc}") from None
    if not token or any(c.isspace() for c in token):
        raise errors.InvalidArgument(detail=f"--metrics-token-file {path}: needs one token, with no spaces")
    return token


def _mode(text: str) -> int:
    if not re.fullmatch(r"0?[0-7]{3}", text):
        raise errors.InvalidArgument(detail=f"invalid --socket-mode {text!r}: use an octal mode like 0660")
    mode = int(text, 8)
    if mode & 0o111 or not mode & 0o200:
        raise errors.InvalidArgument(detail=f"--socket-mode {text}: the owner needs write (0600 and up, no x bits)")
    return mode


#: Where `serve` reads its options when no --config is given (only if the file exists).
DEFAULT_CONFIG = Path("/etc/nbdclone/serve.toml")


def _load_config(ctx: typer.Context, value: Path | None) -> Path | None:
    """--config FILE (else DEFAULT_CONFIG if present), taken first (eager): its `option = value` lines (names
    as on the command line, without the dashes; a list for a repeatable option) become click's default_map,
    so flags and environment variables win over the file and the file over the defaults. A name the command
    does not have, or a file that is not TOML, is refused in one line before anything runs."""
    path = value if value is not None else (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    if path is None:
        return value
    try:
        values = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise errors.InvalidArgument(detail=f"config file {path}: {exc}") from None
    names = {p.name for p in ctx.command.params} - {"config"}
    for key in values:
        if key.replace("-", "_") not in names:
            raise errors.InvalidArgument(detail=f"config file {path}: {ctx.info_name} has no option {key!r}")
    ctx.default_map = {**{k.replace("-", "_"): v for k, v in values.items()}, **(ctx.default_map or {})}
    return value


@app.command()
def serve(
    store: StoreOpt = DEFAULT_STORE,
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
        typer.Option(
            help="Only these clients: addresses or networks (10.0.0.0/8, fd00::/8) with --listen, uid:N or gid:N "
            "on Unix sockets; repeatable."
        ),
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
    metrics: Annotated[
        str | None, typer.Option(help="Serve Prometheus metrics on [HOST:]PORT (/metrics; HOST: 127.0.0.1).")
    ] = None,
    metrics_names: Annotated[
        bool, typer.Option(help="Label metrics with clone names (--no-metrics-names: sums over all clones).")
    ] = True,
    metrics_token_file: Annotated[
        Path | None, typer.Option(help="A file holding a token every scrape must send (Authorization: Bearer).")
    ] = None,
    metrics_tls_cert: Annotated[
        Path | None, typer.Option(help="Serve metrics over HTTPS with this PEM certificate (chain).")
    ] = None,
    metrics_tls_key: Annotated[Path | None, typer.Option(help="The PEM private key of --metrics-tls-cert.")] = None,
    grace: Annotated[
        float, typer.Option(help="Seconds a worker may take to stop before it is killed.", min=0.1)
    ] = 10.0,
    log_level: Annotated[LogLevel, typer.Option(help="Least severe messages logged.")] = LogLevel.info,
    config: Annotated[
        Path | None,
        typer.Option(
            help='A TOML file of options (workers = 4, socket-group = "kvm", allow = [...]); flags win.',
            show_default=f"{DEFAULT_CONFIG} if it exists",
            is_eager=True,
            callback=_load_config,
        ),
    ] = None,
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
    metrics_tls = None
    if metrics_tls_cert is not None or metrics_tls_key is not None:
        if metrics_tls_cert is None or metrics_tls_key is None or metrics is None:
            raise errors.InvalidArgument(detail="--metrics-tls-cert and --metrics-tls-key go together, with --metrics")
        metrics_view.tls_context(metrics_tls_cert, metrics_tls_key)  # a bad pair is refused now
        metrics_tls = (metrics_tls_cert.absolute(), metrics_tls_key.absolute())
    mode = _mode(socket_mode) if socket_mode else (0o660 if socket_group else 0o600)
    access = Access(mode, socket_group)
    access.gid  # noqa: B018 - an unknown group is refused now, not after the sockets exist
    security = server.Security(
        tls.value,
        tls_certificates,
        tls_psk,
        server.allow_rules(allow or [], listen is not None),
        max_connections,
        max_client_connections,
        handshake_timeout,
        exclusive,
        read_only,
    )
    base_cfg = _serve_config(store, socket, listen, workers, threads)
    cfg = replace(
        base_cfg,
        address=replace(base_cfg.where, tls=tls != Tls.off),  # (its URIs say nbds)
        pin=pin,
        cache_size=parse_size(cache_size),
        access=access,
        security=security,
        metrics=_host_port(metrics, "--metrics") if metrics else None,
        metrics_names=metrics_names,
        metrics_token=_token(metrics_token_file) if metrics_token_file else None,
        metrics_tls=metrics_tls,
        grace=grace,
        log_level=log_level.value,
    )
    _log_to_journal(log_level.value)

    def ready(address: Address) -> None:
        n = len(open_store(store).catalog().clones)
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
    name: CloneArg,
    store: StoreOpt = DEFAULT_STORE,
    socket: SocketOpt = None,
    listen: ListenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print the NBD URI of clone NAME: the same with or without a server running, whatever its workers.

    Without --socket or --listen, the address is the running server's, or else the last server's."""
    address, slot = _clone_address(store, socket, listen, name)
    found = address.uri(slot, name)
    done(found, clone=name, uri=found)


@app.command()
def domxml(
    name: CloneArg,
    store: StoreOpt = DEFAULT_STORE,
    socket: SocketOpt = None,
    listen: ListenOpt = None,
    target: Annotated[str, typer.Option(help="The guest's device name (vda, vdb, ...).")] = "vda",
    reconnect_delay: Annotated[
        int, typer.Option(help="Seconds QEMU holds requests while the server is away; 0: none.", min=0)
    ] = 30,
    form: Annotated[
        DiskForm,
        typer.Option(
            help="auto: libvirt's <disk>, with <reconnect> if this host's libvirt takes it; disk: with <reconnect> "
            "(libvirt after 9.0); qemu-commandline: QEMU's own -blockdev with reconnect, for any libvirt (9.0)."
        ),
    ] = DiskForm.auto,
    as_json: JsonOpt = False,
) -> None:
    """Print what a libvirt domain needs to attach clone NAME, in the form this host's libvirt takes.

    Without --socket or --listen, the address is the running server's, or else the last server's."""
    if not re.fullmatch(r"[a-z]{2,4}[a-z]", target):
        raise errors.InvalidArgument(detail=f"invalid --target {target!r}: use a device name like vda")
    address, slot = _clone_address(store, socket, listen, name)
    if form == DiskForm.qemu_commandline:
        if not reconnect_delay:
            raise errors.InvalidArgument(detail="--form qemu-commandline is for a reconnect delay; it needs one")
        xml = libvirt.commandline_element(address, slot, name, target=target, reconnect_delay=reconnect_delay)
    else:
        takes = libvirt.takes_reconnect_delay() if form == DiskForm.auto and reconnect_delay else True
        if takes is False:
            reconnect_delay = 0
            err.print(
                "note: this host's libvirt has no <reconnect> for NBD disks: a reload or a worker's crash reaches "
                "the guest as an I/O error. --form qemu-commandline prints a disk with reconnect.",
                soft_wrap=True,
            )
        elif takes is None:
            err.print("note: no libvirt here; printed with <reconnect>, which libvirt 9.0 refuses", soft_wrap=True)
        xml = libvirt.disk_element(address, slot, name, target=target, reconnect_delay=reconnect_delay or None)
        form = DiskForm.disk
    if as_json:
        done("", clone=name, form=str(form), reconnect_delay=reconnect_delay, xml=xml)
    else:
        print(xml)


@app.command()
def reload(store: StoreOpt = DEFAULT_STORE, as_json: JsonOpt = False) -> None:
    """Restart the running server's workers one at a time (to load a new nbdclone): clients reconnect."""
    info = open_store(store).server_info()
    os.kill(int(info["pid"]), signal.SIGHUP)
    text = f"asked the server (pid {info['pid']}) to restart its {len(info['workers'])} worker(s)"
    done(text, pid=int(info["pid"]), workers=len(info["workers"]))


@app.command()
def stats(store: StoreOpt = DEFAULT_STORE, as_json: JsonOpt = False) -> None:
    """The running server: its shared read cache, its workers, and per clone the requests it served."""
    st = open_store(store)
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
        print_json(
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


#: What `systemd-units` writes: template -> where, under --dest (units) or --etc (the rest). The templates
#: name @NBDCLONE@ (this installation's), @STORE@, @USER@ and @GROUP@.
_SYSTEMD_FILES = {
    "nbdclone.service": "dest",
    "nbdclone.socket": "dest",
    "nbdclone.sysusers": "sysusers.d/nbdclone.conf",
    "nbdclone.tmpfiles": "tmpfiles.d/nbdclone.conf",
}


def _public_folder(path: Path) -> None:
    """Make `path` readable by all (the service's user reads its config) if it does not exist; our umask
    would make it private."""
    if not path.exists():
        _public_folder(path.parent)
        path.mkdir()
        path.chmod(0o755)


@app.command("systemd-units")
def systemd_units(
    dest: Annotated[Path, typer.Option(help="Folder for nbdclone.service and nbdclone.socket.")] = Path(
        "/etc/systemd/system"
    ),
    etc: Annotated[Path, typer.Option(help="Where sysusers.d/, tmpfiles.d/ and nbdclone/serve.toml go.")] = Path(
        "/etc"
    ),
    store: StoreOpt = Path("/var/lib/nbdclone"),
    group: Annotated[str, typer.Option(help="The group QEMU runs as (Debian: libvirt-qemu).")] = "libvirt-qemu",
    user: Annotated[str, typer.Option(help="The user the service runs as (made by systemd-sysusers).")] = "nbdclone",
    as_json: JsonOpt = False,
) -> None:
    """Write a hardened systemd service (Type=notify, its own user, no capability) and its socket unit for
    serving STORE with this installation's nbdclone, the sysusers.d and tmpfiles.d files that make its
    user and store, and an empty /etc/nbdclone/serve.toml for its options."""
    from importlib.resources import files

    Address(store.absolute()).check()
    templates = files("nbdclone") / "data" / "systemd"
    exe, path = str(Path(sys.argv[0]).absolute()), str(store.absolute())
    values = {"NBDCLONE": exe, "STORE": path, "GROUP": group, "USER": user}
    targets = {name: dest / name if where == "dest" else etc / where for name, where in _SYSTEMD_FILES.items()}
    config = etc / "nbdclone" / "serve.toml"
    for target in targets.values():
        if target.exists():
            raise errors.InvalidArgument(detail=f"{target} exists; remove it first")
    for name, target in targets.items():
        text = (templates / name).read_text()
        for key, value in values.items():
            text = text.replace(f"@{key}@", value)
        _public_folder(target.parent)
        target.write_text(text)
        target.chmod(0o644)
        done(f"wrote {target}", file=str(target))
    if not config.exists():
        _public_folder(config.parent)
        config.write_text(
            "# Options of 'nbdclone serve' (names as its flags, without the dashes); flags win.\n"
            '# workers = 2\n# cache-size = "2G"\n# exclusive = true\n# metrics = "127.0.0.1:9100"\n'
        )
        config.chmod(0o644)
        done(f"wrote {config}", file=str(config))
    done.note(
        "then: systemd-sysusers && systemd-tmpfiles --create && systemctl daemon-reload && "
        "systemctl enable --now nbdclone.socket nbdclone.service"
    )


@app.command("man-pages")
def man_pages(
    dest: Annotated[Path, typer.Option(help="Folder to write the pages to (a man1 folder).")],
    as_json: JsonOpt = False,
) -> None:
    """Write a man page for nbdclone and each of its commands (nbdclone-clone-create.1, ...), built from
    this installation's own help, to DEST (for example /usr/local/share/man/man1)."""
    from click_man.man import ManPage

    import nbdclone

    def write(command: Any, ctx: Any) -> None:
        page = ManPage(ctx.command_path)
        page.version = nbdclone.__version__
        page.short_help = command.get_short_help_str(limit=60)
        page.description = command.help or ""
        page.synopsis = " ".join(command.collect_usage_pieces(ctx))
        page.options = [p.get_help_record(ctx) for p in command.params if p.param_type_name == "option"]
        page.options = [o for o in page.options if o is not None]
        subcommands = getattr(command, "commands", {})
        page.commands = [(name, sub.get_short_help_str(limit=60)) for name, sub in subcommands.items()]
        target = dest / f"{ctx.command_path.replace(' ', '-')}.1"
        target.write_text(str(page))
        target.chmod(0o644)
        done(f"wrote {target}", file=str(target))
        for name, sub in subcommands.items():
            write(sub, sub.make_context(name, [], parent=ctx, resilient_parsing=True))

    root = typer.main.get_command(app)
    _public_folder(dest)
    write(root, root.make_context("nbdclone", [], resilient_parsing=True))


@app.command()
def demo(
    store: StoreOpt = DEFAULT_STORE,
    socket: SocketOpt = None,
    listen: ListenOpt = None,
) -> None:
    """Import the built-in demo base, make two clones of it, and serve them."""
    from nbdclone.demo import build_demo_image

    st = open_store(store)
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
