"""A clone: a read-only base under a writable overlay, addressed in bytes, stored in blocks.

    client request (any offset, any length)
          |
    [ state: one byte per block ]  BASE: read the base   DATA: read the overlay   ZEROED: reads as zeros
          |                    \\
    overlay (per clone)           base (shared, read-only)

The state array is built from the overlay's map at open, so a read of blocks the clone never wrote is one
base read with no database lookup, and a run of written blocks is one read of the overlay's data file.
A write is one overlay write of whole blocks (a partial block is merged with what it reads as now, under
the clone's lock so two partial writes to one block cannot lose each other's bytes) and, only for blocks
whose state changes, one batch of map changes. All-zero blocks become zero markers, or nothing where the
base block is a hole, so a zeroed clone stays small and its extents stay sparse.
"""

from __future__ import annotations

from dataclasses import dataclass

from nbdclone.store.base import Base
from nbdclone.store.overlay import BASE, BLOCK_SIZE, DATA, ZEROED, Move, Overlay
from nbdclone.store.states import GROUP, GROUP_SHIFT, BlockStates

_ZERO_BLOCK = bytes(BLOCK_SIZE)
_SHIFT = BLOCK_SIZE.bit_length() - 1
_MASK = BLOCK_SIZE - 1
_GMASK = GROUP - 1
_ZERO_PIECE = 1 << 30
#: Bytes of each block looked at before comparing the whole block with zeros: spread out, none at the start
#: of a 512-byte sector (where small integers and fio's offsets put zero bytes): 342, 257, 171, 511 into one.
_PROBES = (BLOCK_SIZE // 3 + 1, BLOCK_SIZE // 2 + 257, 2 * BLOCK_SIZE // 3 + 1, BLOCK_SIZE - 1)
assert 1 << _SHIFT == BLOCK_SIZE

#: Extent types, as NBD (and nbdkit) number them.
EXTENT_DATA = 0
EXTENT_HOLE_ZERO = 3

#: extents() stops after this many entries; NBD lets a reply cover less than was asked.
MAX_EXTENTS = 4096


@dataclass(frozen=True, slots=True)
class CloneUsage:
    data_blocks: int
    zero_blocks: int
    bytes_written: int


class Clone:
    def __init__(self, base: Base, overlay: Overlay, size: int) -> None:
        self.base = base
        self.overlay = overlay
        self.size = size
        self.nblocks = -(-size // BLOCK_SIZE)
        self._state = BlockStates(self.nblocks)
        for block, state in overlay.scan():
            if block < self.nblocks:
                self._state[block] = state
        self._lock = overlay.lock  # the overlay's: one lock orders every change of the clone (I5)

    # -- reads ---------------------------------------------------------------------------------------

    def pread_into(self, buf: memoryview, offset: int) -> None:
        n = len(buf)
        if not n:
            return
        first, stop = offset >> _SHIFT, ((offset + n - 1) >> _SHIFT) + 1
        # The hot path: blocks the clone never wrote are one base read, with no database lookup.
        if stop - first == 1:
            g = self._state.groups.get(first >> GROUP_SHIFT)
            if g is None or g[first & _GMASK] == BASE:
                self.base.pread_into(buf, offset)
                return
        elif self._state.all_base(first, stop):
            self.base.pread_into(buf, offset)
            return
        with self._lock:
            self._read_runs(buf, offset, first, stop)

    def _read_runs(self, buf: memoryview, offset: int, first: int, stop: int) -> None:
        end = offset + len(buf)
        i = first
        while i < stop:
            j = self._state.run_end(i, stop)
            lo, hi = max(offset, i * BLOCK_SIZE), min(end, j * BLOCK_SIZE)
            dst = buf[lo - offset : hi - offset]
            kind = self._state[i]
            if kind == BASE:
                self.base.pread_into(dst, lo)
            elif kind == ZEROED:
                dst[:] = bytes(hi - lo)
            else:
                self.overlay.read(dst, lo)
            i = j

    def _block(self, block: int) -> bytearray:
        """What `block` reads as now. Caller holds the lock."""
        buf = bytearray(BLOCK_SIZE)
        kind = self._state[block]
        if kind == DATA:
            self.overlay.read(memoryview(buf), block << _SHIFT)
        elif kind == BASE:
            self.base.pread_into(memoryview(buf), block << _SHIFT)
        return buf

    # -- writes --------------------------------------------------------------------------------------

    def pwrite(self, buf: memoryview, offset: int, *, fua: bool = False) -> None:
        length = len(buf)
        if (offset | length) & _MASK or not length:
            self._modify(offset, length, buf, fua=fua)
            return
        if length == BLOCK_SIZE and (buf[_PROBES[0]] or buf[_PROBES[1]] or buf[_PROBES[2]] or buf[_PROBES[3]]):
            # The hottest path: one block, not all zeros (a probed byte is set). The state's group is looked
            # up inline (BlockStates' methods cost 0.3 us a call here).
            block = offset >> _SHIFT
            groups = self._state.groups
            with self._lock:
                g = groups.get(block >> GROUP_SHIFT)
                if g is None:
                    g = groups[block >> GROUP_SHIFT] = bytearray(GROUP)
                old = g[block & _GMASK]
                self.overlay.update((buf,), offset, ((block, old, DATA),) if old != DATA else (), written=BLOCK_SIZE)
                g[block & _GMASK] = DATA
            if fua:
                self.overlay.flush()
            return
        zeros = _zero_blocks(buf)
        if zeros:
            self._modify(offset, length, buf, fua=fua, zeros=zeros)
            return
        # The hot path: whole blocks, none of them all zeros.
        first, stop = offset >> _SHIFT, (offset + length) >> _SHIFT
        state = self._state
        with self._lock:
            now = state.slice(first, stop)
            if now.count(DATA) != stop - first:
                moves = [(first + i, s, DATA) for i, s in enumerate(now) if s != DATA]
            else:
                moves = []
            self.overlay.update((buf,), offset, moves, written=length)
            state.fill(first, stop, DATA)
        if fua:
            self.overlay.flush()

    def zero(self, length: int, offset: int, *, fua: bool = False) -> None:
        # In pieces of at most 1 GiB: a zero of a whole large disk keeps per-request arrays small.
        end = offset + length
        while end - offset > _ZERO_PIECE:
            piece = _ZERO_PIECE - (offset & _MASK)
            self._modify(offset, piece, None, fua=False)
            offset += piece
        self._modify(offset, end - offset, None, fua=fua)

    def _modify(
        self, offset: int, length: int, buf: memoryview | None, *, fua: bool, zeros: list[int] | None = None
    ) -> None:
        """Make [offset, offset + length) read as `buf` (or as zeros, if None). `zeros`: the all-zero blocks
        of `buf`, where the caller found them already (whole blocks only)."""
        if not length:
            return
        end = offset + length
        first, stop = offset >> _SHIFT, ((end - 1) >> _SHIFT) + 1
        n = stop - first
        with self._lock:
            # New contents: a merged head block, the blocks the request covers whole, a merged tail block.
            head = self._merged(first, offset, end, buf) if offset & _MASK else None
            tail = self._merged(stop - 1, offset, end, buf) if end & _MASK and (head is None or n > 1) else None
            lo, hi = first + (head is not None), stop - (tail is not None)
            middle = None if buf is None or lo >= hi else buf[(lo << _SHIFT) - offset : (hi << _SHIFT) - offset]
            zero = bytearray(n)  # 1 for each block whose new content is all zeros
            if head is not None and head == _ZERO_BLOCK:
                zero[0] = 1
            if tail is not None and tail == _ZERO_BLOCK:
                zero[n - 1] = 1
            if buf is None:
                zero[lo - first : hi - first] = b"\1" * (hi - lo)
            elif middle is not None:
                for k in _zero_blocks(middle) if zeros is None else zeros:
                    zero[lo - first + k] = 1
            nzero = zero.count(1)
            state = self._state
            moves: list[Move] = []
            base_zero = self.base.zero_bitmap(first, n, BLOCK_SIZE) if nzero else b""
            if buf is None and head is None and tail is None and base_zero.count(1) == n:
                # Zeroing whole blocks over base holes: only the blocks the clone holds change (a blank disk's
                # whole-device zero costs what the clone wrote, not its size).
                moves = [(b, s, BASE) for b, s in state.non_base(first, stop)]
            elif nzero or state.count(DATA, first, stop) != n:  # else: rewriting written blocks, no map change
                stored = buf is not None and 0 < nzero < n  # zero blocks' bytes go to the data file too
                for i in range(n):
                    b = first + i
                    new = (BASE if base_zero[i] else ZEROED) if zero[i] else DATA
                    if new != state[b] or (stored and zero[i]):  # the latter: only their bytes are released
                        moves.append((b, state[b], new))
            if buf is not None:  # one update for the whole request
                pieces = [p for p in (head, middle, tail) if p is not None] if nzero < n else []
                self.overlay.update(pieces, first << _SHIFT, moves, written=length)
            else:  # a zero request: only a partial head or tail can hold data, each stored with its move
                for block, piece in ((first, head), (stop - 1, tail)):
                    if piece is not None and not zero[block - first]:
                        mine = [m for m in moves if m[0] == block]
                        self.overlay.update((piece,), block << _SHIFT, mine, written=0)
                        state[block] = DATA
                        moves = [m for m in moves if m[0] != block]
                self.overlay.update((), 0, moves, written=length)
            for b, _, new in moves:
                state[b] = new
        if fua:
            self.overlay.flush()

    def _merged(self, block: int, offset: int, end: int, buf: memoryview | None) -> bytearray:
        """`block` as it reads now, with the request's part of it laid over."""
        start = block << _SHIFT
        merged = self._block(block)
        a, b = max(offset, start), min(end, start + BLOCK_SIZE)
        merged[a - start : b - start] = bytes(b - a) if buf is None else buf[a - offset : b - offset]
        return merged

    def trim(self, length: int, offset: int, *, fua: bool = False) -> None:
        """Drop the clone's copies of whole blocks in the range: they read from the base again.

        NBD makes trim a hint whose range may read as anything afterwards; returning the block to the
        base frees its overlay space, which is what the guest asked for.
        """
        first = -(-offset // BLOCK_SIZE)
        stop = (offset + length) // BLOCK_SIZE
        if offset + length == self.size:
            stop = self.nblocks
        with self._lock:
            state = self._state
            moves: list[Move] = [(b, s, BASE) for b, s in state.non_base(first, stop)]
            if moves:
                self.overlay.update((), 0, moves, written=0)
            for b, _, _ in moves:
                state[b] = BASE
        if fua:
            self.overlay.flush()

    def flush(self) -> None:
        self.overlay.flush()

    # -- maps ----------------------------------------------------------------------------------------

    def extents(self, length: int, offset: int) -> list[tuple[int, int, int]]:
        """(offset, length, type) covering at least the start of [offset, offset + length)."""
        end = offset + length
        out: list[tuple[int, int, int]] = []

        def add(off: int, n: int, kind: int) -> None:
            if out and out[-1][2] == kind and out[-1][0] + out[-1][1] == off:
                out[-1] = (out[-1][0], out[-1][1] + n, kind)
            else:
                out.append((off, n, kind))

        first, stop = offset // BLOCK_SIZE, (end - 1) // BLOCK_SIZE + 1
        i = first
        while i < stop and len(out) < MAX_EXTENTS:
            j = self._state.run_end(i, stop)
            lo, hi = max(offset, i * BLOCK_SIZE), min(end, j * BLOCK_SIZE)
            kind = self._state[i]
            if kind == BASE:
                for ext in self.base.extents(lo, hi - lo):
                    add(ext.offset, ext.length, EXTENT_HOLE_ZERO if ext.zero else EXTENT_DATA)
            else:
                add(lo, hi - lo, EXTENT_DATA if kind == DATA else EXTENT_HOLE_ZERO)
            i = j
        return out

    def prefetch(self, length: int, offset: int) -> None:
        self.base.prefetch(offset, length)

    def usage(self) -> CloneUsage:
        return CloneUsage(
            data_blocks=self._state.total(DATA),
            zero_blocks=self._state.total(ZEROED),
            bytes_written=self.overlay.bytes_written(),
        )

    def changed_runs(self) -> list[tuple[int, int]]:
        """(first block, stop block) of each run of blocks that do not read as the base (written or
        zeroed), in order."""
        return self._state.non_base_runs(0, self.nblocks)

    def changed_chunks(self, chunk: int) -> set[int]:
        """The indices of the `chunk`-byte pieces holding a block that does not read as the base."""
        per = chunk // BLOCK_SIZE
        return {i for lo, hi in self.changed_runs() for i in range(lo // per, (hi - 1) // per + 1)}

    def close(self) -> None:
        self.overlay.close()


def _zero_blocks(view: memoryview) -> list[int]:
    """Indices of the all-zero blocks in `view` (whole blocks).

    Only blocks whose bytes at every probe position are zero are compared in full (comparing a memoryview to
    bytes does not use memcmp, so each candidate is copied). Checking only a block's first byte is not
    enough: fio, like much real data, starts most blocks with a zero byte (an offset, little-endian), and
    copying and comparing every block cost 90 us per 1 MiB write.
    """
    if len(view) == BLOCK_SIZE:
        if view[_PROBES[0]] or view[_PROBES[1]] or view[_PROBES[2]] or view[_PROBES[3]]:
            return []
        return [0] if view.tobytes() == _ZERO_BLOCK else []
    # A byte-wise OR of the probed bytes of every block, in C: one big integer per probe position.
    acc = 0
    for p in _PROBES:
        acc |= int.from_bytes(view[p::BLOCK_SIZE])
    probed = acc.to_bytes(len(view) >> _SHIFT)
    out = []
    k = probed.find(0)
    while k != -1:
        if view[k << _SHIFT : (k + 1) << _SHIFT].tobytes() == _ZERO_BLOCK:
            out.append(k)
        k = probed.find(0, k + 1)
    return out
