"""Moving whole disks in and out of the store: base import (raw or qcow2) and clone export.

Both keep holes: zero ranges are never written, so a sparse source gives a sparse base and a sparse clone
gives a sparse export. qemu-img does the qcow2 work; raw data is copied here, extent by extent.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from nbdclone import errors
from nbdclone.store._rocks import RocksOverlay
from nbdclone.store.base import Base, BaseImage, ZeroBase
from nbdclone.store.catalog import BaseRecord, Store, fsync_dir, validate_name
from nbdclone.store.clone import EXTENT_DATA, Clone

Progress = Callable[[int, int], None]
COPY_CHUNK = 1 << 20
_ZERO_CHUNK = bytes(COPY_CHUNK)
_QEMU_PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


def _noop(done: int, total: int) -> None:
    pass


def probe(source: Path) -> str:
    """The format of `source` ("raw" or "qcow2"), or a NotADiskImage/SourceNotFound error."""
    if not source.exists():
        raise errors.SourceNotFound(path=source)
    if not source.is_file() and not source.is_block_device():
        raise errors.NotADiskImage(path=source, reason="not a regular file or block device")
    proc = subprocess.run(
        ["qemu-img", "info", "--output=json", str(source)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["qemu-img cannot read it"])[-1]
        raise errors.NotADiskImage(path=source, reason=reason)
    info = json.loads(proc.stdout)
    fmt = info.get("format")
    if fmt == "qcow2":
        return "qcow2"
    if fmt != "raw":
        raise errors.NotADiskImage(path=source, reason=f"format {fmt} is not supported (raw or qcow2)")
    size = source.stat().st_size if source.is_file() else int(info.get("virtual-size", 0))
    if size == 0 or size % 512:
        raise errors.NotADiskImage(
            path=source, reason=f"a raw image is a non-zero multiple of 512 bytes, this is {size} bytes"
        )
    return "raw"


def import_base(store: Store, name: str, source: Path, progress: Progress = _noop) -> BaseRecord:
    validate_name("base", name)
    if name in store.catalog().bases:
        raise errors.BaseExists(name=name, store=store.path)
    fmt = probe(source)
    tmp = store.new_tmp_file(".raw")
    try:
        if fmt == "raw":
            _copy_raw(source, tmp, progress)
        else:
            _qemu_convert(["-f", "qcow2", "-O", "raw", "-S", "4k"], source, tmp, progress)
        _fsync_file(tmp)
        return store.add_base(name, tmp, f"{source.absolute()} ({fmt})")
    finally:
        tmp.unlink(missing_ok=True)


def _copy_raw(source: Path, dest: Path, progress: Progress) -> None:
    """Copy a raw image, leaving holes where the source has holes or all-zero chunks."""
    src = BaseImage(source)
    try:
        buf = bytearray(COPY_CHUNK)
        view = memoryview(buf)
        with open(dest, "wb") as out:
            out.truncate(src.size)
            done = 0
            for ext in src.extents(0, src.size):
                if ext.zero:
                    done += ext.length
                    progress(done, src.size)
                    continue
                pos, end = ext.offset, ext.offset + ext.length
                while pos < end:
                    n = min(COPY_CHUNK, end - pos)
                    src.pread_into(view[:n], pos)
                    if view[:n] != _ZERO_CHUNK[:n]:
                        os.pwrite(out.fileno(), view[:n], pos)
                    pos += n
                    done += n
                    progress(done, src.size)
    finally:
        src.close()


def _qemu_convert(args: list[str], source: Path, dest: Path, progress: Progress) -> None:
    total = 100
    cmd = ["qemu-img", "convert", "-p", *args, str(source), str(dest)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    pending = b""
    while chunk := proc.stdout.read1(4096):  # type: ignore[attr-defined]
        pending += chunk
        for match in _QEMU_PROGRESS.finditer(pending):
            progress(int(float(match.group(1))), total)
        pending = pending[-32:]
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise errors.NbdcloneError(detail=f"qemu-img convert failed: {err.decode(errors='replace').strip()}")
    progress(total, total)


def open_clone_readonly(store: Store, name: str) -> Clone:
    record = store.get_clone(name)
    base: Base = (
        ZeroBase(record.size) if record.base is None else BaseImage(store.base_path(store.get_base(record.base)))
    )
    overlay = RocksOverlay(store.clone_path(record), readonly=True)
    return Clone(base, overlay, record.size)


def export_clone(
    store: Store, name: str, dest: Path, fmt: Literal["raw", "qcow2"] = "raw", progress: Progress = _noop
) -> None:
    """Write the clone as the guest sees it (base + overlay) to a new sparse file at `dest`."""
    if dest.exists():
        raise errors.InvalidArgument(detail=f"{dest} already exists; nbdclone does not overwrite files")
    if not dest.parent.is_dir():
        raise errors.InvalidArgument(detail=f"directory {dest.parent} does not exist")
    clone = open_clone_readonly(store, name)
    raw = dest if fmt == "raw" else dest.with_name(f".{dest.name}.raw.tmp")
    try:
        _write_raw(clone, raw, progress)
        if fmt == "qcow2":
            _qemu_convert(["-f", "raw", "-O", "qcow2"], raw, dest, lambda d, t: None)
        _fsync_file(dest)
        fsync_dir(dest.parent)
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    finally:
        clone.close()
        clone.base.close()
        if raw != dest:
            raw.unlink(missing_ok=True)


def _write_raw(clone: Clone, dest: Path, progress: Progress) -> None:
    buf = bytearray(COPY_CHUNK)
    view = memoryview(buf)
    with open(dest, "xb") as out:
        out.truncate(clone.size)
        pos = 0
        while pos < clone.size:
            for off, length, kind in clone.extents(min(clone.size - pos, 1 << 30), pos):
                if kind == EXTENT_DATA:
                    at, end = off, off + length
                    while at < end:
                        n = min(COPY_CHUNK, end - at)
                        clone.pread_into(view[:n], at)
                        if view[:n] != _ZERO_CHUNK[:n]:
                            os.pwrite(out.fileno(), view[:n], at)
                        at += n
                        progress(at, clone.size)
                pos = off + length
                progress(pos, clone.size)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
