"""The record of a running server, so that commands find it (nbdclone uri, reload, stats)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from nbdclone import errors
from nbdclone.store.layout import Layout, write_atomic


class ServerRecord(Layout):
    def write_server_info(self, info: dict[str, Any]) -> None:
        """Record the running server; raises only if no copy could be written (a full disk fails one)."""
        self._init_dirs()
        failed: OSError | None = None
        written = 0
        for path in self.runtime_paths():
            try:
                write_atomic(path, json.dumps(info), path.parent)
                written += 1
            except OSError as exc:
                failed = exc
        if not written and failed is not None:
            raise failed

    def server_info(self) -> dict[str, Any]:
        for path in self.runtime_paths():
            try:
                if path.stat().st_uid != os.geteuid():  # /dev/shm is everyone's: only our own record counts
                    continue
                info: dict[str, Any] = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if pid_alive(int(info.get("pid", 0))):
                return info
        raise errors.ServerNotRunning(store=self.path)

    def clear_server_info(self, pid: int) -> None:
        for path in self.runtime_paths():
            with contextlib.suppress(OSError, ValueError):
                if json.loads(path.read_text()).get("pid") == pid:
                    path.unlink()


def pid_alive(pid: int) -> bool:
    """The process runs (a zombie, killed and not yet reaped by its parent, does not)."""
    if pid <= 0:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")
