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

__all__ = [
    "BITS_TOTAL",
    "BLOCK_BITS",
    "REJECT_AFTER_MESSAGES",
    "RING_BLOCKS",
    "WINDOW_SIZE",
    "ReplayWindow",
]

BLOCK_BIT_LOG = 6
BLOCK_BITS = 1 << BLOCK_BIT_LOG  # 64, BITS_PER_LONG on 64-bit kernels
BITS_TOTAL = 8192  # COUNTER_BITS_TOTAL
RING_BLOCKS = BITS_TOTAL // BLOCK_BITS  # 128
WINDOW_SIZE = BITS_TOTAL - BLOCK_BITS  # COUNTER_WINDOW_SIZE = 8128
REJECT_AFTER_MESSAGES = 2**64 - 2**13 - 1

_BLOCK_MASK = RING_BLOCKS - 1
_BIT_MASK = BLOCK_BITS - 1


class ReplayWindow:
    """Sliding anti-replay window for one receiving keypair."""

    __slots__ = ("_last", "_ring")

    def __init__(self) -> None:
        # _last is the kernel's `counter->counter`: greatest accepted counter + 1, 0 = none.
        self._last: int = 0
        self._ring: list[int] = [0] * RING_BLOCKS

    def reset(self) -> None:
        """Forget everything (new keypair)."""
        self._last = 0
        self._ring = [0] * RING_BLOCKS

    @property
    def greatest(self) -> int:
        """Highest counter accepted so far (0 if none)."""
        last = self._last
        return last - 1 if last else 0

    def would_accept(self, counter: int) -> bool:
        """Same verdict as `check_and_update`, without marking anything."""
        if counter >= REJECT_AFTER_MESSAGES or counter < 0:
            return False
        pos = counter + 1
        last = self._last
        if pos > last:
            # Ahead of the window: bits above `last` are never set in the current block,
            # and any later block is cleared before use.
            return True
        if pos + WINDOW_SIZE < last:
            return False
        return not (self._ring[(pos >> BLOCK_BIT_LOG) & _BLOCK_MASK] >> (pos & _BIT_MASK)) & 1

    def check_and_update(self, counter: int) -> bool:
        """Return True if `counter` is fresh (and mark it seen), else False."""
        if counter >= REJECT_AFTER_MESSAGES or counter < 0:
            return False
        pos = counter + 1
        last = self._last
        ring = self._ring
        if pos > last:
            index = pos >> BLOCK_BIT_LOG
            current = last >> BLOCK_BIT_LOG
            top = index - current
            if top:
                if top >= RING_BLOCKS:
                    self._ring = ring = [0] * RING_BLOCKS
                else:
                    for i in range(current + 1, index + 1):
                        ring[i & _BLOCK_MASK] = 0
            self._last = pos
        elif pos + WINDOW_SIZE < last:
            return False
        slot = (pos >> BLOCK_BIT_LOG) & _BLOCK_MASK
        bit = 1 << (pos & _BIT_MASK)
        block = ring[slot]
        if block & bit:
            return False
        ring[slot] = block | bit
        return True
