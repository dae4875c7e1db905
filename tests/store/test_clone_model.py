"""The clone against a plain bytearray model, driven by Hypothesis.

The disk is small (5 blocks and a 1.5 KiB tail, so the last block is partial) and its base mixes data and
holes, so unaligned writes, zeroes and trims hit every case: inside one block, across blocks, over a hole,
over the tail.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from nbdclone.store._rocks import RocksOverlay
from nbdclone.store.base import BaseImage
from nbdclone.store.clone import EXTENT_HOLE_ZERO, Clone
from tests.helpers import make_image

BS = 4096
SIZE = 5 * BS + 1536
BASE_DATA = [(0, BS + 100), (3 * BS, BS), (5 * BS + 512, 512)]


@st.composite
def ranges(draw: st.DrawFn) -> tuple[int, int]:
    offset = draw(st.integers(0, SIZE - 1))
    length = draw(st.integers(1, min(SIZE - offset, 3 * BS)))
    return offset, length


class CloneMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.tmp = tempfile.TemporaryDirectory()
        root = Path(self.tmp.name)
        self.model = bytearray(make_image(root / "base.raw", SIZE, BASE_DATA))
        self.base_bytes = bytes(self.model)
        self.base = BaseImage(root / "base.raw")
        self.path = root / "overlay"
        self.clone = Clone(self.base, RocksOverlay(self.path, create=True), SIZE)

    def teardown(self) -> None:
        if hasattr(self, "clone"):
            self.clone.close()
            self.base.close()
            self.tmp.cleanup()

    @rule(r=ranges(), fill=st.integers(1, 255), fua=st.booleans())
    def write(self, r: tuple[int, int], fill: int, fua: bool) -> None:
        offset, length = r
        data = bytes((fill + i) % 256 for i in range(length))
        self.clone.pwrite(memoryview(data), offset, fua=fua)
        self.model[offset : offset + length] = data

    @rule(r=ranges())
    def write_zeros(self, r: tuple[int, int]) -> None:
        offset, length = r
        self.clone.pwrite(memoryview(bytes(length)), offset)
        self.model[offset : offset + length] = bytes(length)

    @rule(r=ranges(), fua=st.booleans())
    def zero(self, r: tuple[int, int], fua: bool) -> None:
        offset, length = r
        self.clone.zero(length, offset, fua=fua)
        self.model[offset : offset + length] = bytes(length)

    @rule(r=ranges())
    def trim(self, r: tuple[int, int]) -> None:
        # nbdclone's trim returns every whole block of the range (and the partial tail block, if the range
        # reaches the end of the disk) to the base.
        offset, length = r
        end = offset + length
        first = -(-offset // BS) * BS
        last = SIZE if end == SIZE else end // BS * BS
        self.clone.trim(length, offset)
        if last > first:
            self.model[first:last] = self.base_bytes[first:last]

    @rule()
    def flush(self) -> None:
        self.clone.flush()

    @rule()
    def reopen(self) -> None:
        self.clone.close()
        self.clone = Clone(self.base, RocksOverlay(self.path), SIZE)

    @precondition(lambda self: hasattr(self, "clone"))
    @rule(r=ranges())
    def read_range(self, r: tuple[int, int]) -> None:
        offset, length = r
        buf = bytearray(length)
        self.clone.pread_into(memoryview(buf), offset)
        assert buf == self.model[offset : offset + length]

    @invariant()
    def reads_match_model(self) -> None:
        if hasattr(self, "clone"):
            buf = bytearray(SIZE)
            self.clone.pread_into(memoryview(buf), 0)
            assert buf == self.model

    @invariant()
    def zero_extents_read_as_zero(self) -> None:
        if not hasattr(self, "clone"):
            return
        pos = 0
        for off, length, kind in self.clone.extents(SIZE, 0):
            assert off == pos, "extents must be contiguous"
            if kind == EXTENT_HOLE_ZERO:
                assert self.model[off : off + length] == bytes(length)
            pos = off + length
        assert pos == SIZE


TestClone = CloneMachine.TestCase
TestClone.settings = settings(
    max_examples=150, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
