"""Import from anywhere and export, in one pass: a qcow2 file, an NBD export (nbdkit memory, another
nbdclone clone), an HTTP URL; qcow2 export. Each run is watched: no file of the image's size may appear
in the store's work folder or the system's temp folder while it runs."""

from __future__ import annotations

import http.server
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import NBDCLONE, Server, cli, large_files, make_image, pread_all, wait_closed

MiB = 1 << 20
SIZE = 96 * MiB
DATA = [(0, 5 * MiB), (40 * MiB + 4096, 3 * MiB), (SIZE - 70_000, 70_000)]


def _watched(args: list[str], store: Path, size: int) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run `nbdclone ARGS` while sampling the store's tmp/ and the temp folder every few ms; fail if a
    file of a quarter of `size` or more (apparent or allocated) shows up. Returns the run and the samples."""
    folders = [store / "tmp", Path(tempfile.gettempdir()), Path("/var/tmp")]
    proc = subprocess.Popen(
        [NBDCLONE, *args, "--store", str(store)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    samples, seen = 0, []
    while proc.poll() is None:
        for folder in folders:
            seen += large_files(folder, size // 4)
        samples += 1
        time.sleep(0.005)
    out, err = proc.communicate()
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert proc.returncode == 0, err
    assert not seen, f"temporary files of the image's size: {seen}"
    return result, samples


def _read_clone(store: Path, tmp: Path, base: str, size: int) -> bytes:
    cli("clone", "create", f"of-{base}", "--base", base, store=store)
    srv = Server(store, tmp / "check.sock").start()
    try:
        h = srv.connect(f"of-{base}")
        data = pread_all(h, size)
        h.shutdown()
    finally:
        srv.stop()
    return data


@pytest.fixture
def image(tmp_path: Path) -> bytes:
    return make_image(tmp_path / "src.raw", SIZE, DATA)


def test_qcow2_import_streams_through_qemu_nbd(tmp_path: Path, store_path: Path, image: bytes) -> None:
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(tmp_path / "src.raw"), str(tmp_path / "src.qcow2")],
        check=True,
    )
    (tmp_path / "src.raw").unlink()
    run, samples = _watched(["base", "import", "q", str(tmp_path / "src.qcow2")], store_path, SIZE)
    assert run.stdout.splitlines()[-1] == "1" and samples > 3
    assert _read_clone(store_path, tmp_path, "q", SIZE) == image
    assert os.stat(store_path / "chunks" / "pack").st_blocks * 512 <= 9 * MiB  # holes were not stored


@pytest.fixture
def memory_export(tmp_path: Path, image: bytes) -> Iterator[Path]:
    """nbdkit's memory plugin holding the image (written into it over NBD), on a Unix socket."""
    sock = tmp_path / "mem.sock"
    proc = subprocess.Popen(["nbdkit", "--foreground", "--exit-with-parent", "-U", str(sock), "memory", f"size={SIZE}"])
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "nbdkit did not start"
            time.sleep(0.02)
        subprocess.run(["nbdcopy", str(tmp_path / "src.raw"), f"nbd+unix:///?socket={sock}"], check=True)
        yield sock
    finally:
        proc.terminate()
        proc.wait(30)


def test_import_from_nbdkit_memory(tmp_path: Path, store_path: Path, image: bytes, memory_export: Path) -> None:
    (tmp_path / "src.raw").unlink()
    _, samples = _watched(["base", "import", "m", f"nbd+unix:///?socket={memory_export}"], store_path, SIZE)
    assert samples > 0
    assert _read_clone(store_path, tmp_path, "m", SIZE) == image


def test_import_from_another_nbdclone_clone(tmp_path: Path, store_path: Path, image: bytes) -> None:
    """A clone served by one nbdclone store becomes a base of another store, streamed over NBD."""
    first = tmp_path / "first"
    cli("base", "import", "gold", str(tmp_path / "src.raw"), store=first)
    cli("clone", "create", "vm", "--base", "gold", store=first)
    srv = Server(first, tmp_path / "first.sock").start()
    try:
        h = srv.connect("vm")
        h.pwrite(b"changed in the clone" * 1000, 20 * MiB)
        h.flush()
        h.shutdown()
        wait_closed(first, "vm")
        _watched(["base", "import", "copy", srv.uri("vm")], store_path, SIZE)
    finally:
        srv.stop()
    expected = bytearray(image)
    expected[20 * MiB : 20 * MiB + 20_000] = b"changed in the clone" * 1000
    assert _read_clone(store_path, tmp_path, "copy", SIZE) == expected


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """A static file server that answers Range requests (http.server does not), as nbdkit's curl needs."""

    def log_message(self, *args: object) -> None:
        pass

    def send_head(self):  # type: ignore[no-untyped-def]
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return None
        size = path.stat().st_size
        spec = self.headers.get("Range", "")
        start, end = 0, size - 1
        if spec.startswith("bytes="):
            lo, _, hi = spec[6:].partition("-")
            start, end = int(lo), min(int(hi) if hi else size - 1, size - 1)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        else:
            self.send_response(200)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        f = open(path, "rb")
        f.seek(start)
        self._left = end - start + 1
        return f

    def copyfile(self, source, outputfile) -> None:  # type: ignore[no-untyped-def]
        left = self._left
        while left > 0 and (block := source.read(min(left, 1 << 20))):
            outputfile.write(block)
            left -= len(block)


def test_import_from_an_http_url(tmp_path: Path, store_path: Path, image: bytes) -> None:
    root = tmp_path / "www"
    root.mkdir()
    (tmp_path / "src.raw").rename(root / "disk.raw")
    handler = lambda *a: _RangeHandler(*a, directory=str(root))  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/disk.raw"
        run, _ = _watched(["base", "import", "web", url], store_path, SIZE)
        missing = cli("base", "import", "web", url + ".nope", store=store_path, check=False)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert "web@1" in run.stdout
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and "cannot read" in missing.stderr
    assert _read_clone(store_path, tmp_path, "web", SIZE) == image


def test_qcow2_export_streams_through_qemu_nbd(tmp_path: Path, store_path: Path, image: bytes) -> None:
    cli("base", "import", "gold", str(tmp_path / "src.raw"), store=store_path)
    cli("clone", "create", "vm", "--base", "gold", store=store_path)
    out = tmp_path / "out"
    out.mkdir()
    _watched(["clone", "export", "vm", str(out / "vm.qcow2"), "--format", "qcow2"], store_path, SIZE)
    assert [p.name for p in out.iterdir()] == ["vm.qcow2"]
    same = subprocess.run(
        ["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(out / "vm.qcow2"), str(tmp_path / "src.raw")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert same.returncode == 0, same.stdout + same.stderr
    assert os.stat(out / "vm.qcow2").st_blocks * 512 <= 10 * MiB  # sparse: only the data was written


def test_import_from_a_block_device(tmp_path: Path, store_path: Path, image: bytes) -> None:
    """A loop device over the image: its size comes from the device (st_size is 0), all of it is read,
    and its zero chunks are still not stored."""
    loop = subprocess.run(
        ["losetup", "--find", "--show", "--read-only", str(tmp_path / "src.raw")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    try:
        run, _ = _watched(["base", "import", "dev", loop], store_path, SIZE)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)
    assert "dev@1: 96.0 MiB" in run.stdout
    assert os.stat(store_path / "chunks" / "pack").st_blocks * 512 <= 9 * MiB
    assert _read_clone(store_path, tmp_path, "dev", SIZE) == image
