"""Per-source token bucket for handshake messages under load.

Same policy as the kernel's ratelimiter.c: 20 packets per second per source
with a burst of 5. IPv4 sources are keyed by address, IPv6 sources by their
/64, so one host cannot dodge the limit by walking its own subnet. Entries
idle for longer than a second are forgotten, and the table has a hard size
bound so a spoofing flood cannot grow memory without limit.
"""

from __future__ import annotations

PACKETS_PER_SECOND = 20
PACKETS_BURSTABLE = 5
PACKET_COST = 1.0 / PACKETS_PER_SECOND
TOKEN_MAX = PACKET_COST * PACKETS_BURSTABLE
MAX_ENTRIES = 8192


class RateLimiter:
    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self._buckets: dict[bytes, tuple[float, float]] = {}  # key -> (tokens, last time)
        self._max = max_entries
        self._last_gc = 0.0

    def allow(self, source_ip: bytes, now: float) -> bool:
        """Spend one token of `source_ip` (4 or 16 raw bytes); False if it has none left."""
        key = source_ip if len(source_ip) == 4 else source_ip[:8]
        if now - self._last_gc >= 1.0:
            self._gc(now)
        entry = self._buckets.get(key)
        if entry is None:
            if len(self._buckets) >= self._max:
                return False
            self._buckets[key] = (TOKEN_MAX - PACKET_COST, now)
            return True
        tokens, last = entry
        tokens = min(TOKEN_MAX, tokens + (now - last))
        if tokens < PACKET_COST:
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (tokens - PACKET_COST, now)
        return True

    def _gc(self, now: float) -> None:
        self._last_gc = now
        stale = [k for k, (_, last) in self._buckets.items() if now - last >= 1.0]
        for k in stale:
            del self._buckets[k]

    def __len__(self) -> int:
        return len(self._buckets)
