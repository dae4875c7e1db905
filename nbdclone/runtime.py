"""Where a store's server listens, and every file the supervisor, its workers and the CLI share under run/.

    STORE/serve.json          the address settings of the last `serve` (--socket or --listen): `nbdclone uri`
                              answers from it while no server runs
    STORE/run/                run time only; the supervisor makes it, nothing in it outlives a reboot's worth
      server.lock             flock held by the running supervisor: one server per store
      server.json             the running server: its pid, its workers' pids, its address settings
      nbdclone.sock[.K]       slot K's listening Unix socket (default place; --socket PATH moves them)
      worker-SUP-K.pid        worker K's nbdkit pidfile (written once it accepts connections)
      stats-worker-K.json     worker K's counters (per clone), rewritten every second
      stats-cache.json        the shared read cache's bound and evictions

Addresses. Every clone belongs to one of SLOTS slots, fixed when it is created (its creation number modulo
SLOTS), and each slot has one address: a Unix socket (SOCKET, SOCKET.1 ... SOCKET.15) or a TCP port
(PORT ... PORT+15). The supervisor binds all of them and hands each worker its slots' sockets (worker
slot % workers), so a clone's address depends neither on the worker count nor on whether a server runs.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nbdclone import errors

SLOTS = 16
SOCKET_NAME = "nbdclone.sock"
SETTINGS = "serve.json"


@dataclass(frozen=True, slots=True)
class Address:
    """Where a store's slots listen: Unix sockets (the default, in STORE/run) or TCP ports."""

    store: Path
    socket: Path | None = None  # slot 0's socket; slot K's is SOCKET.K
    listen: tuple[str, int] | None = None  # slot 0's host and port; slot K's port is PORT+K
    tls: bool = False  # clients connect with TLS (the URIs say nbds)

    def socket_path(self, slot: int) -> Path:
        sock = (self.socket or (self.store / "run" / SOCKET_NAME)).absolute()
        return sock.with_name(f"{sock.name}.{slot}") if slot else sock

    def endpoint(self, slot: int) -> Path | tuple[str, int]:
        """Where a client connects for `slot`: a socket path, or a host and port. A listener on every
        address (0.0.0.0, ::) is named by this host's name, which a client elsewhere can reach."""
        if self.listen is None:
            return self.socket_path(slot)
        host, port = self.listen
        with contextlib.suppress(ValueError):
            if ipaddress.ip_address(host).is_unspecified:
                host = socket.getfqdn()
        return host, port + slot

    def uri(self, slot: int, name: str) -> str:
        """What a client connects to (nbds under TLS)."""
        scheme = "nbds" if self.tls else "nbd"
        where = self.endpoint(slot)
        if isinstance(where, Path):
            return f"{scheme}+unix:///{name}?socket={where}"
        return f"{scheme}://{_uri_host(where[0])}:{where[1]}/{name}"

    def check(self) -> None:
        if self.listen is not None:
            port = self.listen[1]
            if not 0 < port <= 65536 - SLOTS:
                raise errors.InvalidArgument(detail=f"--listen port {port}: the {SLOTS} slots need {port}..{port + 15}")
            return
        longest = self.socket_path(SLOTS - 1)
        if len(os.fsencode(longest)) > 107:
            raise errors.InvalidArgument(detail=f"socket path {longest} is longer than 107 bytes; use --socket")

    def to_json(self) -> dict[str, Any]:
        listen = list(self.listen) if self.listen else None
        return {"socket": str(self.socket) if self.socket else None, "listen": listen, "tls": self.tls}

    @classmethod
    def from_json(cls, store: Path, data: Mapping[str, Any]) -> Address:
        listen = data.get("listen")
        sock = data.get("socket")
        listened = (str(listen[0]), int(listen[1])) if listen else None
        return cls(store, Path(sock) if sock else None, listened, bool(data.get("tls", False)))


def _uri_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class RunDir:
    """STORE/run/: the files the supervisor, its workers and the CLI share (see the module's docstring)."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.path = store / "run"

    @property
    def server_lock(self) -> Path:
        return self.path / "server.lock"

    @property
    def server_info(self) -> Path:
        return self.path / "server.json"

    @property
    def settings(self) -> Path:
        return self.store / SETTINGS

    def pidfile(self, supervisor: int, worker: int) -> Path:
        return self.path / f"worker-{supervisor}-{worker}.pid"

    def pidfiles(self) -> list[tuple[int, Path]]:
        """(supervisor pid, pidfile) of every worker pidfile present."""
        found = []
        for p in self.path.glob("worker-*-*.pid"):
            try:
                found.append((int(p.name.split("-")[1]), p))
            except ValueError:
                continue
        return found

    def worker_stats(self, worker: int) -> Path:
        return self.path / f"stats-worker-{worker}.json"

    @property
    def cache_stats(self) -> Path:
        return self.path / "stats-cache.json"

    @property
    def fleet_lease(self) -> Path:
        """In fleet mode: until when this host's lease holds, and the clones it owns (fleet/lease.py)."""
        return self.path / "fleet-lease.json"

    def saved_address(self) -> Address:
        """The address settings of the last server (the defaults if none ran yet)."""
        try:
            return Address.from_json(self.store, json.loads(self.settings.read_text()))
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            return Address(self.store)
