"""The overlay under several connections at once, kill -9 and power cuts, against a model of what was
acknowledged and what was flushed (overlay invariants I1-I5).

Connections are threads: each batch runs 2-4 of them at once against one clone, each on its own range of
blocks (so what a block holds at the end is known), while other threads flush. Crashes:

- kill: the process dies. The overlay's memory is gone; its files (and its journal in /dev/shm) are as
  the page cache holds them. Every acknowledged write must read back, exactly.
- power cut: only what was synced survives. The fault layer records, at each sync, what the data file held
  and how long each WAL file was just before the sync began; a power cut then keeps, for every data block,
  either that synced copy or the current bytes (any subset of dirty pages reaches the disk), and a random
  prefix of the unsynced part of each WAL (RocksDB replays the longest valid prefix). The journal in
  /dev/shm is lost (a power cut, an OS crash) or kept whole (a file-system shutdown without a reboot).
  Every block must read a content it held at or after the last completed flush that began after its
  write was acknowledged (its "floor"), never zeros nobody wrote, and the same again after another crash.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, note, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from nbdclone.store import _blockmap, _datafile, _journal, _rocks
from nbdclone.store._rocks import RocksOverlay, create_overlay
from nbdclone.store.base import BaseImage
from nbdclone.store.clone import Clone
from tests.helpers import make_image

BS = 4096
REGION = 24  # blocks per connection
THREADS = 4
NBLOCKS = REGION * THREADS
SIZE = NBLOCKS * BS
# Mostly data (a block going back to the base must read differently from zeros), a few holes and partial blocks.
BASE_DATA = [(0, 17 * BS + 100), (20 * BS, 30 * BS), (53 * BS - 512, 20 * BS), (80 * BS, 14 * BS)]

_seq = itertools.count(1)  # a global order of acknowledgements and flush starts (thread-safe in CPython)


class PowerCut(Exception):
    """Raised by the fault layer at an armed sync: the power fails as that sync begins."""


#: How a power cut treats what was not synced: each dirty data page and the WAL's unsynced tail at random,
#: or the two worst cases (all dirty data reached the disk and no unsynced WAL did, or the other way round).
POLICIES = ("random", "data-not-wal", "wal-not-data")


class FaultLayer:
    """What a power cut may leave: the data file and WAL as of the syncs, recorded as they begin."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, overlay_dir: Path) -> None:
        self.dir = overlay_dir
        self.synced_data = b""
        self.synced_logs: dict[str, int] = {}
        self.lock = threading.Lock()
        self.armed = -1  # the number of syncs still allowed before the power fails (-1: never)
        self.syncs = {"data": 0, "map": 0}  # syncs begun, of each file
        data_sync, map_sync = _datafile.DataFile.sync, _blockmap.BlockMap.sync
        layer = self

        def on_data_sync(df: _datafile.DataFile) -> None:
            layer.syncs["data"] += 1
            layer._maybe_fail()
            before = layer._read_data()
            data_sync(df)
            with layer.lock:
                layer.synced_data = before

        def on_map_sync(m: _blockmap.BlockMap) -> None:
            layer.syncs["map"] += 1
            layer._maybe_fail()
            before = {p.name: p.stat().st_size for p in layer.dir.glob("*.log")}
            map_sync(m)
            with layer.lock:
                layer.synced_logs.update(before)

        monkeypatch.setattr(_datafile.DataFile, "sync", on_data_sync)
        monkeypatch.setattr(_blockmap.BlockMap, "sync", on_map_sync)

    def _maybe_fail(self) -> None:
        with self.lock:
            if self.armed == 0:
                self.armed = -1
                raise PowerCut
            if self.armed > 0:
                self.armed -= 1

    def _read_data(self) -> bytes:
        try:
            return (self.dir / _datafile.NAME).read_bytes()
        except FileNotFoundError:
            return b""

    def opened(self, overlay: RocksOverlay) -> None:
        """After an open: everything RocksDB wrote at open is treated as synced (it syncs its own files)."""
        assert overlay._journal is not None, "no journal: the tests need a private folder in /dev/shm"
        self.journal = overlay._journal.path
        with self.lock:
            self.synced_logs = {p.name: p.stat().st_size for p in self.dir.glob("*.log")}
            self.synced_data = self._read_data()

    def cut_power(self, rnd: random.Random, policy: str = "random", *, journal: bool = False) -> None:
        """`journal`: the journal survives (a file-system shutdown and remount: memory is kept, the disk's
        unsynced writes are lost); otherwise it is gone with the rest of memory (a power cut, an OS crash)."""
        if not journal:
            self.journal.unlink(missing_ok=True)
        with self.lock:
            self.armed = -1
            current = bytearray(self._read_data())
            old = self.synced_data
            for b in range(0, len(current), BS):
                lost = rnd.random() < 0.5 if policy == "random" else policy == "wal-not-data"
                if lost:  # this dirty page never reached the disk
                    piece = old[b : b + BS]
                    current[b : b + BS] = piece + bytes(len(current[b : b + BS]) - len(piece))
            if len(current):
                (self.dir / _datafile.NAME).write_bytes(bytes(current))
            for log in self.dir.glob("*.log"):
                size = log.stat().st_size
                synced = min(self.synced_logs.get(log.name, 0), size)
                rand = rnd.choice([synced, size, rnd.randint(synced, size)])  # a cut inside a record loses it
                keep = {"random": rand, "data-not-wal": synced}.get(policy, size)
                with open(log, "r+b") as f:
                    f.truncate(keep)


def _picture(path: Path) -> dict[str, bytes]:
    files = {}
    for p in path.iterdir():
        if p.name != _datafile.NAME and not p.name.startswith("LOG"):  # (RocksDB's info log rotates)
            with contextlib.suppress(FileNotFoundError):
                files[p.name] = p.read_bytes()
    return files


def die(overlay: object) -> None:
    """The process ends without closing anything: its memory is gone, its files stay as written. (The
    handles must still be closed to open the overlay again in this process, and rocksdict's close writes the
    memtable to a new SST: the database's files are put back as they were at the moment of death.)"""
    assert isinstance(overlay, RocksOverlay) and overlay._data is not None
    overlay._stop_scrub.set()  # (a scrub in the background dies with it: here at the end of a batch)
    if overlay._scrubber is not None:
        overlay._scrubber.join()
    # A death freezes every file at one instant; RocksDB's own threads (a flush, a compaction) may still be
    # writing while we read them one by one (a MANIFEST read after a compaction names an SST listed before
    # it was made, or one deleted since). Read until two pictures in a row agree.
    files = _picture(overlay.path)
    while (again := _picture(overlay.path)) != files:
        files = again
    overlay._data.close()
    if overlay._journal is not None:
        overlay._journal.close()  # the file in /dev/shm stays, as it does when a process dies
    overlay._map.close()
    for p in overlay.path.iterdir():
        if p.name not in files and p.name != _datafile.NAME and not p.name.startswith("LOG"):
            p.unlink()
    for name, content in files.items():
        (overlay.path / name).write_bytes(content)


class CrashMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.mp = pytest.MonkeyPatch()

    @initialize(seed=st.integers(0, 2**32 - 1))
    def setup(self, seed: int) -> None:
        self.rnd = random.Random(seed)
        self.tmp = tempfile.TemporaryDirectory()
        root = Path(self.tmp.name)
        self.base_bytes = make_image(root / "base.raw", SIZE, BASE_DATA, seed=seed % 7)
        self.base = BaseImage(root / "base.raw")
        self.path = root / "clone" / "ov"
        self.path.parent.mkdir()
        create_overlay(self.path)
        self.faults = FaultLayer(self.mp, self.path)
        self.mp.setattr(_rocks, "SCRUB_BATCH", 8)  # (a scrub in the background: 12 batches, amid requests)
        self.current = [self.base_bytes[b * BS : (b + 1) * BS] for b in range(NBLOCKS)]
        self.history: list[list[tuple[int, bytes]]] = [[(0, c)] for c in self.current]  # (ack seq, content)
        self.floor_seq = 0  # the start of the last completed flush
        self.block_floor: dict[int, int] = {}  # past the acknowledgement of a block's last FUA write
        self._open()

    def _open(self) -> None:
        # Half the opens scrub an unclean stop's window in the background, while the connections run (I7).
        overlay = RocksOverlay(self.path, scrub=self.rnd.choice(["now", "background"]))
        self.clone = Clone(self.base, overlay, SIZE)
        self.faults.opened(overlay)

    def teardown(self) -> None:
        if hasattr(self, "clone"):
            self.clone.close()
            self.tmp.cleanup()
        self.mp.undo()

    # -- requests, from several connections at once ------------------------------------------------------

    def _ack(self, first: int, data: bytes | None, offset: int, length: int) -> None:
        """Record what the blocks of [offset, offset + length) read now (`data` is their new content)."""
        seq = next(_seq)
        for b in range(offset // BS, -(-(offset + length) // BS)):
            block = bytearray(self.current[b])
            lo, hi = max(offset, b * BS), min(offset + length, (b + 1) * BS)
            block[lo - b * BS : hi - b * BS] = bytes(hi - lo) if data is None else data[lo - offset : hi - offset]
            self.current[b] = bytes(block)
            self.history[b].append((seq, self.current[b]))

    def _trimmed(self, offset: int, length: int) -> None:
        seq = next(_seq)
        for b in range(-(-offset // BS), (offset + length) // BS):
            self.current[b] = self.base_bytes[b * BS : (b + 1) * BS]
            self.history[b].append((seq, self.current[b]))

    def _connection(self, region: int, ops: list[tuple[str, int, int, int]]) -> Callable[[], None]:
        def run() -> None:
            lo = region * REGION * BS
            for kind, at, length, fill in ops:
                offset = lo + min(at, REGION * BS - 1)
                length = min(length, lo + REGION * BS - offset)
                if kind == "flush":
                    start = next(_seq)
                    self.clone.flush()
                    self.floor_seq = max(self.floor_seq, start)
                elif kind in ("write", "fua"):
                    data = bytes((fill + i) % 251 + 1 for i in range(length)) if fill else bytes(length)
                    self.clone.pwrite(memoryview(data), offset, fua=kind == "fua")
                    self._ack(0, data, offset, length)
                    if kind == "fua":  # durable now, but only these blocks (other writes may be in flight)
                        for b in range(offset // BS, -(-(offset + length) // BS)):
                            self.block_floor[b] = self.history[b][-1][0] + 1
                elif kind == "zero":
                    self.clone.zero(length, offset)
                    self._ack(0, None, offset, length)
                else:
                    self.clone.trim(length, offset)
                    self._trimmed(offset, length)

        return run

    @rule(
        batches=st.lists(
            st.lists(
                st.tuples(
                    st.sampled_from(["write", "write", "write", "fua", "zero", "trim", "flush", "flush"]),
                    # Mostly block-aligned (the one-block fast paths), sometimes anywhere (merged partial blocks).
                    st.one_of(st.integers(0, REGION - 1).map(lambda b: b * BS), st.integers(0, REGION * BS - 1)),
                    st.sampled_from([1, 512, BS, BS, BS, 2 * BS, 3 * BS + 7, 8 * BS]),
                    st.integers(0, 255),
                ),
                min_size=1,
                max_size=12,
            ),
            min_size=2,
            max_size=THREADS,
        )
    )
    def connections(self, batches: list[list[tuple[str, int, int, int]]]) -> None:
        note(f"{len(batches)} connections: {batches}")
        threads = [threading.Thread(target=self._connection(i, ops)) for i, ops in enumerate(batches)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    @rule()
    def flush(self) -> None:
        start = next(_seq)
        self.clone.flush()
        self.floor_seq = start

    # -- crashes ---------------------------------------------------------------------------------------

    def _die(self) -> None:
        die(self.clone.overlay)

    def _read_all(self) -> list[bytes]:
        buf = bytearray(SIZE)
        self.clone.pread_into(memoryview(buf), 0)
        return [bytes(buf[b * BS : (b + 1) * BS]) for b in range(NBLOCKS)]

    def _settled(self, now: list[bytes]) -> None:
        """After a recovery everything the clone reads is durable: it is the new model."""
        self.current = now
        self.history = [[(0, c)] for c in now]
        self.floor_seq = next(_seq)
        self.block_floor = {}

    @rule()
    def kill(self) -> None:
        self._die()
        self._open()
        now = self._read_all()
        lost = [b for b in range(NBLOCKS) if now[b] != self.current[b]]
        assert not lost, f"kill -9 lost acknowledged writes of blocks {lost}"
        self._settled(now)

    @rule(
        second=st.booleans(),
        policy=st.sampled_from(POLICIES),
        during_flush=st.sampled_from([None, 0, 1, 2]),
        journal=st.booleans(),
    )
    def power_cut(self, second: bool, policy: str, during_flush: int | None, journal: bool) -> None:
        """The power fails (or, `journal`, the file system shuts down and is mounted again: the journal in
        memory survives), between requests or as the n-th sync of a flush begins."""
        if during_flush is not None:
            self.faults.armed = during_flush
            try:
                self.clone.flush()
            except PowerCut:
                pass
            else:
                self.floor_seq = next(_seq)  # the flush needed fewer syncs: it completed
        self._die()
        self.faults.cut_power(self.rnd, policy, journal=journal)
        self._open()
        now = self._read_all()
        for b in range(NBLOCKS):
            hist = self.history[b]
            durable_from = max(self.floor_seq, self.block_floor.get(b, 0))
            floor = max((i for i, (seq, _) in enumerate(hist) if seq < durable_from), default=0)
            allowed = [content for _, content in hist[floor:]]
            assert now[b] in allowed, (
                f"block {b} after a power cut reads {now[b][:8].hex()}..., not one of its "
                f"{len(allowed)} contents since the last flush (floor {hist[floor][1][:8].hex()}...)"
            )
        if second:  # what a recovery settled on stays, through another cut with nothing written since
            self._die()
            self.faults.cut_power(self.rnd, policy, journal=journal)
            self._open()
            assert self._read_all() == now, "a second power cut changed what the first recovery read"
        self._settled(now)

    @rule()
    def clean_reopen(self) -> None:
        self.clone.close()
        self._open()
        assert self._read_all() == self.current

    @invariant()
    def reads_match_the_model(self) -> None:
        if hasattr(self, "clone"):
            assert self._read_all() == self.current


TestCrashes = CrashMachine.TestCase
TestCrashes.settings = settings(  # print_blob: a CI failure prints the line that replays it (@reproduce_failure)
    max_examples=250,
    stateful_step_count=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)


def _scenario(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int) -> tuple[bytes, FaultLayer, Clone]:
    """A clone of an all-data base on a new overlay watched by a fault layer: (base bytes, layer, clone)."""
    base = make_image(tmp_path / "base.raw", SIZE, [(0, SIZE)], seed=seed)
    path = tmp_path / "ov"
    create_overlay(path)
    faults = FaultLayer(monkeypatch, path)
    overlay = RocksOverlay(path)
    clone = Clone(BaseImage(tmp_path / "base.raw"), overlay, SIZE)
    faults.opened(overlay)
    return base, faults, clone


def _after_power_cut(tmp_path: Path, clone: Clone, faults: FaultLayer, seed: int, policy: str, journal: bool) -> Clone:
    die(clone.overlay)
    faults.cut_power(random.Random(seed), policy, journal=journal)
    overlay = clone.overlay
    assert isinstance(overlay, RocksOverlay)
    return Clone(BaseImage(tmp_path / "base.raw"), RocksOverlay(overlay.path), SIZE)


@pytest.mark.parametrize("journal", [False, True], ids=["power-cut", "fs-shutdown"])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("flushed", [False, True], ids=["unflushed", "flushed"])
def test_a_power_cut_drops_an_unflushed_first_write_and_keeps_a_flushed_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flushed: bool, policy: str, journal: bool
) -> None:
    """The fault model is not vacuous: an unflushed first write whose bytes or entry did not reach the disk
    goes back to the base (never to zeros); one whose bytes and entry both did may stay; a flushed one stays."""
    for attempt in range(8):
        shutil.rmtree(tmp_path / "ov", ignore_errors=True)
        base, faults, clone = _scenario(tmp_path, monkeypatch, 3)
        clone.pwrite(memoryview(b"\x77" * BS), 0)
        if flushed:
            clone.flush()
        clone = _after_power_cut(tmp_path, clone, faults, attempt, policy, journal)
        buf = bytearray(BS)
        clone.pread_into(memoryview(buf), 0)
        if flushed:
            assert bytes(buf) == b"\x77" * BS
        elif policy == "random":
            assert bytes(buf) in (b"\x77" * BS, base[:BS])
        elif journal and policy == "data-not-wal":  # the entry survived in the journal, the bytes on disk
            assert bytes(buf) == b"\x77" * BS
        else:  # the bytes or the entry never reached the disk
            assert bytes(buf) == base[:BS]
        clone.close()


@pytest.mark.parametrize("journal", [False, True], ids=["power-cut", "fs-shutdown"])
@pytest.mark.parametrize("policy", POLICIES[1:])
@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda c: c.trim(BS, 0), id="trim"),
        pytest.param(lambda c: c.zero(BS, 0), id="zero"),
        pytest.param(lambda c: c.pwrite(memoryview(bytes(BS)), 0), id="all-zero-write"),
        pytest.param(lambda c: c.pwrite(memoryview(b"\x55" * BS), 0), id="rewrite"),
        pytest.param(lambda c: (c.trim(BS, 0), c.pwrite(memoryview(b"\x55" * BS), 0)), id="trim-then-write"),
    ],
)
def test_a_flushed_block_changed_after_the_flush_reads_old_or_new_after_a_power_cut(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: Callable[[Clone], object], policy: str, journal: bool
) -> None:
    """I4 in the worst cases: the change's map entry lost with its data kept, or the other way round."""
    base, faults, clone = _scenario(tmp_path, monkeypatch, 5)
    clone.pwrite(memoryview(b"\x77" * BS), 0)
    clone.flush()
    change(clone)
    new = bytearray(BS)
    clone.pread_into(memoryview(new), 0)
    clone = _after_power_cut(tmp_path, clone, faults, 0, policy, journal)
    got = bytearray(BS)
    clone.pread_into(memoryview(got), 0)
    assert got in (b"\x77" * BS, new, base[:BS])  # base: the state between trim and write
    clone.close()


@pytest.mark.parametrize("journal", [False, True], ids=["power-cut", "fs-shutdown"])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("cut_at", [0, 1], ids=["first-sync", "second-sync"])
def test_a_power_cut_inside_a_flush_leaves_old_or_new_never_zeros(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cut_at: int, policy: str, journal: bool
) -> None:
    """I3's order: the data file is synced before the map says its generation is durable. A cut between the
    two syncs of a flush must leave each block with its old or its new bytes."""
    base, faults, clone = _scenario(tmp_path, monkeypatch, 6)
    new = [bytes([b + 1]) * BS for b in range(8)]
    for b in range(8):
        clone.pwrite(memoryview(new[b]), b * BS)
    faults.armed = cut_at
    with pytest.raises(PowerCut):
        clone.flush()
    clone = _after_power_cut(tmp_path, clone, faults, cut_at, policy, journal)
    for b in range(8):
        got = bytearray(BS)
        clone.pread_into(memoryview(got), b * BS)
        assert got in (new[b], base[b * BS : (b + 1) * BS]), f"block {b} reads neither its old nor its new bytes"
    clone.close()


@pytest.mark.parametrize("journal", [False, True], ids=["power-cut", "fs-shutdown"])
@pytest.mark.parametrize("policy", POLICIES)
def test_a_rewrite_flushed_without_a_wal_sync_is_kept_by_a_power_cut(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, policy: str, journal: bool
) -> None:
    """A flush whose generation only rewrote durable blocks in place syncs the data file alone: the new
    prints stay in the WAL's unsynced tail. A cut that loses them keeps the flushed bytes (the regions were
    marked, synced, before the first rewrite: the next open takes each block's print from what it holds),
    and a rewrite after that flush reads flushed or new, never older."""
    _, faults, clone = _scenario(tmp_path, monkeypatch, 7)
    for b in range(4):
        clone.pwrite(memoryview(bytes([0x40 + b]) * BS), b * BS)
    clone.flush()
    for b in range(4):  # in place: region 0 is marked first (a synced map write)
        clone.pwrite(memoryview(bytes([0x60 + b]) * BS), b * BS)
    before = dict(faults.syncs)
    clone.flush()
    assert faults.syncs == {"data": before["data"] + 1, "map": before["map"]}, "the path under test: no WAL sync"
    clone.pwrite(memoryview(b"\x7f" * BS), 0)  # again, not flushed
    clone = _after_power_cut(tmp_path, clone, faults, 0, policy, journal)
    got = bytearray(BS)
    clone.pread_into(memoryview(got), 0)
    assert got in (b"\x60" * BS, b"\x7f" * BS)
    for b in range(1, 4):
        clone.pread_into(memoryview(got), b * BS)
        assert got == bytes([0x60 + b]) * BS, f"block {b} lost its flushed rewrite"
    overlay = clone.overlay
    assert isinstance(overlay, RocksOverlay)
    assert overlay.scrubbed.wait(30) and overlay.verify_data() == []  # every print names what its block holds
    clone.close()
    again = RocksOverlay(overlay.path, readonly=True)  # the clean close made every print durable
    try:
        assert again.verify_data() == []
    finally:
        again.close()


class Killed(Exception):
    """The process dies here (before the call the fault layer stopped)."""


#: The calls a write request makes that leave something behind a kill: bytes, journal records, map entries.
_STEPS = [
    (_datafile.DataFile, "write"),
    (_journal.Journal, "append"),
    (_journal.Journal, "put"),
    (_blockmap.BlockMap, "write"),
    (_blockmap.BlockMap, "put"),
]


def _kill_at(monkeypatch: pytest.MonkeyPatch, at: int) -> list[str]:
    """Make the `at`-th step (counting from 0) of what follows raise Killed instead of running (-1: none
    does). Returns the steps as they run."""
    seen: list[str] = []
    for cls, name in _STEPS:
        real = getattr(cls, name)

        def step(
            self: object, *args: object, _real: Callable[..., object] = real, _name: str = name, **kw: object
        ) -> object:
            seen.append(f"{type(self).__name__}.{_name}")
            if len(seen) - 1 == at:
                raise Killed
            return _real(self, *args, **kw)

        monkeypatch.setattr(cls, name, step)
    return seen


@pytest.mark.parametrize("flushed", [False, True], ids=["unflushed", "flushed"])
def test_a_request_zeroing_some_blocks_and_writing_others_is_old_or_new_at_every_kill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flushed: bool
) -> None:
    """E2: one request that turns a written block to zeros, rewrites two and writes a new one, killed before
    each of its steps in turn: after the restart each block reads its old or its new bytes (never the base
    under a block that was written, and never zeros under one that was not zeroed)."""
    old = {2: b"\x21" * BS, 3: b"\x31" * BS, 4: b"\x41" * BS}
    new = {2: bytes(BS), 3: b"\x32" * BS, 4: b"\x42" * BS, 5: b"\x52" * BS}
    request = b"".join(new[b] for b in range(2, 6))
    steps: list[str] = []
    at = -1  # first a run that is not killed, to learn the steps
    while at < len(steps):
        shutil.rmtree(tmp_path / "ov", ignore_errors=True)
        base, _, clone = _scenario(tmp_path, monkeypatch, 7)
        before = {b: base[b * BS : (b + 1) * BS] for b in range(NBLOCKS)} | old
        clone.pwrite(memoryview(b"".join(old.values())), 2 * BS)
        if flushed:
            clone.flush()
        seen = _kill_at(monkeypatch, at)
        try:
            clone.pwrite(memoryview(request), 2 * BS)
            assert at == -1, f"the request ran past step {at}: {seen}"
            steps = list(seen)
            assert any(s.startswith("DataFile") for s in steps) and len(steps) > 1, steps
        except Killed:
            pass
        monkeypatch.undo()
        die(clone.overlay)
        overlay = clone.overlay
        assert isinstance(overlay, RocksOverlay)
        again = Clone(BaseImage(tmp_path / "base.raw"), RocksOverlay(overlay.path), SIZE)
        for b in range(NBLOCKS):
            got = bytearray(BS)
            again.pread_into(memoryview(got), b * BS)
            allowed = {new.get(b, before[b])} if at == -1 else {before[b], new.get(b, before[b])}
            assert bytes(got) in allowed, f"killed before step {at} of {steps}: block {b}"
        again.close()
        at += 1
