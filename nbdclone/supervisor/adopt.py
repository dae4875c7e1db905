"""Taking over the workers of a supervisor that died (kill -9, a crash, an OOM kill), so that its end is not
seen by a single client.

A worker whose supervisor dies serves on (process.Drain) and waits on its control socket. The next
`nbdclone serve` on the store finds it by its pidfile, connects (its own user or root only), receives its
listening sockets (SCM_RIGHTS) and, if they are the ones it would serve (same workers, same slots, same
addresses), keeps them: the workers go on serving their connections, and accepting new ones, under the new
supervisor, which watches them through a pidfd (they are not its children) and stops them as its own
(the word "stop" on the control socket). Workers that do not fit the new configuration (another number of
workers, another address) are stopped (a drain: clients reconnect to the new workers), and one of an
nbdclone too old to be adopted is waited for, then killed. So two generations never serve one store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nbdclone.runtime import Address, RunDir
from nbdclone.store.running import pid_alive
from nbdclone.worker.process import control_address

log = logging.getLogger(__name__)

CONNECT_FOR = 5.0  # seconds an orphan may take to notice its supervisor is gone and open its control socket


class Adopted:
    """An adopted worker, as much of asyncio.subprocess.Process as the supervisor uses. Not our child: its
    end is seen through a pidfd, and its exit status is unknown (-1)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._done = asyncio.Event()
        self._fd = os.pidfd_open(pid)
        asyncio.get_running_loop().add_reader(self._fd, self._ended)

    def _ended(self) -> None:
        asyncio.get_running_loop().remove_reader(self._fd)
        os.close(self._fd)
        self.returncode = -1
        self._done.set()

    async def wait(self) -> int:
        await self._done.wait()
        return -1

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)


@dataclass
class Orphan:
    index: int  # its worker number (its slots: ServeConfig.slots)
    pid: int
    pidfile: Path
    control: socket.socket | None  # None: a worker of an nbdclone that stops by itself when orphaned
    listeners: list[socket.socket]


async def find_orphans(run_dir: RunDir) -> list[Orphan]:
    """The live workers of supervisors that died, each connected to (or found unable to be)."""
    found = []
    for supervisor, pidfile in run_dir.pidfiles():
        if supervisor == os.getpid() or pid_alive(supervisor):
            continue
        try:
            pid = int(pidfile.read_text().strip())
            alive = pid_alive(pid) and b"nbdkit" in Path(f"/proc/{pid}/cmdline").read_bytes()
            index = int(pidfile.stem.split("-")[2])
        except (OSError, ValueError, IndexError):
            alive = False
        if not alive:
            pidfile.unlink(missing_ok=True)
            continue
        control, listeners = await _connect(pid)
        found.append(Orphan(index, pid, pidfile, control, listeners))
    return found


async def _connect(pid: int) -> tuple[socket.socket | None, list[socket.socket]]:
    deadline = time.monotonic() + CONNECT_FOR
    while True:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(control_address(pid))
            _, fds, _, _ = socket.recv_fds(conn, 64, 64)
            return conn, [socket.socket(fileno=fd) for fd in fds]
        except OSError:
            conn.close()
            if time.monotonic() > deadline or not pid_alive(pid):
                return None, []
            await asyncio.sleep(0.05)


def fitting_listeners(orphans: list[Orphan], address: Address, slots_of: list[list[int]]) -> list[socket.socket] | None:
    """The listening sockets of every slot, from the orphans, if they are exactly the workers this server
    would start (`slots_of`: each worker's slots) listening where it would listen; else None."""
    if sorted(o.index for o in orphans) != list(range(len(slots_of))):
        return None
    by_slot: dict[int, socket.socket] = {}
    for o in orphans:
        slots = slots_of[o.index]
        if o.control is None or len(o.listeners) != len(slots):
            return None
        for slot, s in zip(slots, o.listeners, strict=True):
            if not _listens_at(s, address, slot):
                return None
            by_slot[slot] = s
    return [by_slot[slot] for slot in sorted(by_slot)]


def _listens_at(s: socket.socket, address: Address, slot: int) -> bool:
    try:
        name = s.getsockname()
    except OSError:
        return False
    if address.listen is None:
        return bool(name == str(address.socket_path(slot)))
    return bool(name[1] == address.listen[1] + slot)


async def stop_orphans(orphans: list[Orphan], grace: float) -> None:
    """Stop orphans this server will not adopt: a drain if they can be told, then a kill after `grace`."""
    for o in orphans:
        if o.control is not None:
            log.info("stopping worker %d (pid %d) of a server that died: it does not fit this one", o.index, o.pid)
            with contextlib.suppress(OSError):
                o.control.sendall(b"stop\n")
        else:
            log.info("waiting for worker %d (pid %d) of a server that stopped without cleaning up", o.index, o.pid)
        deadline = time.monotonic() + grace
        while pid_alive(o.pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if pid_alive(o.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(o.pid, signal.SIGKILL)  # acknowledged writes survive this (overlay I2)
            while pid_alive(o.pid):
                await asyncio.sleep(0.05)
        release(o)


def release(o: Orphan, keep: Sequence[socket.socket] = ()) -> None:
    """Drop what this process holds of an orphan: its control socket, its pidfile, and its listeners but
    those in `keep` (the server's own now)."""
    if o.control is not None:
        o.control.close()
    for s in o.listeners:
        if not any(s is k for k in keep):
            s.close()
    o.pidfile.unlink(missing_ok=True)
