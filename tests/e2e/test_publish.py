"""Publishing a clone as a base version (the golden-image maintenance loop), through the real server."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers import Server, cli, large_files, make_image, pread_all, snapshot, wait_closed

MiB = 1 << 20
SIZE = 64 * MiB


@pytest.fixture
def gold(tmp_path: Path, store_path: Path) -> bytes:
    data = make_image(tmp_path / "gold.raw", SIZE, [(0, 16 * MiB), (40 * MiB, 8 * MiB)])
    cli("base", "import", "gold", str(tmp_path / "gold.raw"), store=store_path)
    return data


def _pack_bytes(store: Path) -> int:
    return os.stat(store / "chunks" / "pack").st_blocks * 512


def test_publish_stores_what_the_clone_changed_and_following_clones_move_to_it(
    server: Server, store_path: Path, gold: bytes
) -> None:
    cli("clone", "create", "maint", "web-1", "--base", "gold", store=store_path)
    h = server.connect("maint")
    model = bytearray(gold)
    for off, data in ((MiB + 7, b"\x5a" * 700_000), (30 * MiB, b"update!" * 40_000), (SIZE - 4096, b"\xee" * 4096)):
        h.pwrite(data, off)
        model[off : off + len(data)] = data
    h.zero(2 * MiB, 41 * MiB)  # a zeroed range over base data
    model[41 * MiB : 43 * MiB] = bytes(2 * MiB)
    h.flush()
    assert pread_all(h, SIZE) == model
    h.shutdown()
    wait_closed(store_path, "maint")

    before = _pack_bytes(store_path)
    out = cli("base", "publish", "gold", "--from", "maint", "--promote", store=store_path).stdout
    assert out.splitlines()[-1] == "2" and "current version 1 -> 2" in out, out
    grown = _pack_bytes(store_path) - before
    assert 0 < grown <= 2 * MiB, f"the store grew by {grown} bytes for about 1 MiB of changes"

    # web-1 follows gold (never opened): it reads the published contents at its next first connection.
    web = server.connect("web-1")
    assert pread_all(web, SIZE) == model
    web.shutdown()
    # The maintenance clone itself is unchanged, and a rollback is a flip back.
    again = server.connect("maint")
    assert pread_all(again, SIZE) == model
    again.shutdown()
    cli("clone", "create", "web-2", "--base", "gold@1", store=store_path)
    old = server.connect("web-2")
    assert pread_all(old, SIZE) == gold
    old.shutdown()


def test_publish_is_refused_while_the_clone_has_a_client(server: Server, store_path: Path, gold: bytes) -> None:
    cli("clone", "create", "busy", "--base", "gold", store=store_path)
    h = server.connect("busy")
    h.pwrite(b"in progress", 0)
    before = snapshot(store_path)
    proc = cli("base", "publish", "gold", "--from", "busy", store=store_path, check=False)
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1 and "disconnect its clients" in proc.stderr
    assert snapshot(store_path) == before
    h.shutdown()


def test_publishing_a_blank_clone_makes_a_new_base(server: Server, store_path: Path, gold: bytes) -> None:
    cli("clone", "create", "scratch", "--size", "8M", store=store_path)
    h = server.connect("scratch")
    h.pwrite(b"fresh base" * 1000, 3 * MiB)
    h.shutdown()
    wait_closed(store_path, "scratch")
    before = _pack_bytes(store_path)
    assert cli("base", "publish", "fresh", "--from", "scratch", store=store_path).stdout.splitlines()[-1] == "1"
    assert _pack_bytes(store_path) - before <= 64 * 1024  # one chunk
    cli("clone", "create", "child", "--base", "fresh", store=store_path)
    child = server.connect("child")
    expected = bytearray(8 * MiB)
    expected[3 * MiB : 3 * MiB + 10_000] = b"fresh base" * 1000
    assert pread_all(child, 8 * MiB) == expected
    child.shutdown()


def test_the_maintenance_loop_on_ext4(tmp_path: Path, server: Server, store_path: Path) -> None:
    """clone gold, change files in it (ext4 through nbdfuse and a loop device), publish --promote: the next
    clone to connect sees the new files, its file system checks clean, and the store grew by about the
    changed data, not by the disk's size."""
    from tests.e2e.test_ext4 import attached, mounted, run

    size = 256 * MiB
    image = tmp_path / "gold.raw"
    with open(image, "wb") as f:
        f.truncate(size)
    run("mkfs.ext4", "-q", "-F", "-L", "gold", str(image))
    cli("base", "import", "gold", str(image), store=store_path)
    cli("clone", "create", "maint", "desk-1", "--base", "gold", store=store_path)
    files = {f"etc/update{i}.bin": os.urandom(1_000_000 + i * 4097) for i in range(4)}  # ~4 MiB changed
    with attached(server.uri("maint"), tmp_path / "fuse") as dev, mounted(dev, tmp_path / "mnt") as root:
        (root / "etc").mkdir()
        for name, data in files.items():
            (root / name).write_bytes(data)
        run("sync")
    wait_closed(store_path, "maint")

    before = _pack_bytes(store_path)
    cli("base", "publish", "gold", "--from", "maint", "--promote", store=store_path)
    grown = _pack_bytes(store_path) - before
    assert 4 * MiB <= grown <= 12 * MiB, f"the store grew by {grown} bytes for 4 MiB of files on a 256 MiB disk"

    with attached(server.uri("desk-1"), tmp_path / "fuse2") as dev:
        fsck = subprocess.run(["e2fsck", "-fn", dev], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        with mounted(dev, tmp_path / "mnt2", "ro") as root:
            for name, data in files.items():
                assert (root / name).read_bytes() == data


def test_rename_keeps_the_writes_and_the_socket_and_is_refused_while_connected(
    server: Server, store_path: Path, gold: bytes
) -> None:
    cli("clone", "create", "old-name", "other", "--base", "gold", store=store_path)
    h = server.connect("old-name")
    h.pwrite(b"kept across the rename" * 100, 5 * MiB)
    before = snapshot(store_path)
    proc = cli("clone", "rename", "old-name", "new-name", store=store_path, check=False)
    assert proc.returncode != 0 and "disconnect its clients" in proc.stderr
    for bad in (("old-name", "other"), ("old-name", "../x"), ("nope", "x")):
        assert cli("clone", "rename", *bad, store=store_path, check=False).returncode != 0
    assert snapshot(store_path) == before
    old_uri = cli("uri", "old-name", store=store_path).stdout.strip()
    h.shutdown()
    wait_closed(store_path, "old-name")
    cli("clone", "rename", "old-name", "new-name", store=store_path)
    new_uri = cli("uri", "new-name", store=store_path).stdout.strip()
    assert new_uri == old_uri.replace("/old-name?", "/new-name?")  # same socket, new export name
    again = server.connect("new-name")
    assert again.pread(2200, 5 * MiB) == b"kept across the rename" * 100
    again.shutdown()
    assert cli("uri", "old-name", store=store_path, check=False).returncode != 0


def test_import_from_an_nbd_uri_streams_and_skips_holes(tmp_path: Path, store_path: Path) -> None:
    """Another NBD server's export (nbdkit's file plugin on a sparse image) imported by URI: the bytes are
    the export's, holes are not stored, and no file of the image's size appears anywhere meanwhile."""
    size = 96 * MiB
    data = make_image(tmp_path / "src.raw", size, [(0, 3 * MiB), (50 * MiB + 4096, 70_000)])
    sock = tmp_path / "src.sock"
    src = subprocess.Popen(
        ["nbdkit", "--foreground", "--exit-with-parent", "-r", "-U", str(sock), "file", str(tmp_path / "src.raw")]
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert src.poll() is None and time.monotonic() < deadline, "nbdkit did not start"
            time.sleep(0.02)
        temp_before = large_files(Path(tempfile.gettempdir()), MiB)
        out = cli("base", "import", "net", f"nbd+unix:///?socket={sock}", store=store_path).stdout
        assert out.splitlines()[-1] == "1", out
    finally:
        src.terminate()
        src.wait(30)
    big = set(large_files(Path(tempfile.gettempdir()), MiB)) - set(temp_before)
    assert not big, big
    assert not [p for p in (store_path / "tmp").iterdir()]
    stored = _pack_bytes(store_path)
    assert stored <= 4 * MiB + 3 * 64 * 1024, f"{stored} bytes stored for 3 MiB + 70 KB of data"
    cli("clone", "create", "from-net", "--base", "net", store=store_path)
    server = Server(store_path, tmp_path / "nbd.sock").start()
    try:
        h = server.connect("from-net")
        assert pread_all(h, size) == data
        h.shutdown()
    finally:
        server.stop()
    bad = cli("base", "import", "net2", f"nbd+unix:///?socket={tmp_path}/none.sock", store=store_path, check=False)
    assert bad.returncode != 0 and bad.stderr.count("\n") == 1 and "cannot read" in bad.stderr
