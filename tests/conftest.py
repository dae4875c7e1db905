from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbdclone.store import _journal
from tests.helpers import Server, free_ports


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


@pytest.fixture(autouse=True, scope="session")
def _shared_memory_left_clean() -> Iterator[None]:
    """Stores made by tests keep their cache access bytes, read-only RocksDB logs and overlays' journals in
    /dev/shm: remove what this session added there."""
    shm = Path("/dev/shm")
    before = set(shm.glob("nbdclone-*"))
    yield
    _journal.collect(Path("/"))  # overlays' journals left by killed writers whose test folders are gone
    for path in set(shm.glob("nbdclone-*")) - before:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


@pytest.fixture
def free_port() -> int:
    """The first of 16 consecutive free TCP ports on 127.0.0.1."""
    return free_ports()
