"""The store on disk: bases and their versions, clones, and the catalog that names them.

    STORE/
      catalog.json            names -> records; replaced atomically (tmp, fsync, rename, fsync dir)
      lock                    flock: exclusive for catalog changes, shared while a server opens a clone
      chunks/pack, lock       every base version's data, stored once by content (see chunks.py)
      bases/ID/VERSION.map    a version's chunk map: immutable once written
      bases/ID/current        the pointer: the version a following clone uses. A flip replaces this one
                              small file by rename, whatever the number of clones.
      clones/ID/state.json    the version the clone's overlay was started on, and which overlay is live
      clones/ID/held          present (durably) from a server's first open of a following clone until its
                              last connection closes with the server running: while it is, clients may
                              come back to that version, so the clone does not move
      clones/ID/OVERLAY/      the clone's overlay on that version: RocksDB block map + sparse data file
      tmp/                    work in progress (see Store.scratch)
      run/, serve.json        the running server's files and sockets; where clones listen (runtime.py)
      /dev/shm/nbdclone-KEY.clock  the shared cache's access bytes (hints; see Store.clock_path)

Names are keys in the catalog and never become paths: files are named by random ids, so an export name
from the network can only ever be looked up. Lock order, everywhere: chunks/lock, then lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from nbdclone import errors
from nbdclone.runtime import SLOTS, RunDir
from nbdclone.store._fs import fsync_dir
from nbdclone.store._rocks import create_overlay, overlay_in_use
from nbdclone.store._sealed import read_sealed, read_sealed_json, seal, seal_json
from nbdclone.store.chunks import CHUNK, ChunkStore, VersionMap

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
VERSION_RE = re.compile(r"[1-9][0-9]{0,9}")
OVERLAY_RE = re.compile(r"[0-9a-f]{12}")
ORIGIN = "origin.json"  # in an overlay: the state it was started with (check --repair rebuilds state.json)
CATALOG_FORMAT = 2
#: Test hook: kill this process (as kill -9 would) just before the named step of a pointer flip.
CRASH_AT_ENV = "NBDCLONE_TEST_CRASH_AT"


def default_store() -> Path:
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(data) / "nbdclone"


def validate_name(kind: Literal["base", "clone"], name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise errors.InvalidName(kind=kind, name=name if len(name) <= 80 else name[:77] + "...")
    return name


def is_valid_name(name: str) -> bool:
    return bool(NAME_RE.fullmatch(name))


def parse_base_ref(ref: str) -> tuple[str, str | None]:
    """ "NAME" -> (NAME, None); "NAME@VERSION" -> (NAME, VERSION)."""
    name, sep, version = ref.partition("@")
    validate_name("base", name)
    if sep and not VERSION_RE.fullmatch(version):
        raise errors.InvalidArgument(detail=f"invalid version {version!r} in {ref!r}: versions are numbers")
    return name, (version if sep else None)


def slot_of(cat: Catalog, name: str) -> int:
    """The slot (one of runtime.SLOTS addresses) of clone `name`: fixed when the clone is created.

    Clones are dealt to slots in the order they were created, so clones made together (a boot storm's)
    spread evenly over the slots, and so over the workers (a hash of the names split 32 clones 18/14 over
    two). Clones from before creation numbers, and names the catalog does not know, go by a hash of the name."""
    record = cat.clones.get(name)
    if record is not None and record.seq >= 0:
        return record.seq % SLOTS
    return zlib.crc32(name.encode()) % SLOTS


def worker_of(cat: Catalog, name: str, workers: int) -> int:
    """Which of `workers` server workers serves clone `name`: the worker its slot is handed to."""
    return slot_of(cat, name) % workers


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True, slots=True)
class VersionRecord:
    id: str
    size: int
    created: str
    source: str
    new_chunks: int


@dataclass(frozen=True, slots=True)
class BaseRecord:
    name: str
    id: str
    created: str
    next_version: int
    versions: dict[str, VersionRecord]

    def version(self, vid: str, store: Path) -> VersionRecord:
        record = self.versions.get(vid)
        if record is None:
            raise errors.VersionNotFound(name=self.name, version=vid, store=store)
        return record


@dataclass(frozen=True, slots=True)
class CloneRecord:
    name: str
    id: str
    base: str | None  # None: a blank clone
    pin: str | None  # None: follows the base's current version
    size: int  # blank clones only; a clone of a base has its version's size
    created: str
    seq: int = -1  # creation number (its slot: its address); -1: created before clones had one
    readonly: bool = False  # served read-only: clients cannot write it


@dataclass(frozen=True, slots=True)
class CloneState:
    """Where a clone is now: the version its overlay started on, and that overlay's directory name."""

    version: str | None
    overlay: str


@dataclass(frozen=True, slots=True)
class CloneStatus:
    version: str | None  # what it reads now, or for a never-opened clone, what it will
    size: int
    follows: bool
    move_pending: bool  # a following clone whose base flipped since its overlay started
    held: bool  # its clients may come back (open, or a server stopped or died with it open): it waits
    overlay_disk_bytes: int
    open: bool  # a server has its overlay open


@dataclass(frozen=True, slots=True)
class VersionStats:
    base: str
    version: str
    size: int
    created: str
    source: str
    current: bool
    stored: int  # bytes of chunks this version references (all-zero chunks take none)
    shared: int  # of which other versions reference too
    unique: int  # of which only this version references: what removing it would free
    clones: int
    damaged: str = ""  # why its map or its base's pointer cannot be used ("" if they can)


@dataclass(frozen=True, slots=True)
class Catalog:
    bases: dict[str, BaseRecord] = field(default_factory=dict)
    clones: dict[str, CloneRecord] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": CATALOG_FORMAT,
            "bases": {n: asdict(r) for n, r in sorted(self.bases.items())},
            "clones": {n: asdict(r) for n, r in sorted(self.clones.items())},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Catalog:
        if data.get("format") != CATALOG_FORMAT:
            raise errors.NbdcloneError(detail=f"unsupported catalog format {data.get('format')!r}")
        bases = {}
        for n, r in data["bases"].items():
            versions = {v: VersionRecord(**vr) for v, vr in r.pop("versions").items()}
            bases[n] = BaseRecord(**r, versions=versions)
        return cls(bases=bases, clones={n: CloneRecord(**r) for n, r in data["clones"].items()})

    def clones_of(self, base: str) -> list[str]:
        return sorted(n for n, c in self.clones.items() if c.base == base)


class Store:
    """One store directory. Safe to use from many processes at once."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path).absolute()
        self.chunks = ChunkStore(self.path / "chunks")
        self._cached: tuple[tuple[int, int, int], Catalog] | None = None

    # -- paths ---------------------------------------------------------------------------------------

    @property
    def catalog_path(self) -> Path:
        return self.path / "catalog.json"

    def base_dir(self, record: BaseRecord) -> Path:
        return self.path / "bases" / record.id

    def map_path(self, record: BaseRecord, vid: str) -> Path:
        return self.base_dir(record) / f"{vid}.map"

    def trace_path(self, record: BaseRecord, vid: str) -> Path:
        """The boot trace of a version: the chunks its first boot read, in order."""
        return self.base_dir(record) / f"{vid}.trace"

    def clone_dir(self, record: CloneRecord) -> Path:
        return self.path / "clones" / record.id

    @property
    def tmp(self) -> Path:
        return self.path / "tmp"

    @property
    def server_info_path(self) -> Path:
        return RunDir(self.path).server_info

    @property
    def clock_path(self) -> Path:
        """The shared cache's access bytes: in shared memory, not on the store's file system, where a store
        into a mapped page can need a new block (a copy-on-write file system, a full disk) and so turn into
        a SIGBUS. They are hints: a reboot may lose them."""
        shm = Path("/dev/shm")
        key = hashlib.sha1(str(self.path.resolve()).encode(), usedforsecurity=False).hexdigest()[:16]
        return shm / f"nbdclone-{key}.clock" if shm.is_dir() else self.path / "run" / "cache.clock"

    # -- catalog -------------------------------------------------------------------------------------

    @property
    def mirror_path(self) -> Path:
        return self.path / "catalog.mirror.json"

    def catalog(self) -> Catalog:
        """The current catalog; re-read only when the file changed (it is replaced, never edited). If it
        is damaged, its mirror (written right after it) is used, with an error in the log."""
        try:
            st = os.stat(self.catalog_path)
        except FileNotFoundError:
            if self.mirror_path.exists():
                return self._fall_back(errors.Damaged(path=self.catalog_path, detail="it is missing"))
            return Catalog()
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._cached is None or self._cached[0] != key:
            try:
                self._cached = (key, load_catalog(self.catalog_path))
            except errors.Damaged as exc:
                return self._fall_back(exc)
        return self._cached[1]

    def _fall_back(self, damage: errors.Damaged) -> Catalog:
        try:
            catalog = load_catalog(self.mirror_path)
        except (errors.Damaged, FileNotFoundError):
            raise damage from None
        log.error("%s; reading its mirror %s until it is repaired", damage, self.mirror_path)
        return catalog

    @contextlib.contextmanager
    def lock(self, *, shared: bool = False) -> Iterator[None]:
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _write_catalog(self, catalog: Catalog) -> None:
        """Replace catalog.json atomically and durably, then its mirror. Caller holds the exclusive lock."""
        text = seal_json(catalog.to_json())
        write_atomic(self.catalog_path, text, self.tmp)
        write_atomic(self.mirror_path, text, self.tmp)

    def _init_dirs(self) -> None:
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

    # -- bases and versions --------------------------------------------------------------------------

    def get_base(self, name: str) -> BaseRecord:
        validate_name("base", name)
        record = self.catalog().bases.get(name)
        if record is None:
            raise errors.BaseNotFound(name=name, store=self.path)
        return record

    def current_version(self, record: BaseRecord) -> str:
        """The version the base's pointer names: checked (checksum, and a version the base has) before
        anything may act on it."""
        path = self.base_dir(record) / "current"
        try:
            body, _ = read_sealed(path)
        except FileNotFoundError:
            raise errors.Damaged(path=path, detail=f"base {record.name}'s current pointer is missing") from None
        vid = body.strip()
        if vid not in record.versions:
            raise errors.Damaged(path=path, detail=f"it names version {vid!r}, which base {record.name} does not have")
        return vid

    def resolve(self, ref: str) -> tuple[BaseRecord, str]:
        """'NAME' or 'NAME@VERSION' -> (base, version id); NAME alone means its current version."""
        name, vid = parse_base_ref(ref)
        record = self.get_base(name)
        vid = vid or self.current_version(record)
        record.version(vid, self.path)
        return record, vid

    def version_map(self, record: BaseRecord, vid: str, *, digests: bool = True) -> VersionMap:
        """A version's map, with the chunks' digests unless `digests` is off (counting, freeing)."""
        return VersionMap.load(self.map_path(record, vid), digests=digests)

    def all_version_maps(self, catalog: Catalog | None = None, *, digests: bool = False) -> Iterator[VersionMap]:
        for base in (catalog or self.catalog()).bases.values():
            for vid in base.versions:
                yield self.version_map(base, vid, digests=digests)

    def add_version(self, name: str, vmap: VersionMap, source: str, new_chunks: int) -> tuple[BaseRecord, str]:
        """Commit an imported version of base `name` (created if new). Caller holds chunks.writer()."""
        validate_name("base", name)
        with self.lock():
            self._init_dirs()
            cat = self.catalog()
            record = cat.bases.get(name) or BaseRecord(name, uuid.uuid4().hex, now(), 1, {})
            vid = str(record.next_version)
            self.base_dir(record).mkdir(exist_ok=True)
            vmap.save(self.map_path(record, vid))
            fsync_dir(self.base_dir(record))
            version = VersionRecord(vid, vmap.size, now(), source, new_chunks)
            record = replace(record, next_version=record.next_version + 1, versions={**record.versions, vid: version})
            if name not in cat.bases:
                self._write_pointer(record, vid)
            self._write_catalog(replace(cat, bases={**cat.bases, name: record}))
        log.info("imported version %s of base %s (%d bytes, %d new chunks)", vid, name, vmap.size, new_chunks)
        return record, vid

    def promote(self, name: str, vid: str) -> str:
        """Make `vid` the current version of base `name`: one atomic, durable rename. Returns the old one."""
        with self.lock():
            record = self.get_base(name)
            record.version(vid, self.path)
            old = self.current_version(record)
            self._write_pointer(record, vid)
        return old

    def _write_pointer(self, record: BaseRecord, vid: str) -> None:
        write_atomic(self.base_dir(record) / "current", seal(vid), self.base_dir(record), crash_hooks=True)

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
                version = self.clone_version(clone)
            except errors.Damaged:
                if not skip_damaged:
                    raise
                continue
            for vid in {clone.pin, version} - {None}:
                users.setdefault((clone.base, vid), []).append(clone.name)  # type: ignore[arg-type]
        return users

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
        refs: dict[int, int] = {}
        for slots in maps.values():
            for slot in slots:
                refs[slot] = refs.get(slot, 0) + 1
        out = []
        for base in cat.bases.values():
            try:
                current: str | None = self.current_version(base)
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
                    )
                )
        return out

    def remove_version(self, ref: str) -> int:
        """Remove one version (NAME@VERSION): refused if current or used. Returns the bytes freed."""
        name, vid = parse_base_ref(ref)
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
                record = replace(record, versions={v: r for v, r in record.versions.items() if v != vid})
                cat = replace(cat, bases={**cat.bases, name: record})
                self._write_catalog(cat)
                self.map_path(record, vid).unlink(missing_ok=True)
                self.trace_path(record, vid).unlink(missing_ok=True)
            return self.chunks.release_unused(self.all_version_maps(cat))

    def remove_base(self, name: str) -> int:
        """Remove a base and all its versions; refused while any clone uses it. Returns the bytes freed."""
        with self.chunks.writer():
            with self.lock():
                record = self.get_base(name)
                cat = self.catalog()
                users = cat.clones_of(name)
                if users:
                    raise errors.BaseInUse(name=name, clones=", ".join(users))
                cat = replace(cat, bases={n: r for n, r in cat.bases.items() if n != name})
                self._write_catalog(cat)
                shutil.rmtree(self.base_dir(record), ignore_errors=True)
            return self.chunks.release_unused(self.all_version_maps(cat))

    def gc(self) -> tuple[list[str], int]:
        """Remove every version that is not current and used by no clone, the leftovers of killed commands,
        and free the chunks nothing uses. Returns the removed NAME@VERSION and the bytes freed."""
        removed: list[str] = []
        with self.chunks.writer():
            with self.lock():
                cat = self.catalog()
                users = self.version_users(cat)
                bases = dict(cat.bases)
                for name, record in cat.bases.items():
                    current = self.current_version(record)
                    dead = [v for v in record.versions if v != current and (name, v) not in users]
                    if dead:
                        bases[name] = replace(
                            record, versions={v: r for v, r in record.versions.items() if v not in dead}
                        )
                        removed += [f"{name}@{v}" for v in dead]
                cat = replace(cat, bases=bases)
                if removed:
                    self._write_catalog(cat)
                    for ref in removed:
                        name, _, vid = ref.partition("@")
                        self.map_path(bases[name], vid).unlink(missing_ok=True)
                        self.trace_path(bases[name], vid).unlink(missing_ok=True)
                self._remove_orphans(cat)
                self.remove_leftovers()
            return removed, self.chunks.release_unused(self.all_version_maps(cat))

    def orphans(self, cat: Catalog) -> list[tuple[Path, str]]:
        """What commands that died half-way left, as (path, what it is): folders of clones and bases the
        catalog does not name, overlays no clone state names (and no server holds), files of versions the
        catalog does not have. A clone whose state is damaged keeps every overlay. Caller holds the locks."""
        found: list[tuple[Path, str]] = []
        live_clones = {c.id: c for c in cat.clones.values()}
        for directory in _children(self.path / "clones"):
            clone = live_clones.get(directory.name)
            if clone is None:
                found.append((directory, "a clone folder the catalog does not name"))
                continue
            try:
                state = _read_state(directory)
            except errors.Damaged as exc:
                log.error("%s: keeping every overlay of that clone", exc)
                continue
            for sub in _children(directory):
                if sub.is_dir() and (state is None or sub.name != state.overlay) and not overlay_in_use(sub):
                    found.append((sub, f"an overlay of clone {clone.name} that its state does not name"))
        live_bases = {b.id: b for b in cat.bases.values()}
        for directory in _children(self.path / "bases"):
            base = live_bases.get(directory.name)
            if base is None:
                found.append((directory, "a base folder the catalog does not name"))
                continue
            for f in _children(directory):
                vid = f.name.split(".")[0]
                if f.suffix in (".map", ".trace") and vid not in base.versions:
                    found.append((f, f"a file of version {base.name}@{vid}, which the catalog does not have"))
        return found

    def _remove_orphans(self, cat: Catalog) -> None:
        for path, _ in self.orphans(cat):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    # -- clones --------------------------------------------------------------------------------------

    def get_clone(self, name: str) -> CloneRecord:
        validate_name("clone", name)
        record = self.catalog().clones.get(name)
        if record is None:
            raise errors.CloneNotFound(name=name, store=self.path)
        return record

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
                self._check_file_size(size)
            seq = max((c.seq for c in cat.clones.values()), default=-1) + 1
            records = [
                CloneRecord(n, uuid.uuid4().hex, base_name, pin, size or 0, now(), seq + i, readonly)
                for i, n in enumerate(names)
            ]
            self._write_catalog(replace(cat, clones={**cat.clones, **{r.name: r for r in records}}))
        return records

    def _check_file_size(self, size: int) -> None:
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

    def clone_state(self, record: CloneRecord) -> CloneState | None:
        """Where the clone is (None: never opened), checked against the catalog before anything acts on it."""
        state = _read_state(self.clone_dir(record))
        if state is not None and state.version is not None:
            base = self.catalog().bases.get(record.base or "")
            if base is None or state.version not in base.versions:
                raise errors.Damaged(
                    path=self.clone_dir(record) / "state.json",
                    detail=f"it names version {state.version!r}, which base {record.base} does not have",
                )
        return state

    def target_version(self, record: CloneRecord) -> str | None:
        """The version the clone's next first connection will use."""
        if record.base is None:
            return None
        return record.pin or self.current_version(self.get_base(record.base))

    def clone_version(self, record: CloneRecord) -> str | None:
        """The version the clone reads now (its overlay's), or for a never-opened clone, the one it will."""
        state = self.clone_state(record)
        return state.version if state is not None else self.target_version(record)

    def clone_size(self, record: CloneRecord, vid: str | None) -> int:
        if record.base is None or vid is None:
            return record.size
        return self.get_base(record.base).version(vid, self.path).size

    def overlay_path(self, record: CloneRecord, state: CloneState) -> Path:
        return self.clone_dir(record) / state.overlay

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
        state = CloneState(version, uuid.uuid4().hex[:12])
        create_overlay(directory / state.overlay)
        write_atomic(directory / state.overlay / ORIGIN, seal_json(asdict(state)), directory / state.overlay)
        write_atomic(directory / "state.json", seal_json(asdict(state)), directory)
        for path in dropped:
            shutil.rmtree(path, ignore_errors=True)
        return state

    def remove_clone(self, name: str) -> None:
        with self.lock():
            record = self.get_clone(name)
            self._refuse_if_open(record)
            cat = self.catalog()
            self._write_catalog(replace(cat, clones={n: r for n, r in cat.clones.items() if n != name}))
            shutil.rmtree(self.clone_dir(record), ignore_errors=True)

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
            self._write_catalog(replace(cat, clones=clones))
        return renamed

    def reset_clone(self, name: str) -> CloneState:
        """Drop every write of the clone; it stays on the version it is on (a clone whose state is damaged
        goes to the version it would open on)."""
        with self.lock():
            record = self.get_clone(name)
            self._refuse_if_open(record)
            try:
                version = self.clone_version(record)
            except errors.Damaged:
                version = self.target_version(record)
            return self.start_overlay(record, version)

    def upgrade_clone(self, name: str, to: str | None) -> tuple[str | None, str]:
        """Move a clone to version `to` (default: the base's current one), dropping its writes. A pinned
        clone stays pinned, to the new version. Returns (old version, new version)."""
        with self.lock():
            record = self.get_clone(name)
            if record.base is None:
                raise errors.InvalidArgument(detail=f"clone {name!r} is blank: it has no base to upgrade")
            base = self.get_base(record.base)
            vid = to or self.current_version(base)
            base.version(vid, self.path)
            self._refuse_if_open(record)
            old = self.clone_version(record)
            if record.pin is not None:
                cat = self.catalog()
                self._write_catalog(replace(cat, clones={**cat.clones, name: replace(record, pin=vid)}))
            elif to is not None and to != self.current_version(base):
                raise errors.InvalidArgument(
                    detail=f"clone {name!r} follows {record.base}; it can only move to the current version"
                )
            self.start_overlay(record, vid)
            return old, vid

    def status(self, record: CloneRecord) -> CloneStatus:
        """Where a clone stands, from one read of its state."""
        state = self.clone_state(record)
        target = self.target_version(record)
        version = state.version if state is not None else target
        path = self.overlay_path(record, state) if state is not None else None
        return CloneStatus(
            version=version,
            size=self.clone_size(record, version),
            follows=record.base is not None and record.pin is None,
            move_pending=state is not None and version != target,
            held=self.is_held(record),
            overlay_disk_bytes=_disk_bytes(path),
            open=path is not None and overlay_in_use(path),
        )

    def overlay_bytes(self, record: CloneRecord) -> int:
        """Bytes the clone's live overlay takes on disk (0 before its first open)."""
        state = self.clone_state(record)
        return _disk_bytes(self.overlay_path(record, state) if state is not None else None)

    # -- the move rule: a following clone changes disks only when no client may come back --------------

    def hold(self, record: CloneRecord) -> None:
        """Mark the clone held, durably, before its first connection is served."""
        directory = self.clone_dir(record)
        path = directory / "held"
        if path.exists():
            return
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        os.close(fd)
        fsync_dir(directory)

    def unhold(self, record: CloneRecord) -> None:
        """Its last connection closed while the server runs. (Not synced: if a crash loses this, the clone
        only stays held, the safe way.)"""
        (self.clone_dir(record) / "held").unlink(missing_ok=True)

    def is_held(self, record: CloneRecord) -> bool:
        return (self.clone_dir(record) / "held").exists()

    def moves(self, base: str) -> tuple[list[str], list[str]]:
        """The clones following `base` that are not on its current version: (move at their next connection,
        wait until their clients are gone)."""
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

    # -- the running server --------------------------------------------------------------------------

    def _runtime_paths(self) -> list[Path]:
        """Where the running server says where it listens: in shared memory (always writable, gone with a
        reboot, as the server is) and in the store's run/ (for a look with ls); the first readable one with
        a live process wins."""
        return [self.clock_path.with_suffix(".server.json"), self.server_info_path]

    def write_server_info(self, info: dict[str, Any]) -> None:
        """Record the running server; raises only if no copy could be written (a full disk fails one)."""
        self._init_dirs()
        failed: OSError | None = None
        written = 0
        for path in self._runtime_paths():
            try:
                write_atomic(path, json.dumps(info), path.parent)
                written += 1
            except OSError as exc:
                failed = exc
        if not written and failed is not None:
            raise failed

    def server_info(self) -> dict[str, Any]:
        for path in self._runtime_paths():
            try:
                if path.stat().st_uid != os.geteuid():  # /dev/shm is everyone's: only our own record counts
                    continue
                info: dict[str, Any] = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if _pid_alive(int(info.get("pid", 0))):
                return info
        raise errors.ServerNotRunning(store=self.path)

    def clear_server_info(self, pid: int) -> None:
        for path in self._runtime_paths():
            with contextlib.suppress(OSError, ValueError):
                if json.loads(path.read_text()).get("pid") == pid:
                    path.unlink()


def _disk_bytes(directory: Path | None) -> int:
    """Bytes the files of `directory` take on disk (allocated blocks, not apparent sizes)."""
    if directory is None or not directory.is_dir():
        return 0
    return sum(f.stat().st_blocks * 512 for f in directory.iterdir() if f.is_file())


def _children(directory: Path) -> list[Path]:
    return sorted(directory.iterdir()) if directory.is_dir() else []


def load_catalog(path: Path) -> Catalog:
    obj, _ = read_sealed_json(path)
    try:
        return Catalog.from_json(obj)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise errors.Damaged(path=path, detail=f"it is not a catalog ({exc})") from None


def _read_state(directory: Path) -> CloneState | None:
    """A clone's state.json (None if there is none), checked for damage on its own (see clone_state)."""
    return load_state(directory / "state.json")


def load_state(path: Path) -> CloneState | None:
    try:
        obj, _ = read_sealed_json(path)
    except FileNotFoundError:
        return None
    try:
        state = CloneState(**obj)
    except (ValueError, TypeError) as exc:
        raise errors.Damaged(path=path, detail=f"it is not a clone state ({exc})") from None
    if not (isinstance(state.overlay, str) and OVERLAY_RE.fullmatch(state.overlay)) or not (
        state.version is None or (isinstance(state.version, str) and VERSION_RE.fullmatch(state.version))
    ):
        raise errors.Damaged(path=path, detail="it names no valid overlay and version")
    return state


def _crash_point(step: str) -> None:
    if os.environ.get(CRASH_AT_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def write_atomic(path: Path, text: str, tmp_dir: Path, *, crash_hooks: bool = False) -> None:
    """Replace `path` with `text`: write a temp file, fsync it, rename it over `path`, fsync the directory.
    Readers see the old or the new file, never a mix; after return, the new one survives power loss."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f".{path.name}.{uuid.uuid4().hex}.tmp"
    if crash_hooks:
        _crash_point("write")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        if crash_hooks:
            _crash_point("fsync")
        os.fsync(f.fileno())
    if crash_hooks:
        _crash_point("rename")
    os.rename(tmp, path)
    if crash_hooks:
        _crash_point("fsync-dir")
    fsync_dir(path.parent)
    if crash_hooks:
        _crash_point("done")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
