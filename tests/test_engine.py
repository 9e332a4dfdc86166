"""The sans-I/O Engine, driven in memory with an injected clock.

Two engines A (198.18.0.1) and B (198.18.0.2) talk through `Net`, which moves
datagrams between them and can drop or capture them; a third party (attacker or
extra peer) is added where needed. Time is a float passed to every call; `Net.run`
fires timers in order, so minutes of protocol time take milliseconds.

Reference behaviour: whitepaper section 6 and the Linux kernel's
drivers/net/wireguard (timers.c, noise.c, send.c, receive.c, cookie.c).
"""

from __future__ import annotations

import ipaddress
import random
import struct
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wgx.protocol import crypto, noise
from wgx.protocol.cookie import CookieGenerator
from wgx.protocol.engine import UNDER_LOAD_HANDSHAKES_PER_SECOND, ConfigError, Engine
from wgx.protocol.messages import (
    MSG_COOKIE_REPLY,
    MSG_INITIATION,
    MSG_RESPONSE,
    MSG_TRANSPORT,
    CookieReply,
    Initiation,
    padded_len,
)
from wgx.protocol.peer import Keypair, Peer
from wgx.protocol.ratelimiter import PACKETS_BURSTABLE, RateLimiter
from wgx.protocol.timers import (
    KEEPALIVE_TIMEOUT,
    MAX_STAGED_PACKETS,
    MAX_TIMER_HANDSHAKES,
    REJECT_AFTER_TIME,
    REKEY_AFTER_TIME,
    REKEY_TIMEOUT,
    REKEY_TIMEOUT_JITTER_MAX,
    Limits,
)

A_ADDR = ("198.18.0.1", 51820)
B_ADDR = ("198.18.0.2", 51820)
EVIL = ("203.0.113.66", 6666)
WALL = 1_700_000_000.0

Endpoint = tuple[str, int]
Drop = Callable[[Endpoint, Endpoint, bytes], bool]


# ----------------------------------------------------------------------- helpers


def rng(seed: int) -> Callable[[int], bytes]:
    return random.Random(seed).randbytes


def keypair(seed: int) -> tuple[bytes, bytes]:
    priv = crypto.clamp(random.Random(seed).randbytes(32))
    return priv, crypto.public_key(priv)


def ip4(src: str, dst: str, payload: bytes = b"x" * 30, total: int | None = None) -> bytes:
    tot = 20 + len(payload) if total is None else total
    return struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, tot, 0, 0, 64, 17, 0,
        ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed,
    ) + payload


def ip6(src: str, dst: str, payload: bytes = b"y" * 21) -> bytes:
    return struct.pack(
        "!IHBB16s16s", 0x60000000, len(payload), 17, 64,
        ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed,
    ) + payload


def mtype(data: bytes) -> int:
    return data[0]


class Net:
    """An in-memory underlay: engines by address, a log, optional drop/capture filter."""

    def __init__(self) -> None:
        self.at: dict[Endpoint, Engine] = {}
        self.addr: dict[int, Endpoint] = {}
        self.log: list[tuple[float, Endpoint, Endpoint, bytes]] = []
        self.drop: Drop | None = None
        self.held: list[tuple[Endpoint, Endpoint, bytes]] = []

    def attach(self, eng: Engine, addr: Endpoint) -> None:
        old = self.addr.get(id(eng))
        if old is not None:
            del self.at[old]
        self.addr[id(eng)] = addr
        self.at[addr] = eng

    def engines(self) -> list[Engine]:
        return list(self.at.values())

    def take(self, eng: Engine) -> list[tuple[bytes, Endpoint]]:
        out = eng.datagrams[:]
        eng.datagrams.clear()
        return out

    def send_from(self, eng: Engine, now: float) -> int:
        """Deliver what `eng` has queued (one hop only); returns how many were moved."""
        src = self.addr[id(eng)]
        moved = 0
        for data, ep in self.take(eng):
            moved += 1
            self.log.append((now, src, ep, data))
            if self.drop is not None and self.drop(src, ep, data):
                self.held.append((src, ep, data))
                continue
            dst = self.at.get(ep)
            if dst is not None:
                dst.receive_datagram(data, src, now)
        return moved

    def pump(self, now: float, rounds: int = 100) -> None:
        for _ in range(rounds):
            if not sum(self.send_from(e, now) for e in self.engines()):
                return
        raise AssertionError("datagram ping-pong did not settle")

    def run(self, start: float, end: float, max_steps: int = 100_000) -> None:
        """Fire every timer due in [start, end] in order, delivering after each step."""
        self.pump(start)
        for _ in range(max_steps):
            due = [t for e in self.engines() if (t := e.get_timer()) is not None]
            if not due or min(due) > end:
                return
            t = max(min(due), start)
            for e in self.engines():
                d = e.get_timer()
                if d is not None and d <= t:
                    e.handle_timer(t)
            self.pump(t)
        raise AssertionError("timers did not settle")

    def sent(self, src: Endpoint | None = None, kind: int | None = None,
             since: float = float("-inf")) -> list[tuple[float, Endpoint, Endpoint, bytes]]:
        return [
            rec for rec in self.log
            if (src is None or rec[1] == src)
            and (kind is None or mtype(rec[3]) == kind)
            and rec[0] >= since
        ]


class Pair:
    """A and B, peers of each other, A knowing B's endpoint (B learns A's by roaming)."""

    def __init__(self, *, psk_a: bytes | None = None, psk_b: bytes | None = None,
                 limits: Limits | None = None, seed: int = 1, mtu: int = 1420) -> None:
        self.ka, self.pub_a = keypair(seed * 10 + 1)
        self.kb, self.pub_b = keypair(seed * 10 + 2)
        self.A = Engine(self.ka, limits=limits, random=rng(seed * 10 + 3), wall_offset=WALL,
                        mtu=mtu)
        self.B = Engine(self.kb, limits=limits, random=rng(seed * 10 + 4), wall_offset=WALL,
                        mtu=mtu)
        self.pa = self.A.add_peer(self.pub_b)  # A's view of B
        self.pb = self.B.add_peer(self.pub_a)  # B's view of A
        if psk_a is not None:
            self.pa.preshared_key = psk_a
        if psk_b is not None:
            self.pb.preshared_key = psk_b
        self.A.allowed.insert("10.0.0.2/32", self.pa)
        self.A.allowed.insert("fd00::2/128", self.pa)
        self.B.allowed.insert("10.0.0.1/32", self.pb)
        self.B.allowed.insert("fd00::1/128", self.pb)
        self.pa.endpoint = B_ADDR
        self.net = Net()
        self.net.attach(self.A, A_ADDR)
        self.net.attach(self.B, B_ADDR)

    def establish(self, now: float = 0.0) -> None:
        self.A.initiate_handshake(self.pa, now)
        self.net.pump(now)
        assert self.pa.current is not None and self.pb.current is not None
        assert self.pa.current.initiator and not self.pb.current.initiator

    def a_to_b(self, now: float, payload: bytes = b"a->b") -> bytes:
        pkt = ip4("10.0.0.1", "10.0.0.2", payload)
        self.A.send_packet(pkt, now)
        return pkt

    def b_to_a(self, now: float, payload: bytes = b"b->a") -> bytes:
        pkt = ip4("10.0.0.2", "10.0.0.1", payload)
        self.B.send_packet(pkt, now)
        return pkt


def craft_initiation(sender_priv: bytes, responder_pub: bytes, stamp_ns: int, now: float,
                     seed: int, gen: CookieGenerator | None = None) -> bytes:
    """A valid initiation with a chosen TAI64N timestamp (mac1 by `gen`)."""
    r = random.Random(seed)
    e, s, ts, _ = noise.create_initiation(
        sender_priv, responder_pub, crypto.clamp(r.randbytes(32)), crypto.tai64n(stamp_ns)
    )
    body = Initiation(r.getrandbits(32), e, s, ts, bytes(16), bytes(16)).pack()
    return (gen or CookieGenerator(responder_pub)).add_macs(body, now)


def mac1_only_junk(responder_pub: bytes, seed: int) -> bytes:
    """An initiation-shaped datagram with a valid mac1 and random contents."""
    body = b"\x01\x00\x00\x00" + random.Random(seed).randbytes(112)
    return CookieGenerator(responder_pub).add_macs(body + bytes(32), 0.0)


def flood(eng: Engine, responder_pub: bytes, now: float, n: int, src: Endpoint = EVIL) -> None:
    for i in range(n):
        eng.receive_datagram(mac1_only_junk(responder_pub, i), src, now)
    eng.datagrams.clear()  # cookie replies to the attacker go nowhere


def transport_counter(data: bytes) -> int:
    return struct.unpack_from("<Q", data, 8)[0]


# ------------------------------------------------------------- handshake basics


def test_handshake_initiated_by_data_a_to_b() -> None:
    p = Pair()
    pkt = p.a_to_b(0.0)
    assert [mtype(d) for d, _ in p.A.datagrams] == [MSG_INITIATION]
    assert len(p.A.datagrams[0][0]) == 148
    assert p.pa.staged  # waiting for the handshake
    p.net.pump(0.0)
    assert p.B.tun == [pkt]
    assert p.pb.endpoint == A_ADDR  # learned from the authenticated initiation
    assert p.pa.current is not None and p.pa.current.initiator
    assert p.pb.current is not None and not p.pb.current.initiator
    assert p.pb.next is None and not p.pa.staged
    assert p.pa.current.send_key == p.pb.current.recv_key
    assert p.pa.current.recv_key == p.pb.current.send_key
    assert p.pa.current.remote_index == p.pb.current.local_index
    assert p.pb.current.remote_index == p.pa.current.local_index
    responses = p.net.sent(src=B_ADDR, kind=MSG_RESPONSE)
    assert len(responses) == 1 and len(responses[0][3]) == 92
    assert p.A.stats["initiations_sent"] == 1 and p.B.stats["responses_sent"] == 1
    reply = p.b_to_a(0.1)
    p.net.pump(0.1)
    assert p.A.tun == [reply]
    assert not p.A.drops and not p.B.drops
    assert ("handshake_complete", p.pa) in p.A.events
    assert ("handshake_complete", p.pb) in p.B.events
    assert p.pa.last_handshake == 0.0 and p.pb.last_handshake == 0.0


def test_handshake_initiated_b_to_a() -> None:
    p = Pair()
    p.pb.endpoint = A_ADDR
    pkt = p.b_to_a(0.0)
    p.net.pump(0.0)
    assert p.A.tun == [pkt]
    assert p.pb.current is not None and p.pb.current.initiator
    assert p.pa.current is not None and not p.pa.current.initiator
    assert p.B.stats["initiations_sent"] == 1 and p.A.stats["responses_sent"] == 1


def test_v6_inner_packets_both_ways() -> None:
    p = Pair()
    p.establish()
    out = ip6("fd00::1", "fd00::2", b"hello six")
    back = ip6("fd00::2", "fd00::1", b"and back")
    p.A.send_packet(out, 1.0)
    p.B.send_packet(back, 1.0)
    p.net.pump(1.0)
    assert p.B.tun == [out] and p.A.tun == [back]


def test_simultaneous_initiations_converge() -> None:
    p = Pair()
    p.pb.endpoint = A_ADDR
    p.A.initiate_handshake(p.pa, 0.0)
    p.B.initiate_handshake(p.pb, 0.0)
    p.net.pump(0.0)
    x, y = p.a_to_b(0.5), p.b_to_a(0.5)
    p.net.pump(0.5)
    assert p.B.tun == [x] and p.A.tun == [y]
    assert not p.A.drops and not p.B.drops


def test_preshared_key_match() -> None:
    psk = bytes(range(32))
    p = Pair(psk_a=psk, psk_b=psk)
    pkt = p.a_to_b(0.0)
    p.net.pump(0.0)
    assert p.B.tun == [pkt]


def test_preshared_key_mismatch_fails_and_is_counted() -> None:
    p = Pair(psk_a=bytes(range(32)), psk_b=bytes(32))
    p.a_to_b(0.0)
    p.net.pump(0.0)
    # The initiation does not depend on the psk: B answers, A cannot open the response.
    assert p.B.stats["responses_sent"] == 1
    assert p.A.drops["handshake_auth"] == 1
    assert p.pa.current is None and p.pa.handshake is not None
    assert p.pb.current is None and p.pb.next is not None  # never confirmed
    assert p.B.tun == []
    # Only one side having a psk fails the same way.
    q = Pair(psk_a=None, psk_b=bytes([7]) * 32, seed=2)
    q.a_to_b(0.0)
    q.net.pump(0.0)
    assert q.A.drops["handshake_auth"] == 1 and q.B.tun == []


def test_unknown_initiator_is_refused() -> None:
    p = Pair()
    evil_priv, _ = keypair(99)
    msg = craft_initiation(evil_priv, p.pub_b, int(WALL * 1e9), 0.0, seed=5)
    p.B.receive_datagram(msg, EVIL, 0.0)
    assert p.B.drops["unknown_peer"] == 1
    assert p.B.datagrams == [] and p.pb.endpoint is None
    # A full third engine gets nowhere either.
    c_priv, _ = keypair(98)
    c = Engine(c_priv, random=rng(97), wall_offset=WALL)
    pc = c.add_peer(p.pub_b)
    pc.endpoint = B_ADDR
    p.net.attach(c, EVIL)
    c.initiate_handshake(pc, 1.0)
    p.net.pump(1.0)
    assert p.B.drops["unknown_peer"] == 2 and pc.current is None


def test_handshake_with_wrong_mac1_is_dropped() -> None:
    p = Pair()
    p.A.initiate_handshake(p.pa, 0.0)
    msg = p.A.datagrams[0][0]
    bad = msg[:116] + bytes([msg[116] ^ 1]) + msg[117:]
    p.B.receive_datagram(bad, A_ADDR, 0.0)
    assert p.B.drops["bad_mac1"] == 1 and p.B.datagrams == []
    # The same initiation with the right mac1 is accepted.
    p.B.receive_datagram(msg, A_ADDR, 0.0)
    assert p.B.stats["responses_sent"] == 1


# ----------------------------------------------------- key confirmation / rotation


def test_responder_waits_for_key_confirmation() -> None:
    p = Pair()
    first = p.a_to_b(0.0)
    p.net.send_from(p.A, 0.0)  # initiation reaches B; B's response is still queued
    assert p.pb.next is not None and p.pb.current is None
    assert [mtype(d) for d, _ in p.B.datagrams] == [MSG_RESPONSE]
    # B cannot send on `next`, and does not start its own handshake while the initiator
    # confirms (the response counts as a sent handshake, as in the kernel's send.c).
    reply = p.b_to_a(0.1)
    assert [mtype(d) for d, _ in p.B.datagrams] == [MSG_RESPONSE]
    assert p.pb.staged
    nxt = p.pb.next
    p.net.send_from(p.B, 0.1)  # response -> A, A sends its staged packet on the new keys
    assert p.pa.current is not None
    p.net.send_from(p.A, 0.1)  # first transport packet confirms B's next keypair
    assert p.pb.current is nxt and p.pb.next is None and p.pb.previous is None
    assert p.B.tun == [first]
    p.net.pump(0.1)
    assert p.A.tun == [reply]
    assert p.B.stats["initiations_sent"] == 0


def test_rotation_keeps_previous_keypair_receiving() -> None:
    p = Pair()
    p.establish(0.0)
    old_a, old_b = p.pa.current, p.pb.current
    # Capture one packet in each direction on the old session.
    p.net.drop = lambda s, d, data: mtype(data) == MSG_TRANSPORT
    late_ab = p.a_to_b(1.0, b"late a->b")
    late_ba = p.b_to_a(1.0, b"late b->a")
    p.net.pump(1.0)
    held = list(p.net.held)
    assert len(held) == 2
    p.net.drop = None
    # REKEY_AFTER_TIME: A's next send after 120 s starts a handshake.
    t = REKEY_AFTER_TIME + 1
    p.a_to_b(t)
    p.net.pump(t)
    assert p.pa.current is not old_a and p.pa.previous is old_a
    assert p.pb.current is not old_b and p.pb.previous is old_b and p.pb.next is None
    p.A.tun.clear()
    p.B.tun.clear()
    for src, ep, data in held:
        p.net.at[ep].receive_datagram(data, src, t + 1)
    assert p.B.tun == [late_ab] and p.A.tun == [late_ba]
    # A second rotation drops the oldest keypair: its packets become unknown.
    p.pa.last_sent_handshake = float("-inf")
    p.A.initiate_handshake(p.pa, t + 2)
    p.net.pump(t + 2)
    assert p.pb.previous is not old_b
    for src, ep, data in held:
        p.net.at[ep].receive_datagram(data, src, t + 3)
    assert p.A.drops["unknown_index"] == 1 and p.B.drops["unknown_index"] == 1


def test_rekey_after_time_initiator_only() -> None:
    p = Pair()
    p.establish(0.0)
    t = REKEY_AFTER_TIME - 0.5
    p.a_to_b(t)
    p.b_to_a(t)
    assert not p.net.sent(kind=MSG_INITIATION, since=1)
    p.net.pump(t)
    # The responder never rekeys on time: its keypair is not the initiator's.
    t = REKEY_AFTER_TIME + 0.5
    p.b_to_a(t)
    assert [mtype(d) for d, _ in p.B.datagrams] == [MSG_TRANSPORT]
    p.net.pump(t)
    assert not p.net.sent(kind=MSG_INITIATION, since=1)
    # The initiator sends the packet on the still-valid keypair and starts a handshake.
    old = p.pa.current
    p.a_to_b(t)
    assert [mtype(d) for d, _ in p.A.datagrams] == [MSG_TRANSPORT, MSG_INITIATION]
    p.net.pump(t)
    assert p.pa.current is not old and p.pa.previous is old


def test_last_minute_handshake_on_receive() -> None:
    # Kernel receive.c keep_key_fresh: an initiator receiving on a keypair older than
    # REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT starts a handshake once.
    p = Pair()
    p.establish(0.0)
    limit = REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT
    p.net.drop = lambda s, d, data: s == A_ADDR  # keep A's answers from completing it
    p.b_to_a(limit - 1)
    p.net.pump(limit - 1)
    assert not p.net.sent(src=A_ADDR, kind=MSG_INITIATION, since=1)
    p.b_to_a(limit + 0.5)
    p.net.pump(limit + 0.5)
    assert len(p.net.sent(src=A_ADDR, kind=MSG_INITIATION, since=1)) == 1
    assert p.pa.sent_lastminute_handshake
    p.b_to_a(limit + 6)
    p.net.pump(limit + 6)
    assert len(p.net.sent(src=A_ADDR, kind=MSG_INITIATION, since=1)) == 1


def test_last_minute_handshake_checks_current_keypair() -> None:
    # The kernel looks at the *current* keypair, whichever keypair the packet came on:
    # a late packet on `previous` still triggers it when `current` is about to expire.
    p = Pair()
    p.establish(0.0)
    p.net.drop = lambda s, d, data: mtype(data) == MSG_TRANSPORT
    late = p.b_to_a(1.0)
    p.net.pump(1.0)
    (src, _, captured), = p.net.held
    p.net.drop = None
    p.A.initiate_handshake(p.pa, 10.0)
    p.net.pump(10.0)
    first = p.pa.previous
    assert first is not None and p.pa.current.created == 10.0
    t = 10.0 + REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT + 1  # first is 176 s old
    p.A.receive_datagram(captured, src, t)
    assert p.A.tun == [late]
    assert [mtype(d) for d, _ in p.A.datagrams] == [MSG_INITIATION]


def test_reject_after_time_send_and_receive() -> None:
    p = Pair()
    p.establish(0.0)
    old_a, old_b = p.pa.current, p.pb.current
    p.net.drop = lambda s, d, data: mtype(data) == MSG_TRANSPORT
    early = p.a_to_b(100.0)
    p.net.pump(100.0)
    (src, ep, captured), = p.net.held
    p.net.drop = None
    t = REJECT_AFTER_TIME
    # Receive: a packet on a keypair that is REJECT_AFTER_TIME old is refused.
    p.B.receive_datagram(captured, src, t)
    assert p.B.drops["expired_keypair"] == 1 and p.B.tun == []
    # Send: no transport on the expired keypair, a new handshake instead.
    pkt = p.b_to_a(t)
    assert [mtype(d) for d, _ in p.B.datagrams] == [MSG_INITIATION]
    assert p.pb.staged
    p.net.pump(t)
    assert p.A.tun == [pkt]
    assert p.pb.current is not old_b and p.pb.current.initiator
    assert p.pa.current is not old_a
    assert early not in p.B.tun


def test_rekey_and_reject_after_messages() -> None:
    limits = Limits(rekey_after_messages=5, reject_after_messages=10)
    p = Pair(limits=limits)
    p.establish(0.0)  # A's confirming keepalive used counter 0
    t = 10.0  # past A's REKEY_TIMEOUT handshake rate limit
    p.net.drop = lambda s, d, data: mtype(data) == MSG_INITIATION
    for i in range(1, 5):
        p.a_to_b(t, bytes([i]))
        assert [mtype(d) for d, _ in p.A.datagrams] == [MSG_TRANSPORT]
        p.net.pump(t)
    # Counter 5 is sent; after it send_counter (6) > REKEY_AFTER_MESSAGES: handshake.
    p.a_to_b(t, b"\x05")
    assert [mtype(d) for d, _ in p.A.datagrams] == [MSG_TRANSPORT, MSG_INITIATION]
    p.net.pump(t)
    for i in range(6, 12):
        p.a_to_b(t, bytes([i]))
        p.net.pump(t)
    counters = [transport_counter(d) for *_, d in p.net.sent(src=A_ADDR, kind=MSG_TRANSPORT)]
    assert counters == list(range(10))  # nothing at or past REJECT_AFTER_MESSAGES
    assert len(p.pa.staged) == 2
    assert len(p.B.tun) == 9
    # The receiver refuses counters at the limit too.
    kp = p.pa.current
    forged = struct.pack("<IIQ", 4, kp.remote_index, 10) + kp.sender.encrypt(
        crypto.nonce_for(10), ip4("10.0.0.1", "10.0.0.2"), None
    )
    p.B.receive_datagram(forged, A_ADDR, t)
    assert p.B.drops["expired_keypair"] == 1
    # Once the handshake gets through (A's retransmission), the staged packets flow.
    p.net.drop = None
    p.net.run(t, t + REKEY_TIMEOUT + 1)
    assert p.pa.current is not kp and not p.pa.staged
    assert len(p.B.tun) == 11


# ----------------------------------------------------------------------- timers


def test_retransmit_and_give_up() -> None:
    p = Pair()
    p.net.drop = lambda s, d, data: True  # B is unreachable
    for i in range(3):
        p.a_to_b(0.0, bytes([i]))
    p.net.run(0.0, 200.0)
    inits = p.net.sent(src=A_ADDR, kind=MSG_INITIATION)
    times = [t for t, *_ in inits]
    # One initiation plus MAX_TIMER_HANDSHAKES + 1 retries (the kernel's "after 20 attempts").
    assert len(inits) == MAX_TIMER_HANDSHAKES + 2 == 20
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert all(REKEY_TIMEOUT <= g <= REKEY_TIMEOUT + REKEY_TIMEOUT_JITTER_MAX for g in gaps)
    assert len({round(g, 6) for g in gaps}) > 1  # jittered
    assert len({d[8:40] for *_, d in inits}) == 20  # fresh ephemeral each time
    assert len({d[4:8] for *_, d in inits}) == 20  # and a fresh sender index
    assert not p.pa.staged
    assert p.A.drops["handshake_timeout"] == 3
    assert ("handshake_gave_up", p.pa) in p.A.events
    # REKEY_ATTEMPT_TIME (90 s) has passed when the last retry goes out.
    n = MAX_TIMER_HANDSHAKES + 1
    assert n * REKEY_TIMEOUT <= times[-1] <= n * (REKEY_TIMEOUT + REKEY_TIMEOUT_JITTER_MAX)
    # Sending again starts over.
    p.a_to_b(300.0)
    assert len(p.net.sent(src=A_ADDR, kind=MSG_INITIATION)) == 20
    p.net.send_from(p.A, 300.0)
    assert len(p.net.sent(src=A_ADDR, kind=MSG_INITIATION)) == 21
    assert p.pa.handshake_attempts == 0


def test_retransmit_stops_when_handshake_completes() -> None:
    p = Pair()
    p.net.drop = lambda s, d, data: s == B_ADDR  # the first response is lost
    p.a_to_b(0.0)
    p.net.pump(0.0)
    p.net.drop = None
    p.net.run(0.0, 60.0)
    assert len(p.net.sent(src=A_ADDR, kind=MSG_INITIATION)) == 2
    assert p.pa.current is not None and len(p.B.tun) == 1


def test_passive_keepalive() -> None:
    p = Pair()
    p.establish(0.0)
    p.a_to_b(1.0)
    p.net.run(1.0, 30.0)
    ka = [(t, d) for t, *_, d in p.net.sent(src=B_ADDR, kind=MSG_TRANSPORT)]
    assert ka == [(1.0 + KEEPALIVE_TIMEOUT, ka[0][1])]
    assert len(ka[0][1]) == 32  # header + empty payload + tag
    assert p.A.stats["keepalives_received"] == 1 and p.A.tun == []


def test_no_passive_keepalive_when_data_was_sent_back() -> None:
    p = Pair()
    p.establish(0.0)
    p.a_to_b(1.0)
    p.net.pump(1.0)
    p.b_to_a(5.0)
    p.net.run(5.0, 40.0)
    assert [len(d) for *_, d in p.net.sent(src=B_ADDR, kind=MSG_TRANSPORT)] == [64]


def test_passive_keepalive_need_another() -> None:
    # Kernel timers.c: data received while the keepalive timer is pending asks for one
    # more keepalive KEEPALIVE_TIMEOUT after the first.
    p = Pair()
    p.establish(0.0)
    p.a_to_b(1.0)
    p.net.pump(1.0)
    p.a_to_b(3.0)
    p.net.run(3.0, 40.0)
    times = [t for t, *_ in p.net.sent(src=B_ADDR, kind=MSG_TRANSPORT)]
    assert times == [11.0, 21.0]


def test_new_handshake_when_nothing_heard_back() -> None:
    p = Pair()
    p.establish(0.0)
    p.net.drop = lambda s, d, data: s == B_ADDR
    p.a_to_b(1.0)
    p.net.run(1.0, 1.0 + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + 1)
    inits = p.net.sent(src=A_ADDR, kind=MSG_INITIATION, since=0.5)
    assert len(inits) == 1
    t = inits[0][0]
    base = 1.0 + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT
    assert base <= t <= base + REKEY_TIMEOUT_JITTER_MAX


def test_no_new_handshake_when_answered() -> None:
    p = Pair()
    p.establish(0.0)
    p.a_to_b(1.0)
    p.net.run(1.0, 60.0)  # B's passive keepalive at 11 s counts as hearing back
    assert not p.net.sent(kind=MSG_INITIATION, since=0.5)


def test_persistent_keepalive() -> None:
    p = Pair()
    p.establish(0.0)
    p.A.set_persistent_keepalive(p.pa, 25, 2.0)
    assert [mtype(d) for d, _ in p.A.datagrams] == [MSG_TRANSPORT]  # sent at once
    p.net.run(2.0, 55.0)
    times = [t for t, *_ in p.net.sent(src=A_ADDR, kind=MSG_TRANSPORT, since=1)]
    assert times == [2.0, 27.0, 52.0]
    # Any authenticated traffic, sent or received, pushes it back: A sends data at 60,
    # B's passive keepalive arrives at 70, so the next one is due at 95.
    p.a_to_b(60.0)
    p.net.run(60.0, 100.0)
    times = [t for t, *_ in p.net.sent(src=A_ADDR, kind=MSG_TRANSPORT, since=55)]
    assert times == [60.0, 95.0]
    assert [t for t, *_ in p.net.sent(src=B_ADDR, kind=MSG_TRANSPORT, since=55)] == [70.0]
    p.A.set_persistent_keepalive(p.pa, 0, 100.0)
    p.net.run(100.0, 119.0)
    assert not p.net.sent(src=A_ADDR, kind=MSG_TRANSPORT, since=100)


def test_keepalive_after_rekey_after_time_starts_handshake() -> None:
    # A keepalive is a send like any other: past REKEY_AFTER_TIME it triggers a rekey.
    p = Pair()
    p.establish(0.0)
    old = p.pa.current
    p.A.set_persistent_keepalive(p.pa, 25, 100.0)
    p.net.run(100.0, 126.0)
    assert [t for t, *_ in p.net.sent(src=A_ADDR, kind=MSG_INITIATION, since=1)] == [125.0]
    assert p.pa.current is not old and p.pa.previous is old


def test_zero_key_material_after_three_reject_after_time() -> None:
    p = Pair()
    p.establish(0.0)
    p.net.run(0.0, 3 * REJECT_AFTER_TIME - 0.1)
    assert p.pa.current is not None and p.pb.current is not None
    assert len(p.A.indices) == 1 and len(p.B.indices) == 1
    p.net.run(3 * REJECT_AFTER_TIME - 0.1, 3 * REJECT_AFTER_TIME + 1)
    assert p.pa.keypairs() == [] and p.pb.keypairs() == []
    assert len(p.A.indices) == 0 and len(p.B.indices) == 0
    assert any(ev == "keypair_gone" for ev, _ in p.A.events)
    assert p.A.get_timer() is None and p.B.get_timer() is None


def test_timers_idle_engine() -> None:
    p = Pair()
    assert p.A.get_timer() is None
    p.A.handle_timer(1000.0)
    assert p.A.datagrams == []


# ------------------------------------------------------------------ anti-replay


def test_replayed_initiation_rejected() -> None:
    p = Pair()
    p.A.initiate_handshake(p.pa, 0.0)
    msg = p.A.datagrams[0][0]
    p.net.pump(0.0)
    kp = p.pb.current
    p.B.receive_datagram(msg, EVIL, 5.0)
    assert p.B.drops["stale_timestamp"] == 1
    assert p.pb.current is kp and p.pb.next is None
    assert p.pb.endpoint == A_ADDR
    assert p.B.datagrams == []


def test_older_timestamp_rejected() -> None:
    p = Pair()
    p.establish(0.0)
    stamp = crypto.tai64n(int((WALL - 60) * 1e9))  # a minute older than A's
    msg = craft_initiation(p.ka, p.pub_b, int((WALL - 60) * 1e9), 10.0, seed=3)
    assert len(msg) == 148 and stamp < p.pb.latest_timestamp
    p.B.receive_datagram(msg, A_ADDR, 10.0)
    assert p.B.drops["stale_timestamp"] == 1
    # A clock that steps back makes A's own initiations stale too.
    p.A.wall_offset = WALL - 3600
    p.pa.last_sent_handshake = float("-inf")
    p.A.initiate_handshake(p.pa, 20.0)
    p.net.pump(20.0)
    assert p.B.drops["stale_timestamp"] == 2
    # A newer timestamp is accepted.
    msg = craft_initiation(p.ka, p.pub_b, int((WALL + 3600) * 1e9), 30.0, seed=4)
    p.B.receive_datagram(msg, A_ADDR, 30.0)
    assert p.B.stats["responses_sent"] == 2


def test_initiation_flood_per_peer() -> None:
    # At most INITIATIONS_PER_SECOND (50) consumed initiations per second per peer.
    p = Pair()
    base = int(WALL * 1e9)
    first = craft_initiation(p.ka, p.pub_b, base, 0.0, seed=1)
    second = craft_initiation(p.ka, p.pub_b, base + 10**9, 0.01, seed=2)
    third = craft_initiation(p.ka, p.pub_b, base + 2 * 10**9, 0.03, seed=3)
    p.B.receive_datagram(first, A_ADDR, 0.0)
    p.B.receive_datagram(second, A_ADDR, 0.01)
    assert p.B.drops["initiation_flood"] == 1
    p.B.receive_datagram(third, A_ADDR, 0.03)  # 30 ms later: allowed again
    assert p.B.stats["responses_sent"] == 2


# ----------------------------------------------------------------------- roaming


def test_roaming_follows_authenticated_packets_only() -> None:
    p = Pair()
    p.establish(0.0)
    assert p.pb.endpoint == A_ADDR
    # A moves; its next authenticated packet moves B's endpoint for it.
    new_addr = ("198.51.100.7", 40000)
    p.net.attach(p.A, new_addr)
    p.a_to_b(1.0)
    p.net.pump(1.0)
    assert p.pb.endpoint == new_addr
    reply = p.b_to_a(2.0)
    p.net.pump(2.0)
    assert p.A.tun[-1] == reply
    # Unauthenticated or replayed packets from elsewhere never move it.
    kp = p.pb.current
    forged = struct.pack("<IIQ", 4, kp.local_index, 99) + bytes(48)
    p.B.receive_datagram(forged, EVIL, 3.0)
    captured = p.net.sent(src=new_addr, kind=MSG_TRANSPORT)[-1][3]
    p.B.receive_datagram(captured, EVIL, 3.0)
    stale = p.net.sent(src=A_ADDR, kind=MSG_INITIATION)[0][3]
    p.B.receive_datagram(stale, EVIL, 3.0)
    p.B.receive_datagram(b"\x02\x00\x00\x00" + bytes(88), EVIL, 3.0)
    assert p.B.drops["bad_tag"] == 1
    assert p.B.drops["replay"] == 1
    assert p.B.drops["stale_timestamp"] == 1
    assert p.B.drops["bad_mac1"] == 1
    assert p.pb.endpoint == new_addr
    assert [ev for ev, peer in p.B.events if ev == "endpoint"] == ["endpoint"] * 2


def test_endpoint_learned_from_response_too() -> None:
    p = Pair()
    p.pa.endpoint = ("192.0.2.99", 1)  # a stale endpoint, but B answers from B_ADDR
    p.net.attach(p.B, ("192.0.2.99", 1))
    p.A.initiate_handshake(p.pa, 0.0)
    p.net.send_from(p.A, 0.0)
    p.net.attach(p.B, B_ADDR)
    p.net.pump(0.0)
    assert p.pa.endpoint == B_ADDR


# ------------------------------------------------------------- under load / cookies


def test_under_load_cookie_reply_then_mac2_accepted() -> None:
    p = Pair()
    flood(p.B, p.pub_b, 10.0, UNDER_LOAD_HANDSHAKES_PER_SECOND + 2)
    assert p.B.under_load(10.0)
    assert p.B.stats["cookie_replies_sent"] >= 2
    p.A.initiate_handshake(p.pa, 10.0)
    p.net.pump(10.0)
    # B answered with a cookie reply, not a response; A stored the cookie.
    assert [mtype(d) for *_, d in p.net.sent(src=B_ADDR)] == [MSG_COOKIE_REPLY]
    assert p.A.stats["cookies_received"] == 1
    assert p.pa.cookies.cookie is not None and p.pa.current is None
    # A's retransmission carries mac2 and is accepted while B is still under load.
    t = p.A.get_timer()
    assert 15.0 <= t <= 15.0 + REKEY_TIMEOUT_JITTER_MAX
    flood(p.B, p.pub_b, t, UNDER_LOAD_HANDSHAKES_PER_SECOND)
    assert p.B.under_load(t)
    p.A.handle_timer(t)
    retry = p.A.datagrams[0][0]
    assert retry[-16:] != bytes(16)
    p.net.pump(t)
    assert p.pa.current is not None and p.pb.current is not None
    pkt = p.a_to_b(t)
    p.net.pump(t)
    assert p.B.tun == [pkt]
    # Per-source rate limit: replays of the same valid message are limited to the burst.
    before = p.B.drops["stale_timestamp"]
    for _ in range(10):
        p.B.receive_datagram(retry, A_ADDR, t)
    limited = p.B.drops["rate_limited"]
    assert limited >= 10 - PACKETS_BURSTABLE
    assert limited + p.B.drops["stale_timestamp"] - before == 10
    # Another source with its own cookie is not limited by A's bucket.
    src2 = ("198.18.7.7", 7777)
    gen = CookieGenerator(p.pub_b)
    base = int((WALL + 100) * 1e9)
    first = craft_initiation(p.ka, p.pub_b, base, t, seed=11, gen=gen)
    p.B.receive_datagram(first, src2, t)
    (reply, to), = p.B.datagrams
    p.B.datagrams.clear()
    assert mtype(reply) == MSG_COOKIE_REPLY and to == src2
    assert gen.consume_reply(CookieReply.unpack(reply), t)
    second = craft_initiation(p.ka, p.pub_b, base + 10**9, t + 0.1, seed=12, gen=gen)
    p.B.receive_datagram(second, src2, t + 0.1)
    assert p.B.drops["rate_limited"] == limited
    assert [mtype(d) for d, _ in p.B.datagrams] == [MSG_RESPONSE]


def test_under_load_engaged_counted_once_per_episode() -> None:
    p = Pair()
    flood(p.B, p.pub_b, 10.0, UNDER_LOAD_HANDSHAKES_PER_SECOND - 1)
    assert not p.B.under_load(10.0) and p.B.stats["under_load_engaged"] == 0
    flood(p.B, p.pub_b, 10.5, 50)  # same 1 s window: the threshold is crossed once
    assert p.B.under_load(10.5) and p.B.stats["under_load_engaged"] == 1
    flood(p.B, p.pub_b, 11.2, UNDER_LOAD_HANDSHAKES_PER_SECOND + 5)  # still loaded: same one
    assert p.B.stats["under_load_engaged"] == 1
    assert not p.B.under_load(12.3)  # hold (1 s) over: a new flood is a new episode
    flood(p.B, p.pub_b, 12.3, UNDER_LOAD_HANDSHAKES_PER_SECOND)
    assert p.B.under_load(12.3) and p.B.stats["under_load_engaged"] == 2


def test_not_under_load_mac2_ignored() -> None:
    p = Pair()
    p.A.initiate_handshake(p.pa, 0.0)
    msg = p.A.datagrams[0][0]
    assert msg[-16:] == bytes(16)
    p.net.pump(0.0)
    assert not p.B.under_load(0.0)
    assert p.B.stats["cookie_replies_sent"] == 0 and p.pa.current is not None


def test_under_load_ends_after_a_quiet_second() -> None:
    p = Pair()
    flood(p.B, p.pub_b, 0.0, UNDER_LOAD_HANDSHAKES_PER_SECOND)
    assert p.B.under_load(0.5)
    assert not p.B.under_load(1.01)
    p.A.initiate_handshake(p.pa, 2.0)
    p.net.pump(2.0)
    assert p.pa.current is not None


def test_cookie_reply_for_unknown_index_or_bad_cookie() -> None:
    p = Pair()
    p.B.receive_datagram(CookieReply(1234, bytes(24), bytes(32)).pack(), EVIL, 0.0)
    assert p.B.drops["unknown_index"] == 1
    p.A.initiate_handshake(p.pa, 0.0)
    idx = p.pa.handshake.local_index
    p.A.receive_datagram(CookieReply(idx, bytes(24), bytes(32)).pack(), EVIL, 0.0)
    assert p.A.drops["bad_cookie"] == 1 and p.pa.cookies.cookie is None


def test_ratelimiter_policy() -> None:
    rl = RateLimiter()
    a = bytes([192, 0, 2, 1])
    assert [rl.allow(a, 0.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert rl.allow(bytes([192, 0, 2, 2]), 0.0)  # other sources have their own bucket
    assert rl.allow(a, 0.051)  # one token refills in 1/20 s
    assert not rl.allow(a, 0.052)
    # IPv6 sources share a bucket per /64.
    v6 = bytes.fromhex("20010db8000000010000000000000001")
    same64 = bytes.fromhex("20010db80000000100000000deadbeef")
    other64 = bytes.fromhex("20010db8000000020000000000000001")
    assert all(rl.allow(v6, 1.0) for _ in range(5))
    assert not rl.allow(same64, 1.0)
    assert rl.allow(other64, 1.0)
    small = RateLimiter(max_entries=2)
    assert small.allow(b"\1\1\1\1", 0.0) and small.allow(b"\2\2\2\2", 0.0)
    assert not small.allow(b"\3\3\3\3", 0.0)  # table full: refuse, do not grow
    assert small.allow(b"\3\3\3\3", 2.0)  # idle entries are forgotten
    assert len(small) == 1


# ------------------------------------------------------- transport-layer hostility


def test_malformed_and_forged_transport_dropped_session_survives() -> None:
    p = Pair()
    p.establish(0.0)
    p.net.drop = lambda s, d, data: mtype(data) == MSG_TRANSPORT
    pkt = p.a_to_b(1.0, b"z" * 40)
    p.net.pump(1.0)
    (src, _, good), = p.net.held
    p.net.drop = None
    kp = p.pb.current
    deliver = p.B.receive_datagram

    def flip(i: int) -> bytes:
        b = bytearray(good)
        b[i] ^= 0x01
        return bytes(b)

    cases = {
        "malformed": [good[:31], b"", b"\x04", flip(0), flip(1), flip(3),
                      b"\xff" + random.Random(1).randbytes(99)],
        "unknown_index": [flip(4), flip(7)],
        # Counter bytes 9, 14, 15 move the nonce ahead of the window: it fails to open.
        "bad_tag": [good[:-1], good[:32], flip(9), flip(14), flip(15), flip(16),
                    flip(len(good) // 2), flip(len(good) - 16), flip(len(good) - 1)],
    }
    for reason, datagrams in cases.items():
        for d in datagrams:
            before = p.B.drops[reason]
            deliver(d, EVIL, 1.5)
            assert p.B.drops[reason] == before + 1, (reason, d[:16].hex())
    # Wrong key: a well-formed packet for B's index sealed with another key.
    wrong = struct.pack("<IIQ", 4, kp.local_index, 5) + crypto.aead_encrypt(
        bytes(range(32)), 5, ip4("10.0.0.1", "10.0.0.2"), b""
    )
    deliver(wrong, EVIL, 1.5)
    assert p.B.drops["bad_tag"] == len(cases["bad_tag"]) + 1
    assert p.B.tun == [] and p.pb.endpoint == A_ADDR
    # The genuine packet still decrypts afterwards, once.
    deliver(good, src, 1.6)
    deliver(good, src, 1.7)
    assert p.B.tun == [pkt] and p.B.drops["replay"] == 1
    assert p.pb.current is kp
    nxt = p.a_to_b(2.0)
    back = p.b_to_a(2.0)
    p.net.pump(2.0)
    assert p.B.tun[-1] == nxt and p.A.tun[-1] == back


def test_replay_window_accepts_reordering() -> None:
    p = Pair()
    p.establish(0.0)
    p.net.drop = lambda s, d, data: mtype(data) == MSG_TRANSPORT
    pkts = [p.a_to_b(1.0, bytes([i]) * 20) for i in range(5)]
    p.net.pump(1.0)
    held = [d for *_, d in p.net.held]
    for i in (4, 0, 2, 1, 3, 2, 4):
        p.B.receive_datagram(held[i], A_ADDR, 1.5)
    assert p.B.tun == [pkts[i] for i in (4, 0, 2, 1, 3)]
    assert p.B.drops["replay"] == 2
    # accepted below the greatest counter seen: 0, 2, 1 and 3 (not the replays)
    assert p.B.stats["rx_out_of_order"] == 4


def test_inner_source_must_be_allowed() -> None:
    p = Pair()
    p.establish(0.0)
    # Another peer C of B owns 10.0.0.3: A must not be able to speak for it.
    _, pub_c = keypair(77)
    pc = p.B.add_peer(pub_c)
    p.B.allowed.insert("10.0.0.3/32", pc)
    for src in ("10.9.9.9", "10.0.0.3", "10.0.0.2"):
        p.A.send_packet(ip4(src, "10.0.0.2"), 1.0)
    p.A.send_packet(ip6("fd00::99", "fd00::2"), 1.0)
    p.net.pump(1.0)
    assert p.B.drops["allowedips_source"] == 4 and p.B.tun == []
    ok = p.a_to_b(2.0)
    p.net.pump(2.0)
    assert p.B.tun == [ok]


def test_no_route_dropped() -> None:
    p = Pair()
    p.A.send_packet(ip4("10.0.0.1", "10.99.0.1"), 0.0)
    p.A.send_packet(ip6("fd00::1", "fd99::1"), 0.0)
    p.A.send_packet(b"\x45" + bytes(10), 0.0)  # too short to have a destination
    p.A.send_packet(b"", 0.0)
    assert p.A.drops["no_peer_for_destination"] == 4
    assert p.A.datagrams == [] and p.pa.handshake is None


def test_staged_queue_is_bounded() -> None:
    p = Pair()
    p.net.drop = lambda s, d, data: True
    for i in range(MAX_STAGED_PACKETS + 3):
        p.a_to_b(0.0, i.to_bytes(2, "big"))
    assert len(p.pa.staged) == MAX_STAGED_PACKETS
    assert p.A.drops["staged_overflow"] == 3
    # Only one initiation despite the many packets (REKEY_TIMEOUT rate limit).
    p.net.pump(0.0)
    assert len(p.net.sent(kind=MSG_INITIATION)) == 1


def test_send_without_endpoint() -> None:
    p = Pair()
    p.pa.endpoint = None
    p.a_to_b(0.0)
    assert p.A.drops["no_endpoint"] >= 1 and p.A.datagrams == []


# ------------------------------------------------------------- padding and MTU


@pytest.mark.parametrize("payload_len", [0, 1, 11, 12, 27, 100, 1379, 1380, 1381, 1400])
def test_padding_v4(payload_len: int) -> None:
    p = Pair()
    p.establish(0.0)
    pkt = p.a_to_b(1.0, bytes([0xAB]) * payload_len)
    (dg, _), = p.A.datagrams
    assert len(dg) == 16 + padded_len(len(pkt), 1420) + 16
    assert (len(dg) - 32) % 16 == 0 or len(dg) - 32 == max(1420, len(pkt))
    p.net.pump(1.0)
    assert p.B.tun == [pkt]


@pytest.mark.parametrize("payload_len", [0, 1, 7, 8, 9, 100, 1359, 1360, 1380])
def test_padding_v6(payload_len: int) -> None:
    p = Pair()
    p.establish(0.0)
    pkt = ip6("fd00::1", "fd00::2", bytes([0xCD]) * payload_len)
    p.A.send_packet(pkt, 1.0)
    (dg, _), = p.A.datagrams
    assert len(dg) == 16 + padded_len(len(pkt), 1420) + 16
    p.net.pump(1.0)
    assert p.B.tun == [pkt]


def test_inner_length_trims_and_bounds() -> None:
    p = Pair()
    p.establish(0.0)
    # Trailing bytes beyond the IPv4 total length are cut like padding.
    pkt = ip4("10.0.0.1", "10.0.0.2", b"abcdef" + b"JUNK", total=26)
    p.A.send_packet(pkt, 1.0)
    # A total length larger than what arrived, or smaller than a header, is refused.
    p.A.send_packet(ip4("10.0.0.1", "10.0.0.2", b"abc", total=200), 1.0)
    p.A.send_packet(ip4("10.0.0.1", "10.0.0.2", b"abc", total=19), 1.0)
    bad6 = bytearray(ip6("fd00::1", "fd00::2", b"abc"))
    bad6[4:6] = (500).to_bytes(2, "big")
    p.A.send_packet(bytes(bad6), 1.0)
    p.net.pump(1.0)
    assert p.B.tun == [pkt[:26]]
    assert p.B.drops["bad_inner_packet"] == 3


def test_inner_packet_that_is_not_ip_is_dropped() -> None:
    p = Pair()
    p.establish(0.0)
    kp = p.pa.current
    for plain in (b"\x10" + bytes(40), b"\x45" + bytes(10), b"\x60" + bytes(20)):
        counter = kp.send_counter
        kp.send_counter += 1
        dg = struct.pack("<IIQ", 4, kp.remote_index, counter) + kp.sender.encrypt(
            crypto.nonce_for(counter), plain, None
        )
        p.B.receive_datagram(dg, A_ADDR, 1.0)
    assert p.B.drops["bad_inner_packet"] == 3 and p.B.tun == []
    # It was authenticated, so it still counts as data received (kernel receive.c
    # calls wg_timers_data_received before the inner checks): a keepalive follows.
    p.net.run(1.0, 12.0)
    assert [len(d) for *_, d in p.net.sent(src=B_ADDR, kind=MSG_TRANSPORT)] == [32]


# ------------------------------------------------------------ configuration rules

# libsodium has_small_order() (jedisct1/libsodium,
# src/libsodium/crypto_scalarmult/curve25519/ref10/x25519_ref10.c):
# 0, 1, two order-8 points, p-1, p, p+1 -- the list lives in test_crypto.py.
from test_crypto import LOW_ORDER  # noqa: E402  (one list of the published points)


@pytest.mark.parametrize("key", LOW_ORDER + [k[:31] + bytes([k[31] | 0x80]) for k in LOW_ORDER])
def test_add_peer_refuses_low_order_keys(key: bytes) -> None:
    eng = Engine(keypair(1)[0], random=rng(1))
    with pytest.raises(ConfigError):
        eng.add_peer(key)
    assert eng.peers == {}


@pytest.mark.parametrize("key", [b"", bytes(31), bytes(33)])
def test_add_peer_refuses_bad_length(key: bytes) -> None:
    eng = Engine(keypair(1)[0], random=rng(1))
    with pytest.raises(ConfigError):
        eng.add_peer(key)
    with pytest.raises(ConfigError):
        eng.set_private_key(key or bytes(5))


def test_add_peer_is_idempotent() -> None:
    eng = Engine(keypair(1)[0], random=rng(1))
    pub = keypair(2)[1]
    assert eng.add_peer(pub) is eng.add_peer(pub)
    assert isinstance(eng.add_peer(pub), Peer)


def test_private_key_change_clears_sessions() -> None:
    p = Pair()
    p.establish(0.0)
    p.net.drop = lambda s, d, data: mtype(data) == MSG_TRANSPORT
    p.b_to_a(1.0)
    p.net.pump(1.0)
    (src, _, old_packet), = p.net.held
    p.net.drop = None
    new_priv, new_pub = keypair(55)
    p.A.set_private_key(new_priv)
    assert p.A.public_key == new_pub
    assert p.pa.keypairs() == [] and p.pa.handshake is None and len(p.A.indices) == 0
    assert any(ev == "keypair_gone" for ev, _ in p.A.events)
    p.A.receive_datagram(old_packet, src, 2.0)
    assert p.A.drops["unknown_index"] == 1 and p.A.tun == []
    # A new handshake may start at once (the kernel resets last_sent_handshake).
    p.a_to_b(2.0)
    assert [mtype(d) for d, _ in p.A.datagrams] == [MSG_INITIATION]
    p.net.pump(2.0)
    assert p.B.drops["unknown_peer"] == 1  # B still knows A by its old key
    p.B.remove_peer(p.pub_a)
    pb2 = p.B.add_peer(new_pub)
    p.B.allowed.insert("10.0.0.1/32", pb2)
    p.net.run(2.0, 10.0)
    assert p.pa.current is not None and pb2.current is not None
    assert len(p.B.tun) == 1
    # Setting the same key again changes nothing.
    kp = p.pa.current
    p.A.set_private_key(new_priv)
    assert p.pa.current is kp


def test_private_key_equal_to_a_peer_removes_that_peer() -> None:
    p = Pair()
    p.establish(0.0)
    p.A.set_private_key(p.kb)  # A now has B's identity: B can no longer be its peer
    assert p.pub_b not in p.A.peers
    assert len(p.A.indices) == 0
    assert p.A.allowed.lookup("10.0.0.2") is None


def test_engine_without_private_key() -> None:
    p = Pair()
    p.A.initiate_handshake(p.pa, 0.0)
    msg = p.A.datagrams[0][0]
    p.B.set_private_key(None)
    p.B.receive_datagram(msg, A_ADDR, 0.0)
    assert p.B.drops["no_private_key"] == 1
    p.b_to_a(0.0)
    assert p.B.datagrams == []


def test_remove_peer_clears_indices() -> None:
    p = Pair()
    p.establish(0.0)
    p.a_to_b(1.0)
    p.net.pump(1.0)
    assert len(p.B.indices) == 1
    p.B.remove_peer(p.pub_a)
    assert len(p.B.indices) == 0 and p.pub_a not in p.B.peers
    assert p.B.allowed.lookup("10.0.0.1") is None
    assert p.pb.timers.next_deadline() is None and p.B.get_timer() is None
    p.a_to_b(2.0)
    p.net.pump(2.0)
    assert p.B.drops["unknown_index"] == 1
    p.B.send_packet(ip4("10.0.0.2", "10.0.0.1"), 2.0)
    assert p.B.drops["no_peer_for_destination"] == 1
    p.B.remove_peer(p.pub_a)  # removing twice is harmless


def test_remove_peer_with_pending_handshake() -> None:
    p = Pair()
    p.A.initiate_handshake(p.pa, 0.0)
    assert len(p.A.indices) == 1
    p.A.remove_peer(p.pub_b)
    assert len(p.A.indices) == 0 and p.A.get_timer() is None
    p.net.pump(0.0)  # B's response finds no handshake
    assert p.A.drops["unknown_index"] == 1


# ------------------------------------------------------------ fuzzing the input


def _snapshot(peer: Peer) -> tuple:
    def kp(k: Keypair | None) -> tuple | None:
        if k is None:
            return None
        return (id(k), k.send_key, k.recv_key, k.local_index, k.remote_index)

    return (peer.endpoint, kp(peer.current), kp(peer.previous), kp(peer.next),
            peer.latest_timestamp)


@st.composite
def hostile_datagrams(draw: st.DrawFn) -> tuple[int, bytes, bool, int]:
    kind = draw(st.sampled_from(["raw", "typed", "transport", "mac1"]))
    index_choice = draw(st.integers(0, 3))
    if kind == "raw":
        return index_choice, draw(st.binary(max_size=300)), False, 0
    if kind == "typed":
        t = draw(st.sampled_from([1, 2, 3, 4]))
        size = {1: 148, 2: 92, 3: 64, 4: draw(st.integers(32, 200))}[t]
        return index_choice, bytes([t, 0, 0, 0]) + draw(
            st.binary(min_size=size - 4, max_size=size - 4)), False, t
    if kind == "transport":
        counter = draw(st.integers(0, 2**64 - 1))
        body = draw(st.binary(min_size=16, max_size=120))
        return index_choice, struct.pack("<IIQ", 4, 0, counter) + body, True, 4
    t = draw(st.sampled_from([1, 2]))
    size = 148 if t == 1 else 92
    return index_choice, bytes([t, 0, 0, 0]) + draw(
        st.binary(min_size=size - 36, max_size=size - 36)) + bytes(32), True, t


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=st.lists(hostile_datagrams(), min_size=1, max_size=8),
       src=st.sampled_from([A_ADDR, EVIL, ("2001:db8::1", 1), ("0.0.0.0", 0)]),
       now=st.floats(0.0, 500.0))
def test_hostile_datagrams_never_raise_or_change_state(items, src, now) -> None:
    p = Pair(seed=3)
    p.establish(0.0)
    before = _snapshot(p.pb)
    kp = p.pb.current
    for index_choice, data, fix, t in items:
        if fix and t == 4:
            idx = [kp.local_index, kp.remote_index, 0, 0xFFFFFFFF][index_choice]
            data = data[:4] + struct.pack("<I", idx) + data[8:]
        elif fix:
            data = CookieGenerator(p.pub_b).add_macs(data, now)
        p.B.receive_datagram(data, src, now)
    assert _snapshot(p.pb) == before
    assert p.B.tun == []
    assert p.pb.current is kp
    for data, _ in p.B.datagrams:
        assert mtype(data) == MSG_COOKIE_REPLY  # the only thing junk can earn


def test_bad_mac1_flood_also_puts_under_load() -> None:
    """Like the kernel's handshake queue, the load count includes messages whose mac1
    fails: otherwise a flood of random 148-byte initiations never switches on XDP's
    initiation rate limits and all of it reaches Python."""
    p = Pair()
    junk = bytes([1, 0, 0, 0]) + bytes(144)
    for _ in range(UNDER_LOAD_HANDSHAKES_PER_SECOND):
        p.B.receive_datagram(junk, EVIL, 10.0)
    assert p.B.drops["bad_mac1"] == UNDER_LOAD_HANDSHAKES_PER_SECOND
    assert p.B.under_load(10.0) and p.B.stats["under_load_engaged"] == 1
    assert p.B.datagrams == []  # no cookie reply to a message without a valid mac1


# ------------------------------------------------- low-order keys in handshakes (issue 6)
# Keys of low order are refused at configuration time (above), so a handshake with
# such a peer cannot even start.  What remains is an attacker who puts a low-order
# point into the *ephemeral* field of an otherwise well-formed message (valid mac1):
# the first DH gives the all-zero value and the message must be dropped before any
# state changes, for all 14 encodings (7 points, with and without the high bit).

LOW_ORDER_ENCODINGS = LOW_ORDER + [k[:31] + bytes([k[31] | 0x80]) for k in LOW_ORDER]


@pytest.mark.parametrize("point", LOW_ORDER_ENCODINGS,
                         ids=[f"low{i}" for i in range(len(LOW_ORDER_ENCODINGS))])
def test_initiation_with_low_order_ephemeral_never_completes(point: bytes) -> None:
    p = Pair()
    p.A.initiate_handshake(p.pa, 0.0)
    (init, ep), = p.net.take(p.A)
    forged = CookieGenerator(p.pub_b).add_macs(init[:8] + point + init[40:116] + bytes(32), 0.0)
    assert len(forged) == len(init) and forged[8:40] == point
    p.B.receive_datagram(forged, A_ADDR, 0.0)
    assert p.B.datagrams == []  # no response, no cookie reply
    assert p.B.drops["handshake_auth"] == 1, dict(p.B.drops)
    assert p.pb.keypairs() == [] and p.pb.handshake is None and len(p.B.indices) == 0
    # The genuine initiation still works afterwards: nothing was poisoned.
    p.B.receive_datagram(init, A_ADDR, 0.1)
    p.net.pump(0.1)
    assert p.pa.current is not None and p.pb.keypairs() != []


@pytest.mark.parametrize("point", LOW_ORDER_ENCODINGS,
                         ids=[f"low{i}" for i in range(len(LOW_ORDER_ENCODINGS))])
def test_response_with_low_order_ephemeral_never_completes(point: bytes) -> None:
    p = Pair()
    p.A.initiate_handshake(p.pa, 0.0)
    p.net.send_from(p.A, 0.0)  # B answers
    (resp, _), = p.net.take(p.B)
    assert mtype(resp) == MSG_RESPONSE
    body = resp[:12] + point + resp[44:60] + bytes(32)
    forged = CookieGenerator(p.pub_a).add_macs(body, 0.0)
    p.A.receive_datagram(forged, B_ADDR, 0.0)
    assert p.A.datagrams == []
    assert p.A.drops["handshake_auth"] == 1, dict(p.A.drops)
    assert p.pa.keypairs() == []
    assert p.pa.handshake is not None  # still waiting for a genuine response
    p.A.receive_datagram(resp, B_ADDR, 0.1)
    assert p.pa.current is not None


# ------------------------------------------- a peer restarting with the same key (issue 6)

def test_restarted_peer_handshakes_again_and_old_session_is_dropped() -> None:
    """B loses all state (process restart, same key) and initiates; A accepts it.

    Like the kernel (noise.c add_new_keypair): the old session S1 survives as
    `previous` for one rotation, so in-flight packets of it still arrive (replay
    protected), and is gone after the next handshake: its packets then count as
    unknown_index and never reach the TUN.
    """
    p = Pair()
    p.establish(0.0)
    p.net.drop = lambda s, d, data: mtype(data) == MSG_TRANSPORT
    p.b_to_a(1.0, b"s1-delivered")
    p.b_to_a(1.0, b"s1-in-flight")
    p.net.pump(1.0)
    p.net.drop = None
    (s1, _, delivered), (_, _, in_flight) = p.net.held
    p.A.receive_datagram(delivered, s1, 1.0)
    assert len(p.A.tun) == 1
    old_index = p.pa.current.local_index
    for restart, now in enumerate((5.0, 10.0)):
        # B restarts: a new engine with the same private key, knowing A's endpoint.
        p.B = Engine(p.kb, random=rng(100 + restart), wall_offset=WALL + now)
        p.pb = p.B.add_peer(p.pub_a)
        p.B.allowed.insert("10.0.0.1/32", p.pb)
        p.pb.endpoint = A_ADDR
        p.net.attach(p.B, B_ADDR)
        p.b_to_a(now, f"after restart {restart}".encode())
        p.net.run(now, now + 1.0)
        assert p.pb.current is not None and p.pb.current.initiator
        assert p.pa.current is not None and p.pa.current.remote_index == \
            p.pb.current.local_index, "A did not take the new session"
        assert p.A.tun[-1].endswith(f"after restart {restart}".encode())
        if restart == 0:
            assert p.pa.previous is not None and p.pa.previous.local_index == old_index
            tun = len(p.A.tun)
            p.A.receive_datagram(delivered, s1, now + 1.0)  # a replay of S1
            assert len(p.A.tun) == tun and p.A.drops["replay"] == 1
    assert old_index not in p.A.indices
    assert all(kp.local_index != old_index for kp in p.pa.keypairs())
    tun = len(p.A.tun)
    p.A.receive_datagram(delivered, s1, 11.0)
    p.A.receive_datagram(in_flight, s1, 11.0)  # never delivered, still refused
    assert len(p.A.tun) == tun and p.A.drops["unknown_index"] == 2


# ------------------------------------------------- the transport send invariant

@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a"] * 4 + ["b"] * 4 + ["rekey_a", "rekey_b", "wait"]),
                          st.sampled_from([0.0, 0.1, 1.0, 10.0, 70.0])),
                min_size=20, max_size=80))
def test_no_key_and_counter_pair_is_sent_twice(steps: list[tuple[str, float]]) -> None:
    """One (key, counter) pair is sent at most once (Keypair.reserve's invariant), on
    the engine's own transport path too, whatever the mix of traffic, rekeys by count
    and by time, and handshakes started from either side."""
    p = Pair(limits=Limits(rekey_after_messages=7, reject_after_messages=12,
                           rekey_after_time=60.0, reject_after_time=90.0))
    t = 0.0
    p.establish(t)
    for action, dt in steps:
        t += dt
        if action == "a":
            p.a_to_b(t)
        elif action == "b":
            p.b_to_a(t)
        elif action == "rekey_a":
            p.A.initiate_handshake(p.pa, t)
        elif action == "rekey_b":
            p.B.initiate_handshake(p.pb, t)
        p.net.run(t, t + 0.001)
    seen = set()
    for _, src, _, data in p.net.sent(kind=MSG_TRANSPORT):
        receiver, counter = struct.unpack_from("<IQ", data, 4)
        assert (src, receiver, counter) not in seen
        seen.add((src, receiver, counter))
    assert seen
