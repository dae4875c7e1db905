"""Guests under this machine's libvirt (Debian 12: libvirt 9.0, QEMU 7.2 without KVM), booted from a clone
over a Unix socket as libvirt-qemu, with what `nbdclone domxml` prints. The lab (libvirtd, virtlogd, the
guest's kernel and root file system) is started by the project's scripts/libvirt-lab.

The guest appends numbered 4 KiB records to a file on its root and fsyncs each before it says "acked N" on
its serial console; the host plays the operator's events under it, then pulls the plug (virsh destroy) and
reads the file back from the clone: every acknowledged record is there, and the guest's kernel reported no
I/O error."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbdclone import libvirt
from tests.helpers import ROOT, Server, cli, wait_gone

VIRSH = ["virsh", "-q", "-c", "qemu:///system"]
GUEST_ERRORS = re.compile(
    r"I/O error|EXT4-fs error|Aborting journal|Remounting filesystem read-only|Kernel panic|lab-initramfs"
)
RECORD = 4096


@pytest.fixture(scope="module")
def lab() -> Iterator[dict[str, str]]:
    """libvirt's system instance and the guest's files, in a folder QEMU's user can read."""
    where = Path(tempfile.mkdtemp(prefix="nbc-lab-", dir="/var/tmp"))
    where.chmod(0o755)
    script = str(ROOT / "scripts" / "libvirt-lab")
    up = subprocess.run([script, "up", str(where)], capture_output=True, text=True, check=False)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield {**dict(line.split("=", 1) for line in up.stdout.split()), "dir": str(where)}
    finally:
        subprocess.run([script, "down", str(where)], check=True)
        shutil.rmtree(where)


class Guest:
    """A domain booted from a clone (`attach`: the XML `nbdclone domxml` printed) that writes until destroyed."""

    def __init__(self, lab: dict[str, str], name: str, attach: str) -> None:
        self.name = f"nbdclone-test-{name}"
        self.console = Path(lab["dir"]) / f"{name}.console"
        inside_disk = "" if attach.startswith("<qemu:") else attach
        outside = attach if attach.startswith("<qemu:") else ""
        self.xml = Path(lab["dir"]) / f"{name}.xml"
        self.xml.write_text(f"""<domain type='qemu'>
  <name>{self.name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{lab["LAB_KERNEL"]}</kernel>
    <initrd>{lab["LAB_INITRD"]}</initrd>
    <cmdline>console=ttyS0 root=/dev/vda nbdclone.run=writes panic=-1</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
  <devices>
    {inside_disk}
    <serial type='file'><source path='{self.console}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
  {outside}
</domain>
""")

    def define(self, *, validate: bool = True) -> subprocess.CompletedProcess[str]:
        flags = ["--validate"] if validate else []
        return subprocess.run([*VIRSH, "define", *flags, str(self.xml)], capture_output=True, text=True, check=False)

    def start(self) -> None:
        defined = self.define()
        assert defined.returncode == 0, defined.stderr
        subprocess.run([*VIRSH, "start", self.name], check=True, capture_output=True)

    def qemu_user(self) -> str:
        pid = int(Path(f"/run/libvirt/qemu/{self.name}.pid").read_text())
        return pwd.getpwuid(os.stat(f"/proc/{pid}").st_uid).pw_name

    def acked(self) -> int:
        """The last record the guest said was durable (-1: none yet); fails at the first error it logged."""
        text = self.console.read_text(errors="replace") if self.console.exists() else ""
        assert not GUEST_ERRORS.search(text), "the guest saw an error:\n" + text[-3000:]
        found = re.findall(r"^acked (\d+)", text, re.M)
        return int(found[-1]) if found else -1

    def wait_progress(self, n: int = 20, timeout: float = 90) -> None:
        target, deadline = self.acked() + n, time.monotonic() + timeout
        while self.acked() < target:
            assert time.monotonic() < deadline, f"the guest made no progress:\n{self.console.read_text()[-3000:]}"
            time.sleep(0.1)

    def pull_the_plug(self) -> None:
        subprocess.run([*VIRSH, "destroy", self.name], capture_output=True, check=False)
        subprocess.run([*VIRSH, "undefine", self.name], capture_output=True, check=False)


def _records(uri: str, where: Path) -> list[bytes]:
    """The guest's /data/log as a list of records, read from the clone after its journal is replayed."""
    image = where / "root.raw"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(image)], check=True)
    subprocess.run(["e2fsck", "-y", "-E", "journal_only", str(image)], capture_output=True, check=False)
    fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    log = where / "log"
    subprocess.run(["debugfs", "-R", f"dump /data/log {log}", str(image)], capture_output=True, check=True)
    data = log.read_bytes()
    return [data[i : i + RECORD] for i in range(0, len(data), RECORD)]


def _check_every_ack(guest: Guest, uri: str, where: Path) -> int:
    last = guest.acked()
    guest.pull_the_plug()
    records = _records(uri, where)
    assert len(records) > last, f"{len(records)} records on disk, {last + 1} acknowledged"
    filler = b"x" * (RECORD - 7) + b"\n"
    for i in range(last + 1):
        assert records[i] == b"r%05d" % i + filler, f"record {i} of {last + 1} acknowledged"
    return last


def _serve(store: Path, sock: Path) -> Server:
    return Server(store, sock, ("--socket", str(sock), "--socket-group", "libvirt-qemu", "--workers", "2")).start()


def _domxml(store: Path, name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return cli("domxml", name, *args, store=store)


@pytest.fixture
def clones(lab: dict[str, str], store_path: Path) -> Path:
    cli("base", "import", "guest", lab["LAB_ROOT"], store=store_path)
    cli("clone", "create", "vm", "--base", "guest", store=store_path)
    sock_dir = Path(tempfile.mkdtemp(prefix="s-", dir=lab["dir"]))
    sock_dir.chmod(0o755)
    return sock_dir / "nbd.sock"


def test_domxml_prints_what_this_libvirt_validates(lab: dict[str, str], store_path: Path, clones: Path) -> None:
    """Each form `domxml` prints passes libvirt's own `define --validate`, and its reading of the installed
    schema agrees with libvirt: a <reconnect> in a <disk> validates exactly where it says libvirt takes it."""
    takes = libvirt.takes_reconnect_delay()
    assert takes is not None  # a libvirt is installed: the lab put it there
    sock = ("--socket", str(clones))
    auto = _domxml(store_path, "vm", *sock)
    forced = _domxml(store_path, "vm", *sock, "--form", "disk")
    passthrough = _domxml(store_path, "vm", *sock, "--form", "qemu-commandline")
    assert ("<reconnect" in auto.stdout) == takes
    assert ("has no <reconnect>" in auto.stderr) == (not takes)
    assert '<reconnect delay="30"' in forced.stdout and "reconnect-delay" in passthrough.stdout
    for form, printed, valid in (("auto", auto, True), ("disk", forced, takes), ("cmd", passthrough, True)):
        guest = Guest(lab, f"validate-{form}", printed.stdout)
        try:
            defined = guest.define()
            assert (defined.returncode == 0) == valid, (form, defined.stderr)
        finally:
            guest.pull_the_plug()


@pytest.mark.parametrize("form", ["auto", "qemu-commandline"])
def test_a_guest_rides_through_supervisor_kills_and_with_reconnect_reloads_and_worker_kills(
    lab: dict[str, str], tmp_path: Path, store_path: Path, clones: Path, form: str
) -> None:
    """A guest booted from a clone: kill -9 of `nbdclone serve` and `serve` again, ten times, is never seen,
    whatever the form (the workers serve on and are adopted: the same processes throughout, none left at
    the end). With reconnect (the qemu-commandline form on libvirt 9.0, <disk> on later libvirt), reloads
    and a worker's kill -9 are not seen either. Then the plug is pulled: every acknowledged record is there."""
    attach = _domxml(store_path, "vm", "--socket", str(clones), "--form", form).stdout
    reconnects = "reconnect" in attach
    server = _serve(store_path, clones)
    workers = sorted(w["pid"] for w in server.info()["workers"])
    guest = Guest(lab, form, attach)
    try:
        guest.start()
        guest.wait_progress()
        assert guest.qemu_user() == "libvirt-qemu"
        for _ in range(10):
            assert server.proc is not None
            server.proc.kill()
            server.proc.wait()
            guest.wait_progress()  # no supervisor: the workers serve on
            server = _serve(store_path, clones)
            assert sorted(w["pid"] for w in server.info()["workers"]) == workers
            guest.wait_progress()
        if reconnects:
            for _ in range(2):
                before = server.nbdkit_pid("vm")
                cli("reload", store=store_path)
                server.wait_restarted("vm", before)
                guest.wait_progress()
            worker = server.nbdkit_pid("vm")
            os.kill(worker, signal.SIGKILL)
            server.wait_restarted("vm", worker)
            guest.wait_progress()
        acked = _check_every_ack(guest, cli("uri", "vm", store=store_path).stdout.strip(), tmp_path)
        assert acked > 200
    finally:
        guest.pull_the_plug()
        workers = [w["pid"] for w in server.info()["workers"]]
        assert server.stop() == 0
    wait_gone(workers, kill=False)
