"""Keypair state shared by the daemon and its workers: send counters and replay windows.

One anonymous shared mapping (created before the workers fork) holds a slot
per keypair: the next send counter and the RFC 6479 replay window
(wgx.protocol.replay's storage layout). Two processes never use a nonce twice
because counters are handed out in ranges under the slot's lock
(`reserve`), one lock round trip per batch; replay protection holds however
packets are spread over workers because every worker checks and marks the
same window under that lock (`accept`), again once per batch.

The invariant all of this serves: one (key, counter) pair is sent at most once.
A slot therefore belongs to one keypair from `allocate` until `settle` frees
it, and that happens only after both:
- the engine destroyed the keypair: the daemon `retire`s its slot with the pool's
  sync token of the removal it broadcast to the workers, and
- every live worker acknowledged that token, i.e. applied the removal and holds
  the keypair no more (a worker started later never had it).
A live or retiring slot is never handed out; past `limit` (sized by the daemon
for its peers: three keypairs each, plus room for the ones being retired)
`allocate` raises SlotsExhausted and the new keypair is refused and counted.
Freed slots are reused first, so the pages touched stay few; the mapping is
reserved for SLOT_CEILING slots without committing memory for them.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
from collections import deque
from collections.abc import Iterator, Sequence
from operator import lt

from wgx.protocol.peer import Keypair
from wgx.protocol.replay import STORAGE_LEN, ReplayWindow

SLOT_CEILING = 1 << 19  # 545 MB of address space; memory only for the slots touched
MIN_SLOTS = 1024
KEYPAIRS_PER_PEER = 3  # current, previous, next
_MAP_NORESERVE = 0x4000  # Linux; Python 3.11's mmap module does not name it
# [0] next send counter, [1] owner tag, [2] window being changed (see `_held`), [3:] window
_WORDS = 3 + STORAGE_LEN
_DIRTY = 2
log = logging.getLogger("wgx.sessions")
_ZERO_SLOT = memoryview(bytes(_WORDS * 8)).cast("Q")


class SlotsExhausted(RuntimeError):
    """Every slot within the limit is live or still being retired."""


def slots_for(peers: int) -> int:
    """The slot limit for `peers` peers: three keypairs each, and as many again in
    flight between the engine's release and the workers' acknowledgements."""
    return min(SLOT_CEILING, max(MIN_SLOTS, 2 * KEYPAIRS_PER_PEER * peers))


class SessionSlots:
    def __init__(self, slots: int = SLOT_CEILING, limit: int | None = None) -> None:
        self.slots = slots
        self.limit = min(limit or slots, slots)
        self._mm = mmap.mmap(-1, slots * _WORDS * 8,  # MAP_SHARED: survives fork
                             flags=mmap.MAP_SHARED | _MAP_NORESERVE)
        self._q = memoryview(self._mm).cast("Q")
        # One lock per slot: byte `slot` of this file, a POSIX record lock (see `_held`).
        self._lock_fd = os.memfd_create("wgx-session-locks", os.MFD_CLOEXEC)
        self.windows_recovered = 0  # in this process: see `_mark_window`
        # Ownership bookkeeping: the daemon's alone (workers never allocate).
        self._free: list[int] = []  # settled slots, reused last-in first-out
        self._high = 0  # slots [0, _high) were handed out at some time
        self.live: set[int] = set()
        self.retiring: deque[tuple[int, int]] = deque()  # (sync token, slot), tokens ascending
        self.refused = 0
        self._serial = 0  # the last owner tag handed out

    def __del__(self) -> None:
        # Unreachable, so no keypair holds a window or a lock here any more.
        with contextlib.suppress(AttributeError, OSError):
            os.close(self._lock_fd)

    def allocate(self) -> int:
        """A slot no keypair holds (daemon only), zeroed; SlotsExhausted past `limit`."""
        if len(self.live) + len(self.retiring) >= self.limit:
            self.refused += 1
            raise SlotsExhausted(f"{len(self.live)} live and {len(self.retiring)} retiring "
                                 f"session slots of {self.limit}")
        if self._free:
            slot = self._free.pop()
        elif self._high < self.slots:
            slot = self._high
            self._high += 1
        else:
            self.refused += 1
            raise SlotsExhausted(f"all {self.slots} session slots in use")
        base = slot * _WORDS
        self._serial += 1
        with self._held(slot):
            self._q[base : base + _WORDS] = _ZERO_SLOT
            self._q[base + 1] = self._serial
        self.live.add(slot)
        return slot

    def tag(self, slot: int) -> int:
        """The owner tag `allocate` wrote into `slot`: never 0, never the same twice. A
        keypair that passes its tag to `reserve` and `accept` is refused by a slot that
        was handed to another keypair since (the belt behind the ownership rules)."""
        return self._q[slot * _WORDS + 1]

    def retire(self, slot: int, token: int, tag: int = 0) -> bool:
        """The engine destroyed the keypair of `slot` (owner tag `tag`, if given), and the
        workers were told so with sync token `token`: the slot is freed once they all
        acknowledged it (`settle`). False, and nothing changes, if the slot is not live
        or belongs to another keypair by now (a late second removal)."""
        if slot not in self.live or (tag and self.tag(slot) != tag):
            return False
        if self.retiring and token < self.retiring[-1][0]:
            raise ValueError(f"sync token {token} after {self.retiring[-1][0]}")
        self.live.remove(slot)
        self.retiring.append((token, slot))
        return True

    def settle(self, token: int) -> int:
        """Every live worker acknowledged sync tokens up to `token`: free the slots
        retired with them. Returns how many were freed."""
        freed = 0
        while self.retiring and self.retiring[0][0] <= token:
            self._free.append(self.retiring.popleft()[1])
            freed += 1
        return freed

    def window(self, slot: int) -> ReplayWindow:
        """The shared replay window of `slot`; mutate it only under `lock(slot)`."""
        base = slot * _WORDS + 3
        return ReplayWindow(self._q[base : base + STORAGE_LEN])

    def send_counter(self, slot: int) -> int:
        return self._q[slot * _WORDS]

    def set_send_counter(self, slot: int, value: int) -> None:
        with self._held(slot):
            self._q[slot * _WORDS] = value

    @contextlib.contextmanager
    def _held(self, slot: int) -> Iterator[None]:
        """The slot's lock: a POSIX record lock on byte `slot` of a file shared since
        fork. The kernel lets it go when its holder dies (kill -9 included), and a
        holder that is only paused (SIGSTOP, a frozen cgroup) keeps it: the others
        wait. There is no timeout and no takeover, so two processes are never inside
        at once (before, a 1 s timeout took over the lock of a paused holder, which
        then sent with the counters it had read). Holders keep it for microseconds."""
        fcntl.lockf(self._lock_fd, fcntl.LOCK_EX, 1, slot)
        try:
            yield
        finally:
            fcntl.lockf(self._lock_fd, fcntl.LOCK_UN, 1, slot)

    def _mark_window(self, slot: int) -> None:
        """Under the lock, before changing the slot's replay window: if the last holder
        died in the middle of changing it (the mark is still set), the window may be
        half updated, so every counter up to its greatest is taken as seen (no replay
        can pass; a few late packets may be dropped), counted in `windows_recovered` and logged
        (once per crash). Then the mark is set; `_unmark_window` clears it."""
        base = slot * _WORDS
        if self._q[base + _DIRTY]:
            self.windows_recovered += 1
            log.warning("session slot %d: its replay window was being changed by a process "
                        "that died; every counter up to its greatest is now taken as seen", slot)
            self.window(slot).distrust()
        self._q[base + _DIRTY] = 1

    def _unmark_window(self, slot: int) -> None:
        self._q[slot * _WORDS + _DIRTY] = 0

    def reserve(self, slot: int, n: int, tag: int = 0) -> int | None:
        """Claim counters [first, first + n) for sending; returns first, or None if `tag`
        is given and the slot belongs to another keypair by now."""
        i = slot * _WORDS
        with self._held(slot):
            if tag and self._q[i + 1] != tag:
                return None
            first = self._q[i]
            self._q[i] = first + n
        return first

    def accept(self, slot: int, window: ReplayWindow, counters: Sequence[int],
               tag: int = 0) -> list[bool] | None:
        """Check-and-mark a batch of authenticated counters in one lock round trip; None
        if `tag` is given and the slot belongs to another keypair by now."""
        with self._held(slot):
            if tag and self._q[slot * _WORDS + 1] != tag:
                return None
            self._mark_window(slot)
            verdicts = window.check_many(counters)
            self._unmark_window(slot)
        return verdicts

    def accept_counting(self, slot: int, window: ReplayWindow, counters: Sequence[int],
                        tag: int = 0) -> tuple[list[bool], int] | None:
        """`accept`, plus how many were accepted below the greatest counter seen before
        them (arrived out of order, yet inside the window)."""
        with self._held(slot):
            if tag and self._q[slot * _WORDS + 1] != tag:
                return None
            self._mark_window(slot)
            top = window.greatest
            verdicts = window.check_many(counters)
            self._unmark_window(slot)
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
    """A Keypair whose send counter and replay window live in a `SessionSlots` slot.

    It keeps the send invariant of `Keypair.reserve` across processes: its slot must
    still carry its owner tag, and the counters it is handed must lie above every
    counter it was handed before; else it returns None and never sends again.
    """

    __slots__ = ("_slots", "_sent_below", "slot", "tag")

    def __init__(self, slots: SessionSlots, *args: object) -> None:
        self._slots = slots
        self.slot = slots.allocate()
        self.tag = slots.tag(self.slot)
        self._sent_below = 0  # every counter handed to this keypair is below this
        super().__init__(*args)  # type: ignore[arg-type]
        self.replay = slots.window(self.slot)

    @property  # type: ignore[override]
    def send_counter(self) -> int:
        return self._slots.send_counter(self.slot)

    @send_counter.setter
    def send_counter(self, value: int) -> None:
        self._slots.set_send_counter(self.slot, value)

    def reserve(self, n: int = 1) -> int | None:
        first = self._slots.reserve(self.slot, n, self.tag)
        if first is None or first < self._sent_below:
            return None
        self._sent_below = first + n
        return first

    def accept(self, counter: int) -> bool:
        verdicts = self._slots.accept(self.slot, self.replay, (counter,), self.tag)
        return verdicts is not None and verdicts[0]
