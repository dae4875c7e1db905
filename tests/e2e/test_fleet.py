"""Fleet mode against a real etcd and a real Ceph (one monitor, one BlueStore OSD), started once for this
module by the project's scripts/fleet-engines. Hosts are separate stores and separate servers."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest

from nbdclone import errors
from nbdclone.fleet.catalog import FleetCatalog, FlipLost, run
from nbdclone.fleet.config import FleetConfig
from nbdclone.fleet.follow import View
from nbdclone.store import Store
from nbdclone.store.layout import CRASH_AT_ENV
from tests.helpers import NBDCLONE, Server, cli, make_image, pread_all, wait_closed

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20
SIZE = 24 * MiB


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    where = tmp_path_factory.mktemp("engines")
    env = {"ETCD_PORT": "23791", "CEPH_MON_PORT": "16789", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    up = subprocess.run(
        [ROOT / "scripts" / "fleet-engines", "up", str(where)], env=env, capture_output=True, text=True, check=False
    )
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        yield dict(line.split("=", 1) for line in up.stdout.split())
    finally:
        subprocess.run([ROOT / "scripts" / "fleet-engines", "down", str(where)], check=True)


@pytest.fixture
def fleet(engines: dict[str, str], tmp_path: Path) -> FleetConfig:
    """A fleet of its own (an etcd prefix and a RADOS namespace) on the shared engines."""
    return FleetConfig(engines["NBDCLONE_ETCD"], engines["CEPH_CONF"], engines["NBDCLONE_POOL"], uuid.uuid4().hex[:12])


def _join(fleet: FleetConfig, store: Path, host: str) -> None:
    cli("fleet", "join", fleet.etcd, "--ceph-conf", fleet.ceph_conf, "--name", fleet.name, "--host", host, store=store)


def _current(store: Path, base: str) -> str | None:
    rows = json.loads(cli("base", "list", "--json", store=store).stdout)["versions"]
    return next((r["version"] for r in rows if r["base"] == base and r["current"]), None)


def _read(server: Server, store: Path, name: str) -> bytes:
    h = server.connect(name)
    data = pread_all(h, SIZE)
    h.shutdown()
    wait_closed(store, name)
    return data


def test_hosts_share_one_base_and_follow_a_flip(tmp_path: Path, fleet: FleetConfig) -> None:
    v1 = make_image(tmp_path / "v1.raw", SIZE, [(0, 6 * MiB), (12 * MiB, MiB)], seed=1)
    v2 = bytearray(v1)
    v2[3 * MiB : 3 * MiB + 200_000] = b"\x42" * 200_000  # 4 chunks change
    (tmp_path / "v2.raw").write_bytes(v2)
    hosts = {h: tmp_path / h for h in ("h1", "h2", "h3")}
    for name, store in hosts.items():
        _join(fleet, store, name)
    cli("base", "import", "gold", str(tmp_path / "v1.raw"), store=hosts["h1"])

    servers = {h: Server(hosts[h], tmp_path / f"{h}.sock").start() for h in ("h2", "h3")}
    try:
        for h, srv in servers.items():
            cli("clone", "create", f"follows-{h}", "--base", "gold", store=hosts[h])
            cli("clone", "create", f"pinned-{h}", "--base", "gold@1", store=hosts[h])
            for clone in (f"follows-{h}", f"pinned-{h}"):
                assert hashlib.sha256(_read(srv, hosts[h], clone)).digest() == hashlib.sha256(v1).digest()
        taken = cli("clone", "create", "follows-h2", "--base", "gold", store=hosts["h3"], check=False)
        assert taken.returncode == 1 and "on host h2" in taken.stderr  # one name, one owner, fleet-wide

        cli("base", "import", "gold", str(tmp_path / "v2.raw"), store=hosts["h1"])
        flipped = time.monotonic()
        assert "current version 1 -> 2" in cli("base", "promote", "gold", "2", store=hosts["h1"]).stdout
        deadline = time.monotonic() + 60
        while any(_current(hosts[h], "gold") != "2" for h in servers):  # their servers follow the watch
            assert time.monotonic() < deadline, [srv.log for srv in servers.values()]
            time.sleep(0.05)
        print(f"flip on h1 to the last host's pointer: {time.monotonic() - flipped:.2f} s")
        for h, srv in servers.items():
            assert _read(srv, hosts[h], f"follows-{h}") == v2  # moved at its next first connection
            assert _read(srv, hosts[h], f"pinned-{h}") == v1  # pinned clones stay
            # Staged without bytes, filled when read (or from the boot trace h2 gave the fleet): each
            # chunk either version holds came to each host once.
            stats = _fetch_stats(hosts[h])
            assert stats["chunks"] + stats["trace_chunks"] == len(_distinct_chunks(v1, v2)), stats
    finally:
        for srv in servers.values():
            srv.stop()

    # A host that has version 1 stages version 2 with slots only for what version 2 changed, fetches
    # nothing until something reads, and reads fetch (here, with no server running, in the CLI's process).
    _join(fleet, hosts.setdefault("h4", tmp_path / "h4"), "h4")
    cli("clone", "create", "old", "--base", "gold@1", store=hosts["h4"])  # stages version 1 only
    report = json.loads(cli("fleet", "sync", "--json", store=hosts["h4"]).stdout)
    changed = len(_distinct_chunks(v2) - _distinct_chunks(v1))
    assert report["staged"] == ["gold@2"] and report["remote"] == changed and report["fetched"] == 0, report
    assert report["reads"] == 1  # its map
    checked = cli("check", store=hosts["h4"])
    assert checked.returncode == 0 and f"{len(_distinct_chunks(v1, v2))} chunks to fetch" in checked.stdout
    fetched = {
        r["version"]: r["fetched"]
        for r in json.loads(cli("fleet", "status", "--json", store=hosts["h4"]).stdout)["versions"]
    }
    assert fetched == {"1": 0.0, "2": 0.0}
    cli("clone", "export", "old", str(tmp_path / "old.raw"), store=hosts["h4"])
    assert (tmp_path / "old.raw").read_bytes() == v1
    fetched = {
        r["version"]: r["fetched"]
        for r in json.loads(cli("fleet", "status", "--json", store=hosts["h4"]).stdout)["versions"]
    }
    assert fetched["1"] == 1.0
    filled = json.loads(cli("fleet", "sync", "--all-chunks", "--json", store=hosts["h4"]).stdout)
    # version 1's came with the export (and its readahead may have brought version 2's)
    assert filled["staged"] == [] and filled["fetched"] <= changed
    assert _fetched_share(hosts["h4"]) == {"1": 1.0, "2": 1.0}
    again = json.loads(cli("fleet", "sync", "--all-chunks", "--json", store=hosts["h4"]).stdout)
    assert again["staged"] == [] and again["fetched"] == 0 and again["reads"] == 0
    checked = cli("check", store=hosts["h4"])
    assert checked.returncode == 0 and "to fetch" not in checked.stdout


def _fetched_share(store: Path) -> dict[str, float]:
    """Per version on this host, the share of its chunks fetched (fleet status)."""
    rows = json.loads(cli("fleet", "status", "--json", store=store).stdout)["versions"]
    return {r["version"]: r["fetched"] for r in rows if r["here"]}


def _distinct_chunks(*images: bytes) -> set[bytes]:
    """The distinct 64 KiB chunks of `images` that are not all zeros."""
    chunks = {bytes(image[at : at + 65536]) for image in images for at in range(0, len(image), 65536)}
    return chunks - {bytes(65536)}


def _fetch_stats(store: Path) -> dict[str, int]:
    data: dict[str, int] = json.loads((store / "run" / "stats-fetch.json").read_text())
    return data


def test_a_server_killed_while_it_fetches_loses_nothing(tmp_path: Path, fleet: FleetConfig) -> None:
    """Four connections read a cold clone (every read a fetch) and write and flush their own blocks; the
    server and its workers are killed (-9) in the middle. After a restart every flushed write reads back,
    every other byte is the base's, each chunk was fetched at most once per server run, and check is
    clean (slots a fetch was writing when it died are fetched again, R1)."""
    size = 64 * MiB
    image = os.urandom(size)
    (tmp_path / "gold.raw").write_bytes(image)
    hosts = {h: tmp_path / h for h in ("h1", "h2")}
    for name, store in hosts.items():
        _join(fleet, store, name)
    cli("base", "import", "gold", str(tmp_path / "gold.raw"), store=hosts["h1"])
    cli("clone", "create", "vm", "--base", "gold", store=hosts["h2"])
    srv = Server(hosts["h2"], tmp_path / "h2.sock").start()
    flushed: dict[int, bytes] = {}  # offset -> bytes, acknowledged and then flushed
    lock = threading.Lock()
    wrong: list[int] = []  # offsets of base reads that came back wrong
    region = 4 * MiB  # connection k writes [48 MiB + k * region, ...)

    def client(k: int) -> None:
        h = srv.connect("vm")
        pending: dict[int, bytes] = {}
        try:
            for j in range(10_000):
                off = ((j * 4 + k) * 131_072) % (48 * MiB)
                if h.pread(131_072, off) != image[off : off + 131_072]:
                    wrong.append(off)
                at = 48 * MiB + k * region + (j % 1024) * 4096
                data = bytes([k + 1, j % 256]) * 2048
                h.pwrite(data, at)
                pending[at] = data
                if j % 4 == 3:
                    h.flush()
                    with lock:
                        flushed.update(pending)
                    pending.clear()
        except nbd.Error:  # the server went away under us
            pass

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while not (tmp_path / "h2" / "run" / "stats-fetch.json").exists() or _fetch_stats(hosts["h2"])["chunks"] < 200:
        assert time.monotonic() < deadline, "no fetches"
        time.sleep(0.01)
    for pid in [srv.proc.pid, *(w["pid"] for w in srv.info()["workers"])]:  # type: ignore[union-attr]
        os.kill(pid, signal.SIGKILL)
    srv.proc.wait()  # type: ignore[union-attr]
    for t in threads:
        t.join(60)
    assert flushed and not wrong, ("nothing was flushed before the kill", wrong[:5])
    checked = cli("check", store=hosts["h2"])
    assert checked.returncode == 0 and "chunks to fetch" in checked.stdout, checked.stdout
    srv = Server(hosts["h2"], tmp_path / "h2.sock").start()
    try:
        h = srv.connect("vm")
        got = pread_all(h, size)
        h.shutdown()
        model = bytearray(image)
        for at, data in flushed.items():
            assert got[at : at + 4096] == data, f"a flushed write at {at} was lost"
            model[at : at + 4096] = data
        written = {at for k in range(4) for at in range(48 * MiB + k * region, 48 * MiB + (k + 1) * region, 4096)}
        for at in range(0, size, 4096):  # unflushed writes may or may not be there; nothing else changed
            if at not in written:
                assert got[at : at + 4096] == model[at : at + 4096], f"base bytes wrong at {at}"
        assert _fetch_stats(hosts["h2"])["chunks"] <= size // 65536
    finally:
        srv.stop()
    assert cli("check", store=hosts["h2"]).returncode == 0


def test_a_version_leaves_the_fleet_once_no_host_uses_it(
    tmp_path: Path, fleet: FleetConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """base rm NAME@V on a fleet host: refused for the current version; otherwise V is retiring (no flip
    to it, no new clone of it) until no host holds it: a host drops its copy once no clone there uses it,
    and then the fleet forgets it and fleet gc frees its chunks; clones of other versions read on. A host
    that is down keeps holding its versions until `fleet forget` (refused while its lease lives)."""
    monkeypatch.setenv("NBDCLONE_FLEET_LEASE_TTL", "4")
    v1 = make_image(tmp_path / "v1.raw", SIZE, [(0, 3 * MiB)], seed=41)
    v2 = make_image(tmp_path / "v2.raw", SIZE, [(0, 3 * MiB)], seed=42)
    hosts = {h: tmp_path / h for h in ("h1", "h2")}
    for name, store in hosts.items():
        _join(fleet, store, name)
    cli("base", "import", "gold", str(tmp_path / "v1.raw"), store=hosts["h1"])
    cli("base", "import", "gold", str(tmp_path / "v2.raw"), store=hosts["h1"])
    cli("base", "promote", "gold", "2", store=hosts["h1"])
    servers = {h: Server(hosts[h], tmp_path / f"{h}.sock").start() for h in hosts}
    try:
        cli("clone", "create", "pinned", "--base", "gold@1", store=hosts["h2"])
        cli("clone", "create", "follows", "--base", "gold", store=hosts["h1"])
        current = cli("base", "rm", "gold@2", store=hosts["h1"], check=False)
        assert current.returncode == 1 and current.stderr.count("\n") == 1 and "current" in current.stderr
        held = cli("base", "rm", "gold@1", "--wait", "2", store=hosts["h1"])
        assert "host(s) h2 still hold it" in held.stdout, held.stdout
        rows = json.loads(cli("fleet", "status", "--json", store=hosts["h1"]).stdout)["versions"]
        assert [(r["version"], r["retiring"], r["held_by"]) for r in rows] == [
            ("1", True, ["h2"]),
            ("2", False, ["h1", "h2"]),
        ]
        flip = cli("base", "promote", "gold", "1", store=hosts["h1"], check=False)
        assert flip.returncode == 1 and "being removed" in flip.stderr
        new = cli("clone", "create", "new", "--base", "gold@1", store=hosts["h1"], check=False)
        assert new.returncode == 1 and "being removed" in new.stderr
        assert _read(servers["h2"], hosts["h2"], "pinned") == v1  # what uses it reads on
        cli("clone", "rm", "pinned", store=hosts["h2"])
        gone = cli("base", "rm", "gold@1", "--wait", "30", store=hosts["h1"])
        assert "removed gold@1 from fleet" in gone.stdout, gone.stdout
        rows = json.loads(cli("fleet", "status", "--json", store=hosts["h1"]).stdout)["versions"]
        assert [r["version"] for r in rows] == ["2"]
        for h in hosts:
            assert set(Store(hosts[h]).catalog().bases["gold"].versions) == {"2"}
        freed = cli("fleet", "gc", store=hosts["h1"]).stdout
        only_v1 = len(_distinct_chunks(v1) - _distinct_chunks(v2))
        assert f"{only_v1} chunk(s) deleted, {len(_distinct_chunks(v2))} kept" in freed, freed
        assert _read(servers["h1"], hosts["h1"], "follows") == v2

        cli("base", "import", "gold", str(tmp_path / "v1.raw"), store=hosts["h1"])  # version 3
        deadline = time.monotonic() + 30
        while "3" not in Store(hosts["h2"]).catalog().bases["gold"].versions:  # h2's server staged it
            assert time.monotonic() < deadline
            time.sleep(0.05)
        servers["h2"].stop()  # h2 goes away for good, holding versions 2 and 3
        alive = cli("fleet", "forget", "h2", store=hosts["h1"], check=False)
        assert alive.returncode == 1 and "alive" in alive.stderr  # its lease has not lapsed yet
        held = cli("base", "rm", "gold@3", "--wait", "1", store=hosts["h1"])
        assert "host(s) h2 still hold it" in held.stdout, held.stdout
        deadline = time.monotonic() + 30
        while (forgot := cli("fleet", "forget", "h2", store=hosts["h1"], check=False)).returncode:
            assert time.monotonic() < deadline and "alive" in forgot.stderr, forgot.stderr
            time.sleep(0.5)
        assert "it held 2 version(s)" in forgot.stdout
        assert "removed gold@3 from fleet" in cli("base", "rm", "gold@3", store=hosts["h1"]).stdout
    finally:
        for srv in servers.values():
            srv.stop()
    assert cli("check", store=hosts["h2"]).returncode == 0


def test_a_flip_race_has_one_winner(tmp_path: Path, fleet: FleetConfig) -> None:
    """Two hosts flip from the same pointer revision: one etcd transaction wins, the other is told the
    winner and changes nothing; a version etcd does not name cannot be made current."""
    for v in ("1", "2", "3"):
        make_image(tmp_path / f"v{v}.raw", 4 * MiB, [(0, MiB)], seed=int(v))
    _join(fleet, tmp_path / "h1", "h1")
    for v in ("1", "2", "3"):
        cli("base", "import", "os", str(tmp_path / f"v{v}.raw"), store=tmp_path / "h1")

    async def race() -> tuple[str, str]:
        async with FleetCatalog(fleet) as a, FleetCatalog(fleet) as b:
            current = await a.bases.current("os")
            assert current is not None and current[0] == "1"
            await a.bases.promote("os", "2", seen=current[1])
            with pytest.raises(FlipLost) as lost:
                await b.bases.promote("os", "3", seen=current[1])
            with pytest.raises(errors.VersionNotFound):
                await b.bases.promote("os", "9")
            now = await b.bases.current("os")
            assert now is not None
            return str(lost.value), now[0]

    message, now = asyncio.run(race())
    assert now == "2" and "to version 2" in message


def _fill(fleet: FleetConfig, n: int, host: str) -> None:
    """`n` clone records of `host`, as large as real ones, 100 per transaction (etcd allows 128)."""

    async def fill(c: FleetCatalog) -> None:
        tx = c._client.transactions
        value = json.dumps({"host": host, "epoch": 1, "store": "/srv/nbdclone/" + "s" * 40, "id": "0" * 32})
        for at in range(0, n, 100):
            puts = [tx.put(c._key("clones", f"elsewhere-{i:06d}"), value.encode()) for i in range(at, min(n, at + 100))]
            await c._client.transaction(compare=[], success=puts, failure=[])

    run(fleet, fill)


def test_a_catalog_larger_than_one_grpc_reply_serves_and_follows(tmp_path: Path, fleet: FleetConfig) -> None:
    """100,000 clone records of other hosts (about 17 MB: four times gRPC's 4 MiB reply limit, which an
    unpaged read of them hits): a host's lease refresh and sync read only its own clones, so it serves and
    follows a flip; fleet-wide reads are paged; a host whose owner index entry is missing (a fleet written
    before the index) rebuilds it when its server starts, reading its own clones' records only."""
    _fill(fleet, 100_000, "elsewhere")
    with pytest.raises(Exception, match=r"RESOURCE_EXHAUSTED|larger than max"):
        run(fleet, lambda c: c._client.get_prefix(c._key("clones", "")))
    assert len(run(fleet, lambda c: c.clones.all())) == 100_000

    v1 = make_image(tmp_path / "v1.raw", 4 * MiB, [(0, MiB)], seed=11)
    v2 = make_image(tmp_path / "v2.raw", 4 * MiB, [(0, MiB)], seed=12)
    store = tmp_path / "h1"
    _join(fleet, store, "h1")
    cli("base", "import", "gold", str(tmp_path / "v1.raw"), store=store)
    server = Server(store, tmp_path / "h1.sock").start()
    try:
        cli("clone", "create", "mine", "--base", "gold", store=store)
        assert run(fleet, lambda c: c.clones.owned("h1")) == {"mine": 1}
        h = server.connect("mine")
        assert pread_all(h, 4 * MiB) == v1
        h.shutdown()
        wait_closed(store, "mine")
        cli("base", "import", "gold", str(tmp_path / "v2.raw"), store=store)
        cli("base", "promote", "gold", "2", store=store)
        deadline = time.monotonic() + 30
        while _current(store, "gold") != "2":
            assert time.monotonic() < deadline, server.log
            time.sleep(0.05)
        h = server.connect("mine")
        assert pread_all(h, 4 * MiB) == v2
        h.shutdown()
        wait_closed(store, "mine")
    finally:
        server.stop()
    run(fleet, lambda c: c._client.delete(c.clones._owner_key("h1", "mine")))
    server = Server(store, tmp_path / "h1.sock").start()
    try:
        deadline = time.monotonic() + 30
        while run(fleet, lambda c: c.clones.owned("h1")) != {"mine": 1}:
            assert time.monotonic() < deadline, server.log
            time.sleep(0.2)
        assert any("1 owner index entries set" in line for line in server.log)
        time.sleep(4)  # a lease refresh (every 3 s) after it: the lease file names the clone
        h = server.connect("mine")
        assert pread_all(h, 4 * MiB) == v2
        h.shutdown()
    finally:
        server.stop()


def test_a_host_s_view_of_the_bases_follows_the_watch_and_lists_again_after_compaction(fleet: FleetConfig) -> None:
    """A follower's view of bases/ (one paged list, then the watch) equals a fresh list after puts, deletes
    and a flip; a watch resumed from a revision etcd compacted meanwhile lists again (and only then)."""

    async def scenario() -> None:
        view, loads = View("h1"), []
        load = view.load
        view.load = lambda revision, keys: (loads.append(revision), load(revision, keys))  # type: ignore[method-assign]

        async def keeping() -> asyncio.Task[None]:
            task = asyncio.ensure_future(view.keep(fleet, asyncio.Event(), lambda key, value: None))
            while not view.listed:
                await asyncio.sleep(0.02)
            return task

        async def agrees(c: FleetCatalog) -> None:
            deadline = time.monotonic() + 10
            while view.keys != {k: v for k, v in (await c.bases.listing())[1].items() if not k.endswith("/h2")}:
                assert time.monotonic() < deadline, "the view did not catch up"
                await asyncio.sleep(0.05)

        async with FleetCatalog(fleet) as c:
            tx = c._client.transactions
            for at in range(0, 2500, 100):  # more than one page
                puts = [
                    tx.put(c._key("bases", f"b{i % 5}", "versions", str(i)), b"v%d" % i) for i in range(at, at + 100)
                ]
                await c._client.transaction(compare=[], success=puts, failure=[])
            task = await keeping()
            assert len(view.keys) == 2500 and len(loads) == 1
            await c._client.put(c._key("bases", "b1", "current"), b"7")
            await c._client.delete(c._key("bases", "b2", "versions", "2"))
            await c._client.put(c._key("clones", "x"), b"{}")  # not a base key: wakes, is not kept
            await c._client.put(c._key("bases", "b1", "holds", "7", "h1"), b"1")  # this host's hold: kept
            await c._client.put(c._key("bases", "b1", "holds", "7", "h2"), b"1")  # another's: not kept
            await agrees(c)
            assert view.keys["b1/current"] == b"7" and "b2/versions/2" not in view.keys
            assert "b1/holds/7/h1" in view.keys and "b1/holds/7/h2" not in view.keys
            task.cancel()
            stale = view.revision
            await c._client.put(c._key("bases", "b1", "current"), b"9")
            await c._client.delete(c._key("bases", "b3", "versions", "3"))
            newest, _ = await c.bases.listing()
            await c._client.compact(newest)
            task = await keeping()
            await agrees(c)
            assert len(loads) == 2 and loads[1] >= newest > stale  # listed again, at or after the compaction
            assert view.keys["b1/current"] == b"9"
            task.cancel()

    asyncio.run(scenario())


def test_a_flip_reaches_a_host_that_cannot_reach_ceph(
    tmp_path: Path, fleet: FleetConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host whose Ceph cannot be reached still follows a flip to a version it staged ahead (a sync stages
    the versions newer than the current one): its pointer moves before anything asks Ceph, and the sync
    then fails in one line."""
    monkeypatch.setenv("NBDCLONE_FLEET_TIMEOUT", "3")
    for v in ("1", "2"):
        make_image(tmp_path / f"v{v}.raw", 4 * MiB, [(0, MiB)], seed=30 + int(v))
    hosts = {h: tmp_path / h for h in ("h1", "h2")}
    for name, store in hosts.items():
        _join(fleet, store, name)
    for v in ("1", "2"):
        cli("base", "import", "gold", str(tmp_path / f"v{v}.raw"), store=hosts["h1"])
    cli("fleet", "sync", store=hosts["h2"])  # stages 1 (current) and 2 (newer, ahead of a flip)
    assert _current(hosts["h2"], "gold") == "1"
    conf = Path(fleet.ceph_conf).read_text()
    dead = tmp_path / "dead-ceph.conf"  # a monitor nobody listens on: librados cannot connect
    dead.write_text(
        "\n".join("mon host = 127.0.0.1:9" if ln.startswith("mon host") else ln for ln in conf.splitlines())
    )
    settings = json.loads((hosts["h2"] / "fleet.json").read_text())
    (hosts["h2"] / "fleet.json").write_text(json.dumps({**settings, "ceph_conf": str(dead)}))
    cli("base", "promote", "gold", "2", store=hosts["h1"])
    synced = cli("fleet", "sync", store=hosts["h2"], check=False)
    assert synced.returncode == 1 and synced.stderr.count("\n") == 1 and "Ceph" in synced.stderr, synced.stderr
    assert _current(hosts["h2"], "gold") == "2"


def test_fleet_commands_fail_clearly_without_a_fleet(tmp_path: Path, fleet: FleetConfig) -> None:
    bad = cli("fleet", "sync", store=tmp_path / "alone", check=False)
    assert bad.returncode == 1 and "is in no fleet" in bad.stderr and bad.stderr.count("\n") == 1
    nowhere = cli(
        "fleet", "join", "http://127.0.0.1:1", "--ceph-conf", fleet.ceph_conf, store=tmp_path / "x", check=False
    )
    assert nowhere.returncode == 1 and "etcd at http://127.0.0.1:1 did not answer" in nowhere.stderr
    assert not (tmp_path / "x" / "fleet.json").exists()


def _wait_owned(store: Path, name: str, timeout: float = 30) -> None:
    """Until this host's server serves `name`: its lease file names it and its store has adopted it (the
    lease file is rewritten as soon as etcd says so, the adoption follows in the server's next sync)."""
    deadline = time.monotonic() + timeout
    while (
        name not in json.loads((store / "run" / "fleet-lease.json").read_text())["owned"]
        or name not in Store(store).catalog().clones
    ):
        assert time.monotonic() < deadline, f"{name} was not taken up by {store}"
        time.sleep(0.05)


def _two_hosts_with_gold(tmp_path: Path, fleet: FleetConfig, seed: int) -> dict[str, Path]:
    """Hosts h1 and h2 of `fleet`; base gold (4 MiB of data in SIZE) imported on h1."""
    make_image(tmp_path / "v1.raw", SIZE, [(0, 4 * MiB)], seed=seed)
    hosts = {h: tmp_path / h for h in ("h1", "h2")}
    for name, store in hosts.items():
        _join(fleet, store, name)
    cli("base", "import", "gold", str(tmp_path / "v1.raw"), store=hosts["h1"])
    return hosts


def _owner(fleet: FleetConfig, name: str) -> tuple[str, int]:
    async def look() -> tuple[str, int]:
        async with FleetCatalog(fleet) as c:
            rec = (await c.clones.all())[name]
            return rec["host"], rec["epoch"]

    return asyncio.run(look())


@pytest.mark.parametrize("crash", [None, "move-switch", "move-clean"])
def test_a_clone_moves_between_hosts_and_a_killed_move_leaves_one_owner(
    tmp_path: Path, fleet: FleetConfig, crash: str | None
) -> None:
    hosts = _two_hosts_with_gold(tmp_path, fleet, seed=3)
    servers = {h: Server(hosts[h], tmp_path / f"{h}.sock").start() for h in hosts}
    try:
        cli("clone", "create", "vm", "--base", "gold", store=hosts["h1"])
        model = bytearray(_read(servers["h1"], hosts["h1"], "vm"))
        h = servers["h1"].connect("vm")
        for off, data in ((MiB + 5, b"moved" * 50_000), (SIZE - 4096, b"\x7e" * 4096), (2 * MiB, bytes(70_000))):
            h.pwrite(data, off)
            model[off : off + len(data)] = data
        h.flush()
        refused = cli("clone", "move", "vm", "--to", "h2", store=hosts["h1"], check=False)
        assert refused.returncode == 1 and "disconnect its clients first" in refused.stderr
        h.shutdown()
        wait_closed(hosts["h1"], "vm")

        env = {**os.environ, CRASH_AT_ENV: crash} if crash else None
        moved = subprocess.run(
            [NBDCLONE, "clone", "move", "vm", "--to", "h2", "--store", str(hosts["h1"])],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert moved.returncode == (-9 if crash else 0), moved.stderr
        owner, epoch = _owner(fleet, "vm")
        assert (owner, epoch) == (("h1", 1) if crash == "move-switch" else ("h2", 2))
        other = "h2" if owner == "h1" else "h1"
        _wait_owned(hosts[owner], "vm")
        deadline = time.monotonic() + 30  # the owner adopts (or keeps), the other drops its copy
        while not any(
            c["name"] == "vm" for c in json.loads(cli("clone", "list", "--json", store=hosts[owner]).stdout)["clones"]
        ):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert _read(servers[owner], hosts[owner], "vm") == model
        while any(
            c["name"] == "vm" for c in json.loads(cli("clone", "list", "--json", store=hosts[other]).stdout)["clones"]
        ):
            assert time.monotonic() < deadline, "the old host kept its copy"
            time.sleep(0.05)
        with pytest.raises(nbd.Error):
            servers[other].connect("vm")
    finally:
        for srv in servers.values():
            srv.stop()
    for store in hosts.values():
        assert cli("check", store=store).returncode == 0


def test_a_move_drains_a_connected_clone(tmp_path: Path, fleet: FleetConfig) -> None:
    """clone move --drain: new clients are refused at once, the connected one finishes (its last writes
    go with the clone), then the clone moves; a client that does not leave in time makes the move fail
    in one line, and the clone serves on here."""
    hosts = _two_hosts_with_gold(tmp_path, fleet, seed=5)
    servers = {h: Server(hosts[h], tmp_path / f"{h}.sock").start() for h in hosts}
    try:
        cli("clone", "create", "vm", "--base", "gold", store=hosts["h1"])
        h = servers["h1"].connect("vm")
        h.pwrite(b"before" * 1000, 0)
        h.flush()
        stuck = cli("clone", "move", "vm", "--to", "h2", "--drain", "1", store=hosts["h1"], check=False)
        assert stuck.returncode == 1 and stuck.stderr.count("\n") == 1 and "disconnect" in stuck.stderr
        other = servers["h1"].connect("vm")  # the failed drain let go: new clients come in again
        other.shutdown()
        mover = subprocess.Popen(
            [NBDCLONE, "clone", "move", "vm", "--to", "h2", "--drain", "60", "--store", str(hosts["h1"])],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 30
        while True:  # draining: a new client is refused, the connected one still works
            try:
                servers["h1"].connect("vm").shutdown()
            except nbd.Error:
                break
            assert time.monotonic() < deadline, "a new client was let in while the clone drained"
            time.sleep(0.05)
        h.pwrite(b"after!" * 1000, 65536)
        h.flush()
        assert mover.poll() is None  # it waits for the client
        h.shutdown()
        out, err = mover.communicate(timeout=60)
        assert mover.returncode == 0 and "host h2's now" in out, err
        _wait_owned(hosts["h2"], "vm")
        data = _read(servers["h2"], hosts["h2"], "vm")
        assert data[:6000] == b"before" * 1000 and data[65536 : 65536 + 6000] == b"after!" * 1000
    finally:
        for srv in servers.values():
            srv.stop()


def test_a_frozen_host_is_fenced_while_another_takes_its_clone_over(
    tmp_path: Path, fleet: FleetConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """h1's server is frozen (SIGSTOP) with a client connected; once its lease is gone, h2 takes the clone
    over with every acknowledged write; when h1 wakes, it serves the clone no more (no two hosts ever
    serve it), and it drops its copy once its client is gone."""
    monkeypatch.setenv("NBDCLONE_FLEET_LEASE_TTL", "4")
    hosts = _two_hosts_with_gold(tmp_path, fleet, seed=5)
    servers = {h: Server(hosts[h], tmp_path / f"{h}.sock").start() for h in hosts}
    frozen: list[int] = []
    try:
        cli("clone", "create", "vm", "--base", "gold", store=hosts["h1"])
        h = servers["h1"].connect("vm")
        model = bytearray(pread_all(h, SIZE))
        for k in range(40):  # acknowledged, some flushed, the last ones not
            data = bytes([k + 1]) * 8192
            h.pwrite(data, k * 300_000)
            model[k * 300_000 : k * 300_000 + 8192] = data
            if k == 20:
                h.flush()
        info = servers["h1"].info()
        frozen = [info["pid"], *(w["pid"] for w in info["workers"])]
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)

        async def lease_gone() -> None:
            async with FleetCatalog(fleet) as c:
                deadline = time.monotonic() + 30
                while await c.hosts.get("h1") is not None:
                    assert time.monotonic() < deadline, "h1's lease did not expire"
                    await asyncio.sleep(0.1)

        asyncio.run(lease_gone())
        cli("clone", "move", "vm", "--to", "h2", "--force", store=hosts["h2"])
        assert _owner(fleet, "vm") == ("h2", 2)
        _wait_owned(hosts["h2"], "vm")
        assert _read(servers["h2"], hosts["h2"], "vm") == model  # nothing acknowledged is lost

        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
        frozen = []
        with pytest.raises(nbd.Error):  # h1 woke up past its lease: its old connection is refused...
            h.pwrite(b"late" * 1024, 0)
        with pytest.raises(nbd.Error):
            h.pread(4096, 0)
        with pytest.raises(nbd.Error):  # ...and so is a new one
            servers["h1"].connect("vm")
        with contextlib.suppress(nbd.Error):
            h.shutdown()
        deadline = time.monotonic() + 30
        while any(
            c["name"] == "vm" for c in json.loads(cli("clone", "list", "--json", store=hosts["h1"]).stdout)["clones"]
        ):
            assert time.monotonic() < deadline, "h1 kept its copy"
            time.sleep(0.1)
        assert _read(servers["h2"], hosts["h2"], "vm") == model
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
        for srv in servers.values():
            srv.stop()


def _leased_host(
    tmp_path: Path, fleet: FleetConfig, engines: dict[str, str], mp: pytest.MonkeyPatch, *, hold: int, seed: int
) -> tuple[list[str], Path, Path, Server]:
    """Host h1 with base gold (4 MiB), its server started with a 4 s lease, a hold of `hold` seconds and
    3 s etcd requests: (the engines' command, their folder, the store, the server)."""
    mp.setenv("NBDCLONE_FLEET_LEASE_TTL", "4")
    mp.setenv("NBDCLONE_FLEET_HOLD", str(hold))
    mp.setenv("NBDCLONE_FLEET_TIMEOUT", "3")
    make_image(tmp_path / "v1.raw", 4 * MiB, [(0, MiB)], seed=seed)
    store = tmp_path / "h1"
    _join(fleet, store, "h1")
    cli("base", "import", "gold", str(tmp_path / "v1.raw"), store=store)
    engine = [str(ROOT / "scripts" / "fleet-engines")]
    return engine, Path(engines["CEPH_CONF"]).parent, store, Server(store, tmp_path / "h1.sock").start()


def test_an_etcd_outage_longer_than_the_lease_costs_a_pause_not_an_error(
    tmp_path: Path, fleet: FleetConfig, engines: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """etcd stopped for twice the lease's TTL under a client that writes and reads back: the host's lease
    lapses, so its requests wait unanswered (none is served without a lease), etcd expires the lease, and
    once etcd is back the host takes a new one and the waiting requests go on. No request fails; the
    client sees one long pause, which ends soon after etcd is back."""
    engine, where, store, srv = _leased_host(tmp_path, fleet, engines, monkeypatch, hold=60, seed=21)
    stop, failures, done = threading.Event(), [], []

    def load() -> None:
        h = srv.connect("vm")
        k = 0
        while not stop.is_set():
            data = (k % 251 + 1).to_bytes(1, "little") * 4096
            try:
                h.pwrite(data, (k % 512) * 4096)
                if h.pread(4096, (k % 512) * 4096) != data:
                    failures.append(f"read back wrong at {k}")
            except nbd.Error as exc:
                failures.append(str(exc))
            done.append(time.monotonic())
            k += 1
        h.shutdown()

    worker = threading.Thread(target=load)
    try:
        cli("clone", "create", "vm", "--base", "gold", store=store)
        worker.start()
        time.sleep(1)
        subprocess.run([*engine, "stop", "etcd", str(where)], check=True)
        stopped = time.monotonic()
        try:
            time.sleep(8)
        finally:
            subprocess.run([*engine, "start", "etcd", str(where)], check=True, capture_output=True)
        back = time.monotonic()
        deadline = back + 30
        while not done or done[-1] < back + 0.5:
            assert time.monotonic() < deadline and not failures, ("no progress after etcd came back", failures[:3])
            time.sleep(0.1)
    finally:
        stop.set()
        worker.join(60)
        srv.stop()
    assert not failures, failures[:5]
    during = [t for t in done if stopped < t < back]
    after = next(t for t in done if t > back)
    assert during and during[-1] < back - 2, "the lease lapsed and no request was held"
    print(
        f"etcd down {back - stopped:.1f} s: served for {during[-1] - stopped:.1f} s, then held; "
        f"first reply {after - back:.2f} s after etcd was back"
    )
    assert after - back < 2  # (gRPC's shared reconnect backoff made it 4.6-5.7 s: catalog.CHANNEL_OPTIONS)


def test_an_outage_past_the_lease_and_the_hold_drops_connections_and_qemu_reconnects(
    tmp_path: Path, fleet: FleetConfig, engines: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """etcd stopped for longer than the lease and the hold after it: the worker drops its connections
    without a reply (none is answered with an error) and its successor refuses new ones until the lease is
    back, so QEMU's NBD client with reconnect-delay resends its requests then: qemu-io, writing a block a
    second through the outage, sees no error, and every block reads back."""
    engine, where, store, srv = _leased_host(tmp_path, fleet, engines, monkeypatch, hold=3, seed=22)
    try:
        cli("clone", "create", "vm", "--base", "gold", store=store)
        socket_path = srv.uri("vm").partition("socket=")[2]
        blocks = 24
        commands = [a for k in range(blocks) for a in ("-c", f"write -P {k + 1} {k * 65536} 4k", "-c", "sleep 1000")]
        commands += [a for k in range(blocks) for a in ("-c", f"read -P {k + 1} {k * 65536} 4k")]
        opts = (
            f"driver=raw,file.driver=nbd,file.export=vm,file.server.type=unix,file.server.path={socket_path},"
            "file.reconnect-delay=120"
        )
        qemu = subprocess.Popen(
            ["qemu-io", "--image-opts", opts, *commands], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        try:
            time.sleep(2)
            subprocess.run([*engine, "stop", "etcd", str(where)], check=True)
            try:
                time.sleep(14)  # the lease lapses in about 1-4 s, the hold ends 3 s later: the worker stops
            finally:
                subprocess.run([*engine, "start", "etcd", str(where)], check=True, capture_output=True)
            out, _ = qemu.communicate(timeout=180)
        finally:
            if qemu.poll() is None:
                qemu.kill()
                qemu.wait()
    finally:
        srv.stop()
    log = "".join(srv.log)
    assert "dropping every connection" in log, log[-3000:]  # the outage did reach the worker
    assert qemu.returncode == 0, out[-3000:]
    assert "failed" not in out and "error" not in out.lower(), out[-3000:]
    assert out.count("read 4096/4096 bytes") == blocks, out[-3000:]


def test_three_hosts_under_fio_ride_out_a_short_etcd_outage_and_flip_with_ceph_down(
    tmp_path: Path, fleet: FleetConfig, engines: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three hosts, fio writing and verifying on a clone of each: etcd stopped for the lease's TTL less 2 s
    fails no request on any host. Then the OSD stopped: a flip (to a version every host staged ahead)
    still moves every host's pointer, since following a flip asks nothing of Ceph."""
    monkeypatch.setenv("NBDCLONE_FLEET_LEASE_TTL", "6")
    monkeypatch.setenv("NBDCLONE_FLEET_TIMEOUT", "3")
    engine, where = [str(ROOT / "scripts" / "fleet-engines")], Path(engines["CEPH_CONF"]).parent
    for v in (1, 2):
        make_image(tmp_path / f"v{v}.raw", SIZE, [(0, 4 * MiB)], seed=30 + v)
    hosts = {h: tmp_path / h for h in ("h1", "h2", "h3")}
    for name, store in hosts.items():
        _join(fleet, store, name)
    cli("base", "import", "gold", str(tmp_path / "v1.raw"), store=hosts["h1"])
    cli("base", "import", "gold", str(tmp_path / "v2.raw"), store=hosts["h1"])
    servers = {h: Server(hosts[h], tmp_path / f"{h}.sock").start() for h in hosts}
    osd_down = False
    try:
        for h, store in hosts.items():
            cli("clone", "create", f"vm-{h}", "--base", "gold", store=store)
        deadline = time.monotonic() + 60
        while any({"1", "2"} - set(_versions(store)) for store in hosts.values()):  # staged ahead by each sync
            assert time.monotonic() < deadline, "the hosts did not stage gold@2"
            time.sleep(0.2)
        jobs = [
            subprocess.Popen(
                [
                    "fio",
                    f"--name={h}",
                    "--ioengine=nbd",
                    f"--uri={servers[h].uri(f'vm-{h}')}",
                    "--rw=randwrite",
                    "--bs=4k",
                    "--size=8M",
                    "--iodepth=8",
                    "--verify=crc32c",
                    "--time_based",
                    "--runtime=10",
                    "--rate_iops=1500",
                    f"--output={tmp_path / f'{h}.fio'}",
                ],
                cwd=tmp_path,
            )
            for h in hosts
        ]
        time.sleep(2)
        subprocess.run([*engine, "stop", "etcd", str(where)], check=True)
        try:
            time.sleep(6 - 2)
        finally:
            subprocess.run([*engine, "start", "etcd", str(where)], check=True, capture_output=True)
        for h, job in zip(hosts, jobs, strict=True):
            assert job.wait(120) == 0, (tmp_path / f"{h}.fio").read_text()[-2000:]
            report = (tmp_path / f"{h}.fio").read_text()
            assert "err= 0" in report, report[-2000:]  # (fio exits non-zero on any failed request or verify)

        subprocess.run([*engine, "stop", "osd", str(where)], check=True)
        osd_down = True
        cli("base", "promote", "gold", "2", store=hosts["h1"])
        deadline = time.monotonic() + 15
        while any(_current(store, "gold") != "2" for store in hosts.values()):
            assert time.monotonic() < deadline, {h: _current(s, "gold") for h, s in hosts.items()}
            time.sleep(0.2)
    finally:
        if osd_down:
            subprocess.run([*engine, "start", "osd", str(where)], check=True, capture_output=True)
        for srv in servers.values():
            srv.stop()


def _versions(store: Path) -> list[str]:
    rows = json.loads(cli("base", "list", "--json", store=store).stdout)["versions"]
    return [r["version"] for r in rows if r["base"] == "gold"]


def test_engines_down_under_load(
    tmp_path: Path, fleet: FleetConfig, engines: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """etcd stopped under load: the clone keeps serving and a flip fails in one line in bounded time, then
    works once etcd is back. The OSD stopped: the warm clone (its chunks fetched) keeps serving; a cold
    clone's first read of a chunk not fetched yet fails with EIO in bounded time and reads right once the
    OSD is back; a version not staged here fails to stage in bounded time, and stages once it is back."""
    monkeypatch.setenv("NBDCLONE_FLEET_TIMEOUT", "3")
    where = Path(engines["CEPH_CONF"]).parent
    engine = [str(ROOT / "scripts" / "fleet-engines")]
    for v in ("1", "2"):
        make_image(tmp_path / f"v{v}.raw", SIZE, [(0, 2 * MiB), (9 * MiB, MiB)], seed=10 + int(v))
    hosts = {h: tmp_path / h for h in ("h1", "h2")}
    for name, store in hosts.items():
        _join(fleet, store, name)
    cli("base", "import", "gold", str(tmp_path / "v1.raw"), store=hosts["h1"])
    cli("base", "import", "gold", str(tmp_path / "v2.raw"), store=hosts["h1"])
    srv = Server(hosts["h2"], tmp_path / "h2.sock").start()
    stop = threading.Event()
    failures: list[str] = []
    done = [0]

    v1 = (tmp_path / "v1.raw").read_bytes()

    def load() -> None:  # a client writing and reading back, and reading the base, all along
        h = srv.connect("vm")
        assert pread_all(h, SIZE)[9 * MiB :] == v1[9 * MiB :]  # warm: every chunk fetched
        k = 0
        while not stop.is_set():
            data = (k % 251 + 1).to_bytes(1, "little") * 4096
            at = 9 * MiB + (k % 256) * 4096
            try:
                h.pwrite(data, (k % 2000) * 4096)
                if h.pread(4096, (k % 2000) * 4096) != data:
                    failures.append(f"read back wrong at {k}")
                if h.pread(4096, at) != v1[at : at + 4096]:
                    failures.append(f"base read wrong at {k}")
            except nbd.Error as exc:
                failures.append(str(exc))
            k += 1
            done[0] = k
        h.shutdown()

    try:
        cli("clone", "create", "vm", "--base", "gold@1", store=hosts["h2"])
        worker = threading.Thread(target=load)
        worker.start()
        subprocess.run([*engine, "stop", "etcd", str(where)], check=True)
        try:
            started = time.monotonic()
            flip = cli("base", "promote", "gold", "2", store=hosts["h1"], check=False)
            assert flip.returncode == 1 and flip.stderr.count("\n") == 1 and "etcd" in flip.stderr, flip.stderr
            assert time.monotonic() - started < 20
            before = done[0]
            time.sleep(1)
            assert done[0] > before, "the clone stopped serving while etcd was down"
        finally:
            subprocess.run([*engine, "start", "etcd", str(where)], check=True, capture_output=True)
        cli("base", "promote", "gold", "2", store=hosts["h1"])
        cli("clone", "create", "cold", "--base", "gold@2", store=hosts["h2"])  # staged: its map, no chunk
        v2 = (tmp_path / "v2.raw").read_bytes()
        _join(fleet, hosts.setdefault("h3", tmp_path / "h3"), "h3")

        subprocess.run([*engine, "stop", "osd", str(where)], check=True)
        try:
            before = done[0]
            time.sleep(1)
            assert done[0] > before, "the warm clone stopped serving while the OSD was down"
            h = srv.connect("cold")
            started = time.monotonic()
            # Version 2's last chunk: its slot is far past what reads of version 1 fetched or read ahead.
            last = 10 * MiB - 65536
            with pytest.raises(nbd.Error) as cold_read:
                h.pread(65536, last)
            assert cold_read.value.errno == "EIO" and time.monotonic() - started < 20, cold_read.value
            started = time.monotonic()
            staged = cli("clone", "create", "new", "--base", "gold@2", store=hosts["h3"], check=False)
            assert staged.returncode == 1 and staged.stderr.count("\n") == 1, staged.stderr
            assert time.monotonic() - started < 30
        finally:
            subprocess.run([*engine, "start", "osd", str(where)], check=True, capture_output=True)
        deadline = time.monotonic() + 60
        while True:  # the OSD peers again within seconds; the same connection's next read is right
            try:
                assert h.pread(65536, last) == v2[last : last + 65536]
                break
            except nbd.Error:
                assert time.monotonic() < deadline, "the cold clone did not recover"
                time.sleep(0.5)
        assert pread_all(h, SIZE) == v2
        h.shutdown()
        cli("clone", "create", "new", "--base", "gold@2", store=hosts["h3"])
        assert json.loads(cli("clone", "info", "new", "--json", store=hosts["h3"]).stdout)["version"] == "2"
    finally:
        stop.set()
        with contextlib.suppress(NameError):
            worker.join(30)
        srv.stop()
    assert not failures, failures[:5]


def test_fleet_gc_never_takes_a_chunk_an_import_relies_on(tmp_path: Path, fleet: FleetConfig) -> None:
    """Chunks nothing names go; an import running (announced) blocks a gc, and a gc running makes an
    import wait; every version still reads whole after gc."""
    from nbdclone.fleet.gc import excluding_gc, gc
    from nbdclone.fleet.objects import Objects

    data = make_image(tmp_path / "v1.raw", 4 * MiB, [(0, 2 * MiB)], seed=21)
    _join(fleet, tmp_path / "h1", "h1")
    cli("base", "import", "gold", str(tmp_path / "v1.raw"), store=tmp_path / "h1")
    with Objects(fleet) as objects:  # what killed imports and moves leave: chunks and objects nothing names
        strays = [objects.put_chunk(bytes([k]) * 65536)[0] for k in range(1, 6)]
        objects.put("map.gold.9.0123456789abcdef", b"a map no version names")
        objects.put("ship.vm.0.2", b"a manifest no clone names")
    with excluding_gc(fleet):  # an import in flight: gc is refused and deletes nothing
        with pytest.raises(errors.NbdcloneError, match="an import or a move is running"):
            gc(fleet)
    deleted, kept = gc(fleet)
    assert (deleted, kept) == (5, 32)
    with Objects(fleet) as objects:
        assert not any(objects.exists(f"chunk.{k.hex()}") for k in strays)
        assert not objects.exists("map.gold.9.0123456789abcdef") and not objects.exists("ship.vm.0.2")
        assert len(list(objects.list_objects(("map.",)))) == 1  # the version's own map stays
    _join(fleet, tmp_path / "h2", "h2")  # a new host stages every chunk of the version from the fleet
    report = json.loads(cli("fleet", "sync", "--json", store=tmp_path / "h2").stdout)
    assert report["remote"] == 32 and report["fetched"] == 0  # fetched as the clone reads
    cli("clone", "create", "vm", "--base", "gold", store=tmp_path / "h2")
    srv = Server(tmp_path / "h2", tmp_path / "h2.sock").start()
    try:
        h = srv.connect("vm")
        assert pread_all(h, 4 * MiB) == data
        h.shutdown()
    finally:
        srv.stop()


BOOT = ROOT / "tests" / "data" / "linux-boot.fio.iolog"  # ../shared/traces: a real Linux boot's I/O


def _iolog() -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(reads, writes) of the recorded boot, as (offset, length)."""
    reads, writes = [], []
    for line in BOOT.read_text().splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[1] in ("read", "write"):
            (reads if parts[1] == "read" else writes).append((int(parts[2]), int(parts[3])))
    return reads, writes


def _storm(servers: dict[str, Server], clones: dict[str, list[str]], cwd: Path) -> None:
    """Every clone replays the recorded boot with fio, all at once."""
    jobs = {}
    for h, names in clones.items():
        args = ["fio", "--ioengine=nbd", f"--read_iolog={BOOT}", "--replay_no_stall=1", "--output=/dev/null"]
        for name in names:
            args += [f"--name={name}", f"--uri={servers[h].uri(name)}"]
        jobs[h] = subprocess.Popen(args, cwd=cwd)
    for h, job in jobs.items():
        assert job.wait(300) == 0, f"the storm on {h} failed"


def test_a_boot_storm_across_three_hosts(tmp_path: Path, fleet: FleetConfig) -> None:
    """A cold storm: 8 clones on h2 replay the recorded Linux boot at once with no trace anywhere; h2's
    fetcher reads each chunk the boot needs from RADOS once, however many clones wait. Their boot's trace
    goes to the fleet with its chunks as a few large objects; h1 and h3 take it; then 8 clones on each of
    the 3 hosts replay the boot at once: no host fetches a chunk more than once, none beyond the trace's,
    and every clone reads the base's bytes wherever the boot did not write."""
    size = 256 * MiB
    image = bytearray(os.urandom(size))
    (tmp_path / "gold.raw").write_bytes(image)
    reads, writes = _iolog()
    booted = {i for off, length in reads for i in range(off // 65536, (off + length - 1) // 65536 + 1)}
    hosts = {h: tmp_path / h for h in ("h1", "h2", "h3")}
    for name, store in hosts.items():
        _join(fleet, store, name)
    cli("base", "import", "gold", str(tmp_path / "gold.raw"), store=hosts["h1"])
    servers = {h: Server(hosts[h], tmp_path / f"{h}.sock").start() for h in hosts}
    filled = {h: 0 for h in hosts}  # chunks CLI syncs filled from trace objects
    cold = [f"cold-{k}" for k in range(8)]
    clones = {h: [f"vm-{h}-{k}" for k in range(8)] for h in hosts}
    try:
        cli("clone", "create", *cold, "--base", "gold", store=hosts["h2"])
        _storm(servers, {"h2": cold}, tmp_path)
        stats = _fetch_stats(hosts["h2"])  # each chunk the boot read fetched once (asked for, or read ahead)
        assert stats["refetched"] == 0 and stats["chunks"] - stats["ahead"] <= len(booted) <= stats["chunks"], stats
        cold_chunks = stats["chunks"]
        for name in cold:
            wait_closed(hosts["h2"], name)  # the first connection's recording is written
        for h in ("h2", "h1", "h3"):  # h2 gives its trace, the others take it
            filled[h] += json.loads(cli("fleet", "sync", "--json", store=hosts[h]).stdout)["fetched"]
        shown = json.loads(cli("base", "trace", "show", "gold", "--json", store=hosts["h3"]).stdout)
        assert shown["recorded"] and shown["bytes"] == len(booted) * 65536, shown  # the boot, shared
        # Every host holds gold@1 with its trace in its cache: a flip that waits for all of them goes at once.
        waited = cli("base", "promote", "gold", "1", "--wait-warm", "1", "--wait-timeout", "30", store=hosts["h1"])
        assert "gold@1 is warm on 3 of 3 live host(s)" in waited.stdout, waited.stdout
        for h in hosts:
            cli("clone", "create", *clones[h], "--base", "gold", store=hosts[h])
        _storm(servers, clones, tmp_path)
        written = bytearray(size)  # 1 where the boot wrote: the clone's own bytes there
        for off, length in writes:
            written[off : off + length] = b"\x01" * length
        for h, srv in servers.items():
            for name in clones[h]:
                handle = srv.connect(name)
                for off, length in reads:
                    got = handle.pread(length, off)
                    want = bytes(image[off : off + length])
                    if got != want:
                        keep = [k for k in range(length) if not written[off + k]]
                        assert [got[k] for k in keep] == [want[k] for k in keep], f"{name} at {off}"
                handle.shutdown()
        stats = {h: _fetch_stats(hosts[h]) for h in hosts}
    finally:
        for srv in servers.values():
            srv.stop()
    print({h: {**s, "cli_filled": filled[h]} for h, s in stats.items()})
    assert stats["h1"]["chunks"] + stats["h1"]["trace_chunks"] + filled["h1"] == 0  # it imported the version
    assert stats["h2"]["refetched"] == 0 and stats["h2"]["chunks"] == cold_chunks  # the cold storm's, none since
    for h in ("h3",):  # the trace's chunks came in trace objects, once; the storm fetched nothing
        assert stats[h]["chunks"] == 0 and stats[h]["trace_chunks"] + filled[h] == len(booted), stats[h]
        assert stats[h]["sync_reads"] <= 3 + len(booted) // 64, stats[h]  # a map, a trace, its objects


def test_a_host_evicts_versions_it_no_longer_needs_under_its_bound(tmp_path: Path, fleet: FleetConfig) -> None:
    """Versions that are not current, not newer, and used by no clone here go (oldest first) while the
    pack is over the bound; a pinned clone keeps its version; an evicted one can be staged again."""
    for v in ("1", "2", "3"):
        make_image(tmp_path / f"v{v}.raw", 8 * MiB, [(0, 4 * MiB)], seed=30 + int(v))
    cli("fleet", "join", fleet.etcd, "--ceph-conf", fleet.ceph_conf, "--name", fleet.name, "--host", "h1",
        "--pack-bound", "6M", store=tmp_path / "h1")  # fmt: skip
    for v in ("1", "2", "3"):
        cli("base", "import", "gold", str(tmp_path / f"v{v}.raw"), store=tmp_path / "h1")
    cli("clone", "create", "old", "--base", "gold@1", store=tmp_path / "h1")
    cli("base", "promote", "gold", "3", store=tmp_path / "h1")
    report = json.loads(cli("fleet", "sync", "--json", store=tmp_path / "h1").stdout)
    assert report["evicted"] == ["gold@2"], report  # gold@1 is pinned by a clone, gold@3 is current
    local = {r["version"] for r in json.loads(cli("base", "list", "--json", store=tmp_path / "h1").stdout)["versions"]}
    assert local == {"1", "3"}
    cli("clone", "rm", "old", store=tmp_path / "h1")
    report = json.loads(cli("fleet", "sync", "--json", store=tmp_path / "h1").stdout)
    assert report["evicted"] == ["gold@1"]
    assert os.stat(tmp_path / "h1" / "chunks" / "pack").st_blocks * 512 <= 6 * MiB
    cli("clone", "create", "again", "--base", "gold@2", store=tmp_path / "h1")  # the fleet kept it
    assert json.loads(cli("clone", "info", "again", "--json", store=tmp_path / "h1").stdout)["version"] == "2"


def test_a_supervisor_killed_and_started_again_is_not_seen_in_a_fleet(
    tmp_path: Path, fleet: FleetConfig, engines: dict[str, str]
) -> None:
    """kill -9 of a fleet host's `nbdclone serve` and `serve` again, five times, under a client writing and
    reading back: the new supervisor resumes the host's lease, which etcd still has, so the adopted workers
    are never fenced (no ESHUTDOWN) and every write is there. Once more with etcd down while the new
    supervisor starts: the workers serve on under the lease file the old one left (as under a supervisor
    that lived; an earlier design removed it and fenced every request until etcd was back)."""
    hosts = _two_hosts_with_gold(tmp_path, fleet, seed=9)
    store = hosts["h1"]
    cli("clone", "create", "vm", "--base", "gold", store=store)
    sock = tmp_path / "h1.sock"
    server = Server(store, sock, ("--workers", "2")).start()
    h = server.connect("vm")
    model: dict[int, bytes] = {}
    failures: list[str] = []
    halt = threading.Event()
    done = [0]

    def write() -> None:
        i = 0
        while not halt.is_set():
            off, data = (i % 512) * 4096, hashlib.sha256(b"%d" % i).digest() * 128
            try:
                h.pwrite(data, off)
                assert h.pread(4096, off) == data
                model[off] = data
            except (nbd.Error, AssertionError) as exc:
                failures.append(f"{i}: {exc}")
            done[0] += 1
            i += 1

    def progress(n: int = 20) -> None:
        target, deadline = done[0] + n, time.monotonic() + 30
        while done[0] < target:
            assert not failures, failures[:3]
            assert time.monotonic() < deadline, "the client made no progress"
            time.sleep(0.01)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        for _ in range(5):
            progress()
            assert server.proc is not None
            server.proc.kill()
            server.proc.wait()
            progress()
            server = Server(store, sock, ("--workers", "2")).start()
            progress()
        assert "resumed" in "".join(server.log)
        engine = [str(ROOT / "scripts" / "fleet-engines")]
        where = str(Path(engines["CEPH_CONF"]).parent)
        server.proc.kill()
        server.proc.wait()
        subprocess.run([*engine, "stop", "etcd", where], check=True)
        try:
            server = Server(store, sock, ("--workers", "2")).start()
            progress()
        finally:
            subprocess.run([*engine, "start", "etcd", where], check=True, capture_output=True)
        progress()
        halt.set()
        writer.join(30)
        assert not failures, failures[:3]
        for off, data in model.items():
            assert h.pread(4096, off) == data
    finally:
        halt.set()
        with contextlib.suppress(nbd.Error):
            h.shutdown()
        server.stop()
