from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbdclone.store import _journal
from tests.helpers import Server, free_ports

_SHM_BEFORE = pytest.StashKey[set[Path]]()


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def server(tmp_path: Path, store_path: Path) -> Iterator[Server]:
    """A running `nbdclone serve` on a Unix socket; stopped by PID at the end."""
    srv = Server(store_path, tmp_path / "nbd.sock")
    store_path.mkdir(exist_ok=True)
    yield srv.start()
    srv.stop()


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_SHM_BEFORE] = set(Path("/dev/shm").glob("nbdclone-*"))


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Stores made by tests keep their cache access bytes, read-only RocksDB logs and overlays' journals in
    /dev/shm: remove what this session added there. Only the controlling process does, once its workers
    are done (a worker doing it would take what the other worker's tests still use)."""
    if hasattr(session.config, "workerinput"):
        return
    before = session.config.stash.get(_SHM_BEFORE, set())
    _journal.collect(Path("/"))  # overlays' journals left by killed writers whose test folders are gone
    for path in set(Path("/dev/shm").glob("nbdclone-*")) - before:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


@pytest.fixture
def free_port() -> int:
    """The first of 16 consecutive free TCP ports on 127.0.0.1."""
    return free_ports()
