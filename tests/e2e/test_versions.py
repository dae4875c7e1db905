"""Base versions and pointer flips, end to end through the real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nbdclone.store.layout import CRASH_AT_ENV
from tests.helpers import NBDCLONE, Server, cli, pread_all, snapshot, wait_closed

MiB = 1 << 20
SIZE = 8 * MiB
BLOCK = 4096


def tagged_image(path: Path, tag: str, size: int = SIZE) -> bytes:
    """Every 4 KiB block says which version and block it is."""
    data = b"".join(f"{tag} block {i:08d}|".encode().ljust(BLOCK, b".") for i in range(size // BLOCK))
    path.write_bytes(data)
    return data


def versions_of(data: bytes) -> set[str]:
    return {data[i : i + 2].decode() for i in range(0, len(data), BLOCK) if data[i : i + 1] == b"v"}


@pytest.fixture
def images(tmp_path: Path) -> dict[str, bytes]:
    return {v: tagged_image(tmp_path / f"{v}.raw", v) for v in ("v1", "v2")}


def import_version(tmp_path: Path, store: Path, tag: str) -> str:
    return cli("base", "import", "os", str(tmp_path / f"{tag}.raw"), store=store).stdout.splitlines()[-1]


def test_live_flip_follow_pin_and_rollback(
    tmp_path: Path, server: Server, store_path: Path, images: dict[str, bytes]
) -> None:
    assert import_version(tmp_path, store_path, "v1") == "1"
    cli("clone", "create", "a", "--base", "os", store=store_path)
    cli("clone", "create", "b", "--base", "os@1", store=store_path)

    a = server.connect("a")
    b = server.connect("b")
    a.pwrite(b"A-WRITE!" * 512, 0)
    b.pwrite(b"B-WRITE!" * 512, 0)
    a.flush()
    b.flush()

    # A new version arrives and becomes current while both clones are connected.
    assert import_version(tmp_path, store_path, "v2") == "2"
    cli("base", "promote", "os", "2", store=store_path)
    listed = {c["name"]: c for c in json.loads(cli("clone", "list", "--json", store=store_path).stdout)["clones"]}
    assert listed["a"]["version"] == "1" and listed["a"]["move_pending"]
    assert listed["b"]["version"] == "1" and not listed["b"]["move_pending"]

    # A second connection to A joins the open clone: still version 1, with A's writes.
    a2 = server.connect("a")
    for h in (a, a2):
        data = pread_all(h, SIZE)
        assert data[:BLOCK] == b"A-WRITE!" * 512
        assert versions_of(data[BLOCK:]) == {"v1"}
    a.shutdown()
    a2.shutdown()

    # Once A has no connection left, its next connection reads version 2, and its old writes are gone.
    a = server.connect("a")
    assert pread_all(a, SIZE) == images["v2"]
    a.pwrite(b"A-ON-V2!" * 512, BLOCK)
    a.flush()
    a.shutdown()
    # The pinned clone stays on version 1 with its writes, even across reconnects.
    b.shutdown()
    b = server.connect("b")
    data = pread_all(b, SIZE)
    assert data[:BLOCK] == b"B-WRITE!" * 512 and data[BLOCK:] == images["v1"][BLOCK:]
    b.shutdown()

    # Rollback: the same flip, backwards.
    cli("base", "promote", "os", "1", store=store_path)
    a = server.connect("a")
    assert pread_all(a, SIZE) == images["v1"]
    a.shutdown()

    # A pinned clone moves only when told to.
    out = cli("clone", "upgrade", "b", "--to", "2", store=store_path).stdout
    assert "writes were dropped" in out
    b = server.connect("b")
    assert pread_all(b, SIZE) == images["v2"]
    b.shutdown()


def test_a_connected_clone_is_not_upgraded_under_its_clients(
    tmp_path: Path, server: Server, store_path: Path, images: dict[str, bytes]
) -> None:
    import_version(tmp_path, store_path, "v1")
    import_version(tmp_path, store_path, "v2")
    cli("clone", "create", "p", "--base", "os@1", store=store_path)
    h = server.connect("p")
    before = snapshot(store_path)
    proc = cli("clone", "upgrade", "p", store=store_path, check=False)
    assert proc.returncode != 0 and "is open on a running server" in proc.stderr
    assert snapshot(store_path) == before
    assert versions_of(pread_all(h, SIZE)) == {"v1"}
    h.shutdown()


@pytest.mark.parametrize("step", ["write", "fsync", "rename", "fsync-dir", "done"])
def test_promote_killed_at_any_step_leaves_old_or_new(
    step: str, tmp_path: Path, store_path: Path, images: dict[str, bytes]
) -> None:
    import_version(tmp_path, store_path, "v1")
    import_version(tmp_path, store_path, "v2")
    cli("clone", "create", "c", "--base", "os", store=store_path)
    proc = subprocess.run(
        [NBDCLONE, "base", "promote", "os", "2", "--store", str(store_path)],
        env={**os.environ, CRASH_AT_ENV: step},
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == -9, "the hook must kill promote at its step"
    bases = json.loads(cli("base", "list", "--json", store=store_path).stdout)["versions"]
    current = [b["version"] for b in bases if b["current"]]
    expected = ["1"] if step in ("write", "fsync", "rename") else ["2"]
    assert current == expected
    srv = Server(store_path, tmp_path / "s.sock").start()
    try:
        h = srv.connect("c")
        assert pread_all(h, SIZE) == images["v" + expected[0]]
        h.shutdown()
    finally:
        srv.stop()


def test_gc_and_rm_free_space_and_keep_every_clone_intact(
    tmp_path: Path, server: Server, store_path: Path, images: dict[str, bytes]
) -> None:
    for tag in ("v1", "v2"):
        import_version(tmp_path, store_path, tag)
    tagged_image(tmp_path / "v3.raw", "v3")
    import_version(tmp_path, store_path, "v3")
    cli("base", "promote", "os", "3", store=store_path)
    cli("clone", "create", "pinned", "--base", "os@2", store=store_path)
    cli("clone", "create", "follower", "--base", "os", store=store_path)
    h = server.connect("pinned")
    h.pwrite(b"mine" * 1024, 3 * BLOCK)
    h.flush()
    h.shutdown()
    expected = {}
    for name in ("pinned", "follower"):
        h = server.connect(name)
        expected[name] = pread_all(h, SIZE)
        h.shutdown()
    wait_closed(store_path, "pinned", "follower")
    before = snapshot(store_path)
    for ref, why in (("os@2", "pinned use it"), ("os@3", "current version")):
        proc = cli("base", "rm", ref, store=store_path, check=False)
        assert proc.returncode != 0 and why in proc.stderr
    assert snapshot(store_path) == before

    pack = store_path / "chunks" / "pack"
    allocated = os.stat(pack).st_blocks * 512
    out = cli("base", "gc", store=store_path).stdout
    assert "os@1" in out and "os@2" not in out and "os@3" not in out
    assert os.stat(pack).st_blocks * 512 <= allocated - SIZE + 64 * 1024  # v1's chunks were freed
    versions = [b["version"] for b in json.loads(cli("base", "list", "--json", store=store_path).stdout)["versions"]]
    assert versions == ["2", "3"]
    for name, data in expected.items():
        h = server.connect(name)
        assert pread_all(h, SIZE) == data
        h.shutdown()


def test_flip_is_constant_work_whatever_the_number_of_clones(
    tmp_path: Path, store_path: Path, images: dict[str, bytes]
) -> None:
    """A flip writes one small pointer file: with 5,000 clones, no clone's file and not the catalog."""
    import_version(tmp_path, store_path, "v1")
    import_version(tmp_path, store_path, "v2")
    code = (
        "import sys; from nbdclone.store import Store;"
        "Store(sys.argv[1]).create_clones([f'c{i}' for i in range(5000)], base='os')"
    )
    subprocess.run([sys.executable, "-c", code, str(store_path)], check=True)
    before = {p: p.stat().st_mtime_ns for p in store_path.rglob("*") if p.is_file()}
    cli("base", "promote", "os", "2", store=store_path)
    after = {p: p.stat().st_mtime_ns for p in store_path.rglob("*") if p.is_file()}
    changed = sorted(str(p.relative_to(store_path)) for p in after if before.get(p) != after[p])
    assert len(changed) == 1 and changed[0].endswith("/current"), changed


def test_boot_trace_stats_and_warm_through_the_server(
    tmp_path: Path, server: Server, store_path: Path, images: dict[str, bytes]
) -> None:
    import_version(tmp_path, store_path, "v1")
    cli("clone", "create", "first", "second", "--base", "os", store=store_path)
    proc = cli("base", "warm", "os", store=store_path, check=False)
    assert proc.returncode != 0 and "no boot trace yet" in proc.stderr
    h = server.connect("first")  # the first boot of os@1 is recorded...
    for off in range(0, 2 * MiB, 64 * 1024):
        h.pread(4096, off)
    h.shutdown()  # ...and written when the version closes
    out = cli("base", "warm", "os", store=store_path).stdout
    assert "warmed os@1: 2.0 MiB" in out  # 32 chunks of 64 KiB
    h = server.connect("second")
    assert pread_all(h, SIZE) == images["v1"]
    h.shutdown()
    deadline = time.monotonic() + 10
    while True:  # workers publish their counters every second
        stats = json.loads(cli("stats", "--json", store=store_path).stdout)["cache"]
        if stats["hits"] + stats["misses"] >= 32 + SIZE // MiB or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert stats["hits"] + stats["misses"] >= 32 + SIZE // MiB  # one lookup per request to the base
    assert stats["prefetched_bytes"] >= 2 * MiB  # the second clone's connect prefetched the trace
    assert 0 < stats["resident_bytes"] <= stats["limit"]
    table = cli("stats", store=store_path).stdout
    assert "hits" in table and "WORKER" in table
