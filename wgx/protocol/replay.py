"""RFC 6479 anti-replay sliding window, bit-for-bit the algorithm of WireGuard.

Contract: `ReplayWindow.check_and_update(counter)` returns True exactly when Linux
kernel WireGuard (drivers/net/wireguard/receive.c, `counter_validate`) would accept
that transport-data counter, and marks it as seen; False means replayed, too old or
too large. wireguard-go (replay/replay.go, `Filter.ValidateCounter`) accepts the same
set. Pure state machine: no I/O, no clock, no locking (one window per keypair, used
by one thread at a time).

Layout (as the kernel): a ring of RING_BLOCKS = 128 u64 blocks, BITS_TOTAL = 8192
bits, of which WINDOW_SIZE = 8192 - 64 = 8128 are usable. Like the kernel, the
internal position is `counter + 1`, so position 0 means "nothing received yet".

Window rule (derived from both implementations): with G the greatest accepted
counter, an unseen counter c is accepted iff c + WINDOW_SIZE >= G, i.e. G - 8128 is
still accepted and G - 8129 is rejected. Counters >= REJECT_AFTER_MESSAGES are
always rejected. Before any acceptance every counter below the limit is fresh.
"""

from __future__ import annotations

from collections.abc import MutableSequence, Sequence
from operator import lt

__all__ = [
    "BITS_TOTAL",
    "BLOCK_BITS",
    "REJECT_AFTER_MESSAGES",
    "RING_BLOCKS",
    "STORAGE_LEN",
    "WINDOW_SIZE",
    "ReplayWindow",
]

BLOCK_BIT_LOG = 6
BLOCK_BITS = 1 << BLOCK_BIT_LOG  # 64, BITS_PER_LONG on 64-bit kernels
BITS_TOTAL = 8192  # COUNTER_BITS_TOTAL
RING_BLOCKS = BITS_TOTAL // BLOCK_BITS  # 128
WINDOW_SIZE = BITS_TOTAL - BLOCK_BITS  # COUNTER_WINDOW_SIZE = 8128
REJECT_AFTER_MESSAGES = 2**64 - 2**13 - 1
STORAGE_LEN = 1 + RING_BLOCKS

_BLOCK_MASK = RING_BLOCKS - 1
_BIT_MASK = BLOCK_BITS - 1
_ALL_BITS = (1 << BLOCK_BITS) - 1


class ReplayWindow:
    """Sliding anti-replay window for one receiving keypair.

    The state lives in `storage`, RING_BLOCKS + 1 integers: [0] is the kernel's
    `counter->counter` (greatest accepted counter + 1, 0 = none), [1:] the ring.
    By default that is a private list; the XDP workers pass a `memoryview` cast
    to 'Q' over shared memory, so that all processes see one window (callers
    then serialize `check_and_update` with a lock).
    """

    __slots__ = ("_s",)

    def __init__(self, storage: MutableSequence[int] | None = None) -> None:
        if storage is None:
            storage = [0] * STORAGE_LEN
        elif len(storage) != STORAGE_LEN:
            raise ValueError(f"replay storage needs {STORAGE_LEN} slots")
        self._s = storage

    def reset(self) -> None:
        """Forget everything (new keypair)."""
        s = self._s
        for i in range(STORAGE_LEN):
            s[i] = 0

    def distrust(self) -> None:
        """Take every counter up to the greatest accepted one as seen, keeping the rest
        of the rules: for storage that may have been left half updated (its writer
        died). No replay can pass; late packets inside the window are refused."""
        s = self._s
        last = s[0]
        for i in range(1, STORAGE_LEN):
            s[i] = _ALL_BITS
        s[1 + ((last >> BLOCK_BIT_LOG) & _BLOCK_MASK)] = (2 << (last & _BIT_MASK)) - 1

    @property
    def greatest(self) -> int:
        """Highest counter accepted so far (0 if none)."""
        last = self._s[0]
        return last - 1 if last else 0

    def would_accept(self, counter: int) -> bool:
        """Same verdict as `check_and_update`, without marking anything."""
        if counter >= REJECT_AFTER_MESSAGES or counter < 0:
            return False
        pos = counter + 1
        s = self._s
        last = s[0]
        if pos > last:
            # Ahead of the window: bits above `last` are never set in the current block,
            # and any later block is cleared before use.
            return True
        if pos + WINDOW_SIZE < last:
            return False
        return not (s[1 + ((pos >> BLOCK_BIT_LOG) & _BLOCK_MASK)] >> (pos & _BIT_MASK)) & 1

    def check_and_update(self, counter: int) -> bool:
        """Return True if `counter` is fresh (and mark it seen), else False."""
        if counter >= REJECT_AFTER_MESSAGES or counter < 0:
            return False
        pos = counter + 1
        s = self._s
        last = s[0]
        if pos > last:
            index = pos >> BLOCK_BIT_LOG
            current = last >> BLOCK_BIT_LOG
            top = index - current
            if top:
                first = index - RING_BLOCKS + 1 if top >= RING_BLOCKS else current + 1
                for i in range(first, index + 1):
                    s[1 + (i & _BLOCK_MASK)] = 0
            s[0] = pos
        elif pos + WINDOW_SIZE < last:
            return False
        slot = 1 + ((pos >> BLOCK_BIT_LOG) & _BLOCK_MASK)
        bit = 1 << (pos & _BIT_MASK)
        block = s[slot]
        if block & bit:
            return False
        s[slot] = block | bit
        return True

    def check_many(self, counters: Sequence[int]) -> list[bool]:
        """`check_and_update` on each counter in order; the same verdicts and final state.

        A batch that is strictly increasing and entirely ahead of the window (the
        usual case: one flow, in order) is all fresh, so it costs one ring clear and
        one bit set per counter instead of the full check per counter.
        """
        n = len(counters)
        s = self._s
        if (n < 2 or counters[0] + 1 <= s[0] or counters[-1] >= REJECT_AFTER_MESSAGES
                or counters[0] < 0 or not all(map(lt, counters, counters[1:]))):
            return [self.check_and_update(c) for c in counters]
        top = (counters[-1] + 1) >> BLOCK_BIT_LOG
        current = s[0] >> BLOCK_BIT_LOG
        if top != current:
            first = top - RING_BLOCKS + 1 if top - current >= RING_BLOCKS else current + 1
            for i in range(first, top + 1):
                s[1 + (i & _BLOCK_MASK)] = 0
        oldest = top - RING_BLOCKS  # blocks at or below this one were recycled by the run
        lo, hi = counters[0] + 1, counters[-1] + 1
        if hi - lo == n - 1:  # consecutive: whole runs of bits per block
            for block in range(max(lo >> BLOCK_BIT_LOG, oldest + 1), top + 1):
                first = max(lo, block << BLOCK_BIT_LOG) & _BIT_MASK
                last = min(hi, (block << BLOCK_BIT_LOG) | _BIT_MASK) & _BIT_MASK
                s[1 + (block & _BLOCK_MASK)] |= ((1 << (last - first + 1)) - 1) << first
        else:
            for c in counters:
                pos = c + 1
                block = pos >> BLOCK_BIT_LOG
                if block > oldest:
                    s[1 + (block & _BLOCK_MASK)] |= 1 << (pos & _BIT_MASK)
        s[0] = counters[-1] + 1
        return [True] * n
