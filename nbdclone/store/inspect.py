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
  `json:{...}` or `nbd:...` is a file name, never a qemu protocol.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
from collections.abc import Iterable
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
class SourceImage:
    path: Path  # absolute
    format: str  # "raw" or "qcow2"
    size: int  # the disk's size (a qcow2's virtual size)
    reads: tuple[Path, ...] = ()  # other files it reads (backing files, data files), each allowed by name


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


def inspect(source: Path, allow: Iterable[Path] = ()) -> SourceImage:
    """Find out what `source` is and refuse what nbdclone must not import (see the module docstring)."""
    path = Path(os.path.abspath(source))
    if not path.exists():
        raise errors.SourceNotFound(path=source)
    if not path.is_file() and not path.is_block_device():
        raise errors.NotADiskImage(path=source, reason="not a regular file or block device")
    allowed = {Path(os.path.realpath(p)) for p in allow}
    with open(path, "rb") as f:
        magic = f.read(4)
    # A qcow2 is opened with its backing off from the first look: qemu-img info would otherwise open the
    # whole chain (a loop exhausts it). Anything else qemu-img may probe: only raw is taken.
    info = _info(path, source, "qcow2" if magic == QCOW2_MAGIC else None)
    fmt = info.get("format")
    if fmt == "raw":
        size = path.stat().st_size if path.is_file() else int(info.get("virtual-size", 0))
        if size == 0 or size % 512:
            raise errors.NotADiskImage(
                path=source, reason=f"a raw image is a non-zero multiple of 512 bytes, this is {size} bytes"
            )
        return SourceImage(path, "raw", size)
    if fmt != "qcow2":
        raise errors.NotADiskImage(path=source, reason=f"format {fmt} is not supported (raw or qcow2)")
    reads = _chain(path, source, info, allowed)
    return SourceImage(path, "qcow2", int(info["virtual-size"]), reads)


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


def _chain(path: Path, shown: Path, info: dict[str, Any], allowed: set[Path]) -> tuple[Path, ...]:
    """The files a qcow2 (and its allowed backing chain) reads besides itself; each must be allowed, the
    chain must end within MAX_CHAIN images without a loop, and every qcow2 in it must check clean."""
    reads: list[Path] = []
    seen = {Path(os.path.realpath(path))}
    while True:
        _check(path, shown)
        if info.get("encrypted"):
            raise errors.NotADiskImage(path=shown, reason=f"{path} is encrypted")
        spec = info.get("format-specific", {}).get("data", {})
        others = [("data file", spec.get("data-file"))]
        backing = info.get("full-backing-filename") or info.get("backing-filename")
        others.append(("backing file", backing))
        for what, other in others:
            if other is None:
                continue
            real = Path(os.path.realpath(os.path.join(path.parent, other)))
            if real not in allowed:
                raise errors.NotADiskImage(
                    path=shown,
                    reason=f"it reads {other} (the {what} of {path.name}); "
                    f"if that is meant, name it with --allow-backing {other}",
                )
            if real in seen:
                raise errors.NotADiskImage(path=shown, reason=f"its backing chain loops at {other}")
            seen.add(real)
            reads.append(real)
        if backing is None:
            return tuple(reads)
        if len(seen) > MAX_CHAIN:
            raise errors.NotADiskImage(path=shown, reason=f"its backing chain is longer than {MAX_CHAIN} images")
        path = reads[-1]
        fmt = info.get("backing-filename-format")
        if fmt not in ("raw", "qcow2"):
            raise errors.NotADiskImage(path=shown, reason=f"backing file {path} is not named raw or qcow2")
        if fmt == "raw":
            return tuple(reads)
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
    """qemu-img convert's source arguments for `image`: a qcow2 with nothing else to read is opened with its
    backing forced off, so a header changed after the inspection cannot make qemu read another file."""
    if image.reads:
        return ["-f", image.format, str(image.path)]  # every file of its chain was named by the operator
    return [_spec(image.path, image.format)]
