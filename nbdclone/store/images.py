"""Moving whole disks in and out of the store: base import (raw or qcow2) and clone export.

Both keep holes: an import never reads a source hole and stores no all-zero chunk; an export writes only
data extents, so a sparse clone gives a sparse file. qemu-img does the qcow2 work.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Literal

from nbdclone import errors
from nbdclone.store import Store
from nbdclone.store._rocks import RocksOverlay
from nbdclone.store.base import Base, BaseImage, ZeroBase
from nbdclone.store.cache import PackReader
from nbdclone.store.catalog import BaseRecord, validate_name
from nbdclone.store.chunks import CHUNK, ChunkedBase, load_trace
from nbdclone.store.clone import EXTENT_DATA, Clone
from nbdclone.store.inspect import CONVERT_MEMORY, convert_source, inspect, limits
from nbdclone.store.overlay import MemoryOverlay, Overlay

Progress = Callable[[int, int], None]
COPY_CHUNK = 1 << 20
_ZERO_CHUNK = bytes(COPY_CHUNK)
_QEMU_PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


def _noop(done: int, total: int) -> None:
    pass


def import_base(
    store: Store, name: str, source: Path, progress: Progress = _noop, *, allow_backing: Sequence[Path] = ()
) -> tuple[BaseRecord, str]:
    """Add `source` as a new version of base `name` (creating the base). Returns the base and version id.
    The image is inspected first (`inspect`): a qcow2 reads no file the operator did not name."""
    validate_name("base", name)
    source_image = inspect(source, allow_backing)
    with contextlib.ExitStack() as stack:
        raw = source_image.path
        if source_image.format == "qcow2":
            raw = stack.enter_context(store.scratch(".raw"))
            _qemu_convert(["-O", "raw", "-S", "4k", *convert_source(source_image)], raw, lambda d, t: None)
        image = BaseImage(raw)
        stack.callback(image.close)
        if image.size != source_image.size:
            raise errors.NotADiskImage(path=source, reason=f"it changed while being imported ({image.size} bytes)")
        with store.chunks.writer():
            vmap, new_chunks = store.chunks.import_chunks(
                _read_chunks(image),
                image.size,
                store.all_version_maps(digests=True),
                lambda i: progress(min((i + 1) * CHUNK, image.size), image.size),
            )
            progress(image.size, image.size)
            return store.add_version(name, vmap, f"{source.absolute()} ({source_image.format})", new_chunks)
    raise AssertionError("unreachable")


NBD_URI = re.compile(r"nbds?(\+unix|\+vsock)?://")
_NBD_HOLE, _NBD_ZERO = 1, 2  # base:allocation flags
_STATUS_STEP = 1 << 30


def import_nbd(store: Store, name: str, uri: str, progress: Progress = _noop) -> tuple[BaseRecord, str]:
    """Add the disk an NBD server exports at `uri` (libnbd's URI syntax) as a new version of base `name`,
    streamed into the chunk store: no temporary file, and ranges the server reports as holes or zeros
    are never read."""
    import nbd  # libnbd's bindings (Debian python3-libnbd)

    validate_name("base", name)
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    try:
        h.connect_uri(uri)
        size = h.get_size()
    except nbd.Error as exc:
        raise errors.InvalidArgument(detail=f"cannot read {uri}: {exc.string}") from None
    try:
        with store.chunks.writer():
            vmap, new_chunks = store.chunks.import_chunks(
                _nbd_chunks(h, size, progress), size, store.all_version_maps(digests=True)
            )
            progress(size, size)
            return store.add_version(name, vmap, uri, new_chunks)
    except nbd.Error as exc:
        raise errors.StorageError(errno.EIO, what=f"reading {uri}", detail=exc.string) from None
    finally:
        with contextlib.suppress(nbd.Error):
            h.shutdown()


def _nbd_chunks(h: object, size: int, progress: Progress) -> Iterator[tuple[int, bytes | None]]:
    """The chunks of the export that hold data, in order, read once each."""
    done = 0  # chunks below this one were yielded
    for start, end in _nbd_data_ranges(h, size):
        for i in range(max(done, start // CHUNK), -(-end // CHUNK)):
            at = i * CHUNK
            yield i, h.pread(min(CHUNK, size - at), at)  # type: ignore[attr-defined]
            done = i + 1
            progress(min(done * CHUNK, size), size)


def _nbd_data_ranges(h: object, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of the ranges the server does not report as holes or zeros (all of it, if it reports
    nothing)."""
    if not h.can_meta_context("base:allocation"):  # type: ignore[attr-defined]
        yield 0, size
        return
    offset = 0
    while offset < size:
        extents: list[int] = []

        def status(meta: str, at: int, entries: list[int], err: int, extents: list[int] = extents) -> int:
            if meta == "base:allocation":
                extents.extend(entries)
            return 0

        h.block_status(min(_STATUS_STEP, size - offset), offset, status)  # type: ignore[attr-defined]
        if not extents:
            raise errors.StorageError(errno.EIO, what="reading extents", detail="the server reported none")
        for k in range(0, len(extents), 2):
            length, flags = extents[k], extents[k + 1]
            length = min(length, size - offset)
            if not flags & (_NBD_HOLE | _NBD_ZERO):
                yield offset, offset + length
            offset += length
            if offset >= size:
                break


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


def _qemu_convert(args: list[str], dest: Path, progress: Progress, pass_fds: tuple[int, ...] = ()) -> None:
    """qemu-img convert ARGS (options, then the source) DEST, in bounded memory."""
    total = 100
    cmd = ["qemu-img", "convert", "-p", *args, str(dest)]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=limits(None, CONVERT_MEMORY),
        pass_fds=pass_fds,
    )
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
    base_name, version = store.state_on(record, state) if state is not None else store.target_on(record)
    base: Base
    if base_name is None or version is None:
        base = ZeroBase(record.size)
    else:
        base = ChunkedBase(store.chunks.pack, store.version_map(store.get_base(base_name), version))
    overlay: Overlay = (
        MemoryOverlay() if state is None else RocksOverlay(store.overlay_path(record, state), readonly=True)
    )
    return Clone(base, overlay, base.size)


def export_clone(
    store: Store, name: str, dest: Path, fmt: Literal["raw", "qcow2"] = "raw", progress: Progress = _noop
) -> None:
    """Write the clone as the guest sees it (base + overlay) to a new sparse file at `dest`. The file has no
    name until it is whole and synced (O_TMPFILE, then linked), so a killed export leaves nothing; a qcow2
    export's raw intermediate is a scratch file of the store (`base gc` removes a killed one's)."""
    if dest.exists():
        raise errors.InvalidArgument(detail=f"{dest} already exists; nbdclone does not overwrite files")
    if not dest.parent.is_dir():
        raise errors.InvalidArgument(detail=f"directory {dest.parent} does not exist")
    clone = open_clone_readonly(store, name)
    try:
        with _unnamed_file(dest) as (out, fds), contextlib.ExitStack() as stack:
            if fmt == "raw":
                _write_raw(clone, out, progress)
            else:
                raw = stack.enter_context(store.scratch(".raw"))
                _write_raw(clone, raw, progress)
                _qemu_convert(["-f", "raw", "-O", "qcow2", str(raw)], out, lambda d, t: None, pass_fds=fds)
    finally:
        clone.close()
        clone.base.close()


@contextlib.contextmanager
def _unnamed_file(dest: Path) -> Iterator[tuple[Path, tuple[int, ...]]]:
    """A new file in dest's folder that gets the name `dest` only once it is complete and synced: yields a
    path to write it by, and the fds a child process needs to open that path (/proc/self/fd/N). Where the
    file system has no O_TMPFILE (FUSE, NFS), a named `.DEST.partial` stands in, removed on failure."""
    directory = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fd = os.open(dest.parent, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
            partial = dest.with_name(f".{dest.name}.partial")
            try:
                yield partial, ()
                _fsync_file(partial)
                os.link(partial, dest)  # fails if something took the name meanwhile: never overwrite
            finally:
                partial.unlink(missing_ok=True)
        else:
            try:
                path = Path(f"/proc/self/fd/{fd}")
                yield path, (fd,)
                os.fsync(fd)
                os.link(path, dest.name, src_dir_fd=directory, dst_dir_fd=directory, follow_symlinks=True)
            finally:
                os.close(fd)
        os.fsync(directory)
    finally:
        os.close(directory)


def _write_raw(clone: Clone, dest: Path, progress: Progress) -> None:
    buf = bytearray(COPY_CHUNK)
    view = memoryview(buf)
    with open(dest, "r+b" if dest.exists() else "xb") as out:
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
