"""Shared session slots: counters and replay windows shared by forked processes."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from typing import Any

from wgx.dataplane import sessions
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


def _reserve_paused(slots: SessionSlots, slot: int, n: int, ready: Any, out: Any) -> None:
    """`SessionSlots.reserve`, stopped (SIGSTOP) inside the lock between reading the
    counter and writing it back: the test hook of issue 24 (the harness, not wgx)."""
    i = slot * sessions._WORDS
    with slots._held(slot):
        first = slots._q[i]
        ready.set()
        os.kill(os.getpid(), signal.SIGSTOP)
        slots._q[i] = first + n
    out.put(list(range(first, first + n)))


def _reserve_loop(slots: SessionSlots, slot: int, seconds: float, out: Any) -> None:
    got: list[int] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        first = slots.reserve(slot, 3)
        got += range(first, first + 3)
    out.put(got)


def test_a_paused_holder_is_waited_for_and_no_counter_is_handed_out_twice() -> None:
    """Issue 24: a worker stopped inside a reservation for longer than the old 1 s
    takeover timeout; the other waits for it instead of taking the lock over."""
    slots = SessionSlots(slots=8)
    slot = slots.allocate()
    ready, out = _ctx.Event(), _ctx.Queue()
    paused = _ctx.Process(target=_reserve_paused, args=(slots, slot, 5, ready, out))
    paused.start()
    assert ready.wait(10)
    other = _ctx.Process(target=_reserve_loop, args=(slots, slot, 1.5, out))
    other.start()
    time.sleep(2.5)  # the other is still waiting: longer than the old timeout
    assert slots.send_counter(slot) == 0
    os.kill(paused.pid, signal.SIGCONT)
    got = out.get(timeout=10) + out.get(timeout=10)
    paused.join(10)
    other.join(10)
    assert len(got) == len(set(got)) and len(got) > 5, got[:20]
    assert sorted(got) == list(range(slots.send_counter(slot)))


def _accept_paused(slots: SessionSlots, slot: int, ready: Any, out: Any) -> None:
    window = slots.window(slot)
    with slots._held(slot):
        fresh = window.would_accept(100)
        ready.set()
        os.kill(os.getpid(), signal.SIGSTOP)
        out.put([100] if fresh and window.check_and_update(100) else [])


def _accept_all(slots: SessionSlots, slot: int, counters: list[int], out: Any) -> None:
    verdicts = slots.accept(slot, slots.window(slot), counters)
    out.put([c for c, ok in zip(counters, verdicts, strict=True) if ok])


def test_a_paused_window_holder_is_waited_for_and_no_counter_is_accepted_twice() -> None:
    slots = SessionSlots(slots=8)
    slot = slots.allocate()
    ready, out = _ctx.Event(), _ctx.Queue()
    paused = _ctx.Process(target=_accept_paused, args=(slots, slot, ready, out))
    paused.start()
    assert ready.wait(10)
    other = _ctx.Process(target=_accept_all, args=(slots, slot, [99, 100, 101], out))
    other.start()
    time.sleep(1.5)
    assert other.is_alive()  # waiting, not taking over
    os.kill(paused.pid, signal.SIGCONT)
    got = out.get(timeout=10) + out.get(timeout=10)
    paused.join(10)
    other.join(10)
    assert sorted(got) == [99, 100, 101]  # 100 once, by whoever came first


def _die_holding(slots: SessionSlots, slot: int, in_window: bool, ready: Any) -> None:
    with slots._held(slot):
        if in_window:
            slots._mark_window(slot)  # killed in the middle of changing the window
        ready.set()
        time.sleep(60)


def test_a_killed_holder_releases_the_lock_at_once() -> None:
    """kill -9 of a holder: the kernel drops its lock; the others go on within 100 ms."""
    slots = SessionSlots(slots=8)
    slot = slots.allocate()
    assert slots.reserve(slot, 4) == 0
    ready = _ctx.Event()
    p = _ctx.Process(target=_die_holding, args=(slots, slot, False, ready))
    p.start()
    assert ready.wait(10)
    t0 = time.monotonic()
    os.kill(p.pid, signal.SIGKILL)
    assert slots.reserve(slot, 1) == 4
    assert time.monotonic() - t0 < 0.1
    p.join(10)
    assert slots.reserve(slot, 1) == 5


def test_a_window_left_half_changed_by_a_killed_holder_takes_every_counter_as_seen() -> None:
    slots = SessionSlots(slots=8)
    slot = slots.allocate()
    window = slots.window(slot)
    assert slots.accept(slot, window, [10, 20]) == [True, True]
    ready = _ctx.Event()
    p = _ctx.Process(target=_die_holding, args=(slots, slot, True, ready))
    p.start()
    assert ready.wait(10)
    os.kill(p.pid, signal.SIGKILL)
    p.join(10)
    # 15 was never seen, but the window cannot be trusted: refused, and counted.
    assert slots.accept(slot, window, [15, 21]) == [False, True]
    assert slots.windows_recovered == 1
    assert slots.accept(slot, window, [22]) == [True] and slots.windows_recovered == 1


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
