"""A clone against a plain bytearray model, driven by Hypothesis through the store and the registry (what
the server runs), including pointer flips while connections are open, and the lineage operations
(publish, snapshot, rollback, clone of a clone or of a snapshot, flatten, shrink and grow) between them.

The disk is 3 chunks and a bit (the last 4 KiB block is partial); the base has two versions that differ in
one chunk and mix data and holes, so unaligned writes, zeroes and trims hit every case: inside a block,
across blocks and chunks, over a hole, over the tail.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import hypothesis.strategies as st
from hypothesis import HealthCheck, given, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from nbdclone import errors
from nbdclone.store import Store, lineage
from nbdclone.store.chunks import CHUNK
from nbdclone.store.clone import EXTENT_HOLE_ZERO, Clone, _zero_blocks
from nbdclone.store.images import import_base
from nbdclone.store.lineage import publish_clone
from nbdclone.store.registry import Registry
from tests.helpers import make_image

BS = 4096
SIZE = 3 * CHUNK + 5 * BS + 1536
V1_DATA = [(0, BS + 100), (CHUNK + 3 * BS, BS), (3 * CHUNK + 5 * BS - 512, 1024)]
V2_DATA = [(0, BS + 100), (CHUNK, CHUNK), (3 * CHUNK + 5 * BS - 512, 1024)]


@st.composite
def ranges(draw: st.DrawFn) -> tuple[int, int]:
    offset = draw(st.integers(0, SIZE - 1))
    longest = draw(st.sampled_from([3 * BS, CHUNK + 2 * BS]))
    return offset, draw(st.integers(1, min(SIZE - offset, longest)))


class CloneMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.tmp = tempfile.TemporaryDirectory()
        root = Path(self.tmp.name)
        self.versions = {
            "1": make_image(root / "v1.raw", SIZE, V1_DATA, seed=1),
            "2": make_image(root / "v2.raw", SIZE, V2_DATA, seed=2),
        }
        self.store = Store(root / "store")
        import_base(self.store, "deb", root / "v1.raw")
        import_base(self.store, "deb", root / "v2.raw")
        self.store.create_clone("c", base="deb")
        self.registry = Registry(self.store)
        self.current = "1"
        self.version = "1"
        self.model = bytearray(self.versions["1"])
        self.under = self.versions["1"]  # what the clone reads where it has no writes (trim returns to it)
        self.follows = True  # until a lineage operation gives it a version of its own
        self.snaps: dict[str, bytes] = {}
        self.connections = 1
        self.clone: Clone = self.registry.acquire("c")

    def teardown(self) -> None:
        if hasattr(self, "registry"):
            self.registry.close_all()
            self.tmp.cleanup()

    @rule(r=ranges(), fill=st.integers(1, 255), fua=st.booleans())
    def write(self, r: tuple[int, int], fill: int, fua: bool) -> None:
        offset, length = r
        data = bytes((fill + i) % 256 for i in range(length))
        self.clone.pwrite(memoryview(data), offset, fua=fua)
        self.model[offset : offset + length] = data

    @rule(
        block=st.integers(0, SIZE // BS - 1),
        kinds=st.lists(st.sampled_from(["zero", "data", "zero-led", "one-byte"]), min_size=1, max_size=20),
        fua=st.booleans(),
    )
    def write_blocks(self, block: int, kinds: list[str], fua: bool) -> None:
        """Whole blocks, some all zeros, some only starting with a zero byte, some zeros but for one byte
        that the zero check's probes skip: the aligned write path."""
        kinds = kinds[: SIZE // BS - block]
        one = {
            "zero": bytes(BS),
            "data": b"\x5a" * BS,
            "zero-led": b"\0" + b"\x33" * (BS - 1),
            "one-byte": bytes(100) + b"\x01" + bytes(BS - 101),
        }
        data = b"".join(one[k] for k in kinds)
        self.clone.pwrite(memoryview(data), block * BS, fua=fua)
        self.model[block * BS : block * BS + len(data)] = data

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
        # reaches the end of the disk) to the base version the clone is on.
        offset, length = r
        end = offset + length
        first = -(-offset // BS) * BS
        last = SIZE if end == SIZE else end // BS * BS
        self.clone.trim(length, offset)
        if last > first:
            self.model[first:last] = self.under[first:last]

    @rule()
    def flush(self) -> None:
        self.clone.flush()

    @rule(version=st.sampled_from(["1", "2"]))
    def promote(self, version: str) -> None:
        # A flip never changes what open connections see.
        self.store.promote("deb", version)
        self.current = version

    @rule()
    def connect_another(self) -> None:
        assert self.registry.acquire("c") is self.clone  # joins the open clone, same version
        self.connections += 1

    @precondition(lambda self: getattr(self, "connections", 0) > 1)
    @rule()
    def disconnect_one(self) -> None:
        self.registry.release("c")
        self.connections -= 1

    @rule()
    def reconnect_all(self) -> None:
        for _ in range(self.connections):
            self.registry.release("c")
        self._reconnect()
        if self.follows:
            assert self.registry.version_of("c") == self.version

    def _disconnect(self) -> None:
        for _ in range(self.connections):
            self.registry.release("c")
        self.connections = 0

    def _reconnect(self) -> None:
        self.clone = self.registry.acquire("c")
        self.connections = 1
        if self.follows and self.current != self.version:  # a following clone moves; its writes are dropped
            self.version = self.current
            self.model = bytearray(self.versions[self.current])
            self.under = self.versions[self.current]

    def _read_clone(self, name: str) -> bytes:
        view = self.registry.acquire(name)
        buf = bytearray(view.size)
        view.pread_into(memoryview(buf), 0)
        self.registry.release(name)
        return bytes(buf)

    def _own(self) -> None:
        """The clone now reads a version of its own: what it read is under its (empty) overlay."""
        self.under = bytes(self.model)
        self.follows = False

    @rule(snap=st.sampled_from(["s1", "s2", "s3"]))
    def snapshot(self, snap: str) -> None:
        self._disconnect()
        if snap in self.snaps:
            try:
                lineage.snapshot(self.store, "c", snap)
                raise AssertionError("a second snapshot of one name was taken")
            except errors.SnapshotExists:
                pass
        else:
            lineage.snapshot(self.store, "c", snap)
            self.snaps[snap] = bytes(self.model)
            self._own()
        self._reconnect()

    @rule(snap=st.sampled_from(["s1", "s2", "s3"]))
    def rollback(self, snap: str) -> None:
        self._disconnect()
        if snap in self.snaps:
            lineage.rollback(self.store, "c", snap)
            self.model = bytearray(self.snaps[snap])
            self._own()
        else:
            try:
                lineage.rollback(self.store, "c", snap)
                raise AssertionError("rolled back to a snapshot that does not exist")
            except errors.SnapshotNotFound:
                pass
        self._reconnect()

    @precondition(lambda self: getattr(self, "snaps", None))
    @rule(data=st.data())
    def remove_snapshot(self, data: st.DataObject) -> None:
        """A snapshot goes while the clone is connected; what it reads does not change."""
        snap = data.draw(st.sampled_from(sorted(self.snaps)))
        lineage.remove_snapshot(self.store, "c", snap)
        del self.snaps[snap]

    @rule(data=st.data())
    def clone_of_clone(self, data: st.DataObject) -> None:
        """A new clone of the clone (closed) or of one of its snapshots reads exactly that, and removing it
        later changes nothing for the clone."""
        snap = data.draw(st.sampled_from([None, *sorted(self.snaps)]))
        self._disconnect()
        self.copies = getattr(self, "copies", 0) + 1
        name = f"k{self.copies}"
        lineage.create_from(self.store, name, "c" if snap is None else f"c@{snap}")
        assert self._read_clone(name) == (self.model if snap is None else self.snaps[snap])
        self.store.remove_clone(name)
        self._reconnect()

    @rule()
    def flatten(self) -> None:
        self._disconnect()
        lineage.flatten(self.store, "c")
        if self.follows:
            self._own()
        self._reconnect()

    @rule(size=st.sampled_from([BS, CHUNK, CHUNK + 512, 2 * CHUNK + 3 * BS, SIZE - 512]))
    def shrink_and_grow(self, size: int) -> None:
        """Shrunk (the end is dropped) and grown back: the bytes past the cut read as zeros."""
        self._disconnect()
        try:
            lineage.resize(self.store, "c", size)
            raise AssertionError("shrunk without shrink=True")
        except errors.InvalidArgument:
            pass
        lineage.resize(self.store, "c", size, shrink=True)
        lineage.resize(self.store, "c", SIZE)
        self.model[size:] = bytes(SIZE - size)
        self._own()
        self._reconnect()

    @rule()
    def publish(self) -> None:
        """Its clients gone, the clone is published as a version of another base: a clone of that version
        reads exactly what the clone read (then the clone is connected again, as after reconnect_all)."""
        self._disconnect()
        _, vid, _ = publish_clone(self.store, "pub", "c")
        self.published = getattr(self, "published", 0) + 1
        name = f"p{self.published}"
        self.store.create_clone(name, base=f"pub@{vid}")
        assert self._read_clone(name) == self.model
        self._reconnect()

    @rule()
    def server_restart(self) -> None:
        """The server stops (or dies) with the clone open and starts again: its clients may come back, so the
        clone stays on its version whatever was promoted, with its writes; it moves only after its last
        connection closes while the server runs."""
        self.registry.close_all()
        self.registry = Registry(self.store)
        self.clone = self.registry.acquire("c")
        self.connections = 1
        if self.follows:
            assert self.registry.version_of("c") == self.version

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


@given(
    blocks=st.lists(
        st.one_of(
            st.just(bytes(BS)),
            st.binary(min_size=BS, max_size=BS),
            st.tuples(st.integers(0, BS - 1), st.integers(1, 255)).map(
                lambda pb: bytes(pb[0]) + bytes([pb[1]]) + bytes(BS - pb[0] - 1)
            ),
        ),
        min_size=1,
        max_size=40,
    )
)
def test_zero_blocks_finds_exactly_the_all_zero_blocks(blocks: list[bytes]) -> None:
    """The zero check probes a few bytes per block before comparing: it must still find every all-zero
    block and nothing else, whichever single byte of a block is the one that is not zero."""
    found = _zero_blocks(memoryview(b"".join(blocks)))
    assert found == [i for i, b in enumerate(blocks) if b == bytes(BS)]


TestClone = CloneMachine.TestCase
TestClone.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
