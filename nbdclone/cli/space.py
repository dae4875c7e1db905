"""nbdclone du, check: the store as a whole."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from nbdclone import errors
from nbdclone.cli._common import (
    DEFAULT_STORE,
    BaseFilter,
    JsonOpt,
    StoreOpt,
    app,
    human,
    open_store,
    out,
    print_json,
    record_dict,
)


@app.command()
def du(store: StoreOpt = DEFAULT_STORE, as_json: JsonOpt = False, base: BaseFilter = None) -> None:
    """Space at a glance: per base version, what it holds, shares and alone holds; per clone, what its
    writes take; and the store's totals on disk."""
    st = open_store(store)
    if base is not None:
        st.get_base(base)
    versions = [record_dict(v) for v in st.version_stats() if base is None or v.base == base]
    labels = {v["base"]: v["owner"] for v in versions if v["owner"]}  # clones' own versions: by clone name
    clones: list[dict[str, Any]] = []
    for rec in st.catalog().clones.values():
        if base is not None and rec.base != base:
            continue
        try:
            used, damaged = st.overlay_bytes(rec), ""
        except errors.NbdcloneError as exc:
            used, damaged = 0, str(exc)
        shown = None if rec.base in labels else rec.base
        clones.append({"name": rec.name, "base": shown, "overlay_disk_bytes": used, "damaged": damaged})
    pack = st.chunks.pack
    totals = {
        "chunks_disk_bytes": pack.stat().st_blocks * 512 if pack.exists() else 0,
        "overlays_disk_bytes": sum(c["overlay_disk_bytes"] for c in clones),
        "store_disk_bytes": sum(p.lstat().st_blocks * 512 for p in st.path.rglob("*") if not p.is_symlink()),
    }
    if as_json:
        print_json({"versions": versions, "clones": clones, "totals": totals})
        return
    table = Table("BASE", "VERSION", "HOLDS", "SHARED", "ONLY HERE", "CLONES", box=None)
    for v in versions:
        where = f"clone {v['owner']}" if v["owner"] else v["base"]
        what = f"snapshot {v['snapshot']}" if v["snapshot"] else v["version"]
        table.add_row(where, what, human(v["stored"]), human(v["shared"]), human(v["unique"]), str(v["clones"]))
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
def check(
    repair: Annotated[bool, typer.Option("--repair", help="Fix what can be fixed without guessing.")] = False,
    purge: Annotated[
        bool, typer.Option("--purge", help="First empty quarantine/: what earlier repairs moved aside.")
    ] = False,
    store: StoreOpt = DEFAULT_STORE,
    as_json: JsonOpt = False,
) -> None:
    """Verify the store: catalog, pointers, version maps, every chunk against its digest, clones' states and
    overlays, orphans and leftovers of killed commands. Exits 1 if anything is still wrong."""
    from nbdclone.store.check import check as check_store

    report = check_store(open_store(store), repair=repair, purge=purge)
    if as_json:
        print_json(report.as_dict())
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
