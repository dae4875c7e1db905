"""The overlay's journal in /dev/shm (_journal): what survives a process that dies at any byte of a record,
and what a flush or an open makes of it. The journal's file is read and cut directly, bypassing the code
under test, as a writer killed mid-store would leave it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbdclone.store import _journal
from nbdclone.store._journal import HEADER, Full, Journal
from nbdclone.store._rocks import RocksOverlay, create_overlay
from nbdclone.store.base import ZeroBase
from nbdclone.store.clone import Clone

BS = 4096


@pytest.fixture
def folder() -> Iterator[Path]:
    path = _journal.folder()
    assert path is not None, "the tests need a private folder in /dev/shm (as the server does)"
    yield path


def key(block: int) -> bytes:
    return b"i" + block.to_bytes(8, "big")


def test_entries_come_back_in_order_after_a_reopen(folder: Path) -> None:
    ident = os.urandom(16)
    j = Journal(folder / ident.hex(), ident, create=True)
    try:
        j.put(key(1), b"v1")
        j.append(_journal.encode([(key(2), b"z"), (key(1), None), (key(3), b"t" * 26)]))
        j.append(_journal.encode_run(5, [b"a" * 26, b"b" * 26]))
        j.close()
        again = Journal(folder / ident.hex(), ident, create=False)
        assert again.entries() == [
            (key(1), None),
            (key(2), b"z"),
            (key(3), b"t" * 26),
            (key(5), b"a" * 26),
            (key(6), b"b" * 26),
        ]
        again.put(key(4), b"v4")  # a reopened journal appends after what it holds
        assert again.entries()[-1] == (key(4), b"v4")
        again.close(remove=True)
        assert not (folder / ident.hex()).exists()
    finally:
        (folder / ident.hex()).unlink(missing_ok=True)


def test_a_run_of_one_block_is_a_run_not_an_entry(folder: Path) -> None:
    """A run record of one block is as long as a one-entry record: it must still be read as a run."""
    ident = os.urandom(16)
    path = folder / ident.hex()
    try:
        j = Journal(path, ident, create=True)
        j.append(_journal.encode_run(25, [b"x" * 26]))
        j.close()
        again = Journal(path, ident, create=False)
        assert again.entries() == [(key(25), b"x" * 26)]
        again.close()
    finally:
        path.unlink(missing_ok=True)


def test_a_record_cut_at_any_byte_ends_the_log_before_it(folder: Path) -> None:
    """A writer killed in the middle of its memcpy leaves a prefix of its record: never an entry."""
    ident = os.urandom(16)
    path = folder / ident.hex()
    try:
        j = Journal(path, ident, create=True)
        j.put(key(1), b"first")
        start = j.pos
        j.append(_journal.encode([(key(2), b"second"), (key(3), None)]))
        end = j.pos
        record = bytes(j.mm[start:end])
        j.close()
        for cut in range(end - start):
            with open(path, "r+b") as f:
                f.seek(start)
                f.write(record[:cut] + bytes(end - start - cut))
            again = Journal(path, ident, create=False)
            assert again.entries() == [(key(1), b"first")], f"cut after {cut} bytes"
            again.close()
    finally:
        path.unlink(missing_ok=True)


def test_records_of_an_earlier_epoch_are_not_replayed(folder: Path) -> None:
    """After a reset the old records stay in memory: they do not match the new epoch's seals."""
    ident = os.urandom(16)
    path = folder / ident.hex()
    try:
        j = Journal(path, ident, create=True)
        for b in range(100):
            j.put(key(b), b"old")
        j.reset()
        j.put(key(7), b"new")
        j.close()
        again = Journal(path, ident, create=False)
        assert again.entries() == [(key(7), b"new")]
        again.close()
    finally:
        path.unlink(missing_ok=True)


def test_a_stale_length_past_the_last_record_reads_nothing_beyond_it(folder: Path) -> None:
    """Past the last record lie an older epoch's records, and a length read from the middle of one is any
    number: the scan stops there without reading it (a stale length of 32 MiB once cost every flush a
    32 MiB copy and hash, and made tmpfs allocate the holes it read)."""
    ident = os.urandom(16)
    path = folder / ident.hex()
    try:
        j = Journal(path, ident, create=True)
        for b in range(100):
            j.put(key(b), b"old" * 8)
        j.reset()
        j.put(key(7), b"new")
        for stale in (_journal.MAX_RECORD + 1, 32 << 20, j.size):  # where the next record would start
            j.mm[j.pos : j.pos + 4] = stale.to_bytes(4, "little")
            blocks = os.stat(path).st_blocks
            assert j.entries() == [(key(7), b"new")]
            assert os.stat(path).st_blocks == blocks, "the scan read (and so allocated) memory past the records"
        j.close()
        again = Journal(path, ident, create=False)
        assert again.entries() == [(key(7), b"new")] and again.pos == HEADER + 12 + 10 + 3
        assert again.allocated == _journal.GROW  # what the writer allocated, found from the file
        with pytest.raises(Full):  # a record longer than a scan reads goes to the map instead
            again.append(b"r" * (_journal.MAX_RECORD + 1))
        again.close()
    finally:
        path.unlink(missing_ok=True)


def test_another_overlays_journal_is_not_replayed(folder: Path) -> None:
    ident, other = os.urandom(16), os.urandom(16)
    path = folder / ident.hex()
    try:
        j = Journal(path, ident, create=True)
        j.put(key(1), b"mine")
        j.close()
        stranger = Journal(path, other, create=False)
        assert stranger.entries() == []
        stranger.close()
    finally:
        path.unlink(missing_ok=True)


def test_a_full_journal_says_so(folder: Path) -> None:
    ident = os.urandom(16)
    path = folder / ident.hex()
    try:
        j = Journal(path, ident, create=True, capacity=HEADER + 3 * 48)
        with pytest.raises(Full):
            for b in range(10):
                j.put(key(b), b"t" * 26)
        assert len(j.entries()) == 3
        j.close()
    finally:
        path.unlink(missing_ok=True)


# -- the overlay around it ------------------------------------------------------------------------------


class Killed(Exception):
    """The process dies here."""


def _die(overlay: RocksOverlay) -> None:
    from tests.store.test_crash_model import die

    die(overlay)


@pytest.mark.parametrize(
    "step",
    ["map-batch", "reset", "data-sync", "durable"],
    ids=["before-the-map-takes-it", "after-the-map-took-it", "before-data-sync", "before-durable"],
)
def test_a_kill_at_each_step_of_a_flush_keeps_every_acknowledged_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """The spill's order: entries reach the map's WAL before the journal lets them go; a kill after the
    map took them replays them again, which changes nothing."""
    path = tmp_path / "ov"
    create_overlay(path)
    overlay = RocksOverlay(path)
    clone = Clone(ZeroBase(64 * BS), overlay, 64 * BS)
    written = {b: bytes([b + 1]) * BS for b in range(0, 40, 3)}
    for b, data in written.items():
        clone.pwrite(memoryview(data), b * BS)
    clone.pwrite(memoryview(b"\x99" * BS), 3 * BS)  # a rewrite of a tentative block
    written[3] = b"\x99" * BS
    clone.zero(BS, 6 * BS)
    written[6] = bytes(BS)

    def dies(*args: object, **kwargs: object) -> None:
        raise Killed

    journal = overlay._journal
    assert journal is not None
    if step == "map-batch":
        monkeypatch.setattr(overlay._map, "write", dies)
    elif step == "reset":
        monkeypatch.setattr(journal, "reset", dies)
    elif step == "data-sync":
        assert overlay._data is not None
        monkeypatch.setattr(overlay._data, "sync", dies)
    else:
        real = overlay._map.write
        monkeypatch.setattr(overlay._map, "write", lambda batch, sync=False: dies() if sync else real(batch))
    with pytest.raises(Killed):
        clone.flush()
    monkeypatch.undo()
    _die(overlay)
    again = Clone(ZeroBase(64 * BS), RocksOverlay(path), 64 * BS)
    for b in range(64):
        buf = bytearray(BS)
        again.pread_into(memoryview(buf), b * BS)
        assert bytes(buf) == written.get(b, bytes(BS)), f"block {b}"
    again.close()


@pytest.mark.parametrize("cut", [1, 12, 20, 47])
def test_a_write_killed_inside_its_journal_record_reads_old_or_new(tmp_path: Path, cut: int) -> None:
    """Bytes, then the record: a kill in the middle of the record's store leaves the block's previous state
    (the write was not acknowledged); every acknowledged write before it reads back."""
    path = tmp_path / "ov"
    create_overlay(path)
    overlay = RocksOverlay(path)
    clone = Clone(ZeroBase(16 * BS), overlay, 16 * BS)
    clone.pwrite(memoryview(b"\x11" * BS), 0)
    journal = overlay._journal
    assert journal is not None
    start = journal.pos
    clone.pwrite(memoryview(b"\x22" * BS), BS)
    end = journal.pos
    assert end - start == 48, "a one-block first write is one 48-byte record"
    record = bytes(journal.mm[start:end])
    _die(overlay)
    with open(journal.path, "r+b") as f:
        f.seek(start)
        f.write(record[:cut] + bytes(end - start - cut))
    again = Clone(ZeroBase(16 * BS), RocksOverlay(path), 16 * BS)
    buf = bytearray(2 * BS)
    again.pread_into(memoryview(buf), 0)
    assert bytes(buf) == b"\x11" * BS + bytes(BS), f"cut after {cut} bytes"
    again.close()


def test_a_journal_an_open_did_not_see_is_never_replayed_later(
    tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another user (another /dev/shm folder) opens the overlay after a kill and writes; the journal it
    could not see must not be replayed over those writes when the first user opens it again."""
    path = tmp_path / "ov"
    create_overlay(path)
    overlay = RocksOverlay(path)
    clone = Clone(ZeroBase(16 * BS), overlay, 16 * BS)
    clone.pwrite(memoryview(b"\x11" * BS), 0)  # only in the journal
    _die(overlay)
    elsewhere = tmp_path / "other-shm"
    elsewhere.mkdir(mode=0o700)
    monkeypatch.setattr(_journal, "folder", lambda: elsewhere)
    other = Clone(ZeroBase(16 * BS), RocksOverlay(path), 16 * BS)
    other.trim(BS, 0)
    other.pwrite(memoryview(b"\x33" * BS), BS)
    other.close()
    monkeypatch.undo()
    back = Clone(ZeroBase(16 * BS), RocksOverlay(path), 16 * BS)
    buf = bytearray(2 * BS)
    back.pread_into(memoryview(buf), 0)
    assert bytes(buf) == bytes(BS) + b"\x33" * BS
    back.close()


def test_a_read_only_open_reads_what_only_the_journal_holds(tmp_path: Path) -> None:
    """After a kill -9, `clone export` or `check` opens the overlay read-only: the writes whose entries are
    only in the journal read back, checked against their prints, and the journal stays for the writer."""
    path = tmp_path / "ov"
    create_overlay(path)
    overlay = RocksOverlay(path)
    clone = Clone(ZeroBase(16 * BS), overlay, 16 * BS)
    clone.pwrite(memoryview(b"\x11" * BS), 0)
    clone.flush()
    clone.pwrite(memoryview(b"\x22" * BS), BS)  # only in the journal
    clone.pwrite(memoryview(b"\x33" * BS), 0)  # a rewrite in place: its print in memory only
    clone.zero(BS, 2 * BS)
    _die(overlay)
    reader = RocksOverlay(path, readonly=True)
    view = Clone(ZeroBase(16 * BS), reader, 16 * BS)
    buf = bytearray(3 * BS)
    view.pread_into(memoryview(buf), 0)
    assert bytes(buf) == b"\x33" * BS + b"\x22" * BS + bytes(BS)
    assert reader.verify_data() == []
    reader.close()
    writer = RocksOverlay(path)  # the journal is still there to replay
    again = Clone(ZeroBase(16 * BS), writer, 16 * BS)
    again.pread_into(memoryview(buf), 0)
    assert bytes(buf) == b"\x33" * BS + b"\x22" * BS + bytes(BS)
    again.close()


def test_journals_of_overlays_that_are_gone_are_collected(tmp_path: Path, folder: Path) -> None:
    """A server killed with writes unflushed leaves journals; the clone is then removed. A server's start
    removes those, and only those: a journal whose overlay exists may hold acknowledged writes, and other
    stores' journals are theirs."""
    store, other = tmp_path / "store", tmp_path / "other"
    kept, gone, foreign = store / "clones" / "a" / "ov1", store / "clones" / "b" / "ov2", other / "ov3"
    journals = []
    for owner in (kept, gone, foreign):
        owner.mkdir(parents=True)
        ident = os.urandom(16)
        j = Journal(folder / ident.hex(), ident, create=True, owner=owner)
        j.put(key(1), b"unflushed")
        j.close()
        journals.append(folder / ident.hex())
    try:
        gone.rmdir()
        foreign.rmdir()
        assert _journal.collect(store) == 1
        assert [p.exists() for p in journals] == [True, False, True]
    finally:
        for p in journals:
            p.unlink(missing_ok=True)
