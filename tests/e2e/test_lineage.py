"""Snapshots, rollback, clones of clones, flatten and resize, through the real server and real clients."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from nbdclone.store.layout import CRASH_AT_ENV
from tests.helpers import NBDCLONE, Server, cli, make_image, pread_all, wait_closed

MiB = 1 << 20
SIZE = 32 * MiB


@pytest.fixture
def gold(tmp_path: Path, store_path: Path) -> bytes:
    data = make_image(tmp_path / "gold.raw", SIZE, [(0, 6 * MiB), (20 * MiB, 3 * MiB + 512)])
    cli("base", "import", "gold", str(tmp_path / "gold.raw"), store=store_path)
    return data


def _write(server: Server, store: Path, name: str, model: bytearray, writes: list[tuple[int, bytes]]) -> None:
    """Write through two connections at once (multi-conn), flush, check, disconnect."""
    a, b = server.connect(name), server.connect(name)
    for k, (off, data) in enumerate(writes):
        (a if k % 2 else b).pwrite(data, off)
        model[off : off + len(data)] = data
    a.flush()
    assert pread_all(b, len(model)) == model
    a.shutdown()
    b.shutdown()
    wait_closed(store, name)


def _read(server: Server, store: Path, name: str, size: int) -> bytes:
    h = server.connect(name)
    data = pread_all(h, size)
    h.shutdown()
    wait_closed(store, name)
    return data


def test_snapshot_write_rollback_and_clone_of_a_snapshot(server: Server, store_path: Path, gold: bytes) -> None:
    cli("clone", "create", "vm", "--base", "gold", store=store_path)
    model = bytearray(gold)
    _write(server, store_path, "vm", model, [(MiB + 3, b"first" * 50_000), (21 * MiB, b"\x11" * 70_000)])
    at_s1 = bytes(model)

    h = server.connect("vm")  # refused while a client is connected: nothing changes
    refused = cli("clone", "snapshot", "vm", "s1", store=store_path, check=False)
    assert refused.returncode == 1 and "disconnect its clients first" in refused.stderr, refused.stderr
    assert json.loads(cli("clone", "snapshots", "vm", "--json", store=store_path).stdout)["snapshots"] == []
    h.shutdown()
    wait_closed(store_path, "vm")
    cli("clone", "snapshot", "vm", "s1", store=store_path)

    _write(server, store_path, "vm", model, [(0, b"second" * 1000), (SIZE - 4096, b"\xee" * 4096)])
    assert _read(server, store_path, "vm", SIZE) == model  # the snapshot did not change what it reads
    cli("clone", "snapshot", "vm", "s2", store=store_path)
    at_s2 = bytes(model)
    _write(server, store_path, "vm", model, [(5 * MiB, b"third" * 9000)])

    listed = json.loads(cli("clone", "snapshots", "vm", "--json", store=store_path).stdout)["snapshots"]
    assert [s["name"] for s in listed] == ["s1", "s2"] and [s["on"] for s in listed] == [False, True]

    cli("clone", "rollback", "vm", "s1", store=store_path)
    assert hashlib.sha256(_read(server, store_path, "vm", SIZE)).digest() == hashlib.sha256(at_s1).digest()

    cli("clone", "create", "copy", "--from", "vm@s2", store=store_path)
    assert _read(server, store_path, "copy", SIZE) == at_s2
    cli("clone", "create", "copy-now", "--from", "vm", store=store_path)
    assert _read(server, store_path, "copy-now", SIZE) == at_s1

    # The copy does not depend on vm: vm and its snapshots go, the copy still reads the same.
    cli("clone", "snapshot", "rm", "vm", "s2", store=store_path)
    cli("clone", "rm", "vm", store=store_path)
    cli("base", "gc", store=store_path)
    assert _read(server, store_path, "copy", SIZE) == at_s2
    assert cli("check", store=store_path).returncode == 0
    missing = cli("clone", "rollback", "copy", "s1", store=store_path, check=False)
    assert missing.returncode == 1 and "no snapshot named 's1'" in missing.stderr


def test_flatten_frees_the_base_version(tmp_path: Path, server: Server, store_path: Path, gold: bytes) -> None:
    cli("clone", "create", "vm", "--base", "gold", store=store_path)
    model = bytearray(gold)
    _write(server, store_path, "vm", model, [(3 * MiB, b"flat" * 100_000)])
    before = hashlib.sha256(model).hexdigest()
    refused = cli("base", "rm", "gold", store=store_path, check=False)
    assert refused.returncode == 1 and "vm" in refused.stderr

    out = cli("clone", "flatten", "vm", store=store_path).stdout
    assert "no longer uses its base version" in out
    make_image(tmp_path / "v2.raw", SIZE, [(0, MiB)], seed=9)
    cli("base", "import", "gold", str(tmp_path / "v2.raw"), store=store_path)
    cli("base", "promote", "gold", "2", store=store_path)
    cli("base", "rm", "gold@1", store=store_path)  # what the clone was made from
    assert hashlib.sha256(_read(server, store_path, "vm", SIZE)).hexdigest() == before
    cli("base", "rm", "gold", store=store_path)  # no clone of gold is left
    assert hashlib.sha256(_read(server, store_path, "vm", SIZE)).hexdigest() == before
    assert cli("check", store=store_path).returncode == 0


def _qemu_size(server: Server, name: str) -> int:
    info = subprocess.run(
        ["qemu-img", "info", "--output=json", "-f", "raw", server.uri(name)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(json.loads(info.stdout)["virtual-size"])


@pytest.mark.parametrize("kind", ["blank", "base"])
def test_resize_grows_shrinks_only_when_asked(server: Server, store_path: Path, gold: bytes, kind: str) -> None:
    args = ["--size", "32M"] if kind == "blank" else ["--base", "gold"]
    cli("clone", "create", "vm", *args, store=store_path)
    model = bytearray(gold if kind == "base" else bytes(SIZE))
    _write(server, store_path, "vm", model, [(SIZE - 100_000, b"\x77" * 100_000), (MiB, b"keep" * 1000)])

    cli("clone", "resize", "vm", "48M", store=store_path)
    assert _qemu_size(server, "vm") == 48 * MiB
    model += bytes(16 * MiB)
    assert _read(server, store_path, "vm", 48 * MiB) == model
    _write(server, store_path, "vm", model, [(47 * MiB, b"\x99" * MiB)])  # the new end is writable

    refused = cli("clone", "resize", "vm", "16M", store=store_path, check=False)
    assert refused.returncode == 1 and "--shrink" in refused.stderr
    assert _qemu_size(server, "vm") == 48 * MiB and _read(server, store_path, "vm", 48 * MiB) == model

    cli("clone", "resize", "vm", "16M", "--shrink", store=store_path)
    assert _qemu_size(server, "vm") == 16 * MiB
    cli("clone", "resize", "vm", "20M", store=store_path)  # what the shrink cut does not come back
    assert _read(server, store_path, "vm", 20 * MiB) == model[: 16 * MiB] + bytes(4 * MiB)


@pytest.mark.parametrize("step", ["lineage-commit", "lineage-switch"])
@pytest.mark.parametrize("command", ["snapshot", "flatten", "resize"])
def test_a_killed_change_of_base_loses_nothing(
    server: Server, store_path: Path, gold: bytes, step: str, command: str
) -> None:
    """kill -9 before the catalog names the new version, or after it and before the clone's state moves
    onto it: either way the clone reads what it read, and the store checks whole."""
    cli("clone", "create", "vm", "--base", "gold", store=store_path)
    model = bytearray(gold)
    _write(server, store_path, "vm", model, [(2 * MiB + 5, b"crash" * 30_000), (SIZE - 8192, b"\x42" * 8192)])
    args = {"snapshot": ["clone", "snapshot", "vm", "s1"], "flatten": ["clone", "flatten", "vm"]}
    args["resize"] = ["clone", "resize", "vm", "40M"]
    proc = subprocess.run(
        [NBDCLONE, *args[command], "--store", str(store_path)],
        env={**os.environ, CRASH_AT_ENV: step},
        capture_output=True,
        check=False,
    )
    assert proc.returncode == -9, "the hook must kill the command at its step"
    size = 40 * MiB if command == "resize" and step == "lineage-switch" else SIZE
    assert _read(server, store_path, "vm", size) == model + bytes(size - SIZE)
    _write(server, store_path, "vm", model + bytearray(size - SIZE), [(MiB, b"after" * 1000)])
    report = cli("check", store=store_path, check=False)
    assert report.returncode == 0, report.stdout


def test_clone_diff_through_the_cli_while_a_client_is_connected(server: Server, store_path: Path, gold: bytes) -> None:
    """`clone diff --json` between snapshots and to the clone now, with a client still connected: what it
    flushed is reported, in the newer state's kinds; a mistake is one line and exit 2."""
    cli("clone", "create", "vm", "--base", "gold", store=store_path)
    model = bytearray(gold)
    _write(server, store_path, "vm", model, [(MiB, b"\x11" * 65536), (9 * MiB + 4096, b"\x22" * 4096)])
    cli("clone", "snapshot", "vm", "s1", store=store_path)
    h = server.connect("vm")
    h.pwrite(b"\x33" * 8192, 12 * MiB)
    h.zero(2 * 65536, 0)  # over the base's data: zeros
    h.flush()
    try:
        now = json.loads(cli("clone", "diff", "vm", "--json", store=store_path).stdout)
        assert (now["from"], now["to"], now["size"]) == ("snapshot s1", "now", SIZE)
        assert [(e["offset"], e["length"], e["kind"]) for e in now["extents"]] == [
            (0, 2 * 65536, "zero"),
            (12 * MiB, 8192, "data"),
        ]
    finally:
        h.shutdown()
        wait_closed(store_path, "vm")
    cli("clone", "snapshot", "vm", "s2", store=store_path)
    between = json.loads(cli("clone", "diff", "vm", "--from", "s1", "--to", "s2", "--json", store=store_path).stdout)
    chunks = {(e["offset"], e["length"], e["kind"]) for e in between["extents"]}
    assert chunks == {(0, 2 * 65536, "zero"), (12 * MiB, 65536, "data")}, chunks  # whole chunks, by content
    text = cli("clone", "diff", "vm", "--from", "s1", "--to", "s2", store=store_path).stdout
    assert "192.0 KiB in 2 extent(s) differ from snapshot s1 to snapshot s2" in text, text
    wrong = cli("clone", "diff", "vm", "--from", "nope", store=store_path, check=False)
    assert wrong.returncode != 0 and len(wrong.stderr.strip().splitlines()) == 1, wrong.stderr


def test_snapshots_json_gives_each_snapshot_s_own_and_shared_space(
    server: Server, store_path: Path, gold: bytes
) -> None:
    """A backup script keeps N snapshots by the space each holds alone: s1 wrote 3 chunks and s2 overwrote
    2 of them, so each holds 2 chunks alone (the third is in both); the rest of each is shared (with gold
    and the other); removing s1 frees what its `own` said."""
    chunk = 65536
    cli("clone", "create", "vm", "--base", "gold", store=store_path)
    model = bytearray(gold)
    a = os.urandom(3 * chunk)
    _write(server, store_path, "vm", model, [(10 * MiB, a)])
    cli("clone", "snapshot", "vm", "s1", store=store_path)
    _write(server, store_path, "vm", model, [(10 * MiB, os.urandom(2 * chunk))])
    cli("clone", "snapshot", "vm", "s2", store=store_path)
    rows = {
        r["name"]: r
        for r in json.loads(cli("clone", "snapshots", "vm", "--json", store=store_path).stdout)["snapshots"]
    }
    assert rows["s1"]["own"] == 2 * chunk and rows["s2"]["own"] == 2 * chunk, rows  # (a's third chunk: in both)
    assert rows["s1"]["shared"] > 0 and rows["s2"]["shared"] == rows["s1"]["shared"], rows
    removed = json.loads(cli("clone", "snapshot", "rm", "vm", "s1", "--json", store=store_path).stdout)
    assert removed["results"][0]["freed"] == rows["s1"]["own"], removed
