"""nbdclone installs like a package: a wheel built from this checkout, installed into a fresh virtualenv
outside it, runs the demo from another folder (the nbdkit plugin and the systemd units travel in the wheel)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import zipfile
from pathlib import Path

from tests.helpers import ROOT


def test_the_wheel_installs_and_runs_the_demo_from_another_folder(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    build = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "python"), "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(ROOT)],
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
