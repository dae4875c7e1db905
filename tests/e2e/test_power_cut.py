"""Real power cuts: the store on loop-mounted ext4 and XFS, shut down without a log flush (`xfs_io -x -c
shutdown`) while two clones take writes and flushes on several connections, a promote runs and a clone is
created; then mounted again (the journal replays) and served again.

Checked, block by block, against a history of what was written: a block reads the content it had when the
last flush that completed began, or one written after (never zeros nobody wrote, never an older content);
the store opens and its catalog is whole (each command before the cut is either done or not); and a second
cut right after the first recovery changes nothing.
"""

from __future__ import annotations

import itertools
import json
import random
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
        listed = json.loads(cli("clone", "list", "--json", store=store).stdout)
        names = {c["name"] for c in listed}
        assert set(CLONES) <= names and names <= {*CLONES, "c"}
        bases = json.loads(cli("base", "list", "--json", store=store).stdout)
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
