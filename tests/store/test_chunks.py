"""The chunk store and version maps."""

from __future__ import annotations

import os
import struct
from array import array
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdclone import errors
from nbdclone.store import cache, chunks
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
    assert vm.slot(0) == vm.slot(2) == vm.slot(3) != vm.slot(1)
    assert read_all(cs, vm) == chunk(1) + chunk(2) + chunk(1) + chunk(1)


def test_zero_chunks_take_no_space(cs: ChunkStore) -> None:
    vm, written = store_image(cs, [None, bytes(CHUNK), chunk(3)])
    assert written == 1
    assert [vm.slot(0), vm.slot(1)] == [ZERO_SLOT, ZERO_SLOT]
    assert os.stat(cs.pack).st_size == CHUNK
    assert read_all(cs, vm) == bytes(2 * CHUNK) + chunk(3)


def test_a_new_version_stores_only_what_changed(cs: ChunkStore) -> None:
    v1, _ = store_image(cs, [chunk(i) for i in range(1, 11)])
    v2, written = store_image(cs, [chunk(i) for i in range(1, 10)] + [chunk(99)], (v1,))
    assert written == 1
    assert [v2.slot(i) for i in range(9)] == [v1.slot(i) for i in range(9)]
    assert read_all(cs, v2)[-CHUNK:] == chunk(99)


def test_a_forced_digest_collision_never_shares_a_chunk(cs: ChunkStore, monkeypatch: pytest.MonkeyPatch) -> None:
    for module in (chunks, cache):  # every chunk collides, at import and when read back
        monkeypatch.setattr(module, "digest", lambda data: b"\x00" * 16)
    v1, _ = store_image(cs, [chunk(1)])
    v2, written = store_image(cs, [chunk(2), chunk(1)], (v1,))
    assert written == 1  # chunk(2) got its own slot; chunk(1) was shared after comparing bytes
    assert v2.slot(0) != v1.slot(0) and v2.slot(1) == v1.slot(0)
    assert read_all(cs, v1) == chunk(1)
    assert read_all(cs, v2) == chunk(2) + chunk(1)


def test_version_map_round_trips_and_rejects_corruption(tmp_path: Path) -> None:
    vm = VersionMap(3 * CHUNK - 512)
    vm.put(0, 5, bytes(range(16)))
    vm.put(2, 7, bytes(range(16, 32)))
    vm.save(tmp_path / "v.map")
    loaded = VersionMap.load(tmp_path / "v.map", digests=True)
    assert loaded == vm and list(loaded.stored()) == list(vm.stored())
    assert VersionMap.load(tmp_path / "v.map").digest_pages is None  # serving does not load digests
    good = (tmp_path / "v.map").read_bytes()
    for damaged in (good[:-1], good[:100] + bytes([good[100] ^ 1]) + good[101:], good[:20]):
        (tmp_path / "v.map").write_bytes(damaged)
        with pytest.raises(errors.Damaged, match=r"v\.map is damaged"):
            VersionMap.load(tmp_path / "v.map")


def test_a_map_costs_what_the_base_holds_not_its_size(tmp_path: Path) -> None:
    vm = VersionMap(1 << 40)  # 1 TiB: 16 Mi chunks
    far = (1 << 40) // CHUNK - 1
    vm.put(0, 1, b"a" * 16)
    vm.put(far, 2, b"b" * 16)
    vm.save(tmp_path / "v.map")
    assert (tmp_path / "v.map").stat().st_size < 256 << 10  # two pages; the flat format took 384 MiB
    loaded = VersionMap.load(tmp_path / "v.map")
    assert (loaded.slot(0), loaded.slot(1), loaded.slot(far - 1), loaded.slot(far)) == (1, ZERO_SLOT, ZERO_SLOT, 2)
    assert loaded.used_slots() == {1, 2}


def test_flat_maps_of_earlier_stores_still_load(tmp_path: Path) -> None:
    slots = array("q", [5, ZERO_SLOT, 7])
    digests = bytes(range(16)) + bytes(16) + bytes(range(16, 32))
    (tmp_path / "v.map").write_bytes(struct.pack("<8sQQ", b"NBDCLMAP", 3 * CHUNK, 3) + slots.tobytes() + digests)
    vm = VersionMap.load(tmp_path / "v.map")
    assert [vm.slot(i) for i in range(3)] == [5, ZERO_SLOT, 7]
    assert [key for _, _, key in vm.stored()] == [bytes(range(16)), bytes(range(16, 32))]


@settings(max_examples=60, deadline=None)
@given(
    layout=st.lists(st.sampled_from(["zero", "data", "same"]), min_size=1, max_size=3 * chunks.PAGE + 5),
    reads=st.lists(st.tuples(st.integers(0, 1 << 30), st.integers(1, 5 * CHUNK)), min_size=1, max_size=8),
)
def test_paged_reads_extents_and_zero_bitmaps_match_the_bytes(
    tmp_path_factory: pytest.TempPathFactory, layout: list[str], reads: list[tuple[int, int]]
) -> None:
    cs = ChunkStore(tmp_path_factory.mktemp("chunks"))
    # Chunks far apart land on different pages; "same" repeats the previous chunk (a shared slot).
    data: list[bytes | None] = []
    for i, kind in enumerate(layout):
        data.append(
            None if kind == "zero" else data[-1] if kind == "same" and data and data[-1] else chunk(i % 251 + 1)
        )
    vm, _ = store_image(cs, data)
    whole = b"".join(d or bytes(CHUNK) for d in data)
    base = ChunkedBase(cs.pack, vm)
    try:
        for offset, length in reads:
            offset %= len(whole)
            buf = bytearray(length)
            base.pread_into(memoryview(buf), offset)
            expect = whole[offset : offset + length]
            assert buf == expect + bytes(length - len(expect))
            extents = base.extents(offset, length)
            assert extents[0].offset == offset and sum(e.length for e in extents) == length
            for e in extents:  # stored chunks never hold zeros here, so extents are exact
                span = whole[e.offset : e.offset + e.length]
                assert e.zero == (span.count(0) == len(span)), (e, layout)
            first, n = offset // 4096, -(-length // 4096)
            bitmap = base.zero_bitmap(first, n, 4096)
            for k, flag in enumerate(bitmap):
                block = whole[(first + k) * 4096 : (first + k + 1) * 4096]
                assert flag == (block.count(0) == len(block)), (first + k, layout)
    finally:
        base.close()


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
    assert max(v3.used_slots()) < cs.nslots() and cs.nslots() == 10  # filled freed slots, did not grow


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


@pytest.mark.parametrize(
    ("stored", "read", "kept"),
    [
        pytest.param(20_000, 900, True, id="a-boot-reads-a-little"),
        pytest.param(20_000, 12_000, False, id="a-whole-disk-scan-is-not-a-boot"),
        pytest.param(1_000, 900, True, id="a-small-image-boot-may-read-most"),
        pytest.param(20_000, 10, False, id="a-probe-is-not-a-boot"),
        pytest.param(0, 12_000, True, id="no-size-known-no-scan-rule"),
    ],
)
def test_trace_recorder_keeps_boots_not_scans_or_probes(tmp_path: Path, stored: int, read: int, kept: bool) -> None:
    trace = tmp_path / "1.trace"
    recorder = chunks.TraceRecorder(trace, stored=stored)
    recorder.add(range(0, 2 * read, 2))
    recorder.finish()
    assert trace.exists() == kept
    if kept:
        assert list(chunks.load_trace(trace)) == list(range(0, 2 * read, 2))
