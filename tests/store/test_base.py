from __future__ import annotations

from pathlib import Path

import pytest

from nbdclone.store.base import BaseImage, Extent, ZeroBase
from tests.helpers import make_image

MiB = 1 << 20


@pytest.fixture
def base(tmp_path: Path) -> BaseImage:
    make_image(tmp_path / "b.raw", 8 * MiB, [(MiB, MiB), (4 * MiB, 8192)])
    return BaseImage(tmp_path / "b.raw")


def test_extents_follow_holes(base: BaseImage) -> None:
    assert base.extents(0, 8 * MiB) == [
        Extent(0, MiB, True),
        Extent(MiB, MiB, False),
        Extent(2 * MiB, 2 * MiB, True),
        Extent(4 * MiB, 8192, False),
        Extent(4 * MiB + 8192, 4 * MiB - 8192, True),
    ]


@pytest.mark.parametrize(
    ("offset", "length", "expected"),
    [
        pytest.param(MiB + 5, 10, [Extent(MiB + 5, 10, False)], id="inside-data"),
        pytest.param(MiB - 1, 2, [Extent(MiB - 1, 1, True), Extent(MiB, 1, False)], id="straddles-edge"),
        pytest.param(7 * MiB, MiB, [Extent(7 * MiB, MiB, True)], id="trailing-hole"),
    ],
)
def test_extents_of_a_window(base: BaseImage, offset: int, length: int, expected: list[Extent]) -> None:
    assert base.extents(offset, length) == expected


def test_zero_bitmap_marks_only_whole_hole_blocks(tmp_path: Path) -> None:
    make_image(tmp_path / "c.raw", 8 * 4096, [(4096, 4096), (5 * 4096, 4096)])
    b = BaseImage(tmp_path / "c.raw")
    assert b.zero_bitmap(0, 8, 4096) == bytes([1, 0, 1, 1, 1, 0, 1, 1])
    assert b.zero_bitmap(2, 4, 4096) == bytes([1, 1, 1, 0])


def test_pread_fills_buffer_and_zero_pads_past_end(tmp_path: Path) -> None:
    data = make_image(tmp_path / "d.raw", 10000, [(0, 10000)])
    b = BaseImage(tmp_path / "d.raw")
    buf = bytearray(4096)
    b.pread_into(memoryview(buf), 8192)
    assert buf == data[8192:] + bytes(4096 - (10000 - 8192))


def test_zero_base_reads_zeros() -> None:
    z = ZeroBase(1 << 30)
    buf = bytearray(b"x" * 100)
    z.pread_into(memoryview(buf), 12345)
    assert buf == bytes(100)
    assert z.extents(0, 1 << 30) == [Extent(0, 1 << 30, True)]
