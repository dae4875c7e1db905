"""One contract every overlay implementation passes; the RocksDB overlay on every kind of file system."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from nbdclone.errors import Damaged, StorageError
from nbdclone.store import _blockmap, _rocks
from nbdclone.store._datafile import NAME as DATA_FILE
from nbdclone.store._rocks import LEGACY_MARK, REGION_SHIFT, RocksOverlay, create_overlay, overlay_in_use
from nbdclone.store.overlay import BASE, BLOCK_SIZE, DATA, ZEROED, MemoryOverlay, Move, Overlay
from tests.filesystems import KINDS, fresh_dir, mounted


def block(fill: int) -> bytes:
    return bytes([fill]) * BLOCK_SIZE


def update(ov: Overlay, bufs: Sequence[bytes], offset: int, moves: Sequence[Move], written: int = 0) -> None:
    with ov.lock:
        ov.update(bufs, offset, moves, written=written)


def read(ov: Overlay, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    ov.read(memoryview(buf), offset)
    return bytes(buf)


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

    def test_update_then_read(self) -> None:
        ov = self.make()
        update(ov, [block(1), block(2), block(3)], BLOCK_SIZE, [(b, BASE, DATA) for b in (1, 2, 3)], 3 * BLOCK_SIZE)
        assert read(ov, BLOCK_SIZE, 3 * BLOCK_SIZE) == block(1) + block(2) + block(3)
        assert ov.bytes_written() == 3 * BLOCK_SIZE

    @pytest.mark.parametrize(
        ("offset", "length"),
        [
            pytest.param(BLOCK_SIZE + 1, 10, id="inside-one-block"),
            pytest.param(BLOCK_SIZE, 2 * BLOCK_SIZE - 7, id="aligned-start-short-end"),
            pytest.param(2 * BLOCK_SIZE - 5, 10, id="across-a-block-boundary"),
        ],
    )
    def test_unaligned_reads(self, offset: int, length: int) -> None:
        ov = self.make()
        data = block(1) + block(2)
        update(ov, [data], BLOCK_SIZE, [(1, BASE, DATA), (2, BASE, DATA)])
        assert read(ov, offset, length) == data[offset - BLOCK_SIZE : offset - BLOCK_SIZE + length]

    def test_scan_is_in_block_order_with_states(self) -> None:
        ov = self.make()
        update(ov, [block(1)], 300 * BLOCK_SIZE, [(300, BASE, DATA)])
        update(ov, [block(2)], 70000 * BLOCK_SIZE, [(70000, ZEROED, DATA)])
        update(ov, [], 0, [(2, BASE, ZEROED), (256, BASE, ZEROED)])
        ov = self.reopen(ov)
        assert list(ov.scan()) == [(2, ZEROED), (256, ZEROED), (300, DATA), (70000, DATA)]

    def test_base_drops_the_entry(self) -> None:
        ov = self.make()
        update(ov, [block(5)], 5 * BLOCK_SIZE, [(5, BASE, DATA)])
        update(ov, [], 0, [(6, BASE, ZEROED)])
        update(ov, [], 0, [(5, DATA, BASE), (6, ZEROED, BASE)])
        ov = self.reopen(ov)
        assert list(ov.scan()) == []

    def test_rewriting_a_data_block_needs_no_map_change(self) -> None:
        ov = self.make()
        update(ov, [block(1)], 9 * BLOCK_SIZE, [(9, BASE, DATA)])
        update(ov, [block(2)], 9 * BLOCK_SIZE, [])
        assert read(ov, 9 * BLOCK_SIZE, BLOCK_SIZE) == block(2)
        update(ov, [], 0, [(9, DATA, ZEROED)])
        update(ov, [block(3)], 9 * BLOCK_SIZE, [(9, ZEROED, DATA)])
        assert read(ov, 9 * BLOCK_SIZE, BLOCK_SIZE) == block(3)
        ov = self.reopen(ov)
        assert list(ov.scan()) == [(9, DATA)]
        assert read(ov, 9 * BLOCK_SIZE, BLOCK_SIZE) == block(3)

    def test_everything_survives_reopen(self) -> None:
        ov = self.make()
        update(ov, [block(7)], 0, [(0, BASE, DATA), (1, BASE, ZEROED)], 123)
        update(ov, [], 0, [], 100)
        ov.flush()
        ov = self.reopen(ov)
        assert list(ov.scan()) == [(0, DATA), (1, ZEROED)]
        assert read(ov, 0, BLOCK_SIZE) == block(7)
        assert ov.bytes_written() == 223

    def test_writes_and_trims_survive_reopen(self) -> None:
        ov = self.make()
        update(ov, [block(1), block(2), block(3), block(4)], 0, [(b, BASE, DATA) for b in range(4)], 4 * BLOCK_SIZE)
        update(ov, [block(9)], 9000 * BLOCK_SIZE, [(9000, BASE, DATA)], BLOCK_SIZE)
        update(ov, [], 0, [(2, DATA, BASE), (5, BASE, BASE)])
        ov = self.reopen(ov)
        assert list(ov.scan()) == [(0, DATA), (1, DATA), (3, DATA), (9000, DATA)]
        assert read(ov, 0, 2 * BLOCK_SIZE) == block(1) + block(2)
        assert read(ov, 3 * BLOCK_SIZE, BLOCK_SIZE) == block(4)
        assert read(ov, 9000 * BLOCK_SIZE, BLOCK_SIZE) == block(9)
        assert ov.bytes_written() == 5 * BLOCK_SIZE


class TestMemoryOverlay(OverlayContract):
    def make(self) -> Overlay:
        return MemoryOverlay()

    def reopen(self, overlay: Overlay) -> Overlay:
        return overlay


@pytest.fixture(scope="module", params=list(KINDS))
def fs_root(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with mounted(request.param, tmp_path_factory.mktemp("fs")) as root:
        yield root


class TestRocksOverlay(OverlayContract):
    """The whole contract, and what RocksDB's overlay adds, on each kind of file system (I1: none of it may
    depend on what the file system says about the data file)."""

    @pytest.fixture(autouse=True)
    def _dir(self, fs_root: Path) -> Iterator[None]:
        self.dir = fresh_dir(fs_root)
        self.opened: list[RocksOverlay] = []
        yield
        for ov in self.opened:
            try:
                ov.close()
            except Exception:  # closed by the test already
                pass

    def make(self) -> Overlay:
        path = self.dir / f"ov{len(self.opened)}"
        create_overlay(path)
        ov = RocksOverlay(path)
        self.opened.append(ov)
        return ov

    def reopen(self, overlay: Overlay) -> Overlay:
        assert isinstance(overlay, RocksOverlay)
        overlay.close()
        ov = RocksOverlay(overlay.path)
        self.opened.append(ov)
        return ov

    def test_missing_overlay_is_an_error_and_creates_nothing(self) -> None:
        path = self.dir / "missing"
        with pytest.raises(StorageError) as info:
            RocksOverlay(path)
        assert info.value.errno == errno.ENOENT
        assert not path.exists()

    def test_reading_past_the_data_is_an_error_not_zeros(self) -> None:
        ov = self.make()
        update(ov, [block(1)], 0, [(0, BASE, DATA)])
        with pytest.raises(StorageError) as info:
            read(ov, 4200 * BLOCK_SIZE, BLOCK_SIZE)
        assert info.value.errno == errno.EIO

    def test_freed_blocks_give_their_space_back_after_the_flush_not_before(self) -> None:
        ov = self.make()
        assert isinstance(ov, RocksOverlay)
        update(ov, [b"\xaa" * (256 * BLOCK_SIZE)], 0, [(b, BASE, DATA) for b in range(256)])
        ov.flush()
        data = ov.path / DATA_FILE
        held = data.stat().st_blocks * 512
        update(ov, [], 0, [(b, DATA, ZEROED) for b in range(0, 128)] + [(b, DATA, BASE) for b in range(128, 255)])
        assert data.stat().st_blocks * 512 == held  # I4: their entries are not durable yet
        ov.flush()
        if _punches(self.dir):
            assert data.stat().st_blocks * 512 <= held // 8
        assert read(ov, 255 * BLOCK_SIZE, BLOCK_SIZE) == b"\xaa" * BLOCK_SIZE

    def test_a_block_written_again_before_the_flush_is_not_punched(self) -> None:
        ov = self.make()
        update(ov, [block(1)], 0, [(0, BASE, DATA)])
        ov.flush()
        update(ov, [], 0, [(0, DATA, BASE)])
        update(ov, [block(2)], 0, [(0, BASE, DATA)])
        ov.flush()
        assert read(ov, 0, BLOCK_SIZE) == block(2)
        ov = self.reopen(ov)
        assert read(ov, 0, BLOCK_SIZE) == block(2)

    def test_an_overlay_of_an_old_format_is_refused_not_misread(self) -> None:
        import rocksdict

        path = self.dir / "old"
        db = rocksdict.Rdict(str(path), rocksdict.Options(raw_mode=True))
        db[b"b" + (3).to_bytes(8, "big")] = block(3)
        db[b"i" + (3).to_bytes(8, "big")] = b"d"
        db.close()
        with pytest.raises(StorageError, match="older nbdclone"):
            RocksOverlay(path)
        create_overlay(self.dir / "marked")
        (self.dir / "marked" / LEGACY_MARK).touch()
        with pytest.raises(StorageError, match=r"nbdclone 0\.1"):
            RocksOverlay(self.dir / "marked")

    def test_a_killed_writer_loses_no_acknowledged_change(self) -> None:
        """kill -9 of a real process (I2): every update that returned reads back, from a read-only open (an
        export of the crashed clone) as from the next server's."""
        ov = self.make()
        assert isinstance(ov, RocksOverlay)
        update(ov, [block(1) * 3], 0, [(0, BASE, DATA), (1, BASE, DATA), (2, BASE, DATA)], 3 * BLOCK_SIZE)
        ov.close()
        code = f"""
import os, signal
from pathlib import Path
from nbdclone.store._rocks import RocksOverlay
from nbdclone.store.overlay import BASE, DATA, ZEROED
ov = RocksOverlay(Path({str(ov.path)!r}))
with ov.lock:
    ov.update([b"\\x07" * {BLOCK_SIZE}], {10 * BLOCK_SIZE}, [(10, BASE, DATA)], written=1)
    ov.update([b"\\x08" * {BLOCK_SIZE}], {11 * BLOCK_SIZE}, [(11, BASE, DATA)], written=1)
    ov.update([], 0, [(12, BASE, ZEROED), (0, DATA, ZEROED), (1, DATA, BASE)], written=1)
    ov.update([b"\\x09" * {BLOCK_SIZE}], {13 * BLOCK_SIZE}, [(13, ZEROED, DATA)], written=1)
    ov.update([b"\\x0a" * {BLOCK_SIZE}], {2 * BLOCK_SIZE}, [], written=1)
os.kill(os.getpid(), signal.SIGKILL)
"""
        assert subprocess.run([sys.executable, "-c", code]).returncode == -9
        for readonly in (True, False):
            again = RocksOverlay(ov.path, readonly=readonly)
            try:
                assert list(again.scan()) == [(0, ZEROED), (2, DATA), (10, DATA), (11, DATA), (12, ZEROED), (13, DATA)]
                assert read(again, 10 * BLOCK_SIZE, 2 * BLOCK_SIZE) == block(7) + block(8)
                assert read(again, 13 * BLOCK_SIZE, BLOCK_SIZE) == block(9)
                assert read(again, 2 * BLOCK_SIZE, BLOCK_SIZE) == block(10)
            finally:
                again.close()

    def test_every_data_block_is_fingerprinted_as_it_is_now(self) -> None:
        """Rewrites in place (durable or not, one block or many) keep the map's prints current, so check
        finds a block whose bytes changed under the map, and only that block."""
        ov = self.make()
        assert isinstance(ov, RocksOverlay)
        update(ov, [block(1) * 8], 0, [(b, BASE, DATA) for b in range(8)])
        update(ov, [block(2)], 0, [])  # rewritten before the flush
        ov.flush()
        update(ov, [block(3)], BLOCK_SIZE, [])  # rewritten durably, one block
        update(ov, [block(4) * 3], 4 * BLOCK_SIZE, [])  # and several
        update(ov, [block(5) * 2], 6 * BLOCK_SIZE, [(7, DATA, ZEROED)])  # block 7 leaves DATA in the same write
        assert ov.verify_data() == []
        ov = self.reopen(ov)
        assert isinstance(ov, RocksOverlay)
        assert ov.verify_data() == []
        assert read(ov, 0, 7 * BLOCK_SIZE) == block(2) + block(3) + block(1) * 2 + block(4) * 2 + block(5)
        ov.close()
        with open(ov.path / DATA_FILE, "r+b") as f:
            f.seek(5 * BLOCK_SIZE + 100)
            f.write(b"\xff")
        again = RocksOverlay(ov.path, readonly=True)
        self.opened.append(again)
        assert again.verify_data() == [5]
        with pytest.raises(Damaged) as info:  # never served: not a whole block, not a byte of it
            read(again, 5 * BLOCK_SIZE + 7, 9)
        assert info.value.errno == errno.EIO
        assert read(again, 3 * BLOCK_SIZE, 2 * BLOCK_SIZE) == block(1) + block(4)  # its neighbours are fine

    def test_a_failed_rewrite_in_place_reads_what_the_file_holds(self) -> None:
        """A full copy-on-write file system fails even an overwrite, perhaps half done: every block then
        reads what the file holds (old or new), never an error for a print it never got."""
        ov = self.make()
        assert isinstance(ov, RocksOverlay)
        update(ov, [block(1) * 4], 0, [(b, BASE, DATA) for b in range(4)])
        ov.flush()
        assert ov._data is not None
        real = ov._data.write

        def half_then_enospc(bufs: Sequence[bytes], offset: int, length: int) -> None:
            if length > BLOCK_SIZE:  # a multi-block write gets half way
                real([bytes(bufs[0])[: length // 2]], offset, length // 2)
            raise StorageError(errno.ENOSPC, what="writing", detail="No space left on device")

        ov._data.write = half_then_enospc  # type: ignore[method-assign]
        for bufs, offset in (([block(2) * 4], 0), ([block(3)], 3 * BLOCK_SIZE)):
            with pytest.raises(StorageError):
                update(ov, bufs, offset, [])
        ov._data.write = real  # type: ignore[method-assign]
        assert read(ov, 0, 4 * BLOCK_SIZE) == block(2) * 2 + block(1) * 2
        assert ov.verify_data() == []
        ov.flush()
        assert self.reopen(ov).verify_data() == []  # type: ignore[attr-defined]

    def test_a_killed_rewrite_in_place_keeps_old_or_new_bytes_and_a_true_print(self) -> None:
        ov = self.make()
        assert isinstance(ov, RocksOverlay)
        update(ov, [block(1) * 2], 0, [(0, BASE, DATA), (1, BASE, DATA)])
        ov.close()
        code = f"""
import os, signal
from pathlib import Path
from nbdclone.store import _datafile
from nbdclone.store._rocks import RocksOverlay
ov = RocksOverlay(Path({str(ov.path)!r}))
with ov.lock:
    ov.update([b"\x02" * {BLOCK_SIZE}], 0, [], written=1)  # lands
    _datafile.DataFile.write = lambda *a: os.kill(os.getpid(), signal.SIGKILL)  # dies before the bytes
    ov.update([b"\x03" * {BLOCK_SIZE}], {BLOCK_SIZE}, [], written=1)
"""
        assert subprocess.run([sys.executable, "-c", code]).returncode == -9
        again = RocksOverlay(ov.path)
        self.opened.append(again)
        assert read(again, 0, 2 * BLOCK_SIZE) == block(2) + block(1)  # acknowledged; old bytes, not acked
        assert again.verify_data() == []

    def _killed_after_a_rewrite(self) -> tuple[RocksOverlay, int, int]:
        """An overlay whose writer wrote block A (region 0) and B (region 3), flushed, rewrote B in place and
        was killed (kill -9 of a real process); then a byte of A flipped. Returns (overlay, A, B)."""
        ov = self.make()
        assert isinstance(ov, RocksOverlay)
        a, b = 5, (3 << REGION_SHIFT) + 7
        update(ov, [block(1)], a * BLOCK_SIZE, [(a, BASE, DATA)])
        update(ov, [block(2)], b * BLOCK_SIZE, [(b, BASE, DATA)])
        ov.close()
        code = f"""
import os, signal
from pathlib import Path
from nbdclone.store._rocks import RocksOverlay
ov = RocksOverlay(Path({str(ov.path)!r}))
with ov.lock:
    ov.update([b"\\x03" * {BLOCK_SIZE}], {b * BLOCK_SIZE}, [], written=1)
assert ov._map.marks() == [3], ov._map.marks()
os.kill(os.getpid(), signal.SIGKILL)
"""
        assert subprocess.run([sys.executable, "-c", code]).returncode == -9
        with open(ov.path / DATA_FILE, "r+b") as f:
            f.seek(a * BLOCK_SIZE + 100)
            f.write(b"\xff")
        return ov, a, b

    def test_after_an_unclean_stop_only_marked_regions_take_the_bytes_they_hold(self) -> None:
        """I7: a kill -9 after a rewrite in place of block B (region 3). Block A (region 0) was only ever
        written once, flushed: a byte flipped in it is damage whatever the stop, read-only (an export) or
        after the writable open's scrub, and no repair adopts it: its entry keeps the print of the bytes
        written, so putting the byte back heals it. B reads its acknowledged bytes."""
        ov, a, b = self._killed_after_a_rewrite()
        for readonly in (True, False):
            again = RocksOverlay(ov.path, readonly=readonly)
            try:
                assert read(again, b * BLOCK_SIZE, BLOCK_SIZE) == b"\x03" * BLOCK_SIZE
                with pytest.raises(Damaged):
                    read(again, a * BLOCK_SIZE, BLOCK_SIZE)
                assert again.verify_data() == [a]
                assert again._map.marks() == ([3] if readonly else [])  # the writable open's scrub closed it
            finally:
                again.close()
        with open(ov.path / DATA_FILE, "r+b") as f:  # the byte put back: the print was never moved
            f.seek(a * BLOCK_SIZE + 100)
            f.write(block(1)[:1])
        again = RocksOverlay(ov.path)
        self.opened.append(again)
        assert again.verify_data() == [] and read(again, a * BLOCK_SIZE, BLOCK_SIZE) == block(1)

    def test_a_scrub_in_the_background_closes_the_window_while_the_clone_serves(self) -> None:
        """A server's open does not wait for the scrub; A stays damage throughout; the scrub ends by itself
        and takes the print of B (never read meanwhile: no read took it), which then reads its acknowledged
        bytes; its marks are gone and B's print durable."""
        ov, a, b = self._killed_after_a_rewrite()
        again = RocksOverlay(ov.path, scrub="background")
        self.opened.append(again)
        with again.lock, pytest.raises(Damaged):
            read(again, a * BLOCK_SIZE, BLOCK_SIZE)
        assert again.scrubbed.wait(30), "the scrub did not end"
        assert again._map.marks() == []
        with again.lock:
            assert read(again, b * BLOCK_SIZE, BLOCK_SIZE) == b"\x03" * BLOCK_SIZE
        again.close()
        again = RocksOverlay(ov.path, readonly=True)  # a clean open: no window, the print is in the map
        self.opened.append(again)
        assert again.verify_data() == [a] and read(again, b * BLOCK_SIZE, BLOCK_SIZE) == b"\x03" * BLOCK_SIZE

    def test_a_close_before_the_scrub_ends_keeps_the_window(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Stopped half way (the clone's last client left), the scrub leaves its marks, even of a region the
        session rewrote: the next open scrubs again, and every block reads old or new."""
        ov, a, b = self._killed_after_a_rewrite()
        monkeypatch.setattr(_rocks, "SCRUB_RATE", 1)  # one batch, then a wait close cuts short
        again = RocksOverlay(ov.path, scrub="background")
        self.opened.append(again)
        update(again, [block(4)], (b + 1) * BLOCK_SIZE, [(b + 1, BASE, DATA)])
        again.flush()
        update(again, [block(5)], (b + 1) * BLOCK_SIZE, [])  # in place, in the window's region
        again.close()
        assert not again.scrubbed.is_set()
        m = _blockmap.BlockMap(ov.path, create=False, readonly=True)
        try:
            assert m.marks() == [3]
        finally:
            m.close()
        monkeypatch.undo()
        again = RocksOverlay(ov.path)  # scrubs now
        self.opened.append(again)
        assert again._map.marks() == [] and again.verify_data() == [a]
        assert read(again, b * BLOCK_SIZE, 2 * BLOCK_SIZE) == b"\x03" * BLOCK_SIZE + block(5)

    @pytest.mark.parametrize("cut", [0.2, 0.5, 0.8, 0.99])
    def test_a_write_ahead_log_that_lost_synced_records_fails_the_open(self, cut: float) -> None:
        """E3: a writer killed right after its second flush; its WAL then cut short (as a bad disk or a file
        system repair would): RocksDB takes the cut for a torn tail, but the overlay's durable record says
        the lost records were synced, so every open fails, naming the overlay, instead of serving the blocks
        of the lost flush as the base."""
        ov = self.make()
        assert isinstance(ov, RocksOverlay)
        ov.close()
        code = f"""
import os, signal
from pathlib import Path
from nbdclone.store._rocks import RocksOverlay
from nbdclone.store.overlay import BASE, DATA
ov = RocksOverlay(Path({str(ov.path)!r}))
for n in range(2):
    moves = [(n * 4 + b, BASE, DATA) for b in range(4)]
    with ov.lock:
        ov.update([bytes([n + 1]) * {4 * BLOCK_SIZE}], n * {4 * BLOCK_SIZE}, moves, written=1)
    ov.flush()
os.kill(os.getpid(), signal.SIGKILL)
"""
        assert subprocess.run([sys.executable, "-c", code]).returncode == -9
        wal = max(ov.path.glob("*.log"))
        os.truncate(wal, int(wal.stat().st_size * cut))
        for readonly in (True, False):
            with pytest.raises(Damaged, match="lost records it had synced") as info:
                RocksOverlay(ov.path, readonly=readonly)
            assert str(ov.path) in str(info.value)

    def test_a_map_that_cannot_reopen_for_writing_still_reads(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """E4: after a failed write RocksDB must be reopened; on a full disk that open fails too. The clone's
        written blocks must still read (a closed handle failed them all), writes get the error, and once
        the disk has room the next write reopens it and lands."""
        ov = self.make()
        assert isinstance(ov, RocksOverlay)
        update(ov, [block(1)], 0, [(0, BASE, DATA)])
        ov.flush()
        real = _blockmap.BlockMap._open

        tries: list[bool] = []

        def full(m: _blockmap.BlockMap, create: bool, *, readonly: bool | None = None) -> object:
            if not (m.readonly if readonly is None else readonly):
                tries.append(True)
                raise StorageError(errno.ENOSPC, what="opening", detail="No space left on device")
            return real(m, create, readonly=readonly)

        monkeypatch.setattr(_blockmap.BlockMap, "_open", full)
        ov._map.broken = True  # as a write that failed leaves it
        for _ in range(3):  # tried once: the next writes fail at once (each try writes RocksDB's log)
            with pytest.raises(StorageError) as info:
                update(ov, [block(2)], BLOCK_SIZE, [(1, BASE, DATA)])
            assert info.value.errno == errno.ENOSPC
        assert len(tries) == 1
        assert read(ov, 0, BLOCK_SIZE) == block(1)
        monkeypatch.undo()
        monkeypatch.setattr(_rocks, "REOPEN_EVERY", 0.0)
        ov._reopens.next = 0.0  # (as REOPEN_EVERY seconds later)
        update(ov, [block(2)], BLOCK_SIZE, [(1, BASE, DATA)])
        ov.flush()
        assert read(self.reopen(ov), 0, 2 * BLOCK_SIZE) == block(1) + block(2)

    def test_a_mark_goes_once_its_region_is_durable_and_idle(self, monkeypatch: pytest.MonkeyPatch) -> None:
        ov = self.make()
        assert isinstance(ov, RocksOverlay)
        update(ov, [block(1)], 0, [(0, BASE, DATA)])
        ov.flush()
        update(ov, [block(2)], 0, [])  # in place: region 0 is marked, durably, before the bytes are written
        assert ov._map.marks() == [0]
        ov.flush()
        ov.flush()
        assert ov._map.marks() == [0]  # rewritten MARK_IDLE seconds ago or less: kept
        monkeypatch.setattr(_rocks, "MARK_IDLE", 0.0)
        update(ov, [block(3)], BLOCK_SIZE, [(1, BASE, DATA)])
        ov.flush()  # (a flush that has work runs the sweep)
        assert ov._map.marks() == []
        update(ov, [block(4)], 0, [])
        assert ov._map.marks() == [0]
        ov = self.reopen(ov)  # a clean close leaves none
        assert isinstance(ov, RocksOverlay)
        assert ov._map.marks() == [] and read(ov, 0, BLOCK_SIZE) == block(4)

    def test_an_overlay_of_format_3_is_fingerprinted_at_its_first_writable_open(self) -> None:
        ov = self.make()
        assert isinstance(ov, RocksOverlay)
        update(ov, [block(1) * 2], 0, [(0, BASE, DATA), (1, BASE, DATA)])
        ov.close()
        with open(ov.path / DATA_FILE, "r+b") as f:  # format 3 rewrote in place without a new print
            f.write(block(9))
        m = _blockmap.BlockMap(ov.path, create=False, readonly=False)
        m.write([(_blockmap.META_FORMAT, b"3")], sync=True)
        m.close()
        old = RocksOverlay(ov.path, readonly=True)
        assert old.verify_data() is None  # its prints may be stale: nothing is claimed
        old.close()
        again = RocksOverlay(ov.path)
        self.opened.append(again)
        assert again.verify_data() == [] and read(again, 0, BLOCK_SIZE) == block(9)

    def test_a_flush_after_nothing_syncs_nothing_and_a_failed_sync_is_redone(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        import os

        from nbdclone.store import _datafile

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
        monkeypatch.setattr(_datafile.os, "fdatasync", fdatasync)
        update(ov, [block(1)], 0, [(0, BASE, DATA)], BLOCK_SIZE)
        ov.flush()
        assert len(synced) == 1
        ov.flush()  # nothing since: no sync
        assert len(synced) == 1
        update(ov, [block(2)], 0, [], BLOCK_SIZE)  # a rewrite changes no map entry, but needs the next sync
        fail[0] = True
        with pytest.raises(StorageError):
            ov.flush()
        ov.flush()  # the failed one does not count as done
        assert len(synced) == 2

    def test_reopened_overlays_share_the_process_block_cache(self) -> None:
        first, second = self.make(), self.make()
        for ov in (first, second):
            update(ov, [], 0, [(1, BASE, ZEROED)])
        first, second = self.reopen(first), self.reopen(second)
        assert isinstance(first, RocksOverlay) and isinstance(second, RocksOverlay)
        assert list(first.scan()) == [(1, ZEROED)]
        cache, _ = _blockmap.shared_resources()
        for ov in (first, second):  # not a cache of its own, as its OPTIONS file alone would give it
            assert ov._map._db.property_int_value("rocksdb.block-cache-capacity") == _blockmap.BLOCK_CACHE_BYTES
        assert first._map._db.property_int_value("rocksdb.block-cache-usage") == cache.get_usage()

    def test_in_use_is_seen_from_another_process(self) -> None:
        ov = self.make()
        assert isinstance(ov, RocksOverlay)
        code = (
            "import sys; from pathlib import Path; from nbdclone.store._rocks import overlay_in_use;"
            "sys.exit(0 if overlay_in_use(Path(sys.argv[1])) else 3)"
        )
        assert subprocess.run([sys.executable, "-c", code, str(ov.path)]).returncode == 0
        ov.close()
        assert not overlay_in_use(ov.path)

    def test_a_second_writer_process_is_refused(self) -> None:
        ov = self.make()
        assert isinstance(ov, RocksOverlay)
        code = (
            "import sys; from pathlib import Path; from nbdclone.store._rocks import RocksOverlay\n"
            "try:\n    RocksOverlay(Path(sys.argv[1]))\nexcept Exception as e:\n"
            "    sys.exit(4 if getattr(e, 'errno', 0) == 16 else 5)\nsys.exit(0)"
        )
        assert subprocess.run([sys.executable, "-c", code, str(ov.path)]).returncode == 4


def _punches(directory: Path) -> bool:
    """Whether the file system gives space back for punched holes (bindfs passes fallocate through)."""
    import os

    from nbdclone.store._fs import punch_hole

    probe = directory / ".punch-probe"
    with open(probe, "wb") as f:
        f.write(b"x" * (1 << 20))
        f.flush()
        os.fsync(f.fileno())
        try:
            punch_hole(f.fileno(), 0, 1 << 20, what="probe")
        except StorageError:
            return False
    probe.unlink()
    return True
