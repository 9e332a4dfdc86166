"""Tests for wgx.protocol.allowedips (longest-prefix match, kernel allowedips semantics)."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wgx.protocol.allowedips import AllowedIPs


class Peer:
    """Opaque value; compared by identity."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Peer({self.name})"


def ip4(a: int, b: int, c: int, d: int) -> bytes:
    return bytes((a, b, c, d))


def ip6(a: int, b: int, c: int, d: int) -> bytes:
    return struct.pack("!4I", a, b, c, d)


def net4(a: int, b: int, c: int, d: int, cidr: int) -> str:
    return f"{a}.{b}.{c}.{d}/{cidr}"


def net6(a: int, b: int, c: int, d: int, cidr: int) -> str:
    return f"{ipaddress.IPv6Address(ip6(a, b, c, d))}/{cidr}"


@pytest.fixture
def peers() -> dict[str, Peer]:
    return {n: Peer(n) for n in "abcdefgh"}


def test_kernel_selftest_lookups(peers: dict[str, Peer]) -> None:
    # Ported from drivers/net/wireguard/selftest/allowedips.c, wg_allowedips_selftest()
    # (Linux, GPL-2.0, Jason A. Donenfeld), deterministic part.
    a, b, c, d, e, f, g, h = (peers[n] for n in "abcdefgh")
    t: AllowedIPs[Peer] = AllowedIPs()
    t.insert(net4(192, 168, 4, 0, 24), a)
    t.insert(net4(192, 168, 4, 4, 32), b)
    t.insert(net4(192, 168, 0, 0, 16), c)
    t.insert(net4(192, 95, 5, 64, 27), d)
    t.insert(net4(192, 95, 5, 65, 27), c)  # replaces previous entry, and maskself is required
    t.insert(net6(0x26075300, 0x60006B00, 0, 0xC05F0543, 128), d)
    t.insert(net6(0x26075300, 0x60006B00, 0, 0, 64), c)
    t.insert(net4(0, 0, 0, 0, 0), e)
    t.insert(net6(0, 0, 0, 0, 0), e)
    t.insert(net6(0, 0, 0, 0, 0), f)  # replaces previous entry
    t.insert(net6(0x24046800, 0, 0, 0, 32), g)
    t.insert(net6(0x24046800, 0x40040800, 0xDEADBEEF, 0xDEADBEEF, 64), h)  # maskself
    t.insert(net6(0x24046800, 0x40040800, 0xDEADBEEF, 0xDEADBEEF, 128), a)
    t.insert(net6(0x24446800, 0x40E40800, 0xDEAEBEEF, 0xDEFBEEF, 128), c)
    t.insert(net6(0x24446800, 0xF0E40800, 0xEEAEBEEF, 0, 98), b)
    t.insert(net4(64, 15, 112, 0, 20), g)
    t.insert(net4(64, 15, 123, 211, 25), h)  # maskself is required
    t.insert(net4(10, 0, 0, 0, 25), a)
    t.insert(net4(10, 0, 0, 128, 25), b)
    t.insert(net4(10, 1, 0, 0, 30), a)
    t.insert(net4(10, 1, 0, 4, 30), b)
    t.insert(net4(10, 1, 0, 8, 29), c)
    t.insert(net4(10, 1, 0, 16, 29), d)

    cases: list[tuple[Peer, bytes]] = [
        (a, ip4(192, 168, 4, 20)),
        (a, ip4(192, 168, 4, 0)),
        (b, ip4(192, 168, 4, 4)),
        (c, ip4(192, 168, 200, 182)),
        (c, ip4(192, 95, 5, 68)),
        (e, ip4(192, 95, 5, 96)),
        (d, ip6(0x26075300, 0x60006B00, 0, 0xC05F0543)),
        (c, ip6(0x26075300, 0x60006B00, 0, 0xC02E01EE)),
        (f, ip6(0x26075300, 0x60006B01, 0, 0)),
        (g, ip6(0x24046800, 0x40040806, 0, 0x1006)),
        (g, ip6(0x24046800, 0x40040806, 0x1234, 0x5678)),
        (f, ip6(0x240467FF, 0x40040806, 0x1234, 0x5678)),
        (f, ip6(0x24046801, 0x40040806, 0x1234, 0x5678)),
        (h, ip6(0x24046800, 0x40040800, 0x1234, 0x5678)),
        (h, ip6(0x24046800, 0x40040800, 0, 0)),
        (h, ip6(0x24046800, 0x40040800, 0x10101010, 0x10101010)),
        (a, ip6(0x24046800, 0x40040800, 0xDEADBEEF, 0xDEADBEEF)),
        (g, ip4(64, 15, 116, 26)),
        (g, ip4(64, 15, 127, 3)),
        (g, ip4(64, 15, 123, 1)),
        (h, ip4(64, 15, 123, 128)),
        (h, ip4(64, 15, 123, 129)),
        (a, ip4(10, 0, 0, 52)),
        (b, ip4(10, 0, 0, 220)),
        (a, ip4(10, 1, 0, 2)),
        (b, ip4(10, 1, 0, 6)),
        (c, ip4(10, 1, 0, 10)),
        (d, ip4(10, 1, 0, 20)),
    ]
    for num, (want, addr) in enumerate(cases, start=1):
        assert t.lookup(addr) is want, f"kernel allowedips self-test {num}"
        # Same answer through the str / ipaddress entry points.
        assert t.lookup(str(ipaddress.ip_address(addr))) is want
        assert t.lookup(ipaddress.ip_address(addr)) is want

    # remove_by_peer on several /32 hosts
    for first in (1, 64, 128, 192, 255):
        t.insert(net4(first, 0, 0, 0, 32), a)
    t.remove_value(a)
    for first in (1, 64, 128, 192, 255):
        assert t.lookup(ip4(first, 0, 0, 0)) is not a
    assert t.entries(a) == []


def test_kernel_selftest_remove_nested(peers: dict[str, Peer]) -> None:
    a = peers["a"]
    t: AllowedIPs[Peer] = AllowedIPs()
    t.insert("192.168.0.0/16", a)
    t.insert("192.168.0.0/24", a)
    t.remove_value(a)
    assert t.lookup("192.168.0.1") is None
    assert len(t) == 0


def test_kernel_selftest_many_v6_hosts(peers: dict[str, Peer]) -> None:
    a = peers["a"]
    t: AllowedIPs[Peer] = AllowedIPs()
    addrs = []
    for i in range(128):
        ip = bytearray(b"\xff" * 16)
        part = struct.pack("!Q", ~(1 << (i % 64)) & 0xFFFFFFFFFFFFFFFF)
        off = 8 if i < 64 else 0
        ip[off : off + 8] = part
        addrs.append(bytes(ip))
        t.insert(ipaddress.IPv6Network((bytes(ip), 128)), a)
    assert len(t) == len(set(addrs))
    for ip in addrs:
        assert t.lookup(ip) is a
    assert t.lookup(b"\xff" * 16) is None
    t.remove_value(a)
    assert len(t) == 0


def test_kernel_selftest_entries(peers: dict[str, Peer]) -> None:
    a = peers["a"]
    t: AllowedIPs[Peer] = AllowedIPs()
    t.insert(net4(192, 95, 5, 93, 27), a)
    t.insert(net6(0x26075300, 0x60006B00, 0, 0xC05F0543, 128), a)
    t.insert(net4(10, 1, 0, 20, 29), a)
    t.insert(net6(0x26075300, 0x6D8A6BF8, 0xDAB1F1DF, 0xC05F1523, 83), a)
    t.insert(net6(0x26075300, 0x6D8A6BF8, 0xDAB1F1DF, 0xC05F1523, 21), a)
    assert t.entries(a) == [
        ipaddress.ip_network(net4(10, 1, 0, 16, 29)),
        ipaddress.ip_network(net4(192, 95, 5, 64, 27)),
        ipaddress.ip_network(net6(0x26075000, 0, 0, 0, 21)),
        ipaddress.ip_network(net6(0x26075300, 0x60006B00, 0, 0xC05F0543, 128)),
        ipaddress.ip_network(net6(0x26075300, 0x6D8A6BF8, 0xDAB1E000, 0, 83)),
    ]
    assert len(t) == 5


def test_masking_host_bits(peers: dict[str, Peer]) -> None:
    a = peers["a"]
    t: AllowedIPs[Peer] = AllowedIPs()
    t.insert("10.0.0.1/24", a)
    assert t.entries(a) == [ipaddress.IPv4Network("10.0.0.0/24")]
    assert t.lookup("10.0.0.200") is a
    assert t.lookup("10.0.1.0") is None
    # Removing by the unmasked spelling removes the same prefix.
    assert t.remove("10.0.0.77/24", a)
    assert len(t) == 0


def test_default_routes_are_per_family(peers: dict[str, Peer]) -> None:
    a, b = peers["a"], peers["b"]
    t: AllowedIPs[Peer] = AllowedIPs()
    t.insert("0.0.0.0/0", a)
    assert t.lookup("8.8.8.8") is a
    assert t.lookup("255.255.255.255") is a
    assert t.lookup("::1") is None
    assert t.lookup("::ffff:8.8.8.8") is None  # v4-mapped is looked up as v6
    t.insert("::/0", b)
    assert t.lookup("2001:db8::1") is b
    assert t.lookup("0.0.0.0") is a
    assert t.remove("0.0.0.0/0", a)
    assert t.lookup("8.8.8.8") is None
    assert t.lookup("::") is b


def test_hosts_32_and_128(peers: dict[str, Peer]) -> None:
    a, b, c = peers["a"], peers["b"], peers["c"]
    t: AllowedIPs[Peer] = AllowedIPs()
    t.insert("10.0.0.0/8", a)
    t.insert("10.1.2.3/32", b)
    t.insert("10.1.2.3", c)  # bare address = /32, moves the host to c
    assert t.lookup("10.1.2.3") is c
    assert t.lookup("10.1.2.4") is a
    t.insert("fd00::/8", a)
    t.insert("fd00::1/128", b)
    assert t.lookup("fd00::1") is b
    assert t.lookup("fd00::2") is a
    assert t.lookup(ipaddress.IPv6Address("fd00::1").packed) is b
    assert len(t) == 4


def test_reinsert_moves_ownership(peers: dict[str, Peer]) -> None:
    a, b = peers["a"], peers["b"]
    t: AllowedIPs[Peer] = AllowedIPs()
    t.insert("192.168.1.0/24", a)
    t.insert("192.168.1.0/24", b)
    assert t.lookup("192.168.1.9") is b
    assert t.entries(a) == []
    assert t.entries(b) == [ipaddress.IPv4Network("192.168.1.0/24")]
    assert len(t) == 1
    # remove only takes effect for the current owner
    assert not t.remove("192.168.1.0/24", a)
    assert t.lookup("192.168.1.9") is b
    assert t.remove("192.168.1.0/24", b)
    assert not t.remove("192.168.1.0/24", b)
    assert t.lookup("192.168.1.9") is None


def test_identity_not_equality() -> None:
    class Eq:
        def __eq__(self, other: object) -> bool:
            return True

        __hash__ = object.__hash__

    x, y = Eq(), Eq()
    t: AllowedIPs[Eq] = AllowedIPs()
    t.insert("10.0.0.0/8", x)
    assert not t.remove("10.0.0.0/8", y)
    t.remove_value(y)
    assert t.lookup("10.1.1.1") is x
    assert t.entries(y) == []


def test_remove_value_keeps_others(peers: dict[str, Peer]) -> None:
    a, b = peers["a"], peers["b"]
    t: AllowedIPs[Peer] = AllowedIPs()
    t.insert("10.0.0.0/8", a)
    t.insert("10.0.0.0/16", b)
    t.insert("10.0.0.0/24", a)
    t.insert("fd00::/64", a)
    t.insert("fd00::/48", b)
    t.remove_value(a)
    assert t.lookup("10.0.0.1") is b
    assert t.lookup("10.1.0.1") is None
    assert t.lookup("fd00::1") is b
    assert len(t) == 2


def test_entries_sorted(peers: dict[str, Peer]) -> None:
    a = peers["a"]
    t: AllowedIPs[Peer] = AllowedIPs()
    for n in ("fd00::/8", "10.0.0.0/24", "::/0", "10.0.0.0/8", "1.2.3.4/32", "fd00::/16"):
        t.insert(n, a)
    assert [str(n) for n in t.entries(a)] == [
        "1.2.3.4/32",
        "10.0.0.0/8",
        "10.0.0.0/24",
        "::/0",
        "fd00::/8",
        "fd00::/16",
    ]


def v4_packet(src: str, dst: str, payload: bytes = b"") -> bytes:
    hdr = bytearray(20)
    hdr[0] = 0x45
    hdr[12:16] = ipaddress.IPv4Address(src).packed
    hdr[16:20] = ipaddress.IPv4Address(dst).packed
    return bytes(hdr) + payload


def v6_packet(src: str, dst: str, payload: bytes = b"") -> bytes:
    hdr = bytearray(40)
    hdr[0] = 0x60
    hdr[8:24] = ipaddress.IPv6Address(src).packed
    hdr[24:40] = ipaddress.IPv6Address(dst).packed
    return bytes(hdr) + payload


def test_packet_lookups(peers: dict[str, Peer]) -> None:
    a, b, c, d = peers["a"], peers["b"], peers["c"], peers["d"]
    t: AllowedIPs[Peer] = AllowedIPs()
    t.insert("10.0.0.0/24", a)
    t.insert("10.0.1.0/24", b)
    t.insert("fd00:a::/64", c)
    t.insert("fd00:b::/64", d)
    p4 = v4_packet("10.0.0.5", "10.0.1.7", b"x" * 10)
    assert t.lookup_packet_src(p4) is a
    assert t.lookup_packet_dst(p4) is b
    assert t.lookup_packet_dst(memoryview(p4)) is b
    assert t.lookup_packet_src(bytearray(p4)) is a
    p6 = v6_packet("fd00:a::1", "fd00:b::2")
    assert t.lookup_packet_src(p6) is c
    assert t.lookup_packet_dst(p6) is d
    assert t.lookup_packet_dst(memoryview(b"\x00" * 8 + p6)[8:]) is d
    # unknown destination
    assert t.lookup_packet_dst(v4_packet("10.0.0.5", "192.0.2.1")) is None


@pytest.mark.parametrize(
    "pkt",
    [
        b"",
        b"\x45",
        b"\x45" + b"\x00" * 18,  # 19 bytes
        b"\x60" + b"\x00" * 38,  # 39 bytes
        b"\x00" * 60,  # version 0
        b"\x50" + b"\x00" * 59,  # version 5
        b"\xff" * 60,
    ],
)
def test_packet_garbage(pkt: bytes) -> None:
    t: AllowedIPs[object] = AllowedIPs()
    t.insert("0.0.0.0/0", "v4")
    t.insert("::/0", "v6")
    assert t.lookup_packet_dst(pkt) is None
    assert t.lookup_packet_src(pkt) is None
    assert t.lookup_packet_dst(memoryview(pkt)) is None


def test_lookup_bad_raw_length() -> None:
    t: AllowedIPs[object] = AllowedIPs()
    with pytest.raises(ValueError):
        t.lookup(b"\x00" * 5)


def test_none_value_rejected() -> None:
    t: AllowedIPs[object] = AllowedIPs()
    with pytest.raises(ValueError):
        t.insert("10.0.0.0/8", None)


# --- property test against a brute-force reference ----------------------------------------


class BruteForce:
    def __init__(self) -> None:
        self.routes: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, object]] = []

    def insert(self, net: ipaddress.IPv4Network | ipaddress.IPv6Network, value: object) -> None:
        self.routes = [(n, v) for n, v in self.routes if n != net]
        self.routes.append((net, value))

    def remove(self, net: ipaddress.IPv4Network | ipaddress.IPv6Network, value: object) -> bool:
        before = len(self.routes)
        self.routes = [(n, v) for n, v in self.routes if not (n == net and v is value)]
        return len(self.routes) != before

    def remove_value(self, value: object) -> None:
        self.routes = [(n, v) for n, v in self.routes if v is not value]

    def lookup(self, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> object | None:
        best: tuple[int, object] | None = None
        for n, v in self.routes:
            if n.version == addr.version and addr in n and (best is None or n.prefixlen > best[0]):
                best = (n.prefixlen, v)
        return None if best is None else best[1]


PEERS = [Peer(str(i)) for i in range(5)]


def _v4_addr(hi: int, lo: int) -> int:
    # Cluster addresses in a few /8s so prefixes overlap a lot.
    return (hi << 24) | lo


v4_addrs = st.builds(_v4_addr, st.sampled_from([0, 10, 192, 255]), st.integers(0, 2**24 - 1)).map(
    ipaddress.IPv4Address
)
v6_addrs = st.builds(
    lambda hi, lo: (hi << 112) | lo,
    st.sampled_from([0, 0xFD00, 0x2001, 0xFFFF]),
    st.one_of(st.integers(0, 2**112 - 1), st.integers(0, 2**16 - 1)),
).map(ipaddress.IPv6Address)
v4_nets = st.builds(
    lambda a, p: ipaddress.IPv4Network((int(a), p), strict=False), v4_addrs, st.integers(0, 32)
)
v6_nets = st.builds(
    lambda a, p: ipaddress.IPv6Network((int(a), p), strict=False),
    v6_addrs,
    st.one_of(st.integers(0, 128), st.sampled_from([0, 8, 16, 48, 64, 120, 127, 128])),
)
nets = st.one_of(v4_nets, v6_nets)
peer_idx = st.integers(0, len(PEERS) - 1)
ops = st.one_of(
    st.tuples(st.just("insert"), nets, peer_idx),
    st.tuples(st.just("insert"), nets, peer_idx),
    st.tuples(st.just("remove"), nets, peer_idx),
    st.tuples(st.just("remove_value"), st.none(), peer_idx),
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(ops, max_size=60),
    st.lists(st.one_of(v4_addrs, v6_addrs), min_size=1, max_size=40),
)
def test_against_brute_force(
    operations: list[tuple[str, ipaddress.IPv4Network | ipaddress.IPv6Network | None, int]],
    queries: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
) -> None:
    t: AllowedIPs[Peer] = AllowedIPs()
    ref = BruteForce()
    inserted_addrs: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for op, net, i in operations:
        peer = PEERS[i]
        if op == "insert":
            assert net is not None
            # Insert with host bits set (when possible) to exercise masking.
            host_net = f"{net.broadcast_address}/{net.prefixlen}"
            t.insert(host_net, peer)
            ref.insert(net, peer)
            inserted_addrs.extend((net.network_address, net.broadcast_address))
        elif op == "remove":
            assert net is not None
            assert t.remove(net, peer) == ref.remove(net, peer)
        else:
            t.remove_value(peer)
            ref.remove_value(peer)
        assert len(t) == len(ref.routes)
    for addr in [*queries, *inserted_addrs]:
        assert t.lookup(addr) is ref.lookup(addr), addr
        assert t.lookup(addr.packed) is ref.lookup(addr)
    for peer in PEERS:
        want = sorted(
            (n for n, v in ref.routes if v is peer),
            key=lambda n: (n.version, int(n.network_address), n.prefixlen),
        )
        assert t.entries(peer) == want
