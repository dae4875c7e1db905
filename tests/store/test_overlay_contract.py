"""One contract every overlay implementation passes."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbdclone.errors import StorageError
from nbdclone.store._rocks import (
    BLOCK_CACHE_BYTES,
    DATA_FILE,
    EMPTY_MARK,
    WRITTEN_FILE,
    RocksOverlay,
    _shared_resources,
    create_overlay,
    overlay_in_use,
)
from nbdclone.store.overlay import BASE, BLOCK_SIZE, DATA, ZEROED, MemoryOverlay, Overlay


def block(fill: int) -> bytes:
    return bytes([fill]) * BLOCK_SIZE


class OverlayContract:
    """Subclasses provide `make` (a new empty overlay) and `reopen` (the same overlay, closed and reopened)."""

    def make(self) -> Overlay:
        raise NotImplementedError

    def reopen(self, overlay: Overlay) -> Overlay:
        raise NotImplementedError

    def read(self, ov: Overlay, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        ov.read(memoryview(buf), offset)
        return bytes(buf)

    def test_new_overlay_is_empty(self) -> None:
        ov = self.make()
        assert list(ov.scan()) == []
        assert ov.bytes_written() == 0

    def test_write_apply_then_read(self) -> None:
        ov = self.make()
        ov.write([block(1), block(2), block(3)], 1 * BLOCK_SIZE)
        ov.apply([(1, DATA), (2, DATA), (3, DATA)], written=3 * BLOCK_SIZE)
        assert self.read(ov, BLOCK_SIZE, 3 * BLOCK_SIZE) == block(1) + block(2) + block(3)
        assert ov.bytes_written() == 3 * BLOCK_SIZE

    @pytest.mark.parametrize(
        ("offset", "length"),
        [
            pytest.param(BLOCK_SIZE + 1, 10, id="inside-one-block"),
            pytest.param(BLOCK_SIZE - 0, 2 * BLOCK_SIZE - 7, id="aligned-start-short-end"),
            pytest.param(2 * BLOCK_SIZE - 5, 10, id="across-a-block-boundary"),
        ],
    )
    def test_unaligned_reads(self, offset: int, length: int) -> None:
        ov = self.make()
        data = block(1) + block(2)
        ov.write([data], BLOCK_SIZE)
        ov.apply([(1, DATA), (2, DATA)])
        assert self.read(ov, offset, length) == data[offset - BLOCK_SIZE : offset - BLOCK_SIZE + length]

    def test_scan_is_in_block_order_with_states(self) -> None:
        ov = self.make()
        ov.write([block(1)], 300 * BLOCK_SIZE)
        ov.write([block(2)], 70000 * BLOCK_SIZE)
        ov.apply([(300, DATA), (2, ZEROED), (70000, DATA), (256, ZEROED)])
        assert list(ov.scan()) == [(2, ZEROED), (256, ZEROED), (300, DATA), (70000, DATA)]

    def test_base_drops_the_entry(self) -> None:
        ov = self.make()
        ov.write([block(5)], 5 * BLOCK_SIZE)
        ov.apply([(5, DATA), (6, ZEROED)])
        ov.apply([(5, BASE), (6, BASE), (7, BASE)])
        assert list(ov.scan()) == []

    def test_rewriting_a_data_block_needs_no_map_change(self) -> None:
        ov = self.make()
        ov.write([block(1)], 9 * BLOCK_SIZE)
        ov.apply([(9, DATA)])
        ov.write([block(2)], 9 * BLOCK_SIZE)
        assert self.read(ov, 9 * BLOCK_SIZE, BLOCK_SIZE) == block(2)
        ov.apply([(9, ZEROED)])
        assert list(ov.scan()) == [(9, ZEROED)]
        ov.write([block(3)], 9 * BLOCK_SIZE)
        ov.apply([(9, DATA)])
        assert self.read(ov, 9 * BLOCK_SIZE, BLOCK_SIZE) == block(3)

    @pytest.mark.parametrize("in_database", [False, True], ids=["new-overlay", "after-a-zero-marker"])
    def test_write_block_is_a_write_then_an_apply(self, in_database: bool) -> None:
        ov = self.make()
        if in_database:  # a zero marker over a base block moves a marked overlay's map to the database
            ov.apply([(1, ZEROED)])
        ov.write_block(memoryview(block(4)), 4 * BLOCK_SIZE, new=True, sync=False)
        ov.write_block(memoryview(block(5)), 4 * BLOCK_SIZE, new=False, sync=False)  # a rewrite
        ov.write_block(memoryview(block(6)), 600 * BLOCK_SIZE, new=True, sync=True)
        ov.write_block(memoryview(block(7)), 7 * BLOCK_SIZE, new=True, sync=False)
        assert self.read(ov, 4 * BLOCK_SIZE, BLOCK_SIZE) == block(5)
        assert ov.bytes_written() == 4 * BLOCK_SIZE
        ov.flush()
        ov = self.reopen(ov)
        zero = [(1, ZEROED)] if in_database else []
        assert list(ov.scan()) == [*zero, (4, DATA), (7, DATA), (600, DATA)]
        assert self.read(ov, 4 * BLOCK_SIZE, BLOCK_SIZE) == block(5)
        assert self.read(ov, 600 * BLOCK_SIZE, BLOCK_SIZE) == block(6)
        assert ov.bytes_written() == 4 * BLOCK_SIZE

    def test_everything_survives_reopen(self) -> None:
        ov = self.make()
        ov.write([block(7)], 0)
        ov.apply([(0, DATA), (1, ZEROED)], written=123)
        ov.apply([], written=100)
        ov.flush()
        ov = self.reopen(ov)
        assert list(ov.scan()) == [(0, DATA), (1, ZEROED)]
        assert self.read(ov, 0, BLOCK_SIZE) == block(7)
        assert ov.bytes_written() == 223

    def test_writes_and_trims_survive_reopen(self) -> None:
        ov = self.make()
        ov.write([block(1), block(2), block(3), block(4)], 0)
        ov.apply([(b, DATA) for b in range(4)], written=4 * BLOCK_SIZE)
        ov.write([block(9)], 9000 * BLOCK_SIZE)
        ov.apply([(9000, DATA), (2, BASE), (5, BASE)], written=BLOCK_SIZE)
        ov.flush()
        ov = self.reopen(ov)
        assert list(ov.scan()) == [(0, DATA), (1, DATA), (3, DATA), (9000, DATA)]
        assert self.read(ov, 0, 2 * BLOCK_SIZE) == block(1) + block(2)
        assert self.read(ov, 3 * BLOCK_SIZE, BLOCK_SIZE) == block(4)
        assert self.read(ov, 9000 * BLOCK_SIZE, BLOCK_SIZE) == block(9)
        assert ov.bytes_written() == 5 * BLOCK_SIZE

    def test_sync_apply_and_flush_are_accepted(self) -> None:
        ov = self.make()
        ov.write([block(4)], 4 * BLOCK_SIZE)
        ov.apply([(4, DATA)], sync=True)
        ov.flush()
        ov.apply([], written=0, sync=True)
        assert self.read(ov, 4 * BLOCK_SIZE, BLOCK_SIZE) == block(4)


class TestMemoryOverlay(OverlayContract):
    def make(self) -> Overlay:
        return MemoryOverlay()

    def reopen(self, overlay: Overlay) -> Overlay:
        return overlay


class TestRocksOverlay(OverlayContract):
    """On the test machine's disk (ext4): the data file's space is reserved ahead of writes."""

    reserves = True

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

    def test_reading_past_the_data_is_an_error_not_zeros(self) -> None:
        ov = self.make()
        ov.write([block(1)], 0)
        with pytest.raises(StorageError) as info:
            self.read(ov, 4200 * BLOCK_SIZE, BLOCK_SIZE)  # past the 1 MiB of space reserved for block 0
        assert info.value.errno == errno.EIO

    def test_blocks_that_stop_being_data_give_their_space_back(self) -> None:
        ov = self.make()
        assert isinstance(ov, RocksOverlay)
        ov.write([b"\xaa" * (256 * BLOCK_SIZE)], 0)
        ov.apply([(b, DATA) for b in range(256)])
        data = ov.path / DATA_FILE
        assert data.stat().st_blocks * 512 >= 256 * BLOCK_SIZE
        ov.apply([(b, ZEROED) for b in range(0, 128)] + [(b, BASE) for b in range(128, 255)])
        assert data.stat().st_blocks * 512 <= 2 * BLOCK_SIZE
        assert self.read(ov, 255 * BLOCK_SIZE, BLOCK_SIZE) == b"\xaa" * BLOCK_SIZE

    def test_an_overlay_of_the_old_format_is_refused_not_misread(self) -> None:
        import rocksdict

        path = self.dir / "old"
        db = rocksdict.Rdict(str(path), rocksdict.Options(raw_mode=True))
        db[b"b" + (3).to_bytes(8, "big")] = block(3)
        db[b"i" + (3).to_bytes(8, "big")] = b"d"
        db.close()
        with pytest.raises(StorageError, match="older nbdclone"):
            RocksOverlay(path)

    def test_a_killed_writer_loses_no_acknowledged_change(self) -> None:
        """Blocks that became DATA are mapped lazily; after the writer dies without closing (kill -9),
        the next open finds them in the data file. Zero markers and trims were written before returning."""
        import subprocess
        import sys

        ov = self.make()
        assert isinstance(ov, RocksOverlay)
        ov.write([block(1) * 3], 0)
        ov.apply([(0, DATA), (1, DATA), (2, DATA)], written=3 * BLOCK_SIZE)
        ov.close()
        code = f"""
import os, signal
from pathlib import Path
from nbdclone.store._rocks import RocksOverlay
from nbdclone.store.overlay import BASE, DATA, ZEROED
ov = RocksOverlay(Path({str(ov.path)!r}))
ov.write([b"\\x07" * {BLOCK_SIZE}], {10 * BLOCK_SIZE})
ov.apply([(10, DATA)])
ov.write([b"\\x08" * {BLOCK_SIZE}], {11 * BLOCK_SIZE})
ov.apply([(11, DATA), (12, ZEROED), (0, ZEROED), (1, BASE)])
ov.write([b"\\x09" * {BLOCK_SIZE}], {13 * BLOCK_SIZE})
ov.apply([(13, DATA)])  # only in memory when the kill lands
# Someone reads the whole data file (a backup, say): reserved space the writer never wrote is now cached
# as zero pages, which SEEK_DATA reports as data. They must not come back as DATA blocks of zeros.
with open(Path({str(ov.path)!r}) / "blocks", "rb") as f:
    while f.read(1 << 20):
        pass
os.kill(os.getpid(), signal.SIGKILL)
"""
        assert subprocess.run([sys.executable, "-c", code]).returncode == -9
        for readonly in (True, False):  # an export of the crashed clone sees the same as the next server
            again = RocksOverlay(ov.path, readonly=readonly)
            try:
                assert list(again.scan()) == [(0, ZEROED), (2, DATA), (10, DATA), (11, DATA), (12, ZEROED), (13, DATA)]
                expect = block(7) + block(8) + bytes(BLOCK_SIZE) + block(9)
                assert self.read(again, 10 * BLOCK_SIZE, 4 * BLOCK_SIZE) == expect
                assert self.read(again, 2 * BLOCK_SIZE, BLOCK_SIZE) == block(1)
            finally:
                again.close()

    def test_a_kill_between_punch_and_map_keeps_an_acknowledged_write(self) -> None:
        """Block 5 was written (acknowledged, its DATA entry still pending), then a zero request for it dies
        after the punch and before its batch. Block 5 must read as that write or as zeros, never as the base."""
        import subprocess
        import sys

        ov = self.make()
        assert isinstance(ov, RocksOverlay)
        ov.close()
        code = f"""
import os, signal
from pathlib import Path
from nbdclone.store import _rocks
from nbdclone.store.overlay import DATA, ZEROED
real = _rocks.RocksOverlay._write_map
def dying(self, others, *, sync):
    if others:  # the zero request's batch: the punch is done
        os.kill(os.getpid(), signal.SIGKILL)
    real(self, others, sync=sync)
_rocks.RocksOverlay._write_map = dying
ov = _rocks.RocksOverlay(Path({str(ov.path)!r}))
ov.write([b"\\x05" * {BLOCK_SIZE}], {5 * BLOCK_SIZE})
ov.apply([(5, DATA)])
ov.apply([(5, ZEROED)])
"""
        assert subprocess.run([sys.executable, "-c", code]).returncode == -9
        again = RocksOverlay(ov.path)
        try:
            state = dict(again.scan()).get(5, BASE)
            assert state != BASE
            if state == DATA:
                assert self.read(again, 5 * BLOCK_SIZE, BLOCK_SIZE) in (block(5), bytes(BLOCK_SIZE))
        finally:
            again.close()

    def test_reserved_space_is_released_at_close(self) -> None:
        ov = self.make()
        assert isinstance(ov, RocksOverlay)
        for b in (0, 1300):  # two 1 MiB groups
            ov.write([block(b % 250 + 1)], b * BLOCK_SIZE)
            ov.apply([(b, DATA)])
        data = ov.path / DATA_FILE
        if self.reserves:
            assert data.stat().st_blocks * 512 >= 2 << 20
        ov.close()
        assert data.stat().st_blocks * 512 <= 4 * BLOCK_SIZE  # the two blocks (and perhaps an extent tree block)
        again = RocksOverlay(ov.path, readonly=True)
        try:
            assert list(again.scan()) == [(0, DATA), (1300, DATA)]
            assert self.read(again, 1300 * BLOCK_SIZE, BLOCK_SIZE) == block(1300 % 250 + 1)
        finally:
            again.close()

    def test_a_flush_after_nothing_syncs_nothing_and_a_failed_sync_is_redone(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        import os

        from nbdclone.store import _rocks

        synced: list[int] = []
        fail = [False]
        real = os.fdatasync

        def fdatasync(fd: int) -> None:
            if fail[0]:
                fail[0] = False
                raise OSError(errno.EIO, "injected")
            synced.append(fd)
            real(fd)

        ov = self.make()
        assert isinstance(ov, RocksOverlay)
        monkeypatch.setattr(_rocks.os, "fdatasync", fdatasync)
        ov.write([block(1)], 0)
        ov.apply([(0, DATA)], written=BLOCK_SIZE)
        ov.flush()
        assert len(synced) == 1
        ov.flush()  # nothing since: no sync
        assert len(synced) == 1
        ov.write([block(2)], 0)  # a rewrite changes no map entry, but its bytes need the next sync
        ov.apply([], written=BLOCK_SIZE)
        fail[0] = True
        with pytest.raises(StorageError):
            ov.flush()
        ov.flush()  # the failed one does not count as done
        assert len(synced) == 2
        fail[0] = True
        ov.write([block(3)], BLOCK_SIZE)
        with pytest.raises(StorageError):
            ov.apply([(1, DATA)], written=BLOCK_SIZE, sync=True)  # a FUA write whose sync fails
        ov.flush()
        assert len(synced) == 3

    def test_reopened_overlays_share_the_process_block_cache(self) -> None:
        first, second = self.make(), self.make()
        for ov in (first, second):
            ov.apply([(1, ZEROED)])  # a map in the database (a zero marker moves a marked overlay there)
        first, second = self.reopen(first), self.reopen(second)
        assert isinstance(first, RocksOverlay) and isinstance(second, RocksOverlay)
        assert list(first.scan()) == [(1, ZEROED)]
        cache, _ = _shared_resources()
        for ov in (first, second):  # not a cache of its own, as its OPTIONS file alone would give it
            assert ov._db.property_int_value("rocksdb.block-cache-capacity") == BLOCK_CACHE_BYTES
        assert first._db.property_int_value("rocksdb.block-cache-usage") == cache.get_usage()

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


class TestRocksOverlayOnTmpfs(TestRocksOverlay):
    """On tmpfs, which has no FIEMAP: the data file stays sparse and recovery goes by SEEK_DATA."""

    reserves = False

    @pytest.fixture(autouse=True)
    def _dir(self, tmp_path: Path) -> Iterator[None]:
        import subprocess
        import tempfile

        kind = subprocess.run(["stat", "-f", "-c", "%T", "/dev/shm"], capture_output=True, text=True, check=True)
        assert kind.stdout.strip() == "tmpfs", "these tests need /dev/shm to be a tmpfs"
        with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="nbdclone-test-") as d:
            self.dir = Path(d)
            self.opened = []
            yield


class TestRocksOverlayOpenedEmpty(TestRocksOverlay):
    """Overlays made as the store makes them (marked: the data file is the map), so each one is opened
    without its database, and keeps it closed until a change the file cannot hold: the whole contract
    again, and what the mark must guarantee."""

    file_is_map = True
    reserves = False  # not while the file is the map: see the next test

    def test_a_clone_that_writes_a_lot_moves_to_the_database_and_reserves(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from nbdclone.store import _rocks

        monkeypatch.setattr(_rocks, "_FILEMAP_MAX", 3)
        ov = self.make()
        assert isinstance(ov, RocksOverlay)
        data = ov.path / DATA_FILE
        for b in (0, 300, 600):  # three blocks in three 1 MiB groups: the file is still the map
            ov.write([block(b % 250 + 1)], b * BLOCK_SIZE)
            ov.apply([(b, DATA)], written=BLOCK_SIZE)
        assert (ov.path / EMPTY_MARK).exists() == self.file_is_map
        assert data.stat().st_blocks * 512 <= 4 * BLOCK_SIZE  # nothing reserved (and an extent tree block)
        ov.write([block(9)], 900 * BLOCK_SIZE)
        ov.apply([(900, DATA)], written=BLOCK_SIZE)  # the fourth: it moves
        assert not (ov.path / EMPTY_MARK).exists()
        ov.write([block(8)], 1200 * BLOCK_SIZE)
        ov.apply([(1200, DATA)], written=BLOCK_SIZE)
        if self.file_is_map:  # FIEMAP here: from now on space is reserved ahead
            assert data.stat().st_blocks * 512 >= 1 << 20
        again = self.reopen(ov)
        try:
            assert list(again.scan()) == [(b, DATA) for b in (0, 300, 600, 900, 1200)]
            assert self.read(again, 600 * BLOCK_SIZE, BLOCK_SIZE) == block(600 % 250 + 1)
            assert self.read(again, 1200 * BLOCK_SIZE, BLOCK_SIZE) == block(8)
            assert again.bytes_written() == 5 * BLOCK_SIZE
        finally:
            again.close()

    def make(self) -> Overlay:
        path = self.dir / f"ov{len(self.opened)}"
        create_overlay(path)
        ov = RocksOverlay(path)
        self.opened.append(ov)
        return ov

    def test_an_unchanged_overlay_opens_no_database(self) -> None:
        path = self.dir / "new"
        create_overlay(path)
        files = sorted(p.name for p in path.iterdir())
        assert EMPTY_MARK in files
        for readonly in (False, True, False):
            ov = RocksOverlay(path, readonly=readonly)
            assert list(ov.scan()) == []
            ov.flush()
            ov.apply([], written=0, sync=True)
            ov.close()
        # A RocksDB open writes a new MANIFEST, OPTIONS file, WAL and LOG: none of that happened.
        assert sorted(p.name for p in path.iterdir()) == files

    def test_writes_and_trims_keep_the_file_as_the_map(self) -> None:
        """Where FIEMAP tells written extents apart, data and trims need no database: the mark stays, and
        neither the changes nor the flushes nor the next open add a RocksDB file. Elsewhere (tmpfs) the first
        write moves the map to the database."""
        ov = self.make()
        assert isinstance(ov, RocksOverlay)
        files = {p.name for p in ov.path.iterdir()}
        ov.write([block(1), block(2)], 0)
        ov.apply([(0, DATA), (1, DATA)], written=2 * BLOCK_SIZE, sync=True)
        ov.apply([(1, BASE)])
        ov.flush()
        assert (ov.path / EMPTY_MARK).exists() == self.file_is_map
        again = self.reopen(ov)
        try:
            assert list(again.scan()) == [(0, DATA)]
            assert again.bytes_written() == 2 * BLOCK_SIZE
        finally:
            again.close()
        if self.file_is_map:
            assert {p.name for p in ov.path.iterdir()} == files | {DATA_FILE, WRITTEN_FILE}

    def test_a_zero_marker_moves_the_map_to_the_database(self) -> None:
        ov = self.make()
        assert isinstance(ov, RocksOverlay)
        ov.write([block(1)], 0)
        ov.apply([(0, DATA)], written=BLOCK_SIZE)
        ov.apply([(3, ZEROED)])
        assert not (ov.path / EMPTY_MARK).exists()
        again = self.reopen(ov)
        try:
            assert list(again.scan()) == [(0, DATA), (3, ZEROED)]
            assert self.read(again, 0, BLOCK_SIZE) == block(1)
            assert again.bytes_written() == BLOCK_SIZE
        finally:
            again.close()

    def test_a_move_cut_short_leaves_the_file_as_the_map(self) -> None:
        """A crash after the move's batch and before the mark's removal: the database holds entries, the mark
        is still there. The file is the map; the stale entries are ignored, and cleared by the next move."""
        path = self.dir / "cut"
        create_overlay(path)
        (path / EMPTY_MARK).unlink()
        ov = RocksOverlay(path)
        ov.write([block(5)], 5 * BLOCK_SIZE)
        ov.apply([(5, DATA), (6, ZEROED)])
        ov.close()
        (path / EMPTY_MARK).touch()  # as the crash left it, and since then block 5 went back to the base
        ov = RocksOverlay(path)
        ov.apply([(5, BASE)])
        assert list(ov.scan()) == []
        ov.apply([(7, ZEROED)])
        again = self.reopen(ov)
        try:
            assert list(again.scan()) == [(7, ZEROED)]
        finally:
            again.close()

    def test_a_writer_killed_after_its_first_write_loses_nothing(self) -> None:
        import subprocess
        import sys

        path = self.dir / "killed"
        create_overlay(path)
        code = f"""
import os, signal
from pathlib import Path
from nbdclone.store._rocks import RocksOverlay
from nbdclone.store.overlay import DATA
ov = RocksOverlay(Path({str(path)!r}))
ov.write([b"\\x06" * {BLOCK_SIZE}], {6 * BLOCK_SIZE})
ov.apply([(6, DATA)], written={BLOCK_SIZE})
os.kill(os.getpid(), signal.SIGKILL)
"""
        assert subprocess.run([sys.executable, "-c", code]).returncode == -9
        again = RocksOverlay(path)
        try:
            assert list(again.scan()) == [(6, DATA)]
            assert self.read(again, 6 * BLOCK_SIZE, BLOCK_SIZE) == block(6)
        finally:
            again.close()

    def test_a_second_writer_process_is_refused(self) -> None:
        import subprocess
        import sys

        ov = self.make()
        code = (
            "import sys; from pathlib import Path; from nbdclone.store._rocks import RocksOverlay\n"
            "try:\n    RocksOverlay(Path(sys.argv[1]))\nexcept Exception as e:\n"
            "    sys.exit(4 if getattr(e, 'errno', 0) == 16 else 5)\n"
        )
        assert isinstance(ov, RocksOverlay)
        assert subprocess.run([sys.executable, "-c", code, str(ov.path)]).returncode == 4
        ov.write([block(2)], 0)  # now RocksDB's own lock: still refused
        assert subprocess.run([sys.executable, "-c", code, str(ov.path)]).returncode == 4


class TestRocksOverlayOpenedEmptyOnTmpfs(TestRocksOverlayOpenedEmpty, TestRocksOverlayOnTmpfs):
    """Marked overlays where the file system has no FIEMAP: the first write moves the map to the database."""

    file_is_map = False
