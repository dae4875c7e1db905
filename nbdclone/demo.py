"""The built-in demo base: a small ext4 disk image made without root, mounts or downloads."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from nbdclone import errors

DEMO_SIZE = "64M"
README = """This is the nbdclone demo base.
Every clone starts with this file; what a clone writes stays in that clone.
"""


def build_demo_image(dest: Path) -> Path:
    """Write a 64 MiB raw disk holding an ext4 filesystem with a few files to `dest`."""
    mkfs = shutil.which("mkfs.ext4") or shutil.which("mke2fs", path="/usr/sbin:/sbin")
    if mkfs is None:
        raise errors.NbdcloneError(detail="mkfs.ext4 is not installed (apt install e2fsprogs)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "README").write_text(README)
        (root / "etc").mkdir()
        (root / "etc" / "hostname").write_text("nbdclone-demo\n")
        subprocess.run(
            [mkfs, "-q", "-F", "-t", "ext4", "-L", "demo", "-d", str(root), str(dest), DEMO_SIZE],
            check=True,
            capture_output=True,
        )
    return dest
