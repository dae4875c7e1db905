"""The shared read cache: the page cache over the chunk pack, with our counters, bound and boot traces."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest

from nbdclone.errors import Damaged
from nbdclone.store import Store, registry
from nbdclone.store import cache as cache_module
from nbdclone.store.cache import CHUNK, Evictor, PackReader, resident_bytes
from nbdclone.store.chunks import ChunkedBase, load_trace
from nbdclone.store.images import import_base
from nbdclone.store.registry import Registry

MiB = 1 << 20


def drop_from_memory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def io_read_bytes() -> int:
    """Bytes this process made the storage layer read (page cache misses), from /proc/self/io."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    raise AssertionError("no read_bytes in /proc/self/io")


@pytest.fixture
def store(tmp_path: Path) -> Store:
    st = Store(tmp_path / "store")
    v1 = os.urandom(16 * MiB)
    (tmp_path / "v1.raw").write_bytes(v1)
    # v2 shares its first 8 MiB with v1.
    (tmp_path / "v2.raw").write_bytes(v1[: 8 * MiB] + os.urandom(8 * MiB))
    import_base(st, "os", tmp_path / "v1.raw")
    import_base(st, "os", tmp_path / "v2.raw")
    return st


def test_concurrent_misses_of_one_block_read_the_base_once(store: Store) -> None:
    pack = store.chunks.pack
    drop_from_memory(pack)
    assert resident_bytes(pack) == 0, "the test needs the pack out of memory"
    reader = PackReader(pack)
    reader.ensure(1000)
    os.posix_fadvise(reader.fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead: count exactly what is read
    start = threading.Barrier(8)
    results: list[bytes] = []

    def read() -> None:
        buf = bytearray(4096)
        start.wait()
        reader.read(memoryview(buf), 5 * CHUNK)
        results.append(bytes(buf))

    before = io_read_bytes()
    threads = [threading.Thread(target=read) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1
    assert io_read_bytes() - before <= 4096 * 4  # one read of the page (block-layer granularity), not eight


def test_a_flip_keeps_shared_blocks_cached(store: Store) -> None:
    rec = store.get_base("os")
    reader = PackReader(store.chunks.pack)
    v1 = ChunkedBase(store.chunks.pack, store.version_map(rec, "1"), reader)
    v2 = ChunkedBase(store.chunks.pack, store.version_map(rec, "2"), reader)
    buf = memoryview(bytearray(CHUNK))
    for off in range(0, 16 * MiB, CHUNK):
        v1.pread_into(buf, off)
    drop_from_memory(store.chunks.pack)
    for off in range(0, 8 * MiB, CHUNK):  # what v1 boots from after the drop
        v1.pread_into(buf, off)
    hits, misses = reader.stats.hits, reader.stats.misses
    for off in range(0, 8 * MiB, CHUNK):  # the same blocks, read through v2: the same cached chunks
        v2.pread_into(buf, off)
    assert reader.stats.misses == misses
    assert reader.stats.hits == hits + 8 * MiB // CHUNK


def test_the_cache_never_exceeds_its_bound(store: Store, tmp_path: Path) -> None:
    pack = store.chunks.pack
    clock = tmp_path / "cache.clock"
    reader = PackReader(pack, clock)
    reader.ensure(10_000)
    buf = memoryview(bytearray(CHUNK))
    evictor = Evictor(pack, clock, 4 * MiB)
    for rnd in range(3):
        for off in range(0, os.stat(pack).st_size, CHUNK):
            reader.read(buf, off)
        evictor.run_once()
        # Pages a reader has mapped are let go at its next read after the pass; the next pass evicts them.
        reader.read(buf, 0)
        resident = evictor.run_once()
        assert resident <= 4 * MiB, (rnd, resident)
        assert resident_bytes(pack) <= 4 * MiB + 64 * 1024
    assert evictor.evictions > 0
    # Evicted data still reads correctly (from disk again), and counts as a miss.
    misses = reader.stats.misses
    for off in range(0, os.stat(pack).st_size, CHUNK):
        reader.read(buf, off)
    assert reader.stats.misses > misses


def test_boot_trace_is_recorded_once_per_version_and_prefetched(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="nbdclone")
    store.create_clones(["probe", "a", "b"], base="os")
    rec = store.get_base("os")
    trace = store.trace_path(rec, "1")
    buf = memoryview(bytearray(4096))
    reg = Registry(store)
    reg.acquire("probe").pread_into(buf, 0)  # a probe (nbdinfo) reads a block or two: not a boot
    reg.release("probe")
    assert not trace.exists()
    assert reg.stats()["idle_versions"] == 1  # the version stays open: the next connection records again
    clone = reg.acquire("a")
    boot = [c * CHUNK for c in (9, 3, 0, 7, *range(20, 40))] + [3 * CHUNK + 5]
    for off in boot:
        clone.pread_into(buf, off)
    reg.release("a")  # the version closes: its recording is written
    assert list(load_trace(trace)) == [9, 3, 0, 7, *range(20, 40)]
    reg2 = Registry(store)
    clone = reg2.acquire("b")  # a second boot of the same version: prefetched, not recorded again
    _join_prefetches()
    assert reg2.reader is not None and reg2.reader.stats.prefetched_bytes == 24 * CHUNK
    assert any(r.getMessage().startswith("prefetched os@1: 1.5 MiB in ") for r in caplog.records)
    for off in range(0, 16 * MiB, CHUNK):
        clone.pread_into(buf, off)
    reg2.release("b")
    assert list(load_trace(trace)) == [9, 3, 0, 7, *range(20, 40)]


def _join_prefetches() -> None:
    for t in threading.enumerate():
        if t.name == "nbdclone-prefetch":
            t.join(10)


def test_a_version_no_clone_reads_stays_open_for_the_next_connection(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry, "IDLE_VERSIONS", 1)
    store.create_clones(["a", "b", "c"], base="os")
    reg = Registry(store, record_traces=False)
    v1 = reg.acquire("a").base
    reg.release("a")
    assert (reg.stats()["open_versions"], reg.stats()["idle_versions"]) == (0, 1)
    assert reg.acquire("b").base is v1  # the map was not loaded again
    reg.release("b")
    store.promote("os", "2")
    assert reg.acquire("c").base is not v1
    reg.release("c")
    assert reg.stats()["idle_versions"] == 1  # the bound: the least recently used idle version was closed
    store.promote("os", "1")
    assert reg.acquire("a").base is not v1
    reg.release("a")
    reg.close_all()
    assert reg.stats()["idle_versions"] == 0


def test_an_idle_version_takes_up_a_trace_recorded_meanwhile(store: Store) -> None:
    store.create_clones(["a", "b"], base="os")
    buf = memoryview(bytearray(4096))
    reg = Registry(store, record_traces=False)
    reg.acquire("a")
    reg.release("a")  # the version is now open and idle here, with no trace
    recorder = Registry(store)  # another worker boots a clone of the version first: it records the trace
    clone = recorder.acquire("b")
    for c in range(24):
        clone.pread_into(buf, c * CHUNK)
    recorder.release("b")
    assert len(load_trace(store.trace_path(store.get_base("os"), "1"))) == 24
    reg.acquire("a")
    _join_prefetches()
    assert reg.reader is not None and reg.reader.stats.prefetched_bytes == 24 * CHUNK
    reg.close_all()
    recorder.close_all()


def _counting_digest(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the chunk digests computed (each is one check of a chunk against its key)."""
    calls: list[int] = []
    real = cache_module.digest

    def counted(data: bytes | bytearray | memoryview) -> bytes:
        calls.append(1)
        return real(data)

    monkeypatch.setattr(cache_module, "digest", counted)
    return calls


def test_a_chunk_is_checked_once_per_host_not_once_per_worker(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two readers sharing one clock (two workers of one server) check each chunk once between them."""
    calls = _counting_digest(monkeypatch)
    rec = store.get_base("os")
    clock = tmp_path / "cache.clock"
    buf = memoryview(bytearray(4096))
    pack = store.chunks.pack
    first = ChunkedBase(pack, store.version_map(rec, "1"), PackReader(pack, clock))
    for off in range(0, 16 * MiB, CHUNK):
        first.pread_into(buf, off)
    assert len(calls) == 16 * MiB // CHUNK
    second = ChunkedBase(pack, store.version_map(rec, "1"), PackReader(pack, clock))
    for off in range(0, 16 * MiB, CHUNK):
        second.pread_into(buf, off)
    assert len(calls) == 16 * MiB // CHUNK, "the second worker checked chunks the first had checked"


def test_a_chunk_read_back_in_after_an_eviction_is_checked_again(store: Store, tmp_path: Path) -> None:
    """Damage that reaches the disk after a chunk was checked is caught once the evictor dropped its pages:
    it clears the VERIFIED bit of every region it drops, before it drops it."""
    rec = store.get_base("os")
    clock = tmp_path / "cache.clock"
    pack = store.chunks.pack
    reader = PackReader(pack, clock)
    version = ChunkedBase(pack, store.version_map(rec, "1"), reader)
    buf = memoryview(bytearray(4096))
    for off in range(0, 16 * MiB, CHUNK):
        version.pread_into(buf, off)
    slot = store.version_map(rec, "1").slot(0)
    assert reader.verified(slot)
    with open(pack, "r+b") as f:  # the disk's copy changes under the cached one
        f.seek(slot * CHUNK + 100)
        f.write(b"\xff")
    Evictor(pack, clock, 0).run_once()
    assert not reader.verified(slot)
    with pytest.raises(Damaged):
        version.pread_into(buf, 0)


def test_a_reused_slot_is_checked_again(store: Store, tmp_path: Path) -> None:
    """gc frees a version's slots; a new import writes other chunks into them: their VERIFIED bits go."""
    clock = tmp_path / "cache.clock"
    reader = PackReader(store.chunks.pack, clock)
    rec = store.get_base("os")
    v2 = ChunkedBase(store.chunks.pack, store.version_map(rec, "2"), reader)
    buf = memoryview(bytearray(4096))
    for off in range(8 * MiB, 16 * MiB, CHUNK):  # v2's own chunks
        v2.pread_into(buf, off)
    own = [store.version_map(rec, "2").slot(i) for i in range(8 * MiB // CHUNK, 16 * MiB // CHUNK)]
    assert all(reader.verified(s) for s in own)
    store.chunks.clock = clock
    store.promote("os", "1")
    store.remove_version("os@2")  # frees v2's own slots
    (tmp_path / "v3.raw").write_bytes(os.urandom(16 * MiB))
    import_base(store, "os", tmp_path / "v3.raw")
    v3 = store.version_map(store.get_base("os"), "3")
    reused = {v3.slot(i) for i in range(v3.nchunks)} & set(own)
    assert reused, "the import did not reuse a freed slot: the test shows nothing"
    assert not any(reader.verified(s) for s in reused)
