"""Tests for wgx.protocol.replay (RFC 6479 window, as kernel WireGuard and wireguard-go)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from wgx.protocol.replay import (
    BITS_TOTAL,
    REJECT_AFTER_MESSAGES,
    RING_BLOCKS,
    WINDOW_SIZE,
    ReplayWindow,
)

W = WINDOW_SIZE


def test_constants() -> None:
    assert BITS_TOTAL == 8192
    assert RING_BLOCKS == 128
    assert WINDOW_SIZE == 8128
    assert REJECT_AFTER_MESSAGES == 0xFFFFFFFFFFFFDFFF


def test_counter_zero_first() -> None:
    w = ReplayWindow()
    assert w.greatest == 0
    assert w.would_accept(0)
    assert w.check_and_update(0)
    assert w.greatest == 0
    assert not w.would_accept(0)
    assert not w.check_and_update(0)


def test_fresh_and_duplicates() -> None:
    w = ReplayWindow()
    for c in range(1000):
        assert w.check_and_update(c)
    assert w.greatest == 999
    for c in range(1000):
        assert not w.check_and_update(c)


def test_out_of_order_within_window() -> None:
    w = ReplayWindow()
    assert w.check_and_update(5000)
    for c in (4999, 1, 0, 4000, 63, 64, 65, 127, 128):
        assert w.check_and_update(c)
        assert not w.check_and_update(c)
    assert w.greatest == 5000


def test_window_edge_exact_boundary() -> None:
    # Kernel: reject iff (WINDOW_SIZE + c + 1) < (greatest + 1); wireguard-go: reject iff
    # greatest - c > windowSize. Both: greatest - 8128 accepted, greatest - 8129 rejected.
    for g in (W + 1, 10_000, 2**20 + 37, 2**40 + 63, 2**40 + 64, REJECT_AFTER_MESSAGES - 1):
        w = ReplayWindow()
        assert w.check_and_update(g)
        assert not w.would_accept(g - W - 1)
        assert not w.check_and_update(g - W - 1)
        assert w.would_accept(g - W)
        assert w.check_and_update(g - W)
        assert not w.check_and_update(g - W)
        assert w.check_and_update(g - W + 1)
        assert w.greatest == g


def test_window_edge_from_empty() -> None:
    # With nothing received, any counter is fresh, no matter how far it is from 0.
    w = ReplayWindow()
    assert w.check_and_update(W)
    assert w.check_and_update(0)  # exactly W behind
    w = ReplayWindow()
    assert w.check_and_update(W + 1)
    assert not w.check_and_update(0)  # W + 1 behind


def test_far_jump_clears_old_blocks() -> None:
    w = ReplayWindow()
    for c in range(BITS_TOTAL):
        assert w.check_and_update(c)
    # Jump far ahead: the whole ring must be cleared, so counters that share ring slots
    # with the old ones are fresh.
    base = 10 * BITS_TOTAL
    assert w.check_and_update(base + BITS_TOTAL - 1)
    for c in range(base + 64, base + BITS_TOTAL - 1):
        assert w.check_and_update(c), c
    # Old ones are now far outside the window.
    assert not w.check_and_update(5)


def test_partial_jump_clears_only_passed_blocks() -> None:
    w = ReplayWindow()
    for c in range(0, 3000):
        assert w.check_and_update(c)
    assert w.check_and_update(3000 + 64 * 10)
    for c in range(3000 + 64 * 10 - W, 3000):
        assert not w.check_and_update(c)
    for c in range(3000, 3000 + 64 * 10):
        assert w.check_and_update(c)


def test_reject_after_messages() -> None:
    w = ReplayWindow()
    assert not w.would_accept(REJECT_AFTER_MESSAGES)
    assert not w.check_and_update(REJECT_AFTER_MESSAGES)
    assert not w.check_and_update(REJECT_AFTER_MESSAGES + 1)
    assert not w.check_and_update(2**64 - 1)
    assert not w.check_and_update(2**64)
    assert not w.check_and_update(-1)
    assert w.greatest == 0
    assert w.check_and_update(REJECT_AFTER_MESSAGES - 1)
    assert w.greatest == REJECT_AFTER_MESSAGES - 1
    assert not w.check_and_update(REJECT_AFTER_MESSAGES)


def test_reset() -> None:
    w = ReplayWindow()
    for c in (0, 1, 2, 50_000):
        assert w.check_and_update(c)
    w.reset()
    assert w.greatest == 0
    for c in (0, 1, 2, 50_000):
        assert w.check_and_update(c)


def test_would_accept_does_not_mark() -> None:
    w = ReplayWindow()
    assert w.would_accept(7)
    assert w.would_accept(7)
    assert w.greatest == 0
    assert w.check_and_update(7)
    assert not w.would_accept(7)


# Port of the Linux kernel's nonce counter self-test:
# drivers/net/wireguard/selftest/counter.c, wg_packet_counter_selftest() (GPL-2.0,
# Jason A. Donenfeld; read from torvalds/linux). T_LIM = COUNTER_WINDOW_SIZE + 1.
T_LIM = W + 1
R = REJECT_AFTER_MESSAGES
KERNEL_TABLE: list[tuple[int, bool]] = [
    (0, True),  # 1
    (1, True),  # 2
    (1, False),  # 3
    (9, True),  # 4
    (8, True),  # 5
    (7, True),  # 6
    (7, False),  # 7
    (T_LIM, True),  # 8
    (T_LIM - 1, True),  # 9
    (T_LIM - 1, False),  # 10
    (T_LIM - 2, True),  # 11
    (2, True),  # 12
    (2, False),  # 13
    (T_LIM + 16, True),  # 14
    (3, False),  # 15
    (T_LIM + 16, False),  # 16
    (T_LIM * 4, True),  # 17
    (T_LIM * 4 - (T_LIM - 1), True),  # 18
    (10, False),  # 19
    (T_LIM * 4 - T_LIM, False),  # 20
    (T_LIM * 4 - (T_LIM + 1), False),  # 21
    (T_LIM * 4 - (T_LIM - 2), True),  # 22
    (T_LIM * 4 + 1 - T_LIM, False),  # 23
    (0, False),  # 24
    (R, False),  # 25
    (R - 1, True),  # 26
    (R, False),  # 27
    (R - 1, False),  # 28
    (R - 2, True),  # 29
    (R + 1, False),  # 30
    (R + 2, False),  # 31
    (R - 2, False),  # 32
    (R - 3, True),  # 33
    (0, False),  # 34
]


def test_kernel_selftest_table() -> None:
    w = ReplayWindow()
    for num, (n, v) in enumerate(KERNEL_TABLE, start=1):
        assert w.would_accept(n) == v, f"kernel counter self-test {num}"
        assert w.check_and_update(n) == v, f"kernel counter self-test {num}"


def test_kernel_selftest_loops() -> None:
    w = ReplayWindow()
    for i in range(1, W + 1):
        assert w.check_and_update(i)
    assert w.check_and_update(0)
    assert not w.check_and_update(0)

    w = ReplayWindow()
    for i in range(2, W + 2):
        assert w.check_and_update(i)
    assert w.check_and_update(1)
    assert not w.check_and_update(0)

    w = ReplayWindow()
    for i in range(W, -1, -1):
        assert w.check_and_update(i)

    w = ReplayWindow()
    for i in range(W + 1, 0, -1):
        assert w.check_and_update(i)
    assert not w.check_and_update(0)

    w = ReplayWindow()
    for i in range(W, 0, -1):
        assert w.check_and_update(i)
    assert w.check_and_update(W + 1)
    assert not w.check_and_update(0)

    w = ReplayWindow()
    for i in range(W, 0, -1):
        assert w.check_and_update(i)
    assert w.check_and_update(0)
    assert w.check_and_update(W + 1)


# --- reference models -------------------------------------------------------------------


class SetModel:
    """Obvious model: a set of accepted counters plus the window rule."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.greatest: int | None = None

    def check(self, c: int) -> bool:
        if c < 0 or c >= REJECT_AFTER_MESSAGES or c in self.seen:
            return False
        if self.greatest is not None and c + W < self.greatest:
            return False
        self.seen.add(c)
        if self.greatest is None or c > self.greatest:
            self.greatest = c
        return True


class GoFilter:
    """Literal transliteration of wireguard-go replay/replay.go Filter.ValidateCounter."""

    def __init__(self) -> None:
        self.last = 0
        self.ring = [0] * 128

    def check(self, counter: int) -> bool:
        if counter >= REJECT_AFTER_MESSAGES:
            return False
        index_block = counter >> 6
        if counter > self.last:
            current = self.last >> 6
            diff = min(index_block - current, 128)
            for i in range(current + 1, current + diff + 1):
                self.ring[i & 127] = 0
            self.last = counter
        elif self.last - counter > W:
            return False
        index_block &= 127
        old = self.ring[index_block]
        new = old | (1 << (counter & 63))
        self.ring[index_block] = new
        return old != new


_step = st.one_of(
    st.tuples(st.just("rel"), st.integers(-W - 70, 200)),
    st.tuples(st.just("rel"), st.integers(-W - 2, -W + 2)),
    st.tuples(st.just("rel"), st.integers(200, 3 * BITS_TOTAL)),
    st.tuples(st.just("abs"), st.integers(0, 3 * BITS_TOTAL)),
    st.tuples(st.just("abs"), st.integers(R - 3 * BITS_TOTAL, R + 3)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_step, min_size=1, max_size=300))
def test_against_reference_models(steps: list[tuple[str, int]]) -> None:
    w = ReplayWindow()
    model = SetModel()
    go = GoFilter()
    for kind, x in steps:
        c = max(0, (model.greatest or 0) + x) if kind == "rel" else x
        expect = model.check(c)
        assert w.would_accept(c) == expect
        assert w.check_and_update(c) == expect, c
        assert go.check(c) == expect, c
        assert w.greatest == (model.greatest or 0)


_batch = st.one_of(
    # consecutive runs (the fastest path), anywhere
    st.tuples(st.integers(0, 3 * BITS_TOTAL), st.integers(1, 300)).map(
        lambda t: list(range(t[0], t[0] + t[1]))),
    # in-order runs (the fast path), possibly with gaps and far jumps
    st.tuples(st.integers(0, 3 * BITS_TOTAL), st.lists(st.integers(1, 3 * BITS_TOTAL),
                                                       min_size=1, max_size=40)).map(
        lambda t: [t[0] + sum(t[1][:i]) for i in range(len(t[1]))]),
    # anything: replays, reordering, duplicates inside the batch, values near the limit
    st.lists(st.one_of(st.integers(0, 4 * BITS_TOTAL),
                       st.integers(REJECT_AFTER_MESSAGES - 3, REJECT_AFTER_MESSAGES + 3)),
             max_size=40),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_batch, min_size=1, max_size=6))
def test_check_many_equals_sequential(batches: list[list[int]]) -> None:
    fast, slow = ReplayWindow(), ReplayWindow()
    for batch in batches:
        assert fast.check_many(batch) == [slow.check_and_update(c) for c in batch]
        assert fast._s == slow._s


def test_check_many_fast_path_marks_and_recycles() -> None:
    w = ReplayWindow()
    assert w.check_many([0, 1, 2, 64]) == [True] * 4
    assert w.check_many([1, 3, 64, 65]) == [False, True, False, True]
    # a run that spans more than the ring: its oldest counters fall out of the window
    run = [100 + 70 * i for i in range(200)]
    assert w.check_many(run) == [True] * 200
    assert not w.would_accept(run[0])
    assert not w.check_and_update(run[-1])
    assert w.check_and_update(run[-1] - 1)


def test_distrust_takes_everything_up_to_the_greatest_as_seen() -> None:
    """After a writer died mid-update (wgx.dataplane.sessions): nothing at or below the
    greatest passes, anything above it does, and the window goes on as before."""
    w = ReplayWindow()
    for c in (3, 70, 200):
        assert w.check_and_update(c)
    w.distrust()
    assert w.greatest == 200
    assert not any(w.would_accept(c) for c in (0, 4, 69, 150, 199, 200))
    assert w.check_and_update(201) and w.check_and_update(255) and w.check_and_update(256)
    assert not w.check_and_update(201)
    assert w.check_and_update(202)  # above the old greatest, in the same block: fresh
    empty = ReplayWindow()
    empty.distrust()
    assert empty.check_and_update(0)
