"""clone diff (store/diff.py): the extents between two states of a clone, from maps and the overlay, checked
against the states' bytes read whole."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from nbdclone import errors
from nbdclone.store import Store, diff, lineage
from nbdclone.store.chunks import CHUNK
from nbdclone.store.images import import_base, open_clone_readonly
from nbdclone.store.overlay import BLOCK_SIZE
from nbdclone.store.registry import Registry
from tests.helpers import make_image

SIZE = 8 << 20


def _read(store: Store, name: str) -> bytes:
    clone = open_clone_readonly(store, name)
    try:
        buf = bytearray(clone.size)
        clone.pread_into(memoryview(buf), 0)
        return bytes(buf)
    finally:
        clone.close()
        clone.base.close()


def _change(store: Store, name: str, rng: random.Random, n: int) -> set[int]:
    """n random writes (some of zeros, some zero requests, some partial blocks); the blocks they touched."""
    registry = Registry(store)
    clone = registry.acquire(name)
    touched: set[int] = set()
    for _ in range(n):
        off = rng.randrange(0, SIZE - 70_000)
        length = rng.choice([512, 4096, 8192, 65536, 70_000])
        how = rng.random()
        if how < 0.2:
            clone.zero(length, off)
        else:
            data = bytes(length) if how < 0.3 else rng.randbytes(length)
            clone.pwrite(memoryview(data), off)
        touched |= set(range(off // BLOCK_SIZE, (off + length - 1) // BLOCK_SIZE + 1))
    clone.flush()
    registry.release(name)
    registry.close_all()
    return touched


def _covers(d: diff.Diff, old: bytes, new: bytes) -> None:
    """Every byte that differs is in an extent; a zero extent reads zeros in the newer state."""
    marked = bytearray(len(new))
    for e in d.extents:
        marked[e.offset : e.offset + e.length] = b"\1" * e.length
        if e.zero:
            assert new[e.offset : e.offset + e.length] == bytes(e.length), e
    differs = [i for i in range(0, len(new), BLOCK_SIZE) if old[i : i + BLOCK_SIZE] != new[i : i + BLOCK_SIZE]]
    missed = [i for i in differs if marked[i : i + BLOCK_SIZE] != b"\1" * BLOCK_SIZE]
    assert not missed, f"{len(missed)} changed blocks not reported, the first at {missed[0]}"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_diff_names_every_change_between_snapshots_and_now(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    st = Store(tmp_path / "store")
    make_image(tmp_path / "b.raw", SIZE, [(0, 2 << 20), (5 << 20, 1 << 20)], seed=seed)
    import_base(st, "deb", tmp_path / "b.raw")
    st.create_clones(["c"], base="deb")
    start = _read(st, "c")
    _change(st, "c", rng, 30)
    lineage.snapshot(st, "c", "s1")
    s1 = _read(st, "c")
    _change(st, "c", rng, 30)
    lineage.snapshot(st, "c", "s2")
    s2 = _read(st, "c")
    after = _change(st, "c", rng, 20)
    now = _read(st, "c")

    between = diff.diff(st, "c", "s1", "s2")
    _covers(between, s1, s2)
    for e in between.extents:  # snapshots are compared by chunk content: every chunk reported differs
        for i in range(e.offset // CHUNK, -(-(e.offset + e.length) // CHUNK)):
            assert s1[i * CHUNK : (i + 1) * CHUNK] != s2[i * CHUNK : (i + 1) * CHUNK], i
    assert (between.since, between.until) == ("snapshot s1", "snapshot s2")

    since = diff.diff(st, "c")  # from the version its writes started on (s2's): the overlay's blocks
    assert since.since == "snapshot s2" and since.until == "now"
    assert {
        b for e in since.extents for b in range(e.offset // BLOCK_SIZE, (e.offset + e.length) // BLOCK_SIZE)
    } <= after
    _covers(since, s2, now)
    assert diff.diff(st, "c", "s2").extents == since.extents

    _covers(diff.diff(st, "c", "s1"), s1, now)
    _covers(diff.diff(st, "c", "s1", "s1"), s1, s1)
    assert diff.diff(st, "c", "s1", "s1").extents == []
    _covers(diff.diff(st, "c", "s2", "s1"), s2, s1)
    assert start != s1 != s2 != now


def test_a_diff_of_a_blank_clone_and_a_clone_of_a_base(tmp_path: Path) -> None:
    st = Store(tmp_path / "store")
    make_image(tmp_path / "b.raw", SIZE, [(0, SIZE)], seed=4)
    import_base(st, "deb", tmp_path / "b.raw")
    st.create_clones(["blank"], base=None, size=SIZE)
    st.create_clones(["c"], base="deb")
    assert diff.diff(st, "blank").extents == [] and diff.diff(st, "c").extents == []
    rng = random.Random(5)
    _change(st, "blank", rng, 10)
    d = diff.diff(st, "blank")
    assert d.since == "nothing (a blank disk)" and d.changed > 0
    _covers(d, bytes(SIZE), _read(st, "blank"))
    before = _read(st, "c")
    registry = Registry(st)
    clone = registry.acquire("c")
    clone.zero(3 * CHUNK, CHUNK)  # zeros over the base's data: a zero extent
    registry.release("c")
    registry.close_all()
    d = diff.diff(st, "c")
    assert d.since == "deb@1" and [(e.offset, e.length, e.zero) for e in d.extents] == [(CHUNK, 3 * CHUNK, True)]
    _covers(d, before, _read(st, "c"))


def test_a_diff_of_an_unknown_snapshot_is_refused(tmp_path: Path) -> None:
    st = Store(tmp_path / "store")
    st.create_clones(["blank"], base=None, size=SIZE)
    with pytest.raises(errors.SnapshotNotFound):
        diff.diff(st, "blank", "nope")
    with pytest.raises(errors.CloneNotFound):
        diff.diff(st, "ghost")
