"""nbdclone base ...: import, list, promote, publish, remove, gc and warm base versions."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from nbdclone import errors
from nbdclone.cli._common import (
    DEFAULT_STORE,
    BaseArg,
    BaseFilter,
    JsonOpt,
    StoreOpt,
    base_app,
    complete_base,
    done,
    host_of,
    human,
    open_store,
    out,
    print_json,
    progress_bar,
    record_dict,
    updater,
)
from nbdclone.store import Store, images, lineage
from nbdclone.store.catalog import BaseRecord, parse_base_ref
from nbdclone.store.chunks import CHUNK


@base_app.command("import")
def base_import(
    name: Annotated[str, typer.Argument(help="The base; created by its first import.")],
    source: Annotated[
        str,
        typer.Argument(
            help="A raw or qcow2 disk image or block device, an NBD URI (nbd://..., nbd+unix:///...) or the "
            "HTTP(S) URL of a raw image."
        ),
    ],
    allow_backing: Annotated[
        list[Path] | None,
        typer.Option(
            "--allow-backing",
            help="A backing file or external data file the qcow2 may read (repeat for a chain). "
            "Without it, an image that reads another file is refused.",
        ),
    ] = None,
    store: StoreOpt = DEFAULT_STORE,
    as_json: JsonOpt = False,
) -> None:
    """Add a raw or qcow2 image, a block device, an NBD export or a raw image on a web server as a new,
    immutable version of base NAME. Prints the version id last. Every source is streamed into the store
    in one pass: no temporary file, and holes and zero ranges are not read.

    Chunks the store already holds are not stored again. The first import makes its version current;
    later ones become current with 'nbdclone base promote'. The image is checked first: a damaged qcow2,
    or one that reads a file not named with --allow-backing, is refused.
    """
    host = host_of(store)
    st = host.store
    if allow_backing and (images.HTTP_URL.match(source) or images.NBD_URI.match(source)):
        raise errors.InvalidArgument(detail="--allow-backing is for qcow2 files, not URLs")
    with progress_bar() as bar:
        task = bar.add_task(f"importing {name}", total=None)
        report = updater(bar, task)

        def local_import(vid: str | None) -> str:
            if images.HTTP_URL.match(source):
                return images.import_url(st, name, source, report, vid=vid)[1]
            if images.NBD_URI.match(source):
                return images.import_nbd(st, name, source, report, vid=vid)[1]
            path = Path(source)
            return images.import_base(st, name, path, report, allow_backing=allow_backing or (), vid=vid)[1]

        vid = host.import_version(name, local_import)
    version = st.get_base(name).versions[vid]
    current = host.current(name)
    state = (
        "current" if current == vid else f"current is still {current}; flip with: nbdclone base promote {name} {vid}"
    )
    new = human(version.new_chunks * CHUNK)
    text = f"imported {name}@{vid}: {human(version.size)} from {source}, {new} new data ({state})\n{vid}"
    done(text, base=name, version=vid, size=version.size, new_chunks=version.new_chunks, current=current == vid)


@base_app.command("list")
def base_list(store: StoreOpt = DEFAULT_STORE, as_json: JsonOpt = False, base: BaseFilter = None) -> None:
    """List every version of every base: size, space shared with other versions and held only by it,
    which version is current, and how many clones use it."""
    st = open_store(store)
    if base is not None:
        st.get_base(base)
    rows = [record_dict(v) for v in st.version_stats() if not v.owner and (base is None or v.base == base)]
    if as_json:
        print_json(rows, items="versions")
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
    name: BaseArg,
    version: Annotated[str, typer.Argument(help="The version to make current (an older one: a rollback).")],
    wait_warm: Annotated[
        float | None,
        typer.Option(
            "--wait-warm",
            min=0.0,
            max=1.0,
            help="Fleet: first wait until this share of live hosts hold the version with its boot trace cached.",
        ),
    ] = None,
    wait_timeout: Annotated[float, typer.Option(help="Seconds --wait-warm waits at most.")] = 600.0,
    store: StoreOpt = DEFAULT_STORE,
    as_json: JsonOpt = False,
) -> None:
    """Make VERSION the current version of base NAME: every clone following NAME moves to it on its next
    first connection (dropping its writes), once no client may come back to the version it is on (its
    last connection closed while the server ran). One atomic rename, whatever the number of clones."""
    host = host_of(store)
    old = host.promote(name, version, wait_warm=wait_warm, wait_timeout=wait_timeout)
    now, wait = host.store.moves(name)
    text = (
        f"{name}: current version {old} -> {version}\n"
        f"{len(now)} clone(s) move at their next connection; {len(wait)} wait until their clients are gone"
        + (f" ({', '.join(wait[:10])}{', ...' if len(wait) > 10 else ''})" if wait else "")
    )
    done(text, base=name, old=old, current=version, moving=now, waiting=wait)


@base_app.command("publish")
def base_publish(
    name: BaseArg,
    clone: Annotated[str, typer.Option("--from", help="The clone whose contents become the new version.")],
    promote: Annotated[bool, typer.Option("--promote", help="Make the new version current too.")] = False,
    store: StoreOpt = DEFAULT_STORE,
    as_json: JsonOpt = False,
) -> None:
    """Make CLONE's contents (as a client reads them now) the next version of base NAME (a new base if NAME
    does not exist). Only the chunks the clone changed are read and stored. Refused while CLONE has clients."""
    host = host_of(store)
    st = host.store
    written = [0]
    with progress_bar() as bar:
        task = bar.add_task(f"publishing {clone}", total=None)

        def local_publish(vid: str | None) -> str:
            _, got, written[0] = lineage.publish_clone(st, name, clone, updater(bar, task), vid=vid)
            return got

        vid = host.import_version(name, local_publish)
    text = f"{name}: version {vid} from clone {clone} ({human(written[0] * CHUNK)} of new chunks stored)"
    done(text, base=name, version=vid, clone=clone, new_chunks=written[0])
    if promote:
        old = host.flip(name, vid)
        now, wait = st.moves(name)
        text = f"{name}: current version {old} -> {vid}; {len(now)} clone(s) move now, {len(wait)} wait"
        done(text, base=name, old=old, current=vid, moving=now, waiting=wait)
    if not done.as_json:
        out.print(vid)


@base_app.command("rm")
def base_rm(
    ref: Annotated[
        str,
        typer.Argument(metavar="NAME[@VERSION]", help="A base, or one version of it.", autocompletion=complete_base),
    ],
    wait: Annotated[
        float, typer.Option(help="Fleet: seconds to wait for every host to drop its copy.", min=0.0)
    ] = 30.0,
    store: StoreOpt = DEFAULT_STORE,
    as_json: JsonOpt = False,
) -> None:
    """Remove a base (refused while a clone uses it), or one version (refused if current or in use). On a
    fleet host, a version of a fleet base is removed from the fleet: no host may flip to it or make new
    clones of it, each host drops its copy once no clone there uses it, and then the fleet forgets it."""
    name, vid = parse_base_ref(ref)
    removed = host_of(store).remove_base(ref, wait)
    if not removed.fleet:
        done(f"removed {ref}; freed {human(removed.freed)}", base=name, version=vid, freed=removed.freed)
        return
    holders = list(removed.holders)
    if holders:
        text = (
            f"{ref} is being removed from fleet {removed.fleet}; host(s) {', '.join(holders)} still hold it\n"
            "it goes once their clones no longer use it ('nbdclone fleet status' shows it as retiring; "
            "a host gone for good: 'nbdclone fleet forget HOST')"
        )
    else:
        text = f"removed {ref} from fleet {removed.fleet}; 'nbdclone fleet gc' frees its chunks"
    done(text, base=name, version=vid, fleet=removed.fleet, holders=holders)


@base_app.command("gc")
def base_gc(store: StoreOpt = DEFAULT_STORE, as_json: JsonOpt = False) -> None:
    """Remove every version that is not current and used by no clone, and free the chunks nothing uses."""
    removed, freed = open_store(store).gc()
    done(f"removed {', '.join(removed) or 'no versions'}; freed {human(freed)}", removed=removed, freed=freed)


@base_app.command("warm")
def base_warm(
    ref: Annotated[
        str,
        typer.Argument(
            metavar="NAME[@VERSION]", help="A base (its current version) or a version.", autocompletion=complete_base
        ),
    ],
    store: StoreOpt = DEFAULT_STORE,
    as_json: JsonOpt = False,
) -> None:
    """Read a version's recorded boot trace into the shared read cache now, before a boot storm."""
    t = time.monotonic()
    which, nbytes = images.warm_version(open_store(store), ref)
    took = time.monotonic() - t
    done(f"warmed {which}: {human(nbytes)} in {took:.2f} s", version=which, bytes=nbytes, seconds=round(took, 3))


trace_app = typer.Typer(help="A version's boot trace: what its clones' first boot read, prefetched since.")
base_app.add_typer(trace_app, name="trace")


def _trace_of(st: Store, ref: str) -> tuple[BaseRecord, str, Path]:
    record, vid = st.resolve(ref)
    return record, vid, st.trace_path(record, vid)


@trace_app.command("show")
def trace_show(
    ref: Annotated[str, typer.Argument(metavar="NAME[@VERSION]", autocompletion=complete_base)],
    store: StoreOpt = DEFAULT_STORE,
    as_json: JsonOpt = False,
) -> None:
    """Show a version's boot trace: how many chunks and bytes each boot prefetches, and where they are."""
    from nbdclone.store.chunks import load_trace

    st = open_store(store)
    record, vid, path = _trace_of(st, ref)
    trace = load_trace(path)
    runs: list[tuple[int, int]] = []  # (offset, length) of each run of chunks read one after another
    for chunk in trace:
        if runs and runs[-1][0] + runs[-1][1] == chunk * CHUNK:
            runs[-1] = (runs[-1][0], runs[-1][1] + CHUNK)
        else:
            runs.append((chunk * CHUNK, CHUNK))
    info = {
        "base": record.name,
        "version": vid,
        "recorded": bool(trace),
        "chunks": len(trace),
        "bytes": len(trace) * CHUNK,
    }
    if as_json:
        print_json({**info, "ranges": runs})
        return
    if not trace:
        out.print(f"{record.name}@{vid} has no boot trace: its next first boot records one")
        return
    out.print(
        f"{record.name}@{vid}: {len(trace)} chunks ({human(len(trace) * CHUNK)}) in {len(runs)} ranges, in boot order"
    )
    for off, length in runs[:10]:
        out.print(f"  {human(off)} +{human(length)}")


@trace_app.command("clear")
def trace_clear(
    ref: Annotated[str, typer.Argument(metavar="NAME[@VERSION]", autocompletion=complete_base)],
    store: StoreOpt = DEFAULT_STORE,
    as_json: JsonOpt = False,
) -> None:
    """Forget a version's boot trace (here, and in the fleet): its next first boot records a new one."""
    host = host_of(store)
    record, vid = host.store.resolve(ref)
    host.clear_trace(record.name, vid)
    text = f"{record.name}@{vid}: boot trace cleared; the next first boot of a clone records one"
    done(text, base=record.name, version=vid)


@trace_app.command("record")
def trace_record(
    ref: Annotated[str, typer.Argument(metavar="NAME[@VERSION]", autocompletion=complete_base)],
    store: StoreOpt = DEFAULT_STORE,
    as_json: JsonOpt = False,
) -> None:
    """Record a version's boot trace again: the next first connection of one of its clones (a server
    restart or every clone closed) records it, for 30 s. A client that reads most of the disk (a copy, a
    check) is not taken for a boot."""
    trace_clear(ref, store)
