"""Moving whole disks in and out of the store: base import (raw or qcow2) and clone export.

Both keep holes: an import never reads a source hole and stores no all-zero chunk; an export writes only
data extents, so a sparse clone gives a sparse file. qemu-img does the qcow2 work.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

from nbdclone import errors
from nbdclone.store._fs import fsync_dir
from nbdclone.store._rocks import RocksOverlay
from nbdclone.store.base import Base, BaseImage, ZeroBase
from nbdclone.store.cache import PackReader
from nbdclone.store.catalog import BaseRecord, Store, validate_name
from nbdclone.store.chunks import CHUNK, ChunkedBase, load_trace
from nbdclone.store.clone import EXTENT_DATA, Clone
from nbdclone.store.overlay import MemoryOverlay, Overlay

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


def import_base(store: Store, name: str, source: Path, progress: Progress = _noop) -> tuple[BaseRecord, str]:
    """Add `source` as a new version of base `name` (creating the base). Returns the base and version id."""
    validate_name("base", name)
    fmt = probe(source)
    tmp: Path | None = None
    try:
        raw = source
        if fmt == "qcow2":
            tmp = raw = store.new_tmp_file(".raw")
            _qemu_convert(["-f", "qcow2", "-O", "raw", "-S", "4k"], source, tmp, lambda d, t: None)
        image = BaseImage(raw)
        try:
            with store.chunks.writer():
                vmap, new_chunks = store.chunks.import_chunks(
                    _read_chunks(image),
                    image.size,
                    store.all_version_maps(digests=True),
                    lambda i: progress(min((i + 1) * CHUNK, image.size), image.size),
                )
                progress(image.size, image.size)
                return store.add_version(name, vmap, f"{source.absolute()} ({fmt})", new_chunks)
        finally:
            image.close()
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def _read_chunks(image: BaseImage) -> Iterator[tuple[int, bytes | None]]:
    """The chunks of `image` that hold data, in order: a chunk wholly in a hole is never read or listed, so
    a sparse terabyte imports in the time its data takes."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    done = 0  # chunks below this one were yielded
    for start, end in image.data_ranges():
        for i in range(max(done, start // CHUNK), -(-end // CHUNK)):
            at = i * CHUNK
            n = min(CHUNK, image.size - at)
            image.pread_into(view[:n], at)
            yield i, bytes(view[:n])
            done = i + 1


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
    """The clone as it reads now (its overlay on its version), without taking its overlay's lock."""
    record = store.get_clone(name)
    state = store.clone_state(record)
    version = state.version if state is not None else store.target_version(record)
    base: Base
    if record.base is None or version is None:
        base = ZeroBase(record.size)
    else:
        base = ChunkedBase(store.chunks.pack, store.version_map(store.get_base(record.base), version))
    overlay: Overlay = (
        MemoryOverlay() if state is None else RocksOverlay(store.overlay_path(record, state), readonly=True)
    )
    return Clone(base, overlay, base.size)


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


def warm_version(store: Store, ref: str) -> tuple[str, int]:
    """Read a version's boot trace into the shared cache now (and wait for it). Returns (NAME@VERSION, bytes)."""
    record, vid = store.resolve(ref)
    trace = load_trace(store.trace_path(record, vid))
    if not trace:
        raise errors.InvalidArgument(
            detail=f"{record.name}@{vid} has no boot trace yet: one is recorded when its first clone boots"
        )
    reader = PackReader(store.chunks.pack)
    base = ChunkedBase(store.chunks.pack, store.version_map(record, vid), reader)
    try:
        return f"{record.name}@{vid}", reader.load(base.slot_ranges(trace))
    finally:
        base.close()
        reader.close()
