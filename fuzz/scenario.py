"""A deterministic WireGuard exchange between in-memory Engines, for property tests and fuzzing.

`build()` runs three engines A, B, C (B is the peer of both A and C) through a scripted
exchange with a fixed clock and seeded randomness, logging every datagram:

* t=0   A -> B handshake (initiation, response, confirming keepalive),
* t=1   transport data both ways between A and B,
* t=2   B is flooded into "under load"; C's initiation earns a cookie reply,
* t=8   B is flooded again; C's retransmitted initiation carries a valid mac2 and
        passes the rate limiter; C <-> B handshake completes,
* t=10  transport data both ways between C and B,
* t=12  A starts a second handshake whose initiation is held back (never delivered),
        so A has a pending handshake next to its current session,
* t=14  D, a stranger with a valid key that neither A nor B knows, sends both a
        correct initiation (dropped as unknown_peer).

At `T_FUZZ` the targets A and B are in a rich state (current keypairs, a pending
handshake, a stored cookie, armed timers). `Scenario.seen[target]` lists captured
datagrams the target may receive again without any right to change state: everything
except datagrams addressed to it that it has not processed yet (the held initiation).

`engine_state()` is a deep snapshot of everything an unauthenticated datagram must not
change. It leaves out `drops`/`stats` counters and the anti-DoS load accounting
(`LoadAccounting`): the handshake-per-second window, the rate limiter's buckets and the
cookie secret legitimately count mac1-valid handshake messages before any authentication,
as the whitepaper's cookie mechanism (section 5.3) requires.
"""

from __future__ import annotations

import ipaddress
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from wgx.protocol import crypto
from wgx.protocol.engine import Engine
from wgx.protocol.messages import (
    MAC_LEN,
    MSG_COOKIE_REPLY,
    MSG_INITIATION,
    MSG_RESPONSE,
    MSG_TRANSPORT,
    CookieReply,
    Initiation,
    MessageError,
    Response,
    inner_packet_length,
    message_type,
    pack_transport_header,
    unpack_transport_header,
)
from wgx.protocol.peer import Endpoint, Keypair, Peer, endpoint_bytes

A_ADDR: Endpoint = ("198.18.0.1", 51820)
B_ADDR: Endpoint = ("198.18.0.2", 51820)
C_ADDR: Endpoint = ("198.18.0.3", 51820)
D_ADDR: Endpoint = ("198.18.0.4", 51820)
EVIL4: Endpoint = ("203.0.113.66", 6666)
EVIL6: Endpoint = ("2001:db8::66", 6666)
SOURCES: tuple[Endpoint, ...] = (A_ADDR, B_ADDR, EVIL4, EVIL6)
WALL = 1_700_000_000.0
T_FUZZ = 20.0  # all sessions alive (REJECT_AFTER_TIME is 180 s)
T_LATE = T_FUZZ + 200.0  # every keypair of the scenario has expired
FLOOD = 130  # > UNDER_LOAD_HANDSHAKES_PER_SECOND mac1-valid messages within one second


def rng(seed: int) -> Callable[[int], bytes]:
    return random.Random(seed).randbytes


def static_key(seed: int) -> tuple[bytes, bytes]:
    priv = crypto.clamp(random.Random(seed).randbytes(32))
    return priv, crypto.public_key(priv)


def ip4(src: str, dst: str, payload: bytes) -> bytes:
    """A minimal IPv4/UDP-protocol packet (no UDP header needed by the engine)."""
    return struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, 17, 0,
        ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed,
    ) + payload


@dataclass
class Scenario:
    engines: dict[str, Engine]
    addr: dict[str, Endpoint]
    captured: list[tuple[Endpoint, Endpoint, bytes]] = field(default_factory=list)
    held: list[tuple[Endpoint, Endpoint, bytes]] = field(default_factory=list)
    seen: dict[str, list[bytes]] = field(default_factory=dict)

    def by_type(self, t: int) -> list[bytes]:
        return [d for _, _, d in self.captured if d[0] == t]


class _Net:
    def __init__(self, sc: Scenario) -> None:
        self.sc = sc
        self.at = {sc.addr[n]: e for n, e in sc.engines.items()}
        self.hold: Callable[[Endpoint, Endpoint, bytes], bool] = lambda s, d, b: False

    def pump(self, now: float) -> None:
        for _ in range(50):
            moved = 0
            for name, eng in self.sc.engines.items():
                src = self.sc.addr[name]
                out, eng.datagrams[:] = eng.datagrams[:], []
                for data, dst in out:
                    moved += 1
                    self.sc.captured.append((src, dst, data))
                    if self.hold(src, dst, data):
                        self.sc.held.append((src, dst, data))
                    elif dst in self.at:
                        self.at[dst].receive_datagram(data, src, now)
            if not moved:
                return
        raise AssertionError("scenario did not settle")


def flood(eng: Engine, msg: bytes, src: Endpoint, now: float) -> None:
    """Put `eng` under load with replays of a mac1-valid handshake message it has seen."""
    for _ in range(FLOOD):
        eng.receive_datagram(msg, src, now)
    eng.datagrams.clear()
    assert eng.under_load(now)


def build(seed: int = 1) -> Scenario:
    """Run the scripted exchange (see the module docstring); deterministic for a seed."""
    (ka, pub_a), (kb, pub_b), (kc, pub_c) = (static_key(seed * 10 + i) for i in (1, 2, 3))
    a = Engine(ka, random=rng(seed * 10 + 4), wall_offset=WALL)
    b = Engine(kb, random=rng(seed * 10 + 5), wall_offset=WALL)
    c = Engine(kc, random=rng(seed * 10 + 6), wall_offset=WALL)
    d = Engine(static_key(seed * 10 + 7)[0], random=rng(seed * 10 + 8), wall_offset=WALL)
    sc = Scenario({"A": a, "B": b, "C": c, "D": d},
                  {"A": A_ADDR, "B": B_ADDR, "C": C_ADDR, "D": D_ADDR})
    pa, pba, pbc, pc = a.add_peer(pub_b), b.add_peer(pub_a), b.add_peer(pub_c), c.add_peer(pub_b)
    a.allowed.insert("10.0.0.2/32", pa)
    b.allowed.insert("10.0.0.1/32", pba)
    b.allowed.insert("10.0.0.3/32", pbc)
    c.allowed.insert("10.0.0.2/32", pc)
    pa.endpoint = pc.endpoint = B_ADDR
    pa.persistent_keepalive = 25
    net = _Net(sc)

    a.initiate_handshake(pa, 0.0)
    net.pump(0.0)
    assert pa.current is not None and pba.current is not None
    a.send_packet(ip4("10.0.0.1", "10.0.0.2", b"a to b"), 1.0)
    b.send_packet(ip4("10.0.0.2", "10.0.0.1", b"b to a"), 1.0)
    net.pump(1.0)
    assert len(a.tun) == len(b.tun) == 1

    first_init = sc.by_type(1)[0]
    flood(b, first_init, A_ADDR, 2.0)
    c.initiate_handshake(pc, 2.0)
    net.pump(2.0)
    assert sc.by_type(MSG_COOKIE_REPLY) and pc.cookies.cookie is not None
    flood(b, first_init, A_ADDR, 8.0)
    c.handle_timer(8.0)  # the retransmit, now with mac2
    net.pump(8.0)
    assert pc.current is not None and pbc.current is not None
    c.send_packet(ip4("10.0.0.3", "10.0.0.2", b"c to b"), 10.0)
    b.send_packet(ip4("10.0.0.2", "10.0.0.3", b"b to c"), 10.0)
    net.pump(10.0)

    net.hold = lambda s, d, data: s == A_ADDR and data[0] == 1
    a.initiate_handshake(pa, 12.0)
    net.pump(12.0)
    assert pa.handshake is not None and len(sc.held) == 1
    net.hold = lambda s, d, data: False
    for pub, ep in ((pub_a, A_ADDR), (pub_b, B_ADDR)):
        stranger = d.add_peer(pub)
        stranger.endpoint = ep
        d.initiate_handshake(stranger, 14.0)
    unknown = a.drops["unknown_peer"], b.drops["unknown_peer"]
    net.pump(14.0)
    assert (a.drops["unknown_peer"], b.drops["unknown_peer"]) == (unknown[0] + 1, unknown[1] + 1)
    for eng in sc.engines.values():
        eng.tun.clear()
    held = {data for _, _, data in sc.held}
    for name in ("A", "B"):
        sc.seen[name] = [d for s, dst, d in sc.captured
                         if not (dst == sc.addr[name] and d in held)]
    return sc


# --------------------------------------------------------------- snapshots


def _keypair(k: Keypair | None) -> tuple | None:
    if k is None:
        return None
    return (id(k), k.local_index, k.remote_index, k.initiator, k.created, k.send_key,
            k.recv_key, k.send_counter, tuple(k.replay._s))


def _peer(eng: Engine, p: Peer) -> tuple:
    hs = p.handshake
    hs_t = None if hs is None else (
        id(hs), hs.local_index, hs.sent, hs.state.ck, hs.state.h, hs.state.local_ephemeral,
        hs.state.remote_ephemeral, hs.state.remote_static)
    return (
        p.public_key, p.preshared_key, p.endpoint, p.persistent_keepalive,
        _keypair(p.current), _keypair(p.previous), _keypair(p.next), hs_t,
        tuple(sorted(p.timers.deadlines.items())), p.handshake_attempts,
        p.last_sent_handshake, p.last_initiation_consumed, p.latest_timestamp,
        p.last_handshake, p.need_another_keepalive, p.sent_lastminute_handshake,
        p.rx_bytes, p.tx_bytes, tuple(p.staged),
        p.cookies.last_mac1, p.cookies.cookie, p.cookies.cookie_time,
        tuple(str(n) for n in eng.allowed.entries(p)),
    )


def engine_state(eng: Engine) -> tuple:
    """Everything but counters and load accounting: identity, peers, sessions, timers."""
    indices = tuple(sorted(
        (i, id(v) if isinstance(v, Keypair) else (id(v[0]), id(v[1])))
        for i, v in eng.indices._entries.items()))
    return (
        eng.private_key, eng.public_key, eng.listen_port, eng.fwmark, eng.mtu,
        tuple((k, _peer(eng, p)) for k, p in eng.peers.items()), indices,
        tuple((name, id(obj)) for name, obj in eng.events), tuple(eng.tun),
    )


@dataclass(frozen=True)
class LoadAccounting:
    """The anti-DoS state that mac1-valid (not yet authenticated) messages may change."""

    window: tuple[float, int, float]
    buckets: dict
    last_gc: float
    secret: bytes
    secret_time: float

    @classmethod
    def save(cls, eng: Engine) -> LoadAccounting:
        ck = eng._checker
        assert ck is not None
        return cls((eng._hs_window_start, eng._hs_in_window, eng._under_load_until),
                   dict(eng.ratelimiter._buckets), eng.ratelimiter._last_gc,
                   ck._secret, ck._secret_time)

    def restore(self, eng: Engine) -> None:
        eng._hs_window_start, eng._hs_in_window, eng._under_load_until = self.window
        eng.ratelimiter._buckets = dict(self.buckets)
        eng.ratelimiter._last_gc = self.last_gc
        ck = eng._checker
        assert ck is not None
        ck._secret, ck._secret_time = self.secret, self.secret_time


# ------------------------------------------------------------- struct layer

STRUCTS = ((Initiation, MSG_INITIATION), (Response, MSG_RESPONSE),
           (CookieReply, MSG_COOKIE_REPLY))


def check_struct_parsers(data: bytes) -> None:
    """Each parser raises MessageError or round-trips exactly, agreeing with message_type.

    Any other exception propagates: that is the finding.
    """
    t = message_type(data)
    assert t in (0, 1, 2, 3, 4)
    for cls, mtype in STRUCTS:
        try:
            msg = cls.unpack(data)
        except MessageError:
            assert t != mtype, (cls.__name__, data.hex())
            continue
        assert t == mtype and msg.pack() == data, (cls.__name__, data.hex())
    try:
        receiver, counter = unpack_transport_header(data)
    except MessageError:
        assert t != MSG_TRANSPORT, data.hex()
    else:
        assert t == MSG_TRANSPORT and pack_transport_header(receiver, counter) == data[:16]
    n = inner_packet_length(data)
    assert 0 <= n <= len(data)


# ------------------------------------------------------------- mutations


def live_indices(eng: Engine) -> list[int]:
    """Our receiver indices in use (keypairs and pending handshakes), sorted."""
    return sorted(eng.indices._entries)


def aim(msg: bytes, eng: Engine) -> bytes:
    """`msg` with its receiver index replaced by one of `eng`'s live indices.

    An on-path attacker learns these from the sender fields of our messages; without
    this the fuzzer would have to guess 32 bits to reach the per-session code. The old
    field value (mod the number of live indices) picks which one.
    """
    at = 8 if msg[:1] == bytes([MSG_RESPONSE]) else 4
    live = live_indices(eng)
    if len(msg) < at + 4 or msg[:1] == bytes([MSG_INITIATION]) or not live:
        return msg
    (old,) = struct.unpack_from("<I", msg, at)
    return msg[:at] + struct.pack("<I", live[old % len(live)]) + msg[at + 4:]


def fix_mac1(msg: bytes, receiver_public: bytes) -> bytes:
    """`msg` with mac1 recomputed for the receiver: anyone who knows its public key can."""
    off = len(msg) - 2 * MAC_LEN
    if off < 0:
        return msg
    key = crypto.hash_(crypto.LABEL_MAC1 + receiver_public)
    return msg[:off] + crypto.mac(key, msg[:off]) + msg[off + MAC_LEN:]


def fix_mac2(eng: Engine, msg: bytes, src: Endpoint) -> bytes:
    """`msg` with a valid mac2 for `src`, as a sender at `src` holding a cookie could make."""
    ck = eng._checker
    if ck is None or len(msg) < MAC_LEN:
        return msg
    cookie = crypto.mac(ck._secret, endpoint_bytes(src))
    off = len(msg) - MAC_LEN
    return msg[:off] + crypto.mac(cookie, msg[:off])


_LOAD_STATS = frozenset({"cookie_replies_sent", "under_load_engaged"})


class Target:
    """One engine of a built scenario, reset to its baseline after every input.

    `feed()` delivers one datagram and raises AssertionError if anything but counters,
    load accounting and cookie replies changed.
    """

    def __init__(self, sc: Scenario, name: str, *, under_load: bool) -> None:
        self.sc = sc
        self.name = name
        self.engine = sc.engines[name]
        if under_load:
            flood(self.engine, self._mac1_valid(), A_ADDR, T_FUZZ)
            # EVIL4 has spent its burst (stale initiations with a valid cookie), so the
            # rate-limited branch is reachable from the baseline.
            for _ in range(8):
                self.engine.receive_datagram(
                    fix_mac2(self.engine, self._mac1_valid(), EVIL4), EVIL4, T_FUZZ)
            assert self.engine.drops["rate_limited"]
            self.engine.datagrams.clear()
        self.load = LoadAccounting.save(self.engine)
        self.baseline = engine_state(self.engine)
        self.stats = self._stats()

    def _stats(self) -> dict[str, int]:
        # Answering with a cookie reply is the one thing junk can earn (under load), and
        # entering load is counted like the rest of the load accounting.
        return {k: v for k, v in self.engine.stats.items() if k not in _LOAD_STATS}

    def _mac1_valid(self) -> bytes:
        assert self.engine.public_key is not None
        return fix_mac1(self.sc.by_type(1)[0], self.engine.public_key)

    def feed(self, data: bytes, src: Endpoint, now: float) -> None:
        eng = self.engine
        eng.receive_datagram(data, src, now)
        out = eng.datagrams[:]
        eng.datagrams.clear()
        self.load.restore(eng)
        after = engine_state(eng)
        if after != self.baseline or self._stats() != self.stats:
            raise AssertionError(f"state of {self.name} changed by {data.hex()} from {src}")
        for reply, dst in out:
            if not (len(reply) == 64 and reply[0] == MSG_COOKIE_REPLY and dst == src):
                raise AssertionError(f"{self.name} sent {reply.hex()} to {dst}")
