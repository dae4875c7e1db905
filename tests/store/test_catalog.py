from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from nbdclone import errors
from nbdclone.store.catalog import Store, validate_name
from nbdclone.store.images import import_base
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


def test_reset_gives_an_empty_overlay(store: Store) -> None:
    old = store.create_clone("a", base="deb")
    new = store.reset_clone("a")
    assert new.id != old.id
    assert not store.clone_path(old).exists()
    assert store.clone_path(new).is_dir()


def _create_many(path: str, prefix: str) -> None:
    st = Store(path)
    for i in range(15):
        st.create_clone(f"{prefix}{i}", base="deb")


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
