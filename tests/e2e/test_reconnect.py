"""A client that comes back keeps its disk: QEMU (qemu-io with reconnect-delay) holds a following clone across
a promote, a worker's death and the supervisor's kill -9 and restart; the clone moves to the new version only
after QEMU has gone while the server ran."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from tests.helpers import Server, cli, make_image, pread_all

MiB = 1 << 20
SIZE = 8 * MiB
PROMPT = b"qemu-io> "


class QemuIo:
    """qemu-io at its prompt, one command at a time."""

    def __init__(self, socket: str, export: str) -> None:
        opts = (
            f"driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={socket},"
            f"file.export={export},file.reconnect-delay=30"
        )
        self.proc = subprocess.Popen(
            ["qemu-io", "--image-opts", opts], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self._until_prompt()

    def _until_prompt(self) -> str:
        assert self.proc.stdout is not None
        out = b""
        while not out.endswith(PROMPT):
            c = self.proc.stdout.read(1)
            if not c:
                raise AssertionError(f"qemu-io exited: {out.decode(errors='replace')}")
            out += c
        return out[: -len(PROMPT)].decode(errors="replace")

    def run(self, command: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        return self._until_prompt()

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(b"quit\n")
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _socket_of(uri: str) -> str:
    return uri.partition("socket=")[2]


def test_qemu_keeps_its_disk_across_a_promote_a_worker_kill_and_a_server_kill(tmp_path: Path, store_path: Path) -> None:
    v1 = make_image(tmp_path / "v1.raw", SIZE, [(0, SIZE)], seed=1)
    v2 = make_image(tmp_path / "v2.raw", SIZE, [(0, SIZE)], seed=2)
    cli("base", "import", "deb", str(tmp_path / "v1.raw"), store=store_path)
    cli("base", "import", "deb", str(tmp_path / "v2.raw"), store=store_path)
    cli("clone", "create", "vdi", "--base", "deb", store=store_path)
    sock = tmp_path / "nbd.sock"
    server = Server(store_path, sock).start()
    qemu = QemuIo(_socket_of(server.uri("vdi")), "vdi")
    try:
        assert "wrote" in qemu.run("write -P 0x5a 0 1M")
        qemu.run("flush")
        promoted = cli("base", "promote", "deb", "2", store=store_path).stdout
        assert "0 clone(s) move at their next connection; 1 wait" in promoted, promoted

        worker = server.nbdkit_pid("vdi")
        os.kill(worker, signal.SIGKILL)
        server.wait_restarted("vdi", worker)
        assert "Pattern verification failed" not in qemu.run("read -P 0x5a 0 1M")
        assert "read" in qemu.run("read -P 0x5a 0 1M")
        assert "wrote" in qemu.run("write -P 0x6b 2M 64k")  # not flushed: kill -9 keeps it too

        assert server.proc is not None
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait()
        server = Server(store_path, sock).start()
        out = qemu.run("read -P 0x5a 0 1M")
        assert "Pattern verification failed" not in out and "read" in out, out
        out = qemu.run("read -P 0x6b 2M 64k")
        assert "Pattern verification failed" not in out and "read" in out, out
        listed = cli("clone", "info", "vdi", "--json", store=store_path).stdout
        assert '"version": "1"' in listed
    finally:
        qemu.close()
    # QEMU is gone and the server ran on: now the clone moves (its writes are dropped).
    from tests.helpers import wait_closed

    wait_closed(store_path, "vdi")
    h = server.connect("vdi")
    try:
        assert pread_all(h, SIZE) == v2
    finally:
        h.shutdown()
        server.stop()
    assert v1 != v2
