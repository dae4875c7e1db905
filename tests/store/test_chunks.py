"""The chunk store and version maps."""

from __future__ import annotations

import os
from array import array
from pathlib import Path

import pytest

from nbdclone.store import chunks
from nbdclone.store.chunks import CHUNK, ZERO_SLOT, ChunkedBase, ChunkStore, VersionMap


def chunk(fill: int) -> bytes:
    return bytes([fill]) * CHUNK


def store_image(
    cs: ChunkStore, data: list[bytes | None], existing: tuple[VersionMap, ...] = ()
) -> tuple[VersionMap, int]:
    with cs.writer():
        return cs.import_chunks(enumerate(data), len(data) * CHUNK, existing)


@pytest.fixture
def cs(tmp_path: Path) -> ChunkStore:
    return ChunkStore(tmp_path / "chunks")


def read_all(cs: ChunkStore, vm: VersionMap) -> bytes:
    base = ChunkedBase(cs.pack, vm)
    buf = bytearray(vm.size)
    base.pread_into(memoryview(buf), 0)
    base.close()
    return bytes(buf)


def test_identical_chunks_are_stored_once(cs: ChunkStore) -> None:
    vm, written = store_image(cs, [chunk(1), chunk(2), chunk(1), chunk(1)])
    assert written == 2
    assert vm.slots[0] == vm.slots[2] == vm.slots[3] != vm.slots[1]
    assert read_all(cs, vm) == chunk(1) + chunk(2) + chunk(1) + chunk(1)


def test_zero_chunks_take_no_space(cs: ChunkStore) -> None:
    vm, written = store_image(cs, [None, bytes(CHUNK), chunk(3)])
    assert written == 1
    assert list(vm.slots[:2]) == [ZERO_SLOT, ZERO_SLOT]
    assert os.stat(cs.pack).st_size == CHUNK
    assert read_all(cs, vm) == bytes(2 * CHUNK) + chunk(3)


def test_a_new_version_stores_only_what_changed(cs: ChunkStore) -> None:
    v1, _ = store_image(cs, [chunk(i) for i in range(1, 11)])
    v2, written = store_image(cs, [chunk(i) for i in range(1, 10)] + [chunk(99)], (v1,))
    assert written == 1
    assert list(v2.slots[:9]) == list(v1.slots[:9])
    assert read_all(cs, v2)[-CHUNK:] == chunk(99)


def test_a_forced_digest_collision_never_shares_a_chunk(cs: ChunkStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chunks, "digest", lambda data: b"\x00" * 16)  # every chunk collides
    v1, _ = store_image(cs, [chunk(1)])
    v2, written = store_image(cs, [chunk(2), chunk(1)], (v1,))
    assert written == 1  # chunk(2) got its own slot; chunk(1) was shared after comparing bytes
    assert v2.slots[0] != v1.slots[0] and v2.slots[1] == v1.slots[0]
    assert read_all(cs, v1) == chunk(1)
    assert read_all(cs, v2) == chunk(2) + chunk(1)


def test_version_map_round_trips_and_rejects_corruption(tmp_path: Path) -> None:
    vm = VersionMap(3 * CHUNK - 512, array("q", [5, ZERO_SLOT, 7]), bytes(range(48)))
    vm.save(tmp_path / "v.map")
    assert VersionMap.load(tmp_path / "v.map") == vm
    (tmp_path / "v.map").write_bytes((tmp_path / "v.map").read_bytes()[:-1])
    with pytest.raises(Exception, match="corrupt"):
        VersionMap.load(tmp_path / "v.map")


def test_release_unused_punches_holes_and_slots_are_reused(cs: ChunkStore) -> None:
    v1, _ = store_image(cs, [chunk(i) for i in range(1, 9)])
    v2, _ = store_image(cs, [chunk(1), chunk(50), chunk(51)], (v1,))
    allocated = os.stat(cs.pack).st_blocks * 512
    with cs.writer():
        freed = cs.release_unused([v2])  # v1 is gone
    assert freed >= 7 * CHUNK - 4096
    assert os.stat(cs.pack).st_blocks * 512 <= allocated - 7 * CHUNK + 4096
    assert read_all(cs, v2) == chunk(1) + chunk(50) + chunk(51)
    v3, written = store_image(cs, [chunk(60), chunk(61)], (v2,))
    assert written == 2
    assert max(v3.slots) < cs.nslots() and cs.nslots() == 10  # filled freed slots, did not grow


def test_reads_across_chunks_and_partial_tail(cs: ChunkStore) -> None:
    data = [os.urandom(CHUNK), None, os.urandom(CHUNK), os.urandom(CHUNK)]
    vm, _ = store_image(cs, data)
    whole = b"".join(d or bytes(CHUNK) for d in data)
    base = ChunkedBase(cs.pack, vm)
    for offset, length in [(0, 1), (CHUNK - 5, 10), (CHUNK - 1, 2 * CHUNK + 2), (3 * CHUNK + 7, CHUNK - 7)]:
        buf = bytearray(length)
        base.pread_into(memoryview(buf), offset)
        assert buf == whole[offset : offset + length], (offset, length)
    assert [(e.offset, e.length, e.zero) for e in base.extents(0, 4 * CHUNK)] == [
        (0, CHUNK, False),
        (CHUNK, CHUNK, True),
        (2 * CHUNK, 2 * CHUNK, False),
    ]
    base.close()
