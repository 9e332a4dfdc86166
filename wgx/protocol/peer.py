"""Peer and keypair state, and the table of our 32-bit session indices.

A `Keypair` is one direction pair of transport keys with its counters and
replay window. A `Peer` keeps up to three of them (whitepaper section 5.4.6
and the kernel's noise.c): `current` (in use), `previous` (still accepted
after a rotation) and `next` (the responder's key, not used for sending
until the initiator confirms it with its first transport packet).
"""

from __future__ import annotations

import ipaddress
from collections import deque
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from .cookie import CookieGenerator
from .noise import HandshakeState
from .replay import ReplayWindow
from .timers import Timers

Endpoint = tuple[str, int]


def endpoint_bytes(ep: Endpoint) -> bytes:
    """Raw address bytes followed by the big-endian port: the cookie's source identity."""
    return ipaddress.ip_address(ep[0]).packed + ep[1].to_bytes(2, "big")


class Keypair:
    """Transport keys of one session."""

    __slots__ = (
        "peer", "local_index", "remote_index", "initiator", "created",
        "send_key", "recv_key", "sender", "receiver", "send_counter", "replay",
    )

    def __init__(
        self, peer: Peer, local_index: int, remote_index: int, initiator: bool,
        created: float, send_key: bytes, recv_key: bytes,
    ) -> None:
        self.peer = peer
        self.local_index = local_index
        self.remote_index = remote_index
        self.initiator = initiator
        self.created = created
        self.send_key = send_key
        self.recv_key = recv_key
        self.sender = ChaCha20Poly1305(send_key)
        self.receiver = ChaCha20Poly1305(recv_key)
        self.send_counter = 0
        self.replay = ReplayWindow()

    def reserve(self, n: int = 1) -> int | None:
        """Claim the next `n` send counters; returns the first.

        The transport invariant: one (key, counter) pair is sent at most once, so the
        counters handed out only ever go up. A keypair that cannot keep that promise
        (shared storage reset under it, see wgx.dataplane.sessions) returns None,
        and the caller must never send with it again.
        """
        first = self.send_counter
        self.send_counter = first + n
        return first

    def accept(self, counter: int) -> bool:
        """Check an authenticated counter against the replay window and mark it."""
        return self.replay.check_and_update(counter)


@dataclass(slots=True)
class PendingHandshake:
    """Our initiation in flight: what is needed to consume the response."""

    local_index: int
    state: HandshakeState
    sent: float


@dataclass(eq=False, slots=True)
class Peer:
    public_key: bytes
    preshared_key: bytes = bytes(32)
    endpoint: Endpoint | None = None
    persistent_keepalive: int = 0
    current: Keypair | None = None
    previous: Keypair | None = None
    next: Keypair | None = None
    handshake: PendingHandshake | None = None
    cookies: CookieGenerator = field(init=False)
    timers: Timers = field(default_factory=Timers)
    handshake_attempts: int = 0
    last_sent_handshake: float = float("-inf")
    last_initiation_consumed: float = float("-inf")
    latest_timestamp: bytes = bytes(12)
    last_handshake: float | None = None  # monotonic time of the last completed handshake
    need_another_keepalive: bool = False
    sent_lastminute_handshake: bool = False
    rx_bytes: int = 0
    tx_bytes: int = 0
    staged: deque[bytes] = field(default_factory=deque)

    def __post_init__(self) -> None:
        self.cookies = CookieGenerator(self.public_key)

    def keypairs(self) -> list[Keypair]:
        return [k for k in (self.current, self.previous, self.next) if k is not None]


class IndexTable:
    """Maps our receiver indices to the keypair or pending handshake they name."""

    def __init__(self) -> None:
        self._entries: dict[int, Keypair | tuple[Peer, PendingHandshake]] = {}

    def new_index(self, random4: bytes) -> int:
        """A fresh index from 4 random bytes, stepped past any index already in use."""
        idx = int.from_bytes(random4, "little")
        while idx in self._entries:
            idx = (idx * 1103515245 + 12345) & 0xFFFFFFFF
        return idx

    def add_handshake(self, peer: Peer, hs: PendingHandshake) -> None:
        self._entries[hs.local_index] = (peer, hs)

    def add_keypair(self, kp: Keypair) -> None:
        self._entries[kp.local_index] = kp

    def remove(self, index: int) -> None:
        self._entries.pop(index, None)

    def keypair(self, index: int) -> Keypair | None:
        e = self._entries.get(index)
        return e if isinstance(e, Keypair) else None

    def handshake(self, index: int) -> tuple[Peer, PendingHandshake] | None:
        e = self._entries.get(index)
        return e if isinstance(e, tuple) else None

    def peer_of(self, index: int) -> Peer | None:
        e = self._entries.get(index)
        if e is None:
            return None
        return e.peer if isinstance(e, Keypair) else e[0]

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, index: int) -> bool:
        return index in self._entries
