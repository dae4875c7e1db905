"""scripts/bench --diff: how long `clone diff` takes on a big sparse clone (issue 28: a 1 TiB clone with a
few GiB changed, well under a second).

A base of --size (sparse: 64 MiB of data at its start), a clone of it; --changed MiB written in 64 KiB
pieces spread over the whole disk, a snapshot, as much again, a second snapshot, as much again. Times,
median of --rounds each (the store's files in the page cache, as on a host that serves the clone):

  overlay    diff since the last snapshot: the clone's overlay (the blocks written since)
  maps       diff between the two snapshots: their maps compared (every page of a 1 TiB disk)
  both       diff from the first snapshot to now: maps, then the overlay
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MiB = 1 << 20
PIECE = 64 * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1 << 20, help="the disk's size in MiB (default 1 TiB)")
    ap.add_argument("--changed", type=int, default=2048, help="MiB written between states (default 2 GiB)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=None, help="where the store goes (default: a temp dir)")
    args = ap.parse_args()
    from nbdclone.store import Store, diff, lineage
    from nbdclone.store.images import import_base
    from nbdclone.store.registry import Registry

    work = Path(tempfile.mkdtemp(prefix="nbdclone-diff-bench-", dir=args.dir))
    size = args.size * MiB
    rng = random.Random(1)  # noqa: S311 (where the writes go, not a secret)
    try:
        image = work / "base.raw"
        with open(image, "wb") as f:
            f.truncate(size)
            f.write(os.urandom(64 * MiB))
        st = Store(work / "store")
        import_base(st, "gold", image)
        st.create_clones(["big"], base="gold")

        def write() -> float:
            t = time.monotonic()
            registry = Registry(st)
            clone = registry.acquire("big")
            pieces = args.changed * MiB // PIECE
            data = os.urandom(PIECE)
            for off in sorted(rng.sample(range(size // PIECE), pieces)):
                clone.pwrite(memoryview(data), off * PIECE)
            clone.flush()
            registry.release("big")
            registry.close_all()
            return time.monotonic() - t

        setup = {"write_s": [round(write(), 1)]}
        t = time.monotonic()
        lineage.snapshot(st, "big", "s1")
        setup["snapshot_s"] = [round(time.monotonic() - t, 1)]
        setup["write_s"].append(round(write(), 1))
        t = time.monotonic()
        lineage.snapshot(st, "big", "s2")
        setup["snapshot_s"].append(round(time.monotonic() - t, 1))
        setup["write_s"].append(round(write(), 1))

        cases = {"overlay": ("s2", None), "maps": ("s1", "s2"), "both": ("s1", None)}
        results: dict[str, object] = {"size_mib": args.size, "changed_mib": args.changed, **setup}
        for name, (since, until) in cases.items():
            times, found = [], None
            for _ in range(args.rounds):
                t = time.perf_counter()
                found = diff.diff(st, "big", since, until)
                times.append(time.perf_counter() - t)
            assert found is not None
            results[name] = {
                "median_ms": round(statistics.median(times) * 1e3, 1),
                "min_ms": round(min(times) * 1e3, 1),
                "max_ms": round(max(times) * 1e3, 1),
                "extents": len(found.extents),
                "changed_mib": round(found.changed / MiB, 1),
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
