"""A clone's per-block state (BASE, DATA, ZEROED), held only where the clone wrote.

    block >> GROUP_SHIFT -> bytearray(GROUP)    one byte per block of a 128 MiB group with a non-BASE block
    (no group)                                  every block of the group is BASE

An open clone used to keep a byte per block of the whole disk: a 4 TiB blank clone cost 1 GiB (and as much
again for the base's per-block zero map) while open. Now memory follows what the clone wrote: 32 KiB per
128 MiB group it touched, plus the dict. A group stays once made (a trim back to BASE keeps its bytes).
"""

from __future__ import annotations

import re

from nbdclone.store.overlay import BASE, DATA, ZEROED

GROUP_SHIFT = 15
GROUP = 1 << GROUP_SHIFT
_MASK = GROUP - 1
_OTHERS = {BASE: (DATA, ZEROED), DATA: (BASE, ZEROED), ZEROED: (BASE, DATA)}
_HELD = re.compile(rb"[^\x%02x]+" % BASE)  # a run of blocks that are not BASE


class BlockStates:
    __slots__ = ("groups", "nblocks")

    def __init__(self, nblocks: int) -> None:
        self.nblocks = nblocks
        self.groups: dict[int, bytearray] = {}

    def __getitem__(self, block: int) -> int:
        g = self.groups.get(block >> GROUP_SHIFT)
        return BASE if g is None else g[block & _MASK]

    def __setitem__(self, block: int, state: int) -> None:
        g = self.groups.get(block >> GROUP_SHIFT)
        if g is None:
            if state == BASE:
                return
            g = self.groups[block >> GROUP_SHIFT] = bytearray(GROUP)
        g[block & _MASK] = state

    def _spans(self, first: int, stop: int) -> list[tuple[int, int, int]]:
        """(group, start within it, end within it) covering blocks [first, stop)."""
        out = []
        while first < stop:
            gi = first >> GROUP_SHIFT
            end = min(stop, (gi + 1) << GROUP_SHIFT)
            out.append((gi, first & _MASK, end - (gi << GROUP_SHIFT)))
            first = end
        return out

    def slice(self, first: int, stop: int) -> bytes:
        """The states of blocks [first, stop), a byte each."""
        if first >> GROUP_SHIFT == (stop - 1) >> GROUP_SHIFT:
            g = self.groups.get(first >> GROUP_SHIFT)
            return bytes(stop - first) if g is None else bytes(g[first & _MASK : ((stop - 1) & _MASK) + 1])
        spans = self._spans(first, stop)
        return b"".join(self.slice((gi << GROUP_SHIFT) + lo, (gi << GROUP_SHIFT) + hi) for gi, lo, hi in spans)

    def fill(self, first: int, stop: int, state: int) -> None:
        for gi, lo, hi in self._spans(first, stop):
            g = self.groups.get(gi)
            if g is None:
                if state == BASE:
                    continue
                g = self.groups[gi] = bytearray(GROUP)
            g[lo:hi] = bytes([state]) * (hi - lo)

    def count(self, state: int, first: int, stop: int) -> int:
        n = 0
        for gi, lo, hi in self._spans(first, stop):
            g = self.groups.get(gi)
            if g is None:
                n += hi - lo if state == BASE else 0
            else:
                n += g.count(state, lo, hi)
        return n

    def all_base(self, first: int, stop: int) -> bool:
        if first >> GROUP_SHIFT == (stop - 1) >> GROUP_SHIFT:  # the common case: inside one group
            g = self.groups.get(first >> GROUP_SHIFT)
            return g is None or g.count(BASE, first & _MASK, ((stop - 1) & _MASK) + 1) == stop - first
        return self.count(BASE, first, stop) == stop - first

    def run_end(self, i: int, stop: int) -> int:
        """The first block after i, before stop, whose state differs from block i's (or stop)."""
        state = self[i]
        for gi, lo, hi in self._spans(i, stop):
            g = self.groups.get(gi)
            if g is None:
                if state != BASE:
                    return (gi << GROUP_SHIFT) + lo
                continue
            end = hi
            for other in _OTHERS[state]:
                at = g.find(other, lo, end)
                if at != -1:
                    end = at
            if end < hi:
                return (gi << GROUP_SHIFT) + end
        return stop

    def non_base(self, first: int, stop: int) -> list[tuple[int, int]]:
        """(block, state) of every block of [first, stop) that is not BASE, in order: only groups held are
        looked at, so a trim or zero of a whole large disk costs what the clone wrote."""
        out: list[tuple[int, int]] = []
        for gi in sorted(self.groups):
            lo, hi = max(first, gi << GROUP_SHIFT), min(stop, (gi + 1) << GROUP_SHIFT)
            if lo >= hi:
                continue
            g = self.groups[gi]
            base = gi << GROUP_SHIFT
            for b in range(lo, hi):
                s = g[b - base]
                if s != BASE:
                    out.append((b, s))
        return out

    def non_base_runs(self, first: int, stop: int) -> list[tuple[int, int]]:
        """(start, stop) of each run of blocks of [first, stop) that are not BASE, in order (runs that meet
        at a group's edge stay two): found in each held group's bytes by a regular expression, not block
        by block, so a clone that wrote all over a large disk costs its groups, not its blocks."""
        out: list[tuple[int, int]] = []
        for gi in sorted(self.groups):
            lo, hi = max(first, gi << GROUP_SHIFT), min(stop, (gi + 1) << GROUP_SHIFT)
            if lo >= hi:
                continue
            base = gi << GROUP_SHIFT
            out += [(base + m.start(), base + m.end()) for m in _HELD.finditer(self.groups[gi], lo - base, hi - base)]
        return out

    def total(self, state: int) -> int:
        held = sum(g.count(state) for g in self.groups.values())
        if state == BASE:  # blocks of groups not held; the last group's bytes past the disk cancel out
            held += self.nblocks - len(self.groups) * GROUP
        return held
