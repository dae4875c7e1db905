"""An overlay's record of its last durable generation outside RocksDB: what tells a write-ahead log that
lost records it had synced (a file cut short, a bad repair of the file system) from one whose unsynced tail
a crash tore off, which RocksDB tolerates (issue 25, E3).

    OVERLAY/durable   b"NBDCDUR1", generation (8, big-endian), xxh3-64 of the 16 bytes before it (8)

Written in place (pwrite) after each flush has synced the WAL that says the generation is durable, so it
never names a generation the WAL had not synced: a crash may lose the write (it names an older one, which
proves nothing) but never makes it newer. Not synced by the flush (that would cost a third sync per flush):
it reaches the disk with the page cache's writeback, and at a clean close. An open that finds it naming a
generation newer than the map's durable one knows the WAL lost synced records, and fails loudly. A missing
or torn record (an overlay of an older nbdclone, a power cut mid-write) proves nothing either, and is
written again at the next flush.
"""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path

import xxhash

log = logging.getLogger(__name__)

NAME = "durable"
_MAGIC = b"NBDCDUR1"
_RECORD = struct.Struct(">8sQQ")


def read(overlay: Path) -> int | None:
    """The generation the overlay's record names, or None if there is none that reads whole."""
    try:
        raw = (overlay / NAME).read_bytes()[: _RECORD.size]
    except FileNotFoundError:
        return None
    if len(raw) != _RECORD.size:
        return None
    magic, generation, seal = _RECORD.unpack(raw)
    if magic != _MAGIC or seal != xxhash.xxh3_64_intdigest(raw[:16]):
        log.warning("%s does not read whole (a power cut during its write?): not checked", overlay / NAME)
        return None
    return int(generation)


class Record:
    """The record of one writable open: `write` after each flush's WAL sync."""

    def __init__(self, overlay: Path) -> None:
        self.path = overlay / NAME
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._failed = False

    def write(self, generation: int, *, sync: bool = False) -> None:
        """Record `generation`, which the map has durably. A failure (a full copy-on-write file system) leaves
        the older record, which proves nothing: logged once, never an error of the flush."""
        head = _MAGIC + generation.to_bytes(8, "big")
        try:
            os.pwrite(self.fd, head + xxhash.xxh3_64_intdigest(head).to_bytes(8, "big"), 0)
            if sync:
                os.fdatasync(self.fd)
        except OSError as exc:
            if not self._failed:
                log.warning("%s not written (%s): a WAL that loses synced records is not seen", self.path, exc)
            self._failed = True

    def close(self) -> None:
        os.close(self.fd)
