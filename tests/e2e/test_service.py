"""nbdclone serve as an operator runs it: restarts that clients ride through, permissions, TLS, limits,
metrics, and the files it ships for systemd."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import stat
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import nbd
import pytest

from nbdclone.supervisor.metrics import REFRESH
from tests.e2e.test_reconnect import QemuIo
from tests.helpers import NBDCLONE, Server, cli, make_image, wait_gone

MiB = 1 << 20
SIZE = 16 * MiB
UNPRIVILEGED = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]


@pytest.fixture
def base(tmp_path: Path, store_path: Path) -> bytes:
    data = make_image(tmp_path / "base.raw", SIZE, [(0, SIZE)])
    cli("base", "import", "deb", str(tmp_path / "base.raw"), store=store_path)
    return data


class _Client(threading.Thread):
    """A client writing and reading back, round after round, until halted: `done` counts the rounds."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.done = 0
        self.failures: list[str] = []
        self.halt = threading.Event()

    def wait_progress(self, n: int = 20, timeout: float = 60) -> None:
        """Wait until `n` more write-and-read rounds have succeeded."""
        target, deadline = self.done + n, time.monotonic() + timeout
        while self.done < target:
            assert not self.failures, self.failures
            assert time.monotonic() < deadline, "the client made no progress"
            time.sleep(0.01)


class Writer(_Client):
    """qemu-io (reconnect-delay=30) writing and reading back patterns, one after another, until stopped."""

    def __init__(self, sock: str, export: str) -> None:
        super().__init__()
        self.qemu = QemuIo(sock, export)
        self.model: dict[int, int] = {}  # offset -> pattern written there

    def run(self) -> None:
        i = 0
        while not self.halt.is_set():
            off, pattern = (i % 64) * 65536, i % 250 + 1
            for command in (f"write -P {pattern} {off} 64k", f"read -P {pattern} {off} 64k"):
                out = self.qemu.run(command)
                if "failed" in out.lower() or "error" in out.lower() or not out.strip():
                    self.failures.append(f"{command}: {out.strip()}")
            self.model[off] = pattern
            self.done += 1
            i += 1

    def finish(self) -> None:
        self.halt.set()
        self.join(60)
        for off, pattern in self.model.items():
            out = self.qemu.run(f"read -P {pattern} {off} 64k")
            assert "failed" not in out.lower() and "read" in out, out
        self.qemu.close()


def test_qemu_rides_through_a_worker_kill_a_sigterm_restart_and_a_reload(
    tmp_path: Path, store_path: Path, base: bytes
) -> None:
    cli("clone", "create", "vm", "--base", "deb", store=store_path)
    sock = tmp_path / "nbd.sock"
    server = Server(store_path, sock, ("--workers", "2")).start()
    uri = cli("uri", "vm", store=store_path).stdout.strip()
    writer = Writer(uri.partition("socket=")[2], "vm")
    writer.start()
    try:
        writer.wait_progress()
        worker = server.nbdkit_pid("vm")
        os.kill(worker, signal.SIGKILL)
        server.wait_restarted("vm", worker)
        writer.wait_progress()

        assert server.stop() == 0  # SIGTERM: requests in flight finish, connections drop unanswered
        assert "killing it" not in "".join(server.log)
        server = Server(store_path, sock, ("--workers", "2")).start()
        writer.wait_progress()

        before = server.nbdkit_pid("vm")
        cli("reload", store=store_path)
        deadline = time.monotonic() + 30
        while server.nbdkit_pid("vm") == before:
            assert time.monotonic() < deadline, "reload did not restart the worker"
            time.sleep(0.05)
        writer.wait_progress()
        assert not writer.failures, writer.failures
    finally:
        writer.finish()
        assert server.stop() == 0
    assert "killing it" not in "".join(server.log)


class NbdWriter(_Client):
    """A libnbd client with no reconnect: writes 4 KiB blocks and reads each back, until stopped. Any error
    is one a guest without QEMU's reconnect-delay would have seen."""

    def __init__(self, uri: str) -> None:
        super().__init__()
        self.h = nbd.NBD()
        self.h.connect_uri(uri)
        self.model: dict[int, bytes] = {}

    def run(self) -> None:
        i = 0
        while not self.halt.is_set():
            off, data = (i % 256) * 4096, (i.to_bytes(4, "big") * 1024)
            try:
                self.h.pwrite(data, off)
                if self.h.pread(4096, off) != data:
                    self.failures.append(f"block {off // 4096} read back wrong")
            except nbd.Error as exc:
                self.failures.append(str(exc))
                return
            self.model[off] = data
            self.done += 1
            i += 1


def test_a_supervisor_killed_and_started_again_is_not_seen_by_clients(
    tmp_path: Path, store_path: Path, base: bytes
) -> None:
    """kill -9 of `nbdclone serve`, then `serve` again, ten times, under two clients of two clones, one with
    no reconnect (libnbd) and qemu-io with reconnect-delay: the workers serve on and the new supervisor adopts them
    (adopt.py): not one request fails, every write is there, the workers are the same processes throughout,
    and none is left after the last stop. A server started with another number of workers stops the orphans
    first: never two generations at once."""
    cli("clone", "create", "vm", "vm2", "--base", "deb", store=store_path)
    sock = tmp_path / "nbd.sock"
    server = Server(store_path, sock, ("--workers", "2")).start()
    workers = sorted(w["pid"] for w in server.info()["workers"])
    uri, qemu_uri = (cli("uri", name, store=store_path).stdout.strip() for name in ("vm", "vm2"))
    client, qemu = NbdWriter(uri), Writer(qemu_uri.partition("socket=")[2], "vm2")
    client.start()
    qemu.start()
    try:
        for _ in range(10):
            client.wait_progress()
            qemu.wait_progress(2)
            assert server.proc is not None
            server.proc.kill()
            server.proc.wait()
            client.wait_progress()  # no supervisor: the workers serve on
            qemu.wait_progress(2)
            server = Server(store_path, sock, ("--workers", "2")).start()
            assert sorted(w["pid"] for w in server.info()["workers"]) == workers
        client.wait_progress()
        client.halt.set()
        client.join(30)
        assert not client.failures, client.failures
        assert not qemu.failures, qemu.failures
        qemu.finish()  # reads every pattern back
        for off, data in client.model.items():
            assert client.h.pread(4096, off) == data
        client.h.shutdown()
        assert "adopted worker" in "".join(server.log)
        server.proc.kill()  # and once more, to a server of another shape: the orphans are stopped first
        server.proc.wait()
        server = Server(store_path, sock, ("--workers", "3")).start()
        wait_gone(workers, timeout=1, kill=False)  # gone before the new server was ready
        h = server.connect("vm")
        assert h.pread(4096, 0) == client.model[0]
        h.shutdown()
        workers = [w["pid"] for w in server.info()["workers"]]
    finally:
        client.halt.set()
        qemu.halt.set()
        qemu.join(60)
        qemu.qemu.close()
        assert server.stop() == 0
    wait_gone(workers, kill=False)


@pytest.mark.parametrize("event", ["worker-kill", "reload"])
def test_a_client_connecting_during_a_restart_waits_and_succeeds(
    tmp_path: Path, store_path: Path, base: bytes, event: str
) -> None:
    cli("clone", "create", "late", "--base", "deb", store=store_path)
    server = Server(store_path, tmp_path / "nbd.sock", ("--workers", "1")).start()
    try:
        uri = cli("uri", "late", store=store_path).stdout.strip()
        worker = server.nbdkit_pid("late")
        if event == "worker-kill":
            os.kill(worker, signal.SIGKILL)
            wait_gone([worker], kill=False)
        else:
            cli("reload", store=store_path)
        # No worker may be accepting right now: the connection waits in the supervisor's backlog.
        h = nbd.NBD()
        h.connect_uri(uri)
        assert h.pread(4096, 0) == base[:4096]
        h.shutdown()
        server.wait_restarted("late", worker)  # served by a new worker (its record may follow a moment later)
    finally:
        assert server.stop() == 0


def test_sigterm_with_idle_clients_stops_cleanly_within_the_grace_time(
    tmp_path: Path, store_path: Path, base: bytes
) -> None:
    cli("clone", "create", "idle1", "idle2", "--base", "deb", store=store_path)
    server = Server(store_path, tmp_path / "nbd.sock", ("--grace", "5")).start()
    handles = []
    for name in ("idle1", "idle2"):
        h = server.connect(name)
        h.pwrite(name.encode() * 100, 0)  # not flushed: the stop must flush and close
        handles.append(h)
    started = time.monotonic()
    assert server.stop() == 0
    took = time.monotonic() - started
    log = "".join(server.log)
    assert took < 5 and "killing it" not in log, log
    assert log.count("stopped in") == 2, log
    again = Server(store_path, tmp_path / "nbd.sock").start()
    try:
        for name in ("idle1", "idle2"):
            h = again.connect(name)
            assert h.pread(len(name) * 100, 0) == name.encode() * 100
            h.shutdown()
    finally:
        again.stop()
    assert "was not closed" not in "".join(again.log)  # each overlay was flushed and closed cleanly


def test_two_servers_started_at_once_leave_one_server_with_its_sockets(
    tmp_path: Path, store_path: Path, base: bytes
) -> None:
    cli("clone", "create", "both", "--base", "deb", store=store_path)
    sock = tmp_path / "nbd.sock"
    cmd = [NBDCLONE, "serve", "--store", str(store_path), "--socket", str(sock)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        deadline = time.monotonic() + 30
        while all(p.poll() is None for p in procs):
            assert time.monotonic() < deadline, "neither server was refused"
            time.sleep(0.05)
        loser = next(p for p in procs if p.poll() is not None)
        winner = next(p for p in procs if p is not loser)
        assert loser.returncode != 0 and "already running" in loser.communicate()[1]
        assert winner.stdout is not None and winner.stdout.readline().startswith("nbdclone: serving")
        h = nbd.NBD()
        h.connect_uri(cli("uri", "both", store=store_path).stdout.strip())
        assert h.get_size() == SIZE
        h.shutdown()
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(30)


def _as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*UNPRIVILEGED, *args], capture_output=True, text=True, timeout=60)


def _reachable(path: Path) -> None:
    """Let other users search the folders above `path` (pytest's are private); the store stays private."""
    for folder in path.parents:
        if folder == Path("/tmp"):
            break
        folder.chmod(0o755)


@pytest.mark.parametrize(
    ("args", "allowed"),
    [
        pytest.param((), False, id="default-owner-only"),
        pytest.param(("--socket-group", "root"), False, id="another-group"),
        pytest.param(("--socket-group", "nogroup"), True, id="its-group"),
        pytest.param(("--socket-mode", "0666"), True, id="mode-0666"),
    ],
)
def test_an_unprivileged_client_connects_only_when_the_socket_group_or_mode_allows(
    tmp_path: Path, store_path: Path, base: bytes, args: tuple[str, ...], allowed: bool
) -> None:
    cli("clone", "create", "guest", "--base", "deb", store=store_path)
    _reachable(store_path)
    server = Server(store_path, store_path / "run" / "nbdclone.sock", args).start()
    try:
        uri = cli("uri", "guest", store=store_path).stdout.strip()
        proc = _as_nobody("nbdinfo", "--size", uri)  # uid nobody, gid nogroup, no other groups
        if allowed:
            assert proc.returncode == 0 and int(proc.stdout) == SIZE, proc.stderr
        else:
            assert proc.returncode != 0 and "Permission denied" in proc.stderr, proc.stdout + proc.stderr
    finally:
        assert server.stop() == 0


def test_an_unprivileged_user_can_read_nothing_in_the_store_nor_take_its_locks(
    tmp_path: Path, store_path: Path, base: bytes
) -> None:
    cli("clone", "create", "secret", "--base", "deb", store=store_path)
    _reachable(store_path)
    server = Server(store_path, store_path / "run" / "nbdclone.sock", ("--socket-group", "nogroup")).start()
    try:
        h = server.connect("secret")
        h.pwrite(b"private data" * 100, 0)
        h.flush()
        h.shutdown()
        files = [p for p in store_path.rglob("*") if p.is_file() and not p.is_socket()]
        assert any("clones" in p.parts for p in files) and (store_path / "lock").exists()
        probe = (
            "import fcntl, sys\n"
            "opened = []\n"
            "for p in sys.argv[1:]:\n"
            "    try:\n"
            "        fd = open(p, 'rb')\n"
            "    except OSError:\n"
            "        continue\n"
            "    opened.append(p)\n"
            "print('\\n'.join(opened))\n"
        )
        proc = _as_nobody("/usr/bin/python3", "-c", probe, *map(str, files))
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "", f"readable by nobody: {proc.stdout}"
        listing = _as_nobody("ls", str(store_path))
        assert listing.returncode != 0
    finally:
        assert server.stop() == 0


def _psk(path: Path, user: str, key: str) -> Path:
    path.write_text(f"{user}:{key}\n")
    path.chmod(0o600)
    return path


def test_tls_require_with_a_psk_refuses_plain_and_wrong_key_clients(
    tmp_path: Path, store_path: Path, base: bytes, free_port: int
) -> None:
    cli("clone", "create", "tls", "--base", "deb", store=store_path)
    keys = _psk(tmp_path / "server.psk", "alice", "0123456789abcdef0123456789abcdef")
    wrong = _psk(tmp_path / "wrong.psk", "alice", "fedcba9876543210fedcba9876543210")
    args = ("--listen", f"127.0.0.1:{free_port}", "--tls", "require", "--tls-psk", str(keys))
    server = Server(store_path, tmp_path / "unused.sock", args).start()
    try:
        uri = cli("uri", "tls", store=store_path).stdout.strip()
        assert uri.startswith("nbds://127.0.0.1:"), uri  # what a client must use
        secure = uri.replace("nbds://", "nbds://alice@", 1)  # libnbd takes the PSK user from the URI
        plain = uri.replace("nbds://", "nbd://", 1)
        ok = subprocess.run(["nbdinfo", "--size", f"{secure}?tls-psk-file={keys}"], capture_output=True, text=True)
        assert ok.returncode == 0 and int(ok.stdout) == SIZE, ok.stderr
        no_tls = subprocess.run(["nbdinfo", "--size", plain], capture_output=True, text=True)
        assert no_tls.returncode != 0
        bad_key = subprocess.run(
            ["nbdinfo", "--size", f"{secure}?tls-psk-file={wrong}"], capture_output=True, text=True
        )
        assert bad_key.returncode != 0
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize(("host", "who"), [("0.0.0.0", "anyone who can reach"), ("127.0.0.1", "every local user")])
def test_a_listen_without_tls_or_allow_list_is_called_out(
    tmp_path: Path, store_path: Path, base: bytes, free_port: int, host: str, who: str
) -> None:
    """Even on loopback: every local user can reach a TCP port (a Unix socket keeps clones to its owner).
    `uri` names a host a client can reach, never 0.0.0.0."""
    cli("clone", "create", "pub", "--base", "deb", store=store_path)
    server = Server(store_path, tmp_path / "unused.sock", ("--listen", f"{host}:{free_port}")).start()
    uri = cli("uri", "pub", store=store_path).stdout.strip()
    assert uri.startswith(f"nbd://{host if host != '0.0.0.0' else socket.getfqdn()}:") and uri.endswith("/pub"), uri
    try:
        deadline = time.monotonic() + 10
        while f"without --tls=require or --allow: {who}" not in "".join(server.log):
            assert time.monotonic() < deadline, "".join(server.log)
            server.log.append(server.proc.stdout.readline() if server.proc and server.proc.stdout else "")
    finally:
        assert server.stop() == 0


def test_the_allow_list_refuses_other_clients(tmp_path: Path, store_path: Path, base: bytes) -> None:
    cli("clone", "create", "acl", "--base", "deb", store=store_path)
    _reachable(store_path)
    args = ("--socket-mode", "0666", "--allow", "uid:0")
    server = Server(store_path, store_path / "run" / "nbdclone.sock", args).start()
    try:
        uri = cli("uri", "acl", store=store_path).stdout.strip()
        assert subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True).returncode == 0
        assert _as_nobody("nbdinfo", "--size", uri).returncode != 0  # may reach the socket, not on the list
    finally:
        assert server.stop() == 0


def _from(source: str, uri: str) -> bytes | str:
    """Read the first 512 bytes of `uri` (nbd://127.0.0.1:PORT/NAME) over a TCP connection from `source`;
    the error if the server refuses."""
    host_port, _, name = uri.removeprefix("nbd://").partition("/")
    host, _, port = host_port.rpartition(":")
    s = socket.socket()
    s.bind((source, 0))
    s.connect((host, int(port)))
    h = nbd.NBD()
    h.set_export_name(name)
    try:
        h.connect_socket(s.detach())
        data = bytes(h.pread(512, 0))
    except nbd.Error as exc:
        return str(exc)
    h.shutdown()
    return data


def test_the_allow_list_takes_addresses_and_networks_on_tcp(
    tmp_path: Path, store_path: Path, base: bytes, free_port: int
) -> None:
    """nbdkit 1.32's ip filter parses no address: the workers check them before the handshake. A client
    not allowed learns nothing (not even the clones' names); a bad rule is refused at start in one line."""
    cli("clone", "create", "acl", "--base", "deb", store=store_path)
    for rule, err in (("127.0.0.2.5", "give an address or a network"), ("uid:0", "are for Unix sockets")):
        bad = cli("serve", "--listen", f"127.0.0.1:{free_port}", "--allow", rule, store=store_path, check=False)
        assert bad.returncode != 0 and bad.stderr.count("\n") == 1 and err in bad.stderr, bad.stderr
    args = ("--listen", f"127.0.0.1:{free_port}", "--allow", "127.0.0.2", "--allow", "10.0.0.0/8")
    server = Server(store_path, tmp_path / "unused.sock", args).start()
    try:
        uri = cli("uri", "acl", store=store_path).stdout.strip()
        assert _from("127.0.0.2", uri) == base[:512]
        refused = _from("127.0.0.3", uri)
        assert isinstance(refused, str), "a client not on the list read the clone"
        listing = subprocess.run(["nbdinfo", "--list", uri], capture_output=True, text=True)
        assert listing.returncode != 0 and "acl" not in listing.stdout  # (from 127.0.0.1: not allowed)
    finally:
        assert server.stop() == 0
    assert "refused a connection from 127.0.0.3: not in --allow" in "".join(server.log)


def test_exclusive_serves_one_client_per_clone_and_read_only_refuses_writes(
    tmp_path: Path, store_path: Path, base: bytes
) -> None:
    cli("clone", "create", "one", "--base", "deb", store=store_path)
    server = Server(store_path, tmp_path / "nbd.sock", ("--exclusive",)).start()
    try:
        first = server.connect("one")
        with pytest.raises(nbd.Error):
            server.connect("one")
        first.shutdown()
        deadline = time.monotonic() + 10
        while True:  # once the first client has gone, the next one is welcome
            try:
                again = server.connect("one")
                break
            except nbd.Error:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        again.shutdown()
    finally:
        assert server.stop() == 0
    server = Server(store_path, tmp_path / "nbd.sock", ("--read-only",)).start()
    try:
        h = server.connect("one")
        assert h.is_read_only()
        with pytest.raises(nbd.Error):
            h.pwrite(b"x" * 4096, 0)
        assert h.pread(4096, 0) == base[:4096]
        h.shutdown()
    finally:
        assert server.stop() == 0
    # Per clone: created --read-only, served read-only next to writable clones.
    cli("clone", "create", "golden-view", "--base", "deb", "--read-only", store=store_path)
    listed = {c["name"]: c for c in json.loads(cli("clone", "list", "--json", store=store_path).stdout)["clones"]}
    assert listed["golden-view"]["readonly"] and not listed["one"]["readonly"]
    server = Server(store_path, tmp_path / "nbd.sock").start()
    try:
        ro, rw = server.connect("golden-view"), server.connect("one")
        assert ro.is_read_only() and not rw.is_read_only()
        with pytest.raises(nbd.Error) as err:
            ro.pwrite(b"x" * 4096, 0)
        assert err.value.errno == "EPERM"
        rw.pwrite(b"y" * 4096, 0)
        ro.shutdown()
        rw.shutdown()
    finally:
        assert server.stop() == 0


def test_requests_over_the_advertised_maximum_are_refused(server: Server, store_path: Path, base: bytes) -> None:
    cli("clone", "create", "big", "--base", "deb", store=store_path)
    h = nbd.NBD()
    h.set_strict_mode(0)  # let libnbd send what a hostile client would
    h.connect_uri(server.uri("big"))
    maximum = h.get_block_size(nbd.SIZE_MAXIMUM)
    assert 0 < maximum < 16 * MiB
    with pytest.raises(nbd.Error) as err:
        h.pread(maximum * 2, 0)
    assert err.value.errno == "EINVAL" or "Invalid argument" in str(err.value)
    assert h.pread(maximum, 0) == base[:maximum]
    h.shutdown()


def test_many_silent_connections_do_not_lock_a_real_client_out(tmp_path: Path, store_path: Path, base: bytes) -> None:
    cli("clone", "create", "real", "--base", "deb", store=store_path)
    server = Server(store_path, tmp_path / "nbd.sock", ("--workers", "1", "--grace", "5")).start()
    uri = cli("uri", "real", store=store_path).stdout.strip()
    path = uri.partition("socket=")[2]
    silent = []
    try:
        for _ in range(1100):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            silent.append(s)
        h = nbd.NBD()
        h.connect_uri(uri)
        assert h.pread(4096, 0) == base[:4096]
        h.shutdown()
        started = time.monotonic()
        assert server.stop() == 0
        assert time.monotonic() - started < 5 and "killing it" not in "".join(server.log)
    finally:
        for s in silent:
            s.close()
        server.stop()


def test_silent_connections_are_dropped_after_the_handshake_timeout_and_idle_clients_are_not(
    tmp_path: Path, store_path: Path, base: bytes
) -> None:
    cli("clone", "create", "quiet", "--base", "deb", store=store_path)
    server = Server(store_path, tmp_path / "nbd.sock", ("--workers", "1", "--handshake-timeout", "1")).start()
    try:
        uri = cli("uri", "quiet", store=store_path).stdout.strip()
        idle = nbd.NBD()
        idle.connect_uri(uri)  # a clone open, then nothing for a while: a VM may do that
        silent = []
        for _ in range(20):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(uri.partition("socket=")[2])
            s.settimeout(15)
            silent.append(s)
        started = time.monotonic()
        for s in silent:
            assert s.recv(152)[:8] == b"NBDMAGIC"  # the server's greeting, then nothing from us
            while s.recv(4096):  # until the server drops it
                pass
        assert time.monotonic() - started < 10
        # Tricklers: a byte of the handshake every 0.2 s keeps the server reading, never for long: the
        # deadline is for the whole handshake (they used to stay for as long as they liked).
        hello = struct.pack(">I", 3) + b"IHAVEOPT" + struct.pack(">II", 1, 400) + b"q" * 400
        tricklers = _greeted(uri, 10)
        started, dropped = time.monotonic(), set()
        for i in range(len(hello)):
            for k, s in enumerate(tricklers):
                if k not in dropped:
                    try:
                        s.send(hello[i : i + 1])
                    except OSError:  # (EPIPE, ECONNRESET: the server shut it)
                        dropped.add(k)
                    else:
                        dropped.update([k] if _closed_by_server(s) else [])
            if len(dropped) == len(tricklers):
                break
            time.sleep(0.2)
        assert len(dropped) == len(tricklers), f"{len(tricklers) - len(dropped)} trickling handshakes kept"
        assert time.monotonic() - started < 8
        assert idle.pread(4096, 0) == base[:4096]  # idle for as long, and still served
        idle.shutdown()
        for s in [*silent, *tricklers]:
            s.close()
    finally:
        assert server.stop() == 0
    log = "".join(server.log)
    assert f"clone quiet: client pid {os.getpid()} uid 0 connected" in log, log
    assert "Traceback" not in log


def _greeted(uri: str, n: int) -> list[socket.socket]:
    """`n` connections to the Unix socket of `uri` that read the server's greeting and say nothing yet."""
    conns = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(uri.partition("socket=")[2])
        assert s.recv(18)[:8] == b"NBDMAGIC"
        conns.append(s)
    return conns


def _closed_by_server(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        return s.recv(4096) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    finally:
        s.setblocking(True)


def test_one_client_cannot_hold_more_than_its_share_of_connections(
    tmp_path: Path, store_path: Path, base: bytes
) -> None:
    cli("clone", "create", "share", "--base", "deb", store=store_path)
    args = ("--workers", "1", "--max-client-connections", "3", "--handshake-timeout", "0")
    server = Server(store_path, tmp_path / "nbd.sock", args).start()
    try:
        uri = cli("uri", "share", store=store_path).stdout.strip()
        mine = server.connect("share")  # a clone open: never dropped for the cap
        silent = _greeted(uri, 10)
        deadline = time.monotonic() + 15
        while sum(not _closed_by_server(s) for s in silent) > 2:
            assert time.monotonic() < deadline, "the cap was not applied"
            time.sleep(0.2)
        time.sleep(2.5)  # and no more than the excess goes
        assert sum(not _closed_by_server(s) for s in silent) == 2
        assert mine.pread(4096, 0) == base[:4096]
        for s in silent:
            s.close()
        # Connections with a clone open count too: the newest beyond the cap go, the oldest stays.
        more = [server.connect("share") for _ in range(4)]
        deadline = time.monotonic() + 15
        while sum(_served(h) for h in more) > 2:
            assert time.monotonic() < deadline, "connections with a clone open were not counted"
            time.sleep(0.2)
        assert mine.pread(4096, 0) == base[:4096]
        for h in [mine, *more]:
            with contextlib.suppress(nbd.Error):
                h.shutdown()
    finally:
        assert server.stop() == 0
    assert "has more than 3 connections" in "".join(server.log)


def _served(h: nbd.NBD) -> bool:
    try:
        h.pread(512, 0)
    except nbd.Error:
        return False
    return True


def _raw_client(path: str, name: bytes) -> socket.socket:
    """An NBD client by hand (fixed newstyle, NBD_OPT_EXPORT_NAME): it can stop half-way through a write."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.settimeout(20)
    assert s.recv(18)[:8] == b"NBDMAGIC"
    s.sendall(struct.pack(">I", 3))  # fixed newstyle, no zeroes
    s.sendall(b"IHAVEOPT" + struct.pack(">II", 1, len(name)) + name)
    got = b""
    while len(got) < 10:  # export size and flags
        got += s.recv(10 - len(got))
    return s


def _write_header(handle: int, offset: int, length: int) -> bytes:
    return struct.pack(">IHHQQI", 0x25609513, 0, 1, handle, offset, length)


def _rss(pid: int) -> int:
    return int(Path(f"/proc/{pid}/status").read_text().split("VmRSS:")[1].split()[0]) << 10


def test_half_sent_writes_cannot_pin_the_workers_memory(tmp_path: Path, store_path: Path, base: bytes) -> None:
    cli("clone", "create", "pin", "--size", "1G", store=store_path)
    server = Server(store_path, tmp_path / "nbd.sock", ("--workers", "1", "--handshake-timeout", "2")).start()
    try:
        path = cli("uri", "pin", store=store_path).stdout.strip().partition("socket=")[2]
        worker = server.nbdkit_pid("pin")
        before = _rss(worker)
        huge = []  # over the advertised maximum: dropped at once
        for i in range(4):
            s = _raw_client(path, b"pin")
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # (dropped before all was sent)
                s.sendall(_write_header(i, 0, 60 * MiB) + b"\x01" * (16 * MiB))
            huge.append(s)
        stalled = _raw_client(path, b"pin")  # within it, but left half-sent: dropped after the timeout
        stalled.sendall(_write_header(9, 0, 4 * MiB) + b"\x02" * MiB)
        unread = []  # reads of 8 MiB whose replies the client never reads: dropped after the timeout
        for _ in range(4):
            s = _raw_client(path, b"pin")
            s.sendall(b"".join(struct.pack(">IHHQQI", 0x25609513, 0, 0, k, 0, 8 * MiB) for k in range(4)))
            unread.append(s)
        time.sleep(4)  # (the replies go unread meanwhile: dropped after 2 s, seen within a second)
        for s in unread:  # what the server sent before it dropped the connection, then its end
            s.settimeout(30)
            with contextlib.suppress(ConnectionResetError):
                while s.recv(1 << 20):
                    pass
        started = time.monotonic()
        for s in [*huge, stalled]:
            s.settimeout(30)
            try:
                assert s.recv(4096) == b"", "the server answered a half-sent write"  # it closed the connection
            except ConnectionResetError:
                pass
        assert time.monotonic() - started < 15
        assert _rss(worker) - before < 48 * MiB
        h = nbd.NBD()  # a well-behaved client writing at the maximum is served as ever
        h.connect_uri(cli("uri", "pin", store=store_path).stdout.strip())
        h.pwrite(b"\x04" * h.get_block_size(nbd.SIZE_MAXIMUM), 0)
        assert h.pread(4096, 0) == b"\x04" * 4096
        h.shutdown()
    finally:
        assert server.stop() == 0
    log = "".join(server.log)
    assert "a write of more than 8 MiB" in log and "a write stalled half-sent" in log, log
    assert "a reply left unread" in log, log


def test_the_metrics_endpoint_counts_what_fio_did_per_clone(
    tmp_path: Path, store_path: Path, base: bytes, free_port: int
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    cli("clone", "create", "m1", "m2", "--base", "deb", store=store_path)
    metrics_port = free_port + 16
    server = Server(store_path, tmp_path / "nbd.sock", ("--metrics", f"127.0.0.1:{metrics_port}")).start()
    try:
        jobs = {"m1": ("randwrite", "4k", 2 * MiB), "m2": ("read", "64k", 8 * MiB)}
        for name, (rw, bs, size) in jobs.items():
            uri = cli("uri", name, store=store_path).stdout.strip()
            subprocess.run(
                [
                    "fio",
                    "--name=m",
                    "--ioengine=nbd",
                    f"--uri={uri}",
                    f"--rw={rw}",
                    f"--bs={bs}",
                    f"--size={size}",
                    "--iodepth=8",
                    "--randrepeat=1",
                    "--norandommap",
                ],
                check=True,
                capture_output=True,
            )
        expected = {
            ("m1", "write"): (2 * MiB // 4096, 2 * MiB),
            ("m2", "read"): (8 * MiB // 65536, 8 * MiB),
        }
        deadline = time.monotonic() + 15
        while True:  # workers publish once a second
            text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
            seen: dict[tuple[str, str], list[float]] = {}
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    key = (sample.labels.get("clone", ""), sample.labels.get("op", ""))
                    if sample.name == "nbdclone_requests_total":
                        seen.setdefault(key, [0, 0])[0] = sample.value
                    elif sample.name == "nbdclone_request_bytes_total":
                        seen.setdefault(key, [0, 0])[1] = sample.value
            got = {k: tuple(int(x) for x in seen.get(k, [0, 0])) for k in expected}
            if got == expected or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert got == expected, text
        assert seen.get(("m1", "read"), [0, 0])[0] == 0 and seen.get(("m2", "write"), [0, 0])[0] == 0
        assert 'nbdclone_request_duration_seconds_count{clone="m2",op="read"} 128.0' in text
        overlay = {
            s.labels["clone"]: s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "nbdclone_overlay_disk_bytes"
        }
        assert overlay["m1"] >= MiB > overlay["m2"], overlay  # random 4 KiB writes over 2 MiB, some twice
        stats = json.loads(cli("stats", "--json", store=store_path).stdout)
        assert stats["clones"]["m1"]["write"]["requests"] == 512
        # A worker restarted: what the dead one counted is gone, nothing stale is served.
        dead = server.nbdkit_pid("m1")
        os.kill(dead, signal.SIGKILL)
        server.wait_restarted("m1", dead)
        restarted = time.monotonic()
        while True:  # (a scrape is rendered at most every REFRESH seconds)
            text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
            if "nbdclone_worker_restarts_total 1.0" in text or time.monotonic() - restarted > REFRESH + 5:
                break
            time.sleep(0.3)
        assert 'nbdclone_requests_total{clone="m1"' not in text
        assert "nbdclone_worker_restarts_total 1.0" in text
    finally:
        assert server.stop() == 0


def _scrape(port: int, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def test_metrics_can_leave_names_out_require_a_token_and_render_at_most_every_refresh(
    tmp_path: Path, store_path: Path, base: bytes, free_port: int
) -> None:
    cli("clone", "create", "secret-name", "other", "--base", "deb", store=store_path)
    (tmp_path / "token").write_text("s3cret-token\n")
    port = free_port + 16
    args = ("--metrics", f"127.0.0.1:{port}", "--no-metrics-names", "--metrics-token-file", str(tmp_path / "token"))
    server = Server(store_path, tmp_path / "nbd.sock", args).start()
    try:
        assert _scrape(port) == (401, "") and _scrape(port, "wrong")[0] == 401
        for name in ("secret-name", "other"):
            h = server.connect(name)
            h.pwrite(b"\x01" * 4096, 0)
            h.shutdown()
        deadline = time.monotonic() + REFRESH + 10
        while 'nbdclone_requests_total{op="write"} 2.0' not in (text := _scrape(port, "s3cret-token")[1]):
            assert time.monotonic() < deadline, text
            time.sleep(0.3)
        assert "secret-name" not in text and "other" not in text and 'clone="' not in text
        assert "nbdclone_overlay_disk_bytes " in text  # one sum for the store
        # Rendered at most once per REFRESH: a write now shows in a later scrape, not in the next one.
        h = server.connect("other")
        h.pwrite(b"\x02" * 4096, 4096)
        h.shutdown()
        first = _scrape(port, "s3cret-token")[1]
        assert 'nbdclone_requests_total{op="write"} 2.0' in first  # (the cached rendering)
        deadline = time.monotonic() + REFRESH + 10
        while 'nbdclone_requests_total{op="write"} 3.0' not in _scrape(port, "s3cret-token")[1]:
            assert time.monotonic() < deadline
            time.sleep(0.3)
    finally:
        assert server.stop() == 0


def test_requests_nbdkit_refuses_itself_are_counted_and_still_logged(
    tmp_path: Path, store_path: Path, base: bytes, free_port: int
) -> None:
    """A write to a read-only clone (EPERM), a read past the end (EINVAL), a write and a zero past it
    (ENOSPC): nbdkit answers them before any plugin code runs. The worker reads its own stderr, so each is
    counted (nbdclone_refused_requests_total by worker, op and reason) and still reaches the log."""
    cli("clone", "create", "ro", "--base", "deb", "--read-only", store=store_path)
    cli("clone", "create", "rw", "--base", "deb", store=store_path)
    port = free_port + 18
    server = Server(store_path, tmp_path / "nbd.sock", ("--metrics", f"127.0.0.1:{port}", "--workers", "1")).start()
    try:
        handles = {}
        for name in ("ro", "rw"):
            handles[name] = h = nbd.NBD()
            h.set_strict_mode(0)  # let libnbd send what a careless client would
            h.connect_uri(server.uri(name))
        refused = (
            ("ro", lambda h: h.pwrite(b"x" * 4096, 0), "EPERM"),
            ("ro", lambda h: h.pread(4096, SIZE), "EINVAL"),
            ("rw", lambda h: h.pwrite(b"x" * 4096, SIZE), "ENOSPC"),
            ("rw", lambda h: h.zero(4096, SIZE), "ENOSPC"),
        )
        for name, request, errno in refused:
            with pytest.raises(nbd.Error) as failed:
                request(handles[name])
            assert failed.value.errno == errno
        assert handles["rw"].pread(4096, 0) == base[:4096]  # the connections serve on
        want = {("write", "read-only"): 1, ("read", "out-of-range"): 1, ("write", "out-of-range"): 1,
                ("zero", "out-of-range"): 1}  # fmt: skip
        pattern = re.compile(r'nbdclone_refused_requests_total\{op="(\w+)",reason="([\w-]+)",worker="0"\} (\S+)')
        deadline = time.monotonic() + REFRESH + 10
        while (seen := {(op, r): int(float(n)) for op, r, n in pattern.findall(_scrape(port)[1])}) != want:
            assert time.monotonic() < deadline, seen
            time.sleep(0.3)
        log = "".join(server.log)
        assert "NBD_CMD_WRITE: write request on readonly connection" in log
        assert "NBD_CMD_WRITE_ZEROES: offset and count are out of range" in log
        for h in handles.values():
            h.shutdown()
    finally:
        assert server.stop() == 0


def test_metrics_over_https_with_a_token_and_a_stalling_client(
    tmp_path: Path, store_path: Path, base: bytes, free_port: int
) -> None:
    """--metrics-tls-cert/--metrics-tls-key: Prometheus' scheme https. A scrape that trusts the certificate
    and sends the token reads the metrics; plain HTTP gets nothing; a client that connects and never starts
    its handshake holds no one else up and is dropped."""
    cli("clone", "create", "vm", "--base", "deb", store=store_path)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days",
         "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out",
         str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    (tmp_path / "token").write_text("tls-token\n")
    port = free_port + 17
    args = ("--metrics", f"127.0.0.1:{port}", "--metrics-token-file", str(tmp_path / "token"))
    tls = ("--metrics-tls-cert", str(cert), "--metrics-tls-key", str(key))
    server = Server(store_path, tmp_path / "nbd.sock", (*args, *tls)).start()
    staller = socket.create_connection(("127.0.0.1", port))  # never says a word
    try:
        trusted = ssl.create_default_context(cafile=str(cert))
        bearer = {"Authorization": "Bearer tls-token"}
        request = urllib.request.Request(f"https://127.0.0.1:{port}/metrics", headers=bearer)
        started = time.monotonic()
        with urllib.request.urlopen(request, timeout=10, context=trusted) as reply:
            assert reply.status == 200 and "nbdclone_open_clones" in reply.read().decode()
        assert time.monotonic() - started < 5  # the staller held no one up
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain HTTP: no answer it can read
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10)
        with pytest.raises(urllib.error.URLError):  # an untrusted certificate is refused by the client
            urllib.request.urlopen(request, timeout=10, context=ssl.create_default_context())
        staller.settimeout(20)
        assert staller.recv(1) == b""  # dropped after the handler's timeout
        assert "metrics on https://127.0.0.1" in "".join(server.log)
    finally:
        staller.close()
        assert server.stop() == 0


def _exposure(unit: Path) -> float:
    """systemd-analyze security's overall exposure of `unit` (0 safe ... 10 unsafe)."""
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(unit)], capture_output=True, text=True, check=False
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert found, proc.stdout + proc.stderr
    return float(found.group(1))


def test_the_systemd_units_are_hardened_and_pass_systemd_analyze(tmp_path: Path) -> None:
    store = tmp_path / "srv"
    etc = tmp_path / "etc"
    cli("systemd-units", "--dest", str(tmp_path / "units"), "--etc", str(etc), "--group", "nogroup", store=store)
    units = sorted((tmp_path / "units").iterdir())
    assert [u.name for u in units] == ["nbdclone.service", "nbdclone.socket"]
    service, sock = (u.read_text() for u in units)
    assert "Type=notify" in service and f"--store {store}" in service and NBDCLONE in service
    assert (
        "User=nbdclone" in service
        and f"ReadWritePaths={store}" in service
        and "@" not in service.replace("@system-service", "")
    )
    assert sock.count("ListenStream=") == 16 and f"ListenStream={store}/run/nbdclone.sock.15" in sock
    proc = subprocess.run(
        ["systemd-analyze", "verify", *map(str, units)],
        capture_output=True,
        text=True,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"},
    )
    problems = [line for line in proc.stderr.splitlines() if "nbdclone" in line]
    assert proc.returncode == 0 and not problems, proc.stderr
    assert _exposure(units[0]) <= 3.0
    assert stat.S_IMODE((etc / "nbdclone").stat().st_mode) == 0o755  # the service's user reads serve.toml
    # The user and the store's folders come from systemd's own tools, not from code of ours.
    for name in ("passwd", "group", "shadow", "gshadow"):
        with contextlib.suppress(FileNotFoundError):
            shutil.copy(f"/etc/{name}", etc / name)
    subprocess.run(["systemd-sysusers", f"--root={tmp_path}", str(etc / "sysusers.d" / "nbdclone.conf")], check=True)
    user = next(line for line in (etc / "passwd").read_text().splitlines() if line.startswith("nbdclone:"))
    assert user.endswith(":/usr/sbin/nologin") and f":{store}:" in user
    assert any(line.startswith("nogroup:") and "nbdclone" in line for line in (etc / "group").read_text().splitlines())
    assert "\nnbdclone:" not in Path("/etc/passwd").read_text()  # the host's users are untouched
    # A second run refuses to overwrite; the operator's serve.toml is kept.
    (etc / "nbdclone" / "serve.toml").write_text("workers = 3\n")
    again = cli("systemd-units", "--dest", str(tmp_path / "units"), "--etc", str(etc), store=store, check=False)
    assert again.returncode == 1 and again.stderr.count("\n") == 1 and "exists" in again.stderr
    assert (etc / "nbdclone" / "serve.toml").read_text() == "workers = 3\n"


def test_serve_reads_its_options_from_a_config_file_and_flags_win(tmp_path: Path, store_path: Path) -> None:
    cli("clone", "create", "cfg", "--size", "1M", store=store_path)
    config = tmp_path / "serve.toml"
    config.write_text('workers = 3\nsocket-mode = "0600"\nallow = ["uid:0"]\n')
    server = Server(store_path, tmp_path / "nbd.sock", ("--config", str(config), "--workers", "2")).start()
    try:
        info = json.loads((store_path / "run" / "server.json").read_text())
        assert len(info["workers"]) == 2  # the flag won over the file's 3
        assert stat.S_IMODE(os.stat(tmp_path / "nbd.sock").st_mode) == 0o600
        h = server.connect("cfg")  # uid 0 is allowed
        h.shutdown()
    finally:
        assert server.stop() == 0
    server = Server(store_path, tmp_path / "nbd.sock", ("--config", str(config))).start()
    try:
        assert len(json.loads((store_path / "run" / "server.json").read_text())["workers"]) == 3
    finally:
        assert server.stop() == 0
    for text, expect in [
        ("wrokers = 3\n", "serve has no option 'wrokers'"),
        ("workers = [\n", "config file"),
        ('workers = "many"\n', "--workers"),
    ]:
        config.write_text(text)
        proc = cli("serve", "--config", str(config), store=store_path, check=False)
        assert proc.returncode != 0 and proc.stderr.count("\n") == 1 and expect in proc.stderr, proc.stderr


def test_the_supervisor_takes_its_sockets_from_systemd_and_notifies_readiness(
    tmp_path: Path, store_path: Path, base: bytes
) -> None:
    """What systemd does, by hand: bind the 16 sockets, start serve with LISTEN_FDS and a NOTIFY_SOCKET."""
    cli("clone", "create", "sd", "--base", "deb", store=store_path)
    (store_path / "run").mkdir(exist_ok=True)
    listeners = []
    for k in range(16):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(store_path / "run" / ("nbdclone.sock" + (f".{k}" if k else ""))))
        s.listen(64)
        listeners.append(s)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(60)
    launch = (
        "import os, sys\n"
        "fds = [int(a) for a in sys.argv[1:17]]\n"
        "for k, fd in enumerate(fds): os.dup2(fd, 100 + k)\n"
        "for k in range(16): os.dup2(100 + k, 3 + k)\n"
        "os.environ.update(LISTEN_FDS='16', LISTEN_PID=str(os.getpid()))\n"
        "os.execv(sys.argv[17], sys.argv[17:])\n"
    )
    fds = [s.fileno() for s in listeners]
    proc = subprocess.Popen(
        ["/usr/bin/python3", "-c", launch, *map(str, fds), NBDCLONE, "serve", "--store", str(store_path)],
        pass_fds=fds,
        env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert notify.recv(100) == b"READY=1"
        uri = cli("uri", "sd", store=store_path).stdout.strip()
        h = nbd.NBD()
        h.connect_uri(uri)
        assert h.pread(4096, 0) == base[:4096]
        h.shutdown()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    # systemd's sockets stay: a connection made now waits for the next start instead of being refused.
    assert (store_path / "run" / "nbdclone.sock").exists()
    waiting = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    waiting.connect(str(store_path / "run" / "nbdclone.sock"))
    waiting.close()
    for s in listeners:
        s.close()


def test_records_other_users_leave_in_shared_memory_are_ignored(store_path: Path, base: bytes) -> None:
    """/dev/shm is everyone's: a server record planted there by another user must not redirect clients."""
    from nbdclone.store import Store

    cli("clone", "create", "victim", "--base", "deb", store=store_path)
    honest = cli("uri", "victim", store=store_path).stdout.strip()
    planted = Store(store_path).clock_path.with_suffix(".server.json")
    evil = {"pid": 1, "store": str(store_path), "address": {"socket": "/tmp/evil.sock", "listen": None}, "workers": []}
    planted.write_text(json.dumps(evil))
    try:
        os.chown(planted, 65534, 65534)  # nobody's
        assert cli("uri", "victim", store=store_path).stdout.strip() == honest
        os.chown(planted, 0, 0)  # (the same file of our own is believed: the check is the owner)
        assert "/tmp/evil.sock" in cli("uri", "victim", store=store_path).stdout
    finally:
        planted.unlink()


def test_acknowledged_writes_survive_a_reload_and_a_stop_with_several_connections(
    tmp_path: Path, store_path: Path, base: bytes
) -> None:
    """Four connections write at once while the worker is drained (reload, then SIGTERM): every write that
    was acknowledged reads back after the restart, flushed or not; the one in flight on each connection
    reads as before or after it, never anything else."""
    cli("clone", "create", "multi", "--size", "64M", store=store_path)
    sock = tmp_path / "nbd.sock"
    server = Server(store_path, sock, ("--workers", "1")).start()
    uri = cli("uri", "multi", store=store_path).stdout.strip()
    model: dict[int, bytes] = {}  # offset -> last acknowledged contents
    maybe: dict[int, set[bytes]] = {}  # offset -> what it may hold (an unanswered write, or the old value)
    lock = threading.Lock()
    try:
        for round_, event in enumerate(("reload", "stop")):
            started = threading.Barrier(5)

            def writer(k: int, round_: int = round_, started: threading.Barrier = started) -> None:
                h = nbd.NBD()
                h.connect_uri(uri)
                started.wait()
                i = 0
                while True:
                    offset = (k * 2048 + i % 2048) * 4096
                    data = bytes([round_ * 16 + k + 1]) * 8 + i.to_bytes(8, "big") + bytes(4080)
                    with lock:
                        maybe.setdefault(offset, {model.get(offset, bytes(4096))}).add(data)
                    try:
                        h.pwrite(data, offset)
                    except nbd.Error:
                        return  # the connection dropped: this write may or may not have landed
                    with lock:
                        model[offset] = data
                        maybe[offset] = {data}
                    i += 1

            threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
            for t in threads:
                t.start()
            started.wait()
            time.sleep(0.5)
            if event == "reload":
                cli("reload", store=store_path)
            else:
                assert server.stop() == 0
            for t in threads:
                t.join(60)
                assert not t.is_alive()
            if event == "stop":
                server = Server(store_path, sock, ("--workers", "1")).start()
            h = nbd.NBD()
            h.connect_uri(uri)
            with lock:
                assert len(model) > 100, "too few writes to show anything"
                for offset, choices in maybe.items():
                    got = bytes(h.pread(4096, offset))
                    assert got in choices, (event, offset, got[:16])
            h.shutdown()
    finally:
        assert server.stop() == 0
