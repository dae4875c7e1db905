"""The CLI: every mistake is one line naming the problem, a non-zero exit, and an unchanged store."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from unittest import mock

import pytest
from typer.testing import CliRunner

from nbdclone import cli as cli_module
from nbdclone.host import Host
from nbdclone.supervisor import server as supervisor_server
from tests.helpers import NBDCLONE, cli, make_image, snapshot

MiB = 1 << 20


@pytest.fixture
def store(tmp_path: Path) -> Path:
    store = tmp_path / "store"
    make_image(tmp_path / "b.raw", 4 * MiB, [(0, MiB)])
    cli("base", "import", "deb", str(tmp_path / "b.raw"), store=store)
    cli("clone", "create", "a", "--base", "deb", store=store)
    return store


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["base", "import", "x", "/nonexistent.img"], "does not exist", id="import-missing-file"),
        pytest.param(["base", "import", "x", "{tmp}/notes.txt"], "is not a disk image", id="import-not-an-image"),
        pytest.param(["base", "import", "x", "{tmp}"], "is not a disk image", id="import-a-directory"),
        pytest.param(["base", "import", "../x", "{tmp}/b.raw"], "invalid base name", id="import-bad-name"),
        pytest.param(["clone", "create", "b", "--base", "nope"], "no base named 'nope'", id="create-unknown-base"),
        pytest.param(["clone", "create", "a", "--base", "deb"], "already exists", id="create-existing-clone"),
        pytest.param(["clone", "create", "../x", "--base", "deb"], "invalid clone name", id="create-dotdot"),
        pytest.param(["clone", "create", "", "--base", "deb"], "invalid clone name", id="create-empty-name"),
        pytest.param(["clone", "create", "x" * 5000, "--base", "deb"], "invalid clone name", id="create-5000-bytes"),
        pytest.param(["clone", "create", "b"], "exactly one of --base", id="create-no-base-or-size"),
        pytest.param(["clone", "create", "b", "--size", "12Q"], "invalid size", id="create-bad-size"),
        pytest.param(["base", "rm", "deb"], "is used by clone(s) a", id="rm-base-in-use"),
        pytest.param(["base", "rm", "deb@1"], "it is the current version", id="rm-current-version"),
        pytest.param(["base", "rm", "deb@7"], "has no version '7'", id="rm-unknown-version"),
        pytest.param(["base", "rm", "deb@x"], "invalid version", id="rm-malformed-version"),
        pytest.param(["base", "promote", "deb", "9"], "has no version '9'", id="promote-unknown-version"),
        pytest.param(["base", "promote", "nope", "1"], "no base named", id="promote-unknown-base"),
        pytest.param(["clone", "create", "b", "--base", "deb@3"], "has no version '3'", id="create-unknown-version"),
        pytest.param(["clone", "create", "b", "b", "--base", "deb"], "given twice", id="create-same-name-twice"),
        pytest.param(["clone", "rm", "a", "nope"], "no clone named 'nope'", id="rm-several-one-unknown"),
        pytest.param(["clone", "reset", "a", "a"], "given twice", id="reset-same-name-twice"),
        pytest.param(["clone", "upgrade", "a", "--all-pending"], "--all-pending", id="upgrade-names-and-all"),
        pytest.param(["clone", "list", "--base", "nope"], "no base named", id="list-unknown-base"),
        pytest.param(["du", "--base", "nope"], "no base named", id="du-unknown-base"),
        pytest.param(["clone", "upgrade", "a", "--to", "5"], "has no version '5'", id="upgrade-unknown-version"),
        pytest.param(["clone", "upgrade", "nope"], "no clone named", id="upgrade-unknown-clone"),
        pytest.param(["base", "rm", "nope"], "no base named", id="rm-unknown-base"),
        pytest.param(["clone", "rm", "nope"], "no clone named", id="rm-unknown-clone"),
        pytest.param(["clone", "reset", "nope"], "no clone named", id="reset-unknown-clone"),
        pytest.param(["clone", "info", "nope"], "no clone named", id="info-unknown-clone"),
        pytest.param(["clone", "export", "a", "{tmp}/b.raw"], "already exists", id="export-over-a-file"),
        pytest.param(["clone", "export", "a", "{tmp}/x.img", "--format", "vmdk"], "--format", id="export-bad-format"),
        pytest.param(["uri", "nope"], "no clone named", id="uri-unknown-clone"),
        pytest.param(["domxml", "nope"], "no clone named", id="domxml-unknown-clone"),
        pytest.param(["domxml", "a", "--target", "v da"], "--target", id="domxml-bad-target"),
        pytest.param(
            ["domxml", "a", "--form", "qemu-commandline", "--reconnect-delay", "0"], "needs one", id="domxml-no-delay"
        ),
        pytest.param(["domxml", "a", "--form", "usb"], "--form", id="domxml-bad-form"),
        pytest.param(["stats"], "no nbdclone server is running", id="stats-without-server"),
        pytest.param(["serve", "--workers", "17"], "--workers", id="serve-too-many-workers"),
        pytest.param(["serve", "--socket-mode", "0777"], "--socket-mode", id="serve-bad-socket-mode"),
        pytest.param(["serve", "--socket-group", "no-such-group"], "no such group", id="serve-unknown-group"),
        pytest.param(["serve", "--tls-psk", "{tmp}/notes.txt"], "--tls", id="serve-psk-without-tls"),
        pytest.param(["serve", "--listen", "nonsense"], "HOST:PORT", id="serve-bad-listen"),
        pytest.param(
            ["serve", "--metrics", "9100", "--metrics-tls-cert", "{tmp}/notes.txt"], "go together", id="tls-cert-alone"
        ),
        pytest.param(
            ["serve", "--metrics", "9100", "--metrics-tls-cert", "{tmp}/notes.txt", "--metrics-tls-key", "{tmp}/b.raw"],
            "--metrics-tls-cert",
            id="metrics-tls-not-pem",
        ),
        pytest.param(["clone", "frobnicate"], "No such command", id="unknown-command"),
        pytest.param(["clone", "snapshot", "a"], "clone snapshot NAME SNAP", id="snapshot-no-name"),
        pytest.param(["clone", "snapshot", "a", "../s"], "invalid snapshot name", id="snapshot-bad-name"),
        pytest.param(["clone", "snapshot", "rm", "a", "s9"], "no snapshot named 's9'", id="snapshot-rm-unknown"),
        pytest.param(["clone", "rollback", "a", "s9"], "no snapshot named 's9'", id="rollback-unknown"),
        pytest.param(["clone", "snapshots", "nope"], "no clone named", id="snapshots-unknown-clone"),
        pytest.param(["clone", "create", "b", "--from", "a", "--base", "deb"], "exactly one of", id="from-and-base"),
        pytest.param(["clone", "create", "b", "--from", "nope"], "no clone named 'nope'", id="from-unknown-clone"),
        pytest.param(["clone", "create", "b", "--from", "a@s9"], "no snapshot named 's9'", id="from-unknown-snap"),
        pytest.param(["clone", "create", "a", "--from", "a"], "already exists", id="from-existing-name"),
        pytest.param(["clone", "resize", "a", "2M"], "--shrink", id="resize-shrink-unasked"),
        pytest.param(["clone", "resize", "a", "1X"], "invalid size", id="resize-bad-size"),
        pytest.param(["base", "promote", "~" + "0" * 32, "1"], "invalid base name", id="promote-private-name"),
        pytest.param(["clone", "flatten", "nope"], "no clone named", id="flatten-unknown-clone"),
    ],
)
def test_mistakes_are_one_line_and_change_nothing(tmp_path: Path, store: Path, args: list[str], message: str) -> None:
    (tmp_path / "notes.txt").write_text("not a disk\n" * 3)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    before = snapshot(store)
    proc = cli(*args, store=store, check=False)
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert message in proc.stderr
    assert proc.stdout == ""
    assert snapshot(store) == before


def test_lists_as_json(store: Path) -> None:
    """Every --json document is an object that names its format; lists are under one key."""
    for args in (["base", "list"], ["clone", "list"], ["clone", "info", "a"], ["clone", "snapshots", "a"], ["du"]):
        assert json.loads(cli(*args, "--json", store=store).stdout)["format"] == 1, args
    bases = json.loads(cli("base", "list", "--json", store=store).stdout)["versions"]
    assert [(b["base"], b["version"], b["size"], b["current"], b["clones"]) for b in bases] == [
        ("deb", "1", 4 * MiB, True, 1)
    ]
    assert bases[0]["stored"] == MiB  # the 3 MiB hole takes no space
    clones = json.loads(cli("clone", "list", "--json", store=store).stdout)["clones"]
    assert [(c["name"], c["base"], c["version"], c["follows"], c["open"]) for c in clones] == [
        ("a", "deb", "1", True, False)
    ]


def test_several_clones_per_command_filters_uris_and_du(tmp_path: Path, store: Path) -> None:
    make_image(tmp_path / "o.raw", 2 * MiB, [(0, MiB)], seed=3)
    cli("base", "import", "other", str(tmp_path / "o.raw"), store=store)
    cli("clone", "create", "b", "c", "--base", "deb", store=store)
    cli("clone", "create", "o1", "--base", "other", store=store)
    listed = json.loads(cli("clone", "list", "--json", "--base", "deb", store=store).stdout)["clones"]
    assert [c["name"] for c in listed] == ["a", "b", "c"]
    for c in listed:  # each row carries the clone's address, as `nbdclone uri` gives it
        assert c["uri"] == cli("uri", c["name"], store=store).stdout.strip()
    other = json.loads(cli("base", "list", "--json", "--base", "other", store=store).stdout)["versions"]
    assert [b["base"] for b in other] == ["other"]

    # Put on version 1 (as a first connection would), then a new version: every clone of deb waits to
    # move, and one command moves them all.
    assert cli("clone", "upgrade", "a", "b", "c", "--to", "1", store=store).stdout.count("-> 1") == 3
    make_image(tmp_path / "b2.raw", 4 * MiB, [(0, MiB)], seed=2)
    cli("base", "import", "deb", str(tmp_path / "b2.raw"), store=store)
    cli("base", "promote", "deb", "2", store=store)
    out = cli("clone", "upgrade", "--all-pending", store=store).stdout
    assert out.count("1 -> 2") == 3, out
    assert cli("clone", "upgrade", "--all-pending", store=store).stdout.strip() == "no clone is waiting to move"
    cli("clone", "reset", "a", "b", store=store)
    cli("clone", "rm", "b", "c", store=store)
    assert [c["name"] for c in json.loads(cli("clone", "list", "--json", store=store).stdout)["clones"]] == ["a", "o1"]

    du = json.loads(cli("du", "--json", store=store).stdout)
    assert du["format"] == 1
    assert {(v["base"], v["version"]) for v in du["versions"]} == {("deb", "1"), ("deb", "2"), ("other", "1")}
    assert {c["name"] for c in du["clones"]} == {"a", "o1"}
    totals = du["totals"]
    assert totals["chunks_disk_bytes"] >= 3 * MiB  # three versions with 1 MiB of data each, none shared
    assert totals["store_disk_bytes"] >= totals["chunks_disk_bytes"] + totals["overlays_disk_bytes"]
    assert [v["base"] for v in json.loads(cli("du", "--json", "--base", "other", store=store).stdout)["versions"]] == [
        "other"
    ]
    assert "store" in cli("du", store=store).stdout


def test_progress_is_shown_when_asked_and_on_a_terminal_only(tmp_path: Path, store: Path) -> None:
    make_image(tmp_path / "p.raw", 8 * MiB, [(0, 2 * MiB)], seed=4)
    forced = cli("--progress", "base", "import", "p1", str(tmp_path / "p.raw"), store=store)
    assert "importing p1" in forced.stderr and "8.4/8.4 MB" in forced.stderr, forced.stderr
    assert cli("base", "import", "p2", str(tmp_path / "p.raw"), store=store).stderr == ""  # not a terminal
    assert cli("--no-progress", "base", "import", "p3", str(tmp_path / "p.raw"), store=store).stderr == ""


def test_import_prints_the_version_id_last(tmp_path: Path, store: Path) -> None:
    make_image(tmp_path / "b2.raw", 4 * MiB, [(0, MiB)], seed=2)
    proc = cli("base", "import", "deb", str(tmp_path / "b2.raw"), store=store)
    assert proc.stdout.splitlines()[-1] == "2"
    assert "current is still 1" in proc.stdout


def test_lifecycle(tmp_path: Path, store: Path) -> None:
    cli("clone", "create", "blank", "--size", "8M", store=store)
    info = json.loads(cli("clone", "info", "blank", "--json", store=store).stdout)
    assert info["base"] is None and info["size"] == 8 * MiB
    cli("clone", "reset", "a", store=store)
    cli("clone", "rm", "a", store=store)
    cli("base", "rm", "deb", store=store)
    assert json.loads(cli("base", "list", "--json", store=store).stdout)["versions"] == []
    assert list((store / "bases").iterdir()) == []


def test_store_comes_from_the_environment(tmp_path: Path, store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    with mock.patch.object(cli_module._common, "open_host") as fake:
        fake.return_value.store.catalog.return_value.clones = {}
        result = runner.invoke(cli_module.app, ["clone", "list", "--json"], env={"NBDCLONE_STORE": str(store)})
    assert result.exit_code == 0, result.output
    fake.assert_called_once()
    assert fake.call_args.args == (store,)


def test_clone_create_passes_parsed_size_to_the_core(tmp_path: Path) -> None:
    runner = CliRunner()
    store = mock.Mock()
    store.create_clones.return_value = [mock.Mock(base=None, size=10 << 30)]
    with mock.patch.object(cli_module._common, "open_host", return_value=Host(store)):  # a single host
        args = ["clone", "create", "d", "e", "--size", "10G", "--store", str(tmp_path)]
        result = runner.invoke(cli_module.app, args)
    assert result.exit_code == 0, result.output
    store.create_clones.assert_called_once_with(["d", "e"], base=None, size=10 << 30, readonly=False)


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        pytest.param("127.0.0.1:10809", ("127.0.0.1", 10809), id="ipv4"),
        pytest.param("[::1]:10810", ("::1", 10810), id="ipv6"),
        pytest.param(":10811", ("127.0.0.1", 10811), id="port-only-is-loopback"),
    ],
)
def test_serve_passes_the_listen_address(tmp_path: Path, listen: str, expected: tuple[str, int]) -> None:
    runner = CliRunner()
    with mock.patch.object(supervisor_server, "run", return_value=0) as run:
        result = runner.invoke(cli_module.app, ["serve", "--listen", listen, "--store", str(tmp_path)])
    assert result.exit_code == 0, result.output
    cfg = run.call_args.args[0]
    assert cfg.address.listen == expected and cfg.store == tmp_path


def test_serve_passes_security_and_access_options(tmp_path: Path) -> None:
    psk = tmp_path / "keys.psk"
    psk.write_text("alice:00112233445566778899aabbccddeeff\n")
    (tmp_path / "store").mkdir()
    args = ["serve", "--store", str(tmp_path / "store"), "--tls", "require", "--tls-psk", str(psk)]
    args += ["--allow", "gid:7", "--allow", "uid:0"]
    args += ["--max-connections", "64", "--exclusive", "--read-only", "--socket-group", "0"]
    args += ["--max-client-connections", "8", "--handshake-timeout", "3"]
    args += ["--metrics", "127.0.0.1:9100", "--log-level", "debug", "--workers", "3", "--grace", "4"]
    with mock.patch.object(supervisor_server, "run", return_value=0) as run:
        result = CliRunner().invoke(cli_module.app, args)
    assert result.exit_code == 0, result.output
    cfg = run.call_args.args[0]
    sec = cfg.security
    assert (sec.tls, sec.tls_psk, sec.allow) == ("require", psk, ("gid:7", "uid:0"))
    assert (sec.max_connections, sec.exclusive, sec.readonly) == (64, True, True)
    assert (sec.max_client_connections, sec.handshake_timeout) == (8, 3.0)
    assert (cfg.access.mode, cfg.access.group) == (0o660, "0")
    assert (cfg.metrics, cfg.log_level, cfg.workers, cfg.grace) == (("127.0.0.1", 9100), "debug", 3, 4.0)
    opts, filters, params = sec.nbdkit_args()
    assert opts == ["--tls=require", f"--tls-psk={psk}"]
    assert filters == ["--filter=blocksize-policy", "--filter=ip", "--filter=limit"]
    assert params == ["blocksize-error-policy=error", "allow=gid:7,uid:0", "deny=all", "limit=64"]


@pytest.mark.parametrize(
    ("where", "rules", "message"),
    [
        ("--listen", ["10.0.0.1/8", "fd00::1", "127.0.0.2"], None),
        ("--listen", ["uid:0"], "uid: and gid: rules are for Unix sockets"),
        ("--socket", ["10.0.0.0/8"], "addresses are for TCP"),
        ("--listen", ["localhost"], "give an address or a network"),
        ("--listen", ["10.0.0.0/33"], "give an address or a network"),
    ],
)
def test_serve_checks_the_allow_rules(tmp_path: Path, where: str, rules: list[str], message: str | None) -> None:
    (tmp_path / "store").mkdir()
    args = ["serve", "--store", str(tmp_path / "store"), where, "127.0.0.1:10809" if where == "--listen" else "s"]
    for rule in rules:
        args += ["--allow", rule]
    with mock.patch.object(supervisor_server, "run", return_value=0) as run:
        result = CliRunner().invoke(cli_module.app, args)
    if message is None:
        assert result.exit_code == 0, result.output
        assert run.call_args.args[0].security.allow == ("10.0.0.0/8", "fd00::1/128", "127.0.0.2/32")
    else:
        assert result.exit_code != 0 and not run.called
        assert message in str(result.exception), result.exception


def test_version_and_a_store_given_before_the_command(tmp_path: Path, store: Path) -> None:
    version = subprocess.run([NBDCLONE, "--version"], capture_output=True, text=True, check=True).stdout
    assert version.startswith("nbdclone ") and version.split()[1][0].isdigit()
    before = subprocess.run(
        [NBDCLONE, "--store", str(store), "clone", "list", "--json"], capture_output=True, text=True, check=True
    )
    assert [c["name"] for c in json.loads(before.stdout)["clones"]] == ["a"]
    elsewhere = tmp_path / "other-store"  # an option after the command still wins
    after = subprocess.run(
        [NBDCLONE, "--store", str(store), "clone", "list", "--json", "--store", str(elsewhere)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(after.stdout) == {"format": 1, "clones": []}


def test_serve_refuses_a_store_that_does_not_exist(tmp_path: Path) -> None:
    typo = tmp_path / "stroe"
    proc = subprocess.run(
        [NBDCLONE, "serve", "--store", str(typo), "--socket", str(tmp_path / "s.sock")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1 and "does not exist" in proc.stderr
    assert not typo.exists()


def test_shell_completion_completes_commands() -> None:
    # typer finds the shell among the parent processes: run it from bash (pytest's own parent may be gone)
    script = subprocess.run(["bash", "-c", f"{NBDCLONE} --show-completion; exit $?"], capture_output=True, text=True)
    assert script.returncode == 0, script.stderr
    assert "_nbdclone_completion" in script.stdout and "complete " in script.stdout
    for words, cword, want in (("nbdclone ba", "1", "base"), ("nbdclone clone rese", "2", "reset")):
        env = {**os.environ, "COMP_WORDS": words, "COMP_CWORD": cword, "_NBDCLONE_COMPLETE": "complete_bash"}
        done = subprocess.run([NBDCLONE], capture_output=True, text=True, env=env, check=True)
        assert done.stdout.split() == [want], done.stdout


def _tree(root: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every entry under `root`: its mode and, for a file, its bytes."""
    tree = {".": (root.stat().st_mode, None)}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        tree[str(path.relative_to(root))] = (st.st_mode, path.read_bytes() if path.is_file() else None)
    return tree


@pytest.mark.parametrize(
    "args",
    [
        ["serve", "--socket", "SOCKET"],
        ["clone", "list"],
        ["check", "--repair"],
        ["base", "gc"],
        ["clone", "create", "c", "--size", "1M"],
        ["base", "import", "deb", "IMAGE"],
        ["clone", "rm", "c"],
    ],
)
def test_a_folder_that_is_not_a_store_is_refused_and_left_as_it_was(tmp_path: Path, args: list[str]) -> None:
    """A mistyped --store (/srv, a home folder) is refused in one line before anything in it changes: no
    mode, entry or byte (serve used to make every entry private and add the store's folders among them)."""
    folder = tmp_path / "srv"
    (folder / "shared").mkdir(parents=True)
    os.chmod(folder / "shared", 0o1777)
    (folder / "shared" / "notes").write_text("keep\n")
    script = folder / "run.sh"
    script.write_text("#!/bin/sh\n")
    os.chmod(script, 0o755)
    (folder / "index.html").write_text("<p>hi</p>\n")
    os.chmod(folder / "index.html", 0o644)
    make_image(tmp_path / "base.raw", 1 << 20, [(0, 1 << 20)])
    before = _tree(folder)
    where = {"SOCKET": str(tmp_path / "s.sock"), "IMAGE": str(tmp_path / "base.raw")}
    proc = cli(*[where.get(a, a) for a in args], store=folder, check=False, timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1 and "is not an nbdclone store" in proc.stderr, proc.stderr
    assert _tree(folder) == before
    assert not (tmp_path / "s.sock").exists()


def test_a_store_is_made_in_an_empty_folder_and_recognised_after(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    cli("clone", "create", "c", "--size", "1M", store=empty)
    assert (empty / "nbdclone-store").exists()
    assert "c" in cli("clone", "list", store=empty).stdout


@pytest.mark.parametrize(("host", "warned"), [("0.0.0.0", True), ("127.0.0.1", False)])
def test_metrics_off_loopback_are_called_out(
    tmp_path: Path, free_port: int, host: str, warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """The endpoint names every clone: served beyond loopback, the log says who can read it."""
    from nbdclone.runtime import RunDir
    from nbdclone.store import Store
    from nbdclone.supervisor.metrics import serve_metrics

    server = serve_metrics((host, free_port), Store(tmp_path), RunDir(tmp_path))
    server.shutdown()
    assert any("anyone who can reach it reads every clone's name" in r.message for r in caplog.records) == warned


def test_metrics_take_a_port_alone_on_loopback(tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    args = ["serve", "--store", str(tmp_path / "store"), "--metrics", "9100"]
    with mock.patch.object(supervisor_server, "run", return_value=0) as run:
        result = CliRunner().invoke(cli_module.app, args)
    assert result.exit_code == 0, result.output
    assert run.call_args.args[0].metrics == ("127.0.0.1", 9100)


def test_piped_tables_are_never_cut(tmp_path: Path) -> None:
    """A timer's log of `clone list` or `check` must keep whole names and paths (rich cut them at 80)."""
    name = "a-very-long-clone-name-for-the-operators-logs-to-show-in-full-ab"
    store = tmp_path / "store"
    cli("clone", "create", name, "--size", "1M", store=store)
    listed = cli("clone", "list", store=store).stdout  # (captured: not a terminal)
    row = next(line for line in listed.splitlines() if name in line)
    assert "…" not in row and re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", row), row


def _commands() -> list[tuple[str, object]]:
    import typer.main

    found: list[tuple[str, object]] = []

    def walk(command: object, path: str) -> None:
        subs = getattr(command, "commands", None)
        if subs:
            for name, sub in subs.items():
                walk(sub, f"{path} {name}".strip())
        else:
            found.append((path, command))

    walk(typer.main.get_command(cli_module.app), "")
    return found


def test_every_command_that_reports_takes_json() -> None:
    """Only the two that run until stopped (serve, demo) print no document."""
    lacking = [path for path, c in _commands() if not any(p.name == "as_json" for p in c.params)]  # type: ignore[attr-defined]
    assert sorted(lacking) == ["demo", "serve"]


def _doc(*args: str, store: Path, check: bool = True) -> dict[str, object]:
    proc = cli(*args, "--json", store=store, check=check)
    doc = json.loads(proc.stdout)  # one document, nothing else on standard output
    assert doc["format"] == 1, args
    return doc  # type: ignore[no-any-return]


def test_what_commands_did_comes_as_one_json_document(tmp_path: Path, store: Path) -> None:
    image = tmp_path / "v2.raw"
    make_image(image, 4 * MiB, [(0, 2 * MiB)], seed=5)
    assert _doc("base", "import", "deb", str(image), store=store)["results"] == [
        {"base": "deb", "version": "2", "size": 4 * MiB, "new_chunks": 32, "current": False}
    ]
    assert _doc("clone", "create", "b", "c", "--base", "deb@2", store=store)["results"] == [
        {"clone": "b", "base": "deb@2"},
        {"clone": "c", "base": "deb@2"},
    ]
    assert _doc("clone", "snapshot", "b", "s1", store=store)["results"] == [
        {"clone": "b", "snapshot": "s1", "new_chunks": 0}
    ]
    assert _doc("clone", "rollback", "b", "s1", store=store)["results"] == [{"clone": "b", "snapshot": "s1"}]
    assert _doc("clone", "resize", "c", "8M", store=store)["results"] == [
        {"clone": "c", "old_size": 4 * MiB, "size": 8 * MiB}
    ]
    promoted = _doc("base", "promote", "deb", "2", store=store)["results"]
    assert [(r["base"], r["old"], r["current"]) for r in promoted] == [("deb", "1", "2")]  # type: ignore[index, union-attr]
    (uri,) = _doc("uri", "a", store=store)["results"]  # type: ignore[misc]
    assert uri["clone"] == "a" and uri["uri"].startswith("nbd+unix:///a?socket=")
    # Part of a command failing: what was done is in the document, the error on standard error, exit 1.
    cli("clone", "create", "d", "--base", "deb@2", store=store)
    proc = cli("clone", "upgrade", "d", "a", "--to", "1", "--json", store=store, check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "follows deb" in proc.stderr, proc.stderr
    results = json.loads(proc.stdout)["results"]
    assert results[0] == {"clone": "d", "old": "2", "new": "1"} and results[1]["clone"] == "a"
    assert "follows deb" in results[1]["error"]
    assert _doc("clone", "rm", "b", "c", store=store)["results"] == [{"clone": "b"}, {"clone": "c"}]
    gc = _doc("base", "gc", store=store)["results"]
    assert gc[0]["freed"] >= 0 and isinstance(gc[0]["removed"], list)  # type: ignore[index]
    assert _doc("clone", "list", store=store)["clones"]  # the table commands keep their own documents


def test_clone_and_base_names_complete(tmp_path: Path, store: Path) -> None:
    cli("clone", "create", "web-1", "web-2", "--base", "deb", store=store)

    def complete(words: str) -> list[str]:
        env = {**os.environ, "COMP_WORDS": words, "COMP_CWORD": str(len(words.split()) - 1)}
        env.update(_NBDCLONE_COMPLETE="complete_bash", NBDCLONE_STORE=str(store))
        return subprocess.run([NBDCLONE], capture_output=True, text=True, env=env, check=True).stdout.split()

    assert complete("nbdclone clone info we") == ["web-1", "web-2"]
    assert complete("nbdclone clone rm a") == ["a"]
    assert complete("nbdclone base promote d") == ["deb"]
    assert complete("nbdclone base rm deb@") == ["deb@1"]
    assert complete(f"nbdclone clone info --store {tmp_path / 'nowhere'} we") == []
    assert not (tmp_path / "nowhere").exists()  # completing touches nothing


def test_man_pages_are_built_from_the_cli_and_render_cleanly(tmp_path: Path) -> None:
    subprocess.run([NBDCLONE, "man-pages", "--dest", str(tmp_path / "man1")], check=True, capture_output=True)
    pages = {p.name for p in (tmp_path / "man1").iterdir()}
    expected = {"nbdclone.1", "nbdclone-base.1", "nbdclone-clone.1", "nbdclone-fleet.1", "nbdclone-base-trace.1"}
    expected |= {"nbdclone-" + path.replace(" ", "-") + ".1" for path, _ in _commands()}
    assert pages == expected
    for name in ("nbdclone.1", "nbdclone-serve.1", "nbdclone-clone-create.1"):
        page = tmp_path / "man1" / name
        render = subprocess.run(
            ["groff", "-man", "-Tutf8", "-ww", str(page)], capture_output=True, text=True, check=False
        )
        assert render.returncode == 0 and not render.stderr, render.stderr
    serve = (tmp_path / "man1" / "nbdclone-serve.1").read_text()
    assert all(f"\\-\\-{o}" in serve for o in ("socket\\-group", "config", "handshake\\-timeout")), serve[:2000]
    assert "clone" in (tmp_path / "man1" / "nbdclone.1").read_text()


_RECONNECT = {  # the <reconnect> definition of libvirt's storagecommon.rng, before and after its NBD delay
    False: '<define name="reconnect"><element name="reconnect"><attribute name="enabled"/></element></define>',
    True: '<define name="reconnect"><element name="reconnect"><optional><attribute name="delay"/></optional>'
    "</element></define>",
}


@pytest.mark.parametrize("takes", [False, True, None])
def test_domxml_follows_the_installed_libvirt(tmp_path: Path, store: Path, takes: bool | None) -> None:
    """`domxml` prints <reconnect> where the installed schema takes it; on a libvirt without it, a plain
    <disk> and a note on standard error; with no libvirt, <reconnect> and a note. The qemu-commandline form
    and TCP/TLS addresses are printed as QEMU and libvirt spell them."""
    schema = tmp_path / "storagecommon.rng"
    if takes is not None:
        schema.write_text(f"<grammar>{_RECONNECT[takes]}</grammar>")
    runner = CliRunner()
    with mock.patch.object(cli_module.serving.libvirt, "SCHEMA", schema):
        printed = runner.invoke(cli_module.app, ["domxml", "a", "--store", str(store)])
        tcp = runner.invoke(cli_module.app, ["domxml", "a", "--store", str(store), "--listen", "10.0.0.5:10809"])
        cmdline = runner.invoke(cli_module.app, ["domxml", "a", "--store", str(store), "--form", "qemu-commandline"])
    assert printed.exit_code == 0, printed.output
    assert ('<reconnect delay="30" />' in printed.stdout) == (takes is not False)
    assert ("note:" in printed.stderr) == (takes is not True)
    assert '<source protocol="nbd" name="a">' in printed.stdout and "nbdclone.sock" in printed.stdout
    assert '<host name="10.0.0.5" port="10809" />' in tcp.stdout
    blockdev = json.loads(re.findall(r"value='([^']*)'", cmdline.stdout)[0])
    assert blockdev["export"] == "a" and blockdev["reconnect-delay"] == 30
    assert blockdev["server"]["path"].startswith(str(store))
