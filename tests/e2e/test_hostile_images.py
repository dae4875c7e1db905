"""Images are data from whoever handed them over: one that would make qemu read a host file, one that is
damaged, one whose backing chain loops, each is refused with one line, and nothing is added to the store.
Killed imports and exports leave nothing that `base gc` does not remove, and no helper process running."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nbdclone import errors
from nbdclone.store import Store, images
from nbdclone.store import inspect as inspect_module
from tests.helpers import NBDCLONE, Server, cli, make_image, pread_all, run_killed, snapshot, wait_gone

MiB = 1 << 20
SECRET = b"root:$6$not-for-guests$:19000:0:99999:7:::\n"


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    store = tmp_path / "store"
    make_image(tmp_path / "ok.raw", 4 * MiB, [(0, MiB)])
    cli("base", "import", "ok", str(tmp_path / "ok.raw"), store=store)
    return store


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "shadow"
    path.write_bytes(SECRET + bytes(65536 - len(SECRET)))
    return path


def _refused(store: Path, image: Path, message: str, *extra: str) -> None:
    before = snapshot(store)
    started = time.monotonic()
    proc = cli("base", "import", "evil", str(image), *extra, store=store, check=False, timeout=120)
    assert proc.returncode != 0, proc.stdout
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert time.monotonic() - started < 90
    assert snapshot(store) == before
    assert not list((store / "tmp").iterdir())


def test_a_backing_file_on_the_host_is_refused(tmp_path: Path, store: Path, secret: Path) -> None:
    image = tmp_path / "e.qcow2"
    qemu_img("create", "-f", "qcow2", "-F", "raw", "-b", str(secret), str(image), "64K")
    _refused(store, image, f"it reads {secret} (the backing file of e.qcow2)")


def test_an_external_data_file_is_refused(tmp_path: Path, store: Path, secret: Path) -> None:
    image = tmp_path / "d.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={secret},data_file_raw=on", str(image), "64K")
    _refused(store, image, f"it reads {secret} (the data file of d.qcow2)")


def test_a_backing_chain_that_loops_is_refused_in_bounded_time(tmp_path: Path, store: Path) -> None:
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    qemu_img("create", "-f", "qcow2", str(b), "1M")
    qemu_img("create", "-f", "qcow2", "-F", "qcow2", "-b", str(b), str(a), "1M")
    qemu_img("rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", str(a), str(b))  # b -> a -> b -> ...
    _refused(store, a, "it reads")
    _refused(store, a, "backing chain loops", "--allow-backing", str(a), "--allow-backing", str(b))


def test_a_truncated_qcow2_is_refused(tmp_path: Path, store: Path) -> None:
    raw = tmp_path / "full.raw"
    raw.write_bytes(random.Random(1).randbytes(8 * MiB))
    image = tmp_path / "t.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(image))
    os.truncate(image, image.stat().st_size // 2)
    _refused(store, image, "damaged")


def test_a_protocol_looking_name_is_only_a_file_name(tmp_path: Path, store: Path) -> None:
    before = snapshot(store)
    proc = cli("base", "import", "evil", 'json:{"driver":"file","filename":"/etc/passwd"}', store=store, check=False)
    assert proc.returncode != 0 and "does not exist" in proc.stderr and proc.stderr.count("\n") == 1
    assert snapshot(store) == before


def test_a_named_backing_file_is_read(tmp_path: Path, store: Path) -> None:
    backing = tmp_path / "golden.raw"
    content = make_image(backing, 4 * MiB, [(0, 4 * MiB)], seed=7)
    overlay = tmp_path / "child.qcow2"
    qemu_img("create", "-f", "qcow2", "-F", "raw", "-b", str(backing), str(overlay), "4M")
    qemu_img("convert", "-f", "raw", "-O", "raw", str(backing), str(tmp_path / "copy.raw"))
    cli("base", "import", "child", str(overlay), "--allow-backing", str(backing), store=store)
    cli("clone", "create", "c", "--base", "child", store=store)
    server = Server(store, tmp_path / "nbd.sock").start()
    try:
        h = server.connect("c")
        assert pread_all(h, 4 * MiB) == content
        h.shutdown()
    finally:
        server.stop()


# Links one of the images (argv[2:]) at argv[1] by rename, again and again, every 0-4 ms.
_SWAPPER = """
import os, random, sys, time
path, sources, rnd = sys.argv[1], sys.argv[2:], random.Random(2)
while True:
    os.link(rnd.choice(sources), path + ".next")
    os.rename(path + ".next", path)  # (a no-op if both name one file: then the spare name goes)
    if os.path.lexists(path + ".next"):
        os.unlink(path + ".next")
    time.sleep(rnd.random() * 0.004)
"""


def test_an_image_swapped_during_its_import_never_brings_in_another_file(
    tmp_path: Path, store: Path, secret: Path
) -> None:
    """The image's path is swapped, over and over while 100 imports run, between a clean qcow2 and ones that
    would read a host file (an external data file, a backing file): each import is of the clean image or
    refused in one line, and no byte of the host file reaches the store (the image is opened once: the
    checked descriptor is the one converted, its chain named at conversion)."""
    clean = tmp_path / "clean.qcow2"
    raw = tmp_path / "clean.raw"
    make_image(raw, 64 * 1024, [(0, 64 * 1024)], seed=5)
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(clean))
    evil = [tmp_path / "data.qcow2", tmp_path / "backing.qcow2"]
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={secret},data_file_raw=on", str(evil[0]), "64K")
    qemu_img("create", "-f", "qcow2", "-F", "raw", "-b", str(secret), str(evil[1]), "64K")
    path = tmp_path / "image.qcow2"
    os.link(clean, path)
    swapper = subprocess.Popen([sys.executable, "-c", _SWAPPER, str(path), str(clean), *map(str, evil)])
    st, done, refused = Store(store), 0, 0
    try:
        for _ in range(100):
            try:
                images.import_base(st, "swapped", path)
                done += 1
            except (errors.NotADiskImage, errors.InvalidArgument, errors.StorageError):
                refused += 1
    finally:
        swapper.kill()
        swapper.wait()
    assert SECRET not in (store / "chunks" / "pack").read_bytes()
    assert done + refused == 100 and done > 0 and refused > 0, (done, refused)


@pytest.mark.parametrize("step", ["info", "check", "convert"])
@pytest.mark.parametrize("evil", ["data file", "backing file"])
def test_an_image_swapped_right_after_each_check_is_not_read(
    tmp_path: Path, store: Path, secret: Path, monkeypatch: pytest.MonkeyPatch, step: str, evil: str
) -> None:
    """The swap at its worst moment: right after qemu-img info, after qemu-img check, after the conversion's
    arguments are made. The clean image is imported; nothing of the host file is."""
    raw, clean, bad, path = (tmp_path / n for n in ("clean.raw", "clean.qcow2", "bad.qcow2", "image.qcow2"))
    content = make_image(raw, 64 * 1024, [(0, 64 * 1024)], seed=5)
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(clean))
    if evil == "data file":
        qemu_img("create", "-f", "qcow2", "-o", f"data_file={secret},data_file_raw=on", str(bad), "64K")
    else:
        qemu_img("create", "-f", "qcow2", "-F", "raw", "-b", str(secret), str(bad), "64K")
    os.link(clean, path)
    swapped = []

    def after(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            result = fn(*args, **kwargs)
            if not swapped:
                os.link(bad, tmp_path / "next")
                os.rename(tmp_path / "next", path)
                swapped.append(True)
            return result

        return wrapper

    target = {
        "info": (inspect_module, "_info"),
        "check": (inspect_module, "_check"),
        "convert": (images, "convert_source"),
    }
    monkeypatch.setattr(*target[step], after(getattr(*target[step])))
    images.import_base(Store(store), "swapped", path)
    assert swapped
    assert SECRET not in (store / "chunks" / "pack").read_bytes()
    cli("clone", "create", "c", "--base", "swapped", store=store)
    got = bytearray(64 * 1024)
    images.open_clone_readonly(Store(store), "c").pread_into(memoryview(got), 0)
    assert got == content


def _records(store: Path) -> tuple[dict[str, str], object]:
    """The store's files and its catalog, less the catalog's generation (a `base rm` writes one more)."""
    files = {k: v for k, v in snapshot(store).items() if not k.startswith("catalog.")}
    return files, dataclasses.replace(Store(store).catalog(), generation=0)


@pytest.mark.parametrize("seed", range(3))
def test_killed_imports_and_exports_leave_nothing_gc_keeps(tmp_path: Path, store: Path, seed: int) -> None:
    rnd = random.Random(seed)
    raw = tmp_path / "big.raw"
    make_image(raw, 192 * MiB, [(0, 192 * MiB)], seed=seed)
    image = tmp_path / "big.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(image))
    cli("base", "import", "src", str(raw), store=store)
    cli("clone", "create", "c", "--base", "src", store=store)
    out = tmp_path / "out"
    out.mkdir()
    before = _records(store)
    for _ in range(3):  # each command's own work starts after the CLI's start-up (about 0.4 s here)
        run_killed(["base", "import", "big", str(image)], store, rnd.uniform(0.3, 1.2))
        run_killed(["clone", "export", "c", str(out / "c.qcow2"), "--format", "qcow2"], store, rnd.uniform(0.3, 1.2))
        run_killed(["clone", "export", "c", str(out / "c.raw")], store, rnd.uniform(0.3, 0.8))
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "a killed export left a file beside its target"
    left = list((store / "tmp").iterdir())
    if "big" in cli("base", "list", store=store).stdout:  # an import that ended before its kill
        cli("base", "rm", "big", store=store)
    if seed % 2:  # either cleans up
        cli("base", "gc", store=store)
    else:
        report = json.loads(cli("check", "--repair", "--json", store=store).stdout)
        assert {f["path"] for f in report["findings"]} == {str(p) for p in left} and report["clean"]
    assert not list((store / "tmp").iterdir()), f"a killed command's work file was kept (of {left})"
    assert _records(store) == before  # and nothing else changed
    assert cli("check", store=store).returncode == 0


def _stand_ins(pid: int) -> list[int]:
    """The children of `pid` running the stand-in (`sleep`)."""
    kids = [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]
    return [k for k in kids if Path(f"/proc/{k}/comm").read_text().strip() == "sleep"]


@pytest.mark.parametrize("command", ["import", "export"])
def test_a_killed_command_leaves_no_helper_even_one_waiting_for_it(tmp_path: Path, store: Path, command: str) -> None:
    """qemu-nbd exits when its client goes, but not before its client came: a CLI killed between starting
    it and connecting (or a helper stuck opening a file) must not leave it running. The stand-in here never
    reads its socket, so only the parent-death signal can end it."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "qemu-nbd").write_text("#!/bin/sh\nexec sleep 600\n")
    (fake / "qemu-nbd").chmod(0o755)
    image = tmp_path / "i.qcow2"
    qemu_img("create", "-f", "qcow2", str(image), "4M")
    cli("clone", "create", "c", "--base", "ok", store=store)
    target = str(tmp_path / "c.qcow2")
    args = (
        ["base", "import", "i", str(image)]
        if command == "import"
        else ["clone", "export", "c", target, "--format", "qcow2"]
    )
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}
    proc = subprocess.Popen(
        [NBDCLONE, *args, "--store", str(store)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    helpers: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and not (helpers := _stand_ins(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert helpers, "the command started no helper"
        proc.kill()
        proc.wait()
        wait_gone(helpers, timeout=10, kill=False)
    finally:
        proc.kill()
        proc.wait()
        wait_gone(helpers, timeout=0)  # a failed run still stops what it started
