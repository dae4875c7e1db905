"""nbdclone against its peers, interleaved, same fio workloads; prints one table of medians and ratios.

Servers: nbdkit's file plugin on the raw base (the reference), nbdkit file + cow filter, qemu-nbd over
qcow2 overlays backed by the raw base, a do-nothing Python plugin on the same nbdkit, and nbdclone.
Where a workload needs N clones, each copy-on-write peer runs N processes (one per clone, as one would
deploy them), the file plugin serves N connections to its one file, and nbdclone serves N clones.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv" / "bin"
TRACE = ROOT.parent / "shared" / "traces" / "linux-boot.fio.iolog"
MiB = 1 << 20
PRIME = 1536 * MiB  # memory touched before each write run: more than one run's new pages
CLK = os.sysconf("SC_CLK_TCK")
#: Where servers and fio run (--pin): the servers on the last core, fio on the others; every server alike,
#: so a round's ratios compare servers, not the scheduler's choices (unpinned, the file plugin's 4 KiB reads
#: ranged 56k-123k IOPS across the rounds of one run).
PIN: dict[str, list[str]] = {"server": [], "fio": []}
QUICK = ("4 KiB random read", "4 KiB random write", "1 MiB sequential write")


def pin(cores: bool) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    if cores and len(cpus) >= 2 and shutil.which("taskset"):
        PIN["server"] = ["taskset", "-c", str(cpus[-1])]
        PIN["fio"] = ["taskset", "-c", ",".join(map(str, cpus[:-1]))]


# -- servers ---------------------------------------------------------------------------------------------


def wait_for(path: Path, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.02)


@dataclass
class Server:
    name: str
    work: Path
    base: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    sockets: list[Path] = field(default_factory=list)

    def start(self, n: int) -> None:
        raise NotImplementedError

    def uris(self, n: int) -> list[str]:
        return [f"nbd+unix:///?socket={s}" for s in self.sockets[:n]] * (n // max(1, len(self.sockets[:n])))

    def pids(self) -> list[int]:
        out = []
        for p in self.procs:
            out.append(p.pid)
            try:
                out += [int(c) for c in Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()]
            except FileNotFoundError:
                pass
        return out

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
        for s in self.sockets:
            s.unlink(missing_ok=True)
        self.sockets.clear()

    def _nbdkit(self, sock: Path, *args: str) -> None:
        pid = sock.with_suffix(".pid")
        pid.unlink(missing_ok=True)
        cmd = [*PIN["server"], "nbdkit", "--foreground", "--unix", str(sock), "--pidfile", str(pid), *args]
        p = subprocess.Popen(cmd)
        self.procs.append(p)
        self.sockets.append(sock)
        wait_for(pid, p, self.name)


class FilePlugin(Server):
    """nbdkit's C file plugin on its own copy of the raw base: N connections to one export."""

    def start(self, n: int) -> None:
        copy = self.work / "file-copy.raw"
        if not copy.exists():
            subprocess.run(["cp", "--sparse=always", str(self.base), str(copy)], check=True)
        self._nbdkit(self.work / "file.sock", "file", f"file={copy}")

    def uris(self, n: int) -> list[str]:
        return [f"nbd+unix:///?socket={self.sockets[0]}"] * n


class PythonNull(FilePlugin):
    """A Python plugin whose callbacks do nothing, with nbdkit's default threads and with one per
    connection (what nbdclone runs): the ceiling of any Python plugin."""

    threads: ClassVar[list[str]] = []

    def start(self, n: int) -> None:
        size = self.base.stat().st_size
        self._nbdkit(
            self.work / "pynull.sock", *self.threads, "python", str(ROOT / "scripts" / "null_plugin.py"), f"size={size}"
        )


class CowFilter(Server):
    """nbdkit file + cow filter: one process (one overlay) per clone."""

    def start(self, n: int) -> None:
        for i in range(n):
            self._nbdkit(self.work / f"cow{i}.sock", "--filter=cow", "file", f"file={self.base}")

    def uris(self, n: int) -> list[str]:
        return [f"nbd+unix:///?socket={s}" for s in self.sockets[:n]]


class QemuNbd(Server):
    """qemu-nbd over a qcow2 overlay backed by the raw base (writeback cache): one process per clone."""

    def start(self, n: int) -> None:
        for i in range(n):
            ov, sock, pid = self.work / f"qemu{i}.qcow2", self.work / f"qemu{i}.sock", self.work / f"qemu{i}.pid"
            ov.unlink(missing_ok=True)
            pid.unlink(missing_ok=True)
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(self.base), "-F", "raw", str(ov)], check=True
            )
            p = subprocess.Popen(
                [
                    *PIN["server"],
                    "qemu-nbd",
                    "--persistent",
                    "--shared=0",
                    "--format=qcow2",
                    "--cache=writeback",
                    f"--socket={sock}",
                    f"--pid-file={pid}",
                    str(ov),
                ]
            )
            self.procs.append(p)
            self.sockets.append(sock)
            wait_for(pid, p, self.name)
            wait_for(sock, p, self.name)

    def uris(self, n: int) -> list[str]:
        return [f"nbd+unix:///?socket={s}" for s in self.sockets[:n]]


class Nbdclone(Server):
    """nbdclone serving N clones of the base from one store. Boot storms use clones of a second base with
    the same content (stored once), whose boot trace is recorded by one replay before the rounds start."""

    extra: ClassVar[list[str]] = []
    trace: ClassVar[Path] = TRACE
    prefix = "c"

    def setup(self) -> None:
        store = self.work / "store"
        cli = [str(VENV / "nbdclone")]
        for base, prefix in (("base", "c"), ("boot", "b")):
            subprocess.run(
                [*cli, "base", "import", base, str(self.base), "--store", str(store)], check=True, capture_output=True
            )
            subprocess.run(
                [*cli, "clone", "create", *[f"{prefix}{i}" for i in range(64)], "--base", base, "--store", str(store)],
                check=True,
                capture_output=True,
            )
        self.prefix = "b"
        self.start(1)
        try:
            run_fio(
                Workload("record", 1, [f"--read_iolog={self.trace}", "--replay_no_stall=1"], "s"),
                self.uris(1),
                self.work / "fio.json",
            )
        finally:
            self.stop()  # the recording is written when the version closes

    def start(self, n: int) -> None:
        store = self.work / "store"
        cli = [str(VENV / "nbdclone")]
        for i in range(n):  # a fresh overlay for every run
            subprocess.run(
                [*cli, "clone", "reset", f"{self.prefix}{i}", "--store", str(store)], check=True, capture_output=True
            )
        sock = self.work / "nbdclone.sock"
        p = subprocess.Popen(
            [*PIN["server"], *cli, "serve", "--store", str(store), "--socket", str(sock), *self.extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self.procs.append(p)
        self.sockets.append(sock)
        assert p.stdout is not None
        for line in p.stdout:
            if line.startswith(b"nbdclone: serving"):
                break
        else:
            raise RuntimeError("nbdclone serve exited")
        self.store = store

    def uris(self, n: int) -> list[str]:
        cli = [str(VENV / "nbdclone")]
        return [
            subprocess.run(
                [*cli, "uri", f"{self.prefix}{i}", "--store", str(self.store)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()
            for i in range(n)
        ]

    def pids(self) -> list[int]:
        out = []
        for p in self.procs:
            out.append(p.pid)
            out += _descendants(p.pid)
        return out


def _descendants(pid: int) -> list[int]:
    out = []
    try:
        kids = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return out
    for k in kids:
        out.append(k)
        out += _descendants(k)
    return out


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLK


def rss_bytes(pids: list[int]) -> int:
    """Private memory (anonymous + shared memory) of the server processes. Page-cache pages a server maps
    (nbdclone maps its chunk file) are left out, as they are for servers that read through the page cache."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(("RssAnon:", "RssShmem:")):
                    total += int(line.split()[1]) * 1024
        except FileNotFoundError:
            pass
    return total


# -- workloads -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    name: str
    clones: int
    fio: list[str]
    unit: str  # "IOPS", "MB/s" or "s" (time to finish: lower is better)
    cold: bool = False


def workloads(seconds: int, size: int, storms: list[int], trace: Path = TRACE) -> list[Workload]:
    timed = ["--time_based", f"--runtime={seconds}", "--ramp_time=1", f"--size={size}", "--iodepth=32"]
    out = [
        Workload("4 KiB random read", 1, [*timed, "--rw=randread", "--bs=4k"], "IOPS"),
        Workload("64 KiB sequential read", 1, [*timed, "--rw=read", "--bs=64k"], "MB/s"),
        Workload("4 KiB random write", 1, [*timed, "--rw=randwrite", "--bs=4k"], "IOPS"),
        Workload("1 MiB sequential write", 1, [*timed, "--rw=write", "--bs=1M", "--iodepth=8"], "MB/s"),
        # A guest's steady state: the same 64 MiB rewritten, a flush every 64 writes (blocks written before
        # the last flush are rewritten in place).
        Workload(
            "4 KiB random rewrite, flushes",
            1,
            [*timed[:-2], "--size=64M", "--iodepth=32", "--rw=randwrite", "--bs=4k", "--fsync=64"],
            "IOPS",
        ),
        Workload("8 clones, 4 KiB random read", 8, [*timed, "--rw=randread", "--bs=4k"], "IOPS"),
    ]
    replay = [f"--read_iolog={trace}", "--replay_no_stall=1"]
    for n in storms:
        out.append(Workload(f"boot storm x{n}, warm", n, replay, "s"))
        out.append(Workload(f"boot storm x{n}, cold", n, replay, "s", cold=True))
    return out


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def prime_memory(nbytes: int) -> None:
    """Touch `nbytes` of memory and free it again, so the page-cache pages a writing server allocates next
    are ones the VM's host backs. This VM reports free memory to its host (free page reporting), and the
    first touch of a reported page costs a host fault. Every copy-on-write server here writes into new
    pages (the file plugin rewrites pages it has); nbdclone, one thread per connection, cannot overlap such
    stalls, and its 4 KiB random writes ran at 35-58k or 67-92k per second from round to round (profile:
    `copy_folio_from_iter_atomic` at 15.6 against 2.6 us per write). Priming made slow rounds rarer (7 of 9
    without it, 3 of 15 with it), not gone."""
    chunk = b"\1" * MiB
    with mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) as m:
        for off in range(0, nbytes, MiB):
            m[off : off + MiB] = chunk


REPORTED = Path("/sys/module/page_reporting/parameters/reported_kib")


def reported_mib() -> float:
    """MiB of free memory this VM has handed back to its host so far (0 where the kernel does not say).
    Here the host's agent sets `min_free_ms` to 0: pages are reported as soon as they are free, and the
    first touch of a reported page is a host fault (measured: new page-cache pages of a sparse file cost
    240 us per MiB when the guest still backs them, 1.5-2.7 ms after they were reported; a rewrite 0.2 ms).
    A write run during which the host took much back is the machine's slow round, not the server's."""
    try:
        return int(REPORTED.read_text()) / 1024
    except (OSError, ValueError):
        return 0.0


def run_fio(w: Workload, uris: list[str], out: Path) -> tuple[float, int, float]:
    """(result in w.unit, number of I/Os, wall seconds)."""
    cmd = [*PIN["fio"], "fio", "--ioengine=nbd", "--output-format=json", f"--output={out}", "--group_reporting"]
    for i, uri in enumerate(uris):
        cmd += [f"--name=j{i}", f"--uri={uri}", *w.fio]
    t = time.monotonic()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.monotonic() - t
    job = json.loads(out.read_text())["jobs"][0]
    ios = job["read"]["total_ios"] + job["write"]["total_ios"]
    if w.unit == "IOPS":
        return job["read"]["iops"] + job["write"]["iops"], ios, wall
    if w.unit == "MB/s":
        return (job["read"]["bw_bytes"] + job["write"]["bw_bytes"]) / 1e6, ios, wall
    return wall, ios, wall


# -- main ------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians are taken over them)")
    ap.add_argument("--seconds", type=int, default=5, help="duration of each timed fio run")
    ap.add_argument("--size", default="1G", help="size of the base image (at least 256M for the boot trace)")
    ap.add_argument("--storms", default="1,8,32", help="boot storm sizes")
    ap.add_argument("--only", default="", help="run only workloads whose name contains this")
    ap.add_argument("--servers", default="file,cow,qemu-nbd,python-null,python-null-t1,nbdclone")
    ap.add_argument("--nbdclone-args", default="", help="extra arguments for nbdclone serve")
    ap.add_argument("--trace", type=Path, default=TRACE, help="fio iolog of a recorded boot (default: %(default)s)")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="the request-path check: 4 KiB random read and write and 1 MiB sequential write against file, cow "
        "and qemu-nbd, 3 rounds (a few minutes); run it before and after any change of read, write or flush",
    )
    ap.add_argument("--no-pin", dest="pin", action="store_false", help="let servers and fio run on any core")
    ap.add_argument("--no-prime", dest="prime", action="store_false", help="do not touch free memory before write runs")
    args = ap.parse_args()
    if args.quick:
        args.rounds = min(args.rounds, 3) if "--rounds" not in sys.argv else args.rounds
        if "--servers" not in sys.argv:
            args.servers = "file,cow,qemu-nbd,nbdclone"
    pin(args.pin)
    # SIGTERM (a CI timeout, kill PID) unwinds like Ctrl-C, so the finally blocks stop every server by PID.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not args.trace.is_file():
        ap.error(f"no boot trace at {args.trace} (the repository's ../shared/traces; or give --trace PATH)")
    if not re.fullmatch(r"[1-9][0-9]*[MG]", args.size):
        ap.error(f"--size {args.size!r}: give a number of MiB or GiB, like 512M or 1G")
    size = int(args.size[:-1]) << {"M": 20, "G": 30}[args.size[-1]]
    work = Path(tempfile.mkdtemp(prefix="nbdclone-bench-"))
    try:
        base = work / "base.raw"
        print(f"building a {args.size} base in {work} ...", file=sys.stderr)
        with open(base, "wb") as f:  # boot data where the trace reads, random data everywhere else
            for _ in range(size // (16 * MiB)):
                f.write(os.urandom(16 * MiB))
        Nbdclone.extra = args.nbdclone_args.split()
        Nbdclone.trace = args.trace
        kinds: dict[str, type[Server]] = {
            "file": FilePlugin,
            "cow": CowFilter,
            "qemu-nbd": QemuNbd,
            "python-null": PythonNull,
            "python-null-t1": type("PythonNull1", (PythonNull,), {"threads": ["--threads", "1"]}),
            "nbdclone": Nbdclone,
        }
        servers = [kinds[k](k, work, base) for k in args.servers.split(",")]
        for srv in servers:
            if isinstance(srv, Nbdclone):
                srv.setup()
        loads = [
            w
            for w in workloads(args.seconds, size, [int(n) for n in args.storms.split(",")], args.trace)
            if args.only in w.name and (not args.quick or w.name in QUICK)
        ]
        results: dict[tuple[str, str], list[tuple[float, float, int]]] = {}
        can_drop = True
        for rnd in range(args.rounds):
            for w in loads:
                if w.cold and not can_drop:
                    continue
                order = servers[:]
                random.shuffle(order)
                for srv in order:
                    if srv.name.startswith("python-null") and (
                        w.clones > 1 or w.unit == "s" or ("write" in w.name and srv.name == "python-null")
                    ):
                        continue  # the ceiling of any Python plugin, for one clone (writes: as nbdclone runs)
                    if isinstance(srv, Nbdclone):
                        srv.prefix = "b" if w.unit == "s" else "c"
                    srv.start(w.clones)
                    try:
                        uris = srv.uris(w.clones)
                        # No run pays for the write-back of the data an earlier run left dirty, nor for
                        # the VM's first touch of the pages it writes into.
                        os.sync()
                        if "write" in w.name and args.prime:
                            prime_memory(PRIME)
                        if w.cold:
                            can_drop = drop_caches()
                            if not can_drop:
                                print("cannot drop the page cache here: cold runs skipped", file=sys.stderr)
                                continue
                        pids = srv.pids()
                        cpu0, given0 = cpu_seconds(pids), reported_mib()
                        value, ios, _ = run_fio(w, uris, work / "fio.json")
                        cpu, given = cpu_seconds(srv.pids()) - cpu0, reported_mib() - given0
                        mem = rss_bytes(srv.pids())
                    finally:
                        srv.stop()
                    results.setdefault((w.name, srv.name), []).append((value, cpu / max(ios, 1) * 1e6, mem))
                    print(
                        f"round {rnd + 1} {w.name:32} {srv.name:12} {value:10.1f} {w.unit}"
                        f" {cpu / max(ios, 1) * 1e6:9.1f} us CPU/IO, {given:6.0f} MiB reported to the host",
                        file=sys.stderr,
                    )
        print_table(loads, servers, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def print_table(loads: list[Workload], servers: list[Server], results: dict) -> None:  # type: ignore[type-arg]
    print(
        f"\n{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, nbdkit {_version(['nbdkit', '--version'])}, "
        f"{_version(['qemu-nbd', '--version'])}; medians of {len(next(iter(results.values())))} rounds\n"
    )
    head = (
        f"| {'workload':32} | {'server':14} | {'result':>14} | {'vs file':>7} | {'min-max':>9} | {'CPU/IO':>9} "
        f"| {'memory':>9} |"
    )
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for w in loads:
        ref = results.get((w.name, "file"))
        ref_med = statistics.median(r[0] for r in ref) if ref else None
        for srv in servers:
            rs = results.get((w.name, srv.name))
            if not rs:
                continue
            med = statistics.median(r[0] for r in rs)
            if ref:  # median of the per-round ratios (rounds are interleaved, so each pair ran close in time)
                pairs = [r[0] / f[0] for r, f in zip(rs, ref, strict=False)]
                ratio = f"{statistics.median(pairs):.2f}"
                spread = f"{min(pairs):.2f}-{max(pairs):.2f}"
            else:
                ratio = spread = "-"
            cpu = statistics.median(r[1] for r in rs)
            mem = statistics.median(r[2] for r in rs) / MiB
            unit = {"s": " s", "IOPS": " IOPS", "MB/s": " MB/s"}[w.unit]
            print(
                f"| {w.name:32} | {srv.name:14} | {med:>9.{2 if w.unit == 's' else 0}f}{unit:5} | {ratio:>7} | "
                f"{spread:>9} | "
                f"{cpu:>6.1f} us | {mem:>5.0f} MiB |"
            )
    pinned = f"servers on {PIN['server'][-1]}, fio on {PIN['fio'][-1]}" if PIN["server"] else "unpinned"
    print(
        "\nvs file: result / nbdkit file plugin's, per round: median, and min-max over the rounds (for times in "
        f"s, lower is better). CPUs: {pinned}."
    )
    _ = ref_med


def _version(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.split("\n")[0]
    except FileNotFoundError:
        return "?"


if __name__ == "__main__":
    main()
