"""Damage is found and contained: bytes flipped in each kind of store file, one at a time. Only the clone
or version that depends on the damaged file fails, loudly (an error to its client, a log line naming the
file); every other clone reads exactly what it held; `nbdclone check` names the file, and `--repair` fixes
what it can without guessing. And records damaged in the ways a bad disk or a bad edit damages them (a
flipped digit, cut short, emptied) never cost a clone its writes: repaired, the writes are all there."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
from collections.abc import Callable
from pathlib import Path

import nbd
import pytest

from nbdclone.store import Store
from tests.helpers import Server, cli, make_image, pread_all, snapshot, wait_gone

MiB = 1 << 20
SIZE = 4 * MiB
CLONES = ("victim", "bystander", "other")  # victim and bystander: clones of deb; other: of base "other"


class Setup:
    """Two bases, three clones with flushed writes and zeroes, a boot trace; stopped cleanly, or (`crash`)
    by kill -9 of the workers and the supervisor, so the overlays' last writes are in their WALs."""

    def __init__(self, tmp_path: Path, store: Path, *, crash: bool = False) -> None:
        self.tmp, self.store = tmp_path, store
        self.bases = {
            "deb": make_image(tmp_path / "deb.raw", SIZE, [(0, SIZE)], seed=1),
            "other": make_image(tmp_path / "other.raw", SIZE, [(0, SIZE)], seed=2),
        }
        for name in self.bases:
            cli("base", "import", name, str(tmp_path / f"{name}.raw"), store=store)
        cli("clone", "create", "victim", "bystander", "--base", "deb", store=store)
        cli("clone", "create", "other", "--base", "other", store=store)
        self.expected: dict[str, bytes] = {}
        self.written: dict[str, list[int]] = {}
        server = self.server().start()
        rnd = random.Random(3)
        try:
            for name in CLONES:
                content = bytearray(self.bases["other" if name == "other" else "deb"])
                h = server.connect(name)
                for _ in range(32):
                    off = rnd.randrange(SIZE // 4096) * 4096
                    data = rnd.randbytes(4096)
                    h.pwrite(data, off)
                    content[off : off + 4096] = data
                    self.written.setdefault(name, []).append(off)
                h.zero(8192, 3 * MiB)
                content[3 * MiB : 3 * MiB + 8192] = bytes(8192)
                h.flush()
                h.shutdown()
                self.expected[name] = bytes(content)
            h = server.connect("victim")  # a boot trace for deb@1: one connection reads enough
            pread_all(h, SIZE)
            h.shutdown()
            if crash:
                h = server.connect("victim")
                h.pwrite(b"\x77" * 4096, 0)
                h.flush()
                self.expected["victim"] = b"\x77" * 4096 + self.expected["victim"][4096:]
                kill_server(server)
        finally:
            server.stop()

    def server(self) -> Server:
        return Server(self.store, self.tmp / "nbd.sock")

    def paths(self) -> dict[str, Path]:
        st = Store(self.store)
        cat = st.catalog()
        deb, victim = cat.bases["deb"], cat.clones["victim"]
        state = st.clone_state(victim)
        assert state is not None
        overlay = st.overlay_path(victim, state)
        wal = max(overlay.glob("*.log"), key=lambda p: p.stat().st_size)
        sst = max(overlay.glob("*.sst"), key=lambda p: p.stat().st_size)
        return {
            "catalog": st.catalog_path,
            "map": st.map_path(deb, "1"),
            "trace": st.trace_path(deb, "1"),
            "state": st.clone_dir(victim) / "state.json",
            "data": overlay / "blocks",
            "wal": wal,
            "sst": sst,
            "pack": st.chunks.pack,
        }


def kill_server(server: Server) -> None:
    """kill -9 of the supervisor and every worker: each open overlay's last writer stops unclean."""
    assert server.proc is not None
    pids = [w["pid"] for w in server.info()["workers"]]
    os.kill(server.proc.pid, signal.SIGKILL)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    server.proc.wait()
    wait_gone(pids)


def flip(path: Path, at: int | None = None) -> None:
    raw = bytearray(path.read_bytes())
    at = len(raw) // 2 if at is None else at
    raw[at] ^= 0x5A
    path.write_bytes(bytes(raw))


def _reads(server: Server, name: str) -> bytes | str:
    """The clone's whole contents, or the error its client got."""
    try:
        h = server.connect(name)
    except nbd.Error as exc:
        return f"connect: {exc}"
    try:
        return pread_all(h, SIZE)
    except nbd.Error as exc:
        return f"read: {exc} (errno {exc.errno})"
    finally:
        h.shutdown()


# kind -> (what fails: clones whose reads must fail, "none" where damage is only logged and survived)
CASES: dict[str, tuple[str, ...]] = {
    "pack": ("victim", "bystander"),  # a chunk of deb@1: every clone of deb@1 reads it
    "map": ("victim", "bystander"),
    "state": ("victim",),
    "data": ("victim",),  # cut short: the map holds blocks past its end
    "data-flip": ("victim",),  # a byte of a block it wrote
    "wal": ("victim",),  # after a crash: its last writes are in the WAL
    "sst": ("victim",),
    "catalog": (),  # its mirror serves, with an error logged
    "trace": (),  # a hint: ignored, with an error logged
}


@pytest.mark.parametrize("kind", list(CASES))
def test_damage_in_one_file_fails_only_what_depends_on_it(tmp_path: Path, store_path: Path, kind: str) -> None:
    setup = Setup(tmp_path, store_path, crash=kind == "wal")
    target = setup.paths()[kind.partition("-")[0]]
    assert target.stat().st_size > 64, f"{target} is too small to damage"
    if kind == "pack":
        flip(target, 16 * 65536 + 100)  # a chunk of deb (imported first: slots 0-63)
    elif kind == "data":
        os.truncate(target, target.stat().st_size // 2)
    elif kind == "data-flip":
        zeroed = range(3 * MiB, 3 * MiB + 8192)
        flip(target, max(o for o in setup.written["victim"] if o not in zeroed) + 100)
    else:
        flip(target)
    check = cli("check", "--json", store=store_path, check=False)
    report = json.loads(check.stdout)
    named = " ".join(f"{f['path']} {f['problem']}" for f in report["findings"])  # RocksDB names its own files
    # RocksDB names the table file it found damaged; a damaged WAL it reports for the database (the overlay).
    shown = target.parent if kind == "wal" else target
    assert check.returncode == 1 and str(shown) in named, check.stdout

    listed = cli("clone", "list", store=store_path).stdout + cli("base", "list", store=store_path).stdout
    assert all(name in listed for name in CLONES)  # the lists still work, and show what they can
    if kind in ("state", "map"):
        assert "DAMAGED" in listed or "is damaged" in listed, listed

    server = setup.server().start()
    try:
        for name in CLONES:
            got = _reads(server, name)
            if name in CASES[kind]:
                assert isinstance(got, str), f"{name} was served from a damaged {kind}"
            else:
                assert got == setup.expected[name], f"{name} does not read what it held ({got!r:.80})"
    finally:
        server.stop()
    log = "".join(server.log)
    assert str(shown) in log, f"no log line names {shown}:\n{log[-2000:]}"


def _damage(path: Path, how: str) -> None:
    raw = path.read_bytes()
    if how == "flipped digit":
        text = raw.decode()
        digit = next(i for i, c in enumerate(text) if c.isdigit())
        path.write_text(text[:digit] + str((int(text[digit]) + 6) % 10) + text[digit + 1 :])
    elif how == "cut short":
        path.write_bytes(raw[: len(raw) // 2])
    else:
        path.write_bytes(b"")


@pytest.mark.parametrize("how", ["flipped digit", "cut short", "emptied"])
@pytest.mark.parametrize("record", ["current pointer", "clone state"])
def test_a_damaged_pointer_or_state_never_costs_writes(tmp_path: Path, store_path: Path, record: str, how: str) -> None:
    setup = Setup(tmp_path, store_path)
    st = Store(store_path)
    path = st.base_dir(st.get_base("deb")) / "current" if record == "current pointer" else setup.paths()["state"]
    good = path.read_bytes()
    _damage(path, how)
    hurt: Callable[[str], bool] = (lambda n: n != "other") if record == "current pointer" else (lambda n: n == "victim")

    server = setup.server().start()
    try:
        for name in CLONES:
            got = _reads(server, name)
            if hurt(name):
                assert isinstance(got, str), f"{name} opened on a damaged {record}"
            else:
                assert got == setup.expected[name]
    finally:
        server.stop()
    assert str(path) in "".join(server.log)
    cli("base", "gc", store=store_path, check=False)  # a gc in between deletes nothing of theirs
    report = json.loads(cli("check", "--json", store=store_path, check=False).stdout)
    assert str(path) in {f["path"] for f in report["findings"]}

    if record == "clone state":
        cli("check", "--repair", store=store_path)  # rebuilt from the overlay's own origin record
    else:
        path.write_bytes(good)  # the operator restores it (or promotes a version)
    assert cli("check", store=store_path).returncode == 0
    server = setup.server().start()
    try:
        for name in CLONES:
            assert _reads(server, name) == setup.expected[name], f"{name} lost writes to a damaged {record}"
    finally:
        server.stop()


def test_check_repairs_the_catalog_and_removes_leftovers(tmp_path: Path, store_path: Path) -> None:
    setup = Setup(tmp_path, store_path)
    st = Store(store_path)
    flip(st.catalog_path)
    (st.tmp / "0123.raw").write_bytes(b"left by a killed import")
    report = json.loads(cli("check", "--json", store=store_path, check=False).stdout)
    assert {str(st.catalog_path), str(st.tmp / "0123.raw")} <= {f["path"] for f in report["findings"]}
    assert not report["clean"]
    fixed = json.loads(cli("check", "--repair", "--json", store=store_path).stdout)
    assert fixed["clean"] and all(f["repaired"] for f in fixed["findings"])
    assert cli("check", store=store_path).stdout.startswith(f"store {store_path} is whole")
    assert not (st.tmp / "0123.raw").exists()
    server = setup.server().start()
    try:
        for name in CLONES:
            assert _reads(server, name) == setup.expected[name]
    finally:
        server.stop()


def test_a_pack_cut_short_under_a_running_server_is_eio_not_a_dead_worker(tmp_path: Path, store_path: Path) -> None:
    setup = Setup(tmp_path, store_path)
    pack = Store(store_path).chunks.pack
    server = setup.server().start()
    try:
        handles = {name: server.connect(name) for name in CLONES}
        for name, h in handles.items():  # every chunk is read (and checked) once
            assert pread_all(h, SIZE) == setup.expected[name]
        workers = [w["pid"] for w in server.info()["workers"]]
        os.truncate(pack, 96 * 65536)  # base "other" was imported last (slots 64-127): its second half goes
        with pytest.raises(nbd.Error) as info:
            for off in range(0, SIZE, 65536):
                handles["other"].pread(4096, off)
        assert info.value.errno == errno.errorcode[errno.EIO]
        assert [w["pid"] for w in server.info()["workers"]] == workers, "a worker died"
        for name in ("victim", "bystander"):  # deb's chunks are all there: its clones read exactly
            assert pread_all(handles[name], SIZE) == setup.expected[name]
        for h in handles.values():
            h.shutdown()
    finally:
        server.stop()
    assert str(pack) in "".join(server.log)


def test_a_clone_with_a_damaged_state_can_still_be_reset_or_removed(tmp_path: Path, store_path: Path) -> None:
    setup = Setup(tmp_path, store_path)
    st = Store(store_path)
    for name in ("victim", "bystander"):
        (st.clone_dir(st.get_clone(name)) / "state.json").write_bytes(b"")
    out = cli("base", "promote", "deb", "1", store=store_path).stdout  # lists them as waiting, not moving
    assert "0 clone(s) move at their next connection; 2 wait" in out, out
    cli("clone", "reset", "victim", store=store_path)  # the operator's call: its writes go
    cli("clone", "rm", "bystander", store=store_path)
    victim_dir = st.clone_dir(st.get_clone("victim"))
    assert len([d for d in victim_dir.iterdir() if d.is_dir()]) == 1  # the new overlay only
    server = setup.server().start()
    try:
        assert _reads(server, "victim") == setup.bases["deb"]
        assert _reads(server, "other") == setup.expected["other"]
    finally:
        server.stop()
    assert cli("check", store=store_path).returncode == 0


def _stale_mirror(tmp_path: Path, store_path: Path, last: str) -> Store:
    """A store whose mirror is one write behind catalog.json (a power cut between their renames): base deb
    and clone a, then `last` (a version import, or a clone's creation, and writes to it)."""
    make_image(tmp_path / "deb.raw", SIZE, [(0, SIZE)], seed=1)
    cli("base", "import", "deb", str(tmp_path / "deb.raw"), store=store_path)
    cli("clone", "create", "a", "--base", "deb", store=store_path)
    st = Store(store_path)
    stale = st.mirror_path.read_bytes()
    if last == "base import":
        make_image(tmp_path / "deb2.raw", SIZE, [(0, SIZE)], seed=9)  # new chunks: only version 2 names them
        cli("base", "import", "deb", str(tmp_path / "deb2.raw"), store=store_path)
    else:
        cli("clone", "create", "b", "--base", "deb", store=store_path)
        server = Server(store_path, tmp_path / "nbd.sock").start()
        try:
            h = server.connect("b")
            h.pwrite(WRITTEN, 8192)
            h.flush()
            h.shutdown()
        finally:
            server.stop()
    st.mirror_path.write_bytes(stale)
    return st


WRITTEN = b"b's own block\n" * 292


def test_a_mirror_left_behind_is_written_again_by_the_next_command(tmp_path: Path, store_path: Path) -> None:
    st = _stale_mirror(tmp_path, store_path, "clone create")
    assert st.mirror_path.read_bytes() != st.catalog_path.read_bytes()
    cli("base", "promote", "deb", "1", store=store_path)  # writes no catalog; takes the store's lock
    assert st.mirror_path.read_bytes() == st.catalog_path.read_bytes()
    assert cli("check", store=store_path).returncode == 0


@pytest.mark.parametrize("last", ["base import", "clone create"])
def test_a_damaged_catalog_over_a_stale_mirror_loses_nothing(tmp_path: Path, store_path: Path, last: str) -> None:
    """The mirror lacks the last write; catalog.json, which has it, is damaged. Nothing may be built on the
    mirror or removed on its strength: writes are refused until the repair, which moves aside (never
    deletes) what only the damaged catalog named, and keeps the chunks of a version map it moved."""
    from nbdclone.store.cache import digest
    from nbdclone.store.chunks import CHUNK, VersionMap

    st = _stale_mirror(tmp_path, store_path, last)
    cat = st.catalog()
    lost = st.map_path(cat.bases["deb"], "2") if last == "base import" else st.clone_dir(cat.clones["b"])
    assert lost.exists()
    flip(st.catalog_path)
    before = snapshot(store_path)
    for args in (
        ["clone", "create", "c", "--base", "deb"],
        ["base", "gc"],
        ["clone", "rm", "a"],
        ["base", "rm", "deb"],
    ):
        proc = cli(*args, store=store_path, check=False)
        assert proc.returncode != 0 and "nothing is changed until 'nbdclone check --repair'" in proc.stderr
        assert proc.stderr.count("\n") <= 2, proc.stderr  # the log's line (mirror read), then the refusal
    assert snapshot(store_path) == before, "a refused command changed the store"
    assert "a" in cli("clone", "list", store=store_path).stdout  # reads go on, from the mirror

    report = json.loads(cli("check", "--repair", "--json", store=store_path, check=False).stdout)
    assert not report["clean"], "a quarantine is the operator's to look at"
    [folder] = st.quarantined()
    held = folder / lost.relative_to(store_path)
    assert held.exists() and not lost.exists(), f"{lost} was not moved to the quarantine"
    assert (folder / "catalog.json").exists(), "the damaged catalog was not kept"
    assert any(str(folder) in f["repaired"] for f in report["findings"] if f["path"] == str(lost))
    if last == "clone create":  # its overlay, with what its client wrote
        [data] = held.glob("*/blocks")
        assert data.read_bytes()[8192 : 8192 + len(WRITTEN)] == WRITTEN

    cli("base", "gc", store=store_path)  # works again; frees nothing a quarantined map names
    if last == "base import":
        vmap = VersionMap.load(held, digests=True)
        with open(st.chunks.pack, "rb") as pack:
            for _, slot, key in vmap.stored():
                pack.seek(slot * CHUNK)
                assert digest(pack.read(CHUNK)) == key, f"chunk {slot} of the quarantined version was freed"
        assert list(vmap.stored()), "version 2 stores no chunk: the test shows nothing"
    assert cli("check", store=store_path, check=False).returncode == 1  # until the operator purges
    cli("check", "--purge", store=store_path)
    assert not st.quarantined() and cli("check", store=store_path).returncode == 0


def test_a_flipped_byte_after_an_unclean_stop_is_damage_outside_the_marked_regions(
    tmp_path: Path, store_path: Path
) -> None:
    """E1: after a kill -9, only the 16 MiB regions where blocks were rewritten in place may hold bytes their
    entries do not name. A byte flipped in a block written once and flushed, elsewhere, is EIO to the client,
    `check` names it, `check --repair` does not adopt it (so putting the byte back heals the block), and the
    rewritten block reads what was acknowledged."""
    far = 40 * MiB  # region 2; block 0 is in region 0
    cli("clone", "create", "big", "--size", "64M", store=store_path)
    server = Server(store_path, tmp_path / "nbd.sock").start()
    try:
        h = server.connect("big")
        h.pwrite(b"\x11" * 4096, 0)
        h.pwrite(b"\x22" * 4096, far)
        h.flush()
        h.pwrite(b"\x33" * 4096, far)  # in place: region 2 is marked
        h.flush()
        kill_server(server)
    finally:
        server.stop()
    st = Store(store_path)
    clone = st.get_clone("big")
    state = st.clone_state(clone)
    assert state is not None
    data = st.overlay_path(clone, state) / "blocks"
    flip(data, 100)
    for args in (("check",), ("check", "--repair")):
        proc = cli(*args, "--json", store=store_path, check=False)
        assert proc.returncode == 1, proc.stdout
        problems = {f["path"]: f["problem"] for f in json.loads(proc.stdout)["findings"]}
        assert "block(s) do not hold what the map fingerprints: 0" in problems.get(str(data), ""), problems
    server = Server(store_path, tmp_path / "nbd.sock").start()
    try:
        h = server.connect("big")
        with pytest.raises(nbd.Error) as info:
            h.pread(4096, 0)
        assert info.value.errno == errno.errorcode[errno.EIO]
        assert h.pread(4096, far) == b"\x33" * 4096
        h.shutdown()
    finally:
        server.stop()
    flip(data, 100)  # the byte put back: its entry still names the bytes written
    assert cli("check", store=store_path).returncode == 0
    server = Server(store_path, tmp_path / "nbd.sock").start()
    try:
        h = server.connect("big")
        assert h.pread(4096, 0) == b"\x11" * 4096
        h.shutdown()
    finally:
        server.stop()
