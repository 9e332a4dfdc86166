"""The sans-I/O core of one WireGuard interface.

`Engine` has no socket, no TUN and no clock, in the shape of aioquic's
QuicConnection. The I/O layer feeds it

* `receive_datagram(data, src, now)`: a UDP datagram from the underlay,
* `send_packet(ip_packet, now)`: a plaintext IP packet read from the TUN,
* `handle_timer(now)`: whenever `get_timer()` says a deadline has passed,

and drains `datagrams` (encrypted `(bytes, endpoint)` to send), `tun`
(decrypted IP packets to write) and `events` after each call. `now` is a
monotonic time in seconds; `wall_offset` turns it into wall-clock time for
TAI64N timestamps and last-handshake reports. Randomness comes from the
injected `random(n) -> bytes`.

Every input that is dropped is counted in `drops` under a reason, and never
raises: hostile datagrams cannot crash the caller.
"""

from __future__ import annotations

import os
import struct
from collections import Counter, deque
from collections.abc import Callable, Iterable

from cryptography.exceptions import InvalidTag

from . import noise
from .allowedips import AllowedIPs
from .cookie import CookieChecker
from .crypto import CryptoError, dh, nonce_for, public_key, tai64n
from .messages import (
    MSG_COOKIE_REPLY,
    MSG_INITIATION,
    MSG_RESPONSE,
    MSG_TRANSPORT,
    CookieReply,
    Initiation,
    Response,
    inner_packet_length,
    message_type,
    padded_len,
)
from .peer import Endpoint, IndexTable, Keypair, Peer, PendingHandshake, endpoint_bytes
from .ratelimiter import RateLimiter
from .timers import (
    INITIATIONS_PER_SECOND,
    MAX_STAGED_PACKETS,
    NEW_HANDSHAKE,
    PERSISTENT_KEEPALIVE,
    REKEY_TIMEOUT_JITTER_MAX,
    RETRANSMIT_HANDSHAKE,
    SEND_KEEPALIVE,
    ZERO_KEY_MATERIAL,
    Limits,
)

_ZERO16 = bytes(16)
_TRANSPORT_HDR = struct.Struct("<IIQ")
_TIMESTAMP_WHITENER = ~(0x1000000 - 1)  # round TAI64N nanoseconds down to ~16 ms, as wireguard-go
UNDER_LOAD_HANDSHAKES_PER_SECOND = 128
UNDER_LOAD_HOLD = 1.0
# Any fixed clamped scalar maps every low-order point to the all-zero DH result.
_LOW_ORDER_PROBE = bytes([0x40] * 32)

Random = Callable[[int], bytes]


class Events(deque[tuple[str, object]]):
    """The engine's event queue: bounded, and counting what it had to drop (`lost`), so
    a consumer that mirrors state from it knows when to resynchronise instead."""

    lost = 0

    def append(self, event: tuple[str, object]) -> None:
        if len(self) == self.maxlen:
            self.lost += 1
        super().append(event)


class ConfigError(ValueError):
    """A configuration value the engine refuses (bad key length, low-order key, ...)."""


class Engine:
    """One WireGuard interface: identity, peers, allowed IPs, sessions and timers."""

    def __init__(
        self,
        private_key: bytes | None = None,
        *,
        limits: Limits | None = None,
        random: Random = os.urandom,
        wall_offset: float = 0.0,
        mtu: int = 1420,
    ) -> None:
        self.limits = limits or Limits()
        self.random = random
        self.wall_offset = wall_offset
        self.mtu = mtu
        self.listen_port = 0
        self.fwmark = 0
        self.peers: dict[bytes, Peer] = {}
        self.allowed: AllowedIPs[Peer] = AllowedIPs()
        self.indices = IndexTable()
        self.ratelimiter = RateLimiter()
        self.drops: Counter[str] = Counter()
        self.stats: Counter[str] = Counter()
        self.datagrams: list[tuple[bytes, Endpoint]] = []
        self.tun: list[bytes] = []
        self.events = Events(maxlen=4096)
        # How keypairs are made: the XDP dataplane swaps in one backed by shared memory.
        # It may return None when it has no room for another (the handshake is dropped).
        self.keypair_factory: Callable[..., Keypair | None] = Keypair
        self.private_key: bytes | None = None
        self.public_key: bytes | None = None
        self._checker: CookieChecker | None = None
        self._hs_window_start = float("-inf")
        self._hs_in_window = 0
        self._under_load_until = float("-inf")
        if private_key is not None:
            self.set_private_key(private_key)

    # ------------------------------------------------------------------ config

    def set_private_key(self, key: bytes | None) -> None:
        """Set (or clear, with None) the static private key; sessions are dropped on change."""
        if key is not None and len(key) != 32:
            raise ConfigError("private key must be 32 bytes")
        if key == self.private_key:
            return
        self.private_key = key
        self.public_key = public_key(key) if key is not None else None
        self._checker = CookieChecker(self.public_key, self.random) if self.public_key else None
        for peer in list(self.peers.values()):
            if peer.public_key == self.public_key:
                self.remove_peer(peer.public_key)
            else:
                self._clear_sessions(peer)
                # Kernel wg_noise_expire_current_peer_keypairs also resets the handshake
                # rate limit, so a new handshake under the new identity can start at once.
                peer.last_sent_handshake = float("-inf")

    def add_peer(self, public_key_: bytes) -> Peer:
        """The peer with this public key, created if new. Refuses invalid keys."""
        peer = self.peers.get(public_key_)
        if peer is not None:
            return peer
        check_public_key(public_key_)
        peer = Peer(public_key_)
        self.peers[public_key_] = peer
        return peer

    def remove_peer(self, public_key_: bytes) -> None:
        peer = self.peers.pop(public_key_, None)
        if peer is None:
            return
        self._clear_sessions(peer)
        self.allowed.remove_value(peer)
        peer.timers.clear()
        peer.staged.clear()

    def set_persistent_keepalive(self, peer: Peer, interval: int, now: float) -> None:
        """Set the interval (0 = off); turning it on sends a keepalive at once, like the kernel."""
        was = peer.persistent_keepalive
        peer.persistent_keepalive = interval
        if interval == 0:
            peer.timers.disarm(PERSISTENT_KEEPALIVE)
        elif was == 0 and self.private_key is not None:
            self.send_keepalive(peer, now)

    # ------------------------------------------------------------------ inputs

    def send_packet(self, packet: bytes, now: float) -> None:
        """Route a plaintext IP packet from the TUN to its peer by destination address."""
        peer = self.allowed.lookup_packet_dst(packet)
        if peer is None:
            self.drops["no_peer_for_destination"] += 1
            return
        if len(peer.staged) >= MAX_STAGED_PACKETS:
            peer.staged.popleft()
            self.drops["staged_overflow"] += 1
        peer.staged.append(packet)
        self._send_staged(peer, now)

    def send_keepalive(self, peer: Peer, now: float) -> None:
        if not peer.staged:
            peer.staged.append(b"")
        self._send_staged(peer, now)

    def receive_datagram(self, data: bytes, src: Endpoint, now: float) -> None:
        """Process one UDP datagram from `src`. Never raises on hostile input."""
        t = message_type(data)
        if t == MSG_TRANSPORT:
            self._receive_transport(data, src, now)
        elif t == MSG_INITIATION:
            self._receive_initiation(data, src, now)
        elif t == MSG_RESPONSE:
            self._receive_response(data, src, now)
        elif t == MSG_COOKIE_REPLY:
            self._receive_cookie_reply(data, now)
        else:
            self.drops["malformed"] += 1

    def get_timer(self) -> float | None:
        """The earliest deadline at which `handle_timer` must be called, or None."""
        deadlines = [d for p in self.peers.values() if (d := p.timers.next_deadline()) is not None]
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float) -> None:
        for peer in list(self.peers.values()):
            for name in peer.timers.expired(now):
                self._fire(peer, name, now)

    def initiate_handshake(self, peer: Peer, now: float) -> None:
        """Start a handshake now (the I/O layer's 'wg set ... endpoint' does not need this)."""
        self._initiate(peer, now, retry=False)

    # ----------------------------------------------------------------- helpers

    def wall_time(self, now: float) -> float:
        return now + self.wall_offset

    def under_load(self, now: float) -> bool:
        return now < self._under_load_until

    def _note_handshake(self, now: float) -> bool:
        """Count one incoming handshake message; True while under load."""
        if now - self._hs_window_start >= 1.0:
            self._hs_window_start = now
            self._hs_in_window = 0
        self._hs_in_window += 1
        if self._hs_in_window >= UNDER_LOAD_HANDSHAKES_PER_SECOND:
            if now >= self._under_load_until:
                self.stats["under_load_engaged"] += 1  # one per episode, not per message
            self._under_load_until = now + UNDER_LOAD_HOLD
        return now < self._under_load_until

    def _jitter(self) -> float:
        return int.from_bytes(self.random(4), "little") / 2**32 * REKEY_TIMEOUT_JITTER_MAX

    def _emit(self, peer: Peer, data: bytes) -> bool:
        if peer.endpoint is None:
            self.drops["no_endpoint"] += 1
            return False
        self.datagrams.append((data, peer.endpoint))
        peer.tx_bytes += len(data)
        return True

    def _drop_keypair(self, kp: Keypair | None) -> None:
        if kp is not None:
            self.indices.remove(kp.local_index)
            self.events.append(("keypair_gone", kp))

    def _clear_sessions(self, peer: Peer) -> None:
        for kp in peer.keypairs():
            self._drop_keypair(kp)
        peer.current = peer.previous = peer.next = None
        if peer.handshake is not None:
            self.indices.remove(peer.handshake.local_index)
            peer.handshake = None

    def _install_keypair(self, peer: Peer, kp: Keypair) -> None:
        """Kernel add_new_keypair: rotate current/previous/next for a new session."""
        self.indices.add_keypair(kp)
        if kp.initiator:
            if peer.next is not None:
                self._drop_keypair(peer.previous)
                peer.previous = peer.next
                peer.next = None
                self._drop_keypair(peer.current)
            else:
                self._drop_keypair(peer.previous)
                peer.previous = peer.current
            peer.current = kp
        else:
            self._drop_keypair(peer.next)
            peer.next = kp
            self._drop_keypair(peer.previous)
            peer.previous = None
        self.events.append(("keypair_new", kp))
        peer.timers.arm(ZERO_KEY_MATERIAL, kp.created + self.limits.reject_after_time * 3)

    def _usable_for_send(self, kp: Keypair | None, now: float) -> bool:
        return (
            kp is not None
            and now - kp.created < self.limits.reject_after_time
            and kp.send_counter < self.limits.reject_after_messages
        )

    def _authenticated_sent(self, peer: Peer, now: float) -> None:
        peer.timers.disarm(SEND_KEEPALIVE)
        if peer.persistent_keepalive:
            peer.timers.arm(PERSISTENT_KEEPALIVE, now + peer.persistent_keepalive)

    def _authenticated_received(
        self, peer: Peer, src: Endpoint | None, nbytes: int, now: float
    ) -> None:
        peer.timers.disarm(NEW_HANDSHAKE)
        if peer.persistent_keepalive:
            peer.timers.arm(PERSISTENT_KEEPALIVE, now + peer.persistent_keepalive)
        if src is not None and peer.endpoint != src:
            peer.endpoint = src
            self.events.append(("endpoint", peer))
        peer.rx_bytes += nbytes

    def _handshake_complete(self, peer: Peer, now: float) -> None:
        peer.timers.disarm(RETRANSMIT_HANDSHAKE)
        peer.handshake_attempts = 0
        peer.sent_lastminute_handshake = False
        peer.last_handshake = now
        self.events.append(("handshake_complete", peer))

    # -------------------------------------------------------------------- send

    def _send_staged(self, peer: Peer, now: float) -> None:
        kp = peer.current
        if not self._usable_for_send(kp, now):
            self._initiate(peer, now, retry=False)
            return
        assert kp is not None
        if peer.endpoint is None:
            self.drops["no_endpoint"] += len(peer.staged)
            peer.staged.clear()
            return
        limit = self.limits.reject_after_messages
        sent_data = False
        while peer.staged and kp.send_counter < limit:
            if not self._encrypt(peer, kp, peer.staged[0]):
                break
            if peer.staged.popleft():
                sent_data = True
        self._authenticated_sent(peer, now)
        if sent_data:
            self._data_sent(peer, now)
        if peer.staged:  # the keypair ran out of messages mid-batch
            self._initiate(peer, now, retry=False)
            return
        self._keep_key_fresh_send(peer, kp, now)

    def _data_sent(self, peer: Peer, now: float) -> None:
        peer.timers.arm_if_idle(
            NEW_HANDSHAKE,
            now + self.limits.keepalive_timeout + self.limits.rekey_timeout + self._jitter(),
        )

    def _keep_key_fresh_send(self, peer: Peer, kp: Keypair, now: float) -> None:
        """Kernel send.c keep_key_fresh: rekey by message count, or by age as initiator."""
        if kp.send_counter > self.limits.rekey_after_messages or (
            kp.initiator and now - kp.created >= self.limits.rekey_after_time
        ):
            self._initiate(peer, now, retry=False)

    def _keep_key_fresh_receive(self, peer: Peer, now: float) -> None:
        """Kernel receive.c keep_key_fresh: a last-minute rekey before REJECT_AFTER_TIME."""
        cur = peer.current  # the kernel looks at the current keypair
        if (
            not peer.sent_lastminute_handshake
            and cur is not None
            and cur.initiator
            and now - cur.created
            >= self.limits.reject_after_time
            - self.limits.keepalive_timeout
            - self.limits.rekey_timeout
        ):
            peer.sent_lastminute_handshake = True
            self._initiate(peer, now, retry=False)

    def _data_received(self, peer: Peer, now: float) -> None:
        if peer.timers.pending(SEND_KEEPALIVE):
            peer.need_another_keepalive = True
        else:
            peer.timers.arm(SEND_KEEPALIVE, now + self.limits.keepalive_timeout)

    def _encrypt(self, peer: Peer, kp: Keypair, packet: bytes) -> bool:
        """Seal and emit one packet; False if `kp` refused a counter (it is dropped:
        a counter handed out twice would reuse a nonce)."""
        counter = kp.reserve(1)
        if counter is None:
            self.revoke_keypair(kp)
            return False
        n = len(packet)
        plen = padded_len(n, self.mtu)
        if plen > n:
            packet = packet + bytes(plen - n)
        sealed = kp.sender.encrypt(nonce_for(counter), packet, None)
        self._emit(peer, _TRANSPORT_HDR.pack(MSG_TRANSPORT, kp.remote_index, counter) + sealed)
        return True

    def _initiate(self, peer: Peer, now: float, retry: bool) -> None:
        """Kernel wg_packet_send_queued_handshake_initiation: at most once per REKEY_TIMEOUT."""
        if not retry:
            peer.handshake_attempts = 0
        if self.private_key is None or now - peer.last_sent_handshake < self.limits.rekey_timeout:
            return
        peer.last_sent_handshake = now
        if peer.handshake is not None:
            self.indices.remove(peer.handshake.local_index)
        wall_ns = int(self.wall_time(now) * 1e9)
        secs, nanos = divmod(wall_ns, 1_000_000_000)
        stamp = tai64n(secs * 1_000_000_000 + (nanos & _TIMESTAMP_WHITENER))
        try:
            eph, enc_static, enc_ts, state = noise.create_initiation(
                self.private_key, peer.public_key, self.random(32), stamp
            )
        except CryptoError:
            self.drops["invalid_peer_key"] += 1
            return
        index = self.indices.new_index(self.random(4))
        peer.handshake = PendingHandshake(index, state, now)
        self.indices.add_handshake(peer, peer.handshake)
        msg = Initiation(index, eph, enc_static, enc_ts, _ZERO16, _ZERO16).pack()
        self._emit(peer, peer.cookies.add_macs(msg, now))
        self.stats["initiations_sent"] += 1
        self._authenticated_sent(peer, now)
        peer.timers.arm(RETRANSMIT_HANDSHAKE, now + self.limits.rekey_timeout + self._jitter())

    # ----------------------------------------------------------------- receive

    def _receive_transport(self, data: bytes, src: Endpoint, now: float) -> None:
        _, receiver, counter = _TRANSPORT_HDR.unpack_from(data)
        kp = self.indices.keypair(receiver)
        if kp is None:
            self.drops["unknown_index"] += 1
            return
        if (
            now - kp.created >= self.limits.reject_after_time
            or counter >= self.limits.reject_after_messages
        ):
            self.drops["expired_keypair"] += 1
            return
        if not kp.replay.would_accept(counter):
            self.drops["replay"] += 1
            return
        try:
            plain = kp.receiver.decrypt(nonce_for(counter), data[16:], None)
        except InvalidTag:
            self.drops["bad_tag"] += 1
            return
        late = counter < kp.replay.greatest
        if not kp.accept(counter):
            self.drops["replay"] += 1
            return
        if late:  # fresh but below the greatest counter seen: reordered on the way
            self.stats["rx_out_of_order"] += 1
        peer = kp.peer
        if kp is peer.next:
            self.confirm_keypair(kp, now)
        self._authenticated_received(peer, src, len(data), now)
        if plain:
            self._deliver(peer, plain, now)
        else:
            self.stats["keepalives_received"] += 1
        self._keep_key_fresh_receive(peer, now)

    def revoke_keypair(self, kp: Keypair) -> None:
        """Never use `kp` again: it was handed a send counter twice (see Keypair.reserve).
        Counted; the next packet to its peer starts a new handshake."""
        self.drops["send_counter_reused"] += 1
        peer = kp.peer
        for attr in ("current", "previous", "next"):
            if getattr(peer, attr) is kp:
                setattr(peer, attr, None)
        self._drop_keypair(kp)

    def confirm_keypair(self, kp: Keypair, now: float) -> None:
        """The initiator used our `next` keypair: it becomes current (key confirmation)."""
        peer = kp.peer
        if kp is not peer.next:
            return
        self._drop_keypair(peer.previous)
        peer.previous = peer.current
        peer.current = kp
        peer.next = None
        self._handshake_complete(peer, now)
        self.events.append(("current", peer))
        if peer.staged:
            self._send_staged(peer, now)

    def note_offloaded(
        self, peer: Peer, now: float, *, rx_bytes: int = 0, tx_bytes: int = 0,
        rx_data: int = 0, rx_keepalives: int = 0, tx_data: int = 0,
        source: Endpoint | None = None,
    ) -> None:
        """Account for transport packets a worker moved without the engine (XDP path).

        Runs the same timer, roaming, counter and rekey rules as if the engine had
        seen the packets itself, once per report instead of once per packet.
        """
        if rx_bytes:
            self._authenticated_received(peer, source, rx_bytes, now)
            if rx_data:
                self._data_received(peer, now)
            self.stats["keepalives_received"] += rx_keepalives
            self._keep_key_fresh_receive(peer, now)
        if tx_bytes:
            peer.tx_bytes += tx_bytes
            self._authenticated_sent(peer, now)
            if tx_data:
                self._data_sent(peer, now)
            if peer.current is not None:
                self._keep_key_fresh_send(peer, peer.current, now)

    def _deliver(self, peer: Peer, plain: bytes, now: float) -> None:
        """Trim padding, check the inner source against allowed IPs, queue for the TUN."""
        # Kernel wg_timers_data_received() runs for every authenticated non-keepalive
        # packet, before the inner header and source checks.
        self._data_received(peer, now)
        length = inner_packet_length(plain)
        if not length:
            self.drops["bad_inner_packet"] += 1
            return
        packet = plain[:length] if length < len(plain) else plain
        if self.allowed.lookup_packet_src(packet) is not peer:
            self.drops["allowedips_source"] += 1
            return
        self.tun.append(packet)

    def _handshake_gate(self, data: bytes, sender: int, src: Endpoint, now: float) -> bool:
        """mac1, and under load mac2 (else a cookie reply) plus the per-source rate limit."""
        # Every handshake message of the right size counts towards "under load", as in
        # the kernel (its handshake queue fills before MACs are checked): a flood of
        # bad-mac1 initiations must also switch on the XDP rate limits.
        under_load = self._note_handshake(now)
        checker = self._checker
        if checker is None:
            self.drops["no_private_key"] += 1
            return False
        if not checker.check_mac1(data):
            self.drops["bad_mac1"] += 1
            return False
        if not under_load:
            return True
        source = endpoint_bytes(src)
        if not checker.check_mac2(data, source, now):
            self.datagrams.append((checker.create_reply(data, sender, source, now), src))
            self.stats["cookie_replies_sent"] += 1
            return False
        if not self.ratelimiter.allow(source[:-2], now):
            self.drops["rate_limited"] += 1
            return False
        return True

    def _receive_initiation(self, data: bytes, src: Endpoint, now: float) -> None:
        msg = Initiation.unpack(data)
        if not self._handshake_gate(data, msg.sender, src, now):
            return
        assert self.private_key is not None
        try:
            stamp, state = noise.consume_initiation(
                self.private_key, msg.ephemeral, msg.encrypted_static, msg.encrypted_timestamp
            )
        except CryptoError:
            self.drops["handshake_auth"] += 1
            return
        peer = self.peers.get(state.remote_static)
        if peer is None:
            self.drops["unknown_peer"] += 1
            return
        if stamp <= peer.latest_timestamp:
            self.drops["stale_timestamp"] += 1
            return
        if now - peer.last_initiation_consumed < 1.0 / INITIATIONS_PER_SECOND:
            self.drops["initiation_flood"] += 1
            return
        try:
            eph, enc_empty, (send, recv) = noise.create_response(
                state, self.random(32), peer.preshared_key
            )
        except CryptoError:
            self.drops["handshake_auth"] += 1
            return
        peer.latest_timestamp = stamp
        peer.last_initiation_consumed = now
        index = self.indices.new_index(self.random(4))
        kp = self.keypair_factory(peer, index, msg.sender, False, now, send, recv)
        if kp is None:
            self.drops["no_keypair_room"] += 1
            return
        self._install_keypair(peer, kp)
        self._authenticated_received(peer, src, len(data), now)
        reply = Response(index, msg.sender, eph, enc_empty, _ZERO16, _ZERO16).pack()
        self._emit(peer, peer.cookies.add_macs(reply, now))
        # Kernel wg_packet_send_handshake_response sets last_sent_handshake too: the
        # responder does not start its own handshake while the initiator confirms ours.
        peer.last_sent_handshake = now
        self.stats["responses_sent"] += 1
        self._authenticated_sent(peer, now)

    def _receive_response(self, data: bytes, src: Endpoint, now: float) -> None:
        msg = Response.unpack(data)
        if not self._handshake_gate(data, msg.sender, src, now):
            return
        assert self.private_key is not None
        entry = self.indices.handshake(msg.receiver)
        if entry is None:
            self.drops["unknown_index"] += 1
            return
        peer, pending = entry
        try:
            _, (send, recv) = noise.consume_response(
                pending.state, self.private_key, msg.ephemeral, msg.encrypted_nothing,
                peer.preshared_key,
            )
        except CryptoError:
            self.drops["handshake_auth"] += 1
            return
        self.indices.remove(pending.local_index)
        peer.handshake = None
        kp = self.keypair_factory(peer, pending.local_index, msg.sender, True, now, send, recv)
        if kp is None:
            self.drops["no_keypair_room"] += 1
            return
        self._install_keypair(peer, kp)
        self._authenticated_received(peer, src, len(data), now)
        self._handshake_complete(peer, now)
        self.send_keepalive(peer, now)

    def _receive_cookie_reply(self, data: bytes, now: float) -> None:
        msg = CookieReply.unpack(data)
        peer = self.indices.peer_of(msg.receiver)
        if peer is None:
            self.drops["unknown_index"] += 1
            return
        if peer.cookies.consume_reply(msg, now):
            self.stats["cookies_received"] += 1
        else:
            self.drops["bad_cookie"] += 1

    # ------------------------------------------------------------------ timers

    def _fire(self, peer: Peer, name: str, now: float) -> None:
        if name == RETRANSMIT_HANDSHAKE:
            if peer.handshake_attempts > self.limits.max_timer_handshakes:
                peer.timers.disarm(SEND_KEEPALIVE)
                self.drops["handshake_timeout"] += len(peer.staged)
                peer.staged.clear()
                peer.timers.arm_if_idle(ZERO_KEY_MATERIAL, now + self.limits.reject_after_time * 3)
                self.events.append(("handshake_gave_up", peer))
            else:
                peer.handshake_attempts += 1
                self._initiate(peer, now, retry=True)
        elif name == SEND_KEEPALIVE:
            self.send_keepalive(peer, now)
            if peer.need_another_keepalive:
                peer.need_another_keepalive = False
                peer.timers.arm(SEND_KEEPALIVE, now + self.limits.keepalive_timeout)
        elif name == NEW_HANDSHAKE:
            self._initiate(peer, now, retry=False)
        elif name == ZERO_KEY_MATERIAL:
            self._clear_sessions(peer)
        elif name == PERSISTENT_KEEPALIVE and peer.persistent_keepalive:
            self.send_keepalive(peer, now)


def check_public_key(key: bytes) -> None:
    """Refuse keys of the wrong length and low-order points, as the kernel does."""
    if len(key) != 32:
        raise ConfigError("public key must be 32 bytes")
    try:
        dh(_LOW_ORDER_PROBE, key)
    except CryptoError as e:
        raise ConfigError("public key is a low-order point") from e


def drain(items: list, into: Iterable | None = None) -> list:
    """Take everything out of an output list (the caller owns the returned list)."""
    out = items[:]
    items.clear()
    return out
