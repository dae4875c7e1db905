"""The fleet's orders (nbdclone/fleet/host.py, ORDERS) against a model, with a kill before every step.

Two hosts' stores (real stores, real RocksDB overlays) share an etcd and a RADOS kept in memory
(engines.py: revisions, compare-and-put, leases, watch; put-if-absent objects), so a test runs every
order in a child process that is killed (SIGKILL, at the host's crash points) before each of its
steps, then checks what the fleet promises of every state a kill can leave:

- a version etcd names is whole in RADOS: its map object matches its record and every chunk the map
  names is there, and the chunks read back as the imported image; a map object names only stored chunks
- a host's pointer is only ever on a version the fleet's pointer was on
- a clone a host holds is recorded in etcd
- a clone that was written is somewhere: its owner (etcd's record) holds it, or the manifest the record
  names is in RADOS; and after both hosts sync, its owner holds it with every byte written, and the
  other host does not

and then that the hosts recover: after a sync of each (and, for a claim left by a killed create or rm,
`clone rm` of it), every pointer is the fleet's and the verb, run again, succeeds.

The mutation test swaps two adjacent steps of each order and shows that some kill then breaks one of
these rules (or the verb fails outright, where a step needs what the one before made).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aetcd
import pytest

from nbdclone import errors
from nbdclone.fleet import catalog as fleet_catalog
from nbdclone.fleet import config as fleet_config
from nbdclone.fleet import host as fleet_host
from nbdclone.fleet import objects as fleet_objects
from nbdclone.fleet import sync as fleet_sync
from nbdclone.fleet.catalog import FleetCatalog, run
from nbdclone.fleet.fetch import fetch_here
from nbdclone.fleet.objects import FleetMap
from nbdclone.host import open_host
from nbdclone.store import Store, images
from nbdclone.store.chunks import CHUNK
from nbdclone.store.layout import CRASH_AT_ENV
from nbdclone.store.registry import Registry
from tests.fleet.engines import MemoryEtcd, memory_rados, objects_in
from tests.helpers import make_image

SIZE = 16 * CHUNK  # 1 MiB bases
PREFIX = b"/nbdclone/m/"
WRITES = [(0, 4096), (5 * CHUNK + 512, 70000), (SIZE - 8192, 8192)]  # what c1 holds of its own


@dataclass
class World:
    """One fleet: etcd, RADOS, hosts h1 and h2, under `root` (the same path for every case)."""

    root: Path

    @property
    def etcd(self) -> MemoryEtcd:
        return MemoryEtcd(self.root / "etcd")

    def store(self, host: str) -> Store:
        return Store(self.root / host, fetch_here=fetch_here)

    def kv(self) -> dict[str, bytes]:
        return {k[len(PREFIX) :].decode(): e.value for k, e in self.etcd.read().kv.items() if k.startswith(PREFIX)}

    def objects(self) -> dict[str, bytes]:
        return objects_in(self.root / "rados", "p", "m")


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The memory engines in place of aetcd's client and librados, for this process and its children."""
    root = tmp_path_factory.mktemp("fleet-model")
    mp = pytest.MonkeyPatch()
    mp.setattr(aetcd, "Client", lambda *a, **kw: MemoryEtcd(root / "case" / "etcd").client())
    mp.setattr(fleet_objects, "rados", memory_rados(root / "case" / "rados"))
    yield root
    mp.undo()


def _import(world: World, host: str, n: int) -> str:
    h = open_host(world.root / host)
    return h.import_version(
        "gold", lambda vid: images.import_base(h.store, "gold", world.root / f"image{n}", vid=vid)[1]
    )


def _create(world: World, host: str, name: str) -> None:
    h = open_host(world.root / host)

    def make() -> None:
        h.store.create_clones([name], base="gold")

    h.create_clones([name], "gold", make)


def _write(store: Store, name: str, image: bytes) -> bytes:
    """Write WRITES into clone `name` (closed after a flush); returns what the clone reads as now."""
    want = bytearray(image)
    registry = Registry(store)
    clone = registry.acquire(name)
    for k, (off, length) in enumerate(WRITES):
        data = bytes([k + 1]) * length
        clone.pwrite(memoryview(data), off)
        want[off : off + length] = data
    clone.flush()
    registry.release(name)
    registry.close_all()
    return bytes(want)


@pytest.fixture(scope="module")
def template(engines: Path) -> Path:
    """gold@1 (current) and gold@2 imported on h1, both staged on h2, clone c1 of gold on h1 with writes,
    h2 registered with a lease (a move's target): built once, copied for each case."""
    world = World(engines / "case")
    world.root.mkdir(exist_ok=True)
    (world.root / "ceph.conf").write_text("")
    for n in (1, 2, 3):
        make_image(world.root / f"image{n}", SIZE, [(0, SIZE)], seed=n)
    for host in ("h1", "h2"):
        config = fleet_config.FleetConfig("http://memory:2379", str(world.root / "ceph.conf"), "p", "m", host)
        fleet_config.save(world.root / host, config)
    assert _import(world, "h1", 1) == "1" and _import(world, "h1", 2) == "2"
    fleet_sync.sync(world.store("h2"), fleet_config.load(world.root / "h2"))  # type: ignore[arg-type]
    _create(world, "h1", "c1")
    (world.root / "c1").write_bytes(_write(world.store("h1"), "c1", (world.root / "image1").read_bytes()))
    h2 = fleet_config.load(world.root / "h2")
    assert h2 is not None

    async def register(c: FleetCatalog) -> None:
        await c.hosts.register("h2", {"store": str(world.root / "h2")}, 3600)
        await c.bases.reserve("gold")  # a number a killed import took: the fleet's numbers run ahead of a host's

    run(h2, register)
    saved = engines / "template"
    shutil.copytree(world.root, saved, symlinks=True)
    return saved


@pytest.fixture()
def world(engines: Path, template: Path) -> World:
    case = engines / "case"
    shutil.rmtree(case, ignore_errors=True)
    shutil.copytree(template, case, symlinks=True)
    return World(case)


# -- the verbs, and what they promise -------------------------------------------------------------------


def _host(world: World, host: str) -> fleet_host.FleetHost:
    h = open_host(world.root / host)
    assert isinstance(h, fleet_host.FleetHost)
    return h


VERBS: dict[str, Callable[[World], object]] = {
    "import": lambda w: _import(w, "h1", 3),
    "promote": lambda w: _host(w, "h1").promote("gold", "2"),
    "create": lambda w: _create(w, "h1", "c2"),
    "remove": lambda w: _host(w, "h1").remove_clone("c1"),
    "move": lambda w: _host(w, "h1").move_clone("c1", "h2", force=False, drain=0),
}


def _in_child(world: World, verb: str, crash: str | None) -> str:
    """Run `verb` in a child process, killed at crash point `crash`. Returns "killed", "done" or the error."""
    failure = world.root / "failure"
    failure.unlink(missing_ok=True)
    pid = os.fork()
    if pid == 0:  # the child: no return from here
        code = 0
        try:
            if crash is not None:
                os.environ[CRASH_AT_ENV] = crash
            VERBS[verb](world)
        except BaseException:
            failure.write_text(traceback.format_exc())
            code = 3
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return "killed"
    if os.WEXITSTATUS(status) == 0:
        return "done"
    return failure.read_text().strip().splitlines()[-1]


def _pointers_seen(world: World) -> set[str]:
    key = PREFIX + b"bases/gold/current"
    st = world.etcd.read()
    return {e.value.decode() for _, k, e in st.history if k == key and e is not None}


def violations(world: World, verb: str) -> list[str]:
    """What the state breaks of the rules in this module's docstring (`verb` ran last: a clone rm may
    leave c1 anywhere between whole and gone)."""
    out: list[str] = []
    kv, objects = world.kv(), world.objects()
    for key, value in kv.items():
        if key.startswith("bases/gold/versions/"):
            vid, record = key.rsplit("/", 1)[1], json.loads(value)
            raw = objects.get(record["map_object"])
            if raw is None:
                out.append(f"etcd names gold@{vid}, whose map {record['map_object']} is not in RADOS")
                continue
            fmap = FleetMap.decode(raw, record["map_object"])
            data = b"".join(objects.get(f"chunk.{sha.hex()}", b"?") for _, sha, _ in fmap.entries)
            image = Path(record["source"].rsplit(" (", 1)[0]).read_bytes()
            if data != image or len(fmap.entries) != SIZE // CHUNK:
                out.append(f"etcd names gold@{vid}, but its chunks in RADOS are not the image imported")
    for name, raw in objects.items():
        if name.startswith("map."):
            missing = [i for i, sha, _ in FleetMap.decode(raw, name).entries if f"chunk.{sha.hex()}" not in objects]
            if missing:
                out.append(f"map object {name} names chunks RADOS does not hold ({len(missing)})")
    seen = _pointers_seen(world)
    for host in ("h1", "h2"):
        store = world.store(host)
        cat = store.catalog()
        if "gold" in cat.bases and (here := store.current_version(cat.bases["gold"])) not in seen:
            out.append(f"{host}'s pointer is on gold@{here}, where the fleet's never was (it was on {sorted(seen)})")
        for name in cat.clones:
            if f"clones/{name}" not in kv:
                out.append(f"{host} holds clone {name}, which etcd does not record")
    c1 = kv.get("clones/c1")
    if c1 is not None and verb != "remove":
        rec = json.loads(c1)
        held = "c1" in world.store(rec["host"]).catalog().clones
        if not held and rec.get("ship") not in objects:
            out.append(f"clone c1 is lost: etcd gives it to {rec['host']}, which lacks it, and no manifest is named")
    return out


def recover(world: World, verb: str) -> list[str]:
    """Bring both hosts up to the fleet (and release a claim a killed create or rm left); returns what
    is still wrong, and whether c1 reads as written at its owner."""
    kv = world.kv()
    for name in ("c1", "c2"):
        rec = json.loads(kv.get(f"clones/{name}", b"null"))
        if rec is not None and name not in world.store(rec["host"]).catalog().clones and not rec.get("ship"):
            _host(world, rec["host"]).remove_clone(name)  # a claim with no clone: `clone rm` releases it
    out = []
    for host in ("h1", "h2"):
        try:
            fleet_sync.sync(world.store(host), fleet_config.load(world.root / host))  # type: ignore[arg-type]
        except errors.NbdcloneError as exc:
            out.append(f"{host} cannot sync: {exc}")
    if out:
        return out
    out = violations(world, verb)
    kv = world.kv()
    current = kv["bases/gold/current"].decode()
    for host in ("h1", "h2"):
        store = world.store(host)
        if (here := store.current_version(store.get_base("gold"))) != current:
            out.append(f"after a sync, {host}'s pointer is gold@{here}, the fleet's gold@{current}")
    if "clones/c1" in kv:
        owner = json.loads(kv["clones/c1"])["host"]
        other = "h2" if owner == "h1" else "h1"
        if "c1" in world.store(other).catalog().clones:
            out.append(f"after a sync, {other} still holds c1, which is {owner}'s")
        clone = images.open_clone_readonly(world.store(owner), "c1")
        try:
            got = bytearray(SIZE)
            clone.pread_into(memoryview(got), 0)
        finally:
            clone.close()
            clone.base.close()
        if bytes(got) != (world.root / "c1").read_bytes():
            out.append(f"after a sync, c1 at {owner} does not read as written")
    elif verb != "remove":
        out.append("clone c1 is gone from etcd")
    return out


def run_verb(world: World, verb: str, crash: str | None) -> list[str]:
    """Run a verb (killed at `crash`); the rules broken after it and after recovery."""
    how = _in_child(world, verb, crash)
    if how not in ("killed", "done"):
        return [f"{verb} failed: {how}"]
    if crash is not None and how != "killed":
        return [f"{verb} did not reach crash point {crash}"]
    return [f"after the kill: {v}" for v in violations(world, verb)] + [
        f"recovering: {v}" for v in recover(world, verb)
    ]


def crash_points(verb: str) -> list[str | None]:
    return [None, *(f"{verb}-{step.name}" for step in fleet_host.ORDERS[verb])]


@pytest.mark.parametrize(("verb", "crash"), [(verb, crash) for verb in VERBS for crash in crash_points(verb)], ids=str)
def test_a_kill_before_any_step_keeps_the_fleet_whole(world: World, verb: str, crash: str | None) -> None:
    assert run_verb(world, verb, crash) == []


#: Adjacent steps whose order is load-bearing, per verb (a create's "serve" only waits for the server).
SWAPS = [
    (verb, i)
    for verb in VERBS
    for i in range(len(fleet_host.ORDERS[verb]) - 1)
    if not (verb == "create" and fleet_host.ORDERS[verb][i + 1].name == "serve")
]


@pytest.mark.parametrize(("verb", "i"), SWAPS, ids=lambda x: str(x))
def test_each_order_swapped_breaks_a_rule(
    engines: Path, template: Path, monkeypatch: pytest.MonkeyPatch, verb: str, i: int
) -> None:
    order = list(fleet_host.ORDERS[verb])
    order[i], order[i + 1] = order[i + 1], order[i]
    monkeypatch.setitem(fleet_host.ORDERS, verb, tuple(order))
    found: dict[str | None, list[str]] = {}
    for crash in crash_points(verb):
        case = engines / "case"
        shutil.rmtree(case, ignore_errors=True)
        shutil.copytree(template, case, symlinks=True)
        found[crash] = run_verb(World(case), verb, crash)
    print(f"\n{verb}: {order[i].name} before {order[i + 1].name}:", {k: v[:1] for k, v in found.items() if v})
    assert any(found.values()), f"{verb} with {order[i].name} before {order[i + 1].name}: no rule broken"


def test_the_memory_etcd_keeps_the_rules_the_catalog_relies_on(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Paged reads at one revision, a read at an older revision, compares over a range, the watch from a
    revision and past a compaction, leases."""
    monkeypatch.setattr(fleet_catalog, "PAGE", 2)
    config = fleet_config.load(world.root / "h1")
    assert config is not None
    bases = {k.removeprefix("bases/"): v for k, v in world.kv().items() if k.startswith("bases/")}

    async def check(c: FleetCatalog) -> int:
        revision, keys = await c.bases.listing()  # pages of 2 keys
        assert keys == bases and len(keys) > 2 * fleet_catalog.PAGE
        await c.bases.set_trace("gold", "1", "trace.gold.1.h1")
        await c.bases.retire("gold", "2")
        assert not await c.bases.forget("gold", "2")  # h1 and h2 hold it: the compare over the range fails
        for host in ("h1", "h2"):
            await c.bases.let_go("gold", "2", host)
        assert await c.bases.forget("gold", "2")
        now, later = await c.bases.listing()
        assert now > revision and "gold/traces/1" in later and "gold/versions/2" not in later
        end = aetcd.utils.prefix_range_end(PREFIX + b"bases/")
        old = await c._client.kvstub.Range(
            aetcd.rpc.RangeRequest(key=PREFIX + b"bases/", range_end=end, revision=revision)
        )
        assert {kv.key[len(PREFIX) + 6 :].decode() for kv in old.kvs} == set(bases)  # as it was
        seen: list[tuple[str | None, bytes | None]] = []
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(c.watch(revision + 1, lambda k, v, r: seen.append((k, v))), 0.3)
        assert seen[0] == ("bases/gold/traces/1", b"trace.gold.1.h1") and ("bases/gold/versions/2", None) in seen, seen
        return now

    now = run(config, check)
    world.etcd.compact(now)
    with pytest.raises(fleet_catalog.Compacted):
        run(config, lambda c: c.watch(now - 1, lambda k, v, r: None))
    lease = world.etcd.read().kv[PREFIX + b"hosts/h2"].lease
    world.etcd.expire(lease)
    assert "hosts/h2" not in world.kv() and run(config, lambda c: c.hosts.get("h2")) is None


def test_a_flip_moves_a_following_host_s_pointer_without_a_sync(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server's follower (fleet/follow.py) moves its pointer on the flip's watch event alone: no sync
    (no etcd read, no RADOS), so a flip costs a host the same whatever the fleet holds."""
    from nbdclone.fleet import follow as fleet_follow

    syncs: list[float] = []
    real = fleet_follow.sync

    def counted(*args: object, **kwargs: object) -> fleet_sync.SyncReport:
        syncs.append(time.monotonic())
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(fleet_follow, "sync", counted)
    store, config = world.store("h2"), fleet_config.load(world.root / "h2")
    assert config is not None and store.current_version(store.get_base("gold")) == "1"
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    follower = threading.Thread(target=loop.run_until_complete, args=(fleet_follow.follow(store, config, stop),))
    follower.start()
    try:
        deadline = time.monotonic() + 10
        while not syncs or time.monotonic() - syncs[-1] < 1.0:  # started, and idle for a second
            assert time.monotonic() < deadline, "the follower never settled"
            time.sleep(0.05)
        before = len(syncs)
        run(config, lambda c: c.bases.promote("gold", "2"))  # another host's flip: etcd only
        while store.current_version(store.get_base("gold")) != "2":
            assert time.monotonic() < deadline + 5, "the flip did not reach the host"
            time.sleep(0.01)
        time.sleep(0.3)
        assert len(syncs) == before, "the flip ran a sync"
        run(config, lambda c: c.bases.retire("gold", "1"))  # not a flip: a sync drops gold@1 here (its clone: on h1)
        while len(syncs) == before:
            assert time.monotonic() < deadline + 10, "a change other than a flip woke no sync"
            time.sleep(0.01)
    finally:
        loop.call_soon_threadsafe(stop.set)
        follower.join(30)
        loop.close()
    assert not follower.is_alive()


def test_a_server_s_syncs_share_one_etcd_connection_and_one_rados_handle(
    world: World, engines: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """However many syncs a follower runs, it opens no etcd client and no RADOS handle per sync: the
    syncs use one of each for the server's life (the fetcher's handle)."""
    from nbdclone.fleet import follow as fleet_follow
    from nbdclone.fleet.fetch import Fetcher

    clients: list[object] = []
    handles: list[object] = []
    memory = fleet_objects.rados
    monkeypatch.setattr(aetcd, "Client", lambda *a, **kw: clients.append(1) or world.etcd.client())

    class Rados(memory.Rados):  # type: ignore[misc,name-defined]
        def __init__(self, *args: object, **kwargs: object) -> None:
            handles.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(memory, "Rados", Rados)
    syncs: list[float] = []
    real = fleet_follow.sync
    monkeypatch.setattr(fleet_follow, "sync", lambda *a, **kw: (syncs.append(time.monotonic()), real(*a, **kw))[1])
    store, config = world.store("h2"), fleet_config.load(world.root / "h2")
    assert config is not None
    fetcher = Fetcher(store.path, config)
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    follower = threading.Thread(
        target=loop.run_until_complete, args=(fleet_follow.follow(store, config, stop, fetcher),)
    )
    follower.start()
    try:
        deadline = time.monotonic() + 10
        while not syncs or time.monotonic() - syncs[-1] < 1.0:
            assert time.monotonic() < deadline, "the follower never settled"
            time.sleep(0.05)
        before, opened = len(clients), len(handles)
        for k in range(5):  # a change under bases/ that is not a flip: a sync each
            n = len(syncs)
            run(config, lambda c, k=k: c._client.put(c._key("bases", "gold", "note", str(k)), b"1"))
            while len(syncs) == n:
                assert time.monotonic() < deadline + 20, "no sync ran"
                time.sleep(0.01)
        time.sleep(0.5)
        # (each `run` above opened a client of its own: the test's, not the follower's)
        assert len(clients) - before == 5 and len(handles) == opened <= 1, (len(clients) - before, handles)
    finally:
        loop.call_soon_threadsafe(stop.set)
        follower.join(30)
        loop.close()
        fetcher.close()
    assert not follower.is_alive()
