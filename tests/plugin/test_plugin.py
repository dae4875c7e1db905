"""The plugin under real nbdkit (`nbdkit -s`, one connection per handle) and libnbd."""

from __future__ import annotations

import errno
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest

from nbdclone.store import Store
from nbdclone.store.images import import_base
from nbdclone.supervisor.server import plugin_pythonpath
from tests.helpers import NBDCLONE, PLUGIN, extents, make_image, pread_all, snapshot

SIZE = 4 << 20
BASE_DATA = [(0, 1 << 20), (3 << 20, 4096)]


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    monkeypatch.setenv("PYTHONPATH", plugin_pythonpath())
    st = Store(tmp_path / "store")
    make_image(tmp_path / "b.raw", SIZE, BASE_DATA)
    import_base(st, "deb", tmp_path / "b.raw")
    st.create_clone("c1", base="deb")
    st.create_clone("c2", base="deb")
    return st


@pytest.fixture
def base_bytes(tmp_path: Path, store: Store) -> bytes:
    return (tmp_path / "b.raw").read_bytes()


def nbdkit_cmd(store: Store, *extra: str) -> list[str]:
    return ["nbdkit", "-s", "--exit-with-parent", *extra, "python", str(PLUGIN), f"store={store.path}"]


def connect(store: Store, name: str, *extra: str) -> nbd.NBD:
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.set_export_name(name)
    h.connect_command(nbdkit_cmd(store, *extra))
    return h


@pytest.fixture
def c1(store: Store) -> Iterator[nbd.NBD]:
    h = connect(store, "c1")
    yield h
    h.shutdown()


def test_advertises_what_it_implements(c1: nbd.NBD) -> None:
    assert c1.get_size() == SIZE
    assert c1.can_flush() and c1.can_fua() and c1.can_trim() and c1.can_zero() and c1.can_fast_zero()
    assert c1.can_multi_conn() and c1.can_cache() and c1.can_meta_context("base:allocation")
    assert not c1.is_read_only()


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        pytest.param(1, 1, id="one-byte"),
        pytest.param(4097, 8192, id="short-unaligned"),
        pytest.param(4095, 2, id="straddles-block-edge"),
        pytest.param(1 << 20, 1 << 20, id="aligned-over-hole"),
        pytest.param((1 << 20) - 100, 200, id="data-to-hole-edge"),
        pytest.param(SIZE - 3, 3, id="last-bytes"),
        pytest.param(0, SIZE, id="whole-disk"),
    ],
)
def test_unaligned_writes_merge_with_the_base(c1: nbd.NBD, base_bytes: bytes, offset: int, length: int) -> None:
    data = bytes((i * 7 + 3) % 251 + 1 for i in range(length))
    c1.pwrite(data, offset)
    model = bytearray(base_bytes)
    model[offset : offset + length] = data
    assert pread_all(c1, SIZE) == model


def test_fua_write_and_flush(c1: nbd.NBD) -> None:
    c1.pwrite(b"\xaa" * 5000, 10, nbd.CMD_FLAG_FUA)
    c1.flush()
    assert c1.pread(5000, 10) == b"\xaa" * 5000


def test_zero_reads_back_as_zero_and_is_fast(c1: nbd.NBD) -> None:
    c1.zero(100_000, 1000, nbd.CMD_FLAG_FAST_ZERO)
    assert c1.pread(100_000, 1000) == bytes(100_000)
    assert c1.pread(1000, 0) != bytes(1000)


def test_zeroed_base_data_is_reported_as_zero_extent(c1: nbd.NBD) -> None:
    c1.zero(1 << 20, 0)
    assert extents(c1, SIZE)[0] == (0, 3 << 20, nbd.STATE_HOLE | nbd.STATE_ZERO)


def test_extents_show_base_holes_and_clone_data(c1: nbd.NBD) -> None:
    c1.pwrite(b"x" * 4096, 2 << 20)
    got = extents(c1, SIZE)
    chunk = 64 * 1024  # the base is mapped in chunks: its 4 KiB of data at 3 MiB is one data chunk
    assert got == [
        (0, 1 << 20, 0),
        (1 << 20, 1 << 20, nbd.STATE_HOLE | nbd.STATE_ZERO),
        (2 << 20, 4096, 0),
        ((2 << 20) + 4096, (1 << 20) - 4096, nbd.STATE_HOLE | nbd.STATE_ZERO),
        (3 << 20, chunk, 0),
        ((3 << 20) + chunk, (1 << 20) - chunk, nbd.STATE_HOLE | nbd.STATE_ZERO),
    ]


def test_trim_returns_blocks_to_the_base(c1: nbd.NBD, base_bytes: bytes) -> None:
    c1.pwrite(b"y" * 16384, 0)
    c1.trim(16384, 0)
    assert c1.pread(16384, 0) == base_bytes[:16384]


def test_cache_request_is_accepted(c1: nbd.NBD) -> None:
    c1.cache(1 << 20, 0)


def test_clones_are_isolated(store: Store, base_bytes: bytes) -> None:
    a, b = connect(store, "c1"), connect(store, "c2")
    a.pwrite(b"A" * 4096, 0)
    a.flush()
    assert a.pread(4096, 0) == b"A" * 4096
    assert b.pread(4096, 0) == base_bytes[:4096]


def test_writes_persist_across_server_restarts(store: Store) -> None:
    h = connect(store, "c1")
    h.pwrite(b"persist" * 100, 12345)
    h.flush()
    h.shutdown()
    h = connect(store, "c1")
    assert h.pread(700, 12345) == b"persist" * 100


def test_out_of_range_request_gets_einval_from_the_server(c1: nbd.NBD) -> None:
    c1.set_strict_mode(0)  # let the request reach the server
    with pytest.raises(nbd.Error) as info:
        c1.pread(4096, SIZE - 100)
    assert info.value.errnum == errno.EINVAL


def test_read_only_connection_refuses_writes_with_eperm(store: Store) -> None:
    h = connect(store, "c1", "--readonly")
    h.set_strict_mode(0)
    with pytest.raises(nbd.Error) as info:
        h.pwrite(b"x", 0)
    assert info.value.errnum == errno.EPERM


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("nope", id="unknown"),
        pytest.param("../x", id="dotdot"),
        pytest.param("", id="empty"),
        pytest.param("x" * 4096, id="4096-bytes"),
        pytest.param("c1/../c2", id="path-like"),
    ],
)
def test_bad_export_names_are_refused_and_create_nothing(store: Store, name: str) -> None:
    before = snapshot(store.path)
    h = nbd.NBD()
    h.set_export_name(name)
    with pytest.raises(nbd.Error) as info:
        h.connect_command(nbdkit_cmd(store))
    assert "opt_go" in str(info.value) or "export" in str(info.value).lower()
    assert snapshot(store.path) == before


def test_list_exports_lists_every_clone(store: Store) -> None:
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_command(nbdkit_cmd(store))
    names: list[str] = []
    h.opt_list(lambda name, desc: names.append(name))
    h.opt_abort()
    assert sorted(names) == ["c1", "c2"]


def _writer(sock: Path, barrier: threading.Barrier, rnd: int, k: int, errors: list[BaseException]) -> None:
    """One connection of a round: waits for the others, connects, writes and flushes blocks of its own."""
    try:
        h = nbd.NBD()
        h.set_export_name("c1")
        barrier.wait()
        h.connect_unix(str(sock))
        for j in range(8):
            h.pwrite(_block(rnd, k, j), (k * 8 + j) * 4096)
        h.flush()
        h.shutdown()
    except BaseException as exc:  # reported by the test
        errors.append(exc)


def _block(rnd: int, k: int, j: int) -> bytes:
    return bytes([rnd, k, j]) * 1365 + b"!"


def test_first_connections_at_once_share_one_open_of_the_clone(store: Store, tmp_path: Path) -> None:
    """A fresh server's first connections arrive together (multi-conn: a client opens several): they must
    share one registry and so one open overlay, or each open takes the other's for an unclean stop and
    punches its blocks. Each round: a new nbdkit, 8 connections released by a barrier, each writes and
    flushes its own blocks; one "opened clone" in the log, every write reads back, and check is clean."""
    n = 8
    for rnd in range(6):
        sock = tmp_path / f"r{rnd}.sock"
        log = (tmp_path / f"r{rnd}.log").open("w+")
        proc = subprocess.Popen(
            ["nbdkit", "-f", "-U", str(sock), "--threads", "16", "python", str(PLUGIN), f"store={store.path}"],
            stderr=log,
        )
        try:
            deadline = time.monotonic() + 30
            while not sock.exists():
                assert time.monotonic() < deadline and proc.poll() is None, "nbdkit did not start"
                time.sleep(0.01)
            barrier = threading.Barrier(n)
            errors: list[BaseException] = []
            threads = [threading.Thread(target=_writer, args=(sock, barrier, rnd, k, errors)) for k in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not errors, errors
        finally:
            proc.terminate()
            proc.wait(30)
        log.seek(0)
        text = log.read()
        log.close()
        assert text.count("opened clone c1") == 1, text
        h = connect(store, "c1")
        want = b"".join(_block(rnd, k, j) for k in range(n) for j in range(8))
        assert h.pread(len(want), 0) == want
        h.shutdown()
        checked = subprocess.run([NBDCLONE, "check", "--store", str(store.path)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr


_E = b"nbdkit: python.0: error: "


@pytest.mark.parametrize(
    ("line", "key"),
    [  # as nbdkit 1.32 and its blocksize-policy filter write them (seen on this machine)
        (_E + b"invalid request: NBD_CMD_WRITE: write request on readonly connection", "write:read-only"),
        (_E + b"invalid request: NBD_CMD_READ: offset and count are out of range: x", "read:out-of-range"),
        (_E + b"invalid request: NBD_CMD_WRITE_ZEROES: offset and count are out of range: x", "zero:out-of-range"),
        (_E + b"invalid request: NBD_CMD_TRIM: offset and count are out of range: x", "trim:out-of-range"),
        (_E + b"client pwrite request rejected: count 16777216 is larger than maximum size 8388608", "write:too-large"),
        (_E + b"invalid request: REQ_ONE flag needs BLOCK_STATUS request", "other:invalid"),
        (b"2026-12-07 INFO nbdclone[worker 0]: opened clone ro (version 1)", None),
        (_E + b"a plugin error that reached the plugin", None),
    ],
)
def test_nbdkit_refusals_are_read_from_its_log_lines(line: bytes, key: str | None) -> None:
    from nbdclone.worker.process import Refusals

    refusals = Refusals()
    refusals.seen(line)
    assert refusals.snapshot() == ({key: 1} if key else {})
