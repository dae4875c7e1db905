"""What changed between two states of a clone, from its maps and its overlay, without reading any data.

A state is a version (one of the clone's snapshots, or the version its overlay sits on) or the clone now
(that version, with its overlay on top). Two versions are compared by their maps, chunk by chunk by
content digest: a chunk whose digest differs is one 64 KiB extent, found a page of digests at a time
(pages that are equal are one comparison of their bytes, so a 1 TiB disk with little changed costs a few
milliseconds). The clone now adds the blocks its overlay changed (4 KiB each, written or zeroed). Each
extent says what the newer state reads there: data, or zeros.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nbdclone import errors
from nbdclone.store.catalog import CloneRecord, own_base_name, validate_name
from nbdclone.store.chunks import CHUNK, PAGE, PAGE_SHIFT, VersionMap
from nbdclone.store.clone import EXTENT_HOLE_ZERO
from nbdclone.store.images import open_clone_readonly
from nbdclone.store.overlay import BLOCK_SIZE

if TYPE_CHECKING:
    from nbdclone.store import Store

_STRIDE = 16  # chunks compared at once inside a page that differs
_NO_DIGESTS = bytes(16 * PAGE)  # a page a map lacks: every chunk all zeros


@dataclass(frozen=True, slots=True)
class Extent:
    offset: int
    length: int
    zero: bool  # the newer state reads zeros here


@dataclass(frozen=True, slots=True)
class Diff:
    since: str  # "snapshot NAME", "BASE@V", or "version V of its own" (a flattened or resized clone's)
    until: str  # the same, or "now"
    size: int  # the newer state's
    extents: list[Extent]

    @property
    def changed(self) -> int:
        return sum(e.length for e in self.extents)


def changed_chunks(old: VersionMap, new: VersionMap) -> Iterator[int]:
    """The chunks (below the larger map's end) whose content differs between two maps loaded with
    digests, in order."""
    assert old.digest_pages is not None and new.digest_pages is not None, "loaded without digests"
    stop = max(old.nchunks, new.nchunks)
    for p in sorted(old.digest_pages.keys() | new.digest_pages.keys()):
        a, b = old.digest_pages.get(p, _NO_DIGESTS), new.digest_pages.get(p, _NO_DIGESTS)
        if a == b:
            continue
        va, vb = memoryview(a), memoryview(b)
        for k in range(0, PAGE, _STRIDE):
            at = 16 * k
            if va[at : at + 16 * _STRIDE] != vb[at : at + 16 * _STRIDE]:
                for j in range(k, k + _STRIDE):
                    i = (p << PAGE_SHIFT) + j
                    if i < stop and va[16 * j : 16 * j + 16] != vb[16 * j : 16 * j + 16]:
                        yield i


def diff(store: Store, name: str, since: str | None = None, until: str | None = None) -> Diff:
    """The extents that differ between snapshot `since` (default: the version the clone's overlay sits on)
    and snapshot `until` (default: the clone now), and what `until` reads there."""
    record = store.get_clone(name)
    old_ref, old = _state(store, record, since)
    if until is not None:
        new_ref, new = _state(store, record, until)
        chunks = [(i * CHUNK, CHUNK) for i in changed_chunks(old, new)]
        return Diff(old_ref, new_ref, new.size, _kinds(_merge(chunks, new.size), lambda i: new.slot(i) < 0))
    now_ref, now = _state(store, record, None)
    clone = open_clone_readonly(store, name)
    try:
        ranges = [(i * CHUNK, CHUNK) for i in changed_chunks(old, now)] if now_ref != old_ref else []
        ranges += [(lo * BLOCK_SIZE, (hi - lo) * BLOCK_SIZE) for lo, hi in clone.changed_runs()]
        extents = []
        for off, length in _merge(sorted(ranges), clone.size):  # (a list of runs, not of blocks)
            end = off + length
            while off < end:  # what the clone reads there now (extents() may answer for less than asked)
                for at, n, kind in clone.extents(end - off, off):
                    n = min(n, end - at)
                    extents.append(Extent(at, n, kind == EXTENT_HOLE_ZERO))
                    off = at + n
        return Diff(old_ref, "now", clone.size, _joined(extents))
    finally:
        clone.close()
        clone.base.close()


def _state(store: Store, record: CloneRecord, snap: str | None) -> tuple[str, VersionMap]:
    """(how to name it, the map) of snapshot `snap` of the clone, or of the version its overlay sits on."""
    if snap is None:
        base, vid = store.clone_on(record)
        if base is None or vid is None:  # a blank clone: no version under its overlay
            return "nothing (a blank disk)", VersionMap(record.size)
        shown = store.catalog().bases[base]
        snapshot = shown.versions[vid].snapshot
        label = f"snapshot {snapshot}" if snapshot else f"version {vid} of its own" if shown.owner else f"{base}@{vid}"
        return label, store.version_map(shown, vid, digests=True)
    validate_name("snapshot", snap)
    own = store.catalog().bases.get(own_base_name(record))
    vid = own.snapshot(snap) if own is not None else None
    if own is None or vid is None:
        raise errors.SnapshotNotFound(clone=record.name, name=snap)
    return f"snapshot {snap}", store.version_map(own, vid, digests=True)


def _merge(ranges: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """Sorted (offset, length) ranges joined where they touch or overlap, cut at `size`."""
    out: list[tuple[int, int]] = []
    for off, length in ranges:
        end = min(off + length, size)
        if off >= end:
            continue
        if out and off <= out[-1][0] + out[-1][1]:
            last = out[-1]
            out[-1] = (last[0], max(last[0] + last[1], end) - last[0])
        else:
            out.append((off, end - off))
    return out


def _kinds(ranges: list[tuple[int, int]], zero: Callable[[int], bool]) -> list[Extent]:
    """Extents of whole-chunk ranges, split where the chunks' zero-ness (zero(i)) changes."""
    out = []
    for off, length in ranges:
        for i in range(off // CHUNK, -(-(off + length) // CHUNK)):
            at = max(off, i * CHUNK)
            out.append(Extent(at, min(off + length, (i + 1) * CHUNK) - at, zero(i)))
    return _joined(out)


def _joined(extents: list[Extent]) -> list[Extent]:
    out: list[Extent] = []
    for e in extents:
        if out and out[-1].zero == e.zero and out[-1].offset + out[-1].length == e.offset:
            out[-1] = Extent(out[-1].offset, out[-1].length + e.length, e.zero)
        else:
            out.append(e)
    return out
