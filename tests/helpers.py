"""Shared test helpers: images, a real nbdclone server, store snapshots."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbd

from nbdclone.runtime import Address
from nbdclone.store import Store
from nbdclone.store.catalog import worker_of
from nbdclone.supervisor.server import uri_of

VENV_BIN = Path(sys.executable).parent
NBDCLONE = str(VENV_BIN / "nbdclone")
ROOT = Path(__file__).resolve().parent.parent
PLUGIN = ROOT / "plugins" / "nbdclone.py"  # what a user runs with nbdkit by hand


def make_image(path: Path, size: int, data_ranges: list[tuple[int, int]], seed: int = 1) -> bytes:
    """A sparse raw image of `size` bytes, with pseudo-random data in `data_ranges` and holes elsewhere.
    Returns its full contents, the model for tests."""
    content = bytearray(size)
    rnd = hashlib.shake_256(f"seed{seed}".encode())
    stream = rnd.digest(sum(n for _, n in data_ranges))
    pos = 0
    with open(path, "wb") as f:
        f.truncate(size)
        for off, n in data_ranges:
            content[off : off + n] = stream[pos : pos + n]
            f.seek(off)
            f.write(stream[pos : pos + n])
            pos += n
    return bytes(content)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def large_files(folder: Path, size: int) -> list[tuple[str, int]]:
    """The regular files directly in `folder` of `size` bytes or more, apparent or allocated, as (path, bytes).
    Only files are stat'ed: the shared temp folder also holds other tests' mount points, and a file system
    a test shut down answers EIO."""
    found = []
    with contextlib.suppress(FileNotFoundError), os.scandir(folder) as entries:
        for entry in entries:
            if not entry.is_file(follow_symlinks=False):  # the type readdir gave: no stat
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if max(st.st_size, st.st_blocks * 512) >= size:
                found.append((entry.path, st.st_size))
    return found


def snapshot(store: Path) -> dict[str, str]:
    """Every file under the store with its checksum: to show a failed command changed nothing. Left out: the
    locks and what a running server keeps changing by itself (run/: counters, cache access bits; boot traces)."""
    out = {}
    for p in sorted(store.rglob("*")):
        rel = p.relative_to(store)
        if rel.parts[0] == "run" or p.name == "lock" or ".trace" in p.name:  # traces and their temp files
            continue
        if p.is_file():
            out[str(p.relative_to(store))] = sha256(p)
        elif p.is_dir():
            out[str(p.relative_to(store)) + "/"] = "dir"
    return out


def wait_closed(store: Path, *names: str, timeout: float = 30) -> None:
    """Wait until the server has closed these clones: a client's disconnect returns before the server
    closes the clone, and closing writes to the clone's overlay."""
    catalog = Store(store)
    deadline = time.monotonic() + timeout
    while any(catalog.is_open(catalog.get_clone(name)) for name in names):
        assert time.monotonic() < deadline, f"the server did not close {names}"
        time.sleep(0.02)


def cli(*args: str, store: Path, check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [NBDCLONE, *args, "--store", str(store)],
        capture_output=True,
        text=True,
        check=False,
        **kw,  # type: ignore[call-overload]
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"nbdclone {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc


@dataclass
class Server:
    """`nbdclone serve` as a real process, started and stopped by PID."""

    store: Path
    socket: Path
    args: tuple[str, ...] = ()
    proc: subprocess.Popen[str] | None = None
    log: list[str] = field(default_factory=list)
    _drain: threading.Thread | None = field(default=None, repr=False)

    def start(self) -> Server:
        self.proc = subprocess.Popen(
            [NBDCLONE, "serve", "--store", str(self.store), *self._where(), *self.args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # the ready line, no sleeps
            self.log.append(line)
            if line.startswith("nbdclone: serving"):
                break
        else:
            raise AssertionError("server exited before it was ready:\n" + "".join(self.log))
        # Read the log from now on too: a full pipe would block the server (and its workers) at their next
        # line, as it did after ~800 connections of a memory probe.
        self._drain = threading.Thread(target=self.log.extend, args=(self.proc.stdout,), daemon=True)
        self._drain.start()
        return self

    def _where(self) -> list[str]:
        return [] if {"--listen", "--socket"} & set(self.args) else ["--socket", str(self.socket)]

    def info(self) -> dict[str, Any]:
        return Store(self.store).server_info()

    def uri(self, name: str) -> str:
        return uri_of(self.info(), Store(self.store).catalog(), name)

    def nbdkit_pid(self, name: str) -> int:
        """The worker (nbdkit process) that serves clone `name`."""
        workers = self.info()["workers"]
        return int(workers[worker_of(Store(self.store).catalog(), name, len(workers))]["pid"])

    def wait_restarted(self, name: str, dead: int, timeout: float = 30) -> None:
        """Wait until the supervisor has replaced worker `dead`, which served clone `name`."""
        deadline = time.monotonic() + timeout
        while self.nbdkit_pid(name) == dead:
            assert time.monotonic() < deadline, f"worker {dead} was not restarted"
            time.sleep(0.05)

    def sockets(self) -> list[Path]:
        """Each worker's first slot's socket."""
        address = Address.from_json(self.store, self.info()["address"])
        return [address.socket_path(w["slots"][0]) for w in self.info()["workers"]]

    def connect(self, name: str) -> nbd.NBD:
        h = nbd.NBD()
        h.add_meta_context("base:allocation")
        h.connect_uri(self.uri(name))
        return h

    def stop(self) -> int:
        """SIGTERM, and wait; past 30 s kill it and its workers (orphaned workers would serve on, waiting
        for a server to adopt them)."""
        assert self.proc is not None
        workers: list[int] = []
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                workers = [w["pid"] for w in self.info()["workers"] if w["pid"]]
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._drain is not None:
            self._drain.join(30)
        wait_gone(workers)
        return self.proc.returncode


def free_ports(n: int = 16) -> int:
    """The first of `n` consecutive free TCP ports on 127.0.0.1 (a server's slots). Each pytest-xdist
    worker draws from its own range, above the fleet engines' fixed ports (23791, 16789)."""
    import random
    import socket

    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    low = 30000 + (worker % 4) * 7500
    for _ in range(200):
        first = random.randrange(low, low + 7500 - n)
        held = []
        try:
            for port in range(first, first + n):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise AssertionError("no free port range")


def run_killed(args: list[str], store: Path, delay: float) -> int:
    """Run `nbdclone ARGS`, kill -9 it after `delay` seconds (if still running); its exit status."""
    proc = subprocess.Popen([NBDCLONE, *args, "--store", str(store)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(delay)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    return proc.returncode


def _running(pid: int) -> bool:
    """The process exists and has not ended (a zombie waiting for its parent to reap it has ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def wait_gone(pids: list[int], timeout: float = 15, *, kill: bool = True) -> None:
    """Wait until each process has ended; past `timeout`, kill it (or fail, if not `kill`)."""
    for pid in pids:
        deadline = time.monotonic() + timeout
        while _running(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if _running(pid):
            assert kill, f"process {pid} did not end: {Path(f'/proc/{pid}/stat').read_text()!r}"
            os.kill(pid, signal.SIGKILL)
            while _running(pid):
                time.sleep(0.02)


def pread_all(h: nbd.NBD, size: int, chunk: int = 1 << 20) -> bytes:
    return b"".join(h.pread(min(chunk, size - off), off) for off in range(0, size, chunk))


def extents(h: nbd.NBD, size: int) -> list[tuple[int, int, int]]:
    """All base:allocation extents as (offset, length, flags)."""
    out: list[tuple[int, int, int]] = []
    off = 0
    while off < size:
        got: list[int] = []

        def cb(meta: str, o: int, entries: list[int], err: int, got: list[int] = got) -> int:
            if meta == "base:allocation":
                got.extend(entries)
            return 0

        h.block_status(min(size - off, 1 << 30), off, cb)
        for i in range(0, len(got), 2):
            n = min(got[i], size - off)
            out.append((off, n, got[i + 1]))
            off += n
    return out


def iter_chunks(data: bytes, n: int) -> Iterator[bytes]:
    for i in range(0, len(data), n):
        yield data[i : i + n]
