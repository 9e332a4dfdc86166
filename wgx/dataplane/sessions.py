"""Keypair state shared by the daemon and its workers: send counters and replay windows.

One anonymous shared mapping (created before the workers fork) holds a slot
per keypair: the next send counter and the RFC 6479 replay window
(wgx.protocol.replay's storage layout). Two processes never use a nonce twice
because counters are handed out in ranges under the slot's lock
(`reserve`), one lock round trip per batch; replay protection holds however
packets are spread over workers because every worker checks and marks the
same window under that lock (`accept`), again once per batch.

Slots are handed out round-robin by the daemon, so a slot is reused only
after `SLOTS` newer keypairs: long after every worker dropped the old one.
"""

from __future__ import annotations

import contextlib
import mmap
import multiprocessing
from collections.abc import Iterator, Sequence
from operator import lt

from wgx.protocol.peer import Keypair
from wgx.protocol.replay import STORAGE_LEN, ReplayWindow

SLOTS = 1024
LOCKS = 64
LOCK_TIMEOUT = 1.0
_WORDS = 1 + STORAGE_LEN  # [0] next send counter, [1:] replay window storage


class SessionSlots:
    def __init__(self, slots: int = SLOTS) -> None:
        self.slots = slots
        self._mm = mmap.mmap(-1, slots * _WORDS * 8)  # MAP_SHARED: survives fork
        self._q = memoryview(self._mm).cast("Q")
        ctx = multiprocessing.get_context("fork")
        self._locks = [ctx.Lock() for _ in range(LOCKS)]
        self._next = 0

    def allocate(self) -> int:
        """A fresh slot (daemon only), zeroed."""
        slot = self._next
        self._next = (slot + 1) % self.slots
        base = slot * _WORDS
        with self._held(slot):
            for i in range(_WORDS):
                self._q[base + i] = 0
        return slot

    def window(self, slot: int) -> ReplayWindow:
        """The shared replay window of `slot`; mutate it only under `lock(slot)`."""
        base = slot * _WORDS + 1
        return ReplayWindow(self._q[base : base + STORAGE_LEN])

    def send_counter(self, slot: int) -> int:
        return self._q[slot * _WORDS]

    def set_send_counter(self, slot: int, value: int) -> None:
        with self._held(slot):
            self._q[slot * _WORDS] = value

    @contextlib.contextmanager
    def _held(self, slot: int) -> Iterator[None]:
        """The slot's lock. Holders keep it for microseconds; one that does not let go
        within LOCK_TIMEOUT was killed while holding it (kill -9 of a worker), so the
        lock is taken over instead of deadlocking every other process."""
        lock = self._locks[slot % LOCKS]
        if not lock.acquire(timeout=LOCK_TIMEOUT):
            with contextlib.suppress(ValueError):
                lock.release()
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def reserve(self, slot: int, n: int) -> int:
        """Claim counters [first, first + n) for sending; returns first."""
        i = slot * _WORDS
        with self._held(slot):
            first = self._q[i]
            self._q[i] = first + n
        return first

    def accept(self, slot: int, window: ReplayWindow, counters: Sequence[int]) -> list[bool]:
        """Check-and-mark a batch of authenticated counters in one lock round trip."""
        with self._held(slot):
            return window.check_many(counters)

    def accept_counting(self, slot: int, window: ReplayWindow,
                        counters: Sequence[int]) -> tuple[list[bool], int]:
        """`accept`, plus how many were accepted below the greatest counter seen before
        them (arrived out of order, yet inside the window)."""
        with self._held(slot):
            top = window.greatest
            verdicts = window.check_many(counters)
        if not counters or (counters[0] > top and all(map(lt, counters, counters[1:]))):
            return verdicts, 0  # the usual batch: in order, ahead of the window
        late = 0
        for c, fresh in zip(counters, verdicts, strict=True):
            if fresh:
                if c < top:
                    late += 1
                else:
                    top = c
        return verdicts, late


class SharedKeypair(Keypair):
    """A Keypair whose send counter and replay window live in a `SessionSlots` slot."""

    __slots__ = ("_slots", "slot")

    def __init__(self, slots: SessionSlots, *args: object) -> None:
        self._slots = slots
        self.slot = slots.allocate()
        super().__init__(*args)  # type: ignore[arg-type]
        self.replay = slots.window(self.slot)

    @property  # type: ignore[override]
    def send_counter(self) -> int:
        return self._slots.send_counter(self.slot)

    @send_counter.setter
    def send_counter(self, value: int) -> None:
        self._slots.set_send_counter(self.slot, value)

    def reserve(self, n: int = 1) -> int:
        return self._slots.reserve(self.slot, n)

    def accept(self, counter: int) -> bool:
        return self._slots.accept(self.slot, self.replay, (counter,))[0]
