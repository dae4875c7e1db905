"""The catalog: the names of bases, versions and clones, their records, and the lookups everything else
starts from. catalog.json is replaced whole (write_atomic) under the store's exclusive lock, then its
mirror; readers take no lock and see the old or the new file. Lock order, everywhere: chunks/lock, then
the store's lock.

Each write carries the next generation. So the mirror is never newer than catalog.json, unless something
other than nbdclone wrote one of them; a stop between the two renames leaves the mirror one generation
behind, and the next exclusive lock writes it again (`refresh_mirror`). While catalog.json is damaged,
readers read the mirror, which may be behind: nothing writes the catalog (or removes anything on its
strength) until `nbdclone check --repair` has put the damaged file aside and moved aside what only a newer
record could name (check.py, the quarantine).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from nbdclone import errors
from nbdclone.runtime import SLOTS
from nbdclone.store._sealed import read_sealed, read_sealed_json, seal_json
from nbdclone.store.chunks import ChunkStore, VersionMap
from nbdclone.store.layout import FLEET_FILE, STATE, Layout, write_atomic
from nbdclone.store.remote import Fetch, FetchClient, FetchHere

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
VERSION_RE = re.compile(r"[1-9][0-9]{0,9}")
OVERLAY_RE = re.compile(r"[0-9a-f]{12}")
BASE_ID_RE = re.compile(r"[0-9a-f]{32}")
CATALOG_FORMAT = 3


def validate_name(kind: Literal["base", "clone", "snapshot"], name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise errors.InvalidName(kind=kind, name=name if len(name) <= 80 else name[:77] + "...")
    return name


def is_valid_name(name: str) -> bool:
    return bool(NAME_RE.fullmatch(name))


#: A clone's own base (its snapshots, and what flatten, resize and clone --from give it) is named by this
#: mark and the clone's id: no user's name starts with it, so no command that takes a base name reaches it.
PRIVATE = "~"


def own_base_name(clone: CloneRecord) -> str:
    return PRIVATE + clone.id


def is_own_base(name: str | None) -> bool:
    return name is not None and name.startswith(PRIVATE)


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
    snapshot: str = ""  # in a clone's own base: the snapshot's name ("" for a version no one named)


@dataclass(frozen=True, slots=True)
class BaseRecord:
    name: str
    id: str
    created: str
    next_version: int
    versions: dict[str, VersionRecord]
    owner: str = ""  # a clone's own base: that clone's id ("" for a base users name)

    def snapshot(self, name: str) -> str | None:
        """The version that is snapshot `name`, if there is one."""
        return next((vid for vid, v in self.versions.items() if v.snapshot == name), None)

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
    """Where a clone is now: the version its overlay started on, and that overlay's directory name.
    `base` is the id of that version's base; None in states written before clones could change base (then
    it is the clone's base in the catalog)."""

    version: str | None
    overlay: str
    base: str | None = None


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
    owner: str = ""  # a clone's own version: that clone's name
    snapshot: str = ""  # and the snapshot it is, if it is one


@dataclass(frozen=True, slots=True)
class Catalog:
    bases: dict[str, BaseRecord] = field(default_factory=dict)
    clones: dict[str, CloneRecord] = field(default_factory=dict)
    generation: int = 0  # of the write that made it: one more than the catalog it replaced

    def to_json(self) -> dict[str, Any]:
        return {
            "format": CATALOG_FORMAT,
            "generation": self.generation,
            "bases": {n: asdict(r) for n, r in sorted(self.bases.items())},
            "clones": {n: asdict(r) for n, r in sorted(self.clones.items())},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Catalog:
        if data.get("format") not in (2, CATALOG_FORMAT):  # 2: before snapshots (no owner, no snapshot)
            raise errors.NbdcloneError(detail=f"unsupported catalog format {data.get('format')!r}")
        bases = {}
        for n, r in data["bases"].items():
            versions = {v: VersionRecord(**vr) for v, vr in r.pop("versions").items()}
            bases[n] = BaseRecord(**r, versions=versions)
        clones = {n: CloneRecord(**r) for n, r in data["clones"].items()}
        generation = data.get("generation", 0)  # (none before generations)
        if not isinstance(generation, int) or generation < 0:
            raise ValueError(f"generation {generation!r}")
        return cls(bases=bases, clones=clones, generation=generation)

    def clones_of(self, base: str) -> list[str]:
        return sorted(n for n, c in self.clones.items() if c.base == base)

    def next_seq(self) -> int:
        """The creation number of the next clone."""
        return max((c.seq for c in self.clones.values()), default=-1) + 1

    def base_by_id(self, base_id: str) -> BaseRecord | None:
        return next((b for b in self.bases.values() if b.id == base_id), None)

    def public_bases(self) -> dict[str, BaseRecord]:
        """The bases users name (not clones' own)."""
        return {n: b for n, b in self.bases.items() if not b.owner}


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class CatalogStore(Layout):
    """A store's catalog and the records it names. Readers take no lock; writers hold lock()."""

    def __init__(self, path: Path | str, *, fetch_here: FetchHere | None = None) -> None:
        super().__init__(path)
        self.chunks = ChunkStore(self.chunks_dir, self.clock_path, self.make)
        self.fetch_here = fetch_here  # a fleet host's way to fetch with no server running (remote.py)
        self._cached: tuple[tuple[int, int, int], Catalog] | None = None
        # Why the last catalog() read the mirror (catalog.json is damaged or missing); None if it did not.
        self.damaged_catalog: errors.Damaged | None = None
        # The (inode, size, mtime) of catalog.json and its mirror when the lock last found them equal: both
        # are only ever replaced (renamed over), so while neither changes, neither needs reading again.
        self._mirror_checked: tuple[tuple[int, int, int] | None, ...] | None = None

    def fetcher(self) -> Fetch | None:
        """How this store's readers fill chunks staged but not fetched yet: a fleet host's fetcher
        (remote.py); None for a single-host store."""
        if (self.path / FLEET_FILE).exists() or self.chunks.remote.exists():
            return FetchClient(self.path, self.fetch_here)
        return None

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
        self.damaged_catalog = None
        return self._cached[1]

    def _fall_back(self, damage: errors.Damaged) -> Catalog:
        try:
            catalog = load_catalog(self.mirror_path)
        except (errors.Damaged, FileNotFoundError):
            raise damage from None
        if self.damaged_catalog is None or str(self.damaged_catalog) != str(damage):  # once, not at every read
            log.error("%s; reading its mirror %s until it is repaired", damage, self.mirror_path)
        self.damaged_catalog = damage
        return catalog

    def writable_catalog(self) -> Catalog:
        """The catalog, for a command that changes the store: refused while catalog.json is damaged (the
        mirror may be a generation behind it, and a change built on it would drop what it lacks). Caller
        holds the exclusive lock."""
        cat = self.catalog()
        if self.damaged_catalog is not None:
            raise errors.Damaged(
                path=self.catalog_path,
                detail=f"{self.damaged_catalog.fields['detail']}; nothing is changed until "
                "'nbdclone check --repair' has put it aside",
            )
        return cat

    def refresh_mirror(self) -> bool:
        """Write the mirror again if it is missing, damaged or behind catalog.json (a stop between their
        renames). Never over a mirror newer than catalog.json (check --repair decides then), never from a
        damaged catalog.json. Caller holds the exclusive lock; True if it wrote."""
        try:
            text = self.catalog_path.read_bytes()
        except FileNotFoundError:
            return False
        with contextlib.suppress(FileNotFoundError):
            if self.mirror_path.read_bytes() == text:
                return False
        try:
            main = load_catalog(self.catalog_path)
        except errors.Damaged:
            return False
        with contextlib.suppress(errors.Damaged, FileNotFoundError):
            if load_catalog(self.mirror_path).generation > main.generation:
                return False
        write_atomic(self.mirror_path, text.decode(), self.tmp)
        log.warning(
            "%s was behind %s (a stop between their writes); written again", self.mirror_path, self.catalog_path
        )
        return True

    @contextlib.contextmanager
    def lock(self, *, shared: bool = False, repair: bool = False) -> Iterator[None]:
        """The store's lock: exclusive for changes. Taken exclusively, it first brings a mirror a stop left
        behind up to date, and refuses while catalog.json is damaged (writable_catalog), unless `repair`."""
        self.make()
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            if not shared:
                self.keep_reserve()
                try:
                    self.refresh_mirror()
                except OSError as exc:  # a full disk: the command goes on, the next one tries again
                    log.warning("%s is behind %s; not written again: %s", self.mirror_path, self.catalog_path, exc)
                if not repair:
                    self.writable_catalog()
            yield
        finally:
            os.close(fd)

    def write_catalog(self, catalog: Catalog) -> None:
        """Replace catalog.json atomically and durably, then its mirror, as the generation after the one it
        replaces. Refused while catalog.json is damaged (writable_catalog). Caller holds the exclusive lock."""
        current = self.writable_catalog()
        generation = max(catalog.generation, current.generation) + 1
        text = seal_json(replace(catalog, generation=generation).to_json())
        for path in (self.catalog_path, self.mirror_path):
            self.with_room(path.name, functools.partial(write_atomic, path, text, self.tmp))

    def get_base(self, name: str) -> BaseRecord:
        if not is_own_base(name):  # a clone's own base is reached through its record only
            validate_name("base", name)
        record = self.catalog().bases.get(name)
        if record is None:
            raise errors.BaseNotFound(name=name, store=self.path)
        return record

    def current_version(self, record: BaseRecord) -> str:
        """The version the base's pointer names: checked (checksum, and a version the base has) before
        anything may act on it."""
        path = self.pointer_path(record)
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
        """Every map whose chunks are kept: the catalog's versions' and those in quarantine/ (a record a
        repair could not read may name them; a damaged one is skipped: it names nothing usable)."""
        for base in (catalog or self.catalog()).bases.values():
            for vid in base.versions:
                yield self.version_map(base, vid, digests=digests)
        for path in self.quarantined_maps():
            try:
                yield VersionMap.load(path, digests=digests)
            except errors.Damaged as exc:
                log.error("%s: its chunks are not kept for it", exc)

    def get_clone(self, name: str) -> CloneRecord:
        validate_name("clone", name)
        record = self.catalog().clones.get(name)
        if record is None:
            raise errors.CloneNotFound(name=name, store=self.path)
        return record

    def clone_state(self, record: CloneRecord) -> CloneState | None:
        """Where the clone is (None: never opened), checked against the catalog before anything acts on it."""
        state = read_state(self.clone_dir(record))
        if state is not None and state.version is not None:
            base = self.state_base(record, state)
            if base is None or state.version not in base.versions:
                raise errors.Damaged(
                    path=self.state_path(record),
                    detail=f"it names version {state.version!r}, which base {record.base} does not have",
                )
        return state

    def state_base(self, record: CloneRecord, state: CloneState) -> BaseRecord | None:
        """The base whose version the clone's overlay sits on (None for a blank clone, or a damaged state)."""
        cat = self.catalog()
        if state.base is None:
            return cat.bases.get(record.base or "")
        return cat.base_by_id(state.base)

    def clone_on(self, record: CloneRecord) -> tuple[str | None, str | None]:
        """(base, version) the clone reads now, or for a never-opened clone, the one it will. The base is
        the catalog's for the clone, except between the two steps of a change of base (lineage.py)."""
        state = self.clone_state(record)
        return self.target_on(record) if state is None else self.state_on(record, state)

    def state_on(self, record: CloneRecord, state: CloneState) -> tuple[str | None, str | None]:
        """(base, version) a checked state's overlay sits on."""
        if state.version is None:
            return None, None
        base = self.state_base(record, state)
        assert base is not None  # clone_state checked it
        return base.name, state.version

    def target_on(self, record: CloneRecord) -> tuple[str | None, str | None]:
        """(base, version) the clone's next first connection will use."""
        return record.base, self.target_version(record)

    def target_version(self, record: CloneRecord) -> str | None:
        """The version the clone's next first connection will use."""
        if record.base is None:
            return None
        return record.pin or self.current_version(self.get_base(record.base))

    def clone_version(self, record: CloneRecord) -> str | None:
        """The version the clone reads now (its overlay's), or for a never-opened clone, the one it will."""
        return self.clone_on(record)[1]

    def clone_size(self, record: CloneRecord, vid: str | None) -> int:
        if record.base is None or vid is None:
            return record.size
        return self.get_base(record.base).version(vid, self.path).size


def load_catalog(path: Path) -> Catalog:
    obj, _ = read_sealed_json(path)
    try:
        return Catalog.from_json(obj)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise errors.Damaged(path=path, detail=f"it is not a catalog ({exc})") from None


def read_state(directory: Path) -> CloneState | None:
    """A clone's state.json (None if there is none), checked for damage on its own (see clone_state)."""
    return load_state(directory / STATE)


def load_state(path: Path) -> CloneState | None:
    try:
        obj, _ = read_sealed_json(path)
    except FileNotFoundError:
        return None
    try:
        state = CloneState(**obj)
    except (ValueError, TypeError) as exc:
        raise errors.Damaged(path=path, detail=f"it is not a clone state ({exc})") from None
    if (
        not (isinstance(state.overlay, str) and OVERLAY_RE.fullmatch(state.overlay))
        or not (state.version is None or (isinstance(state.version, str) and VERSION_RE.fullmatch(state.version)))
        or not (state.base is None or (isinstance(state.base, str) and BASE_ID_RE.fullmatch(state.base)))
    ):
        raise errors.Damaged(path=path, detail="it names no valid overlay and version")
    return state
