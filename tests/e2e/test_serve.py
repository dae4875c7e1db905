"""End to end, through `nbdclone serve` and real NBD clients."""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import time
from pathlib import Path

import nbd
import pytest

from tests.helpers import NBDCLONE, Server, cli, extents, make_image, pread_all, sha256, snapshot

MiB = 1 << 20
SIZE = 64 * MiB
BASE_DATA = [(0, 4 * MiB), (20 * MiB, MiB), (40 * MiB, 64 * 1024)]


@pytest.fixture
def base(tmp_path: Path, store_path: Path) -> tuple[Path, bytes]:
    src = tmp_path / "base.raw"
    data = make_image(src, SIZE, BASE_DATA)
    cli("base", "import", "deb", str(src), store=store_path)
    return src, data


def base_files(store: Path) -> dict[str, str]:
    """Checksums of what holds base data: the chunk pack and the version maps."""
    paths = [store / "chunks" / "pack", *sorted((store / "bases").rglob("*.map"))]
    return {str(p.relative_to(store)): sha256(p) for p in paths}


def test_two_clones_are_isolated_and_the_base_never_changes(
    server: Server, store_path: Path, base: tuple[Path, bytes]
) -> None:
    _, data = base
    before = base_files(store_path)
    # Created while the server runs: served without a restart.
    cli("clone", "create", "a", "--base", "deb", store=store_path)
    cli("clone", "create", "b", "--base", "deb", store=store_path)
    a, b = server.connect("a"), server.connect("b")
    a.pwrite(b"\x5a" * 3 * MiB, MiB + 17)
    a.zero(MiB, 20 * MiB)
    a.flush()
    model = bytearray(data)
    model[MiB + 17 : 4 * MiB + 17] = b"\x5a" * 3 * MiB
    model[20 * MiB : 21 * MiB] = bytes(MiB)
    assert pread_all(a, SIZE) == model
    assert pread_all(b, SIZE) == data
    a.shutdown()
    b.shutdown()
    assert base_files(store_path) == before


def test_qemu_io_through_nbdclone_uri(server: Server, store_path: Path, base: tuple[Path, bytes]) -> None:
    cli("clone", "create", "q", "--base", "deb", store=store_path)
    uri = cli("uri", "q", store=store_path).stdout.strip()
    assert uri == server.uri("q")
    proc = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 0xab 1M 64k", "-c", "read -P 0xab 1M 64k", uri],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Pattern verification failed" not in proc.stdout
    assert "read 65536/65536 bytes at offset 1048576" in proc.stdout


@pytest.mark.parametrize("tool", ["qemu-img", "nbdcopy"])
def test_copies_of_a_clone_equal_the_model_and_stay_sparse(
    tool: str, tmp_path: Path, server: Server, store_path: Path, base: tuple[Path, bytes]
) -> None:
    _, data = base
    cli("clone", "create", "c", "--base", "deb", store=store_path)
    h = server.connect("c")
    h.pwrite(b"\x11" * MiB, 30 * MiB)
    h.zero(4 * MiB, 0)
    h.flush()
    model = bytearray(data)
    model[30 * MiB : 31 * MiB] = b"\x11" * MiB
    model[0 : 4 * MiB] = bytes(4 * MiB)
    dest = tmp_path / "copy.raw"
    if tool == "qemu-img":
        cmd = ["qemu-img", "convert", "-f", "raw", "-O", "raw", server.uri("c"), str(dest)]
    else:
        cmd = ["nbdcopy", server.uri("c"), str(dest)]
        dest.touch()
    subprocess.run(cmd, check=True, capture_output=True)
    assert dest.read_bytes() == model
    allocated = os.stat(dest).st_blocks * 512
    # Data: base 1 MiB + 64 KiB, and the clone's 1 MiB; the zeroed 4 MiB and every hole stay holes.
    assert allocated <= 2 * MiB + 64 * 1024 + 256 * 1024, allocated
    # The clone's own map, as a client sees it.
    ext = extents(h, SIZE)
    assert ext[0] == (0, 20 * MiB, 3)
    h.shutdown()


def test_clone_export_equals_what_clients_read(
    tmp_path: Path, server: Server, store_path: Path, base: tuple[Path, bytes]
) -> None:
    cli("clone", "create", "e", "--base", "deb", store=store_path)
    h = server.connect("e")
    h.pwrite(b"export!" * 1000, 123_456)
    h.flush()
    expected = pread_all(h, SIZE)
    h.shutdown()
    cli("clone", "export", "e", str(tmp_path / "e.raw"), store=store_path)
    cli("clone", "export", "e", str(tmp_path / "e.qcow2"), "--format", "qcow2", store=store_path)
    assert (tmp_path / "e.raw").read_bytes() == expected
    subprocess.run(["qemu-img", "compare", str(tmp_path / "e.raw"), str(tmp_path / "e.qcow2")], check=True)
    info = json.loads(cli("clone", "info", "e", "--json", store=store_path).stdout)
    assert info["bytes_written"] == 7000
    assert info["data_blocks"] == 2


def test_kill_9_during_fio_keeps_every_acknowledged_write(
    tmp_path: Path, server: Server, store_path: Path, base: tuple[Path, bytes]
) -> None:
    # fio's power-cut trigger: after 3 s it stops the job where it is, saves which writes were acknowledged
    # (the verify state), and runs the trigger: kill -9 of the nbdkit process. (A server killed under fio's
    # feet would leave fio's nbd engine spinning on the dead connection.) When the kill lands while fio still
    # waits on a request (a flush that syncs the data file can take a while), fio fails it with the reset
    # and exits 1, and its saved state no longer tells acknowledged writes from those in flight: such a run
    # proves nothing either way and is repeated on a fresh clone. The guarantee itself is also pinned without
    # fio's races by test_kill_9_with_a_connection_open_keeps_every_acknowledged_write.
    for attempt in range(6):
        name = f"f{attempt}"
        cli("clone", "create", name, "--base", "deb", store=store_path)
        job = [
            "fio",
            "--name=crash",
            "--ioengine=nbd",
            f"--uri={server.uri(name)}",
            "--rw=randwrite",
            "--bs=4k",
            "--size=48M",
            "--iodepth=8",
            "--verify=crc32c",
            "--fsync=16",
            "--rate_iops=2500",
        ]
        killed = server.nbdkit_pid(name)
        write = subprocess.run(
            [
                *job,
                "--do_verify=0",
                "--verify_state_save=1",
                f"--output={tmp_path / 'w.json'}",
                "--output-format=json",
                "--trigger-timeout=3",
                f"--trigger=kill -9 {killed}",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        server.wait_restarted(name, killed)  # its next open recovers the overlay
        if not (write.returncode == 1 and write.stderr.strip().endswith("Connection reset by peer")):
            break
    assert write.returncode == 0, write.stderr[-2000:]
    written = json.loads((tmp_path / "w.json").read_text())["jobs"][0]["write"]["io_bytes"]
    assert 1 * MiB < written < 48 * MiB, "the kill must land during the job"
    assert list(tmp_path.glob("*verify.state"))
    assert server.proc is not None and server.proc.poll() is None
    proc = subprocess.run(
        [
            *job,
            "--verify_only=1",
            "--verify_state_load=1",
            "--verify_fatal=1",
            f"--output={tmp_path / 'v.json'}",
            "--output-format=json",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    verified = json.loads((tmp_path / "v.json").read_text())["jobs"][0]
    assert verified["error"] == 0
    assert verified["read"]["io_bytes"] >= written - 8 * 4096  # all but what was in flight


@pytest.mark.parametrize("change", ["zero", "trim"])
def test_kill_9_with_a_connection_open_keeps_every_acknowledged_write(
    server: Server, store_path: Path, base: tuple[Path, bytes], change: str
) -> None:
    """Writes acknowledged after the last flush (whose map entries are still pending in the worker), zeroes
    or trims, then kill -9 with the connection still open: the restarted worker reads every one back."""
    import random

    _, data = base
    cli("clone", "create", "k", "--base", "deb", store=store_path)
    h = server.connect("k")
    rng = random.Random(7)
    model = bytearray(data)
    for i in range(3000):
        off = rng.randrange(SIZE // 4096 - 1) * 4096
        if i % 97 == 5:
            if change == "zero":
                h.zero(2 * 4096, off)
                model[off : off + 2 * 4096] = bytes(2 * 4096)
            else:
                h.trim(2 * 4096, off)  # whole blocks go back to the base
                model[off : off + 2 * 4096] = data[off : off + 2 * 4096]
        else:
            block = rng.randbytes(4096)
            h.pwrite(block, off)  # acknowledged when it returns
            model[off : off + 4096] = block
        if i == 1000:
            h.flush()
    killed = server.nbdkit_pid("k")
    os.kill(killed, signal.SIGKILL)
    server.wait_restarted("k", killed)
    again = server.connect("k")
    assert pread_all(again, SIZE) == model
    again.shutdown()


def test_sigterm_stops_cleanly_and_restart_reads_the_same(
    server: Server, store_path: Path, base: tuple[Path, bytes]
) -> None:
    cli("clone", "create", "s", "--base", "deb", store=store_path)
    h = server.connect("s")
    h.pwrite(b"\x77" * 10000, 5)  # no flush: a clean stop must flush
    h.shutdown()
    sockets = server.sockets()
    assert server.stop() == 0
    assert sockets and not any(s.exists() for s in sockets)
    assert not (store_path / "run" / "server.json").exists()
    again = Server(store_path, server.socket).start()
    try:
        h = again.connect("s")
        assert h.pread(10000, 5) == b"\x77" * 10000
        h.shutdown()
    finally:
        again.stop()


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_a_clone_keeps_its_address_offline_and_across_worker_counts(
    tmp_path: Path, store_path: Path, base: tuple[Path, bytes], transport: str, free_port: int
) -> None:
    names = [f"addr{i}" for i in range(5)]
    cli("clone", "create", *names, "--base", "deb", store=store_path)
    where = ("--listen", f"127.0.0.1:{free_port}") if transport == "tcp" else ("--socket", str(tmp_path / "a.sock"))
    before = snapshot(store_path)
    offline = {n: cli("uri", n, *where, store=store_path).stdout.strip() for n in names}
    assert snapshot(store_path) == before, "uri changed the store"
    assert len(set(offline.values())) == len(names), "clones made together share one address"
    for workers in ("1", "3"):
        srv = Server(store_path, tmp_path / "a.sock", (*where, "--workers", workers)).start()
        try:
            for i, n in enumerate(names):
                assert cli("uri", n, store=store_path).stdout.strip() == offline[n]
                h = nbd.NBD()
                h.connect_uri(offline[n])  # the address written down before any server ran
                h.pwrite(workers.encode() * 512, 4096 * i)
                assert h.pread(512, 4096 * i) == workers.encode() * 512
                h.shutdown()
        finally:
            assert srv.stop() == 0
        # Stopped again: the last server's address, without naming it.
        assert {n: cli("uri", n, store=store_path).stdout.strip() for n in names} == offline


def test_reset_and_rm_of_a_connected_clone_are_refused(
    server: Server, store_path: Path, base: tuple[Path, bytes]
) -> None:
    cli("clone", "create", "busy", "--base", "deb", store=store_path)
    h = server.connect("busy")
    h.pwrite(b"keep me", 0)
    h.flush()
    before = snapshot(store_path)
    for args in (["clone", "reset", "busy"], ["clone", "rm", "busy"]):
        proc = cli(*args, store=store_path, check=False)
        assert proc.returncode != 0 and "is open on a running server" in proc.stderr
    assert snapshot(store_path) == before
    assert h.pread(7, 0) == b"keep me"
    listed = json.loads(cli("clone", "list", "--json", store=store_path).stdout)["clones"]
    assert [c["open"] for c in listed if c["name"] == "busy"] == [True]
    h.shutdown()


def test_a_full_disk_gives_enospc_and_recovers(tmp_path: Path, base: tuple[Path, bytes]) -> None:
    """The store on a small tmpfs: filling it gets ENOSPC, not EIO; once space is back, the same connection
    writes again and nothing acknowledged is lost."""
    import errno

    import nbd

    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(small)], check=True)
    try:
        store = small / "store"
        blank = tmp_path / "blank.raw"
        with open(blank, "wb") as f:
            f.truncate(64 * MiB)
        cli("base", "import", "blank", str(blank), store=store)
        cli("clone", "create", "full", "--base", "blank", store=store)
        reserve = small / "reserve"
        reserve.write_bytes(os.urandom(40 * MiB))  # space to give back later: more than RocksDB needs to recover
        srv = Server(store, tmp_path / "small.sock").start()
        try:
            h = srv.connect("full")
            acked: list[int] = []
            with pytest.raises(nbd.Error) as info:
                for i in range(64):
                    h.pwrite(bytes([i + 1]) * MiB, i * MiB)
                    h.flush()
                    acked.append(i)
            assert info.value.errnum == errno.ENOSPC
            assert acked, "some writes must have fitted"
            reserve.unlink()
            h.pwrite(b"again" * 100, 63 * MiB)
            h.flush()
            assert h.pread(500, 63 * MiB) == b"again" * 100
            for i in acked:
                assert h.pread(MiB, i * MiB) == bytes([i + 1]) * MiB
            h.shutdown()
        finally:
            srv.stop()
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_a_crashed_worker_is_restarted_and_other_workers_keep_serving(
    tmp_path: Path, store_path: Path, base: tuple[Path, bytes]
) -> None:
    from nbdclone.store import Store
    from nbdclone.store.catalog import worker_of

    names = [f"w{i}" for i in range(8)]
    cli("clone", "create", *names, "--base", "deb", store=store_path)
    cat = Store(store_path).catalog()
    a = next(n for n in names if worker_of(cat, n, 2) == 0)
    b = next(n for n in names if worker_of(cat, n, 2) == 1)
    srv = Server(store_path, tmp_path / "w.sock", ("--workers", "2")).start()
    try:
        assert srv.uri(a) != srv.uri(b)
        ha, hb = srv.connect(a), srv.connect(b)
        hb.pwrite(b"survivor" * 512, 0)
        hb.flush()
        dead = srv.nbdkit_pid(a)
        os.kill(dead, signal.SIGKILL)
        with pytest.raises(nbd.Error):
            ha.pread(4096, 0)  # its connection died with its worker
        assert hb.pread(4096, 0) == b"survivor" * 512  # the other worker did not notice
        srv.wait_restarted(a, dead)
        ha = srv.connect(a)
        assert ha.pread(4096, 0) == base[1][:4096]
        # A worker serves only its own clones: the other worker's socket refuses them, creating nothing.
        wrong = nbd.NBD()
        wrong.set_export_name(a)
        with pytest.raises(nbd.Error):
            wrong.connect_unix(str(srv.sockets()[1]))
        assert sorted(cli("uri", n, store=store_path).stdout.strip() for n in (a, b)) == sorted(
            [srv.uri(a), srv.uri(b)]
        )
        ha.shutdown()
        hb.shutdown()
    finally:
        assert srv.stop() == 0


def test_a_second_server_on_the_same_store_is_refused(tmp_path: Path, server: Server, store_path: Path) -> None:
    proc = subprocess.run(
        [NBDCLONE, "serve", "--store", str(store_path), "--socket", str(tmp_path / "other.sock")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1 and "already running" in proc.stderr
    assert not (tmp_path / "other.sock").exists()


def test_connections_that_come_and_go_leave_every_worker_serving(
    server: Server, store_path: Path, base: tuple[Path, bytes]
) -> None:
    """Each connection holds a Python thread state from open to close (plugin.py): connections opened and
    closed in any order, many times, on every worker, must neither crash a worker nor leak into others."""
    _, data = base
    names = [f"cc{i}" for i in range(6)]
    cli("clone", "create", *names, "--base", "deb", store=store_path)
    pids = {name: server.nbdkit_pid(name) for name in names}
    for round_ in range(5):
        handles = [server.connect(name) for name in names for _ in range(2)]
        for k, h in enumerate(handles):
            h.pwrite(bytes([round_ + 1, k + 1]) * 2048, k * 4096)
        for h in reversed(handles[::2]) if round_ % 2 else handles[::2]:
            h.shutdown()
        for k, h in enumerate(handles):
            if k % 2:
                assert h.pread(4096, k * 4096) == bytes([round_ + 1, k + 1]) * 2048
                assert h.pread(4096, 30 * MiB) == data[30 * MiB : 30 * MiB + 4096]
                h.shutdown()
    assert {name: server.nbdkit_pid(name) for name in names} == pids, "a worker was restarted"


def _minor_faults(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def test_requests_do_not_create_a_python_thread_state_each(
    server: Server, store_path: Path, base: tuple[Path, bytes]
) -> None:
    """Without the thread state held from open to close, each request maps a fresh frame stack and faults
    on it (about one minor fault per request); with it, a request to the same block faults on nothing."""
    cli("clone", "create", "ts", "--base", "deb", store=store_path)
    h = server.connect("ts")
    pid = server.nbdkit_pid("ts")
    block = b"\x42" * 4096
    h.pwrite(block, 0)
    before = _minor_faults(pid)
    for _ in range(2000):
        h.pwrite(block, 0)
        assert h.pread(4096, 0) == block
    faults = _minor_faults(pid) - before
    h.shutdown()
    assert faults < 400, f"{faults} minor page faults in 4000 requests"


def test_connection_threads_are_pinned_only_when_they_share_a_worker(
    tmp_path: Path, store_path: Path, base: tuple[Path, bytes]
) -> None:
    """One connection runs where the scheduler likes (off its client's core); two or more on one worker are
    all pinned to the worker's core (they share its GIL). RocksDB's threads stay free."""
    from nbdclone.store import Store
    from nbdclone.store.catalog import worker_of

    names = [f"p{i}" for i in range(4)]
    cli("clone", "create", *names, "--base", "deb", store=store_path)
    cat = Store(store_path).catalog()
    mine = [n for n in names if worker_of(cat, n, 2) == 0]
    assert len(mine) == 2  # dealt in creation order
    cpus = sorted(os.sched_getaffinity(0))
    assert len(cpus) >= 2, "this test needs a machine with two cores"

    def pinned(pid: int) -> int:
        """Threads of worker `pid` allowed on its core alone."""
        count = 0
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                status = (task / "status").read_text()
            except (FileNotFoundError, ProcessLookupError):  # a thread that ended meanwhile
                continue
            allowed = next(line.split()[1] for line in status.splitlines() if line.startswith("Cpus_allowed_list"))
            count += allowed == str(cpus[0])
        return count

    srv = Server(store_path, tmp_path / "p.sock", ("--workers", "2")).start()
    try:
        worker = srv.nbdkit_pid(mine[0])
        one = srv.connect(mine[0])
        assert one.pread(4096, 0) == base[1][:4096]
        assert pinned(worker) == 0
        two = srv.connect(mine[1])
        assert two.pread(4096, 0) == base[1][:4096]
        assert pinned(worker) == 2
        two.shutdown()
        deadline = time.monotonic() + 10
        while pinned(worker) and time.monotonic() < deadline:  # close runs after the client has gone
            time.sleep(0.05)
        assert pinned(worker) == 0
        assert one.pread(4096, 4096) == base[1][4096:8192]
        one.shutdown()
    finally:
        srv.stop()


def _soft_nofile(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError(f"no open-file limit for {pid}")


def test_serve_raises_the_open_file_limit_for_its_workers(tmp_path: Path, store_path: Path) -> None:
    """Hundreds of clones open at once need more descriptors than the usual soft limit of 1,024."""
    cli("clone", "create", "a", "--size", "1M", store=store_path)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    low = 256
    proc = subprocess.Popen(
        [NBDCLONE, "serve", "--store", str(store_path), "--socket", str(tmp_path / "s.sock")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard)),
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("nbdclone: serving"):
                break
        workers = [w["pid"] for w in json.loads((store_path / "run" / "server.json").read_text())["workers"]]
        want = hard if hard != resource.RLIM_INFINITY else 1 << 20
        assert _soft_nofile(proc.pid) == want and all(_soft_nofile(pid) == want for pid in workers)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


def test_serve_warns_when_the_hard_open_file_limit_is_low(tmp_path: Path, store_path: Path) -> None:
    """Under a hard limit of 1,024 a few dozen clones can be open per worker: the operator is told at start,
    with the number, not by clients refused later."""
    cli("clone", "create", "a", "--size", "1M", store=store_path)
    proc = subprocess.Popen(
        [NBDCLONE, "serve", "--store", str(store_path), "--socket", str(tmp_path / "s.sock"), "--workers", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024)),
    )
    lines = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("nbdclone: serving"):
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert any("the open-file limit is 1024: about 120 clones can be open at once" in line for line in lines), lines


def test_a_bad_export_name_logs_one_line_not_a_traceback(tmp_path: Path, store_path: Path) -> None:
    cli("clone", "create", "a", "--size", "1M", store=store_path)
    server = Server(store_path, tmp_path / "nbd.sock").start()
    try:
        for name in ("nope", "../etc"):
            h = nbd.NBD()
            h.set_export_name(name)
            with pytest.raises(nbd.Error) as info:
                h.connect_uri(server.uri("a").replace("///a?", f"///{name}?"))
            assert info.value.errnum == errno.ENOENT
    finally:
        server.stop()
    log = "".join(server.log)
    assert "Traceback" not in log, log
    for name in ("nope", "../etc"):
        lines = [line for line in log.splitlines() if f"no clone named {name!r}" in line]
        assert lines and all(line.startswith("nbdkit: ") for line in lines), log
