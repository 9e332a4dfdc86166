"""Shared session slots: counters and replay windows shared by forked processes."""

from __future__ import annotations

import multiprocessing
import os
import time

from wgx.dataplane.sessions import SessionSlots, SharedKeypair
from wgx.protocol.peer import Peer

_ctx = multiprocessing.get_context("fork")


def _reserve_many(slots: SessionSlots, slot: int, rounds: int, out: multiprocessing.Queue) -> None:
    got = [slots.reserve(slot, 3) for _ in range(rounds)]
    out.put(got)


def test_counter_ranges_never_overlap_across_processes() -> None:
    slots = SessionSlots(slots=8)
    slot = slots.allocate()
    q: multiprocessing.Queue = _ctx.Queue()
    procs = [_ctx.Process(target=_reserve_many, args=(slots, slot, 500, q)) for _ in range(3)]
    for p in procs:
        p.start()
    firsts = [f for _ in procs for f in q.get(timeout=30)]
    for p in procs:
        p.join(timeout=10)
    assert len(firsts) == len(set(firsts)) == 1500
    assert sorted(firsts) == list(range(0, 4500, 3))
    assert slots.send_counter(slot) == 4500


def _accept(slots: SessionSlots, slot: int, counters: list[int],
            out: multiprocessing.Queue) -> None:
    window = slots.window(slot)
    out.put(sum(slots.accept(slot, window, counters)))


def test_replay_window_is_shared_between_processes() -> None:
    """The same counters offered by two workers are accepted once in total."""
    slots = SessionSlots(slots=8)
    slot = slots.allocate()
    q: multiprocessing.Queue = _ctx.Queue()
    counters = list(range(2000))
    procs = [_ctx.Process(target=_accept, args=(slots, slot, counters, q)) for _ in range(2)]
    for p in procs:
        p.start()
    accepted = q.get(timeout=30) + q.get(timeout=30)
    for p in procs:
        p.join(timeout=10)
    assert accepted == 2000
    assert not slots.accept(slot, slots.window(slot), [5])[0]


def _die_holding(slots: SessionSlots, slot: int) -> None:
    slots._locks[slot % len(slots._locks)].acquire()
    os._exit(0)  # killed while holding the lock


def test_lock_of_a_dead_holder_is_taken_over() -> None:
    slots = SessionSlots(slots=8)
    slot = slots.allocate()
    p = _ctx.Process(target=_die_holding, args=(slots, slot))
    p.start()
    p.join(timeout=10)
    t0 = time.monotonic()
    assert slots.reserve(slot, 1) == 0  # does not hang
    assert time.monotonic() - t0 < 5
    assert slots.reserve(slot, 1) == 1


def test_shared_keypair_counts_in_its_slot() -> None:
    slots = SessionSlots(slots=8)
    kp = SharedKeypair(slots, Peer(os.urandom(32)), 1, 2, True, 0.0, os.urandom(32),
                       os.urandom(32))
    assert kp.reserve(4) == 0 and kp.reserve(1) == 4 and kp.send_counter == 5
    assert kp.accept(10) and not kp.accept(10)
    assert slots.window(kp.slot).greatest == 10


def test_accept_counting_counts_late_but_fresh_counters() -> None:
    slots = SessionSlots(slots=8)
    slot = slots.allocate()
    window = slots.window(slot)
    verdicts, late = slots.accept_counting(slot, window, [0, 1, 5, 3, 3, 4, 9, 2])
    assert verdicts == [True, True, True, True, False, True, True, True]
    assert late == 3  # 3, 4 and 2: fresh, below the greatest seen; the second 3 is a replay
    # the greatest carries over between batches; far behind the window is a replay
    verdicts, late = slots.accept_counting(slot, window, [8, 10, 7, 20000, 9, 100])
    assert verdicts == [True, True, True, True, False, False]
    assert late == 2


def test_a_slot_handed_to_another_keypair_refuses_the_old_one() -> None:
    """The owner tag: whatever the bookkeeping did, a keypair never reserves counters
    from, nor marks the window of, a slot that was allocated again since."""
    slots = SessionSlots(slots=1)
    old = SharedKeypair(slots, Peer(os.urandom(32)), 1, 2, True, 0.0, os.urandom(32),
                        os.urandom(32))
    assert old.reserve(5) == 0 and old.accept(7)
    assert slots.retire(old.slot, 1, old.tag) and slots.settle(1) == 1
    assert not slots.retire(old.slot, 2, old.tag)  # a second removal: nothing to do
    new = SharedKeypair(slots, Peer(os.urandom(32)), 3, 4, True, 0.0, os.urandom(32),
                        os.urandom(32))
    assert new.slot == old.slot and new.tag != old.tag
    assert old.reserve(1) is None and not old.accept(8)
    assert slots.reserve(old.slot, 1, old.tag) is None
    assert slots.accept_counting(old.slot, slots.window(old.slot), [9], old.tag) is None
    assert not slots.retire(new.slot, 3, old.tag)  # a late removal of the old one
    assert new.reserve(2) == 0 and new.accept(7)  # the new one starts afresh


def test_shared_keypair_refuses_a_counter_that_went_back() -> None:
    slots = SessionSlots(slots=8)
    kp = SharedKeypair(slots, Peer(os.urandom(32)), 1, 2, True, 0.0, os.urandom(32),
                       os.urandom(32))
    assert kp.reserve(10) == 0
    slots.set_send_counter(kp.slot, 4)
    assert kp.reserve(1) is None
