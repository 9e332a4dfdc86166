"""Protocol constants (whitepaper section 6) and the per-peer timer set.

`Timers` holds absolute deadlines (monotonic seconds, None when disarmed).
The engine arms and disarms them on protocol events, asks `next_deadline()`
and fires the expired ones from `expired(now)`. Nothing here reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

REKEY_AFTER_MESSAGES = 2**60
REJECT_AFTER_MESSAGES = 2**64 - 2**13 - 1
REKEY_AFTER_TIME = 120.0
REJECT_AFTER_TIME = 180.0
REKEY_ATTEMPT_TIME = 90.0
REKEY_TIMEOUT = 5.0
REKEY_TIMEOUT_JITTER_MAX = 1 / 3
KEEPALIVE_TIMEOUT = 10.0
MAX_TIMER_HANDSHAKES = int(REKEY_ATTEMPT_TIME / REKEY_TIMEOUT)
INITIATIONS_PER_SECOND = 50
MAX_STAGED_PACKETS = 128


@dataclass(slots=True)
class Limits:
    """The protocol's time and message limits; tests and soak runs may shrink them."""

    rekey_after_messages: int = REKEY_AFTER_MESSAGES
    reject_after_messages: int = REJECT_AFTER_MESSAGES
    rekey_after_time: float = REKEY_AFTER_TIME
    reject_after_time: float = REJECT_AFTER_TIME
    rekey_attempt_time: float = REKEY_ATTEMPT_TIME
    rekey_timeout: float = REKEY_TIMEOUT
    keepalive_timeout: float = KEEPALIVE_TIMEOUT

    @property
    def max_timer_handshakes(self) -> int:
        return int(self.rekey_attempt_time / self.rekey_timeout)


# Timer names, as in the kernel's timers.c.
RETRANSMIT_HANDSHAKE = "retransmit_handshake"
SEND_KEEPALIVE = "send_keepalive"
NEW_HANDSHAKE = "new_handshake"
ZERO_KEY_MATERIAL = "zero_key_material"
PERSISTENT_KEEPALIVE = "persistent_keepalive"
TIMER_NAMES = (
    RETRANSMIT_HANDSHAKE, SEND_KEEPALIVE, NEW_HANDSHAKE, ZERO_KEY_MATERIAL, PERSISTENT_KEEPALIVE,
)


@dataclass(slots=True)
class Timers:
    """Deadlines of one peer's five timers."""

    deadlines: dict[str, float] = field(default_factory=dict)

    def arm(self, name: str, at: float) -> None:
        self.deadlines[name] = at

    def arm_if_idle(self, name: str, at: float) -> bool:
        """Arm unless already pending (the kernel's mod_timer_pending idiom); True if armed."""
        if name in self.deadlines:
            return False
        self.deadlines[name] = at
        return True

    def disarm(self, name: str) -> None:
        self.deadlines.pop(name, None)

    def pending(self, name: str) -> bool:
        return name in self.deadlines

    def clear(self) -> None:
        self.deadlines.clear()

    def next_deadline(self) -> float | None:
        return min(self.deadlines.values()) if self.deadlines else None

    def expired(self, now: float) -> list[str]:
        """Disarm and return the timers whose deadline is <= now, in deadline order."""
        due = sorted((t, n) for n, t in self.deadlines.items() if t <= now)
        for _, n in due:
            del self.deadlines[n]
        return [n for _, n in due]
