"""A real ext4 filesystem on a clone: made and mounted through nbdfuse and a loop device."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Server, cli

MiB = 1 << 20


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=True)


@contextlib.contextmanager
def attached(uri: str, where: Path, *, readonly: bool = False) -> Iterator[str]:
    """The NBD export as a loop device: nbdfuse presents it as a file, losetup makes it a block device."""
    where.mkdir(exist_ok=True)
    pidfile = where.parent / f"{where.name}.pid"
    pidfile.unlink(missing_ok=True)
    fuse = subprocess.Popen(["nbdfuse", *(["-r"] if readonly else []), "-P", str(pidfile), str(where), uri])
    loop = None
    try:
        deadline = time.monotonic() + 30
        while not pidfile.exists():  # nbdfuse writes its pidfile once it serves
            assert fuse.poll() is None, "nbdfuse exited"
            assert time.monotonic() < deadline, "nbdfuse did not become ready"
            time.sleep(0.02)
        loop = run("losetup", "--find", "--show", *(["-r"] if readonly else []), str(where / "nbd")).stdout.strip()
        yield loop
    finally:
        if loop:
            subprocess.run(["losetup", "-d", loop], check=False)
        subprocess.run(["fusermount3", "-u", str(where)], check=False)
        try:
            fuse.wait(30)
        except subprocess.TimeoutExpired:
            fuse.kill()
            fuse.wait()


@contextlib.contextmanager
def mounted(device: str, where: Path, *options: str) -> Iterator[Path]:
    where.mkdir(exist_ok=True)
    run("mount", *(["-o", ",".join(options)] if options else []), device, str(where))
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


@pytest.fixture(scope="module", autouse=True)
def _needs_root_and_fuse() -> None:
    # Not a skip: this test must run in CI, which is root with /dev/fuse. Say plainly what is missing.
    assert os.geteuid() == 0, "the ext4 test needs root (losetup, mount)"
    assert Path("/dev/fuse").exists(), "the ext4 test needs /dev/fuse"


def test_ext4_on_a_clone_survives_restart_and_stays_in_its_clone(
    tmp_path: Path, server: Server, store_path: Path
) -> None:
    base = tmp_path / "blank.raw"
    with open(base, "wb") as f:
        f.truncate(128 * MiB)
    cli("base", "import", "blank", str(base), store=store_path)
    cli("clone", "create", "fs1", "--base", "blank", store=store_path)
    cli("clone", "create", "fs2", "--base", "blank", store=store_path)
    files = {f"file{i}.bin": hashlib.shake_256(str(i).encode()).digest(300_000 + i * 4097) for i in range(5)}

    with attached(server.uri("fs1"), tmp_path / "fuse") as dev:
        run("mkfs.ext4", "-q", "-F", "-L", "clone1", dev)
        with mounted(dev, tmp_path / "mnt") as mnt:
            for name, data in files.items():
                (mnt / name).write_bytes(data)
            (mnt / "dir").mkdir()
            (mnt / "dir" / "hello").write_text("hello from clone fs1\n")

    server.stop()
    restarted = Server(store_path, server.socket).start()
    try:
        with attached(restarted.uri("fs1"), tmp_path / "fuse", readonly=True) as dev:
            fsck = subprocess.run(["e2fsck", "-fn", dev], capture_output=True, text=True, check=False)
            assert fsck.returncode == 0, fsck.stdout + fsck.stderr
            with mounted(dev, tmp_path / "mnt", "ro") as mnt:
                for name, data in files.items():
                    assert (mnt / name).read_bytes() == data
                assert (mnt / "dir" / "hello").read_text() == "hello from clone fs1\n"
        with attached(restarted.uri("fs2"), tmp_path / "fuse2", readonly=True) as dev:
            probe = subprocess.run(["blkid", "-p", dev], capture_output=True, text=True, check=False)
            assert "ext4" not in probe.stdout, "the second clone must not see the first clone's filesystem"
            assert _read(dev, 1080, 2) != b"\x53\xef"  # no ext4 superblock magic
    finally:
        restarted.stop()


def _read(device: str, offset: int, length: int) -> bytes:
    with open(device, "rb") as f:
        f.seek(offset)
        return f.read(length)
