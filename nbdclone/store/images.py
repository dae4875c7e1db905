"""Moving whole disks in and out of the store: base import and clone export, in one pass each.

    import  raw file or block device   read directly (its holes found by SEEK_DATA/SEEK_HOLE)
            qcow2 file                 served read-only by qemu-nbd (socket activation, memory bounded),
                                       read over NBD
            NBD URI                    read over NBD (libnbd)
            HTTP(S) URL (raw)          served by nbdkit's curl plugin, read over NBD
    export  raw                        written directly
            qcow2                      an empty qcow2 (qemu-img create) served by qemu-nbd, written over NBD

No path writes a temporary file of the image's size. All keep holes: an import never reads a range the
source reports as a hole or zeros and stores no all-zero chunk; an export writes only data, so a sparse
clone gives a sparse file. qemu does the qcow2 work; libnbd talks to it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import subprocess
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from math import ceil
from pathlib import Path
from typing import Any, Literal

from nbdclone import errors
from nbdclone.store import Store
from nbdclone.store._rocks import RocksOverlay
from nbdclone.store.base import Base, BaseImage, ZeroBase
from nbdclone.store.cache import PackReader
from nbdclone.store.catalog import BaseRecord, validate_name
from nbdclone.store.chunks import CHUNK, ZERO_SLOT, ChunkedBase, load_trace
from nbdclone.store.clone import EXTENT_DATA, Clone
from nbdclone.store.inspect import CONVERT_MEMORY, convert_source, inspected
from nbdclone.store.overlay import MemoryOverlay, Overlay

Progress = Callable[[int, int], None]
COPY_CHUNK = 1 << 20
_ZERO_CHUNK = bytes(COPY_CHUNK)


def _noop(done: int, total: int) -> None:
    pass


def import_base(
    store: Store,
    name: str,
    source: Path,
    progress: Progress = _noop,
    *,
    allow_backing: Sequence[Path] = (),
    vid: str | None = None,
) -> tuple[BaseRecord, str]:
    """Add `source` as a new version of base `name` (creating the base). Returns the base and version id.
    The image is inspected first (`inspect`): a qcow2 reads no file the operator did not name."""
    validate_name("base", name)
    with contextlib.ExitStack() as stack:
        source_image = stack.enter_context(inspected(source, allow_backing))  # opened once, read through that
        label = f"{source.absolute()} ({source_image.format})"
        if source_image.format == "qcow2":
            qemu_nbd = _helper(["qemu-nbd", "--read-only", *convert_source(source_image)])
            return _import_nbd_from(
                store, name, label, qemu_nbd, progress, size=source_image.size, vid=vid, check=source_image.unchanged
            )
        image = BaseImage(source_image.pinned)
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
            source_image.unchanged()  # (the version is not committed if it is)
            return store.add_version(name, vmap, label, new_chunks, vid=vid)
    raise AssertionError("unreachable")


NBD_URI = re.compile(r"nbds?(\+unix|\+vsock)?://")
_NBD_HOLE, _NBD_ZERO = 1, 2  # base:allocation flags
_STATUS_STEP = 1 << 30
MIN_IMAGE = 512  # a disk has at least one sector


HTTP_URL = re.compile(r"https?://", re.IGNORECASE)

#: Seconds a network source (an NBD server, or nbdkit's curl plugin reading a web server) may take to
#: connect and greet, and to answer any one request (NBDCLONE_IMPORT_TIMEOUT overrides it).
IMPORT_TIMEOUT = 60.0


def import_timeout() -> float:
    return float(os.environ.get("NBDCLONE_IMPORT_TIMEOUT", IMPORT_TIMEOUT))


def libnbd() -> Any:
    """libnbd's Python bindings: a system package (Debian python3-libnbd), not on PyPI, so a virtualenv
    made without --system-site-packages does not see them; say so in one line."""
    try:
        import nbd
    except ImportError:
        raise errors.NbdcloneError(
            detail="this needs libnbd's Python bindings: apt install python3-libnbd, and make the virtualenv "
            "with --system-site-packages"
        ) from None
    return nbd


class _Deadlined:
    """A libnbd handle driven through its asynchronous calls, each waited for at most `timeout` seconds:
    the synchronous calls wait for ever on a server that never greets, stalls or trickles."""

    def __init__(self, label: str, timeout: float) -> None:
        self.nbd = libnbd()
        self.label, self.timeout = label, timeout
        self.h = self.nbd.NBD()
        self.h.add_meta_context("base:allocation")

    def _wait(self, done: Callable[[], bool], what: str) -> None:
        end = time.monotonic() + self.timeout
        while not done():
            if self.h.aio_is_dead() or self.h.aio_is_closed():
                raise errors.InvalidArgument(detail=f"cannot read {self.label}: the server hung up while {what}")
            left = end - time.monotonic()
            if left <= 0:
                raise errors.InvalidArgument(
                    detail=f"cannot read {self.label}: no answer in {self.timeout:g} s while {what}"
                )
            self.h.poll(max(1, int(left * 1000)))

    def connect(self, source: str | list[str]) -> int:
        """Connect (a URI, or a command started with socket activation) and return the export's size."""
        if isinstance(source, str):
            self.h.aio_connect_uri(source)
        else:
            self.h.aio_connect_systemd_socket_activation(source)
        self._wait(self.h.aio_is_ready, "connecting")
        return int(self.h.get_size())

    def can_meta_context(self, name: str) -> bool:
        return bool(self.h.can_meta_context(name))

    def pread_ahead(self, reads: Iterable[tuple[int, int, int]], depth: int = 4) -> Iterator[tuple[int, bytes]]:
        """(key, data) for each (key, offset, length) of `reads`, in order, with up to `depth` reads in flight
        (the next ones travel while we store one); each waited for at most the timeout."""
        window: deque[tuple[int, int, Any, int]] = deque()
        for key, offset, n in reads:
            buf = self.nbd.Buffer(n)
            window.append((key, offset, buf, self.h.aio_pread(buf, offset)))
            if len(window) >= depth:
                yield self._read(*window.popleft())
        while window:
            yield self._read(*window.popleft())

    def _read(self, key: int, offset: int, buf: Any, cookie: int) -> tuple[int, bytes]:
        self._wait(lambda: self.h.aio_command_completed(cookie), f"reading at {offset}")
        return key, buf.to_bytearray()

    def block_status(self, n: int, offset: int, callback: Callable[..., int]) -> None:
        cookie = self.h.aio_block_status(n, offset, callback)
        self._wait(lambda: self.h.aio_command_completed(cookie), f"asking for extents at {offset}")

    def close(self) -> None:
        """Hang up without waiting for the server (a subprocess it started is stopped by libnbd)."""
        with contextlib.suppress(self.nbd.Error):
            if self.h.aio_is_ready():
                self.h.aio_disconnect(0)
        del self.h


def import_nbd(
    store: Store, name: str, uri: str, progress: Progress = _noop, *, vid: str | None = None
) -> tuple[BaseRecord, str]:
    """Add the disk an NBD server exports at `uri` (libnbd's URI syntax) as a new version of base `name`,
    streamed into the chunk store: no temporary file, and ranges the server reports as holes or zeros
    are never read."""
    return _import_nbd_from(store, name, uri, uri, progress, vid=vid)


def import_url(
    store: Store, name: str, url: str, progress: Progress = _noop, *, vid: str | None = None
) -> tuple[BaseRecord, str]:
    """Add the raw disk image at an HTTP(S) `url` (the server must answer range requests) as a new version
    of base `name`, streamed through nbdkit's curl plugin: no temporary file."""
    if not HTTP_URL.match(url):
        raise errors.InvalidArgument(detail=f"{url!r} is not an http:// or https:// URL")
    _check_url(url)
    # nbdkit in the foreground (a fork would shed _helper's parent-death SIGKILL) and without
    # --exit-with-parent (it would turn that SIGKILL into a SIGTERM, on which nbdkit waits for the request in
    # flight, hung on a stalled server). curl's timeout bounds that request when we hang up; it is a little
    # longer than ours, so that ours names the cause (and --log=null: not nbdkit's lines too).
    timeout = f"timeout={ceil(import_timeout()) + 2}"
    curl = ["nbdkit", "--foreground", "--log=null", "--readonly", "curl", f"url={url}", timeout]
    return _import_nbd_from(store, name, url, _helper(curl, bounded=False), progress, vid=vid)


def _import_nbd_from(
    store: Store,
    name: str,
    label: str,
    source: str | list[str],
    progress: Progress,
    *,
    size: int | None = None,
    vid: str | None = None,
    check: Callable[[], None] | None = None,
) -> tuple[BaseRecord, str]:
    """Import what an NBD server exports: at a URI, or served by a command started with socket activation
    (stopped when the connection closes). `size`: what the export must measure, if known; `check`: called
    once every byte is read, before the version is committed (it raises to refuse it)."""
    validate_name("base", name)
    h = _Deadlined(label, import_timeout())
    nbd = h.nbd
    try:
        try:
            got = h.connect(source)
        except nbd.Error as exc:
            raise errors.InvalidArgument(detail=f"cannot read {label}: {exc.string}") from None
        if size is not None and got != size:
            raise errors.InvalidArgument(detail=f"{label} changed while being imported ({got} bytes)")
        if got < MIN_IMAGE:
            raise errors.InvalidArgument(detail=f"{label} claims {got} bytes: not a disk (less than {MIN_IMAGE})")
        store.check_file_size(got)  # 8 EiB, or more than a clone of it could ever hold
        with store.chunks.writer():
            vmap, new_chunks = store.chunks.import_chunks(
                _nbd_chunks(h, got, progress), got, store.all_version_maps(digests=True)
            )
            progress(got, got)
            if check is not None:
                check()
            return store.add_version(name, vmap, label, new_chunks, vid=vid)
    except nbd.Error as exc:
        raise errors.StorageError(errno.EIO, what=f"reading {label}", detail=exc.string) from None
    finally:
        h.close()


def _check_url(url: str) -> None:
    """Ask the server first (HEAD), so that a wrong URL gets a clear one-line answer, not nbdkit's."""
    import urllib.error
    import urllib.request

    try:
        head = urllib.request.Request(url, method="HEAD")  # noqa: S310 - import_url checked the scheme
        with urllib.request.urlopen(head, timeout=30) as reply:  # noqa: S310
            ranges = reply.headers.get("Accept-Ranges", "")
    except urllib.error.HTTPError as exc:
        raise errors.InvalidArgument(detail=f"cannot read {url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise errors.InvalidArgument(detail=f"cannot read {url}: {reason}") from None
    if ranges.strip().lower() != "bytes":
        raise errors.InvalidArgument(detail=f"cannot read {url}: the server does not answer range requests")


def _helper(cmd: list[str], *, bounded: bool = True) -> list[str]:
    """`cmd` as a helper process we start: killed when its parent thread ends, whatever it is doing (a
    kill -9 of the CLI between libnbd's fork and its connect leaves a server waiting for a client that never
    comes: it would outlive us, holding our stdout), and, if `bounded`, with its address space bounded (qemu
    parsing an image a user gave). setpriv and prlimit exec it in the same process, as socket activation
    needs (LISTEN_PID). Call from the thread that lives as long as the helper is needed."""
    bound = ["prlimit", f"--as={CONVERT_MEMORY}"] if bounded else []
    return ["setpriv", "--pdeathsig", "KILL", *bound, *cmd]


def _nbd_chunks(h: _Deadlined, size: int, progress: Progress) -> Iterator[tuple[int, bytes | None]]:
    """The chunks of the export that hold data, in order, read once each."""

    def wanted() -> Iterator[tuple[int, int, int]]:
        done = 0  # chunks below this one were asked for
        for start, end in _nbd_data_ranges(h, size):
            for i in range(max(done, start // CHUNK), -(-end // CHUNK)):
                yield i, i * CHUNK, min(CHUNK, size - i * CHUNK)
                done = i + 1

    for i, data in h.pread_ahead(wanted()):
        yield i, data
        progress(min((i + 1) * CHUNK, size), size)


def _nbd_data_ranges(h: _Deadlined, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of the ranges the server does not report as holes or zeros (all of it, if it reports
    nothing)."""
    if not h.can_meta_context("base:allocation"):
        yield 0, size
        return
    offset = 0
    while offset < size:
        extents: list[int] = []

        def status(meta: str, at: int, entries: list[int], err: int, extents: list[int] = extents) -> int:
            if meta == "base:allocation":
                extents.extend(entries)
            return 0

        h.block_status(min(_STATUS_STEP, size - offset), offset, status)
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


def open_clone_readonly(store: Store, name: str) -> Clone:
    """The clone as it reads now (its overlay on its version), without taking its overlay's lock."""
    record = store.get_clone(name)
    state = store.clone_state(record)
    base_name, version = store.state_on(record, state) if state is not None else store.target_on(record)
    base: Base
    if base_name is None or version is None:
        base = ZeroBase(record.size)
    else:
        vmap = store.version_map(store.get_base(base_name), version)
        base = ChunkedBase(store.chunks.pack, vmap, fetch=store.fetcher())
    overlay: Overlay = (
        MemoryOverlay() if state is None else RocksOverlay(store.overlay_path(record, state), readonly=True)
    )
    return Clone(base, overlay, base.size)


def export_clone(
    store: Store, name: str, dest: Path, fmt: Literal["raw", "qcow2"] = "raw", progress: Progress = _noop
) -> None:
    """Write the clone as the guest sees it (base + overlay) to a new sparse file at `dest`, in one pass. The
    file has no name until it is whole and synced (O_TMPFILE, then linked), so a killed export leaves
    nothing."""
    if dest.exists():
        raise errors.InvalidArgument(detail=f"{dest} already exists; nbdclone does not overwrite files")
    if not dest.parent.is_dir():
        raise errors.InvalidArgument(detail=f"directory {dest.parent} does not exist")
    clone = open_clone_readonly(store, name)
    try:
        with _unnamed_file(dest) as (out, fds):
            if fmt == "raw":
                _write_raw(clone, out, progress)
            else:
                _write_qcow2(clone, out, fds, progress)
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
    with open(dest, "r+b" if dest.exists() else "xb") as out:
        out.truncate(clone.size)
        _copy_data(clone, lambda view, at: os.pwrite(out.fileno(), view, at), progress)


def _write_qcow2(clone: Clone, dest: Path, fds: tuple[int, ...], progress: Progress) -> None:
    """An empty qcow2 of the clone's size at `dest`, then its data written through qemu-nbd serving it."""
    nbd = libnbd()

    create = subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(dest), str(clone.size)],
        capture_output=True,
        text=True,
        pass_fds=fds,
        check=False,
    )
    if create.returncode != 0:
        raise errors.NbdcloneError(detail=f"qemu-img create failed: {create.stderr.strip()}")
    # qemu-nbd is started by libnbd, which passes no descriptors: it opens ours through /proc/PID.
    path = str(dest).replace("/proc/self/", f"/proc/{os.getpid()}/", 1)
    h = nbd.NBD()
    try:
        h.connect_systemd_socket_activation(_helper(["qemu-nbd", "-f", "qcow2", path], bounded=False))
        _copy_data(clone, lambda view, at: h.pwrite(view, at), progress)
        h.flush()
    except nbd.Error as exc:
        raise errors.StorageError(errno.EIO, what=f"writing {dest}", detail=exc.string) from None
    finally:
        with contextlib.suppress(nbd.Error):
            h.shutdown()


def _copy_data(clone: Clone, write: Callable[[memoryview, int], object], progress: Progress) -> None:
    """write(view, offset) every range of the clone that holds data (not zeros), in order."""
    buf = bytearray(COPY_CHUNK)
    view = memoryview(buf)
    pos = 0
    while pos < clone.size:
        for off, length, kind in clone.extents(min(clone.size - pos, 1 << 30), pos):
            if kind == EXTENT_DATA:
                at, end = off, off + length
                while at < end:
                    n = min(COPY_CHUNK, end - at)
                    clone.pread_into(view[:n], at)
                    if view[:n] != _ZERO_CHUNK[:n]:
                        write(view[:n], at)
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
    reader = PackReader(store.chunks.pack, fetch=store.fetcher())
    base = ChunkedBase(store.chunks.pack, store.version_map(record, vid), reader)
    try:
        if reader.fetch is not None:  # a fleet host: the trace's chunks not fetched yet come in one request
            chunks = dict.fromkeys(i for i in trace if i < base.map.nchunks and base.map.slot(i) != ZERO_SLOT)
            reader.verify_all([(base.map.slot(i), base.map.key(i)) for i in chunks])
        return f"{record.name}@{vid}", reader.load(base.slot_ranges(trace))
    finally:
        base.close()
        reader.close()
