"""A store's fleet settings (STORE/fleet.json): where the fleet's etcd and Ceph are, and this host's name."""

from __future__ import annotations

import json
import os
import re
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

from nbdclone import errors
from nbdclone.store.layout import FLEET_FILE, Layout, write_atomic

#: Seconds one etcd request or one RADOS operation may take before it fails (an engine down is an error,
#: not a hang). Tests shorten it (NBDCLONE_FLEET_TIMEOUT).
TIMEOUT = int(os.environ.get("NBDCLONE_FLEET_TIMEOUT", "10"))
_FLEET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True, slots=True)
class FleetConfig:
    etcd: str  # http://HOST:PORT
    ceph_conf: str
    pool: str = "nbdclone"
    name: str = "default"  # the fleet: an etcd prefix and a RADOS namespace, so fleets can share engines
    host: str = ""
    pack_bound: int = 0  # bytes: versions this host no longer needs are evicted while its pack is larger

    @property
    def prefix(self) -> bytes:
        return f"/nbdclone/{self.name}/".encode()

    def etcd_address(self) -> tuple[str, int]:
        m = re.fullmatch(r"(?:https?://)?([^:/]+):(\d+)/?", self.etcd)
        if not m:
            raise errors.InvalidArgument(detail=f"invalid etcd address {self.etcd!r}: use http://HOST:PORT")
        return m.group(1), int(m.group(2))


def load(store: Path) -> FleetConfig | None:
    """The store's fleet settings, or None for a single-host store."""
    try:
        data = json.loads((store / FLEET_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise errors.Damaged(path=store / FLEET_FILE, detail=str(exc)) from None
    return FleetConfig(**data)


def save(store: Path, config: FleetConfig) -> FleetConfig:
    if not _FLEET_NAME.fullmatch(config.name):
        raise errors.InvalidArgument(detail=f"invalid fleet name {config.name!r}")
    config.etcd_address()
    if not Path(config.ceph_conf).is_file():
        raise errors.InvalidArgument(detail=f"Ceph configuration {config.ceph_conf} does not exist")
    host = config.host or socket.gethostname()
    if not _FLEET_NAME.fullmatch(host):
        raise errors.InvalidArgument(detail=f"invalid host name {host!r}")
    config = FleetConfig(
        config.etcd, str(Path(config.ceph_conf).absolute()), config.pool, config.name, host, config.pack_bound
    )
    Layout(store).make()  # (a store, or a new or empty folder to make one in: refused otherwise)
    write_atomic(store / FLEET_FILE, json.dumps(asdict(config)), store / "tmp")
    return config
