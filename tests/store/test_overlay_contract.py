"""One contract every overlay implementation passes."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from nbdclone.errors import StorageError
from nbdclone.store._rocks import RocksOverlay, overlay_in_use
from nbdclone.store.overlay import BLOCK_SIZE, ZERO, MemoryOverlay, Overlay


def block(fill: int) -> bytes:
    return bytes([fill]) * BLOCK_SIZE


class OverlayContract:
    """Subclasses provide `make` (a new empty overlay) and `reopen` (the same overlay, closed and reopened)."""

    def make(self) -> Overlay:
        raise NotImplementedError

    def reopen(self, overlay: Overlay) -> Overlay:
        raise NotImplementedError

    def test_new_overlay_is_empty(self) -> None:
        ov = self.make()
        assert list(ov.scan()) == []
        assert ov.bytes_written() == 0

    def test_put_then_get(self) -> None:
        ov = self.make()
        ov.apply([(3, block(3)), (1, block(1))], written=2 * BLOCK_SIZE)
        assert ov.get([1, 3]) == [block(1), block(3)]
        assert ov.bytes_written() == 2 * BLOCK_SIZE

    def test_scan_is_in_block_order_and_flags_zero_markers(self) -> None:
        ov = self.make()
        ov.apply([(300, block(1)), (2, ZERO), (70000, block(2)), (256, ZERO)])
        assert list(ov.scan()) == [(2, True), (256, True), (300, False), (70000, False)]

    def test_none_drops_the_entry(self) -> None:
        ov = self.make()
        ov.apply([(5, block(5)), (6, ZERO)])
        ov.apply([(5, None), (6, None), (7, None)])
        assert list(ov.scan()) == []

    def test_later_change_of_a_block_wins(self) -> None:
        ov = self.make()
        ov.apply([(9, block(1))])
        ov.apply([(9, block(2))])
        ov.apply([(9, ZERO)])
        assert list(ov.scan()) == [(9, True)]
        ov.apply([(9, block(3))])
        assert ov.get([9]) == [block(3)]

    def test_everything_survives_reopen(self) -> None:
        ov = self.make()
        ov.apply([(0, block(7)), (1, ZERO)], written=123)
        ov.flush()
        ov = self.reopen(ov)
        assert list(ov.scan()) == [(0, False), (1, True)]
        assert ov.get([0]) == [block(7)]
        assert ov.bytes_written() == 123

    def test_sync_apply_and_flush_are_accepted(self) -> None:
        ov = self.make()
        ov.apply([(4, block(4))], sync=True)
        ov.flush()
        ov.apply([], written=0, sync=True)
        assert ov.get([4]) == [block(4)]


class TestMemoryOverlay(OverlayContract):
    def make(self) -> Overlay:
        return MemoryOverlay()

    def reopen(self, overlay: Overlay) -> Overlay:
        return overlay


class TestRocksOverlay(OverlayContract):
    @pytest.fixture(autouse=True)
    def _dir(self, tmp_path: Path) -> None:
        self.dir = tmp_path
        self.opened: list[RocksOverlay] = []

    def make(self) -> Overlay:
        ov = RocksOverlay(self.dir / f"ov{len(self.opened)}", create=True)
        self.opened.append(ov)
        return ov

    def reopen(self, overlay: Overlay) -> Overlay:
        assert isinstance(overlay, RocksOverlay)
        overlay.close()
        return RocksOverlay(overlay.path)

    def test_missing_overlay_is_an_error_and_creates_nothing(self) -> None:
        path = self.dir / "missing"
        with pytest.raises(StorageError) as info:
            RocksOverlay(path)
        assert info.value.errno == errno.ENOENT
        assert not path.exists()

    def test_missing_block_is_an_error_not_zeros(self) -> None:
        ov = self.make()
        with pytest.raises(StorageError):
            ov.get([42])

    def test_in_use_is_seen_from_another_process(self) -> None:
        import subprocess
        import sys

        ov = self.make()
        assert isinstance(ov, RocksOverlay)
        code = (
            "import sys; from pathlib import Path; from nbdclone.store._rocks import overlay_in_use;"
            "sys.exit(0 if overlay_in_use(Path(sys.argv[1])) else 3)"
        )
        assert subprocess.run([sys.executable, "-c", code, str(ov.path)]).returncode == 0
        ov.close()
        assert not overlay_in_use(ov.path)
