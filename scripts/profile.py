"""Where each microsecond of one request goes, in the real server: `perf` samples nbdclone's worker on the
CPU while fio drives one clone, and each sample is put under the step it was in.

    scripts/profile [--workload 4k-write|4k-read|1m-write|all] [--seconds 5]

The worker and fio are pinned to different cores, as in scripts/bench. perf's cpu-clock samples (with call
chains) see only time on a CPU: the kernel's work is told apart by the system call it serves (the socket's
read and send, the data file's or pack's pwritev and preadv), native code by its library (xxh3, mmh3,
RocksDB, nbdkit and libc), and the rest is the Python interpreter. py-spy then samples the Python frames
(without pausing the worker) to split the interpreter's time over nbdclone's modules, by the module of
the innermost Python frame. A step's cost per request is its share of the samples times the worker's CPU
time per request (from /proc, over the same window).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench import cpu_seconds  # a process's CPU seconds, from /proc (scripts/ is on the path)

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv" / "bin"

WORKLOADS = {
    "4k-write": ["--rw=randwrite", "--bs=4k", "--iodepth=32"],
    "4k-read": ["--rw=randread", "--bs=4k", "--iodepth=32"],
    "1m-write": ["--rw=write", "--bs=1M", "--iodepth=8"],
}
FILE_CALLS = ("pwritev", "preadv", "pwrite64", "pread64", "fdatasync")
SOCKET_CALLS = ("read", "__libc_read", "recv", "send", "__libc_send", "sendmsg", "writev", "__send")
#: Native libraries, by a piece of their file name.
LIBRARIES = [
    ("fingerprints (xxh3 of each 4 KiB block)", "_xxhash"),
    ("chunk digests (mmh3 of 64 KiB)", "mmh3"),
    ("map: RocksDB", "rocksdict"),
    ("nbdkit, its filter and libc", "nbdkit"),
    ("nbdkit, its filter and libc", "libc.so"),
    ("nbdkit, its filter and libc", "ld-linux"),
]
PYTHON = "Python interpreter"
#: The interpreter's time, split by the module of the innermost Python frame (py-spy).
MODULES = [
    ("Python: request wrapper, counters (worker/plugin.py)", ("plugin.py",)),
    ("Python: clone, block states, zero check (clone.py, states.py)", ("clone.py", "states.py")),
    ("Python: overlay write paths (_rocks.py, _datafile.py)", ("_rocks.py", "_datafile.py", "_recovery.py")),
    ("Python: journal (_journal.py)", ("_journal.py",)),
    ("Python: base and cache reads (chunks.py, cache.py)", ("chunks.py", "cache.py", "base.py")),
]
PY_OTHER = "Python: other (stats, watchers, nbdkit's call)"


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def perf_step(chain: list[tuple[str, str]]) -> str:
    """The step of one perf sample: `chain` is (symbol, library) from the innermost frame out."""
    dso = chain[0][1]
    if "kernel" in dso:
        for s, d in chain:
            if "kernel" in d:
                continue
            name = s.split("+")[0]
            if name.startswith(FILE_CALLS):
                return "kernel: data file and pack (pwritev, preadv, page cache)"
            if name in SOCKET_CALLS or name.startswith(("send", "recv")):
                return "kernel: the socket (request in, reply out, waking fio)"
            break
        return "kernel: other"
    for step, piece in LIBRARIES:
        if piece in dso:
            return step
    return PYTHON


def perf_samples(data: Path) -> collections.Counter[str]:
    out = subprocess.run(
        ["perf", "script", "-i", str(data), "-F", "ip,sym,dso"], check=True, capture_output=True, text=True
    ).stdout
    counts: collections.Counter[str] = collections.Counter()
    for block in out.split("\n\n"):
        chain = []
        for line in block.strip().splitlines():
            parts = line.strip().split(None, 1)
            if len(parts) < 2:
                continue
            rest = parts[1]
            sym, _, dso = rest.rpartition(" (")
            chain.append((sym, dso.rstrip(")")))
        if chain:
            counts[perf_step(chain)] += 1
    return counts


def python_split(raw: Path) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    for sample in raw.read_text().splitlines():
        stack, _, many = sample.rpartition(" ")
        frames = [f for f in stack.split(";") if ".py:" in f]
        if not frames:
            continue
        inner = frames[-1]
        step = next((s for s, pieces in MODULES if any(p in inner for p in pieces)), PY_OTHER)
        counts[step] += int(many)
    return counts


def profile(name: str, seconds: int, work: Path, store: Path, cores: list[int]) -> dict[str, float]:
    sock = work / "nbdclone.sock"
    cli = str(VENV / "nbdclone")
    sh(cli, "clone", "reset", "p0", "--store", str(store))
    pin = ["taskset", "-c", str(cores[-1])]
    server = subprocess.Popen(
        [*pin, cli, "serve", "--store", str(store), "--socket", str(sock), "--workers", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert server.stdout is not None
        for out_line in server.stdout:
            if out_line.startswith(b"nbdclone: serving"):
                break
        uri = sh(cli, "uri", "p0", "--store", str(store)).strip()
        out = work / "fio.json"
        fio_cmd = ["fio", "--ioengine=nbd", "--output-format=json", f"--output={out}", "--name=p", f"--uri={uri}"]
        fio_cmd += ["--time_based", f"--runtime={2 * seconds + 4}", "--size=1G", *WORKLOADS[name]]
        fio = subprocess.Popen(["taskset", "-c", ",".join(map(str, cores[:-1])), *fio_cmd])
        time.sleep(1.5)  # past the first connection's open
        worker = int(Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()[0])
        data, raw = work / f"{name}.perf", work / f"{name}.spy"
        cpu0, t0 = cpu_seconds([worker]), time.monotonic()
        sh("perf", "record", "-q", "-e", "cpu-clock", "-F", "2000", "-g", "-p", str(worker), "-o", str(data),
           "--", "sleep", str(seconds))  # fmt: skip
        cpu1, t1 = cpu_seconds([worker]), time.monotonic()
        spy = ["record", "--nonblocking", "--rate", "500", "--duration", str(seconds), "--format", "raw"]
        sh(str(VENV / "py-spy"), *spy, "--output", str(raw), "--pid", str(worker))
        fio.wait()
        job = json.loads(out.read_text())["jobs"][0]
        iops = job["read"]["iops"] + job["write"]["iops"]
    finally:
        server.terminate()
        server.wait(30)
    steps = perf_samples(data)
    total = sum(steps.values()) or 1
    per_request = (cpu1 - cpu0) / (iops * (t1 - t0)) * 1e6
    table = {step: n / total * per_request for step, n in steps.items() if step != PYTHON}
    python = steps[PYTHON] / total * per_request
    split = python_split(raw)
    spread = sum(split.values()) or 1
    for step, n in split.items():
        table[step] = python * n / spread
    table["requests per second"] = iops
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="all", choices=[*WORKLOADS, "all"])
    ap.add_argument("--seconds", type=int, default=5)
    args = ap.parse_args()
    if not (VENV / "py-spy").exists():
        sh(str(VENV / "python"), "-m", "pip", "install", "-q", "py-spy")
    if not shutil.which("perf"):
        raise SystemExit("profile: perf is needed (Debian: apt-get install linux-perf)")
    cores = sorted(os.sched_getaffinity(0))
    cores = cores if len(cores) > 1 else cores * 2
    work = Path(tempfile.mkdtemp(prefix="nbdclone-profile-"))
    try:
        base, store = work / "base.raw", work / "store"
        with open(base, "wb") as f:
            for _ in range(64):
                f.write(os.urandom(16 << 20))
        sh(str(VENV / "nbdclone"), "base", "import", "gold", str(base), "--store", str(store))
        sh(str(VENV / "nbdclone"), "clone", "create", "p0", "--base", "gold", "--store", str(store))
        names = list(WORKLOADS) if args.workload == "all" else [args.workload]
        tables = {n: profile(n, args.seconds, work, store, cores) for n in names}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows: list[str] = []
    for t in tables.values():
        rows += [r for r in t if r not in rows and r != "requests per second"]
    print(f"| step (us of CPU per request) | {' | '.join(names)} |")
    print(f"|---|{'---|' * len(names)}")
    for step in sorted(rows, key=lambda r: -max(t.get(r, 0.0) for t in tables.values())):
        print(f"| {step} | {' | '.join(f'{tables[n].get(step, 0.0):.2f}' for n in names)} |")
    total = {n: sum(v for k, v in tables[n].items() if k != "requests per second") for n in names}
    print(f"| **total** | {' | '.join(f'**{total[n]:.2f}**' for n in names)} |")
    rates = " | ".join(f"{tables[n]['requests per second']:.0f}" for n in names)
    print(f"| requests per second (while profiled) | {rates} |")


if __name__ == "__main__":
    main()
