from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from nbdclone import errors
from nbdclone.runtime import SLOTS
from nbdclone.store import Store
from nbdclone.store.catalog import slot_of, validate_name, worker_of
from nbdclone.store.images import import_base
from nbdclone.store.layout import write_atomic
from tests.helpers import make_image, snapshot


@pytest.fixture
def store(tmp_path: Path) -> Store:
    st = Store(tmp_path / "store")
    make_image(tmp_path / "b.raw", 1 << 20, [(0, 4096)])
    import_base(st, "deb", tmp_path / "b.raw")
    return st


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("", id="empty"),
        pytest.param("../x", id="dotdot"),
        pytest.param("a/b", id="slash"),
        pytest.param(".hidden", id="leading-dot"),
        pytest.param("x" * 65, id="too-long"),
        pytest.param("x" * 5000, id="5000-bytes"),
        pytest.param("caf\u00e9", id="non-ascii"),
        pytest.param("a b", id="space"),
        pytest.param("a\x00b", id="nul"),
    ],
)
def test_bad_names_are_rejected(name: str) -> None:
    with pytest.raises(errors.InvalidName):
        validate_name("clone", name)


def test_catalog_write_is_atomic_json_and_leaves_no_temp_files(store: Store) -> None:
    store.create_clone("a", base="deb")
    data = json.loads(store.catalog_path.read_text())
    assert list(data["clones"]) == ["a"]
    assert list(store.tmp.iterdir()) == []


def test_failed_changes_leave_the_store_unchanged(store: Store) -> None:
    store.create_clone("a", base="deb")
    before = snapshot(store.path)
    with pytest.raises(errors.CloneExists):
        store.create_clone("a", base="deb")
    with pytest.raises(errors.BaseNotFound):
        store.create_clone("b", base="nope")
    with pytest.raises(errors.BaseInUse):
        store.remove_base("deb")
    with pytest.raises(errors.CloneNotFound):
        store.remove_clone("zz")
    assert snapshot(store.path) == before


def test_overlay_is_made_on_first_open_and_reset_replaces_it(store: Store) -> None:
    rec = store.create_clone("a", base="deb")
    assert store.clone_state(rec) is None  # nothing on disk until a server opens it
    first = store.start_overlay(rec, "1")
    second = store.reset_clone("a")
    assert second.version == "1" and second.overlay != first.overlay
    assert not store.overlay_path(rec, first).exists()
    assert store.overlay_path(rec, second).is_dir()


def test_creating_many_clones_is_one_catalog_write(store: Store) -> None:
    names = [f"vm{i}" for i in range(2000)]
    store.create_clones(names, base="deb")
    assert len(store.catalog().clones) == 2000
    with pytest.raises(errors.CloneExists):
        store.create_clones(["new1", "vm7"], base="deb")
    assert "new1" not in store.catalog().clones  # all or nothing


def _create_many(path: str, prefix: str) -> None:
    st = Store(path)
    for i in range(15):
        st.create_clone(f"{prefix}{i}", base="deb")


def test_clones_made_together_spread_evenly_over_the_slots_and_workers(store: Store) -> None:
    store.create_clones([f"b{i}" for i in range(31)], base="deb")
    store.create_clone("b31", base="deb")  # a later command continues the count
    cat = store.catalog()
    slots = [0] * SLOTS
    for i in range(32):
        slots[slot_of(cat, f"b{i}")] += 1
    assert slots == [2] * SLOTS
    for workers in (1, 2, 4, 8, 16):  # divisors of the slot count: an exact split
        loads = [0] * workers
        for i in range(32):
            loads[worker_of(cat, f"b{i}", workers)] += 1
        assert loads == [32 // workers] * workers, (workers, loads)
    for workers in (3, 5, 6, 7):  # otherwise some workers serve one slot more than others
        loads = [0] * workers
        for i in range(32):
            loads[worker_of(cat, f"b{i}", workers)] += 1
        assert max(loads) - min(loads) <= 32 // SLOTS, (workers, loads)
    # A clone from before creation numbers (and an unknown name) goes by its name's hash, the same everywhere.
    raw = json.loads(store.catalog_path.read_text())
    del raw["clones"]["b5"]["seq"], raw["xxh3"]  # as written before catalogs had checksums
    store.catalog_path.write_text(json.dumps(raw))
    old = store.catalog()
    assert old.clones["b5"].seq == -1
    assert worker_of(old, "b5", 4) in range(4)
    assert worker_of(old, "nosuch", 2) in (0, 1)


def test_concurrent_writers_lose_nothing(store: Store) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_create_many, args=(str(store.path), p)) for p in "abc"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len(Store(store.path).catalog().clones) == 45


def test_catalog_is_reread_when_another_process_changes_it(store: Store) -> None:
    other = Store(store.path)
    assert "x" not in store.catalog().clones
    other.create_clone("x", base="deb")
    assert "x" in store.catalog().clones


def test_gc_removes_what_commands_that_died_half_way_left(store: Store) -> None:
    """An import killed between making its base folder and committing, a clone rm killed before its folder
    went, an overlay a reset did not get to drop, a map of a version that was never committed."""
    store.create_clone("a", base="deb")
    store.reset_clone("a")
    before = snapshot(store.path)
    deb = store.get_base("deb")
    left = [
        store.path / "bases" / "0123456789abcdef0123456789abcdef",
        store.path / "clones" / "fedcba9876543210fedcba9876543210",
        store.clone_dir(store.get_clone("a")) / "0123456789ab",
        store.base_dir(deb) / "9.map",
    ]
    for path in left[:3]:
        path.mkdir()
    left[3].write_bytes(b"never committed")
    found = {path for path, _ in store.orphans(store.catalog())}
    assert found == set(left)
    removed, _ = store.gc()
    assert removed == [] and not any(path.exists() for path in left)
    assert snapshot(store.path) == before


def test_a_state_from_before_snapshots_keeps_its_writes_through_a_snapshot(store: Store) -> None:
    """States written before clones could change base name no base; a snapshot names it first, so a crash
    between its catalog write and its state switch cannot pair the old overlay with the new version."""
    from dataclasses import asdict, replace

    from nbdclone.store import lineage
    from nbdclone.store._sealed import seal_json
    from nbdclone.store.layout import write_atomic
    from nbdclone.store.registry import Registry

    store.create_clone("c", base="deb")
    registry = Registry(store)
    clone = registry.acquire("c")
    clone.pwrite(memoryview(b"\x5a" * 8192), 4096)
    clone.flush()
    expected = bytearray(clone.size)
    clone.pread_into(memoryview(expected), 0)
    registry.release("c")
    record = store.get_clone("c")
    state = store.clone_state(record)
    assert state is not None and state.base == store.get_base("deb").id
    legacy = {k: v for k, v in asdict(replace(state, base=None)).items() if k != "base"}
    write_atomic(store.state_path(record), seal_json(legacy), store.clone_dir(record))
    assert store.clone_state(record) == replace(state, base=None)

    lineage.snapshot(store, "c", "s1")
    assert store.clone_on(store.get_clone("c"))[0] != "deb"
    got = bytearray(len(expected))
    registry.acquire("c").pread_into(memoryview(got), 0)
    registry.close_all()
    assert got == expected
    assert store.version_users().get(("deb", "1")) is None  # the snapshot no longer needs deb@1


def test_the_lock_writes_again_a_mirror_another_process_left_behind_after_it_last_checked(tmp_path: Path) -> None:
    """The lock skips reading catalog.json and its mirror while neither was replaced since it found them
    equal; a mirror another process left behind (a stop between the two renames) is still written again."""
    st = Store(tmp_path / "s")
    st.create_clones(["a"], base=None, size=1 << 20)
    with st.lock():
        pass  # found equal: remembered
    assert st.mirror_path.read_bytes() == st.catalog_path.read_bytes()
    other = Store(tmp_path / "s")  # another process
    stale = other.mirror_path.read_text()
    other.create_clones(["b"], base=None, size=1 << 20)
    write_atomic(other.mirror_path, stale, other.tmp)  # as a stop between the two renames leaves it
    assert st.mirror_path.read_bytes() != st.catalog_path.read_bytes()
    with st.lock():
        pass
    assert st.mirror_path.read_bytes() == st.catalog_path.read_bytes()
    assert set(Store(tmp_path / "s").catalog().clones) == {"a", "b"}
