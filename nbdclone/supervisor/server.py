"""Run nbdkit with the nbdclone plugin in the foreground, with a visible lifecycle:

    run() -> serve():  startup   start nbdkit, wait until its pidfile says it accepts connections, announce
                       main      wait for SIGTERM/SIGINT or for nbdkit to exit
                       shutdown  SIGTERM to nbdkit (it closes every connection, and the plugin flushes and
                                 closes every overlay), wait up to `grace` seconds, then SIGKILL

uvloop is chosen here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import uvloop

import nbdclone
from nbdclone import errors
from nbdclone.store.catalog import Store

log = logging.getLogger(__name__)

PLUGIN = Path(__file__).resolve().parent.parent.parent / "plugins" / "nbdclone.py"
SOCKET_NAME = "nbdclone.sock"


@dataclass(frozen=True, slots=True)
class ServeConfig:
    store: Path
    socket: Path | None = None
    listen: tuple[str, int] | None = None
    threads: int = 16
    grace: float = 10.0
    verbose: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)

    def endpoint(self) -> tuple[list[str], str]:
        """nbdkit's listening arguments and the URI prefix a clone name is appended to."""
        if self.listen is not None:
            host, port = self.listen
            return ["--ipaddr", host, "--port", str(port)], f"nbd://{_uri_host(host)}:{port}/"
        sock = self.socket or (self.store / "run" / SOCKET_NAME)
        sock = sock.absolute()
        if len(os.fsencode(sock)) > 107:
            raise errors.InvalidArgument(detail=f"socket path {sock} is longer than 107 bytes; use --socket")
        return ["--unix", str(sock)], f"nbd+unix:///{{name}}?socket={sock}"


def _uri_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def clone_uri(prefix: str, name: str) -> str:
    return prefix.replace("{name}", name) if "{name}" in prefix else prefix + name


def plugin_pythonpath() -> str:
    """What the embedded interpreter needs on sys.path: this package and our virtualenv's libraries,
    but not our own interpreter's standard library (nbdkit embeds the system one)."""
    stdlib_roots = {sys.base_prefix, sys.base_exec_prefix}
    paths = [str(Path(nbdclone.__file__).resolve().parent.parent)]
    for p in sys.path:
        if p and not any(p.startswith(root + os.sep) for root in stdlib_roots) and p not in paths:
            paths.append(p)
    return os.pathsep.join(paths)


def nbdkit_command(cfg: ServeConfig, pidfile: Path) -> list[str]:
    nbdkit = shutil.which("nbdkit")
    if nbdkit is None:
        raise errors.NbdcloneError(detail="nbdkit is not installed (apt install nbdkit nbdkit-plugin-python)")
    listen, _ = cfg.endpoint()
    cmd = [nbdkit, "--foreground", "--exit-with-parent", "--pidfile", str(pidfile), *listen]
    cmd += ["--threads", str(cfg.threads)]
    if cfg.verbose:
        cmd.append("--verbose")
    return [*cmd, "python", str(PLUGIN), f"store={cfg.store.absolute()}"]


def run(cfg: ServeConfig, announce: Callable[[str], None]) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit code. `announce(uri_prefix)` is called once, when ready."""
    return uvloop.run(serve(cfg, announce))


async def serve(cfg: ServeConfig, announce: Callable[[str], None]) -> int:
    store = Store(cfg.store)
    listen_args, prefix = cfg.endpoint()
    with store.lock():
        store.path.mkdir(parents=True, exist_ok=True)
        (store.path / "run").mkdir(exist_ok=True)
    pidfile = store.path / "run" / f"nbdkit.{os.getpid()}.pid"
    pidfile.unlink(missing_ok=True)
    if cfg.socket is None and cfg.listen is None:
        _remove_stale_socket(store)
    env = {**os.environ, "PYTHONPATH": plugin_pythonpath(), **cfg.extra_env}
    proc = await asyncio.create_subprocess_exec(*nbdkit_command(cfg, pidfile), env=env)
    stop = asyncio.Event()
    restore = _install_signal_handlers(stop)
    try:
        if not await _wait_ready(proc, pidfile):
            return proc.returncode or 1
        store.write_server_info({"pid": os.getpid(), "nbdkit_pid": proc.pid, "uri": prefix})
        announce(prefix)
        waiter = asyncio.ensure_future(proc.wait())
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if proc.returncode is not None:
            log.error("nbdkit exited with status %s", proc.returncode)
            return proc.returncode or 1
        return await _shutdown(proc, cfg.grace)
    finally:
        restore()
        if proc.returncode is None:
            await _shutdown(proc, cfg.grace)
        store.clear_server_info(os.getpid())
        pidfile.unlink(missing_ok=True)
        if cfg.listen is None:
            # nbdkit leaves its Unix socket behind; a stale one would refuse the next server's bind.
            Path(listen_args[1]).unlink(missing_ok=True)


async def _wait_ready(proc: asyncio.subprocess.Process, pidfile: Path) -> bool:
    """nbdkit writes its pidfile once it accepts connections; it exits if it cannot start."""
    while not pidfile.exists():
        if proc.returncode is not None:
            return False
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(proc.wait()), 0.02)
    return True


async def _shutdown(proc: asyncio.subprocess.Process, grace: float) -> int:
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            log.warning("nbdkit did not stop within %.0fs; killing it", grace)
            proc.kill()
            await proc.wait()
    return 0


def _install_signal_handlers(stop: asyncio.Event) -> Callable[[], None]:
    loop = asyncio.get_running_loop()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in previous:
        loop.add_signal_handler(sig, stop.set)

    def restore() -> None:
        for sig, handler in previous.items():
            loop.remove_signal_handler(sig)
            signal.signal(sig, handler)

    return restore


def _remove_stale_socket(store: Store) -> None:
    try:
        store.server_info()
    except errors.ServerNotRunning:
        (store.path / "run" / SOCKET_NAME).unlink(missing_ok=True)
        return
    raise errors.NbdcloneError(detail=f"a server is already running for store {store.path}")
