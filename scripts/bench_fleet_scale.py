"""scripts/bench --fleet --sim-hosts N [--records R]: how a flip scales with hosts and clone records.

N lightweight hosts on one etcd and one Ceph (started by scripts/fleet-engines unless --etcd and
--ceph-conf name running ones): each is a process running the server's own follower (fleet/follow.py:
the lease, the view of bases/ by list and watch, the syncs), without nbdkit, on its own store. R clone
records of other hosts fill the catalog. Then F flips of a base whose versions every host holds.
Reports:

  flip to last host   from the flip's transaction until every host's pointer names the new version
                      (each host logs the time its pointer moved), p50/p99 over the flips
  per host per flip   CPU (the hosts' CPU over the flips, less their idle rate, per flip and host) and
                      etcd traffic (etcd's gRPC bytes sent and received over the flips, per flip)

Every process it starts is stopped by its PID.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# scripts/ last: its profile.py would shadow the standard library's (cProfile imports it).
sys.path[:] = [str(ROOT), *(p for p in sys.path if Path(p or ".").resolve() != ROOT / "scripts"), str(ROOT / "scripts")]
MiB = 1 << 20
FLIPPED = "base gold flipped"


def host_main(store: Path) -> None:
    """One simulated host: the follower of a server, logging with wall-clock times."""
    import uvloop

    from nbdclone.fleet.config import load
    from nbdclone.fleet.fetch import fetch_here
    from nbdclone.fleet.follow import follow
    from nbdclone.store import Store

    logging.basicConfig(filename=store / "host.log", level=logging.INFO, format="%(created).6f %(message)s")
    if os.environ.get("NBDCLONE_SIM_PROFILE"):  # one host's profile of its flips, written at its stop
        import cProfile

        profile = cProfile.Profile()
        profile.enable()
        signal.signal(signal.SIGUSR1, lambda *_: profile.dump_stats(store / "host.prof"))
    config = load(store)
    assert config is not None

    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await follow(Store(store, fetch_here=fetch_here), config, stop)

    uvloop.run(main())  # as the server's supervisor runs it


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def etcd_bytes(etcd: str) -> int:
    if not etcd.startswith("http://"):
        raise SystemExit(f"etcd address {etcd!r}: expected http://HOST:PORT")
    text = urllib.request.urlopen(f"{etcd}/metrics", timeout=10).read().decode()  # noqa: S310 (checked above)
    return sum(
        int(float(line.split()[-1]))
        for line in text.splitlines()
        if line.startswith(
            ("etcd_network_client_grpc_sent_bytes_total", "etcd_network_client_grpc_received_bytes_total")
        )
    )


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sim-hosts", type=int, required=True, help="hosts to run (processes)")
    ap.add_argument("--records", type=int, default=10_000, help="clone records of other hosts in etcd")
    ap.add_argument("--flips", type=int, default=20, help="flips to time")
    ap.add_argument("--etcd", default="", help="a running etcd (http://HOST:PORT); default: start one")
    ap.add_argument("--ceph-conf", default="", help="a running Ceph's ceph.conf; default: start one")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--host", type=Path, help=argparse.SUPPRESS)  # (a simulated host's own process)
    args = ap.parse_args()
    if args.host is not None:
        host_main(args.host)
        return
    from bench_fleet import engines_down, engines_up, report

    from nbdclone.fleet import catalog as fleet_catalog
    from nbdclone.fleet.config import FleetConfig, save
    from nbdclone.host import open_host
    from nbdclone.store import images

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="nbdclone-fleet-scale-"))
    engines = work / "engines"
    procs: list[subprocess.Popen[bytes]] = []
    results: dict[str, object] = {"hosts": args.sim_hosts, "records": args.records, "flips": args.flips}
    try:
        etcd, conf = engines_up(args, engines, 23860, 16860)
        fleet = f"scale{os.getpid()}"

        def config(host: str) -> FleetConfig:
            return FleetConfig(etcd, conf, "nbdclone", fleet, host)

        publisher = work / "publisher"
        save(publisher, config("publisher"))
        host = open_host(publisher)
        for v in (1, 2):
            (work / f"v{v}.raw").write_bytes(os.urandom(4 * MiB))
            image = work / f"v{v}.raw"
            host.import_version(
                "gold", lambda vid, image=image: images.import_base(host.store, "gold", image, vid=vid)[1]
            )

        print(f"{args.records} clone records ...", file=sys.stderr)

        async def fill(c: fleet_catalog.FleetCatalog) -> None:
            sem = asyncio.Semaphore(64)

            async def one(i: int) -> None:
                async with sem:
                    await c.clones.claim(f"vm{i}", f"other{i % 1000}", "/elsewhere")

            await asyncio.gather(*(one(i) for i in range(args.records)))

        t = time.monotonic()
        fleet_catalog.run(config("publisher"), fill)
        results["records_s"] = round(time.monotonic() - t, 1)

        print(f"{args.sim_hosts} hosts ...", file=sys.stderr)
        stores = [work / f"h{k}" for k in range(args.sim_hosts)]
        for k, store in enumerate(stores):
            save(store, config(f"h{k}"))
            log = open(store / "stderr", "wb")
            procs.append(subprocess.Popen([sys.executable, __file__, "--sim-hosts", "0", "--host", str(store)],
                                          stdout=log, stderr=subprocess.STDOUT))  # fmt: skip
        deadline = time.monotonic() + 60 + args.sim_hosts
        while not all(_holds(store, {"1", "2"}) and _pointer(store) == "1" for store in stores):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                dead = next((k for k, p in enumerate(procs) if p.poll() is not None), 0)
                tail = (stores[dead] / "stderr").read_text()[-2000:] + (stores[dead] / "host.log").read_text()[-2000:]
                raise SystemExit(f"the hosts did not come up; host h{dead}:\n{tail}")
            time.sleep(0.5)
        time.sleep(5)  # settled: the first syncs' holds and warm keys are written
        pids = [p.pid for p in procs]
        idle_window = 10.0  # what the hosts cost with nothing flipping: lease refreshes
        cpu0, bytes0 = sum(map(cpu_seconds, pids)), etcd_bytes(etcd)
        time.sleep(idle_window)
        idle_rate = (sum(map(cpu_seconds, pids)) - cpu0) / idle_window
        idle_bytes = (etcd_bytes(etcd) - bytes0) / idle_window

        perf = None
        if os.environ.get("NBDCLONE_SIM_PERF"):  # one host sampled by perf over the flips
            perf = subprocess.Popen(["perf", "record", "-F", "2999", "-g", "-o", os.environ["NBDCLONE_SIM_PERF"],
                                     "-p", str(pids[0])], stderr=subprocess.DEVNULL)  # fmt: skip
            time.sleep(1)
        offsets = {store: (store / "host.log").stat().st_size for store in stores}
        last: list[float] = []
        bytes0, cpu0, t_start = etcd_bytes(etcd), sum(map(cpu_seconds, pids)), time.monotonic()
        for k in range(args.flips):
            vid = "2" if k % 2 == 0 else "1"
            t0 = time.time()
            fleet_catalog.run(config("publisher"), lambda c, vid=vid: c.bases.promote("gold", vid))
            moved: dict[Path, float] = {}
            deadline = time.monotonic() + 120
            while len(moved) < len(stores):
                for store in stores:
                    if store in moved:
                        continue
                    with open(store / "host.log", "rb") as f:
                        f.seek(offsets[store])
                        for line in f.read().decode().splitlines():
                            if FLIPPED in line and line.endswith(f"-> {vid}"):
                                moved[store] = float(line.split()[0])
                        offsets[store] = f.tell()
                if time.monotonic() > deadline:
                    raise SystemExit(f"flip {k}: {len(stores) - len(moved)} host(s) did not follow in 120 s")
                time.sleep(0.05)
            last.append(max(moved.values()) - t0)
        window = time.monotonic() - t_start
        if perf is not None:
            perf.send_signal(signal.SIGINT)
            perf.wait()
        if os.environ.get("NBDCLONE_SIM_PROFILE"):
            os.kill(pids[0], signal.SIGUSR1)
            time.sleep(1)
            shutil.copy(stores[0] / "host.prof", os.environ["NBDCLONE_SIM_PROFILE"])
        cpu = sum(map(cpu_seconds, pids)) - cpu0 - idle_rate * window
        traffic = etcd_bytes(etcd) - bytes0 - idle_bytes * window
        results["flip_to_last_host_ms"] = {
            "p50": round(pct(last, 0.5) * 1e3, 1),
            "p99": round(pct(last, 0.99) * 1e3, 1),
        }
        results["host_cpu_per_flip_ms"] = round(cpu / args.flips / args.sim_hosts * 1e3, 2)
        results["host_idle_cpu_ms_per_s"] = round(idle_rate / args.sim_hosts * 1e3, 2)
        results["etcd_idle_bytes_per_s"] = round(idle_bytes)
        results["etcd_bytes_per_flip"] = round(traffic / args.flips)
        results["etcd_bytes_per_flip_per_host"] = round(traffic / args.flips / args.sim_hosts)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        engines_down(engines)
        shutil.rmtree(work, ignore_errors=True)
    report(results, args.json)


def _pointer(store: Path) -> str | None:
    from nbdclone.store import Store

    st = Store(store)
    record = st.catalog().bases.get("gold")
    return None if record is None else st.current_version(record)


def _holds(store: Path, versions: set[str]) -> bool:
    from nbdclone.store import Store

    record = Store(store).catalog().bases.get("gold")
    return record is not None and versions <= set(record.versions)


if __name__ == "__main__":
    main()
