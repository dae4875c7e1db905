"""Run the nbdclone workers (nbdkit processes with the nbdclone plugin) and watch them.

    run() -> serve():  startup   take the store's server lock; bind every slot's socket (or take them from
                                 systemd); start one nbdkit per worker with its slots' sockets (socket
                                 activation) and wait until each accepts; write run/server.json; announce
       main loop                 a worker that dies is restarted (with backoff); SIGHUP (or `nbdclone
                                 reload`) restarts the workers one at a time, which loads new code
       SIGTERM/SIGINT            every worker is asked to stop (process.Drain: in-flight requests finish,
                                 clones are flushed and closed, connections drop unanswered), then the
                                 sockets close; a worker still there after `grace` seconds is killed
       its own death             the workers serve on; the next serve adopts them (adopt.py)

The listening sockets belong to the supervisor (sockets.py), so no worker restart or reload refuses a
connection: it waits in the backlog. One Python process cannot use more than about one core (the GIL),
so clones are spread over workers by slot (runtime.py): worker k serves the slots s with s % workers == k.
Each worker runs one nbdkit thread per connection: with the GIL, more threads only add hand-offs (measured:
4 KiB random reads went from 18k to 43k requests/s with --threads 1 instead of 16).

uvloop is chosen here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import ipaddress
import json
import logging
import os
import resource
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvloop

import nbdclone
from nbdclone import errors
from nbdclone.fleet import config as fleet_config
from nbdclone.runtime import SLOTS, Address, RunDir
from nbdclone.store import Store
from nbdclone.store.cache import Evictor
from nbdclone.store.catalog import Catalog, slot_of
from nbdclone.store.layout import write_atomic
from nbdclone.supervisor import adopt, sockets
from nbdclone.supervisor.sockets import Access

log = logging.getLogger(__name__)

PLUGIN = Path(nbdclone.__file__).resolve().parent / "worker" / "nbdkit_plugin.py"


@dataclass(frozen=True, slots=True)
class Security:
    """What nbdkit enforces on every connection: TLS, an address allow-list, the clients per worker."""

    tls: str = "off"  # off | on | require
    tls_certificates: Path | None = None
    tls_psk: Path | None = None
    allow: tuple[str, ...] = ()  # checked rules (allow_rules): addresses and networks, or uid:N / gid:N
    max_connections: int = 0  # per worker; 0: no cap
    max_client_connections: int = 0  # per client (IP address, or uid on a Unix socket) per worker; 0: no cap
    handshake_timeout: float = 10.0  # seconds a connection may take to open a clone; 0: no limit
    exclusive: bool = False
    readonly: bool = False

    def nbdkit_args(self) -> tuple[list[str], list[str], list[str]]:
        """(nbdkit options, filters, filter parameters)."""
        opts: list[str] = []
        if self.tls != "off":
            opts.append(f"--tls={self.tls}")
            if self.tls_psk is not None:
                opts.append(f"--tls-psk={self.tls_psk.absolute()}")
            if self.tls_certificates is not None:
                opts.append(f"--tls-certificates={self.tls_certificates.absolute()}")
        filters, params = ["--filter=blocksize-policy"], ["blocksize-error-policy=error"]
        peers = [rule for rule in self.allow if rule.startswith(("uid:", "gid:"))]
        if peers:  # (Unix sockets; addresses are the plugin's: nbdkit 1.32's ip filter parses none of them)
            filters.append("--filter=ip")
            params += [f"allow={','.join(peers)}", "deny=all"]
        if self.max_connections:
            filters.append("--filter=limit")
            params.append(f"limit={self.max_connections}")
        return opts, filters, params


@dataclass(frozen=True, slots=True)
class ServeConfig:
    store: Path
    address: Address | None = None  # None: the store's default (Unix sockets in STORE/run)
    workers: int = field(default_factory=lambda: min(os.cpu_count() or 1, SLOTS))
    threads: int = 1
    pin: bool = True
    cache_size: int = 1 << 30
    grace: float = 10.0
    verbose: bool = False
    access: Access = field(default_factory=Access)
    security: Security = field(default_factory=Security)
    metrics: tuple[str, int] | None = None
    metrics_names: bool = True  # clone names as labels (else series summed over clones)
    metrics_token: str | None = None  # a bearer token every scrape must carry
    metrics_tls: tuple[Path, Path] | None = None  # HTTPS: certificate and key (PEM)
    log_level: str = "info"
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def where(self) -> Address:
        return self.address or Address(self.store)

    def slots(self, worker: int) -> list[int]:
        return [s for s in range(SLOTS) if s % self.workers == worker]


def uri_of(info: Mapping[str, Any], cat: Catalog, name: str) -> str:
    """The URI of clone `name` for a server described by `info` (run/server.json or saved settings)."""
    return Address.from_json(Path(info["store"]), info["address"]).uri(slot_of(cat, name), name)


def address_of(store: Store) -> Address:
    """Where the store's clones listen: the running server's address, else the last server's."""
    run = RunDir(store.path)
    try:
        info = store.server_info()
        return Address.from_json(store.path, info["address"])
    except (errors.ServerNotRunning, KeyError, TypeError):
        return run.saved_address()


def plugin_pythonpath() -> str:
    """What the embedded interpreter needs on sys.path: this package and our virtualenv's libraries,
    but not our own interpreter's standard library (nbdkit embeds the system one)."""
    stdlib_roots = {sys.base_prefix, sys.base_exec_prefix}
    paths = [str(Path(nbdclone.__file__).resolve().parent.parent)]
    for p in sys.path:
        if p and not any(p.startswith(root + os.sep) for root in stdlib_roots) and p not in paths:
            paths.append(p)
    return os.pathsep.join(paths)


def nbdkit_command(cfg: ServeConfig, worker: int, pidfile: Path, nlisteners: int) -> list[str]:
    nbdkit = shutil.which("nbdkit")
    if nbdkit is None:
        raise errors.NbdcloneError(detail="nbdkit is not installed (apt install nbdkit nbdkit-plugin-python)")
    opts, filters, params = cfg.security.nbdkit_args()
    cmd = [nbdkit, "--foreground", "--pidfile", str(pidfile), "--threads", str(cfg.threads), *opts, *filters]
    if cfg.verbose:
        cmd.append("--verbose")
    plugin = [
        f"store={cfg.store.absolute()}",
        f"worker={worker}",
        f"workers={cfg.workers}",
        f"listeners={nlisteners}",
        f"control={3 + nlisteners}",
        f"log-level={cfg.log_level}",
    ]
    if cfg.security.exclusive:
        plugin.append("exclusive=true")
    if cfg.security.handshake_timeout:
        plugin.append(f"handshake-timeout={cfg.security.handshake_timeout}")
    if cfg.security.max_client_connections:
        plugin.append(f"per-client={cfg.security.max_client_connections}")
    if cfg.security.readonly:
        plugin.append("readonly=true")
    if networks := [rule for rule in cfg.security.allow if not rule.startswith(("uid:", "gid:"))]:
        plugin.append(f"allow={','.join(networks)}")
    if cfg.pin and cfg.workers > 1:
        cpus = sorted(os.sched_getaffinity(0))
        plugin.append(f"cpu={cpus[worker % len(cpus)]}")
    return [*cmd, "python", str(PLUGIN), *plugin, *params]


# Starts a worker: puts the descriptors it is given at 3, 4, ... (socket activation: the slots' sockets,
# then the control pipe), sets LISTEN_PID to its own pid (nbdkit takes sockets only from its own pid), and
# becomes nbdkit. A separate program, because descriptors cannot be moved safely between fork and exec here.
_LAUNCH = """
import fcntl, os, sys
split = sys.argv.index("--")
fds = [int(a) for a in sys.argv[1:split]]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3 + len(fds)) for fd in fds]
for k, fd in enumerate(high):
    os.dup2(fd, 3 + k)
for fd in fds:
    if fd >= 3 + len(fds):
        os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[split + 1], sys.argv[split + 1:])
"""


@dataclass
class Worker:
    index: int
    pidfile: Path
    proc: asyncio.subprocess.Process | adopt.Adopted | None = None
    control: int | None = None  # write end of its control pipe (an adopted worker's: its control socket)
    started: float = 0.0
    backoff: float = 0.1


def run(cfg: ServeConfig, announce: Callable[[Address], None]) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit code. `announce(address)` is called once, when ready."""
    if not 1 <= cfg.workers <= SLOTS:
        raise errors.InvalidArgument(detail=f"--workers {cfg.workers}: use 1 to {SLOTS}")
    _raise_open_file_limit(cfg.workers)
    return uvloop.run(serve(cfg, announce))


#: Descriptors an open clone holds in a worker (its RocksDB files, data file and journal, a connection):
#: what the open-file limit is divided by to say how many clones can be open at once.
FDS_PER_CLONE = 16
#: Fewer clones than this open at once per server at its open-file limit: a warning at start.
WARN_BELOW = 1000


def _raise_open_file_limit(workers: int) -> None:
    """Each open clone holds a RocksDB database and a data file (a dozen descriptors): under the usual soft
    limit of 1,024, hundreds of clones opened at once ran out. The workers inherit the hard limit; a hard
    limit too low for WARN_BELOW clones is called out (clients past it are refused at their handshake)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (OSError, ValueError) as exc:
            log.warning("cannot raise the open-file limit from %d: %s", soft, exc)
        else:
            log.info("open-file limit raised from %d to %d", soft, want)
            soft = want
    clones = max(0, soft - 64) // FDS_PER_CLONE * workers
    if clones < WARN_BELOW:
        log.warning(
            "the open-file limit is %d: about %d clones can be open at once (%d descriptors each); raise the "
            "hard limit (LimitNOFILE= in the unit, ulimit -Hn) to serve more",
            soft,
            clones,
            FDS_PER_CLONE,
        )


class Supervisor:
    def __init__(self, cfg: ServeConfig, listeners: list[socket.socket]) -> None:
        self.cfg = cfg
        self.store = Store(cfg.store)
        self.run = RunDir(cfg.store)
        self.listeners = listeners
        self.env = {**os.environ, "PYTHONPATH": plugin_pythonpath(), **cfg.extra_env}
        self.workers = [Worker(k, self.run.pidfile(os.getpid(), k)) for k in range(cfg.workers)]
        self.restarts = 0

    async def start(self, w: Worker) -> bool:
        w.pidfile.unlink(missing_ok=True)
        fds = [self.listeners[s].fileno() for s in self.cfg.slots(w.index)]
        read_end, w.control = os.pipe()
        passed = [*fds, read_end]

        try:
            w.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-I",
                "-S",
                "-c",
                _LAUNCH,
                *map(str, passed),
                "--",
                *nbdkit_command(self.cfg, w.index, w.pidfile, len(fds)),
                env={**self.env, "LISTEN_FDS": str(len(fds))},
                pass_fds=passed,
            )
        finally:
            os.close(read_end)
        w.started = time.monotonic()
        while not w.pidfile.exists():  # nbdkit writes its pidfile once it accepts connections
            if w.proc.returncode is not None:
                log.error("worker %d (nbdkit) exited with status %s while starting", w.index, w.proc.returncode)
                return False
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(w.proc.wait()), 0.02)
        log.info("worker %d (pid %d) serves slots %s", w.index, w.proc.pid, self.cfg.slots(w.index))
        return True

    async def restart(self, w: Worker, stop: asyncio.Event) -> None:
        assert w.proc is not None
        log.error("worker %d (pid %d) exited with status %s; restarting it", w.index, w.proc.pid, w.proc.returncode)
        self.restarts += 1
        self._close_control(w)
        # Crash-looping workers back off (0.1 s doubling to 5 s); one that ran a while restarts at once.
        w.backoff = w.backoff * 2 if time.monotonic() - w.started < 10 else 0.1
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), min(w.backoff, 5.0))
        if not stop.is_set():
            await self.start(w)

    async def stop(self, w: Worker) -> None:
        """Ask worker `w` to stop (process.Drain) and wait for it; kill it after the grace time."""
        proc = w.proc
        if proc is None or proc.returncode is not None:
            self._close_control(w)
            return
        if w.control is not None:
            with contextlib.suppress(OSError):
                os.write(w.control, b"stop\n")
        self._close_control(w)
        try:
            await asyncio.wait_for(proc.wait(), self.cfg.grace)
        except TimeoutError:
            log.warning("worker %d did not stop within %.0fs; killing it", w.index, self.cfg.grace)
            proc.kill()  # acknowledged writes survive this (overlay I2)
            await proc.wait()
        w.pidfile.unlink(missing_ok=True)

    async def reload(self) -> None:
        """Restart the workers one at a time (new code, same sockets): clients of a worker reconnect to its
        successor, and connections made meanwhile wait in the backlog."""
        sockets.notify("RELOADING=1")
        log.info("reloading: restarting %d worker(s) one at a time", len(self.workers))
        for w in self.workers:
            await self.stop(w)
            if not await self.start(w):
                log.error("worker %d did not start again; the supervisor will keep trying", w.index)
            self.write_info()
        sockets.notify("READY=1")
        log.info("reloaded")

    def adopt(self, orphans: list[adopt.Orphan]) -> None:
        """Take the workers of a server that died as this one's (adopt.py): they serve on, untouched."""
        for o in orphans:
            w = self.workers[o.index]
            w.proc = adopt.Adopted(o.pid)
            assert o.control is not None
            w.control = o.control.detach()
            o.control = None
            try:
                w.pidfile.write_text(f"{o.pid}\n")
            except OSError as exc:  # (a full disk: this server knows it anyway)
                log.error("cannot record adopted worker %d: %s", o.pid, exc)
            w.started = time.monotonic()
            adopt.release(o, keep=self.listeners)  # (the listeners are this server's now, or systemd's copies)
            log.info("adopted worker %d (pid %d) of a server that died: its clients saw nothing", w.index, o.pid)

    @staticmethod
    def _close_control(w: Worker) -> None:
        if w.control is not None:
            os.close(w.control)
            w.control = None

    def write_info(self) -> None:
        try:
            self.store.write_server_info(
                {
                    "pid": os.getpid(),
                    "store": str(self.cfg.store.absolute()),
                    "address": self.cfg.where.to_json(),
                    "metrics": list(self.cfg.metrics) if self.cfg.metrics else None,
                    "restarts": self.restarts,
                    "workers": [
                        {"pid": w.proc.pid if w.proc else 0, "slots": self.cfg.slots(w.index)} for w in self.workers
                    ],
                }
            )
        except OSError as exc:  # a full disk must not stop the server: clients keep their connections
            log.error("cannot record this server (%s): `nbdclone stats` will not find it", exc)


async def serve(cfg: ServeConfig, announce: Callable[[Address], None]) -> int:
    store = Store(cfg.store)
    store.make()  # (refuses a folder that is not a store before anything in it changes)
    run_dir = RunDir(cfg.store)
    with _server_lock(run_dir, store):
        sockets.make_private(cfg.store, cfg.access)
        orphans = await adopt.find_orphans(run_dir)  # workers of a server that died: taken over if they fit
        adopted = adopt.fitting_listeners(orphans, cfg.where, [cfg.slots(k) for k in range(cfg.workers)])
        if adopted is None:
            await adopt.stop_orphans(orphans, cfg.grace)
            orphans = []
        systemd = sockets.inherited()
        # (a Unix socket is a new inode: on a full XFS or btrfs the reserve makes room for them)
        bind = functools.partial(sockets.bind, cfg.where, cfg.access)
        listeners = systemd or adopted or store.with_room("the server's sockets", bind)
        try:
            write_atomic(run_dir.settings, json.dumps(cfg.where.to_json()), store.tmp)
        except OSError as exc:  # a full disk: serve anyway
            log.error("cannot record the address settings (%s): 'nbdclone uri' may give the old ones", exc)
        _warn_if_exposed(cfg)
        if gone := store.collect_journals():
            log.info("removed %d journal(s) of overlays that no longer exist", gone)
        sup = Supervisor(cfg, listeners)
        sup.adopt(orphans)
        stop = asyncio.Event()
        reload = asyncio.Event()
        restore = _install_signal_handlers(stop, reload)
        metrics = None
        fleet = fleet_config.load(cfg.store)
        fetching: asyncio.Future[Any] | None = None
        fetched = asyncio.Event()  # the fetcher stops after the workers (a draining request may need a chunk)
        try:
            if fleet is not None:  # before any worker: a clone of a staged version may need chunks at once
                from nbdclone.fleet.fetch import Fetcher, serve_fetches

                fetcher = Fetcher(cfg.store, fleet)
                listening = asyncio.Event()
                fetching = asyncio.ensure_future(serve_fetches(cfg.store, fetcher, listening, fetched))
                await asyncio.wait({fetching, asyncio.ensure_future(listening.wait())}, return_when="FIRST_COMPLETED")
                if fetching.done():
                    fetching.result()  # it could not listen: say why
            for w in sup.workers:
                if w.proc is None and not await sup.start(w):
                    return 1
            sup.write_info()
            if cfg.metrics is not None:
                from nbdclone.supervisor.metrics import serve_metrics

                metrics = serve_metrics(
                    cfg.metrics, store, run_dir, names=cfg.metrics_names, token=cfg.metrics_token, tls=cfg.metrics_tls
                )
            evictor: asyncio.Future[Any] = asyncio.ensure_future(_bound_cache(store, run_dir, cfg.cache_size, stop))
            if fleet is not None:  # this host follows its fleet's flips (its own store object: a thread's)
                from nbdclone.fleet.follow import follow, leased, resume_lease

                lease = await resume_lease(run_dir, fleet)
                evictor = asyncio.gather(evictor, follow(Store(cfg.store), fleet, stop, fetcher, lease))
                await leased(run_dir, fleet)  # "ready" means its clones can be opened
            announce(cfg.where)
            sockets.notify("READY=1")
            while not stop.is_set():
                waits = {asyncio.ensure_future(w.proc.wait()): w for w in sup.workers if w.proc is not None}
                wakers = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(reload.wait())}
                done, _ = await asyncio.wait({*wakers, *waits}, return_when=asyncio.FIRST_COMPLETED)
                for fut in (*waits, *wakers):
                    fut.cancel()
                if stop.is_set():
                    break
                if reload.is_set():
                    reload.clear()
                    await sup.reload()
                    continue
                for fut in done:
                    if fut in waits:
                        await sup.restart(waits[fut], stop)
                sup.write_info()
            evictor.cancel()
            return 0
        finally:
            sockets.notify("STOPPING=1")
            restore()
            await asyncio.gather(*(sup.stop(w) for w in sup.workers))
            if fetching is not None:
                fetched.set()
                await asyncio.gather(fetching, return_exceptions=True)
            if metrics is not None:
                metrics.shutdown()
            store.clear_server_info(os.getpid())
            store.clock_path.unlink(missing_ok=True)  # access hints; the next server starts them afresh
            for w in sup.workers:
                w.pidfile.unlink(missing_ok=True)
                run_dir.worker_stats(w.index).unlink(missing_ok=True)
            # systemd's sockets stay with systemd, and the next start takes them again.
            sockets.close(listeners, cfg.where, unlink=systemd is None)


@contextlib.contextmanager
def _server_lock(run_dir: RunDir, store: Store) -> Any:
    """One server per store: a clone's overlay can be open in one process only. Two started at once: the
    second is refused before it touches the first one's sockets."""
    run_dir.path.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(run_dir.server_lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise errors.NbdcloneError(
                detail=f"a server (pid {holder}) is already running for store {store.path}"
            ) from None
        with contextlib.suppress(OSError):  # who holds it, for the message above; a full disk must not stop us
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def allow_rules(rules: list[str], tcp: bool) -> tuple[str, ...]:
    """--allow's rules, checked and written the one way the workers read them: addresses and networks
    (IPv4, IPv6) for TCP, uid:N and gid:N for Unix sockets. A bad rule is refused in one line."""
    checked = []
    for rule in rules:
        kind, _, number = rule.partition(":")
        if kind in ("uid", "gid") and number.isdigit():
            if tcp:
                raise errors.InvalidArgument(detail=f"--allow {rule}: uid: and gid: rules are for Unix sockets")
            checked.append(f"{kind}:{int(number)}")
            continue
        try:
            network = ipaddress.ip_network(rule, strict=False)
        except ValueError:
            raise errors.InvalidArgument(
                detail=f"--allow {rule!r}: give an address or a network (10.0.0.0/8, fd00::/8), or uid:N or gid:N"
            ) from None
        if not tcp:
            raise errors.InvalidArgument(detail=f"--allow {rule}: addresses are for TCP (--listen); use uid:N or gid:N")
        checked.append(str(network))
    return tuple(checked)


def _warn_if_exposed(cfg: ServeConfig) -> None:
    address = cfg.where
    if address.listen is None or cfg.security.tls == "require" or cfg.security.allow:
        return
    host = address.listen[0]
    local = False
    with contextlib.suppress(ValueError):
        local = ipaddress.ip_address(host).is_loopback
    log.warning(
        "listening on %s:%d-%d without --tls=require or --allow: %s can read and write every clone of %s",
        host,
        address.listen[1],
        address.listen[1] + SLOTS - 1,
        "every local user (Unix sockets keep clones to their owner)" if local else "anyone who can reach these ports",
        cfg.store,
    )


async def _bound_cache(store: Store, run_dir: RunDir, limit: int, stop: asyncio.Event) -> None:
    """Keep the shared read cache (the pack's pages in memory) under `limit`, once a second."""
    evictor = Evictor(store.chunks.pack, store.clock_path, limit)
    path = run_dir.cache_stats
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


def _install_signal_handlers(stop: asyncio.Event, reload: asyncio.Event) -> Callable[[], None]:
    loop = asyncio.get_running_loop()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload.set)

    def restore() -> None:
        for sig, handler in previous.items():
            loop.remove_signal_handler(sig)
            signal.signal(sig, handler)

    return restore
