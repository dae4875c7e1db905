"""The verbs that change what a store names, each in its order: on a single host here, on a fleet host in
fleet/host.py. A command opens its host once (`open_host`) and calls its verbs; it never asks which kind it
has, and the storage core never learns that fleets exist.

A verb's `make` arguments are the local work the command parses and reports on (an import from a file, a
publish, creating clones); the host runs it where its order puts it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nbdclone import errors
from nbdclone.fleet import config as fleet_config
from nbdclone.store import Store


@dataclass(frozen=True, slots=True)
class Removed:
    """What `remove_base` did: `freed` bytes here, or, for a fleet base, the hosts that still hold it."""

    freed: int = 0
    fleet: str | None = None
    holders: tuple[str, ...] = ()


class Host:
    """A single host: every verb is the store's own."""

    fleet: str | None = None  # the fleet's name, for messages

    def __init__(self, store: Store, say: Callable[[str], None] = lambda text: None) -> None:
        self.store = store
        self.say = say  # a line for the user while a verb runs (the CLI prints it)

    def import_version(self, name: str, make: Callable[[str | None], str]) -> str:
        """Add a version of base `name`: `make(number or None)` imports it here and returns its id."""
        return make(None)

    def current(self, name: str) -> str:
        return self.store.current_version(self.store.get_base(name))

    def promote(self, name: str, vid: str, *, wait_warm: float | None = None, wait_timeout: float = 0.0) -> str:
        """Make `vid` current (staging it first where it must be). Returns the old current version."""
        if wait_warm is not None:
            raise errors.InvalidArgument(detail="--wait-warm waits for a fleet's hosts: this store is in no fleet")
        return self.flip(name, vid)

    def flip(self, name: str, vid: str) -> str:
        """Make `vid` (a version this host holds) current."""
        return self.store.promote(name, vid)

    def remove_base(self, ref: str, wait: float) -> Removed:
        """Remove a base or one version (NAME@VERSION)."""
        return Removed(freed=self.store.remove_version(ref) if "@" in ref else self.store.remove_base(ref))

    def clear_trace(self, name: str, vid: str) -> None:
        self.store.trace_path(self.store.get_base(name), vid).unlink(missing_ok=True)

    def create_clones(self, names: list[str], base: str | None, make: Callable[[], None]) -> None:
        """Create clones `names` (of `base`, if given): `make()` creates them here."""
        make()

    def check_clone(self, name: str) -> None:
        """Raise CloneNotFound unless `remove_clone(name)` has something to remove."""
        self.store.get_clone(name)

    def remove_clone(self, name: str) -> None:
        self.store.remove_clone(name)

    def move_clone(self, name: str, to: str, *, force: bool, drain: float) -> int:
        detail = f"store {self.store.path} is in no fleet: there is no host to move a clone to"
        raise errors.InvalidArgument(detail=detail)


def open_host(path: Path | str, say: Callable[[str], None] = lambda text: None) -> Host:
    """The host of the store at `path`: a fleet host if the store joined a fleet (fleet.json), else a single
    host."""
    path = Path(path).absolute()
    config = fleet_config.load(path)
    if config is None:
        return Host(Store(path), say)
    from nbdclone.fleet.host import FleetHost

    return FleetHost(path, config, say)


__all__ = ["Host", "Removed", "open_host"]
