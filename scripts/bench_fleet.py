"""scripts/bench --fleet: H hosts (separate stores and servers) against one etcd and one Ceph on this
machine, started by scripts/fleet-engines unless --etcd and --ceph-conf name running ones. Reports:

  flip       etcd transaction time of `base promote` (p50/p99) and flip-to-last-host: from the flip until
             every host's local pointer names the new version (p50/p99)
  staging    time from an import on host 1 until each other host holds the version (its map: chunks are
             fetched when first read)
  rados      per host, what the fleet's objects cost it for the booted version: objects read and bytes
             (its map, its boot trace, the trace's chunk objects, chunks fetched on demand), against the
             trace's chunks
  boot       a recorded Linux boot replayed with fio on one clone per host, cold (page cache dropped) and
             warm (trace prefetched), against the same replay on a single-host store; and on host 2 a
             boot of a version no host has booted (no trace: every chunk fetched on demand)
  move       a clone with 16 MiB written moved to another host, until that host serves it

Every process it starts is stopped by its PID. Times are medians where several runs are made.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NBDCLONE = str(ROOT / ".venv" / "bin" / "nbdclone")
TRACE = ROOT / "tests" / "data" / "linux-boot.fio.iolog"
MiB = 1 << 20


def run(*args: str, store: Path) -> str:
    proc = subprocess.run([NBDCLONE, *args, "--store", str(store)], capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"nbdclone {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def pointer(store: Path, base: str) -> str | None:
    """The host's local current version of `base` (read as the CLI would, without starting one)."""
    sys.path.insert(0, str(ROOT))
    from nbdclone.store import Store

    st = Store(store)
    record = st.catalog().bases.get(base)
    return None if record is None else st.current_version(record)


def _versions(store: Path, base: str) -> set[str]:
    sys.path.insert(0, str(ROOT))
    from nbdclone.store import Store

    record = Store(store).catalog().bases.get(base)
    return set() if record is None else set(record.versions)


class Host:
    def __init__(self, name: str, store: Path) -> None:
        self.name, self.store = name, store
        self.proc: subprocess.Popen[str] | None = None
        self.log = store.parent / f"{name}.log"

    def start(self) -> None:
        out = open(self.log, "w")  # the server's for its life
        self.proc = subprocess.Popen(
            [NBDCLONE, "serve", "--store", str(self.store), "--socket", str(self.store.parent / f"{self.name}.sock")],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + 60
        while "nbdclone: serving" not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{self.name}'s server did not start:\n{self.log.read_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def uri(self, clone: str) -> str:
        return run("uri", clone, store=self.store).strip()

    def stats(self) -> dict[str, int]:
        """The host's fetcher counters (run/stats-fetch.json)."""
        data: dict[str, int] = json.loads((self.store / "run" / "stats-fetch.json").read_text())
        return data


def replay(uri: str, work: Path) -> float:
    t = time.monotonic()
    subprocess.run(
        ["fio", "--name=boot", "--ioengine=nbd", f"--uri={uri}", f"--read_iolog={TRACE}", "--replay_no_stall=1",
         "--output=/dev/null"],
        check=True,
        cwd=work,
    )  # fmt: skip
    return time.monotonic() - t


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def engines_up(args: argparse.Namespace, engines: Path, etcd_port: int, mon_port: int) -> tuple[str, str]:
    """The fleet's etcd address and ceph.conf: --etcd and --ceph-conf, or a single-node etcd and Ceph that
    scripts/fleet-engines starts under `engines` on the given ports (engines_down stops them)."""
    if args.etcd and args.ceph_conf:
        return str(args.etcd), str(args.ceph_conf)
    env = {**os.environ, "ETCD_PORT": str(etcd_port), "CEPH_MON_PORT": str(mon_port)}
    up = subprocess.run([ROOT / "scripts" / "fleet-engines", "up", str(engines)], env=env, capture_output=True,
                        text=True, check=True)  # fmt: skip
    settings = dict(line.split("=", 1) for line in up.stdout.split())
    return settings["NBDCLONE_ETCD"], settings["CEPH_CONF"]


def engines_down(engines: Path) -> None:
    """Stop the engines engines_up started (by their PIDs), if it started any."""
    if engines.exists():
        subprocess.run([ROOT / "scripts" / "fleet-engines", "down", str(engines)], check=False)


def report(results: dict[str, object], path: Path | None) -> None:
    """Print the results as JSON, and write them to `path` too if given."""
    print(json.dumps(results, indent=2))
    if path is not None:
        path.write_text(json.dumps(results, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=3, help="hosts (3-8)")
    ap.add_argument("--flips", type=int, default=20, help="flips to time")
    ap.add_argument("--size", type=int, default=256, help="base size in MiB (the boot reads its first 256)")
    ap.add_argument("--etcd", default="", help="a running etcd (http://HOST:PORT); default: start one")
    ap.add_argument("--ceph-conf", default="", help="a running Ceph's ceph.conf; default: start one")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if not 3 <= args.hosts <= 8:
        ap.error("--hosts: 3 to 8")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="nbdclone-fleet-bench-"))
    engines = work / "engines"
    hosts: list[Host] = []
    results: dict[str, object] = {"hosts": args.hosts}
    try:
        etcd, conf = engines_up(args, engines, 23850, 16850)
        fleet = f"bench{os.getpid()}"
        hosts = [Host(f"h{k + 1}", work / f"h{k + 1}") for k in range(args.hosts)]
        for h in hosts:
            run("fleet", "join", etcd, "--ceph-conf", conf, "--name", fleet, "--host", h.name, store=h.store)
            h.start()
        print(f"{args.hosts} hosts in {work}; building a {args.size} MiB base ...", file=sys.stderr)
        for v in (1, 2):
            with open(work / f"v{v}.raw", "wb") as f:
                for _ in range(args.size // 16):
                    f.write(os.urandom(16 * MiB))
        chunks = args.size * MiB // (64 * 1024)

        # staging: import on h1, until every other host holds it
        t0 = time.monotonic()
        run("base", "import", "gold", str(work / "v1.raw"), store=hosts[0].store)
        imported = time.monotonic() - t0
        staged: dict[str, float] = {}
        while len(staged) < args.hosts - 1:
            for h in hosts[1:]:
                if h.name not in staged and pointer(h.store, "gold") == "1":
                    staged[h.name] = time.monotonic() - t0
            time.sleep(0.01)
        run("base", "import", "gold", str(work / "v2.raw"), store=hosts[0].store)
        # Flips are timed once every host holds version 2 (hosts stage new versions before a flip; what
        # `base promote --wait-warm` waits for): the time is the flip's, not the staging's.
        while any(_versions(h.store, "gold") < {"1", "2"} for h in hosts[1:]):
            time.sleep(0.01)
        results["import_s"] = round(imported, 2)
        results["staging_s"] = {k: round(v, 2) for k, v in staged.items()}

        # flips: alternate 2 and 1, timing the transaction and the last host's pointer
        sys.path.insert(0, str(ROOT))
        from nbdclone.fleet.catalog import FleetCatalog
        from nbdclone.fleet.config import load

        config = load(hosts[0].store)
        assert config is not None
        txn: list[float] = []
        last: list[float] = []
        for k in range(args.flips):
            vid = "2" if k % 2 == 0 else "1"

            async def flip(vid: str = vid) -> float:
                async with FleetCatalog(config) as c:
                    t = time.monotonic()
                    await c.bases.promote("gold", vid)
                    return time.monotonic() - t

            t0 = time.monotonic()
            txn.append(asyncio.run(flip()))
            pending = {h.name for h in hosts[1:]}
            while pending:
                pending = {h.name for h in hosts[1:] if h.name in pending and pointer(h.store, "gold") != vid}
                time.sleep(0.002)
            last.append(time.monotonic() - t0)
        results["flip_txn_ms"] = {"p50": round(pct(txn, 0.5) * 1e3, 1), "p99": round(pct(txn, 0.99) * 1e3, 1)}
        results["flip_to_last_host_ms"] = {"p50": round(pct(last, 0.5) * 1e3), "p99": round(pct(last, 0.99) * 1e3)}
        results["chunks_per_version"] = chunks

        # boot: the first boot on h1 records the trace; h1 gives it to the fleet with its chunks, every
        # other host's server takes them and says it is warm; then cold and warm boots per host
        run("clone", "create", "first", "--base", "gold@1", store=hosts[0].store)
        replay(hosts[0].uri("first"), work)
        time.sleep(1)
        run("fleet", "sync", store=hosts[0].store)
        run("base", "promote", "gold", "1", "--wait-warm", "1", "--wait-timeout", "300", store=hosts[0].store)
        trace = json.loads(run("base", "trace", "show", "gold@1", "--json", store=hosts[0].store))
        results["trace_chunks"] = trace["bytes"] // (64 * 1024)
        results["rados_per_host"] = {
            h.name: {
                "objects": (s := h.stats())["sync_reads"] + s["chunks"],
                "MiB": round((s["sync_bytes"] + s["bytes"]) / MiB, 1),
                "chunks_filled": s["trace_chunks"] + s["chunks"],
            }
            for h in hosts[1:]
        }
        single = work / "single"
        run("base", "import", "gold", str(work / "v1.raw"), store=single)
        run("clone", "create", "s-cold", "s-warm", "--base", "gold", store=single)
        solo = Host("single", single)
        solo.start()
        hosts.append(solo)
        boot: dict[str, dict[str, float]] = {}
        for h in hosts:
            prefix = "s" if h is solo else h.name
            if h is not solo:
                run("clone", "create", f"{prefix}-cold", f"{prefix}-warm", "--base", "gold@1", store=h.store)
            if h is solo:  # its first boot records its own trace
                replay(h.uri("s-warm"), work)
            cold = replay(h.uri(f"{prefix}-cold"), work) if drop_caches() else float("nan")
            run("base", "warm", "gold@1", store=h.store)
            warm = replay(h.uri(f"{prefix}-warm"), work)
            boot[h.name] = {"cold_s": round(cold, 2), "warm_s": round(warm, 2)}
        results["boot"] = boot

        # a boot of a version nobody booted yet: no trace, every chunk it reads fetched on demand
        before = hosts[1].stats()
        run("clone", "create", "h2-new", "--base", "gold@2", store=hosts[1].store)
        drop_caches()
        first = replay(hosts[1].uri("h2-new"), work)
        after = hosts[1].stats()
        results["boot_on_demand"] = {
            "s": round(first, 2),
            "vs_single_cold": round(first / boot["single"]["cold_s"], 2),
            "chunks_fetched": after["chunks"] - before["chunks"],
            "requests": after["requests"] - before["requests"],
        }

        # move: 16 MiB written, to the next host, until it serves it
        run("clone", "create", "mover", "--base", "gold", store=hosts[0].store)
        with open(work / "v2.raw", "rb") as src, open(work / "16m.raw", "wb") as dst:
            dst.write(src.read(16 * MiB))
        subprocess.run(["nbdcopy", str(work / "16m.raw"), hosts[0].uri("mover")], check=True)
        t0 = time.monotonic()
        run("clone", "move", "mover", "--to", hosts[1].name, store=hosts[0].store)
        lease = hosts[1].store / "run" / "fleet-lease.json"
        while "mover" not in json.loads(lease.read_text())["owned"] or pointer(hosts[1].store, "gold") is None:
            time.sleep(0.01)
        while run("clone", "list", "--json", store=hosts[1].store).count('"mover"') == 0:
            time.sleep(0.01)
        results["move_s"] = round(time.monotonic() - t0, 2)
    finally:
        for h in hosts:
            h.stop()
        engines_down(engines)
        shutil.rmtree(work, ignore_errors=True)
    report(results, args.json)
    solo_boot = results["boot"]["single"]  # type: ignore[index]
    print("\n| host | cold boot (s) | vs single host | warm boot (s) | vs single host |\n|---|---|---|---|---|")
    for name, b in results["boot"].items():  # type: ignore[attr-defined]
        print(f"| {name} | {b['cold_s']} | {b['cold_s'] / solo_boot['cold_s']:.2f}x | {b['warm_s']} "
              f"| {b['warm_s'] / solo_boot['warm_s']:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
