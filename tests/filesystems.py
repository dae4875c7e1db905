"""Real file systems for the tests that depend on one: loop-mounted images, tmpfs and a FUSE mount.

Each kind is mounted once per test session (a sparse image on a loop device, or a tmpfs, or bindfs over a
folder of an ext4 image) and unmounted at the end; tests work in folders of their own under it. The store's
correctness must not depend on which one it is on (overlay invariant I1).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

#: kind -> (mkfs command, mount options). "tmpfs*" and "fuse" are mounted otherwise.
KINDS: dict[str, tuple[list[str], str]] = {
    "ext4": (["mkfs.ext4", "-q", "-F"], ""),
    "ext4-nodelalloc": (["mkfs.ext4", "-q", "-F"], "nodelalloc"),
    "ext4-dioread_lock": (["mkfs.ext4", "-q", "-F"], "dioread_lock"),
    "ext4-data_journal": (["mkfs.ext4", "-q", "-F"], "data=journal"),
    "xfs": (["mkfs.xfs", "-q", "-f"], ""),
    "btrfs": (["mkfs.btrfs", "-q", "-f"], ""),
    "tmpfs": ([], "size=1g"),
    "tmpfs-huge": ([], "size=1g,huge=always"),
    "fuse": ([], ""),
}
IMAGE_SIZE = 1 << 30  # sparse; XFS and btrfs want a few hundred MiB at least


def run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


@contextlib.contextmanager
def mounted(kind: str, work: Path, size: int = IMAGE_SIZE) -> Iterator[Path]:
    """A fresh file system of `kind`, mounted under `work`; unmounted (and its image removed) after."""
    mkfs, options = KINDS[kind]
    mnt = work / f"mnt-{kind}-{uuid.uuid4().hex[:6]}"
    mnt.mkdir(parents=True)
    cleanups: list[list[str]] = []
    try:
        if kind.startswith("tmpfs"):
            run("mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt))
            cleanups.append(["umount", str(mnt)])
        elif kind == "fuse":
            with mounted("ext4", work, size) as under:
                (under / "d").mkdir()
                run("bindfs", "--no-allow-other", str(under / "d"), str(mnt))
                try:
                    yield mnt
                finally:
                    subprocess.run(["fusermount3", "-u", str(mnt)], check=False, capture_output=True)
                    subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)
            return
        else:
            image = work / f"{kind}-{uuid.uuid4().hex[:6]}.img"
            with open(image, "wb") as f:
                f.truncate(size)
            run(*mkfs, str(image))
            mount = ["mount", "-o", f"loop{',' + options if options else ''}", str(image), str(mnt)]
            run(*mount)
            cleanups.append(["umount", str(mnt)])
        yield mnt
    finally:
        for cmd in reversed(cleanups):
            if subprocess.run(cmd, check=False, capture_output=True).returncode != 0:
                # Still busy (a handle a failed test left open): detach it now, so no mount outlives the
                # session (47 had piled up under /tmp/pytest-of-root, each holding a loop device).
                subprocess.run([*cmd[:1], "-l", *cmd[1:]], check=False, capture_output=True)
        with contextlib.suppress(OSError):
            mnt.rmdir()
        for image in work.glob(f"{kind}-*.img"):
            image.unlink(missing_ok=True)


class LoopFs:
    """A file system on a loop-mounted image that can lose power: `cut_power` shuts it down without
    flushing its log (what reached the disk stays, the page cache and the rest are gone, as in a power
    cut), and `remount` mounts it again, replaying its journal."""

    def __init__(self, kind: str, work: Path, size: int = IMAGE_SIZE) -> None:
        mkfs, self.options = KINDS[kind]
        self.image = work / f"{kind}-{uuid.uuid4().hex[:6]}.img"
        # Mounted in /tmp itself: a store's socket paths under it must stay within 107 bytes.
        self.path = Path(tempfile.mkdtemp(prefix=f"nbc-{kind}-", dir="/tmp"))
        with open(self.image, "wb") as f:
            f.truncate(size)
        run(*mkfs, str(self.image))
        self._mount()

    def _mount(self) -> None:
        run("mount", "-o", f"loop{',' + self.options if self.options else ''}", str(self.image), str(self.path))

    def cut_power(self) -> None:
        run("xfs_io", "-x", "-c", "shutdown", str(self.path))  # no -f: the log is not flushed

    def remount(self) -> None:
        run("umount", str(self.path))
        self._mount()

    def close(self) -> None:
        subprocess.run(["umount", str(self.path)], check=False, capture_output=True)
        with contextlib.suppress(OSError):
            self.path.rmdir()
        self.image.unlink(missing_ok=True)


def fs_type(path: Path) -> str:
    out = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def fresh_dir(root: Path) -> Path:
    d = root / uuid.uuid4().hex[:8]
    d.mkdir()
    return d


def clear(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
