"""Crash recovery of an overlay's map (invariant I3): what an entry means after the writer stopped unclean.

    opened after        what survived                          what a tentative entry newer than the last
                                                               durable generation means
    a clean close       everything (close flushed)             (there is none)
    a kill -9           the page cache and written WAL         its block holds the bytes it fingerprints
    a power cut, an OS  the data file as of its last           the bytes may or may not be there: keep the
    crash, a file-      fdatasync (perhaps more), a prefix     entry if the block holds bytes it
    system shutdown     of the WAL                             fingerprints, else put back the previous state

One rule covers all three, so recovery never has to guess which happened (a file system that was shut down
and mounted again has lost its page cache without a reboot). An entry older than the last durable generation
needs no check: its bytes were fdatasynced before that generation was recorded. A block whose entry is put
back reads its previous state (BASE or ZEROED), which is what it read before the unflushed write; WAL records
that a power cut lost are older states for the same reason.

A block that was DATA already when it was rewritten is rewritten in place: its entry (previous state DATA)
takes the new bytes' print first, so every entry fingerprints what its block holds (`nbdclone check`
verifies that). After an unclean stop such a block reads old or new bytes, both acceptable for a write
that was not flushed: if they are not the ones its entry names, the entry is fixed to what it holds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import xxhash

from nbdclone.store import _blockmap as bm
from nbdclone.store.overlay import BASE, DATA, ZEROED, Change

_HEAD = 10  # tag, previous state, generation (8)
_PRINT = 8


#: What tells a block's bytes apart from the bytes that were there before (xxh3: 0.17 us per 4 KiB here,
#: mmh3's 128 bits 0.70 us): the C function itself, called once per written block (a Python wrapper around
#: it cost 15 us of a 1 MiB write's 256 calls).
fingerprint: Callable[[bytes | bytearray | memoryview], bytes] = xxhash.xxh3_64_digest


def tentative(prev: int, generation: int, *prints: bytes) -> bytes:
    """A block became DATA in `generation`; its bytes are one of `prints` (the acknowledged one, and one being
    written over it)."""
    return tentative_head(prev, generation) + b"".join(prints)


def tentative_head(prev: int, generation: int) -> bytes:
    """What every tentative entry of blocks that were `prev` in `generation` starts with."""
    return bm.TENTATIVE + bytes((prev,)) + generation.to_bytes(8, "big")


def prints_of(value: bytes) -> tuple[bytes, ...] | None:
    """The prints a DATA entry names (what its block may hold), or None where it names none (format 2)."""
    entry = decode(value)
    return entry.prints if entry.state == DATA and entry.prints else None


@dataclass(frozen=True, slots=True)
class Entry:
    state: int
    prev: int
    generation: int  # 0: known durable
    prints: tuple[bytes, ...]


def decode(value: bytes) -> Entry:
    tag = value[:1]
    if tag == bm.DATA_DONE:
        return Entry(DATA, DATA, 0, ())
    if tag == bm.ZERO:
        return Entry(ZEROED, ZEROED, 0, ())
    if tag == bm.TENTATIVE and len(value) in (_HEAD + _PRINT, _HEAD + 2 * _PRINT) and value[1] in (BASE, ZEROED, DATA):
        prints = tuple(value[i : i + _PRINT] for i in range(_HEAD, len(value), _PRINT))
        return Entry(DATA, value[1], int.from_bytes(value[2:_HEAD], "big"), prints)
    raise ValueError(f"unknown map value {value!r}")


@dataclass(slots=True)
class Recovered:
    states: list[Change] = field(default_factory=list)  # (block, DATA or ZEROED), in block order
    fixes: list[tuple[bytes, bytes | None]] = field(default_factory=list)  # map writes that make `states` true
    last_generation: int = 0  # the newest generation any entry carries


def recover(
    entries: Iterable[tuple[int, bytes]], *, unclean: bool, durable: int, read_block: Callable[[int], bytes]
) -> Recovered:
    """The map as it must be read, from the raw `entries` of an overlay whose last writer did not close it
    (`unclean`) or did. `read_block(block)` returns what the data file holds there (zeros past its end)."""
    out = Recovered()
    for block, value in entries:
        entry = decode(value)
        out.last_generation = max(out.last_generation, entry.generation)
        state = entry.state
        if unclean and entry.generation > durable:
            mark = fingerprint(read_block(block))
            if mark not in entry.prints:
                if entry.prev == DATA:  # rewritten in place: old or new bytes, both acceptable
                    out.fixes.append((bm.key(block), tentative(DATA, entry.generation, mark)))
                else:
                    out.fixes.append((bm.key(block), None if entry.prev == BASE else bm.ZERO))
                    state = entry.prev
        if state != BASE:
            out.states.append((block, state))
    return out
