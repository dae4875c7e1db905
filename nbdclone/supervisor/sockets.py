"""The listening sockets the supervisor owns (one per slot), their permissions, and systemd's side of them.

The supervisor binds every slot's socket once (or takes them from systemd's socket activation) and keeps
them open for its whole life; workers get theirs by socket activation (LISTEN_FDS). A worker that restarts
or reloads never closes one, so a client that connects meanwhile waits in the backlog instead of being
refused. Under systemd's socket unit the sockets outlive the supervisor too: a whole-server restart refuses
nothing either.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from nbdclone import errors
from nbdclone.runtime import SLOTS, Address

log = logging.getLogger(__name__)

BACKLOG = 4096  # connections waiting while a worker (re)starts; the kernel caps it at net.core.somaxconn
SD_LISTEN_FDS_START = 3


@dataclass(frozen=True, slots=True)
class Access:
    """Who may connect to the Unix sockets: their mode and group. The store is private (0700): its root and
    run/ get just the search permission the sockets' mode needs, and nothing else in it is readable."""

    mode: int = 0o600
    group: str | None = None

    @property
    def gid(self) -> int:
        if self.group is None:
            return -1
        try:
            return int(self.group) if self.group.isdigit() else grp.getgrnam(self.group).gr_gid
        except KeyError:
            raise errors.InvalidArgument(detail=f"--socket-group {self.group!r}: no such group") from None

    def dir_mode(self) -> int:
        """The search (x) bits a folder on the sockets' path needs for those who may connect."""
        return 0o700 | (0o010 if self.mode & 0o020 else 0) | (0o001 if self.mode & 0o002 else 0)


def make_private(store: Path, access: Access) -> None:
    """Close the store to other users: its root and run/ only searchable as far as the sockets need, every
    other entry of the root private (so a group or other user can reach nothing but the sockets)."""
    gid = access.gid
    for folder in (store, store / "run"):
        folder.mkdir(mode=0o700, exist_ok=True)
        os.chown(folder, -1, gid)
        os.chmod(folder, access.dir_mode())
    for entry in store.iterdir():
        if entry.name == "run" or entry.is_symlink():
            continue
        os.chmod(entry, 0o700 if entry.is_dir() else 0o600)


def bind(address: Address, access: Access) -> list[socket.socket]:
    """Every slot's listening socket, bound and listening."""
    address.check()
    listeners: list[socket.socket] = []
    try:
        for slot in range(SLOTS):
            if address.listen is not None:
                host, port = address.listen
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                try:
                    s = socket.create_server((host, port + slot), family=family, backlog=BACKLOG)
                except OSError as exc:
                    detail = f"cannot listen on {host}:{port + slot}: {exc.strerror}"
                    raise errors.InvalidArgument(detail=detail) from None
            else:
                path = address.socket_path(slot)
                _remove_stale_socket(path)
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                old = os.umask(0o177)  # the socket is born private; its mode and group are set next
                try:
                    s.bind(str(path))
                finally:
                    os.umask(old)
                os.chown(path, -1, access.gid)
                os.chmod(path, access.mode)
                s.listen(BACKLOG)
            listeners.append(s)
    except BaseException:
        close(listeners, address, unlink=True)
        raise
    return listeners


def inherited() -> list[socket.socket] | None:
    """The slots' sockets systemd passed (socket activation), in slot order; None if it passed none."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    n = int(os.environ.get("LISTEN_FDS", "0") or 0)
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    if n != SLOTS:
        raise errors.InvalidArgument(detail=f"systemd passed {n} sockets; the socket unit must list {SLOTS}")
    return [socket.socket(fileno=SD_LISTEN_FDS_START + k) for k in range(n)]


def close(listeners: list[socket.socket], address: Address, *, unlink: bool) -> None:
    for slot, s in enumerate(listeners):
        s.close()
        if unlink and address.listen is None:
            # A stale socket file would refuse the next server's bind.
            address.socket_path(slot).unlink(missing_ok=True)


def _remove_stale_socket(path: Path) -> None:
    """A server that was killed leaves its sockets behind, and a new bind to them fails ("Address already
    in use"). Remove one only if it is a socket that nothing answers on; anything else is an error."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise errors.InvalidArgument(detail=f"{path} exists and is not a socket; choose another --socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)
            log.info("removed the stale socket %s left by a server that did not stop cleanly", path)
            return
    raise errors.InvalidArgument(detail=f"another process is listening on {path}")


def notify(state: str) -> None:
    """Tell systemd (Type=notify) about the service: READY=1, RELOADING=1, STOPPING=1."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return
    if target.startswith("@"):
        target = "\0" + target[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(target)
        s.sendall(state.encode())
