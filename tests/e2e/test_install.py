"""nbdclone installs like a package: a wheel built from this checkout, installed into a fresh virtualenv
outside it, runs the demo from another folder (the nbdkit plugin and the systemd units travel in the wheel),
and its units run that installation as their own unprivileged user."""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest

from tests.helpers import ROOT, make_image

MiB = 1 << 20


@pytest.fixture(scope="module")
def venv() -> Iterator[Path]:
    """The wheel installed in a fresh virtualenv in a folder every user can search (the service's user
    runs it), outside the checkout; removed at the end."""
    work = Path(tempfile.mkdtemp(prefix="nbdclone-install-", dir="/var/tmp"))
    work.chmod(0o755)
    tmp_path = work
    try:
        dist = tmp_path / "dist"
        build = subprocess.run(
            [
                str(ROOT / ".venv" / "bin" / "python"),
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "-q",
                "-w",
                str(dist),
                str(ROOT),
            ],
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        assert build.returncode == 0, build.stderr
        (wheel,) = dist.glob("nbdclone-*.whl")
        names = set(zipfile.ZipFile(wheel).namelist())
        assert {"nbdclone/worker/nbdkit_plugin.py", "nbdclone/data/systemd/nbdclone.service"} <= names

        venv = tmp_path / "venv"
        subprocess.run(["/usr/bin/python3.11", "-m", "venv", "--system-site-packages", str(venv)], check=True)
        install = subprocess.run(
            [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)],
            capture_output=True,
            text=True,
        )
        assert install.returncode == 0, install.stderr
        yield venv
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_the_wheel_installs_and_runs_the_demo_from_another_folder(tmp_path: Path, venv: Path) -> None:
    nbdclone = str(venv / "bin" / "nbdclone")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}

    version = subprocess.run([nbdclone, "--version"], capture_output=True, text=True, cwd=elsewhere, env=env)
    assert version.returncode == 0 and version.stdout.startswith("nbdclone ")

    store = tmp_path / "store"
    demo = subprocess.Popen(
        [nbdclone, "--store", str(store), "demo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=elsewhere,
        env=env,
    )
    try:
        assert demo.stdout is not None
        seen = []
        for line in demo.stdout:
            seen.append(line)
            if "Press Ctrl-C" in line:
                break
        else:
            raise AssertionError("demo exited:\n" + "".join(seen))
        uri = subprocess.run(
            [nbdclone, "--store", str(store), "uri", "demo-1"], capture_output=True, text=True, cwd=elsewhere, env=env
        ).stdout.strip()
        info = subprocess.run(["nbdinfo", "--json", uri], capture_output=True, text=True, check=True)
        assert json.loads(info.stdout)["exports"][0]["export-size"] == 64 << 20
        listed = subprocess.run(
            [nbdclone, "--store", str(store), "clone", "list", "--json"],
            capture_output=True,
            text=True,
            cwd=elsewhere,
            env=env,
            check=True,
        )
        assert {c["name"] for c in json.loads(listed.stdout)["clones"]} == {"demo-1", "demo-2"}
        # The worker runs the plugin installed in the wheel, not this checkout's.
        workers = json.loads((store / "run" / "server.json").read_text())["workers"]
        cmdline = Path(f"/proc/{workers[0]['pid']}/cmdline").read_bytes().decode().split("\0")
        assert any(arg.startswith(str(venv)) and arg.endswith("nbdkit_plugin.py") for arg in cmdline), cmdline
    finally:
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(60) == 0


def _as(user: str, group: str) -> list[str]:
    return ["setpriv", f"--reuid={user}", f"--regid={group}", "--clear-groups", "--"]


def test_the_units_serve_the_installed_nbdclone_as_its_own_user(venv: Path) -> None:
    """What systemd does with the generated files, by its own tools: systemd-tmpfiles makes the store for
    the service's user, systemd-socket-activate binds the 16 sockets and starts ExecStart (as that user,
    by setpriv); a qcow2 imported by that user is served from the installed venv."""
    work = Path(tempfile.mkdtemp(prefix="nbdclone-units-", dir="/var/tmp"))
    work.chmod(0o755)
    user, group = "nobody", "nogroup"
    nbdclone = str(venv / "bin" / "nbdclone")
    store, etc = work / "store", work / "etc"
    proc = None
    try:
        subprocess.run(
            [nbdclone, "systemd-units", "--dest", str(work / "units"), "--etc", str(etc), "--store", str(store),
             "--user", user, "--group", group],
            check=True, capture_output=True,
        )  # fmt: skip
        service = (work / "units" / "nbdclone.service").read_text()
        exec_start = re.search(r"^ExecStart=(.*)$", service, re.MULTILINE)
        assert exec_start, service
        command = exec_start.group(1).split()
        assert command[0] == nbdclone  # the installed one, not this checkout's
        subprocess.run(["systemd-tmpfiles", "--create", str(etc / "tmpfiles.d" / "nbdclone.conf")], check=True)
        made = os.stat(store)
        assert (made.st_uid, made.st_gid) == (pwd.getpwnam(user).pw_uid, grp.getgrnam(group).gr_gid)
        assert stat.S_IMODE(made.st_mode) == 0o710

        raw = work / "disk.raw"
        content = make_image(raw, 32 * MiB, [(0, 3 * MiB), (20 * MiB, 2 * MiB)], seed=7)
        image = work / "disk.qcow2"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(image)], check=True)
        image.chmod(0o644)
        for args in (["base", "import", "gold", str(image)], ["clone", "create", "vm", "--base", "gold"]):
            done = subprocess.run(
                [*_as(user, group), nbdclone, *args, "--store", str(store)], capture_output=True, text=True, cwd=work
            )
            assert done.returncode == 0, done.stderr

        listen = [f"--listen={store}/run/nbdclone.sock" + (f".{k}" if k else "") for k in range(16)]
        with open(work / "serve.log", "wb") as log:
            proc = subprocess.Popen(
                ["systemd-socket-activate", *listen, *_as(user, group), *command], stdout=log, stderr=log, cwd=work
            )
        uri = subprocess.run(
            [nbdclone, "uri", "vm", "--store", str(store)], capture_output=True, text=True, check=True
        ).stdout.strip()
        h = nbd.NBD()
        for _ in range(300):  # systemd-socket-activate binds, then starts serve at the first connection
            try:
                h.connect_uri(uri)
                break
            except nbd.Error:
                assert proc.poll() is None, (work / "serve.log").read_text()
                h = nbd.NBD()
                time.sleep(0.05)
        assert h.pread(4 * MiB, 0) == content[: 4 * MiB]
        assert h.pread(MiB, 20 * MiB) == content[20 * MiB : 21 * MiB]
        h.pwrite(b"\x07" * 4096, 0)
        h.flush()
        h.shutdown()
        uid = pwd.getpwnam(user).pw_uid
        root_owned = [p for p in store.rglob("*") if p.lstat().st_uid != uid and not p.is_socket()]
        assert not root_owned, root_owned  # the service's user can change everything it serves
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0, (work / "serve.log").read_text()
        shutil.rmtree(work, ignore_errors=True)


def test_a_virtualenv_without_libnbd_says_what_to_install(venv: Path, tmp_path: Path) -> None:
    """libnbd's bindings are a system package (python3-libnbd); a venv made without
    --system-site-packages imports a qcow2 with a one-line error naming it, not a traceback."""
    bare = tmp_path / "bare"
    subprocess.run(["/usr/bin/python3.11", "-m", "venv", "--without-pip", str(bare)], check=True)
    (site,) = (venv / "lib").glob("python3*/site-packages")
    (bare_site,) = (bare / "lib").glob("python3*/site-packages")
    (bare_site / "installed.pth").write_text(f"{site}\n")  # nbdclone and its PyPI deps, not /usr/lib/python3
    image = tmp_path / "i.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "4M"], check=True)
    proc = subprocess.run(
        [str(bare / "bin" / "python"), "-c", "from nbdclone.cli import main; main()", "base", "import", "i", str(image),
         "--store", str(tmp_path / "store")],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "apt install python3-libnbd" in proc.stderr
