"""Several connections per clone through the real server, on every kind of file system, across a clean
restart, a kill -9 of a worker and a kill -9 of the supervisor: every acknowledged write reads back.

Each connection (a libnbd handle on a thread of its own) works on its own range of the clone, so what the
clone holds afterwards is known exactly, while the connections' flushes, FUA writes, zeroes and trims
interleave with each other's first writes (multi-conn: the server advertises it).
"""

from __future__ import annotations

import os
import random
import signal
import threading
from pathlib import Path

import nbd
import pytest

from tests.filesystems import KINDS, mounted
from tests.helpers import Server, cli, make_image, pread_all

MiB = 1 << 20
SIZE = 8 * MiB
CONNECTIONS = 4
CLONES = ("s0", "s1")
BASE_DATA = [(0, 3 * MiB), (4 * MiB + 100, 2 * MiB)]


def _connection(uri: str, model: bytearray, lo: int, hi: int, seed: int, errors: list[BaseException]) -> None:
    rnd = random.Random(seed)
    h = nbd.NBD()
    try:
        h.connect_uri(uri)
        for _ in range(150):
            off = rnd.randrange(lo, hi - 1)
            n = min(rnd.choice([1, 511, 4096, 4096, 8192, 12288 + 7, 65536]), hi - off)
            kind = rnd.choice(["write", "write", "write", "fua", "zero", "trim", "flush"])
            if kind in ("write", "fua"):
                data = rnd.randbytes(n)
                h.pwrite(data, off, nbd.CMD_FLAG_FUA if kind == "fua" else 0)
                model[off : off + n] = data
            elif kind == "zero":
                h.zero(n, off)
                model[off : off + n] = bytes(n)
            elif kind == "trim":  # returns whole blocks to the base: trim only whole blocks of the range here
                start, end = -(-off // 4096) * 4096, (off + n) // 4096 * 4096
                if end > start:
                    h.trim(end - start, start)
                    model[start:end] = BASE[start:end]
            else:
                h.flush()
        h.shutdown()
    except BaseException as exc:  # reported by the test's thread
        errors.append(exc)


def _storm(server: Server, models: dict[str, bytearray], seed: int) -> None:
    errors: list[BaseException] = []
    threads = []
    span = SIZE // CONNECTIONS
    for c, name in enumerate(CLONES):
        uri = server.uri(name)
        for k in range(CONNECTIONS):
            args = (uri, models[name], k * span, (k + 1) * span, seed * 100 + c * 10 + k, errors)
            threads.append(threading.Thread(target=_connection, args=args))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def _verify(server: Server, models: dict[str, bytearray], when: str) -> None:
    for name in CLONES:
        h = server.connect(name)
        got = pread_all(h, SIZE)
        h.shutdown()
        if got != models[name]:
            want = models[name]
            bad = [b for b in range(SIZE // 4096) if got[b * 4096 : (b + 1) * 4096] != want[b * 4096 : (b + 1) * 4096]]
            raise AssertionError(f"{when}: clone {name} lost {len(bad)} acknowledged block(s), first {bad[:8]}")


BASE = b""


@pytest.mark.parametrize("kind", list(KINDS))
def test_connections_restarts_and_kills_keep_every_acknowledged_write(tmp_path: Path, kind: str) -> None:
    global BASE
    BASE = make_image(tmp_path / "base.raw", SIZE, BASE_DATA, seed=4)
    with mounted(kind, tmp_path) as fs:
        store = fs / "store"
        cli("base", "import", "deb", str(tmp_path / "base.raw"), store=store)
        cli("clone", "create", *CLONES, "--base", "deb", store=store)
        models = {name: bytearray(BASE) for name in CLONES}
        sock = tmp_path / "nbd.sock"
        server = Server(store, sock, args=("--workers", "2")).start()
        try:
            _storm(server, models, 1)
            _verify(server, models, "while running")
            assert server.stop() == 0
            server = Server(store, sock, args=("--workers", "2")).start()
            _verify(server, models, "after a clean restart")

            _storm(server, models, 2)
            worker = server.nbdkit_pid("s0")
            os.kill(worker, signal.SIGKILL)
            server.wait_restarted("s0", worker)
            _verify(server, models, "after kill -9 of a worker")

            _storm(server, models, 3)
            assert server.proc is not None
            workers = sorted(w["pid"] for w in server.info()["workers"])
            server.proc.send_signal(signal.SIGKILL)  # its workers serve on, and the next server adopts them
            server.proc.wait()
            server = Server(store, sock, args=("--workers", "2")).start()
            assert sorted(w["pid"] for w in server.info()["workers"]) == workers
            _verify(server, models, "after kill -9 of the supervisor")
        finally:
            server.stop()
