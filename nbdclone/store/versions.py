"""Bases and versions: adding a version, the pointer flip, who uses what, and freeing space.

A flip (promote) writes one small file, bases/ID/current, by write_atomic: the versions, their maps and
the clones are untouched, so it costs the same for one clone or thousands. A version is removed from the
catalog first and its files after, so a crash leaves at worst files gc() recognises as orphans.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from dataclasses import replace
from pathlib import Path

from nbdclone import errors
from nbdclone.store._fs import fsync_dir
from nbdclone.store._rocks import overlay_in_use
from nbdclone.store._sealed import seal
from nbdclone.store.catalog import (
    BaseRecord,
    Catalog,
    CloneRecord,
    VersionRecord,
    VersionStats,
    now,
    own_base_name,
    parse_base_ref,
    read_state,
    validate_name,
)
from nbdclone.store.chunks import CHUNK, VersionMap
from nbdclone.store.clones import Clones
from nbdclone.store.layout import children, write_atomic

log = logging.getLogger(__name__)


class Versions(Clones):
    def add_version(
        self, name: str, vmap: VersionMap, source: str, new_chunks: int, *, vid: str | None = None
    ) -> tuple[BaseRecord, str]:
        """Commit an imported version of base `name` (created if new), numbered `vid` if given (a fleet's
        number). Caller holds chunks.writer()."""
        validate_name("base", name)
        with self.lock():
            record, vid = self.commit_version(name, vmap, source, new_chunks, vid=vid)
        log.info("imported version %s of base %s (%d bytes, %d new chunks)", vid, name, vmap.size, new_chunks)
        return record, vid

    def commit_version(
        self,
        name: str,
        vmap: VersionMap,
        source: str,
        new_chunks: int,
        *,
        owner: str = "",
        snapshot: str = "",
        clones: tuple[CloneRecord, ...] = (),
        vid: str | None = None,
    ) -> tuple[BaseRecord, str]:
        """Add `vmap` as the next version of base `name` (created, owned by clone id `owner`, if new), and
        write `clones`' records in the same catalog write. Order: the map is written and synced before
        the catalog names it. Caller holds chunks.writer() and lock()."""
        self._init_dirs()
        cat = self.catalog()
        record = cat.bases.get(name) or BaseRecord(name, uuid.uuid4().hex, now(), 1, {}, owner)
        if vid is None:
            vid = str(record.next_version)
        elif vid in record.versions:
            raise errors.NbdcloneError(detail=f"base {name} has a version {vid} already")
        self.base_dir(record).mkdir(exist_ok=True)
        vmap.save(self.map_path(record, vid))
        fsync_dir(self.base_dir(record))
        version = VersionRecord(vid, vmap.size, now(), source, new_chunks, snapshot)
        following = max(record.next_version, int(vid) + 1)
        record = replace(record, next_version=following, versions={**record.versions, vid: version})
        if name not in cat.bases and not owner:
            self._write_pointer(record, vid)
        updated = {c.name: c for c in clones}
        self.write_catalog(replace(cat, bases={**cat.bases, name: record}, clones={**cat.clones, **updated}))
        return record, vid

    def promote(self, name: str, vid: str) -> str:
        """Make `vid` the current version of base `name`: one atomic, durable rename. Returns the old one."""
        validate_name("base", name)
        with self.lock():
            record = self.get_base(name)
            record.version(vid, self.path)
            old = self.current_version(record)
            self._write_pointer(record, vid)
        return old

    def _write_pointer(self, record: BaseRecord, vid: str) -> None:
        write_atomic(self.pointer_path(record), seal(vid), self.base_dir(record), crash_hooks=True)

    def version_users(
        self, catalog: Catalog | None = None, *, skip_damaged: bool = False
    ) -> dict[tuple[str, str], list[str]]:
        """(base, version) -> the clones that use it: pinned to it, or with an overlay started on it. A
        clone whose records are damaged raises (nothing may be removed while what it uses is unknown),
        unless `skip_damaged` (for statistics)."""
        cat = catalog or self.catalog()
        users: dict[tuple[str, str], list[str]] = {}
        for clone in cat.clones.values():
            if clone.base is None:
                continue
            try:
                on = self.clone_on(clone)
            except errors.Damaged:
                if not skip_damaged:
                    raise
                continue
            for key in {(clone.base, clone.pin), on}:
                if key[0] is not None and key[1] is not None:
                    users.setdefault(key, []).append(clone.name)  # type: ignore[arg-type]
        return users

    def remove_clone(self, name: str) -> int:
        """Remove a clone, its overlay, and its own snapshots that no other clone was made from. Returns
        the bytes freed in the chunk pack."""
        with self.chunks.writer():
            with self.lock():
                record = self.get_clone(name)
                self._refuse_if_open(record)
                cat = self.catalog()
                cat = replace(cat, clones={n: r for n, r in cat.clones.items() if n != name})
                self.write_catalog(cat)
                shutil.rmtree(self.clone_dir(record), ignore_errors=True)
                own = own_base_name(record)
                if own not in cat.bases:
                    return 0
                cat = self.drop_versions(cat, self.dead_versions(cat, self.version_users(cat), only=own))
            return self.chunks.release_unused(self.all_version_maps(cat))

    def dead_versions(
        self, cat: Catalog, users: dict[tuple[str, str], list[str]], *, only: str | None = None
    ) -> dict[str, list[str]]:
        """base -> its versions nothing needs: not current (a base users name), not a snapshot of a clone
        that exists (a clone's own base), and used by no clone."""
        live_clones = {c.id for c in cat.clones.values()}
        dead: dict[str, list[str]] = {}
        for name, record in cat.bases.items():
            if only is not None and name != only:
                continue
            if record.owner:
                keep = {v for v, r in record.versions.items() if r.snapshot and record.owner in live_clones}
            else:
                keep = {self.current_version(record)}
            vids = [v for v in record.versions if v not in keep and (name, v) not in users]
            if vids:
                dead[name] = vids
        return dead

    def drop_versions(self, cat: Catalog, dead: dict[str, list[str]]) -> Catalog:
        """Remove `dead` versions from the catalog, then their files; a clone's own base left with no
        version goes too. Returns the new catalog. Caller holds chunks.writer() and lock(); the chunks are
        freed by release_unused after."""
        if not dead:
            return cat
        bases = dict(cat.bases)
        files: list[Path] = []
        folders: list[Path] = []
        for name, vids in dead.items():
            record = bases[name]
            left = {v: r for v, r in record.versions.items() if v not in vids}
            files += [p for v in vids for p in (self.map_path(record, v), self.trace_path(record, v))]
            if record.owner and not left:
                del bases[name]
                folders.append(self.base_dir(record))
            else:
                bases[name] = replace(record, versions=left)
        cat = replace(cat, bases=bases)
        self.write_catalog(cat)
        for path in files:
            path.unlink(missing_ok=True)
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
        return cat

    def version_stats(self) -> list[VersionStats]:
        """Every version with the space it shares with other versions and the space only it holds."""
        cat = self.catalog()
        users = self.version_users(cat, skip_damaged=True)
        maps: dict[tuple[str, str], set[int]] = {}
        damage: dict[tuple[str, str], str] = {}
        for b in cat.bases.values():
            for v in b.versions:
                try:
                    maps[(b.name, v)] = self.version_map(b, v, digests=False).used_slots()
                except (errors.Damaged, FileNotFoundError) as exc:
                    maps[(b.name, v)], damage[(b.name, v)] = set(), str(exc)
        owners = {c.id: c.name for c in cat.clones.values()}
        refs: dict[int, int] = {}
        for slots in maps.values():
            for slot in slots:
                refs[slot] = refs.get(slot, 0) + 1
        out = []
        for base in cat.bases.values():
            try:
                current: str | None = None if base.owner else self.current_version(base)
            except errors.Damaged as exc:
                current = None
                damage.update({(base.name, v): str(exc) for v in base.versions})
            for vid, rec in base.versions.items():
                slots = maps[(base.name, vid)]
                shared = sum(1 for s in slots if refs[s] > 1)
                out.append(
                    VersionStats(
                        base=base.name,
                        version=vid,
                        size=rec.size,
                        created=rec.created,
                        source=rec.source,
                        current=vid == current,
                        stored=len(slots) * CHUNK,
                        shared=shared * CHUNK,
                        unique=(len(slots) - shared) * CHUNK,
                        clones=len(users.get((base.name, vid), [])),
                        damaged=damage.get((base.name, vid), ""),
                        owner=owners.get(base.owner, "(removed)") if base.owner else "",
                        snapshot=rec.snapshot,
                    )
                )
        return out

    def remove_version(self, ref: str) -> int:
        """Remove one version (NAME@VERSION): refused if current or used. Returns the bytes freed."""
        name, vid = parse_base_ref(ref)  # a user's base: a clone's snapshots go with `clone snapshot rm`
        if vid is None:
            raise errors.InvalidArgument(detail=f"{ref!r} names no version; use NAME@VERSION, or base rm NAME")
        with self.chunks.writer():
            with self.lock():
                cat = self.catalog()
                record = self.get_base(name)
                record.version(vid, self.path)
                if vid == self.current_version(record):
                    raise errors.VersionInUse(name=name, version=vid, why="it is the current version")
                users = self.version_users(cat).get((name, vid))
                if users:
                    raise errors.VersionInUse(name=name, version=vid, why=f"clone(s) {', '.join(users)} use it")
                cat = self.drop_versions(cat, {name: [vid]})
            return self.chunks.release_unused(self.all_version_maps(cat))

    def remove_base(self, name: str) -> int:
        """Remove a base and all its versions; refused while any clone uses it. Returns the bytes freed."""
        validate_name("base", name)
        with self.chunks.writer():
            with self.lock():
                record = self.get_base(name)
                cat = self.catalog()
                users = cat.clones_of(name)
                if users:
                    raise errors.BaseInUse(name=name, clones=", ".join(users))
                cat = replace(cat, bases={n: r for n, r in cat.bases.items() if n != name})
                self.write_catalog(cat)
                shutil.rmtree(self.base_dir(record), ignore_errors=True)
            return self.chunks.release_unused(self.all_version_maps(cat))

    def gc(self) -> tuple[list[str], int]:
        """Remove every version that is not current and used by no clone, the leftovers of killed commands,
        and free the chunks nothing uses. Returns the removed NAME@VERSION and the bytes freed."""
        removed: list[str] = []
        with self.chunks.writer():
            with self.lock():
                cat = self.catalog()
                dead = self.dead_versions(cat, self.version_users(cat))
                removed = [f"{self.base_label(cat, n)}@{v}" for n, vids in dead.items() for v in vids]
                cat = self.drop_versions(cat, dead)
                self._remove_orphans(cat)
                self.remove_leftovers()
            return removed, self.chunks.release_unused(self.all_version_maps(cat))

    def base_label(self, cat: Catalog, name: str) -> str:
        """How a base is shown: its name, or for a clone's own base, "clone NAME" ("clone (removed)")."""
        owner = cat.bases[name].owner if name in cat.bases else ""
        if not owner:
            return name
        clone = next((c.name for c in cat.clones.values() if c.id == owner), "(removed)")
        return f"clone {clone}"

    def orphans(self, cat: Catalog) -> list[tuple[Path, str]]:
        """What commands that died half-way left, as (path, what it is): folders of clones and bases the
        catalog does not name, overlays no clone state names (and no server holds), files of versions the
        catalog does not have. A clone whose state is damaged keeps every overlay. Caller holds the locks."""
        found: list[tuple[Path, str]] = []
        live_clones = {c.id: c for c in cat.clones.values()}
        for directory in children(self.clones_dir):
            clone = live_clones.get(directory.name)
            if clone is None:
                found.append((directory, "a clone folder the catalog does not name"))
                continue
            try:
                state = read_state(directory)
            except errors.Damaged as exc:
                log.error("%s: keeping every overlay of that clone", exc)
                continue
            for sub in children(directory):
                if sub.is_dir() and (state is None or sub.name != state.overlay) and not overlay_in_use(sub):
                    found.append((sub, f"an overlay of clone {clone.name} that its state does not name"))
        live_bases = {b.id: b for b in cat.bases.values()}
        for directory in children(self.bases_dir):
            base = live_bases.get(directory.name)
            if base is None:
                found.append((directory, "a base folder the catalog does not name"))
                continue
            for f in children(directory):
                vid = f.name.split(".")[0]
                if f.suffix in (".map", ".trace") and vid not in base.versions:
                    ref = f"{self.base_label(cat, base.name)}@{vid}"
                    found.append((f, f"a file of version {ref}, which the catalog does not have"))
        return found

    def _remove_orphans(self, cat: Catalog) -> None:
        for path, _ in self.orphans(cat):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def moves(self, base: str) -> tuple[list[str], list[str]]:
        """The clones following `base` that are not on its current version: (move at their next connection,
        wait until their clients are gone)."""
        validate_name("base", base)
        record = self.get_base(base)
        current = self.current_version(record)
        now: list[str] = []
        wait: list[str] = []
        for clone in self.catalog().clones.values():
            if clone.base != base or clone.pin is not None:
                continue
            try:
                state = self.clone_state(clone)
            except errors.Damaged:
                wait.append(clone.name)  # it opens nowhere until repaired: nothing moves it
                continue
            if state is None or state.version == current:
                continue
            (wait if self.is_held(clone) or self.is_open(clone) else now).append(clone.name)
        return now, wait
