"""Clones: creating them, their overlays and the states that name them, and the operations that change a
clone while no client has it (reset, upgrade, rename, remove). A clone's live overlay is switched by one
atomic rename of its state.json, so a crash leaves the old or the new overlay, never neither.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
import uuid
from dataclasses import asdict, replace

from nbdclone import errors
from nbdclone.store._fs import fsync_dir
from nbdclone.store._rocks import create_overlay, overlay_in_use
from nbdclone.store._sealed import seal_json
from nbdclone.store.catalog import (
    CatalogStore,
    CloneRecord,
    CloneState,
    CloneStatus,
    is_own_base,
    now,
    parse_base_ref,
    validate_name,
)
from nbdclone.store.layout import ORIGIN, disk_bytes, write_atomic


class Clones(CatalogStore):
    def create_clones(
        self, names: list[str], *, base: str | None, size: int | None = None, readonly: bool = False
    ) -> list[CloneRecord]:
        """Create clones of `base` ('NAME' follows its current version, 'NAME@VERSION' pins one) or
        blank clones of `size`, served read-only if `readonly`. All or nothing. The overlay is made when the
        clone is first opened."""
        for name in names:
            validate_name("clone", name)
        if len(set(names)) != len(names):
            raise errors.InvalidArgument(detail="a clone name is given twice")
        if (base is None) == (size is None):
            raise errors.InvalidArgument(detail="a clone needs --base BASE or --size SIZE")
        with self.lock():
            self._init_dirs()
            cat = self.catalog()
            for name in names:
                if name in cat.clones:
                    raise errors.CloneExists(name=name, store=self.path)
            base_name, pin = (None, None)
            if base is not None:
                base_name, pin = parse_base_ref(base)
                self.resolve(base)
            if size is not None:
                self.check_file_size(size)
            seq = cat.next_seq()
            records = [
                CloneRecord(n, uuid.uuid4().hex, base_name, pin, size or 0, now(), seq + i, readonly)
                for i, n in enumerate(names)
            ]
            self.write_catalog(replace(cat, clones={**cat.clones, **{r.name: r for r in records}}))
        return records

    def check_file_size(self, size: int) -> None:
        """A clone's data file is laid out like its disk: refuse a size no file of the store can reach
        (ext4 stops at 16 TiB), which a server could open but never write to the end of."""
        if size <= 0 or size >= 1 << 63:
            raise errors.InvalidArgument(detail=f"clone size {size} is not between 1 byte and 8 EiB")
        probe = self.new_tmp_file(".size-probe")
        try:
            with open(probe, "wb") as f:
                f.truncate(size)
        except OSError as exc:
            if exc.errno not in (errno.EFBIG, errno.EINVAL):
                raise
            raise errors.InvalidArgument(
                detail=f"clone size {size} is more than the store's file system can hold in one file"
            ) from None
        finally:
            probe.unlink(missing_ok=True)

    def create_clone(self, name: str, *, base: str | None, size: int | None = None) -> CloneRecord:
        return self.create_clones([name], base=base, size=size)[0]

    def start_overlay(self, record: CloneRecord, version: str | None) -> CloneState:
        """Give the clone a new empty overlay on `version` and make it live; delete the old one.
        The switch is one atomic rename of state.json, so a crash leaves the old or the new overlay."""
        directory = self.clone_dir(record)
        directory.mkdir(parents=True, exist_ok=True)
        try:
            old = self.clone_state(record)  # checked: a damaged state names no overlay we may delete...
            dropped = [] if old is None else [directory / old.overlay]
        except errors.Damaged:  # ...so a reset of a damaged clone (the operator's call) drops every one
            dropped = [d for d in directory.iterdir() if d.is_dir() and not overlay_in_use(d)]
        base_id = self.get_base(record.base).id if record.base is not None and version is not None else None
        state = CloneState(version, uuid.uuid4().hex[:12], base_id)
        try:
            create_overlay(directory / state.overlay)
            write_atomic(directory / state.overlay / ORIGIN, seal_json(asdict(state)), directory / state.overlay)
        except BaseException:  # (a full disk: nothing names it yet, so nothing is left behind)
            shutil.rmtree(directory / state.overlay, ignore_errors=True)
            raise
        write_atomic(self.state_path(record), seal_json(asdict(state)), directory)
        for path in dropped:
            shutil.rmtree(path, ignore_errors=True)
        return state

    def rename_clone(self, old: str, new: str) -> CloneRecord:
        """Give clone `old` the name (and NBD export name) `new`. Its files are named by id and its slot
        by creation number, so only the catalog changes. Refused while it is connected."""
        validate_name("clone", new)
        with self.lock():
            record = self.get_clone(old)
            cat = self.catalog()
            if new in cat.clones:
                raise errors.CloneExists(name=new, store=self.path)
            self._refuse_if_open(record)
            renamed = replace(record, name=new)
            clones = {(new if n == old else n): (renamed if n == old else r) for n, r in cat.clones.items()}
            self.write_catalog(replace(cat, clones=clones))
        return renamed

    def reset_clone(self, name: str) -> CloneState:
        """Drop every write of the clone; it stays on the version it is on (a clone whose state is damaged
        goes to the version it would open on)."""
        with self.lock():
            record = self.get_clone(name)
            self._refuse_if_open(record)
            try:
                base, version = self.clone_on(record)
            except errors.Damaged:
                base, version = self.target_on(record)
            if base != record.base:  # a change of base was cut short (lineage.py): finish it
                base, version = self.target_on(record)
            return self.start_overlay(record, version)

    def upgrade_clone(self, name: str, to: str | None) -> tuple[str | None, str]:
        """Move a clone to version `to` (default: the base's current one), dropping its writes. A pinned
        clone stays pinned, to the new version. Returns (old version, new version)."""
        with self.lock():
            record = self.get_clone(name)
            if record.base is None:
                raise errors.InvalidArgument(detail=f"clone {name!r} is blank: it has no base to upgrade")
            if is_own_base(record.base):
                raise errors.InvalidArgument(
                    detail=f"clone {name!r} reads its own snapshots, not a base: use clone rollback to change them"
                )
            base = self.get_base(record.base)
            vid = to or self.current_version(base)
            base.version(vid, self.path)
            self._refuse_if_open(record)
            old = self.clone_version(record)
            if record.pin is not None:
                cat = self.catalog()
                self.write_catalog(replace(cat, clones={**cat.clones, name: replace(record, pin=vid)}))
            elif to is not None and to != self.current_version(base):
                raise errors.InvalidArgument(
                    detail=f"clone {name!r} follows {record.base}; it can only move to the current version"
                )
            self.start_overlay(record, vid)
            return old, vid

    def status(self, record: CloneRecord) -> CloneStatus:
        """Where a clone stands, from one read of its state."""
        state = self.clone_state(record)
        target = self.target_on(record)
        on = self.state_on(record, state) if state is not None else target
        path = self.overlay_path(record, state) if state is not None else None
        return CloneStatus(
            version=on[1],
            size=self.clone_size(record, on[1]) if on[0] == record.base else record.size,
            follows=record.base is not None and record.pin is None,
            move_pending=on != target,
            held=self.is_held(record),
            overlay_disk_bytes=disk_bytes(path),
            open=path is not None and overlay_in_use(path),
        )

    def overlay_bytes(self, record: CloneRecord) -> int:
        """Bytes the clone's live overlay takes on disk (0 before its first open)."""
        state = self.clone_state(record)
        return disk_bytes(self.overlay_path(record, state) if state is not None else None)

    def hold(self, record: CloneRecord) -> None:
        """Mark the clone held, durably, before its first connection is served."""
        directory = self.clone_dir(record)
        path = self.held_path(record)
        if path.exists():
            return
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        os.close(fd)
        fsync_dir(directory)

    def unhold(self, record: CloneRecord) -> None:
        """Its last connection closed while the server runs. (Not synced: if a crash loses this, the clone
        only stays held, the safe way.)"""
        self.held_path(record).unlink(missing_ok=True)

    def is_held(self, record: CloneRecord) -> bool:
        return self.held_path(record).exists()

    def leaving(self, record: CloneRecord) -> str | None:
        """The host a move is draining the clone for, while the drain lasts (a crashed move's marker
        lapses at its deadline)."""
        try:
            to, until = self.leaving_path(record).read_text().split()
            return to if time.time() < float(until) else None
        except (FileNotFoundError, ValueError):
            return None

    def is_open(self, record: CloneRecord) -> bool:
        """A server has the clone's overlay open (any of its overlays, if its state is damaged)."""
        try:
            state = self.clone_state(record)
        except errors.Damaged:
            directory = self.clone_dir(record)
            return any(overlay_in_use(d) for d in directory.iterdir() if d.is_dir())
        return state is not None and overlay_in_use(self.overlay_path(record, state))

    def _refuse_if_open(self, record: CloneRecord) -> None:
        if self.is_open(record):
            raise errors.CloneInUse(name=record.name)
