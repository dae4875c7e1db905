"""Real power cuts: the store on loop-mounted ext4 and XFS, shut down without a log flush (`xfs_io -x -c
shutdown`) while two clones take writes and flushes on several connections, a promote runs and a clone is
created; then mounted again (the journal replays) and served again.

Checked, block by block, against a history of what was written: a block reads the content it had when the
last flush that completed began, or one written after (never zeros nobody wrote, never an older content);
the store opens and its catalog is whole (each command before the cut is either done or not); and a second
cut right after the first recovery changes nothing. And the power cut in the middle of store commands: base
imports (a new version, a new base), clone reset, clone rm and gc, five at once.
"""

from __future__ import annotations

import itertools
import json
import random
import re
import subprocess
import threading
import time
from pathlib import Path

import nbd
import pytest

from tests.filesystems import LoopFs
from tests.helpers import NBDCLONE, Server, cli, make_image, pread_all, wait_gone

BS = 4096
SIZE = 8 << 20
NBLOCKS = SIZE // BS
CLONES = ("a", "b")
_seq = itertools.count(1)
NEVER = 1 << 62


class History:
    """Per block, every content it was given (with when its write was acknowledged) since the start."""

    def __init__(self, base: bytes) -> None:
        self.blocks = [[(0, base[b * BS : (b + 1) * BS])] for b in range(NBLOCKS)]
        self.floor = 0  # the start of the last completed flush
        self.lock = threading.Lock()

    def allowed(self, b: int) -> list[bytes]:
        hist = self.blocks[b]
        at = max((i for i, (acked, _) in enumerate(hist) if acked < self.floor), default=0)
        return [content for _, content in hist[at:]]


def _writer(h: nbd.NBD, history: History, seed: int, stop: threading.Event) -> None:
    rnd = random.Random(seed)
    try:
        while not stop.is_set():
            b = rnd.randrange(NBLOCKS - 4)
            n = rnd.choice([1, 1, 2, 4])
            zero = rnd.random() < 0.1
            contents = [bytes(BS) if zero else rnd.randbytes(BS) for _ in range(n)]
            entries = [[NEVER, c] for c in contents]  # in flight: may or may not land
            with history.lock:
                for k, entry in enumerate(entries):
                    history.blocks[b + k].append(entry)  # type: ignore[arg-type]
            if zero:
                h.zero(n * BS, b * BS)
            else:
                h.pwrite(b"".join(contents), b * BS)
            acked = next(_seq)
            with history.lock:
                for entry in entries:
                    entry[0] = acked
    except nbd.Error:
        return  # the file system went away under the server


def _flusher(h: nbd.NBD, history: History, stop: threading.Event) -> None:
    try:
        while not stop.is_set():
            start = next(_seq)
            h.flush()  # another connection's flush covers every write acknowledged before it (multi-conn)
            with history.lock:
                history.floor = max(history.floor, start)
            time.sleep(0.005)
    except nbd.Error:
        return


def _stop(server: Server, workers: list[int]) -> None:
    """Stop a server whose store just failed under it: ask, then kill; wait until its `workers` are gone."""
    server.stop()
    wait_gone(workers)


def _check(server: Server, histories: dict[str, History], when: str) -> dict[str, bytes]:
    now = {}
    for name in CLONES:
        h = server.connect(name)
        got = pread_all(h, SIZE)
        h.shutdown()
        for b in range(NBLOCKS):
            block = got[b * BS : (b + 1) * BS]
            allowed = histories[name].allowed(b)
            assert block in allowed, f"{when}: clone {name} block {b} reads neither its flushed nor a later content"
        now[name] = got
    return now


@pytest.mark.parametrize("kind", ["ext4", "xfs"])
def test_power_cut_in_the_middle_of_writes_a_promote_and_a_create(tmp_path: Path, kind: str) -> None:
    v1 = make_image(tmp_path / "v1.raw", SIZE, [(0, SIZE)], seed=1)
    make_image(tmp_path / "v2.raw", SIZE, [(0, SIZE)], seed=2)
    fs = LoopFs(kind, tmp_path)
    server: Server | None = None
    try:
        store = fs.path / "store"
        cli("base", "import", "deb", str(tmp_path / "v1.raw"), store=store)
        cli("base", "import", "deb", str(tmp_path / "v2.raw"), store=store)
        cli("clone", "create", *CLONES, "--base", "deb", store=store)
        sock = tmp_path / "nbd.sock"
        server = Server(store, sock).start()
        histories = {name: History(v1) for name in CLONES}
        stop = threading.Event()
        handles, threads = [], []
        for i, name in enumerate(CLONES):
            writer, flusher = server.connect(name), server.connect(name)
            handles += [writer, flusher]
            threads.append(threading.Thread(target=_writer, args=(writer, histories[name], i, stop)))
            threads.append(threading.Thread(target=_flusher, args=(flusher, histories[name], stop)))
        for t in threads:
            t.start()
        time.sleep(1.0)
        commands = [
            subprocess.Popen([NBDCLONE, *args, "--store", str(store)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for args in (["base", "promote", "deb", "2"], ["clone", "create", "c", "--base", "deb"])
        ]
        workers = [w["pid"] for w in server.info()["workers"]]  # the store cannot be read after the cut
        fs.cut_power()
        stop.set()
        for t in threads:
            t.join()
        for cmd in commands:
            cmd.communicate(timeout=60)
        assert all(hist.floor for hist in histories.values()), "no flush completed before the cut"
        _stop(server, workers)
        server = None
        fs.remount()

        server = Server(store, sock).start()
        now = _check(server, histories, "after the power cut")
        listed = json.loads(cli("clone", "list", "--json", store=store).stdout)["clones"]
        names = {c["name"] for c in listed}
        assert set(CLONES) <= names and names <= {*CLONES, "c"}
        bases = json.loads(cli("base", "list", "--json", store=store).stdout)["versions"]
        current = {v["version"] for v in bases if v["current"]}
        assert current in ({"1"}, {"2"})
        if "c" in names:  # created before the cut: it is whole and serves its version
            h = server.connect("c")
            assert pread_all(h, SIZE) == (v1 if current == {"1"} else (tmp_path / "v2.raw").read_bytes())
            h.shutdown()

        workers = [w["pid"] for w in server.info()["workers"]]
        fs.cut_power()  # again, with nothing written since the recovery: nothing may change
        _stop(server, workers)
        server = None
        fs.remount()
        server = Server(store, sock).start()
        for name in CLONES:
            h = server.connect(name)
            assert pread_all(h, SIZE) == now[name], f"clone {name} changed across a second cut"
            h.shutdown()
    finally:
        if server is not None:
            server.stop()
        fs.close()


BIG = 64 << 20  # images large enough that the commands are still at work when the power goes


def _read_clone(server: Server, name: str, size: int) -> bytes:
    h = server.connect(name)
    try:
        return pread_all(h, size)
    finally:
        h.shutdown()


@pytest.mark.parametrize(("kind", "exited"), [("ext4", 1), ("ext4", 3), ("xfs", 1), ("xfs", 2)])
def test_power_cut_during_imports_resets_removals_and_gc(tmp_path: Path, kind: str, exited: int) -> None:
    """Five store commands run at once (a new version, a new base, a reset, a clone rm, a gc that frees
    chunks) and the power goes as soon as `exited` of them have ended: the others are at work. A command
    that reported success is done; any other is done or not, never half; every clone reads exactly what it
    should; the store takes new work."""
    v1 = make_image(tmp_path / "v1.raw", BIG, [(0, BIG)], seed=1)
    make_image(tmp_path / "v2.raw", BIG, [(0, BIG)], seed=2)
    v3 = make_image(tmp_path / "v3.raw", BIG, [(0, BIG // 2)], seed=3)
    other = make_image(tmp_path / "other.raw", BIG, [(BIG // 4, BIG // 2)], seed=4)
    fs = LoopFs(kind, tmp_path)
    server: Server | None = None
    sock = tmp_path / "nbd.sock"
    try:
        store = fs.path / "store"
        cli("base", "import", "deb", str(tmp_path / "v1.raw"), store=store)
        cli("base", "import", "deb", str(tmp_path / "v2.raw"), store=store)  # deb@2: not current, unused
        cli("clone", "create", "keep", "resetme", "rmme", "--base", "deb", store=store)
        expected = {}
        server = Server(store, sock).start()
        rnd = random.Random(exited)
        for name in ("keep", "resetme", "rmme"):
            content = bytearray(v1)
            h = server.connect(name)
            for _ in range(64):
                off = rnd.randrange(BIG // BS) * BS
                data = rnd.randbytes(BS)
                h.pwrite(data, off)
                content[off : off + BS] = data
            h.flush()
            h.shutdown()
            expected[name] = bytes(content)
        server.stop()
        server = None

        argv = {
            "import": ["base", "import", "deb", str(tmp_path / "v3.raw")],
            "import-new": ["base", "import", "other", str(tmp_path / "other.raw")],
            "reset": ["clone", "reset", "resetme"],
            "rm": ["clone", "rm", "rmme"],
            "gc": ["base", "gc"],
        }
        procs = {
            what: subprocess.Popen(
                [NBDCLONE, *args, "--store", str(store)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            for what, args in argv.items()
        }
        deadline = time.monotonic() + 120
        while sum(p.poll() is not None for p in procs.values()) < exited and time.monotonic() < deadline:
            time.sleep(0.002)
        fs.cut_power()
        reported = {what for what, p in procs.items() if p.poll() == 0}  # an exit status seen before the cut
        for p in procs.values():
            p.communicate(timeout=60)
        fs.remount()

        clones = {c["name"] for c in json.loads(cli("clone", "list", "--json", store=store).stdout)["clones"]}
        listed = json.loads(cli("base", "list", "--json", store=store).stdout)["versions"]
        versions = {(v["base"], v["version"]) for v in listed}
        assert "keep" in clones and "resetme" in clones and ("deb", "1") in versions
        # The store takes new work. A gc may have removed deb@3 after its import (it is not current and
        # no clone uses it); the next import's version number says whether deb@3 was ever committed.
        reimport = cli("base", "import", "deb", str(tmp_path / "v2.raw"), store=store).stdout
        assert re.search(r"\bdeb@[34]\b", reimport), reimport
        done = {
            "import": "deb@4" in reimport,
            "import-new": ("other", "1") in versions,
            "rm": "rmme" not in clones,
            "gc": ("deb", "2") not in versions,
        }
        for what, is_done in done.items():
            assert is_done or what not in reported, f"'{' '.join(argv[what])}' reported success, then was undone"
        if ("deb", "3") in versions:
            cli("clone", "create", "chk3", "--base", "deb@3", store=store)
        if done["import-new"]:
            cli("clone", "create", "chk-other", "--base", "other", store=store)

        server = Server(store, sock).start()
        assert _read_clone(server, "keep", BIG) == expected["keep"]
        after_reset = _read_clone(server, "resetme", BIG)
        assert after_reset in (expected["resetme"], v1), "a reset left a clone half reset"
        assert after_reset == v1 or "reset" not in reported, "'clone reset' reported success, then was undone"
        if not done["rm"]:
            assert _read_clone(server, "rmme", BIG) == expected["rmme"]
        if ("deb", "3") in versions:
            assert _read_clone(server, "chk3", BIG) == v3
        if done["import-new"]:
            assert _read_clone(server, "chk-other", BIG) == other
        server.stop()
        server = None

        # A gc after the cut, and everything that was there reads the same.
        cli("base", "gc", store=store)
        cli("clone", "create", "fresh", "--base", "deb", store=store)
        server = Server(store, sock).start()
        assert _read_clone(server, "keep", BIG) == expected["keep"]
        assert _read_clone(server, "fresh", BIG) == v1
    finally:
        if server is not None:
            server.stop()
        fs.close()
