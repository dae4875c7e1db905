"""What a source image is, found out before a byte of it is read: format, size, and every other file it
would make qemu read.

An image is data from whoever handed it over, so it is treated as hostile (as OpenStack's image-format
checks treat uploads):
- qemu-img runs under a CPU-time, memory and wall-clock bound, so a crafted header cannot hang or exhaust
  the host (a backing chain that loops, a huge table);
- a qcow2 that names a backing file or an external data file is refused unless the operator names that
  file (`--allow-backing PATH`): otherwise `/etc/shadow` as a backing file ends up inside a base;
- a qcow2 that `qemu-img check` finds damaged (truncated, overlapping tables) is refused: it would import
  as zeros past the damage;
- only raw and qcow2 are taken (encrypted qcow2 is not), and the path is always absolute, so a name like
  `json:{...}` or `nbd:...` is a file name, never a qemu protocol;
- the image is opened once (`pinned`): every later look and the conversion go through that descriptor
  (/proc/PID/fd/N), so a file swapped in at the path between the checks and the copy is never read, and
  the conversion names every other file itself (the backing chain and data files the inspection found and
  the operator allowed; no backing where there was none), so a header changed since cannot add one; an
  image changed in place meanwhile (its ctime) is refused before its version is committed (`unchanged`).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import stat
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nbdclone import errors

#: qemu-img info and check: the limits OpenStack's image checks use.
INSPECT_CPU_SECONDS = 30
INSPECT_MEMORY = 1 << 30
INSPECT_TIMEOUT = 60.0
#: qemu-img convert runs as long as the image takes, in bounded memory.
CONVERT_MEMORY = 2 << 30
MAX_CHAIN = 16
QCOW2_MAGIC = b"QFI\xfb"


@dataclass(frozen=True, slots=True)
class Layer:
    """One image of a qcow2's chain as the inspection found it: qemu opens exactly this at conversion."""

    path: Path  # the top image's pinned path; a backing file's real path (allowed by name)
    format: str  # "raw" or "qcow2"
    data_file: Path | None = None  # its external data file (allowed by name)


@dataclass(frozen=True, slots=True)
class SourceImage:
    path: Path  # as given, absolute (for messages)
    format: str  # "raw" or "qcow2"
    size: int  # the disk's size (a qcow2's virtual size)
    pinned: Path  # /proc/PID/fd/N: the descriptor the inspection opened, which everything after reads
    stamp: tuple[int, int, int, int, int]  # (inode, size, mtime ns, ctime ns, links) when pinned: `unchanged`
    chain: tuple[Layer, ...] = ()  # a qcow2: itself, then its backing files, in order

    @property
    def reads(self) -> tuple[Path, ...]:
        """The other files it reads (backing and data files), each allowed by name."""
        files = [f for layer in self.chain for f in (layer.path, layer.data_file) if f is not None]
        return tuple(files[1:])

    def unchanged(self) -> None:
        """Refuse (NotADiskImage) an image written since it was pinned: its bytes may not be the ones checked.
        A write moves its mtime and ctime; the ctime also moves when the file is renamed over or unlinked
        (its link count changes), which changes no byte: then only the mtime says."""
        now = _stamp(os.stat(self.pinned))
        if now[:3] != self.stamp[:3] or (now[4] == self.stamp[4] and now[3] != self.stamp[3]):
            raise errors.NotADiskImage(path=self.path, reason="it changed while being imported")


def _stamp(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_nlink


def limits(cpu_seconds: int | None, memory: int) -> Any:
    """A preexec_fn that bounds the child's CPU time and address space."""

    def apply() -> None:
        if cpu_seconds is not None:
            resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    return apply


def _qemu_img(args: list[str], path: Path) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            ["qemu-img", *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=INSPECT_TIMEOUT,
            preexec_fn=limits(INSPECT_CPU_SECONDS, INSPECT_MEMORY),
        )
    except subprocess.TimeoutExpired:
        raise errors.NotADiskImage(
            path=path, reason=f"qemu-img took more than {INSPECT_TIMEOUT:.0f} s to read its header"
        ) from None


def _last_line(text: str, default: str) -> str:
    line = (text.strip().splitlines() or [default])[-1]
    return line if len(line) <= 200 else line[:90] + " ... " + line[-90:]


@contextlib.contextmanager
def inspected(source: Path, allow: Iterable[Path] = ()) -> Iterator[SourceImage]:
    """Open `source` once, find out what it is through that descriptor, and refuse what nbdclone must not
    import (see the module docstring). The descriptor stays open while the caller reads the image."""
    path = Path(os.path.abspath(source))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise errors.SourceNotFound(path=source) from None
    except OSError as exc:
        raise errors.NotADiskImage(path=source, reason=exc.strerror or "it cannot be opened") from None
    try:
        yield _inspect(fd, path, source, {Path(os.path.realpath(p)) for p in allow})
    finally:
        os.close(fd)


def _inspect(fd: int, path: Path, source: Path, allowed: set[Path]) -> SourceImage:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) and not stat.S_ISBLK(st.st_mode):
        raise errors.NotADiskImage(path=source, reason="not a regular file or block device")
    pinned = Path(f"/proc/{os.getpid()}/fd/{fd}")
    magic = os.pread(fd, 4, 0)
    # A qcow2 is opened with its backing off from the first look: qemu-img info would otherwise open the
    # whole chain (a loop exhausts it). Anything else qemu-img may probe: only raw is taken.
    info = _info(pinned, source, "qcow2" if magic == QCOW2_MAGIC else None)
    fmt = info.get("format")
    if fmt == "raw":
        size = st.st_size if stat.S_ISREG(st.st_mode) else int(info.get("virtual-size", 0))
        if size == 0 or size % 512:
            raise errors.NotADiskImage(
                path=source, reason=f"a raw image is a non-zero multiple of 512 bytes, this is {size} bytes"
            )
        return SourceImage(path, "raw", size, pinned, _stamp(st))
    if fmt != "qcow2":
        raise errors.NotADiskImage(path=source, reason=f"format {fmt} is not supported (raw or qcow2)")
    chain = _chain(pinned, path.parent, source, info, allowed)
    return SourceImage(path, "qcow2", int(info["virtual-size"]), pinned, _stamp(st), chain)


def _spec(path: Path, fmt: str) -> str:
    """How qemu opens `path` as `fmt`, reading no other file (a qcow2's backing file is turned off)."""
    spec: dict[str, Any] = {"driver": fmt, "file": {"driver": "file", "filename": str(path)}}
    if fmt == "qcow2":
        spec["backing"] = None
    return "json:" + json.dumps(spec)


def _info(path: Path, shown: Path, fmt: str | None = None) -> dict[str, Any]:
    proc = _qemu_img(["info", "--output=json", _spec(path, fmt) if fmt else str(path)], shown)
    if proc.returncode != 0:
        raise errors.NotADiskImage(path=shown, reason=_last_line(proc.stderr, "qemu-img cannot read it"))
    info: dict[str, Any] = json.loads(proc.stdout)
    return info


def _chain(path: Path, folder: Path, shown: Path, info: dict[str, Any], allowed: set[Path]) -> tuple[Layer, ...]:
    """The qcow2 at `path` (its names relative to `folder`) and its backing chain, as layers; every other
    file must be allowed, the chain must end within MAX_CHAIN images without a loop, and every qcow2 in it
    must check clean."""
    layers: list[Layer] = []
    seen = {Path(os.path.realpath(shown))}
    fmt, label = "qcow2", shown.name  # (the top image's path is its descriptor's)
    while True:
        if fmt == "raw":
            layers.append(Layer(path, "raw"))
            return tuple(layers)
        _check(path, shown)
        if info.get("encrypted"):
            raise errors.NotADiskImage(path=shown, reason=f"{path} is encrypted")
        spec = info.get("format-specific", {}).get("data", {})
        backing = info.get("full-backing-filename") or info.get("backing-filename")
        found: dict[str, Path] = {}
        for what, other in (("data file", spec.get("data-file")), ("backing file", backing)):
            if other is None:
                continue
            real = Path(os.path.realpath(os.path.join(folder, other)))
            if real not in allowed:
                raise errors.NotADiskImage(
                    path=shown,
                    reason=f"it reads {other} (the {what} of {label}); "
                    f"if that is meant, name it with --allow-backing {other}",
                )
            if real in seen:
                raise errors.NotADiskImage(path=shown, reason=f"its backing chain loops at {other}")
            seen.add(real)
            found[what] = real
        layers.append(Layer(path, "qcow2", found.get("data file")))
        if backing is None:
            return tuple(layers)
        if len(seen) > MAX_CHAIN:
            raise errors.NotADiskImage(path=shown, reason=f"its backing chain is longer than {MAX_CHAIN} images")
        path, folder, label = found["backing file"], found["backing file"].parent, found["backing file"].name
        fmt = str(info.get("backing-filename-format"))
        if fmt not in ("raw", "qcow2"):
            raise errors.NotADiskImage(path=shown, reason=f"backing file {path} is not named raw or qcow2")
        if fmt == "qcow2":
            info = _info(path, shown, "qcow2")


def _check(path: Path, shown: Path) -> None:
    """qemu-img check (read-only): refuse a qcow2 with corruptions; leaked clusters only cost its space."""
    proc = _qemu_img(["check", "--output=json", _spec(path, "qcow2")], shown)
    try:
        result = json.loads(proc.stdout)
    except ValueError:
        raise errors.NotADiskImage(path=shown, reason=_last_line(proc.stderr, "qemu-img check failed")) from None
    bad = int(result.get("corruptions", 0)) + int(result.get("check-errors", 0))
    if bad or proc.returncode not in (0, 3):  # 3: leaks only
        where = "" if path == shown else f" ({path})"
        raise errors.NotADiskImage(
            path=shown, reason=f"it is damaged{where}: qemu-img check found {bad} error(s) (truncated or corrupt)"
        )


def convert_source(image: SourceImage) -> list[str]:
    """qemu's source argument for `image`: the pinned descriptor, and every layer under it named here (a
    qcow2 with no backing has its backing forced off), so a header changed after the inspection cannot make
    qemu read another file."""
    if not image.chain:
        return [_spec(image.pinned, image.format)]
    spec: dict[str, Any] | None = None
    for layer in reversed(image.chain):
        below, spec = spec, {"driver": layer.format, "file": {"driver": "file", "filename": str(layer.path)}}
        if layer.format == "qcow2":
            spec["backing"] = below
            if layer.data_file is not None:
                spec["data-file"] = {"driver": "file", "filename": str(layer.data_file)}
    return ["json:" + json.dumps(spec)]
