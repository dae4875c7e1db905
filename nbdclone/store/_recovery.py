"""Crash recovery of an overlay's map (invariant I3), as pure functions of what the database holds.

    opened after          what survived                            what the map's entries mean
    a clean close         everything (close flushed)               as written
    a kill -9             page cache and written WAL records:      as written: every tentative entry's
    (same boot id)        every acknowledged update                bytes are in the data file
    a power cut or OS     the data file as of its last fdatasync,  tentative entries of generations after
    crash (boot id        a prefix of the WAL                      the last durable one go back to their
    changed, or unknown)                                           previous state; older ones are data

A tentative entry of a generation after the last durable one was written after the last completed flush's
fdatasync began, so its bytes may or may not be on disk: the block reads its previous state (BASE or ZEROED:
a block that was DATA already is rewritten in place and gets no new entry), which is what it read before
that unflushed write. Entries that the WAL lost are simply older states, for the same reason.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from nbdclone.store import _blockmap as bm
from nbdclone.store.overlay import BASE, DATA, ZEROED, Change

_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def boot_id() -> bytes:
    """This boot of the kernel: a page cache that a killed process wrote into is still here if it matches."""
    try:
        return _BOOT_ID.read_bytes().strip()
    except OSError:
        return b""  # unknown: every unclean open is then treated as a power cut, the safe side


def tentative(prev: int, generation: int) -> bytes:
    return bm.TENTATIVE + bytes((prev,)) + generation.to_bytes(8, "big")


def decode(value: bytes) -> tuple[int, int, int]:
    """(state, previous state, generation) of a map value; generation 0 for entries known durable."""
    tag = value[:1]
    if tag == bm.DATA_DONE:
        return DATA, DATA, 0
    if tag == bm.ZERO:
        return ZEROED, ZEROED, 0
    if tag == bm.TENTATIVE and len(value) == 10 and value[1] in (BASE, ZEROED):
        return DATA, value[1], int.from_bytes(value[2:], "big")
    raise ValueError(f"unknown map value {value!r}")


@dataclass(slots=True)
class Recovered:
    states: list[Change] = field(default_factory=list)  # (block, DATA or ZEROED), in block order
    fixes: list[tuple[bytes, bytes | None]] = field(default_factory=list)  # map writes that make `states` true
    last_generation: int = 0  # the newest generation any entry carries


def recover(entries: Iterable[tuple[int, bytes]], *, lost_power: bool, durable: int) -> Recovered:
    """The map as it must be read, from the raw `entries` of an overlay whose last opener did not close it
    (lost_power: the page cache of that opener is gone) or did (lost_power False, nothing to undo)."""
    out = Recovered()
    for block, value in entries:
        state, prev, generation = decode(value)
        out.last_generation = max(out.last_generation, generation)
        if lost_power and generation > durable:
            out.fixes.append((bm.key(block), None if prev == BASE else bm.ZERO))
            state = prev
        if state != BASE:
            out.states.append((block, state))
    return out
