"""Where everything of a store is on disk: every path is made here, and nowhere else.

    STORE/
      nbdclone-store          says the folder is a store: made with it, in a new or empty folder only
                              (check_place); no command touches a folder that holds anything else
      catalog.json            names -> records; replaced atomically (tmp, fsync, rename, fsync dir)
      catalog.mirror.json     the same, written right after it: read if catalog.json is damaged
      lock                    flock: exclusive for catalog changes, shared while a server opens a clone
      chunks/pack, lock       every base version's data, stored once by content (see chunks.py)
      bases/ID/VERSION.map    a version's chunk map: immutable once written
      bases/ID/VERSION.trace  the chunks its first boot read, in order (see chunks.py)
      bases/ID/current        the pointer: the version a following clone uses. A flip replaces this one
                              small file by rename, whatever the number of clones.
      clones/ID/state.json    the version (and base) the clone's overlay was started on, and which overlay
                              is live
      clones/ID/held          present (durably) from a server's first open of a following clone until its
                              last connection closes with the server running: while it is, clients may
                              come back to that version, so the clone does not move
      clones/ID/leaving       present while `clone move --drain` waits for its clients to go: until the time
                              it holds, no new client opens the clone (fleet/move.py)
      clones/ID/OVERLAY/      the clone's overlay on that version: RocksDB block map + sparse data file
      chunks/remote           a fleet host's slots staged but not fetched yet (see remote.py)
      fleet.json              a fleet host's settings (fleet/config.py)
      tmp/                    work in progress (see Layout.scratch)
      reserve                 2 MiB held for the catalog writes that free space on a full disk (clone rm,
                              base rm, gc): given up when one needs it, made again when space allows
      quarantine/STAMP/...    what a repair moved aside instead of removing (a record it could not read
                              may name it), at its path under the store; `check --purge` empties it
      run/, serve.json        the running server's files and sockets; where clones listen (runtime.py)
      /dev/shm/nbdclone-KEY.clock  the shared cache's access bytes (hints; see Layout.clock_path)
      /dev/shm/nbdclone-journals-UID/JID  an overlay's journal of map entries not yet flushed (_journal.py);
                              removed at its clean close, or at a server's start once its overlay is gone

Names are keys in the catalog and never become paths: files are named by random ids, so an export name
from the network can only ever be looked up. A file that is replaced is replaced by write_atomic.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import signal
import stat
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from nbdclone import errors
from nbdclone.runtime import RunDir
from nbdclone.store import _journal
from nbdclone.store._fs import fsync_dir

if TYPE_CHECKING:
    from nbdclone.store.catalog import BaseRecord, CloneRecord, CloneState

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Test hook: kill this process (as kill -9 would) just before the named step of a pointer flip (write,
#: fsync, rename, fsync-dir, done) or of a clone's change of base (lineage-commit, lineage-switch).
CRASH_AT_ENV = "NBDCLONE_TEST_CRASH_AT"
STATE = "state.json"  # in a clone's folder: its live overlay (see clones.py)
FLEET_FILE = "fleet.json"  # a fleet host's settings (fleet/config.py)
RESERVE = 2 << 20  # bytes STORE/reserve holds: room for a catalog write (and its mirror) on a full disk
ORIGIN = "origin.json"  # in an overlay: the state it was started with (check --repair rebuilds state.json)


#: Files whose presence makes a folder a store: its mark, or (a store made before the mark) its catalog or
#: a fleet host's settings.
STORE_MARKS = ("nbdclone-store", "catalog.json", "catalog.mirror.json", "fleet.json")


def check_place(path: Path) -> None:
    """Refuse (NotAStore) a path that holds something other than a store: one that is not a folder, or a
    folder with entries but no mark of a store. A missing or empty folder is fine (a store is made there),
    and so is one holding only run/ with nothing but sockets in it (what systemd-tmpfiles and the socket
    unit make before the service first starts)."""
    try:
        with os.scandir(path) as entries:
            found = {e.name: e for e in entries}
    except FileNotFoundError:
        return
    except NotADirectoryError:
        raise errors.NotAStore(path=path, why="not a folder") from None
    if any((path / mark).exists() for mark in STORE_MARKS):
        return
    run = found.pop("run", None)
    if found or (run is not None and not _sockets_only(run)):
        raise errors.NotAStore(path=path, why="the folder holds other files")


def _sockets_only(entry: os.DirEntry[str]) -> bool:
    if not entry.is_dir(follow_symlinks=False):
        return False
    with os.scandir(entry.path) as inside:
        return all(stat.S_ISSOCK(e.stat(follow_symlinks=False).st_mode) for e in inside)


def default_store() -> Path:
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(data) / "nbdclone"


class Layout:
    """The paths of one store directory, and its work files (STORE/tmp)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path).absolute()

    def make(self) -> None:
        """Make the store's folder and its mark, unless it is a store already; refuses (NotAStore) a folder
        that holds anything else, before touching it."""
        mark = self.path / STORE_MARKS[0]
        if mark.exists():
            return
        check_place(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):  # (a full disk: the catalog marks the store as well)
            mark.write_text("an nbdclone store: see 'nbdclone --help'\n")

    @property
    def bases_dir(self) -> Path:
        return self.path / "bases"

    @property
    def clones_dir(self) -> Path:
        return self.path / "clones"

    @property
    def lock_path(self) -> Path:
        return self.path / "lock"

    @property
    def chunks_dir(self) -> Path:
        return self.path / "chunks"

    def pointer_path(self, record: BaseRecord) -> Path:
        return self.base_dir(record) / "current"

    def state_path(self, record: CloneRecord) -> Path:
        return self.clone_dir(record) / STATE

    def held_path(self, record: CloneRecord) -> Path:
        return self.clone_dir(record) / "held"

    def leaving_path(self, record: CloneRecord) -> Path:
        """Present while a move drains the clone: until the time it holds, no new client opens it."""
        return self.clone_dir(record) / "leaving"

    def overlay_path(self, record: CloneRecord, state: CloneState) -> Path:
        return self.clone_dir(record) / state.overlay

    def runtime_paths(self) -> list[Path]:
        """Where the running server says where it listens: in shared memory (always writable, gone with a
        reboot, as the server is) and in the store's run/ (for a look with ls); the first readable one with
        a live process wins."""
        return [self.clock_path.with_suffix(".server.json"), self.server_info_path]

    @property
    def catalog_path(self) -> Path:
        return self.path / "catalog.json"

    def base_dir(self, record: BaseRecord) -> Path:
        return self.bases_dir / record.id

    def map_path(self, record: BaseRecord, vid: str) -> Path:
        return self.base_dir(record) / f"{vid}.map"

    def trace_path(self, record: BaseRecord, vid: str) -> Path:
        """The boot trace of a version: the chunks its first boot read, in order."""
        return self.base_dir(record) / f"{vid}.trace"

    def clone_dir(self, record: CloneRecord) -> Path:
        return self.clones_dir / record.id

    @property
    def tmp(self) -> Path:
        return self.path / "tmp"

    @property
    def server_info_path(self) -> Path:
        return RunDir(self.path).server_info

    def collect_journals(self) -> int:
        """Remove the journals (/dev/shm) of this store's overlays that no longer exist; how many."""
        return _journal.collect(self.path)

    @property
    def clock_path(self) -> Path:
        """The shared cache's access bytes: in shared memory, not on the store's file system, where a store
        into a mapped page can need a new block (a copy-on-write file system, a full disk) and so turn into
        a SIGBUS. They are hints: a reboot may lose them."""
        shm = Path("/dev/shm")
        key = hashlib.sha1(str(self.path.resolve()).encode(), usedforsecurity=False).hexdigest()[:16]
        return shm / f"nbdclone-{key}.clock" if shm.is_dir() else self.path / "run" / "cache.clock"

    @property
    def mirror_path(self) -> Path:
        return self.path / "catalog.mirror.json"

    @property
    def reserve_path(self) -> Path:
        return self.path / "reserve"

    def keep_reserve(self, size: int = RESERVE) -> None:
        """Make the reserve (`size` bytes) if it is missing and the file system has room (a failure leaves
        none)."""
        if self.reserve_path.exists() or not self.path.is_dir():
            return
        tmp = self.path / f".reserve.{uuid.uuid4().hex}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.posix_fallocate(fd, 0, size)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self.reserve_path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def give_up_reserve(self) -> bool:
        """Free the reserve for a write that found no space; True if there was one."""
        try:
            self.reserve_path.unlink()
        except FileNotFoundError:
            return False
        return True

    def with_room(self, what: str, write: Callable[[], T]) -> T:
        """`write()`; if the file system is full (ENOSPC), give up the reserve and try once more. For what
        a full disk must not stop: the catalog writes of commands that free space, a server's sockets."""
        try:
            return write()
        except OSError as exc:
            if exc.errno != errno.ENOSPC or not self.give_up_reserve():
                raise
        log.warning("no space left in %s: the reserve made room for %s", self.path, what)
        done = write()
        room = os.statvfs(self.path)
        self.keep_reserve(min(RESERVE, room.f_bavail * room.f_frsize // 2))  # what is left of it, for the next
        return done

    @property
    def quarantine_dir(self) -> Path:
        return self.path / "quarantine"

    def quarantine(self, paths: list[Path], folder: Path | None = None) -> Path | None:
        """Move `paths` (inside the store) aside, each at its own path under quarantine/STAMP/ (or `folder`),
        by rename (no space needed). Returns the folder (None if `paths` is empty). Caller holds the lock."""
        if not paths:
            return folder
        if folder is None:
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
            folder = self.quarantine_dir / f"{stamp}-{uuid.uuid4().hex[:6]}"
        for path in paths:
            dest = folder / path.relative_to(self.path)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.rename(path, dest)
            fsync_dir(dest.parent)
            fsync_dir(path.parent)
        return folder

    def quarantined(self) -> list[Path]:
        """What quarantine/ holds: its folders, oldest first."""
        return sorted(children(self.quarantine_dir))

    def quarantined_maps(self) -> list[Path]:
        """The version maps in quarantine/: the chunks they name are kept until it is emptied."""
        return sorted(self.quarantine_dir.glob("*/bases/*/*.map"))

    def purge_quarantine(self) -> list[Path]:
        """Empty quarantine/ (the operator has looked). Returns what was there."""
        gone = self.quarantined()
        for folder in gone:
            shutil.rmtree(folder)
        return gone

    def _init_dirs(self) -> None:
        self.make()
        for sub in ("bases", "clones", "chunks", "tmp", "run"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)

    def new_tmp_file(self, suffix: str) -> Path:
        self._init_dirs()
        return self.tmp / f"{uuid.uuid4().hex}{suffix}"

    @contextlib.contextmanager
    def scratch(self, suffix: str) -> Iterator[Path]:
        """A work file in STORE/tmp, locked (flock) for as long as this process works on it and removed
        after. A file there that nobody holds is a leftover of a killed command (`leftovers`)."""
        while True:
            path = self.new_tmp_file(suffix)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break  # a cleanup that found it unlocked before our flock did not remove it
            except FileNotFoundError:
                pass
            os.close(fd)
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)
            os.close(fd)

    def leftovers(self) -> list[Path]:
        """Files of STORE/tmp no running command holds: what killed imports, exports and catalog writes
        left. (Catalog writes hold the store lock; callers that remove these hold it too.)"""
        found = []
        for path in sorted(self.tmp.iterdir()) if self.tmp.is_dir() else ():
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError:
                found.append(path)  # not a file we could open: still not ours to keep
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a running command's
            else:
                found.append(path)
            finally:
                os.close(fd)
        return found

    def remove_leftovers(self) -> list[Path]:
        """Remove `leftovers()`; returns them. Caller holds the store lock (no catalog write is half done)."""
        removed = self.leftovers()
        for path in removed:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        return removed


def disk_bytes(directory: Path | None) -> int:
    """Bytes the files of `directory` take on disk (allocated blocks, not apparent sizes)."""
    if directory is None or not directory.is_dir():
        return 0
    return sum(f.stat().st_blocks * 512 for f in directory.iterdir() if f.is_file())


def children(directory: Path) -> list[Path]:
    return sorted(directory.iterdir()) if directory.is_dir() else []


def crash_point(step: str) -> None:
    if os.environ.get(CRASH_AT_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def write_atomic(path: Path, text: str, tmp_dir: Path, *, crash_hooks: bool = False) -> None:
    """Replace `path` with `text`: write a temp file, fsync it, rename it over `path`, fsync the directory.
    Readers see the old or the new file, never a mix; after return, the new one survives power loss."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f".{path.name}.{uuid.uuid4().hex}.tmp"
    if crash_hooks:
        crash_point("write")
    data = text.encode()
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)  # (as open() made it)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if crash_hooks:
                crash_point("fsync")
            os.fsync(fd)
        finally:
            os.close(fd)
        if crash_hooks:
            crash_point("rename")
        os.rename(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()  # (a full disk: what it holds goes back)
        raise
    if crash_hooks:
        crash_point("fsync-dir")
    fsync_dir(path.parent)
    if crash_hooks:
        crash_point("done")
