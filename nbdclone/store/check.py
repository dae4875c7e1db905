"""`nbdclone check`: verify a whole store, say what is wrong and what it touches, and, with repair, fix what
can be fixed without guessing.

What is checked, in order (each step trusts only what the steps before it verified):
    catalog       catalog.json and its mirror: checksums, one readable
    bases         each base's folder, current pointer (checksum, names a version), each version's map
                  (checksum, size, slots inside the pack), its boot trace (checksum)
    chunks        every chunk a version holds, read from the pack, against its content digest (a fleet
                  host's chunks staged but not fetched yet are counted: they are fetched when read)
    clones        each clone's state.json (checksum, names its base's version and an overlay that exists),
                  its overlay: RocksDB opens and every entry reads (RocksDB checks its block checksums),
                  the data file holds every block the map says it does
    orphans       folders of clones and bases the catalog does not name, overlays no state names
    leftovers     work files of killed commands in STORE/tmp

Repairs (only with --repair, each reported): the catalog or its mirror rewritten from the good copy; a
clone's state.json rebuilt from the origin record of its only overlay; a damaged boot trace removed (the
next boot records again); orphans and leftovers removed. Nothing the catalog does not vouch for is trusted,
and nothing is removed on the strength of a damaged record: a damaged pointer, map, chunk or overlay is
reported for the operator (re-import, promote, reset), never "fixed".

The catalog kept may not be the newest: catalog.json damaged (the mirror may be a generation behind it),
or a mirror of a later generation than catalog.json (something else wrote one of them). Then a record the
repair cannot read may name what looks orphaned: the damaged catalog.json and every orphan are moved to
quarantine/STAMP/ (renames: no space needed), the chunks their maps name are kept, and the check says so
until `--purge` empties it, once the operator has looked.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nbdclone import errors
from nbdclone.store import Store
from nbdclone.store._datafile import NAME as DATA_FILE
from nbdclone.store._rocks import RocksOverlay, overlay_in_use
from nbdclone.store._sealed import seal_json
from nbdclone.store.cache import digest
from nbdclone.store.catalog import Catalog, load_catalog, load_state
from nbdclone.store.chunks import CHUNK, VersionMap, load_trace
from nbdclone.store.layout import ORIGIN, STATE, write_atomic


@dataclass(slots=True)
class Finding:
    path: str  # the file or folder
    problem: str
    affects: str  # what fails because of it: "store", "base deb@2", "clone vm1", "space only"
    repaired: str = ""  # what --repair did about it
    needs: str = ""  # what the operator must do, if --repair cannot

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(slots=True)
class Report:
    findings: list[Finding] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        """Nothing is wrong any more (everything found was repaired)."""
        return all(f.repaired for f in self.findings)

    def as_dict(self) -> dict[str, Any]:
        return {"clean": self.clean, "checked": self.checked, "findings": [f.as_dict() for f in self.findings]}


def check(store: Store, *, repair: bool = False, purge: bool = False) -> Report:
    """Verify `store` (see the module docstring); with `repair`, fix what can be fixed without guessing;
    with `purge`, first empty the quarantine."""
    report = Report()
    with store.chunks.writer(), store.lock(repair=True):  # nothing changes under the check (a server may still run)
        if purge:
            for folder in store.purge_quarantine():
                report.findings.append(Finding(str(folder), "held in quarantine", "space only", repaired="removed"))
        checked = _check_catalog(store, report, repair)
        if checked is None:
            return report
        cat, newest, aside = checked
        maps = _check_bases(store, cat, report, repair)
        _check_chunks(store, cat, maps, report)
        _check_clones(store, cat, report, repair)
        _check_orphans(store, cat, report, repair, newest=newest, aside=aside)
        _check_leftovers(store, report, repair)
        _check_quarantine(store, report)
    return report


def _check_catalog(store: Store, report: Report, repair: bool) -> tuple[Catalog, bool, Path | None] | None:
    """The catalog to check the store against, whether it is surely the newest record (no damaged
    catalog.json, no mirror of a later generation), and the quarantine folder the repair moved a copy to."""
    main = mirror = None
    for path in (store.catalog_path, store.mirror_path):
        try:
            loaded = load_catalog(path)
        except FileNotFoundError:
            continue
        except errors.Damaged as exc:
            report.findings.append(Finding(str(path), exc.fields["detail"], "store"))
            continue
        if path == store.catalog_path:
            main = loaded
        else:
            mirror = loaded
    report.checked["catalogs"] = 1
    if main is None and mirror is None:
        if store.catalog_path.exists() or store.mirror_path.exists():
            report.findings[-1].needs = "restore catalog.json from a backup: both copies are damaged"
            return None
        return Catalog(), True, None  # an empty store
    good = main if main is not None else mirror
    assert good is not None
    newest = main is not None and (mirror is None or mirror.generation <= main.generation)
    aside = None
    if main is None or mirror is None or main != mirror:
        target = store.mirror_path if main is not None else store.catalog_path
        finding = next((f for f in report.findings if f.path == str(target)), None)
        if finding is None:
            problem = "it is missing" if not target.exists() else "it differs from the catalog"
            finding = Finding(str(target), problem, "store" if target == store.catalog_path else "space only")
            report.findings.append(finding)
        if repair:
            # The copy about to be overwritten goes aside if it may be newer than the one kept: a mirror
            # of a later generation, or a damaged catalog.json while something on disk only it can name.
            keep = not newest and target.exists() and (main is not None or bool(store.orphans(good)))
            aside = store.quarantine([target]) if keep else None
            text = seal_json(good.to_json())
            write_atomic(store.catalog_path, text, store.tmp)
            write_atomic(store.mirror_path, text, store.tmp)
            finding.repaired = "rewritten from the good copy" + (f" (the other one moved to {aside})" if aside else "")
        else:
            finding.needs = "nbdclone check --repair"
    return good, newest, aside


def _check_bases(store: Store, cat: Catalog, report: Report, repair: bool) -> dict[tuple[str, str], VersionMap]:
    maps: dict[tuple[str, str], VersionMap] = {}
    nslots = store.chunks.nslots()
    for base in cat.bases.values():
        try:
            if not base.owner:  # a clone's own base has no pointer: its clone is pinned to a version
                store.current_version(base)
        except errors.Damaged as exc:
            report.findings.append(
                Finding(
                    str(exc.fields["path"]),
                    exc.fields["detail"],
                    f"base {base.name}: its following clones cannot open",
                    needs=f"nbdclone base promote {base.name} VERSION",
                )
            )
        for vid, version in base.versions.items():
            ref = f"{store.base_label(cat, base.name)}@{vid}"
            path = store.map_path(base, vid)
            report.checked["versions"] = report.checked.get("versions", 0) + 1
            try:
                vmap = VersionMap.load(path, digests=True)
            except FileNotFoundError:
                report.findings.append(Finding(str(path), "it is missing", f"base {ref}", needs=_reimport(ref)))
                continue
            except errors.Damaged as exc:
                report.findings.append(Finding(str(path), exc.fields["detail"], f"base {ref}", needs=_reimport(ref)))
                continue
            used = vmap.used_slots()
            if vmap.size != version.size or (used and max(used) >= nslots):
                problem = (
                    f"it is {vmap.size} bytes, the catalog says {version.size}"
                    if vmap.size != version.size
                    else f"it names chunk {max(used)}, past the end of the pack ({nslots} chunks)"
                )
                report.findings.append(Finding(str(path), problem, f"base {ref}", needs=_reimport(ref)))
                continue
            maps[(base.name, vid)] = vmap
            trace = store.trace_path(base, vid)
            try:
                load_trace(trace, strict=True)
            except errors.Damaged as exc:
                finding = Finding(str(trace), exc.fields["detail"], "boot prefetch only")
                if repair:
                    trace.unlink(missing_ok=True)
                    finding.repaired = "removed: the next boot records a new one"
                else:
                    finding.needs = "nbdclone check --repair"
                report.findings.append(finding)
    return maps


def _reimport(ref: str) -> str:
    return f"import its image again as a new version and move {ref}'s clones to it, then base rm {ref}"


def _check_chunks(store: Store, cat: Catalog, maps: dict[tuple[str, str], VersionMap], report: Report) -> None:
    users: dict[int, tuple[bytes, list[str]]] = {}
    for (name, vid), vmap in maps.items():
        for _, slot, key in vmap.stored():
            users.setdefault(slot, (key, []))[1].append(f"{name}@{vid}")
    report.checked["chunks"] = len(users)
    if not users:
        return
    buf = bytearray(CHUNK)
    remote = store.chunks.remote.load()  # a fleet host's slots staged but not fetched yet (remote.py)
    with open(store.chunks.pack, "rb", buffering=0) as pack:
        for slot in sorted(users):
            key, refs = users[slot]
            n = pack.readinto(memoryview(buf)) if pack.seek(slot * CHUNK) == slot * CHUNK else 0
            if n == CHUNK and digest(buf) == key:
                continue
            if slot in remote:  # staged, fetched when first read
                report.checked["chunks to fetch from the fleet"] = (
                    report.checked.get("chunks to fetch from the fleet", 0) + 1
                )
            else:
                problem = f"chunk {slot} ({'short' if n != CHUNK else 'does not match its digest'})"
                report.findings.append(
                    Finding(
                        str(store.chunks.pack),
                        problem,
                        "base " + ", ".join(sorted(set(refs))),
                        needs="; ".join(_reimport(r) for r in sorted(set(refs))),
                    )
                )


def _check_clones(store: Store, cat: Catalog, report: Report, repair: bool) -> None:
    for clone in cat.clones.values():
        report.checked["clones"] = report.checked.get("clones", 0) + 1
        directory = store.clone_dir(clone)
        what = f"clone {clone.name}"
        try:
            state = store.clone_state(clone)
        except errors.Damaged as exc:
            finding = Finding(str(exc.fields["path"]), exc.fields["detail"], what)
            report.findings.append(finding)
            origin = _only_origin(directory)
            if origin is None:
                finding.needs = f"restore {directory}/state.json from a backup, or nbdclone clone reset {clone.name}"
                continue
            if not repair:
                finding.needs = "nbdclone check --repair (its overlay's origin record says where it is)"
                continue
            write_atomic(directory / STATE, seal_json(asdict(origin)), directory)
            finding.repaired = f"rebuilt from {origin.overlay}/{ORIGIN} (version {origin.version})"
            state = origin
        if state is None:
            continue
        overlay = store.overlay_path(clone, state)
        if not overlay.is_dir():
            report.findings.append(
                Finding(str(overlay), "its overlay is missing", what, needs=f"nbdclone clone reset {clone.name}")
            )
            continue
        if overlay_in_use(overlay):
            report.checked["open clones (overlay not read)"] = (
                report.checked.get("open clones (overlay not read)", 0) + 1
            )
            continue
        problem = _overlay_problem(overlay, repair)
        if problem is not None:
            report.findings.append(
                Finding(
                    problem[0],
                    problem[1],
                    what,
                    needs=f"export what it still reads (nbdclone clone export), then nbdclone clone reset {clone.name}",
                )
            )


def _only_origin(directory: Path) -> Any:
    """The origin record of the clone's only overlay whose record is whole, if there is exactly one."""
    found = []
    for sub in directory.iterdir() if directory.is_dir() else ():
        with contextlib.suppress(errors.Damaged):
            origin = load_state(sub / ORIGIN) if sub.is_dir() else None
            if origin is not None and origin.overlay == sub.name:
                found.append(origin)
    return found[0] if len(found) == 1 else None


def _overlay_problem(path: Path, repair: bool) -> tuple[str, str] | None:
    """(file, problem) if the overlay does not open or read whole; RocksDB checks its own checksums. With
    `repair` it is opened for writing: after an unclean stop, that open scrubs the regions marked then (I7 in
    docs/overlay.md); a block anywhere else that does not hold what its entry names is named, never adopted."""
    try:
        overlay = RocksOverlay(path, readonly=not repair)
    except errors.NbdcloneError as exc:
        return str(exc.fields.get("path") or path), str(exc.fields.get("detail") or exc)
    try:
        bad = overlay.verify_data()  # one pass over every block the map holds
        if bad:
            shown = ", ".join(str(b) for b in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            return str(path / DATA_FILE), f"{len(bad)} block(s) do not hold what the map fingerprints: {shown}"
    except errors.NbdcloneError as exc:
        return str(exc.fields.get("path") or path), str(exc)
    except Exception as exc:  # RocksDB reports corruption as its own exception type
        return str(path), f"its block map does not read: {exc}"
    finally:
        overlay.close()
    return None


def _check_orphans(
    store: Store, cat: Catalog, report: Report, repair: bool, *, newest: bool, aside: Path | None
) -> None:
    """Orphans: removed by a repair if the catalog is surely the newest record, else moved aside (to
    `aside`, if the catalog's repair made that folder)."""
    found = store.orphans(cat)
    if repair and not newest:
        aside = store.quarantine([path for path, _ in found], aside)
    for path, problem in found:
        finding = Finding(str(path), problem, "space only")
        if aside is not None:
            finding.affects = "whatever a newer catalog than the one kept names"
            finding.repaired = f"moved to {aside}: a record the repair could not read may name it"
        elif repair:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            finding.repaired = "removed"
        elif newest:
            finding.needs = "nbdclone check --repair, or nbdclone base gc"
        else:
            finding.needs = "nbdclone check --repair (moves it to quarantine/: a newer catalog may name it)"
        report.findings.append(finding)


def _check_quarantine(store: Store, report: Report) -> None:
    """What a repair moved aside waits for the operator: reported until `check --purge`."""
    for folder in store.quarantined():
        report.findings.append(
            Finding(
                str(folder),
                "moved aside by a repair: a catalog it could not read may name what it holds",
                "what a newer catalog named (its chunks are kept)",
                needs="look at it (each item is at its path under the store); then nbdclone check --purge",
            )
        )


def _check_leftovers(store: Store, report: Report, repair: bool) -> None:
    left = store.remove_leftovers() if repair else store.leftovers()
    for path in left:
        report.findings.append(
            Finding(
                str(path),
                "a work file of a command that was killed",
                "space only",
                repaired="removed" if repair else "",
                needs="" if repair else "nbdclone check --repair, or nbdclone base gc",
            )
        )
