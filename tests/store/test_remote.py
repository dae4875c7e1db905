"""A fleet host's pack as a cache: versions staged without their bytes, slots filled when read
(store/remote.py, invariants R1-R3). The fleet here is the test's own table of chunks by SHA-256: these
tests are about what the store does with fetched bytes (the fetch over real RADOS is tests/e2e/test_fleet.py)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from nbdclone import errors
from nbdclone.store.cache import PackReader, digest
from nbdclone.store.chunks import CHUNK, ChunkedBase, ChunkStore, VersionMap
from nbdclone.store.remote import sha256


def chunk(fill: int) -> bytes:
    return bytes([fill]) * CHUNK


class Fleet:
    """The chunks a fleet holds, and a fetch that fills a store's slots from them, counting."""

    def __init__(self, cs: ChunkStore, data: list[bytes]) -> None:
        self.cs = cs
        self.by_sha = {sha256(d): d for d in data}
        self.fetched: list[int] = []
        self.lock = threading.Lock()

    def entries(self, data: list[bytes]) -> list[tuple[int, bytes, bytes]]:
        return [(i, sha256(d), digest(d)) for i, d in enumerate(data) if d != bytes(CHUNK)]

    def stage(self, data: list[bytes], existing: tuple[VersionMap, ...] = ()) -> tuple[VersionMap, dict[int, bytes]]:
        with self.cs.writer():
            vmap, new = self.cs.map_remote(self.entries(data), len(data) * CHUNK, existing)
            self.cs.remote.add(new)
        return vmap, new

    def fetch(self, pairs: list[tuple[int, bytes]]) -> None:
        table = self.cs.remote.load()
        with self.lock:
            self.fetched += [slot for slot, _ in pairs]
        self.cs.remote.fill(((slot, key, self.by_sha[table[slot]]) for slot, key in pairs), digest)


def read_all(cs: ChunkStore, vm: VersionMap, fetch: Fleet | None) -> bytes:
    base = ChunkedBase(cs.pack, vm, fetch=fetch.fetch if fetch else None)
    buf = bytearray(vm.size)
    try:
        base.pread_into(memoryview(buf), 0)
    finally:
        base.close()
    return bytes(buf)


@pytest.fixture
def cs(tmp_path: Path) -> ChunkStore:
    return ChunkStore(tmp_path / "chunks")


def test_a_staged_version_takes_no_space_and_reads_right_through_fills(cs: ChunkStore) -> None:
    data = [chunk(1), chunk(2), bytes(CHUNK), chunk(1), chunk(3)]
    fleet = Fleet(cs, data)
    vmap, new = fleet.stage(data)
    assert len(new) == 3 and os.stat(cs.pack).st_blocks == 0  # one slot per distinct chunk, all holes
    with pytest.raises(errors.Damaged):  # a reader that cannot fetch never serves a hole as data
        read_all(cs, vmap, None)
    assert cs.remote.unfetched() == set(new)
    assert read_all(cs, vmap, fleet) == b"".join(data)
    assert sorted(fleet.fetched) == sorted(new)  # each slot once
    assert cs.remote.unfetched() == set()
    fleet.fetched.clear()
    assert read_all(cs, vmap, fleet) == b"".join(data) and fleet.fetched == []  # held now: no fetch


def test_many_readers_of_one_cold_slot_all_read_right(cs: ChunkStore) -> None:
    data = [chunk(k) for k in range(1, 9)]
    fleet = Fleet(cs, data)
    vmap, _ = fleet.stage(data)
    results: list[bytes] = []

    def reader() -> None:
        results.append(read_all(cs, vmap, fleet))

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [b"".join(data)] * 8


def test_staging_shares_what_the_host_holds_or_was_promised(cs: ChunkStore) -> None:
    v1 = [chunk(1), chunk(2), chunk(3)]
    fleet = Fleet(cs, [*v1, chunk(4)])
    m1, _new1 = fleet.stage(v1)
    read_all(cs, m1, fleet)  # chunk 1..3 held now
    m2, new2 = fleet.stage([chunk(1), chunk(4), chunk(3)], existing=(m1,))
    assert list(new2.values()) == [sha256(chunk(4))]  # only the new chunk gets a slot
    assert m2.slot(0) == m1.slot(0) and m2.slot(2) == m1.slot(2)
    m3, new3 = fleet.stage([chunk(4)], existing=(m1, m2))
    assert new3 == {} and m3.slot(0) == m2.slot(1)  # promised (not fetched yet) is shared too


def test_an_import_never_takes_a_remote_slot(cs: ChunkStore) -> None:
    data = [chunk(1), chunk(2)]
    fleet = Fleet(cs, data)
    vmap, new = fleet.stage(data)
    with cs.writer():  # a local import after a gc that freed nothing: free slots are past the remote ones
        local, _ = cs.import_chunks(enumerate([chunk(7), chunk(8)]), 2 * CHUNK, (vmap,))
    assert not local.used_slots() & set(new)
    assert read_all(cs, vmap, fleet) == b"".join(data)


def test_a_fill_in_flight_never_writes_a_slot_given_to_other_bytes(cs: ChunkStore) -> None:
    """R2/R3: a fetch read a chunk for slot S; meanwhile the version went, gc dropped S's entry and an
    import put other bytes in S. The late fill writes nothing; the import's bytes stay."""
    data = [chunk(1), chunk(2)]
    fleet = Fleet(cs, data)
    vmap, _new = fleet.stage(data)
    slot = vmap.slot(0)
    late = (slot, digest(chunk(1)), chunk(1))  # fetched, not written yet
    with cs.writer():
        cs.release_unused([])  # the version was removed: its entries go first, then its slots
    assert cs.remote.load() == {}
    with cs.writer():
        local, _ = cs.import_chunks(enumerate([chunk(9), chunk(9)]), 2 * CHUNK, ())
    assert local.slot(0) == slot  # the freed slot is reused
    assert cs.remote.fill([late], digest) == 0
    assert read_all(cs, local, None) == chunk(9) * 2


def test_a_fill_of_other_bytes_than_the_reader_wants_is_refused(cs: ChunkStore) -> None:
    data = [chunk(1)]
    fleet = Fleet(cs, data)
    vmap, _ = fleet.stage(data)
    slot = vmap.slot(0)
    assert cs.remote.fill([(slot, digest(chunk(1)), chunk(5))], digest) == 0  # not the named SHA-256
    assert cs.remote.fill([(slot, digest(chunk(5)), chunk(1))], digest) == 0  # not the reader's digest
    assert os.stat(cs.pack).st_blocks == 0


def test_a_fill_lost_to_a_power_cut_is_fetched_again(cs: ChunkStore) -> None:
    """Fills are not fsynced: a slot that comes back torn fails its digest and is fetched again (R1)."""
    data = [chunk(1), chunk(2)]
    fleet = Fleet(cs, data)
    vmap, _ = fleet.stage(data)
    assert read_all(cs, vmap, fleet) == b"".join(data)
    fd = os.open(cs.pack, os.O_WRONLY)
    os.pwrite(fd, bytes(4096), vmap.slot(1) * CHUNK + 8192)  # what reached the disk: a torn page
    os.close(fd)
    fleet.fetched.clear()
    reader = PackReader(cs.pack, fetch=fleet.fetch)
    reader.ensure(cs.nslots())
    base = ChunkedBase(cs.pack, vmap, reader)
    buf = bytearray(vmap.size)
    base.pread_into(memoryview(buf), 0)
    base.close()
    reader.close()
    assert bytes(buf) == b"".join(data) and fleet.fetched == [vmap.slot(1)]


def test_gc_keeps_the_entries_of_slots_live_versions_map(cs: ChunkStore) -> None:
    v1, v2 = [chunk(1), chunk(2)], [chunk(1), chunk(3)]
    fleet = Fleet(cs, v1 + v2)
    m1, _ = fleet.stage(v1)
    m2, _ = fleet.stage(v2, existing=(m1,))
    with cs.writer():
        cs.release_unused([m2])  # version 1 went
    assert set(cs.remote.load()) == m2.used_slots()
    assert read_all(cs, m2, fleet) == b"".join(v2)


def test_the_table_reads_both_formats_and_refuses_damage(tmp_path: Path) -> None:
    import struct

    from nbdclone.store._sealed import seal_bytes
    from nbdclone.store.remote import RemoteSlots, RemoteTable

    entries = {9: sha256(b"a"), 2: sha256(b"b"), 5: sha256(b"c")}
    table = RemoteTable.of(entries)
    assert dict(table.items()) == entries and list(table) == [2, 5, 9] and 4 not in table and table.get(4) is None
    remote = RemoteSlots(tmp_path)
    remote.path.write_bytes(seal_bytes(table.encode()))
    assert dict(remote.load().items()) == entries
    rows = b"NBDCRMT1" + b"".join(struct.pack("<Q32s", s, k) for s, k in entries.items())  # as first written
    remote.path.write_bytes(seal_bytes(rows))
    assert dict(RemoteSlots(tmp_path).load().items()) == entries
    remote.path.write_bytes(seal_bytes(table.encode()[:-1]))
    with pytest.raises(errors.Damaged):
        RemoteSlots(tmp_path).load()
