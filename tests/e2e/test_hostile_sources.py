"""Network sources that try to hang or fool an import: NBD servers (nbdkit with its delay and rate filters,
or a socket that never greets) and web servers that stall, trickle or claim absurd sizes. Each import
fails in one line within its deadline, stores nothing, and leaves no process or temporary file behind;
a killed import leaves no nbdkit curl child either."""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import NBDCLONE, cli, wait_gone

TIMEOUT = 2  # NBDCLONE_IMPORT_TIMEOUT for these imports
ENV = {**os.environ, "NBDCLONE_IMPORT_TIMEOUT": str(TIMEOUT)}


def _holders(marker: str) -> list[int]:
    """Processes whose command line names `marker` (a test's own socket or port: nothing else has it)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return [p for p in pids if p != os.getpid()]


def _refused_in_time(store: Path, source: str, expect: str) -> None:
    start = time.monotonic()
    proc = cli("base", "import", "x", source, store=store, check=False, env=ENV, timeout=60)
    took = time.monotonic() - start
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert expect in proc.stderr, proc.stderr
    assert took < 3 * TIMEOUT + 5, f"took {took:.1f} s"
    listed = json.loads(cli("base", "list", "--json", store=store).stdout)["versions"]
    assert not [v for v in listed if v["base"] == "x"]
    assert not list((store / "tmp").glob("*")) if (store / "tmp").is_dir() else True


@pytest.fixture
def store(tmp_path: Path) -> Path:
    path = tmp_path / "store"
    cli("clone", "create", "c", "--size", "1M", store=path)  # a store exists before the import
    return path


@pytest.fixture
def nbdkit(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Start `nbdkit ARGS` on a Unix socket; its URI. Stopped by PID at the end."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> str:
        sock = tmp_path / f"nbdkit{len(procs)}.sock"
        procs.append(subprocess.Popen(["nbdkit", "-f", "-U", str(sock), *args], stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert time.monotonic() < deadline and procs[-1].poll() is None, "nbdkit did not start"
            time.sleep(0.02)
        return f"nbd+unix:///?socket={sock}"

    yield start
    for p in procs:
        p.send_signal(signal.SIGTERM)
        p.wait(30)


@pytest.mark.parametrize(
    ("server", "expect"),
    [
        pytest.param(["--filter=delay", "pattern", "64M", "delay-read=60"], "no answer in 2 s", id="stalls"),
        pytest.param(["--filter=rate", "pattern", "64M", "rate=16K"], "no answer in 2 s", id="trickles"),
        pytest.param(["null", "1"], "not a disk", id="one-byte"),
        pytest.param(["null", "4E"], "more than the store's file system can hold", id="four-EiB"),
    ],
)
def test_a_hostile_nbd_server_fails_the_import_within_its_deadline(
    store: Path, nbdkit: Callable[..., str], server: list[str], expect: str
) -> None:
    _refused_in_time(store, nbdkit(*server), expect)


def test_an_nbd_server_that_never_greets_fails_the_import_within_its_deadline(tmp_path: Path, store: Path) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "mute.sock"))
    listener.listen(8)  # the kernel accepts the connection; nothing ever answers on it
    try:
        _refused_in_time(store, f"nbd+unix:///?socket={tmp_path / 'mute.sock'}", "no answer in 2 s while connecting")
    finally:
        listener.close()


class _Hostile(http.server.BaseHTTPRequestHandler):
    """A web server for one raw image of `size` bytes that answers HEAD honestly (range requests and all)
    and then, depending on `mode`, never answers a GET, or trickles it a byte a second."""

    size = 64 << 20
    mode = "stall"
    release = threading.Event()

    def log_message(self, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(self.size))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()

    def do_GET(self) -> None:
        if self.mode == "stall":
            self.release.wait(120)
            return
        self.send_response(206)
        self.send_header("Content-Length", str(1 << 20))
        self.end_headers()
        while not self.release.wait(1):
            try:
                self.wfile.write(b"x")
                self.wfile.flush()
            except OSError:
                return


@pytest.fixture
def web() -> Iterator[Callable[[str, int], str]]:
    servers = []

    def start(mode: str, size: int) -> str:
        handler = type("Handler", (_Hostile,), {"mode": mode, "size": size, "release": threading.Event()})
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append((httpd, handler))
        return f"http://127.0.0.1:{httpd.server_address[1]}/disk-{mode}.raw"

    yield start
    for httpd, handler in servers:
        handler.release.set()
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize(
    ("mode", "size", "expect"),
    [
        pytest.param("stall", 64 << 20, "no answer in 2 s", id="stalls"),
        pytest.param("trickle", 64 << 20, "no answer in 2 s", id="trickles"),
        pytest.param("stall", 1 << 62, "more than the store's file system can hold", id="four-EiB"),
        pytest.param("stall", 1, "not a disk", id="one-byte"),
    ],
)
def test_a_hostile_web_server_fails_the_import_within_its_deadline_and_leaves_no_process(
    store: Path, web: Callable[[str, int], str], mode: str, size: int, expect: str
) -> None:
    url = web(mode, size)
    _refused_in_time(store, url, expect)
    left = _holders(url)
    wait_gone(left, timeout=10, kill=False)  # nbdkit's curl plugin went with the import


def test_a_killed_import_leaves_no_curl_child(store: Path, web: Callable[[str, int], str]) -> None:
    """nbdkit asks for SIGTERM when its parent dies, then waits for the request in flight: curl's timeout
    (the import's deadline) bounds that, so the child is gone within the deadline, not 10 minutes later."""
    url = web("stall", 64 << 20)
    proc = subprocess.Popen(
        [NBDCLONE, "base", "import", "x", url, "--store", str(store)],
        env={**os.environ, "NBDCLONE_IMPORT_TIMEOUT": "4"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    children: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while not (children := [p for p in _holders(url) if p != proc.pid]) and time.monotonic() < deadline:
            assert proc.poll() is None, "the import ended before it started nbdkit"
            time.sleep(0.02)
        assert children, "the import started no nbdkit"
        time.sleep(1)  # nbdkit is waiting on the web server now
        proc.kill()
        proc.wait()
        wait_gone(children, timeout=4 + 6, kill=False)
    finally:
        proc.kill()
        proc.wait()
        wait_gone(children, timeout=0)
