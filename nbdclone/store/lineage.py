"""A clone's lineage: publishing it as a version of a base, its snapshots, clones of it, flatten, resize.

Every operation here is one of two moves on a closed clone, under chunks.writer() and the store's lock
(a server's first open takes that lock shared, so no client can open the clone meanwhile):

    capture   the clone's contents now (its version + its overlay, as a client reads them) become a new
              version map: a copy of its version's map, with only the chunks holding a block the clone
              wrote (or zeroed) read, merged and stored. Work is proportional to what the clone changed,
              not to the disk's size; a chunk the store already holds (any version's) is shared.
    switch    a clone moves onto a version of its own base (a base named by its id, see catalog.PRIVATE)
              with a fresh, empty overlay: its contents do not change, and reads stay one lookup (version
              map, then overlay), never a walk down a chain of snapshots.

    base publish NAME --from CLONE    capture, commit as the next version of NAME; the clone stays as it is
    clone snapshot CLONE SNAP         capture, commit as a version named SNAP of CLONE's own base, switch
    clone rollback CLONE SNAP         switch onto SNAP's version (writes since are dropped)
    clone flatten CLONE               capture, commit unnamed in its own base, switch: it no longer uses its
                                      base's version, which can then be removed
    clone resize CLONE SIZE           capture at SIZE (cut, or zeros past the old end), commit, switch
    clone create NEW --from CLONE[@SNAP]   capture CLONE (or copy SNAP's map) into NEW's own base

Order, and what a crash leaves (the clone's contents are the same before and after every step):
    1. new chunks are written and synced into the pack (chunks.import_chunks)
    2. the version's map is written and synced (VersionMap.save), then the catalog names the version and
       holds the clone's new record (base: its own, pin: the version), in one atomic catalog write
    3. the clone's state.json switches to a new empty overlay on that version (one atomic rename), and the
       old overlay is deleted
A crash after 2 leaves the old state, which names its base by id, so the old overlay on the old version is
still what is read; the next first open (or a reset) sees the state is not where the catalog points and
switches, dropping the overlay, whose writes the new version holds. States written before clones could
change base name none; one is rewritten with its base's id before step 2.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from typing import TYPE_CHECKING

from nbdclone import errors
from nbdclone.store._sealed import seal_json
from nbdclone.store.catalog import (
    BaseRecord,
    CloneRecord,
    VersionRecord,
    is_own_base,
    now,
    own_base_name,
    validate_name,
)
from nbdclone.store.chunks import CHUNK, VersionMap
from nbdclone.store.clone import Clone
from nbdclone.store.images import open_clone_readonly
from nbdclone.store.layout import crash_point, write_atomic

if TYPE_CHECKING:
    from nbdclone.store import Store

Progress = Callable[[int, int], None]


def _no_progress(done: int, total: int) -> None:
    pass


def publish_clone(
    store: Store, base: str, clone_name: str, progress: Progress = _no_progress, *, vid: str | None = None
) -> tuple[BaseRecord, str, int]:
    """Make clone `clone_name`'s contents the next version of base `base` (created if new), numbered `vid`
    if given (a fleet's number). Returns the base, the new version's id and how many chunks were stored."""
    validate_name("base", base)
    with store.chunks.writer(), store.lock():
        record = _closed(store, clone_name)
        vmap, written, source = _capture(store, record, progress=progress)
        base_record, vid = store.commit_version(base, vmap, source, written, vid=vid)
    return base_record, vid, written


def snapshot(store: Store, clone_name: str, snap: str, progress: Progress = _no_progress) -> tuple[str, int]:
    """Take snapshot `snap` of a closed clone. Returns its version id (in the clone's own base) and the
    chunks stored."""
    validate_name("snapshot", snap)
    with store.chunks.writer(), store.lock():
        record = _closed(store, clone_name)
        own = store.catalog().bases.get(own_base_name(record))
        if own is not None and own.snapshot(snap) is not None:
            raise errors.SnapshotExists(clone=clone_name, name=snap)
        vmap, written, source = _capture(store, record, progress=progress)
        vid = _switch(store, record, vmap, written, source, snapshot=snap)
    return vid, written


def snapshots(store: Store, clone_name: str) -> list[tuple[str, VersionRecord, bool]]:
    """(name, version, whether the clone's overlay started on it) of each snapshot, oldest first."""
    record = store.get_clone(clone_name)
    own = store.catalog().bases.get(own_base_name(record))
    if own is None:
        return []
    on = store.clone_on(record)
    return [(v.snapshot, v, on == (own.name, vid)) for vid, v in sorted(own.versions.items(), key=_num) if v.snapshot]


def rollback(store: Store, clone_name: str, snap: str) -> str:
    """Make a closed clone read as snapshot `snap` again; its writes since are dropped. Returns the version."""
    validate_name("snapshot", snap)
    with store.chunks.writer(), store.lock():
        record = _closed(store, clone_name)
        own = store.catalog().bases.get(own_base_name(record))
        vid = own.snapshot(snap) if own is not None else None
        if own is None or vid is None:
            raise errors.SnapshotNotFound(clone=clone_name, name=snap)
        _name_state_base(store, record)
        moved = replace(record, base=own.name, pin=vid, size=0)
        if moved != record:
            cat = store.catalog()
            store.write_catalog(replace(cat, clones={**cat.clones, record.name: moved}))
        store.start_overlay(moved, vid)
        _drop_unused(store, moved)
    return vid


def remove_snapshot(store: Store, clone_name: str, snap: str) -> int:
    """Forget snapshot `snap`; its version goes unless a clone still reads it (this one, or one made from
    it). Returns the bytes freed in the chunk pack."""
    validate_name("snapshot", snap)
    with store.chunks.writer(), store.lock():
        record = store.get_clone(clone_name)
        cat = store.catalog()
        own = cat.bases.get(own_base_name(record))
        vid = own.snapshot(snap) if own is not None else None
        if own is None or vid is None:
            raise errors.SnapshotNotFound(clone=clone_name, name=snap)
        unnamed = replace(own.versions[vid], snapshot="")
        own = replace(own, versions={**own.versions, vid: unnamed})
        store.write_catalog(replace(cat, bases={**cat.bases, own.name: own}))
        return _drop_unused(store, record)


def create_from(
    store: Store, name: str, source: str, *, readonly: bool = False, progress: Progress = _no_progress
) -> CloneRecord:
    """Create clone `name` whose contents start as clone SOURCE's now (it must be closed) or, for
    SOURCE@SNAP, as that snapshot's. The new clone reads a version of its own base: it does not depend on
    the source, which can be changed or removed."""
    validate_name("clone", name)
    src_name, sep, snap = source.partition("@")
    with store.chunks.writer(), store.lock():
        cat = store.catalog()
        if name in cat.clones:
            raise errors.CloneExists(name=name, store=store.path)
        src = store.get_clone(src_name)
        if sep:
            validate_name("snapshot", snap)
            own = cat.bases.get(own_base_name(src))
            vid = own.snapshot(snap) if own is not None else None
            if own is None or vid is None:
                raise errors.SnapshotNotFound(clone=src_name, name=snap)
            vmap, written, label = store.version_map(own, vid).derived(), 0, f"snapshot {snap} of clone {src_name}"
        else:
            src = _closed(store, src_name)
            vmap, written, label = _capture(store, src, progress=progress)
        record = CloneRecord(name, uuid.uuid4().hex, None, "1", 0, now(), cat.next_seq(), readonly)
        record = replace(record, base=own_base_name(record))
        store.commit_version(record.base, vmap, label, written, owner=record.id, clones=(record,))  # type: ignore[arg-type]
    return record


def flatten(store: Store, clone_name: str, progress: Progress = _no_progress) -> str | None:
    """Make a closed clone independent of its base's version (which can then be removed): its contents
    become a version of its own base. Returns that version, or None if it had no base to leave."""
    with store.chunks.writer(), store.lock():
        record = _closed(store, clone_name)
        if record.base is None or is_own_base(record.base):
            return None  # blank, or reads its own versions already
        vmap, written, source = _capture(store, record, progress=progress)
        return _switch(store, record, vmap, written, source)


def resize(store: Store, clone_name: str, size: int, *, shrink: bool = False, progress: Progress = _no_progress) -> int:
    """Give a closed clone `size` bytes: the bytes past its old end read as zeros; shrinking (only with
    `shrink`) drops the bytes past the new end. Returns the old size."""
    with store.chunks.writer(), store.lock():
        record = _closed(store, clone_name)
        status = store.status(record)
        old = status.size
        if size == old:
            return old
        if size < old and not shrink:
            raise errors.InvalidArgument(
                detail=f"clone {clone_name!r} has {old} bytes: shrinking it to {size} drops the bytes past the "
                "new end; add --shrink to do that"
            )
        store.check_file_size(size)
        if record.base is None and size > old:
            # A blank clone's overlay holds nothing past its end (a shrink below makes it a clone of its
            # own version), so growing one is only its record.
            cat = store.catalog()
            store.write_catalog(replace(cat, clones={**cat.clones, clone_name: replace(record, size=size)}))
            return old
        vmap, written, source = _capture(store, record, size=size, progress=progress)
        _switch(store, record, vmap, written, f"{source}, resized to {size} bytes")
    return old


# -- the two moves ---------------------------------------------------------------------------------------


def _closed(store: Store, clone_name: str) -> CloneRecord:
    """The clone's record, checked closed (no server has it open). Caller holds the store's lock."""
    record = store.get_clone(clone_name)
    if store.is_open(record):
        raise errors.CloneInUse(name=clone_name)
    return record


def _capture(
    store: Store, record: CloneRecord, *, size: int | None = None, progress: Progress = _no_progress
) -> tuple[VersionMap, int, str]:
    """The clone's contents now, at `size` bytes (default: its size), as a new version map whose new chunks
    are stored. Returns the map, the chunks written and a description. Caller holds the locks."""
    state = store.clone_state(record)
    base_name, version = store.state_on(record, state) if state is not None else store.target_on(record)
    clone = open_clone_readonly(store, record.name)
    try:
        size = clone.size if size is None else size
        start = None  # a blank clone's version starts empty
        if base_name is not None and version is not None:
            start = store.version_map(store.get_base(base_name), version, digests=True).resized(size)
        stop = -(-size // CHUNK)
        changed = clone.changed_chunks(CHUNK)
        if size < clone.size and size % CHUNK:
            changed.add(size // CHUNK)  # the chunk the new end cuts: stored again, zeros past the end
        chunks = sorted(i for i in changed if i < stop)
        existing = list(store.all_version_maps(digests=True))
        vmap, written = store.chunks.import_chunks(
            _merged_chunks(clone, chunks, size, progress), size, existing, start=start
        )
    finally:
        clone.close()
        clone.base.close()
    source = f"clone {record.name}"
    if base_name is not None and not is_own_base(base_name):
        source += f" of {base_name}@{version}"
    return vmap, written, source


def _merged_chunks(
    clone: Clone, chunks: list[int], size: int, progress: Progress
) -> Iterator[tuple[int, bytes | None]]:
    """Each of `chunks` as a client reads it now (base under overlay), cut at `size`; progress in bytes."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    for k, i in enumerate(chunks):
        n = max(0, min(CHUNK, clone.size - i * CHUNK, size - i * CHUNK))
        clone.pread_into(view[:n], i * CHUNK)
        yield i, bytes(view[:n])
        progress((k + 1) * CHUNK, len(chunks) * CHUNK)


def _switch(
    store: Store, record: CloneRecord, vmap: VersionMap, written: int, source: str, *, snapshot: str = ""
) -> str:
    """Commit `vmap` as a version of the clone's own base and move the clone onto it with an empty overlay
    (steps 2 and 3 above). Returns the version. Caller holds the locks."""
    _name_state_base(store, record)
    own_name = own_base_name(record)
    own = store.catalog().bases.get(own_name)
    vid = str(own.next_version if own is not None else 1)
    moved = replace(record, base=own_name, pin=vid, size=0)
    crash_point("lineage-commit")
    _, committed = store.commit_version(
        own_name, vmap, source, written, owner=record.id, snapshot=snapshot, clones=(moved,)
    )
    assert committed == vid
    crash_point("lineage-switch")
    store.start_overlay(moved, vid)
    _drop_unused(store, moved)
    return vid


def _name_state_base(store: Store, record: CloneRecord) -> None:
    """A state from before clones could change base names none (it means the catalog's): write it again
    with its base's id, so that it still means its base after the catalog names another."""
    state = store.clone_state(record)
    if state is None or state.base is not None or state.version is None:
        return
    base = store.state_base(record, state)
    assert base is not None  # clone_state checked it
    directory = store.clone_dir(record)
    write_atomic(store.state_path(record), seal_json(asdict(replace(state, base=base.id))), directory)


def _drop_unused(store: Store, record: CloneRecord) -> int:
    """Remove the versions of the clone's own base nothing needs any more (the unnamed one it left). Returns
    the bytes freed. Caller holds the locks."""
    cat = store.catalog()
    own = own_base_name(record)
    dead = store.dead_versions(cat, store.version_users(cat), only=own)
    if not dead:
        return 0
    cat = store.drop_versions(cat, dead)
    return store.chunks.release_unused(store.all_version_maps(cat))


def _num(item: tuple[str, VersionRecord]) -> int:
    return int(item[0])
