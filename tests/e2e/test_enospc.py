"""A full disk is an error, not an outage: the store on a small file system is filled through one clone while
other clones read and write; the writer gets ENOSPC, every clone keeps reading exactly what was acknowledged,
no process dies, writes resume when space returns, the server starts again on a full disk (its sockets in the
store), a clone never connected before reads its base there and its writes get ENOSPC, and a clone can be
removed there to make room, after which that clone's writes go through."""

from __future__ import annotations

import errno
import os
import random
import time
from pathlib import Path

import nbd
import pytest

from tests.filesystems import LoopFs
from tests.helpers import Server, cli, make_image, pread_all

MiB = 1 << 20
SIZE = 16 * MiB
FILL = 4 * MiB  # per fill request


def _errno(exc: nbd.Error) -> int:
    code = exc.errno  # libnbd gives the symbolic name
    return int(getattr(errno, code)) if isinstance(code, str) else int(code or 0)


def _fill(h: nbd.NBD, model: bytearray, rnd: random.Random) -> int:
    """Write until the disk is full; return the errno the client got."""
    for i in range(len(model) // FILL):
        data = rnd.randbytes(FILL)
        try:
            h.pwrite(data, i * FILL)
        except nbd.Error as exc:
            return _errno(exc)
        model[i * FILL : (i + 1) * FILL] = data
    raise AssertionError("the disk never filled")


def _write_or_enospc(h: nbd.NBD, model: bytearray, data: bytes, off: int) -> bool:
    try:
        h.pwrite(data, off)
        h.flush()
    except nbd.Error as exc:
        assert _errno(exc) == errno.ENOSPC, exc
        return False
    model[off : off + len(data)] = data
    return True


def _use_up_inodes(folder: Path) -> None:
    """Create empty files until the file system has room for no more (XFS: no free inode left in its chunks)."""
    folder.mkdir()
    for i in range(10_000):
        try:
            (folder / str(i)).touch()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
            return
    raise AssertionError("10,000 new files fitted on the full disk")


def _workers(server: Server) -> list[int]:
    return [w["pid"] for w in server.info()["workers"]]


@pytest.mark.parametrize(("kind", "size"), [("ext4", 96 * MiB), ("xfs", 320 * MiB), ("btrfs", 160 * MiB)])
def test_a_full_disk_gives_enospc_and_loses_nothing(tmp_path: Path, kind: str, size: int) -> None:
    rnd = random.Random(1)
    base = make_image(tmp_path / "base.raw", SIZE, [(0, SIZE)], seed=3)
    fs = LoopFs(kind, tmp_path, size)
    server: Server | None = None
    try:
        store = fs.path / "store"
        cli("base", "import", "deb", str(tmp_path / "base.raw"), store=store)
        cli("clone", "create", "b", "c", "--base", "deb", store=store)
        cli("clone", "create", "filler", "--size", f"{2 * size // MiB}M", store=store)
        cli("clone", "create", "late", "--base", "deb", store=store)  # first connected on the full disk
        ballast = fs.path / "ballast"
        ballast.write_bytes(rnd.randbytes(24 * MiB))  # freed later, to give space back
        server = Server(store, tmp_path / "nbd.sock", args=("--workers", "2")).start()
        pids = _workers(server)
        models = {"b": bytearray(base), "c": bytearray(base), "filler": bytearray(2 * size)}
        b, c, filler = server.connect("b"), server.connect("c"), server.connect("filler")
        assert _write_or_enospc(b, models["b"], rnd.randbytes(MiB), 0)

        assert _fill(filler, models["filler"], rnd) == errno.ENOSPC
        _write_or_enospc(b, models["b"], rnd.randbytes(256 * 1024), 2 * MiB)  # may fail, must not corrupt
        _write_or_enospc(b, models["b"], rnd.randbytes(4096), 4096)  # a rewrite: fits where the bytes were
        for name, h in (("b", b), ("c", c), ("filler", filler)):
            try:
                got = pread_all(h, len(models[name]))
            except nbd.Error as exc:
                raise AssertionError(f"reading {name} on a full disk: {exc}") from exc
            assert got == models[name], f"{name} reads wrong bytes on a full disk"
        assert _workers(server) == pids, "a worker died on the full disk"
        assert server.proc is not None and server.proc.poll() is None

        ballast.unlink()  # space returns: writes resume (a clone that failed tries again every 2 s)
        deadline = time.monotonic() + 10
        while not _write_or_enospc(b, models["b"], rnd.randbytes(MiB), 8 * MiB):
            assert time.monotonic() < deadline, "writes did not resume"
            time.sleep(0.25)
        assert _write_or_enospc(c, models["c"], rnd.randbytes(MiB), 3 * MiB)
        for h in (b, c, filler):
            h.shutdown()

        filler = server.connect("filler")
        assert _fill(filler, models["filler"], rnd) == errno.ENOSPC
        filler.shutdown()
        server.stop()
        if kind == "xfs":  # (which makes inodes from free space; ext4 sets them aside at mkfs, btrfs keeps
            _use_up_inodes(fs.path / "inodes")  # metadata apart: 50,000 new files fit on a full one)
        # On a full disk, its sockets new files in the store (XFS needs room for their inodes).
        server = Server(store, store / "run" / "nbdclone.sock", args=("--workers", "2")).start()
        for name in models:
            h = server.connect(name)
            assert pread_all(h, len(models[name])) == models[name], f"{name} after a restart on a full disk"
            h.shutdown()
        late = server.connect("late")  # its overlay cannot be started: it reads its base, writes get ENOSPC
        models["late"] = bytearray(base)
        assert pread_all(late, SIZE) == base
        assert not _write_or_enospc(late, models["late"], rnd.randbytes(MiB), 0)

        # The commands that free space work on the full disk (E6: a catalog write needs a new file, which
        # XFS and btrfs refuse once full; the store's reserve makes room for it).
        free = os.statvfs(store).f_bfree
        removed = cli("clone", "rm", "c", store=store, check=False)
        assert removed.returncode == 0, removed.stderr
        del models["c"]
        deadline = time.monotonic() + 10  # XFS frees an unlinked file's blocks in the background
        while os.statvfs(store).f_bfree <= free:
            assert time.monotonic() < deadline, "clone rm freed nothing"
            time.sleep(0.2)
        deadline = time.monotonic() + 10  # the late clone's overlay starts (tried again every 2 s)
        while not _write_or_enospc(late, models["late"], rnd.randbytes(MiB), 0):
            assert time.monotonic() < deadline, "the late clone's writes did not resume"
            time.sleep(0.25)
        late.shutdown()
        for name in models:
            h = server.connect(name)
            assert pread_all(h, len(models[name])) == models[name], f"{name} after clone rm on a full disk"
            h.shutdown()
        assert cli("check", store=store).returncode == 0
    finally:
        if server is not None:
            server.stop()
        fs.close()
