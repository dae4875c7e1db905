"""The store on disk: bases, clones and the catalog that names them.

    STORE/
      catalog.json      names -> records; replaced atomically (tmp, fsync, rename, fsync dir)
      lock              flock: exclusive for changes (CLI), shared while a server opens a clone
      bases/ID.raw      imported base images, read-only, sparse
      clones/ID/        one RocksDB overlay per clone
      tmp/              imports and exports in progress
      run/server.json   where the running server listens

Names are keys in the catalog and never become paths: files are named by random ids, so an export name
from the network can only ever be looked up.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from nbdclone import errors
from nbdclone.store._rocks import RocksOverlay, overlay_in_use

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
CATALOG_FORMAT = 1


def default_store() -> Path:
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(data) / "nbdclone"


def validate_name(kind: Literal["base", "clone"], name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise errors.InvalidName(kind=kind, name=name if len(name) <= 80 else name[:77] + "...")
    return name


def is_valid_name(name: str) -> bool:
    return bool(NAME_RE.fullmatch(name))


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True, slots=True)
class BaseRecord:
    name: str
    id: str
    size: int
    created: str
    source: str


@dataclass(frozen=True, slots=True)
class CloneRecord:
    name: str
    id: str
    base: str | None
    size: int
    created: str


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
        return cls(
            bases={n: BaseRecord(**r) for n, r in data["bases"].items()},
            clones={n: CloneRecord(**r) for n, r in data["clones"].items()},
        )

    def clones_of(self, base: str) -> list[str]:
        return sorted(n for n, c in self.clones.items() if c.base == base)


class Store:
    """One store directory. Safe to use from many processes at once."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path).absolute()
        self._cached: tuple[tuple[int, int, int], Catalog] | None = None

    # -- paths ---------------------------------------------------------------------------------------

    @property
    def catalog_path(self) -> Path:
        return self.path / "catalog.json"

    def base_path(self, record: BaseRecord) -> Path:
        return self.path / "bases" / f"{record.id}.raw"

    def clone_path(self, record: CloneRecord) -> Path:
        return self.path / "clones" / record.id

    @property
    def tmp(self) -> Path:
        return self.path / "tmp"

    @property
    def server_info_path(self) -> Path:
        return self.path / "run" / "server.json"

    # -- catalog -------------------------------------------------------------------------------------

    def catalog(self) -> Catalog:
        """The current catalog; re-read only when the file changed (it is replaced, never edited)."""
        try:
            st = os.stat(self.catalog_path)
        except FileNotFoundError:
            return Catalog()
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._cached is None or self._cached[0] != key:
            with open(self.catalog_path, encoding="utf-8") as f:
                self._cached = (key, Catalog.from_json(json.load(f)))
        return self._cached[1]

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
        """Replace catalog.json atomically and durably. Caller holds the exclusive lock."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp / f"catalog.{uuid.uuid4().hex}.json"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(catalog.to_json(), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, self.catalog_path)
        fsync_dir(self.path)

    def _init_dirs(self) -> None:
        for sub in ("bases", "clones", "tmp", "run"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)

    # -- bases ---------------------------------------------------------------------------------------

    def get_base(self, name: str) -> BaseRecord:
        validate_name("base", name)
        record = self.catalog().bases.get(name)
        if record is None:
            raise errors.BaseNotFound(name=name, store=self.path)
        return record

    def add_base(self, name: str, image: Path, source: str) -> BaseRecord:
        """Adopt `image` (a finished raw file under tmp/) as base `name`."""
        validate_name("base", name)
        with self.lock():
            cat = self.catalog()
            if name in cat.bases:
                raise errors.BaseExists(name=name, store=self.path)
            record = BaseRecord(name, uuid.uuid4().hex, image.stat().st_size, now(), source)
            os.chmod(image, 0o444)
            os.rename(image, self.base_path(record))
            fsync_dir(self.path / "bases")
            self._write_catalog(replace(cat, bases={**cat.bases, name: record}))
        log.info("imported base %s (%d bytes)", name, record.size)
        return record

    def remove_base(self, name: str) -> None:
        with self.lock():
            record = self.get_base(name)
            cat = self.catalog()
            users = cat.clones_of(name)
            if users:
                raise errors.BaseInUse(name=name, clones=", ".join(users))
            self._write_catalog(replace(cat, bases={n: r for n, r in cat.bases.items() if n != name}))
            self.base_path(record).unlink(missing_ok=True)

    def new_tmp_file(self, suffix: str) -> Path:
        self._init_dirs()
        return self.tmp / f"{uuid.uuid4().hex}{suffix}"

    # -- clones --------------------------------------------------------------------------------------

    def get_clone(self, name: str) -> CloneRecord:
        validate_name("clone", name)
        record = self.catalog().clones.get(name)
        if record is None:
            raise errors.CloneNotFound(name=name, store=self.path)
        return record

    def create_clone(self, name: str, *, base: str | None, size: int | None = None) -> CloneRecord:
        validate_name("clone", name)
        if base is None and not size:
            raise errors.InvalidArgument(detail="a clone needs --base BASE or --size SIZE")
        with self.lock():
            self._init_dirs()
            cat = self.catalog()
            if name in cat.clones:
                raise errors.CloneExists(name=name, store=self.path)
            if base is not None:
                size = self.get_base(base).size
            assert size is not None
            record = CloneRecord(name, uuid.uuid4().hex, base, size, now())
            self._new_overlay(record)
            self._write_catalog(replace(cat, clones={**cat.clones, name: record}))
        return record

    def _new_overlay(self, record: CloneRecord) -> None:
        path = self.clone_path(record)
        RocksOverlay(path, create=True).close()
        fsync_dir(path.parent)

    def remove_clone(self, name: str) -> None:
        with self.lock():
            record = self.get_clone(name)
            self._refuse_if_open(record)
            cat = self.catalog()
            self._write_catalog(replace(cat, clones={n: r for n, r in cat.clones.items() if n != name}))
            shutil.rmtree(self.clone_path(record), ignore_errors=True)

    def reset_clone(self, name: str) -> CloneRecord:
        """Drop every write of the clone: point it at a fresh empty overlay, then delete the old one."""
        with self.lock():
            old = self.get_clone(name)
            self._refuse_if_open(old)
            new = replace(old, id=uuid.uuid4().hex)
            self._new_overlay(new)
            cat = self.catalog()
            self._write_catalog(replace(cat, clones={**cat.clones, name: new}))
            shutil.rmtree(self.clone_path(old), ignore_errors=True)
        return new

    def _refuse_if_open(self, record: CloneRecord) -> None:
        if overlay_in_use(self.clone_path(record)):
            raise errors.CloneInUse(name=record.name)

    # -- the running server --------------------------------------------------------------------------

    def write_server_info(self, info: dict[str, Any]) -> None:
        self._init_dirs()
        tmp = self.server_info_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(info))
        os.rename(tmp, self.server_info_path)

    def server_info(self) -> dict[str, Any]:
        try:
            info: dict[str, Any] = json.loads(self.server_info_path.read_text())
        except (FileNotFoundError, ValueError):
            raise errors.ServerNotRunning(store=self.path) from None
        if not _pid_alive(int(info.get("pid", 0))):
            raise errors.ServerNotRunning(store=self.path)
        return info

    def clear_server_info(self, pid: int) -> None:
        with contextlib.suppress(FileNotFoundError, ValueError):
            if json.loads(self.server_info_path.read_text()).get("pid") == pid:
                self.server_info_path.unlink()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
