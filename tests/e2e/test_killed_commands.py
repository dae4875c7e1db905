"""Store-changing commands killed at any moment (kill -9 after a random delay) never leave the store unusable:
every later command works, every clone in the catalog serves exactly what it held (or, for the clone being
reset or upgraded, its old or its new contents), and the base reads back whole."""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import pytest

from tests.helpers import Server, cli, make_image, pread_all, run_killed, wait_closed

MiB = 1 << 20
SIZE = 8 * MiB


@pytest.mark.parametrize("seed", range(6))
def test_commands_killed_midway_leave_a_usable_store(tmp_path: Path, store_path: Path, seed: int) -> None:
    rnd = random.Random(seed)
    v1 = make_image(tmp_path / "v1.raw", SIZE, [(0, SIZE // 2)], seed=1)
    v2 = make_image(tmp_path / "v2.raw", SIZE, [(0, SIZE)], seed=2)
    cli("base", "import", "deb", str(tmp_path / "v1.raw"), store=store_path)
    cli("clone", "create", "keep", "victim", "--base", "deb@1", store=store_path)
    server = Server(store_path, tmp_path / "nbd.sock").start()
    try:
        written = rnd.randbytes(MiB)
        for name in ("keep", "victim"):
            h = server.connect(name)
            h.pwrite(written, MiB)
            h.flush()
            h.shutdown()
        wait_closed(store_path, "keep", "victim")
        with_write = bytearray(v1)
        with_write[MiB : 2 * MiB] = written

        commands = [
            ["base", "import", "deb", str(tmp_path / "v2.raw")],
            ["base", "promote", "deb", "2"],
            ["clone", "create", "fresh", "--base", "deb"],
            ["clone", "reset", "victim"],
            ["clone", "upgrade", "victim", "--to", "2"],
            ["clone", "rm", "victim"],
            ["base", "gc"],
        ]
        # Kills land around the commands' own work, which starts after the CLI's start-up (measured here).
        started = time.monotonic()
        cli("clone", "list", store=store_path)
        startup = time.monotonic() - started
        statuses: list[int] = []
        for scale in (1.0, 0.9, 0.8, 0.7, 0.6):  # the machine is shared: when every command beat its kill, again
            statuses = [run_killed(args, store_path, scale * startup * rnd.uniform(0.7, 1.3)) for args in commands]
            if -signal.SIGKILL in statuses:
                break
        assert -signal.SIGKILL in statuses, f"no command was killed: {statuses}"
        # Whatever was cut short, every command still works and says the truth.
        cli("base", "list", store=store_path)
        names = {line.split()[0] for line in cli("clone", "list", store=store_path).stdout.splitlines()[1:]}
        assert "keep" in names
        h = server.connect("keep")
        assert pread_all(h, SIZE) == with_write, "a clone no command touched changed"
        h.shutdown()
        if "victim" in names:  # its writes, or dropped on v1 or v2: whole, never a mix
            h = server.connect("victim")
            got = pread_all(h, h.get_size())
            h.shutdown()
            assert got in (bytes(with_write), v1, v2), "the reset or upgraded clone is neither old nor new"
        if "fresh" in names:
            h = server.connect("fresh")
            assert pread_all(h, h.get_size()) in (v1, v2)
            h.shutdown()
        cli("base", "gc", store=store_path)  # and the store can be cleaned up after all of it
        cli("clone", "create", "after", "--base", "deb@1", store=store_path)
        h = server.connect("after")
        assert pread_all(h, SIZE) == v1
        h.shutdown()
    finally:
        server.stop()
