"""Which clones this host may serve, and until when: the fence between hosts.

    supervisor (follow.py)   keeps the host's etcd lease alive (TTL LEASE_TTL); after each refresh that
                             etcd answered, writes run/fleet-lease.json: valid_until = the time the
                             refresh was *sent* + LEASE_TTL - MARGIN, and the clones etcd says it owns
    each worker (Fence)      reads that file every FENCE_EVERY; a first connection to a clone it does not
                             own is refused; every request compares the monotonic clock with its
                             connection's copy of the deadline (0 once its clone is another host's)

Another host may take a clone over only once this host's lease key is gone from etcd, which is LEASE_TTL
after the last refresh etcd saw, so after valid_until here. A host that is frozen (SIGSTOP), partitioned or
whose supervisor died and was not started again stops serving at valid_until: requests wait, unanswered,
for HOLD seconds and then fail (ESHUTDOWN), and do not reach the overlay meanwhile; a write that finishes
after it is reported failed. When the lease is back, clones another host took meanwhile (or took and gave
back: a new epoch) are revoked before the new deadline is published, and the waiting requests of the
others go on: an etcd outage up to LEASE_TTL - MARGIN - LEASE_TTL/5 costs no request anything, one up to
HOLD longer costs a pause.

A new supervisor (after a crash: its workers were adopted) leaves the file in place: until valid_until,
the lease it was written under is alive in etcd (only this host refreshes it, and a host's key is deleted
by nobody while its lease lives), so no clone of this host can have been taken over. It resumes that lease
if etcd still has it with the host's key on it, which to etcd is the same host refreshing its lease;
otherwise it registers a new one. Either way the workers serve on without a gap, as under a supervisor
that lived. What remains: a reply already past the last
check when the process was frozen (microseconds of code) goes out when it resumes.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from nbdclone.runtime import RunDir
from nbdclone.store.layout import write_atomic

#: Seconds: an etcd restart (about 1 s) fences nothing. Tests shorten it (NBDCLONE_FLEET_LEASE_TTL).
LEASE_TTL = int(os.environ.get("NBDCLONE_FLEET_LEASE_TTL", "15"))
MARGIN = max(1, LEASE_TTL // 5)  # seconds this host stops before etcd can hand its clones to another
FENCE_EVERY = 0.5
#: Seconds a request that finds the lease lapsed waits for it to be renewed before it fails (plugin._held).
HOLD = float(os.environ.get("NBDCLONE_FLEET_HOLD", str(LEASE_TTL)))
NEVER = 1 << 62  # no fence (single-host mode)


def write(run_dir: RunDir, host: str, valid_until: float, owned: dict[str, int], lease_id: int) -> None:
    doc = {"host": host, "valid_until": valid_until, "owned": owned, "lease": lease_id}
    write_atomic(run_dir.fleet_lease, json.dumps(doc), run_dir.path)


def lease_id(path: Path) -> int | None:
    """The etcd lease the last supervisor held, if the file names one."""
    try:
        return int(json.loads(path.read_text())["lease"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read(path: Path) -> tuple[float, dict[str, int]]:
    """(valid_until as wall time, owned clones -> epoch); (0, {}) if there is no readable lease."""
    try:
        doc = json.loads(path.read_text())
        return float(doc["valid_until"]), {str(k): int(v) for k, v in doc["owned"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return 0.0, {}


class Fence:
    """A worker's view of the lease. Each open connection holds its own copy of the deadline
    (time.monotonic_ns), compared on the request path without a lock (an int assignment is atomic); the
    fence thread hands every connection the new deadline, or 0 if its clone is another host's now, before
    new connections use it. A connection's copy is at most FENCE_EVERY old: if the lease was not renewed
    meanwhile, an older deadline, the safe direction."""

    def __init__(self, run_dir: RunDir | None) -> None:
        """With no run dir (single-host mode) nothing is ever fenced."""
        self.path = run_dir.fleet_lease if run_dir is not None else None
        self.deadline_ns = 0 if run_dir is not None else NEVER  # fleet: nothing is served until a lease is read
        self.owned: dict[str, int] = {}

    def refresh(self, apply: Callable[[set[str], int], None]) -> None:
        """Read the lease file; `apply(lost clones, deadline)` hands the new deadline to the open
        connections (and revokes the lost clones' ones) before it is used for new connections."""
        if self.path is None:
            return
        valid_until, owned = read(self.path)
        # Gone, or moved away and back (a new epoch): a connection opened before is not the clone's now.
        lost = {name for name, epoch in self.owned.items() if owned.get(name) != epoch}
        left = valid_until - time.time()
        deadline = time.monotonic_ns() + int(left * 1e9) if left > 0 else 0
        apply(lost, deadline)
        self.owned = owned
        self.deadline_ns = deadline

    def owns(self, name: str) -> bool:
        if self.path is None:
            return True
        return name in self.owned and time.monotonic_ns() < self.deadline_ns

    def watch(self, apply: Callable[[set[str], int], None]) -> None:
        def run() -> None:
            while True:
                self.refresh(apply)
                time.sleep(FENCE_EVERY)

        threading.Thread(target=run, name="nbdclone-fence", daemon=True).start()


def in_fleet(store: Path) -> bool:
    return os.path.exists(store / "fleet.json")
