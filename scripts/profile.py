"""Where each microsecond of one request goes, in the real server: py-spy samples nbdclone's worker while
fio drives one clone, and each sample is put under the step of the request it was in.

    scripts/profile [--workload 4k-write|4k-read|1m-write|all] [--seconds 5]

The worker and fio are pinned to different cores (as in scripts/bench). The CPU time of each of the
worker's threads is read from /proc over the sampling window; py-spy samples the threads (`--native`: C
frames too, so the time nbdkit spends outside Python is seen), and the connection thread's CPU per request
is split over the steps in proportion to its samples that are not waits (a leaf in a blocking call).
Threads other than the connection's (the stats publisher, the watchers, RocksDB's) are one row.
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

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv" / "bin"
RATE = 1000  # samples per second

WORKLOADS = {
    "4k-write": ["--rw=randwrite", "--bs=4k", "--iodepth=32"],
    "4k-read": ["--rw=randread", "--bs=4k", "--iodepth=32"],
    "1m-write": ["--rw=write", "--bs=1M", "--iodepth=8"],
}

#: Steps, each found by the innermost frame of a sample that matches one of its patterns (file or function
#: names as py-spy prints them), checked in this order.
STEPS: list[tuple[str, tuple[str, ...]]] = [
    ("fingerprint (xxh3 of each 4 KiB block)", ("fingerprint", "xxh3_64_digest")),
    ("chunk digest check (mmh3 of 64 KiB)", ("_matches", "mmh3")),
    ("map: RocksDB", ("_blockmap.py", "rocksdict", "librocksdb", "rocksdb::")),
    ("map: journal in /dev/shm", ("_journal.py",)),
    ("data file / pack: pwritev, preadv", ("pwritev", "preadv", "os_pwritev", "os_preadv", "pread64", "pwrite64")),
    ("locks (the GIL, the overlay's lock)", ("take_gil", "PyThread_acquire_lock", "acquire_timed", "drop_gil")),
    ("overlay and journal logic (_rocks.py)", ("_rocks.py",)),
    ("clone: block states, zero check (clone.py, states.py)", ("clone.py", "states.py")),
    ("base and cache reads (chunks.py, cache.py)", ("chunks.py", "cache.py", "base.py")),
    ("request wrapper and counters (plugin.py)", ("plugin.py",)),
    ("Python's entry from nbdkit (the callback call)", ("py_call", "PyObject_Call", "_PyEval", "PyEval")),
    ("nbdkit: protocol, socket I/O (no Python frame)", ("",)),
]
OTHER = "other threads of the worker (stats, watchers, RocksDB)"
#: A sample whose innermost frame is one of these is a thread waiting, not working.
WAITS = ("clock_nanosleep", "poll (", "epoll_wait", "pthread_cond_wait", "pthread_cond_timedwait", "sem_wait")


def sh(*cmd: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)  # type: ignore[call-overload,no-any-return]


def classify(frames: list[str]) -> str:
    frames = frames[::-1]  # innermost first
    for frame in frames:
        for step, patterns in STEPS[:-1]:
            if any(p in frame for p in patterns):
                return step
    return STEPS[-1][0]


def profile(name: str, seconds: int, work: Path, store: Path, cores: list[int]) -> dict[str, float]:
    sock = work / "nbdclone.sock"
    cli = str(VENV / "nbdclone")
    sh(cli, "clone", "reset", "p0", "--store", str(store))
    server = subprocess.Popen(
        ["taskset", "-c", str(cores[-1]), cli, "serve", "--store", str(store), "--socket", str(sock), "--workers", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert server.stdout is not None
        for out_line in server.stdout:
            if out_line.startswith(b"nbdclone: serving"):
                break
        uri = sh(cli, "uri", "p0", "--store", str(store)).stdout.strip()
        out = work / "fio.json"
        fio_cmd = ["fio", "--ioengine=nbd", "--output-format=json", f"--output={out}", "--name=p", f"--uri={uri}"]
        fio_cmd += ["--time_based", f"--runtime={seconds + 8}", "--size=1G", *WORKLOADS[name]]
        fio = subprocess.Popen(["taskset", "-c", ",".join(map(str, cores[:-1])), *fio_cmd])
        time.sleep(1.5)  # past the first connection's open
        worker = int(Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()[0])
        raw = work / f"{name}.txt"
        spy = ["record", "--native", "--threads", "--rate", str(RATE), "--duration", str(seconds), "--format", "raw"]
        cpu0, t0 = thread_cpu(worker), time.monotonic()
        sh(str(VENV / "py-spy"), *spy, "--output", str(raw), "--pid", str(worker))
        if os.environ.get("PROFILE_KEEP"):
            shutil.copy(raw, os.environ["PROFILE_KEEP"])
        cpu1, t1 = thread_cpu(worker), time.monotonic()
        fio.wait()
        job = json.loads(out.read_text())["jobs"][0]
        iops = job["read"]["iops"] + job["write"]["iops"]
    finally:
        server.terminate()
        server.wait(30)
    samples: dict[int, list[tuple[list[str], int]]] = collections.defaultdict(list)
    for sample in raw.read_text().splitlines():
        stack, _, many = sample.rpartition(" ")
        head, *frames = stack.split(";")  # "thread (TID): NAME", then the frames, outermost first
        samples[int(head.split("(", 1)[1].split(")", 1)[0])].append((frames, int(many)))
    conns = {tid for tid, ss in samples.items() if any("plugin.py" in f for fr, _ in ss for f in fr)}
    requests = iops * (t1 - t0)
    spent = {tid: cpu1.get(tid, 0.0) - cpu0.get(tid, 0.0) for tid in cpu1}
    counts: collections.Counter[str] = collections.Counter()
    for tid in conns:
        for frames, n in samples[tid]:
            if not frames[-1].startswith(WAITS):
                counts[classify(frames)] += n
    busy = sum(counts.values()) or 1
    conn_us = sum(spent.get(t, 0.0) for t in conns) / requests * 1e6
    table = {step: counts[step] / busy * conn_us for step, _ in STEPS}
    table[OTHER] = sum(v for t, v in spent.items() if t not in conns) / requests * 1e6
    table["requests per second"] = iops
    return table


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of `pid`."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="all", choices=[*WORKLOADS, "all"])
    ap.add_argument("--seconds", type=int, default=5)
    args = ap.parse_args()
    if not shutil.which("py-spy", path=str(VENV)):
        sh(str(VENV / "python"), "-m", "pip", "install", "-q", "py-spy")
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        cores = cores * 2
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
    print(f"| step (us per request, CPU) | {' | '.join(names)} |")
    print(f"|---|{'---|' * len(names)}")
    rows = [step for step, _ in STEPS] + [OTHER]
    for step in rows:
        print(f"| {step} | {' | '.join(f'{tables[n][step]:.2f}' for n in names)} |")
    total = {n: sum(tables[n][s] for s in rows) for n in names}
    print(f"| **total** | {' | '.join(f'**{total[n]:.2f}**' for n in names)} |")
    rates = " | ".join(f"{tables[n]['requests per second']:.0f}" for n in names)
    print(f"| requests per second | {rates} |")


if __name__ == "__main__":
    main()
