from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Server


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
