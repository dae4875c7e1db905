"""BlockStates against a plain bytearray with a byte per block (what a clone kept before)."""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import given

from nbdclone.store.overlay import BASE, DATA, ZEROED
from nbdclone.store.states import GROUP, BlockStates

NBLOCKS = 3 * GROUP + 123  # the last group is partial
blocks = st.integers(0, NBLOCKS - 1)
states = st.sampled_from([BASE, DATA, ZEROED])


@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("set"), blocks, st.just(0), states),
            st.tuples(st.just("fill"), blocks, st.integers(1, 2 * GROUP), states),
        ),
        max_size=30,
    ),
    probes=st.lists(st.tuples(blocks, st.integers(1, 2 * GROUP)), min_size=1, max_size=10),
)
def test_block_states_match_a_byte_per_block(
    ops: list[tuple[str, int, int, int]], probes: list[tuple[int, int]]
) -> None:
    model = bytearray(NBLOCKS)
    s = BlockStates(NBLOCKS)
    for kind, b, n, state in ops:
        if kind == "set":
            s[b] = state
            model[b] = state
        else:
            stop = min(NBLOCKS, b + n)
            s.fill(b, stop, state)
            model[b:stop] = bytes([state]) * (stop - b)
    for b, n in probes:
        stop = min(NBLOCKS, b + n)
        assert s[b] == model[b]
        for state in (BASE, DATA, ZEROED):
            assert s.count(state, b, stop) == model.count(state, b, stop)
            assert s.total(state) == model.count(state)
        assert s.all_base(b, stop) == (model.count(BASE, b, stop) == stop - b)
        end = next((i for i in range(b + 1, stop) if model[i] != model[b]), stop)
        assert s.run_end(b, stop) == end
        assert s.non_base(b, stop) == [(i, model[i]) for i in range(b, stop) if model[i] != BASE]
