"""Run the nbdclone workers (nbdkit processes with the nbdclone plugin) and watch them.

    run() -> serve():  startup   start one nbdkit per worker, each on its own socket, and wait until every
                                 pidfile says it accepts connections; write run/server.json; announce
                       main      wait for SIGTERM/SIGINT; a worker that dies is restarted (with backoff),
                                 and no other worker notices
                       shutdown  SIGTERM to every worker (nbdkit closes its connections and the plugin
                                 flushes and closes every overlay), wait up to `grace` seconds, then SIGKILL

One Python process cannot use more than about one core (the GIL), so clones are spread over workers: clone
NAME is served by worker worker_of(catalog, NAME, workers), on that worker's socket. `nbdclone uri NAME` says where.
Each worker runs one nbdkit thread per connection: with the GIL, more threads only add hand-offs (measured:
4 KiB random reads went from 18k to 43k requests/s with --threads 1 instead of 16).

uvloop is chosen here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import resource
import shutil
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvloop

import nbdclone
from nbdclone import errors
from nbdclone.store.cache import Evictor
from nbdclone.store.catalog import Catalog, Store, worker_of, write_atomic

log = logging.getLogger(__name__)

PLUGIN = Path(__file__).resolve().parent.parent.parent / "plugins" / "nbdclone.py"
SOCKET_NAME = "nbdclone.sock"


@dataclass(frozen=True, slots=True)
class ServeConfig:
    store: Path
    socket: Path | None = None
    listen: tuple[str, int] | None = None
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    threads: int = 1
    pin: bool = True
    cache_size: int = 1 << 30
    grace: float = 10.0
    verbose: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)

    def endpoint(self, worker: int = 0) -> tuple[list[str], str]:
        """Worker `worker`'s nbdkit listening arguments and URI template ({name} is the clone)."""
        if self.listen is not None:
            host, port = self.listen
            return ["--ipaddr", host, "--port", str(port + worker)], f"nbd://{_uri_host(host)}:{port + worker}/{{name}}"
        sock = (self.socket or (self.store / "run" / SOCKET_NAME)).absolute()
        if worker:
            sock = sock.with_name(f"{sock.name}.{worker}")
        if len(os.fsencode(sock)) > 107:
            raise errors.InvalidArgument(detail=f"socket path {sock} is longer than 107 bytes; use --socket")
        return ["--unix", str(sock)], f"nbd+unix:///{{name}}?socket={sock}"


def _uri_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def clone_uri(template: str, name: str) -> str:
    return template.replace("{name}", name)


def uri_of(info: Mapping[str, Any], cat: Catalog, name: str) -> str:
    """The URI of clone `name` on the server described by run/server.json."""
    templates = info["workers"]
    assert isinstance(templates, list)
    return clone_uri(templates[worker_of(cat, name, len(templates))]["uri"], name)


def plugin_pythonpath() -> str:
    """What the embedded interpreter needs on sys.path: this package and our virtualenv's libraries,
    but not our own interpreter's standard library (nbdkit embeds the system one)."""
    stdlib_roots = {sys.base_prefix, sys.base_exec_prefix}
    paths = [str(Path(nbdclone.__file__).resolve().parent.parent)]
    for p in sys.path:
        if p and not any(p.startswith(root + os.sep) for root in stdlib_roots) and p not in paths:
            paths.append(p)
    return os.pathsep.join(paths)


def nbdkit_command(cfg: ServeConfig, worker: int, pidfile: Path) -> list[str]:
    nbdkit = shutil.which("nbdkit")
    if nbdkit is None:
        raise errors.NbdcloneError(detail="nbdkit is not installed (apt install nbdkit nbdkit-plugin-python)")
    listen, _ = cfg.endpoint(worker)
    cmd = [nbdkit, "--foreground", "--exit-with-parent", "--pidfile", str(pidfile), *listen]
    cmd += ["--threads", str(cfg.threads)]
    if cfg.verbose:
        cmd.append("--verbose")
    plugin = [f"store={cfg.store.absolute()}", f"worker={worker}", f"workers={cfg.workers}"]
    if cfg.pin and cfg.workers > 1:
        cpus = sorted(os.sched_getaffinity(0))
        plugin.append(f"cpu={cpus[worker % len(cpus)]}")
    return [*cmd, "python", str(PLUGIN), *plugin]


@dataclass
class Worker:
    index: int
    uri: str
    pidfile: Path
    proc: asyncio.subprocess.Process | None = None
    started: float = 0.0
    backoff: float = 0.1


def run(cfg: ServeConfig, announce: Callable[[list[str]], None]) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit code. `announce(uri templates)` is called once, when ready."""
    _raise_open_file_limit()
    return uvloop.run(serve(cfg, announce))


def _raise_open_file_limit() -> None:
    """Each open clone holds a RocksDB database and a data file (a dozen descriptors): under the usual soft
    limit of 1,024, hundreds of clones opened at once ran out. The workers inherit the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (OSError, ValueError) as exc:
            log.warning("cannot raise the open-file limit from %d: %s", soft, exc)
            return
        log.info("open-file limit raised from %d to %d", soft, want)


async def serve(cfg: ServeConfig, announce: Callable[[list[str]], None]) -> int:
    store = Store(cfg.store)
    with store.lock():
        (store.path / "run").mkdir(parents=True, exist_ok=True)
    _refuse_second_server(store)
    await _reap_orphans(store, cfg.grace)
    if cfg.listen is None:
        for k in range(cfg.workers):
            _remove_stale_socket(Path(cfg.endpoint(k)[0][1]))
    env = {**os.environ, "PYTHONPATH": plugin_pythonpath(), **cfg.extra_env}
    workers = [
        Worker(k, cfg.endpoint(k)[1], store.path / "run" / f"worker-{os.getpid()}-{k}.pid") for k in range(cfg.workers)
    ]
    stop = asyncio.Event()
    restore = _install_signal_handlers(stop)
    try:
        for w in workers:
            if not await _start(w, cfg, env):
                return 1
        _write_info(store, workers)
        evictor = asyncio.ensure_future(_bound_cache(store, cfg.cache_size, stop))
        announce([w.uri for w in workers])
        while not stop.is_set():
            waits = {asyncio.ensure_future(w.proc.wait()): w for w in workers if w.proc is not None}
            stopper = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({stopper, *waits}, return_when=asyncio.FIRST_COMPLETED)
            for fut in waits:
                fut.cancel()
            stopper.cancel()
            if stop.is_set():
                break
            for fut in done:
                if fut in waits:
                    await _restart(waits[fut], cfg, env, stop)
            _write_info(store, workers)
        evictor.cancel()
        return 0
    finally:
        restore()
        await asyncio.gather(*(_shutdown(w, cfg.grace) for w in workers))
        store.clear_server_info(os.getpid())
        store.clock_path.unlink(missing_ok=True)  # access hints; the next server starts them afresh
        for w in workers:
            w.pidfile.unlink(missing_ok=True)
            if cfg.listen is None:
                # nbdkit leaves its Unix socket behind; a stale one would refuse the next server's bind.
                Path(cfg.endpoint(w.index)[0][1]).unlink(missing_ok=True)


async def _start(w: Worker, cfg: ServeConfig, env: dict[str, str]) -> bool:
    w.pidfile.unlink(missing_ok=True)
    w.proc = await asyncio.create_subprocess_exec(*nbdkit_command(cfg, w.index, w.pidfile), env=env)
    w.started = time.monotonic()
    while not w.pidfile.exists():  # nbdkit writes its pidfile once it accepts connections
        if w.proc.returncode is not None:
            log.error("worker %d (nbdkit) exited with status %s while starting", w.index, w.proc.returncode)
            return False
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(w.proc.wait()), 0.02)
    return True


async def _restart(w: Worker, cfg: ServeConfig, env: dict[str, str], stop: asyncio.Event) -> None:
    assert w.proc is not None
    log.error("worker %d (nbdkit pid %d) exited with status %s; restarting it", w.index, w.proc.pid, w.proc.returncode)
    # Crash-looping workers back off (0.1 s doubling to 5 s); one that ran a while restarts at once.
    w.backoff = w.backoff * 2 if time.monotonic() - w.started < 10 else 0.1
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), min(w.backoff, 5.0))
    if not stop.is_set():
        if cfg.listen is None:
            Path(cfg.endpoint(w.index)[0][1]).unlink(missing_ok=True)
        await _start(w, cfg, env)


async def _bound_cache(store: Store, limit: int, stop: asyncio.Event) -> None:
    """Keep the shared read cache (the pack's pages in memory) under `limit`, once a second."""
    evictor = Evictor(store.chunks.pack, store.clock_path, limit)
    path = store.path / "run" / "stats-cache.json"
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        try:
            resident = await loop.run_in_executor(None, evictor.run_once)
            stats = {
                "limit": limit,
                "resident_bytes": resident,
                "evictions": evictor.evictions,
                "evicted_bytes": evictor.evicted_bytes,
            }
            await loop.run_in_executor(None, write_atomic, path, json.dumps(stats), path.parent)
        except OSError as exc:
            log.warning("cache bound: %s", exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


def _write_info(store: Store, workers: list[Worker]) -> None:
    try:
        store.write_server_info(
            {
                "pid": os.getpid(),
                "workers": [{"pid": w.proc.pid if w.proc else 0, "uri": w.uri} for w in workers],
            }
        )
    except OSError as exc:  # a full disk must not stop the server: clients keep their connections
        log.error("cannot record this server (%s): `nbdclone uri` will not find it", exc)


async def _shutdown(w: Worker, grace: float) -> None:
    proc = w.proc
    if proc is None or proc.returncode is not None:
        return
    proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), grace)
    except TimeoutError:
        log.warning("worker %d did not stop within %.0fs; killing it", w.index, grace)
        proc.kill()
        await proc.wait()


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


def _refuse_second_server(store: Store) -> None:
    """One server per store: a clone's overlay can be open in one process only."""
    try:
        info = store.server_info()
    except errors.ServerNotRunning:
        return
    raise errors.NbdcloneError(detail=f"a server (pid {info['pid']}) is already running for store {store.path}")


async def _reap_orphans(store: Store, grace: float) -> None:
    """Workers of a server that was killed: `--exit-with-parent` sent them SIGTERM, and they may still be
    closing their clones (and holding their overlays and sockets). Wait for them, then kill what is left."""
    for pidfile in (store.path / "run").glob("worker-*-*.pid"):
        supervisor = int(pidfile.name.split("-")[1])
        if supervisor == os.getpid() or Path(f"/proc/{supervisor}").exists():
            continue
        try:
            pid = int(pidfile.read_text().strip())
            alive = b"nbdkit" in Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            alive = False
        if alive:
            log.info("waiting for worker %d of the server (pid %d) that stopped without cleaning up", pid, supervisor)
            deadline = time.monotonic() + grace
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if Path(f"/proc/{pid}").exists():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)  # acknowledged writes survive this (overlay I2)
                while Path(f"/proc/{pid}").exists():
                    await asyncio.sleep(0.05)
        pidfile.unlink(missing_ok=True)


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
