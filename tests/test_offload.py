"""Unit tests for wgx.dataplane.offload: virtio-net headers, TSO/USO split, TCP coalescing.

Every checksum is checked against a slow, independent reference below (a plain
loop over 16-bit words with end-around carry), never against the module's own
helpers.  Packets are built by hand, with TCP timestamp options like a real
Linux flow.
"""

from __future__ import annotations

import ipaddress
import random
import struct
from typing import NamedTuple

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from wgx.dataplane import offload
from wgx.dataplane.offload import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP_L4,
    VNET_HDR_LEN,
    OffloadStats,
    VnetHdr,
    coalesce,
    pack_vnet_hdr,
    parse_vnet_hdr,
    split_gso,
    split_gso_batch,
)

FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80
MTU = 1420
A4, B4 = "10.99.0.2", "10.99.0.1"
A6, B6 = "fd99::2", "fd99::1"

# ------------------------------------------------------------------ reference


def ref_sum(data: bytes) -> int:
    """RFC 1071 ones' complement sum, the slow obvious way."""
    data = bytes(data)
    if len(data) % 2:
        data += b"\0"
    s = 0
    for k in range(0, len(data), 2):
        s += (data[k] << 8) | data[k + 1]
        s = (s & 0xFFFF) + (s >> 16)
    return s


def ref_pseudo(pkt: bytes, proto: int, l4len: int) -> bytes:
    if pkt[0] >> 4 == 6:
        return bytes(pkt[8:40]) + struct.pack("!IxxxB", l4len, proto)
    return bytes(pkt[12:20]) + struct.pack("!xBH", proto, l4len)


def ref_l4_ok(pkt: bytes) -> bool:
    """Transport checksum of an IPv4/IPv6 TCP/UDP packet (no extension headers) verifies."""
    pkt = bytes(pkt)
    v6 = pkt[0] >> 4 == 6
    l4 = 40 if v6 else (pkt[0] & 15) * 4
    proto = pkt[6] if v6 else pkt[9]
    return ref_sum(ref_pseudo(pkt, proto, len(pkt) - l4) + pkt[l4:]) == 0xFFFF


def ref_ip_ok(pkt: bytes) -> bool:
    return ref_sum(bytes(pkt[: (pkt[0] & 15) * 4])) == 0xFFFF


def ref_csum(data: bytes) -> int:
    return ~ref_sum(data) & 0xFFFF


# ------------------------------------------------------------------ builders


def ts_opts(tsval: int = 1000, tsecr: int = 2000) -> bytes:
    return b"\x01\x01\x08\x0a" + struct.pack("!II", tsval, tsecr)


def tcp_packet(
    v6: bool = False,
    payload: bytes = b"",
    seq: int = 1000,
    ack: int = 5000,
    flags: int = ACK,
    win: int = 502,
    opts: bytes | None = None,
    sport: int = 40000,
    dport: int = 5201,
    src: str | None = None,
    dst: str | None = None,
    ipid: int = 7,
    df: bool = True,
    tos: int = 0,
    ttl: int = 64,
    ip_opts: bytes = b"",
    flow: int = 0,
    csum: bool = True,
) -> bytes:
    """A TCP/IP packet with valid (reference) checksums."""
    opts = ts_opts() if opts is None else opts
    tcp = bytearray(
        struct.pack(
            "!HHIIBBHHH", sport, dport, seq, ack, ((20 + len(opts)) // 4) << 4, flags, win, 0, 0
        )
        + opts
    )
    l4len = len(tcp) + len(payload)
    if v6:
        ip = bytearray(
            struct.pack("!IHBB", (6 << 28) | (tos << 20) | flow, l4len, 6, ttl)
            + ipaddress.IPv6Address(src or A6).packed
            + ipaddress.IPv6Address(dst or B6).packed
        )
    else:
        ihl = 5 + len(ip_opts) // 4
        ip = bytearray(
            struct.pack(
                "!BBHHHBBH", 0x40 | ihl, tos, ihl * 4 + l4len, ipid, 0x4000 if df else 0, ttl, 6, 0
            )
            + ipaddress.IPv4Address(src or A4).packed
            + ipaddress.IPv4Address(dst or B4).packed
            + ip_opts
        )
        struct.pack_into("!H", ip, 10, ref_csum(bytes(ip)))
    if csum:
        struct.pack_into("!H", tcp, 16, ref_csum(ref_pseudo(bytes(ip), 6, l4len) + tcp + payload))
    return bytes(ip + tcp) + payload


def udp_packet(
    v6: bool = False,
    payload: bytes = b"x",
    sport: int = 5000,
    dport: int = 53,
    partial: bool = False,
    ipid: int = 1,
    df: bool = True,
    tos: int = 0,
    ttl: int = 64,
    flow: int = 0,
    src: str | None = None,
    dst: str | None = None,
    zero_csum: bool = False,
) -> bytes:
    """A UDP/IP packet with valid (reference) checksums; with partial=True the
    checksum field holds the folded pseudo-header sum, as the kernel leaves it
    for CHECKSUM_PARTIAL; with zero_csum=True it is 0 ("no checksum")."""
    udp = bytearray(struct.pack("!HHHH", sport, dport, 8 + len(payload), 0))
    l4len = len(udp) + len(payload)
    if v6:
        ip = bytearray(
            struct.pack("!IHBB", (6 << 28) | (tos << 20) | flow, l4len, 17, ttl)
            + ipaddress.IPv6Address(src or A6).packed
            + ipaddress.IPv6Address(dst or B6).packed
        )
    else:
        ip = bytearray(
            struct.pack("!BBHHHBBH", 0x45, tos, 20 + l4len, ipid, 0x4000 if df else 0, ttl, 17, 0)
            + ipaddress.IPv4Address(src or A4).packed
            + ipaddress.IPv4Address(dst or B4).packed
        )
        struct.pack_into("!H", ip, 10, ref_csum(bytes(ip)))
    pseudo = ref_pseudo(bytes(ip), 17, l4len)
    if partial:
        struct.pack_into("!H", udp, 6, ref_sum(pseudo))
    elif not zero_csum:
        struct.pack_into("!H", udp, 6, ref_csum(pseudo + udp + payload) or 0xFFFF)
    return bytes(ip + udp) + payload


def super_packet(
    v6: bool = False,
    payload: bytes = b"",
    gso_size: int = 1368,
    seq: int = 1000,
    flags: int = ACK | PSH,
    ipid: int = 100,
    gso_type: int | None = None,
    **kw,
) -> bytes:
    """A TSO super-packet as the kernel hands it to an IFF_VNET_HDR reader: virtio
    header with NEEDS_CSUM and the TCP checksum field holding the pseudo-header sum."""
    pkt = bytearray(tcp_packet(v6, payload, seq=seq, flags=flags, ipid=ipid, csum=False, **kw))
    l4 = 40 if v6 else (pkt[0] & 15) * 4
    hlen = l4 + (pkt[l4 + 12] >> 4) * 4
    struct.pack_into("!H", pkt, l4 + 16, ref_sum(ref_pseudo(bytes(pkt), 6, len(pkt) - l4)))
    if gso_type is None:
        gso_type = VIRTIO_NET_HDR_GSO_TCPV6 if v6 else VIRTIO_NET_HDR_GSO_TCPV4
    return pack_vnet_hdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type, hlen, gso_size, l4, 16) + bytes(pkt)


def udp_super(v6: bool, payload: bytes, gso_size: int) -> bytes:
    pkt = bytearray(udp_packet(v6, payload, partial=True))
    l4 = 40 if v6 else 20
    return pack_vnet_hdr(
        VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_UDP_L4, l4 + 8, gso_size, l4, 6
    ) + bytes(pkt)


def fields(pkt: bytes) -> dict:
    """Parsed header fields of an IPv4/IPv6 TCP packet."""
    pkt = bytes(pkt)
    v6 = pkt[0] >> 4 == 6
    l4 = 40 if v6 else (pkt[0] & 15) * 4
    sport, dport, seq, ack, doff, flags, win = struct.unpack_from("!HHIIBBH", pkt, l4)
    hlen = l4 + (doff >> 4) * 4
    d = dict(
        v6=v6,
        l4=l4,
        hlen=hlen,
        sport=sport,
        dport=dport,
        seq=seq,
        ack=ack,
        flags=flags,
        win=win,
        opts=pkt[l4 + 20 : hlen],
        payload=pkt[hlen:],
    )
    if v6:
        d["plen"] = struct.unpack_from("!H", pkt, 4)[0]
    else:
        d["tot"], d["id"] = struct.unpack_from("!HH", pkt, 2)
    return d


def rand_payload(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture(params=["numpy", "scalar"])
def path(request, monkeypatch):
    """Run a test through the vectorized path and through the scalar fallback."""
    if request.param == "scalar":
        monkeypatch.setattr(offload, "_VECTOR_MIN_SEGMENTS", 1 << 30)
        monkeypatch.setattr(offload, "_VECTOR_MIN_CSUM", 1 << 30)
        monkeypatch.setattr(offload, "_VECTOR_MIN_VERIFY", 1 << 30)
    else:
        monkeypatch.setattr(offload, "_VECTOR_MIN_SEGMENTS", 1)
        monkeypatch.setattr(offload, "_VECTOR_MIN_CSUM", 1)
        monkeypatch.setattr(offload, "_SCALAR_JOB_BYTES", 0)
        monkeypatch.setattr(offload, "_VECTOR_MIN_VERIFY", 1)
    return request.param


# ------------------------------------------------------------------ vnet header


def test_vnet_header_roundtrip_and_layout():
    h = pack_vnet_hdr(1, 4, 0x0102, 0x0304, 0x0506, 0x0708)
    assert h == bytes([1, 4, 2, 1, 4, 3, 6, 5, 8, 7])  # little-endian u16s
    assert parse_vnet_hdr(h + b"rest") == VnetHdr(1, 4, 0x0102, 0x0304, 0x0506, 0x0708)
    assert parse_vnet_hdr(h[:9]) is None
    assert VNET_HDR_LEN == 10
    with pytest.raises(ValueError):
        pack_vnet_hdr(gso_size=70000)


def test_checksum_helpers_match_reference():
    rng = random.Random(5)
    for n in (0, 1, 2, 3, 19, 20, 1001, 1448):
        d = rng.randbytes(n)
        assert offload.ones_complement_sum(d) == ref_sum(d)
        assert offload.internet_checksum(d) == ref_csum(d)
    assert offload.ones_complement_sum(b"\xff\xff") == 0xFFFF
    assert offload.ones_complement_sum(b"\0\0") == 0
    p = tcp_packet(payload=b"abc")
    assert offload.pseudo_header_sum(p, 6, len(p) - 20) == ref_sum(ref_pseudo(p, 6, len(p) - 20))


# ------------------------------------------------------------------ split: TCP


def check_segments(segs, sup: bytes, mtu: int, gso_size: int) -> None:
    """Every segment of a split super-packet against the reference."""
    orig = fields(sup[VNET_HDR_LEN:])
    seg_pay = min(gso_size, mtu - orig["hlen"])
    data = b"".join(fields(s)["payload"] for s in segs)
    assert data == orig["payload"]
    assert len(segs) == -(-len(orig["payload"]) // seg_pay)
    for i, s in enumerate(segs):
        s = bytes(s)
        f = fields(s)
        assert len(s) <= mtu
        assert ref_l4_ok(s), f"segment {i}: bad TCP checksum"
        assert s[: f["l4"]][:1] == sup[VNET_HDR_LEN:][:1]
        assert f["seq"] == (orig["seq"] + i * seg_pay) & 0xFFFFFFFF
        assert (f["ack"], f["win"], f["opts"], f["sport"], f["dport"]) == (
            orig["ack"],
            orig["win"],
            orig["opts"],
            orig["sport"],
            orig["dport"],
        )
        last = i == len(segs) - 1
        want = orig["flags"]
        if not last:
            want &= ~(FIN | PSH)
        if i:
            want &= ~CWR
        assert f["flags"] == want, (i, f["flags"], want)
        if f["v6"]:
            assert f["plen"] == len(s) - 40
            assert s[:4] == sup[VNET_HDR_LEN:][:4] and s[6:40] == sup[VNET_HDR_LEN + 6 :][:34]
        else:
            assert ref_ip_ok(s), f"segment {i}: bad IPv4 header checksum"
            zeroed = s[:10] + b"\0\0" + s[12 : f["l4"]]
            assert s[10:12] == struct.pack("!H", ref_csum(zeroed))  # canonical, as the kernel's
            assert f["tot"] == len(s)
            assert f["id"] == (orig["id"] + i) & 0xFFFF
            o = sup[VNET_HDR_LEN:]
            assert s[6:10] == o[6:10] and s[12 : f["l4"]] == o[12 : f["l4"]]
        if not last:
            assert len(f["payload"]) == seg_pay


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
@pytest.mark.parametrize(
    "size,gso,flags",
    [
        (65535 - 72, 1368, ACK | PSH),  # a full 64 KB TSO burst
        (10 * 1368, 1368, ACK),  # exact multiple
        (5 * 1368 + 1, 1368, ACK | PSH | FIN),  # 1-byte tail, FIN
        (3001, 1001, ACK | CWR | PSH),  # odd gso_size: odd segment lengths
        (500, 1368, ACK | PSH),  # one segment
    ],
)
def test_split_tcp(path, v6, size, gso, flags):
    sup = super_packet(v6, rand_payload(size, size), gso, flags=flags)
    stats = OffloadStats()
    segs = split_gso(sup, MTU, stats)
    check_segments(segs, sup, MTU, gso)
    assert stats.split_gso == 1 and stats.split_segments == len(segs)
    assert stats.split_dropped == 0


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_split_resegments_to_mtu_and_wraps_seq_and_id(path, v6):
    sup = super_packet(v6, rand_payload(20000), 1368, seq=0xFFFFFFFF - 3000, ipid=0xFFFE)
    segs = split_gso(sup, 1000)
    check_segments(segs, sup, 1000, 1368)
    if not v6:
        assert fields(segs[2])["id"] == 0


@pytest.mark.parametrize("k", range(-2, 8))
def test_split_ipv4_header_checksum_residue_wrap(path, k):
    """IDs chosen so the header-checksum residue wraps (or hits 0) inside the burst."""
    probe = bytes(split_gso(super_packet(False, rand_payload(8000), 1368, ipid=0), MTU)[0])
    hdr = bytearray(probe[:20])
    hdr[4:6] = hdr[10:12] = b"\0\0"
    id0 = (0xFFFF - ref_sum(bytes(hdr)) - k) % 0xFFFF
    if id0 + 6 > 0x10000:
        id0 -= 10
    sup = super_packet(False, rand_payload(8000), 1368, ipid=id0)
    check_segments(split_gso(sup, MTU), sup, MTU, 1368)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    v6=st.booleans(),
    size=st.integers(1, 20000),
    gso=st.integers(1, 2000),
    mtu=st.integers(60, 9000),
    flags=st.sampled_from([ACK, ACK | PSH, ACK | FIN, ACK | CWR | PSH, ACK | ECE]),
    ipid=st.integers(0, 0xFFFF),
    seq=st.integers(0, 2**32 - 1),
    vector=st.booleans(),
)
def test_split_property_against_reference(v6, size, gso, mtu, flags, ipid, seq, vector):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(offload, "_VECTOR_MIN_SEGMENTS", 1 if vector else 1 << 30)
        sup = super_packet(v6, rand_payload(size, size), gso, seq=seq, flags=flags, ipid=ipid)
        stats = OffloadStats()
        segs = split_gso(sup, mtu, stats)
    hlen = (40 if v6 else 20) + 32
    if mtu - hlen <= 0:
        assert segs == [] and stats.split_dropped == 1
    else:
        check_segments(segs, sup, mtu, gso)


def test_split_ipv4_with_options(path):
    sup = super_packet(False, rand_payload(9000), 1300, ip_opts=b"\x01\x01\x01\x00")
    segs = split_gso(sup, MTU)
    check_segments(segs, sup, MTU, 1300)
    assert all(bytes(s)[0] == 0x46 for s in segs)


def test_split_ignores_kernel_hdr_len(path):
    """hdr_len may cover the whole first packet on forwarding paths: not trusted."""
    sup = bytearray(super_packet(False, rand_payload(5000), 1368))
    struct.pack_into("<H", sup, 2, 1420)
    check_segments(split_gso(bytes(sup), MTU), bytes(sup), MTU, 1368)


def test_split_tcp_ecn_gso_bit_tolerated(path):
    sup = super_packet(
        False, rand_payload(5000), 1368, flags=ACK | CWR, gso_type=VIRTIO_NET_HDR_GSO_TCPV4 | 0x80
    )
    check_segments(split_gso(sup, MTU), sup, MTU, 1368)


def test_split_batch_keeps_order_and_mixes_kinds(path):
    plain = tcp_packet(payload=b"plain")
    bufs = [
        pack_vnet_hdr() + plain,
        super_packet(False, rand_payload(8000, 2), 1368, sport=1),
        pack_vnet_hdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 20, 6)
        + udp_packet(False, rand_payload(1200, 3), partial=True),
        b"junk",
        super_packet(True, rand_payload(9000, 4), 1348, sport=2),
        pack_vnet_hdr() + b"\x45garbage-but-passed-through",
    ]
    stats = OffloadStats()
    out = [bytes(p) for p in split_gso_batch(bufs, MTU, stats)]
    assert out[0] == plain
    n1 = -(-8000 // 1368)
    check_segments(out[1 : 1 + n1], bufs[1], MTU, 1368)
    assert ref_l4_ok(out[1 + n1]) and out[1 + n1][28:] == rand_payload(1200, 3)
    n2 = -(-9000 // 1348)
    check_segments(out[2 + n1 : 2 + n1 + n2], bufs[4], MTU, 1348)
    assert out[-1] == b"\x45garbage-but-passed-through"
    assert len(out) == 3 + n1 + n2
    assert stats.split_in == 6 and stats.split_dropped == 1 and stats.split_passthrough == 2
    assert stats.split_csum_completed == 1 and stats.split_gso == 2


def test_split_into_arena_reuses_memory_and_falls_back_when_full():
    arena = offload.Arena(200_000)
    sup = super_packet(False, rand_payload(60000), 1368)
    first = [bytes(s) for s in split_gso(sup, MTU, arena=arena)]
    check_segments(first, sup, MTU, 1368)
    views = split_gso_batch([sup, sup, sup, sup], MTU, arena=arena)  # > 200 KB: allocates
    assert [bytes(v) for v in views] == first * 4
    again = split_gso(sup, MTU, arena=arena)
    assert [bytes(v) for v in again] == first
    assert again[0].obj is arena.buf.base or again[0].obj is arena.buf  # inside the arena


def test_split_outputs_are_independent_views():
    sup = super_packet(False, rand_payload(30000), 1368)
    segs = split_gso(sup, MTU)
    assert all(isinstance(s, memoryview) for s in segs)
    assert len({bytes(s[:50]) for s in segs}) == len(segs)  # distinct seq/ID/csum


# ------------------------------------------------------------------ split: UDP


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_needs_csum_completion_udp(path, v6):
    bufs = [
        pack_vnet_hdr(
            VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE, 0, 0, 40 if v6 else 20, 6
        )
        + udp_packet(v6, rand_payload(n, n), partial=True)
        for n in (1, 2, 100, 1372, 1373)
    ] * 2
    out = split_gso_batch(bufs, MTU)
    assert len(out) == len(bufs)
    for b, o in zip(bufs, out, strict=True):
        o = bytes(o)
        assert ref_l4_ok(o)
        l4 = 40 if v6 else 20
        assert (
            o[: l4 + 6] == b[VNET_HDR_LEN:][: l4 + 6] and o[l4 + 8 :] == b[VNET_HDR_LEN + l4 + 8 :]
        )


def test_needs_csum_completion_tcp_ack(path):
    pkt = bytearray(tcp_packet(payload=b"", csum=False))
    struct.pack_into("!H", pkt, 36, ref_sum(ref_pseudo(bytes(pkt), 6, 32)))
    out = split_gso(pack_vnet_hdr(1, 0, 52, 0, 20, 16) + bytes(pkt), MTU)
    assert len(out) == 1 and ref_l4_ok(out[0])
    assert bytes(out[0]) == tcp_packet(payload=b"")


def test_needs_csum_odd_offset_is_completed_scalar():
    """csum_start is odd: never from the kernel, but still done as specified."""
    data = b"\x45" + rand_payload(99)
    buf = pack_vnet_hdr(1, 0, 0, 0, 21, 4) + data
    out = bytes(split_gso(buf, MTU)[0])
    seed = data[25:27]  # what was in the field: summed in, like the kernel's partial sum
    assert out[:25] == data[:25] and out[27:] == data[27:]
    assert ref_sum(out[21:] + (b"\0" if len(out[21:]) % 2 else b"") + seed) == 0xFFFF


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_split_udp_l4(path, v6):
    payload = rand_payload(5 * 1200 + 77)
    sup = udp_super(v6, payload, 1200)
    segs = [bytes(s) for s in split_gso(sup, MTU)]
    l4 = 40 if v6 else 20
    assert len(segs) == 6
    assert b"".join(s[l4 + 8 :] for s in segs) == payload
    for i, s in enumerate(segs):
        assert ref_l4_ok(s)
        assert struct.unpack_from("!H", s, l4 + 4)[0] == len(s) - l4
        if v6:
            assert struct.unpack_from("!H", s, 4)[0] == len(s) - 40
        else:
            assert ref_ip_ok(s) and struct.unpack_from("!HH", s, 2) == (len(s), (1 + i) & 0xFFFF)
        assert len(s) == (l4 + 8 + 1200 if i < 5 else l4 + 8 + 77)


def test_split_udp_too_big_is_dropped(path):
    stats = OffloadStats()
    assert split_gso(udp_super(False, rand_payload(5000), 1400), MTU, stats) == []
    assert stats.split_dropped == 1 and stats.split_too_big == 1


# ------------------------------------------------------------------ split: garbage


def _bad_supers():
    good = super_packet(False, rand_payload(3000), 1368)
    g6 = super_packet(True, rand_payload(3000), 1368)

    def mut(b, off, val):
        b = bytearray(b)
        b[off] = val
        return bytes(b)

    return {
        "short": good[:9],
        "empty": b"",
        "unknown_gso": mut(good, 1, 2),
        "v6_gso_on_v4": mut(good, 1, VIRTIO_NET_HDR_GSO_TCPV6),
        "v4_gso_on_v6": mut(g6, 1, VIRTIO_NET_HDR_GSO_TCPV4),
        "gso_size_0": good[:4] + b"\0\0" + good[6:],
        "bad_version": mut(good, 10, 0x55),
        "not_tcp": mut(good, 10 + 9, 17),
        "fragment": mut(good, 10 + 6, 0x20),
        "csum_start_mismatch": good[:6] + struct.pack("<H", 24) + good[8:],
        "csum_offset_mismatch": good[:8] + struct.pack("<H", 6) + good[10:],
        "doff_too_small": mut(good, 10 + 32, 0x40),
        "headers_only": good[: 10 + 52],
        "truncated_ip": good[:20],
        "needs_csum_out_of_range": pack_vnet_hdr(1, 0, 0, 0, 60, 16) + tcp_packet(payload=b"")[:70],
    }


@pytest.mark.parametrize("name", list(_bad_supers()))
def test_split_drops_garbage_with_count(path, name):
    stats = OffloadStats()
    assert split_gso_batch([_bad_supers()[name]], MTU, stats) == []
    assert stats.split_dropped == 1


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=8), st.integers(0, 2000))
def test_split_random_bytes_never_raise(bufs, mtu):
    for p in bufs:
        split_gso(p, mtu)
    split_gso_batch(bufs, mtu)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_split_mutated_super_packets_never_raise(data):
    v6 = data.draw(st.booleans())
    sup = bytearray(
        super_packet(
            v6, rand_payload(data.draw(st.integers(1, 6000))), data.draw(st.integers(1, 2000))
        )
    )
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(sup) - 1))
        sup[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(sup)))
    for out in split_gso_batch([bytes(sup), bytes(sup[:cut])] * 4, data.draw(st.integers(0, 9000))):
        assert isinstance(out, memoryview)


# ------------------------------------------------------------------ coalesce


def flow(v6=False, n=8, size=1368, seq=1000, start_id=10, **kw):
    """n consecutive full-size segments of one flow (each with valid checksums)."""
    return [
        tcp_packet(v6, rand_payload(size, seq + i), seq=seq + i * size, ipid=start_id + i, **kw)
        for i in range(n)
    ]


def strip(out: bytes) -> tuple[VnetHdr, bytes]:
    return parse_vnet_hdr(out), out[VNET_HDR_LEN:]


def check_super(out: bytes, segs: list[bytes]) -> None:
    """`out` is the correct coalesced form of `segs` (all of one flow, in order)."""
    h, pkt = strip(out)
    f0, fl = fields(segs[0]), fields(segs[-1])
    v6 = f0["v6"]
    l4 = f0["l4"]
    assert h == VnetHdr(
        VIRTIO_NET_HDR_F_NEEDS_CSUM,
        VIRTIO_NET_HDR_GSO_TCPV6 if v6 else VIRTIO_NET_HDR_GSO_TCPV4,
        f0["hlen"],
        len(f0["payload"]),
        l4,
        16,
    )
    f = fields(pkt)
    assert f["payload"] == b"".join(fields(s)["payload"] for s in segs)
    assert f["seq"] == f0["seq"] and f["ack"] == f0["ack"] and f["opts"] == f0["opts"]
    assert f["flags"] == f0["flags"] | (fl["flags"] & PSH)
    if v6:
        assert f["plen"] == len(pkt) - 40
    else:
        assert f["tot"] == len(pkt) and ref_ip_ok(pkt) and f["id"] == f0["id"]
    # CHECKSUM_PARTIAL: the field holds the folded pseudo-header sum, not complemented.
    csum = struct.unpack_from("!H", pkt, l4 + 16)[0]
    assert csum == ref_sum(ref_pseudo(pkt, 6, len(pkt) - l4))
    # Completing it as a NIC would gives a valid packet.
    done = bytearray(pkt)
    done[l4 + 16 : l4 + 18] = b"\0\0"
    struct.pack_into("!H", done, l4 + 16, ref_csum(struct.pack("!H", csum) + bytes(done[l4:])))
    assert ref_l4_ok(bytes(done))


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_coalesce_one_flow(path, v6):
    segs = flow(v6, n=10)
    segs[-1] = tcp_packet(v6, b"tail", seq=1000 + 10 * 1368 - 1368, ipid=19, flags=ACK | PSH)
    stats = OffloadStats()
    out = coalesce(segs, stats=stats)
    assert len(out) == 1
    check_super(out[0], segs)
    assert stats.coalesce_in == 10 and stats.coalesce_out == 1
    assert stats.coalesce_merged == 10 and stats.coalesce_super == 1


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_roundtrip_split_coalesce_split(path, v6):
    """coalesce(split(super)) is the super-packet again, and splitting that gives
    the very same segments, byte for byte."""
    sup = super_packet(v6, rand_payload(65535 - 72), 1368 if not v6 else 1348)
    segs = [bytes(s) for s in split_gso(sup, MTU)]
    out = coalesce(segs)
    assert len(out) == 1
    check_super(out[0], segs)
    h0, h1 = parse_vnet_hdr(sup), parse_vnet_hdr(out[0])
    assert (h1.gso_type, h1.gso_size, h1.csum_start, h1.csum_offset) == (
        h0.gso_type,
        h0.gso_size,
        h0.csum_start,
        h0.csum_offset,
    )
    assert out[0][VNET_HDR_LEN:] == sup[VNET_HDR_LEN:]  # identical packet, partial csum included
    assert [bytes(s) for s in split_gso(out[0], MTU)] == segs


def test_coalesce_sequence_gap_not_merged(path):
    segs = flow(n=6)
    del segs[3]
    out = coalesce(segs)
    assert len(out) == 2
    check_super(out[0], segs[:3])
    check_super(out[1], segs[3:])


def test_coalesce_separate_flows_and_order(path):
    a = flow(n=4, sport=1)
    b = flow(n=4, sport=2, seq=9999)
    c = flow(True, n=3, sport=1)  # same ports, other family
    mixed = [a[0], b[0], c[0], a[1], b[1], c[1], a[2], b[2], c[2], a[3], b[3]]
    out = coalesce(mixed)
    assert len(out) == 3
    check_super(out[0], a)
    check_super(out[1], b)
    check_super(out[2], c)


@pytest.mark.parametrize("flag", [SYN, FIN, RST, URG, CWR, ECE, 0, 0x100])
def test_coalesce_special_flags_not_merged(path, flag):
    segs = flow(n=5)
    f = ACK | flag if flag != 0 else 0
    segs[2] = tcp_packet(
        payload=rand_payload(1368, 1002), seq=1000 + 2 * 1368, ipid=12, flags=f & 0xFF
    )
    if flag == 0x100:  # the AE (ex-NS) bit, in the data offset byte
        p = bytearray(segs[2])
        p[32] |= 1
        p[36:38] = b"\0\0"
        struct.pack_into("!H", p, 36, ref_csum(ref_pseudo(bytes(p), 6, len(p) - 20) + p[20:]))
        segs[2] = bytes(p)
    out = coalesce(segs)
    assert len(out) == 3
    check_super(out[0], segs[:2])
    assert out[1] == bytes(10) + segs[2]
    check_super(out[2], segs[3:])


def test_coalesce_psh_ends_run(path):
    segs = flow(n=6)
    segs[2] = tcp_packet(
        payload=rand_payload(1368, 1002), seq=1000 + 2 * 1368, ipid=12, flags=ACK | PSH
    )
    out = coalesce(segs)
    assert len(out) == 2
    check_super(out[0], segs[:3])
    check_super(out[1], segs[3:])
    assert fields(strip(out[0])[1])["flags"] == ACK | PSH


def test_coalesce_short_segment_ends_run_and_bigger_starts_new(path):
    segs = flow(n=2) + [tcp_packet(payload=b"x" * 100, seq=1000 + 2 * 1368, ipid=12)]
    segs.append(tcp_packet(payload=b"y" * 1368, seq=1000 + 2 * 1368 + 100, ipid=13))
    segs.append(tcp_packet(payload=b"z" * 1368, seq=1000 + 3 * 1368 + 100, ipid=14))
    out = coalesce(segs)
    assert len(out) == 2
    check_super(out[0], segs[:3])
    check_super(out[1], segs[3:])
    # A bigger segment may not follow smaller ones inside a run.
    segs = [
        tcp_packet(payload=b"a" * 500, seq=1, ipid=1),
        tcp_packet(payload=b"b" * 900, seq=501, ipid=2),
    ]
    assert [strip(o)[1] for o in coalesce(segs)] == segs


@pytest.mark.parametrize(
    "change",
    [
        dict(ack=5001),
        dict(win=503),
        dict(opts=ts_opts(1001)),
        dict(opts=ts_opts()[:8] + b"\1\1\1\1"),
        dict(tos=4),
        dict(ttl=63),
        dict(df=False),
        dict(flow=5),
    ],
    ids=["ack", "window", "tsval", "opt-layout", "tos", "ttl", "df", "flowlabel"],
)
def test_coalesce_header_mismatch_not_merged(path, change):
    v6 = "flow" in change
    segs = flow(v6, n=4)
    for i in (2, 3):  # the second half differs from the first in one header field
        segs[i] = tcp_packet(
            v6, rand_payload(1368, 1000 + i), seq=1000 + i * 1368, ipid=10 + i, **change
        )
    out = coalesce(segs)
    assert len(out) == 2
    check_super(out[0], segs[:2])
    check_super(out[1], segs[2:])


def test_coalesce_ipv4_ids_must_be_consecutive_without_df(path):
    segs = flow(n=4, df=False)
    out = coalesce(segs)
    assert len(out) == 1
    check_super(out[0], segs)
    segs[2] = tcp_packet(payload=rand_payload(1368, 1002), seq=1000 + 2 * 1368, ipid=99, df=False)
    segs[3] = tcp_packet(payload=rand_payload(1368, 1003), seq=1000 + 3 * 1368, ipid=100, df=False)
    out = coalesce(segs)
    assert len(out) == 2
    check_super(out[1], segs[2:])
    # With DF set, IDs do not matter (Linux sends DF segments with varying IDs).
    segs = flow(n=4)
    segs[2] = tcp_packet(payload=rand_payload(1368, 1002), seq=1000 + 2 * 1368, ipid=99)
    assert len(coalesce(segs)) == 1


def test_coalesce_not_candidates_pass_through(path):
    pkts = [
        udp_packet(payload=b"u" * 100),
        tcp_packet(payload=b""),  # pure ACK
        tcp_packet(payload=b"x" * 100, ip_opts=b"\x01\x01\x01\x00"),  # IPv4 options
        b"\x45" + bytes(50),  # garbage
        b"",
        b"\x60" + bytes(10),
    ]
    frag = bytearray(tcp_packet(payload=b"f" * 100))
    frag[6] |= 0x20  # MF
    pkts.append(bytes(frag))
    out = coalesce(pkts + pkts)
    assert out == [bytes(10) + p for p in pkts + pkts]


def test_coalesce_non_candidate_of_flow_breaks_run(path):
    """A pure ACK of the same flow between data segments keeps its place."""
    segs = flow(n=4)
    pure = tcp_packet(payload=b"", seq=1000 + 2 * 1368)
    out = coalesce(segs[:2] + [pure] + segs[2:])
    assert len(out) == 3
    check_super(out[0], segs[:2])
    assert out[1] == bytes(10) + pure
    check_super(out[2], segs[2:])


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_coalesce_bad_checksum_not_merged(path, v6):
    segs = flow(v6, n=8)
    bad = bytearray(segs[3])
    bad[-1] ^= 0xFF  # payload corrupted after the checksum was computed
    segs[3] = bytes(bad)
    stats = OffloadStats()
    out = coalesce(segs, stats=stats)
    assert stats.coalesce_bad_csum == 1
    assert len(out) == 3
    check_super(out[0], segs[:3])
    assert out[1] == bytes(10) + segs[3]
    check_super(out[2], segs[4:])
    # Without verification the corrupted segment would be merged.
    assert len(coalesce(segs, verify_checksums=False)) == 1


def test_coalesce_bad_checksums_in_mixed_families(path):
    a, b = flow(n=5, sport=1), flow(True, n=5, sport=2)
    a[1] = a[1][:-1] + bytes([a[1][-1] ^ 1])
    b[3] = b[3][:-1] + bytes([b[3][-1] ^ 1])
    stats = OffloadStats()
    out = coalesce([x for pair in zip(a, b, strict=True) for x in pair], stats=stats)
    assert stats.coalesce_bad_csum == 2
    # Each run is broken where it was, in place: a's pieces, then b's.
    want = [("s", a[:1]), ("1", a[1]), ("s", a[2:]), ("s", b[:3]), ("1", b[3]), ("s", b[4:])]
    assert len(out) == len(want)
    for o, (kind, x) in zip(out, want, strict=True):
        if kind == "1" or len(x) == 1:
            assert o == bytes(10) + (x if kind == "1" else x[0])
        else:
            check_super(o, x)


def test_coalesce_bad_ipv4_header_checksum_not_merged(path):
    segs = flow(n=3)
    bad = bytearray(segs[1])
    bad[10] ^= 1
    segs[1] = bytes(bad)
    out = coalesce(segs)
    assert out[1] == bytes(10) + segs[1] and len(out) == 3


def test_coalesce_limits(path):
    segs = flow(n=60, size=1368)
    out = coalesce(segs, max_segments=16)
    assert [parse_vnet_hdr(o).gso_size for o in out] == [1368] * 4
    assert len(out) == 4
    out = coalesce(segs)  # 64 KB limit: 65535 // 1368 segments at most
    assert len(out) == 2
    assert all(len(o) - VNET_HDR_LEN <= 65535 for o in out)
    check_super(out[0], segs[: (65535 - 52) // 1368])


def test_coalesce_single_packets_get_zero_header(path):
    p = tcp_packet(payload=b"one")
    assert coalesce([p]) == [bytes(10) + p]
    assert coalesce([memoryview(p)]) == [bytes(10) + p]
    assert coalesce([]) == []


def test_coalesce_accepts_memoryviews_and_bytearrays(path):
    segs = flow(n=4)
    out = coalesce([memoryview(segs[0]), bytearray(segs[1]), segs[2], memoryview(segs[3])])
    assert len(out) == 1
    check_super(out[0], segs)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=120), max_size=10))
def test_coalesce_random_bytes_never_raise(pkts):
    out = coalesce(pkts)
    assert out == [bytes(10) + p for p in pkts]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_coalesce_property_resplit_gives_back_each_flow(data):
    """Random interleavings of several flows with gaps, flag changes and sizes:
    splitting every output again yields exactly each flow's packets, in order."""
    flows = {}
    pkts = []
    for fid in range(data.draw(st.integers(1, 3))):
        v6 = data.draw(st.booleans())
        seq = data.draw(st.integers(0, 2**32 - 1))
        ipid = data.draw(st.integers(0, 0xFFFF))
        size = data.draw(st.integers(1, 1368))
        mine = []
        for _ in range(data.draw(st.integers(1, 12))):
            kind = data.draw(
                st.sampled_from(["full", "full", "full", "short", "psh", "gap", "ack", "fin"])
            )
            n = size if kind in ("full", "psh", "gap") else data.draw(st.integers(0, size))
            if kind == "gap":
                seq = (seq + 1000) & 0xFFFFFFFF
            flags = {"psh": ACK | PSH, "fin": ACK | FIN}.get(kind, ACK)
            mine.append(
                tcp_packet(
                    v6,
                    rand_payload(n, seq),
                    seq=seq,
                    ipid=ipid,
                    flags=flags,
                    sport=fid,
                    df=data.draw(st.booleans()),
                )
            )
            seq = (seq + n) & 0xFFFFFFFF
            ipid = (ipid + 1) & 0xFFFF
        flows[fid] = mine
    cursors = dict.fromkeys(flows, 0)
    while any(cursors[f] < len(flows[f]) for f in flows):
        f = data.draw(st.sampled_from(sorted(f for f in flows if cursors[f] < len(flows[f]))))
        pkts.append((f, flows[f][cursors[f]]))
        cursors[f] += 1
    out = coalesce([p for _, p in pkts], max_segments=data.draw(st.integers(1, 64)))
    got: dict[int, list[bytes]] = {f: [] for f in flows}
    for o in out:
        h, pkt = strip(o)
        if h.gso_type == VIRTIO_NET_HDR_GSO_NONE:
            assert h == VnetHdr(0, 0, 0, 0, 0, 0)
            parts = [pkt]
        else:
            parts = [bytes(s) for s in split_gso(o, 65535)]
        for p in parts:
            got[fields(p)["sport"]].append(p)
    assert got == flows


# ------------------------------------------------------------------ coalesce UDP


def dgrams(v6=False, n=8, size=1372, start_id=10, last=None, **kw):
    """n datagrams of one UDP flow (valid checksums); `last` sets the final payload size."""
    sizes = [size] * n
    if last is not None:
        sizes[-1] = last
    return [
        udp_packet(v6, rand_payload(sz, 7000 + i), ipid=(start_id + i) & 0xFFFF, **kw)
        for i, sz in enumerate(sizes)
    ]


def udp_fields(pkt: bytes) -> dict:
    pkt = bytes(pkt)
    v6 = pkt[0] >> 4 == 6
    l4 = 40 if v6 else (pkt[0] & 15) * 4
    sport, dport, ulen, csum = struct.unpack_from("!HHHH", pkt, l4)
    d = dict(v6=v6, l4=l4, sport=sport, dport=dport, ulen=ulen, csum=csum, payload=pkt[l4 + 8 :])
    if v6:
        d["plen"] = struct.unpack_from("!H", pkt, 4)[0]
    else:
        d["tot"], d["id"] = struct.unpack_from("!HH", pkt, 2)
    return d


def check_udp_super(out: bytes, segs: list[bytes]) -> None:
    """`out` is the correct USO form of `segs` (all of one UDP flow, in order)."""
    h, pkt = strip(out)
    f0 = udp_fields(segs[0])
    v6, l4 = f0["v6"], f0["l4"]
    gso = len(f0["payload"])
    assert h == VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_UDP_L4, l4 + 8, gso, l4, 6)
    f = udp_fields(pkt)
    assert f["payload"] == b"".join(udp_fields(s)["payload"] for s in segs)
    assert (f["sport"], f["dport"]) == (f0["sport"], f0["dport"])
    assert f["ulen"] == len(pkt) - l4 and len(pkt) <= 65535
    # Every datagram but the last carries exactly gso_size bytes; the kernel
    # refuses a "super-packet" of one segment (len <= 8 + gso_size).
    assert all(len(udp_fields(s)["payload"]) == gso for s in segs[:-1])
    assert 0 < len(udp_fields(segs[-1])["payload"]) <= gso and len(segs) >= 2
    assert bytes(pkt[:l4]) == (
        bytes(segs[0][:4]) + struct.pack("!H", len(pkt) - 40) + bytes(segs[0][6:40])
        if v6
        else bytes(segs[0][:2])
        + struct.pack("!H", len(pkt))
        + bytes(segs[0][4:10])
        + bytes(pkt[10:12])
        + bytes(segs[0][12:20])
    )
    if not v6:
        assert ref_ip_ok(pkt)
    # CHECKSUM_PARTIAL: the folded pseudo-header sum over the super-packet's length.
    assert f["csum"] == ref_sum(ref_pseudo(pkt, 17, len(pkt) - l4))
    done = bytearray(pkt)
    done[l4 + 6 : l4 + 8] = b"\0\0"
    struct.pack_into("!H", done, l4 + 6, ref_csum(struct.pack("!H", f["csum"]) + bytes(done[l4:])))
    assert ref_l4_ok(bytes(done))


def resplit(out: bytes) -> list[bytes]:
    """What the kernel's USO segmentation makes of `out`, via the module's own split."""
    return [bytes(s) for s in split_gso_batch([out], 65535)]


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_coalesce_udp_one_flow_and_resplit_is_identity(path, v6):
    segs = dgrams(v6, n=10, last=100)
    stats = OffloadStats()
    out = coalesce(segs, udp=True, stats=stats)
    assert len(out) == 1
    check_udp_super(out[0], segs)
    assert resplit(out[0]) == segs  # byte for byte, checksums and IPv4 IDs included
    assert stats.coalesce_in == 10 and stats.coalesce_out == 1
    assert stats.coalesce_merged == stats.coalesce_udp_merged == 10
    assert stats.coalesce_super == stats.coalesce_udp_super == 1


def test_coalesce_udp_only_when_asked(path):
    segs = dgrams(n=6)
    assert coalesce(segs) == [bytes(10) + s for s in segs]
    assert coalesce(segs, udp=False) == [bytes(10) + s for s in segs]


@pytest.mark.parametrize("start", [10, 0xFFFD])
def test_coalesce_udp_without_df_needs_consecutive_ids(path, start):
    segs = dgrams(n=6, df=False, start_id=start)
    out = coalesce(segs, udp=True)
    assert len(out) == 1
    check_udp_super(out[0], segs)
    # Split renumbers IDs consecutively from the first: identical, wrap included.
    assert resplit(out[0]) == segs
    segs[3:] = [udp_packet(payload=rand_payload(1372, k), ipid=999 + k, df=False) for k in range(3)]
    out = coalesce(segs, udp=True)
    assert len(out) == 2  # start + 3 does not follow start + 2: a new run from 999
    check_udp_super(out[0], segs[:3])
    check_udp_super(out[1], segs[3:])
    assert resplit(out[0]) + resplit(out[1]) == segs
    # With DF, IDs do not matter (Linux sends DF datagrams with arbitrary IDs).
    segs = dgrams(n=4)
    segs[2] = udp_packet(payload=rand_payload(1372, 7002), ipid=4242)
    out = coalesce(segs, udp=True)
    assert len(out) == 1
    check_udp_super(out[0], segs)


@pytest.mark.parametrize(
    "change",
    [
        dict(tos=4),
        dict(ttl=63),
        dict(df=False),
        dict(v6=True, flow=5),
        dict(v6=True, tos=1),
        dict(v6=True, ttl=1),
        dict(dport=54),
        dict(dst="10.99.0.9"),
    ],
    ids=["tos", "ttl", "df", "flowlabel", "tclass", "hoplimit", "port", "addr"],
)
def test_coalesce_udp_header_mismatch_not_merged(path, change):
    change = dict(change)  # parametrize shares the dict between runs
    v6 = change.pop("v6", False)
    segs = dgrams(v6, n=4)
    for i in (2, 3):
        segs[i] = udp_packet(v6, rand_payload(1372, 7000 + i), ipid=10 + i, **change)
    out = coalesce(segs, udp=True)
    assert len(out) == 2
    check_udp_super(out[0], segs[:2])
    check_udp_super(out[1], segs[2:])


def test_coalesce_udp_short_datagram_ends_run_and_bigger_is_not_merged(path):
    segs = dgrams(n=3, last=500) + dgrams(n=3, start_id=13)
    out = coalesce(segs, udp=True)
    assert len(out) == 2
    check_udp_super(out[0], segs[:3])
    check_udp_super(out[1], segs[3:])
    # A bigger datagram may not follow a smaller one.
    segs = [udp_packet(payload=b"a" * 500, ipid=1), udp_packet(payload=b"b" * 900, ipid=2)]
    assert coalesce(segs, udp=True) == [bytes(10) + s for s in segs]


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
@pytest.mark.parametrize("size,last", [(1001, 3), (1, 1), (7, 6), (1372, 1372)])
def test_coalesce_udp_odd_sizes(path, v6, size, last):
    segs = dgrams(v6, n=5, size=size, last=last)
    out = coalesce(segs, udp=True)
    assert len(out) == 1
    check_udp_super(out[0], segs)
    assert resplit(out[0]) == segs


def test_coalesce_udp_flows_interleaved_with_tcp_on_same_ports(path):
    u = dgrams(n=4, sport=40000, dport=5201)
    t = flow(n=4)  # TCP 40000 -> 5201, same addresses
    u6 = dgrams(True, n=3, sport=40000, dport=5201)
    mixed = [u[0], t[0], u6[0], u[1], t[1], u6[1], u[2], t[2], u6[2], u[3], t[3]]
    stats = OffloadStats()
    out = coalesce(mixed, udp=True, stats=stats)
    assert len(out) == 3
    check_udp_super(out[0], u)
    check_super(out[1], t)
    check_udp_super(out[2], u6)
    assert stats.coalesce_udp_super == 2 and stats.coalesce_super == 3


def test_coalesce_udp_non_candidates_pass_through_and_break_runs(path):
    segs = dgrams(n=6)
    bad_len = bytearray(udp_packet(payload=rand_payload(1372, 1), ipid=13))
    struct.pack_into("!H", bad_len, 24, 1000)  # UDP length != buffer
    empty = udp_packet(payload=b"", ipid=13)
    trailing = udp_packet(payload=rand_payload(1372, 2), ipid=13) + b"\0"  # IP length != buffer
    for odd in (bytes(bad_len), empty, trailing):
        pkts = segs[:3] + [odd] + segs[3:]
        out = coalesce(pkts, udp=True)
        assert len(out) == 3, odd[:30]
        check_udp_super(out[0], segs[:3])
        assert out[1] == bytes(10) + odd
        check_udp_super(out[2], segs[3:])
    v6short = udp_packet(True, payload=b"", dport=53)
    assert coalesce([v6short, v6short], udp=True) == [bytes(10) + v6short] * 2


def test_coalesce_udp_fragments_not_merged_and_break_runs_of_the_pair(path):
    segs = dgrams(n=6)
    frag = bytearray(udp_packet(payload=rand_payload(800, 3), ipid=77, df=False))
    struct.pack_into("!H", frag, 6, 100)  # a non-first fragment: "ports" are payload bytes
    struct.pack_into("!H", frag, 10, 0)
    struct.pack_into("!H", frag, 10, ref_csum(bytes(frag[:20])))
    mf = bytearray(udp_packet(payload=rand_payload(800, 4), ipid=78, df=False))
    mf[6] |= 0x20
    for f in (bytes(frag), bytes(mf)):
        out = coalesce(segs[:2] + [f] + segs[2:], udp=True)
        assert len(out) == 3
        check_udp_super(out[0], segs[:2])
        assert out[1] == bytes(10) + f
        check_udp_super(out[2], segs[2:])
    # Another address pair's fragment does not break the run.
    other = bytearray(frag)
    other[19] = 77
    struct.pack_into("!H", other, 10, 0)
    struct.pack_into("!H", other, 10, ref_csum(bytes(other[:20])))
    out = coalesce(segs[:2] + [bytes(other)] + segs[2:], udp=True)
    assert len(out) == 2
    check_udp_super(out[0], segs)


def test_coalesce_tcp_fragments_break_runs_of_the_pair(path):
    segs = flow(n=6)
    frag = bytearray(tcp_packet(payload=rand_payload(800, 5), ipid=99, df=False))
    frag[20:] = rand_payload(len(frag) - 20, 6)  # a non-first fragment: payload, no TCP header
    struct.pack_into("!H", frag, 6, 100)
    struct.pack_into("!H", frag, 10, 0)
    struct.pack_into("!H", frag, 10, ref_csum(bytes(frag[:20])))
    out = coalesce(segs[:2] + [bytes(frag)] + segs[2:])
    assert len(out) == 3  # the later segments never overtake the fragment
    check_super(out[0], segs[:2])
    assert out[1] == bytes(10) + bytes(frag)
    check_super(out[2], segs[2:])
    other = bytearray(frag)  # another address pair's fragment does not break the run
    other[19] = 77
    struct.pack_into("!H", other, 10, 0)
    struct.pack_into("!H", other, 10, ref_csum(bytes(other[:20])))
    out = coalesce(segs[:2] + [bytes(other)] + segs[2:])
    assert len(out) == 2
    check_super(out[0], segs)


@pytest.mark.parametrize(
    "v6,where",
    [
        (False, "payload"),
        (False, "udp-csum"),
        (False, "ip-csum"),
        (True, "payload"),
        (True, "udp-csum"),
    ],
)
def test_coalesce_udp_bad_checksum_written_alone(path, v6, where):
    segs = dgrams(v6, n=8, last=9)
    bad = bytearray(segs[3])
    k = {"payload": -1, "udp-csum": (40 if v6 else 20) + 7, "ip-csum": 10}[where]
    bad[k] ^= 0x01  # changed after the checksums were computed
    segs[3] = bytes(bad)
    stats = OffloadStats()
    out = coalesce(segs, udp=True, stats=stats)
    assert stats.coalesce_bad_csum == 1
    assert len(out) == 3
    check_udp_super(out[0], segs[:3])
    assert out[1] == bytes(10) + segs[3]
    check_udp_super(out[2], segs[4:])
    assert resplit(out[0]) + [segs[3]] + resplit(out[2]) == segs
    # Without verification the corrupted datagram would be merged (and trusted).
    assert len(coalesce(segs, udp=True, verify_checksums=False)) == 1


def test_coalesce_udp_zero_checksum(path):
    # IPv4: 0 = "no checksum": merged unverified; the split fills in real checksums.
    segs = dgrams(n=6, last=50, zero_csum=True)
    segs[2] = udp_packet(payload=rand_payload(1372, 7002), ipid=12)  # mixed with a checksummed one
    stats = OffloadStats()
    out = coalesce(segs, udp=True, stats=stats)
    assert len(out) == 1 and stats.coalesce_bad_csum == 0
    check_udp_super(out[0], segs)
    back = resplit(out[0])
    assert all(ref_l4_ok(b) and ref_ip_ok(b) for b in back)
    assert [udp_fields(b)["payload"] for b in back] == [udp_fields(s)["payload"] for s in segs]
    # ...but the IPv4 header checksum is still verified.
    hb = bytearray(segs[1])
    hb[10] ^= 0x10
    segs[1] = bytes(hb)
    assert len(coalesce(segs, udp=True)) == 3
    # IPv6: 0 is invalid; never merged, counted.
    segs6 = dgrams(True, n=4, zero_csum=True)
    stats = OffloadStats()
    assert coalesce(segs6, udp=True, stats=stats) == [bytes(10) + s for s in segs6]
    assert stats.coalesce_bad_csum == 4


def test_coalesce_udp_limits(path):
    segs = dgrams(n=100, size=100)
    out = coalesce(segs, udp=True, max_segments=1000)  # UDP runs stop at 64 datagrams
    assert len(out) == 2
    check_udp_super(out[0], segs[:64])
    check_udp_super(out[1], segs[64:])
    out = coalesce(segs, udp=True, max_segments=16)
    assert len(out) == 7 and all(parse_vnet_hdr(o).gso_size == 100 for o in out)
    big = dgrams(n=60, size=1372)  # 64 KB limit: (65535 - 28) // 1372 = 47 datagrams
    out = coalesce(big, udp=True)
    assert len(out) == 2
    check_udp_super(out[0], big[:47])
    check_udp_super(out[1], big[47:])
    assert all(len(o) - VNET_HDR_LEN <= 65535 for o in out)
    one = dgrams(n=1)
    assert coalesce(one, udp=True) == [bytes(10) + one[0]]


def test_coalesce_udp_bench_packets_match_builder():
    """The bench's UDP datagrams are valid (else the bench would time the bad path)."""
    p = offload._bench_udp_packet(False, b"z" * 1372, 5)
    assert ref_l4_ok(p) and ref_ip_ok(p) and udp_fields(p)["id"] == 5


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=120), max_size=10))
def test_coalesce_udp_random_bytes_never_raise(pkts):
    assert coalesce(pkts, udp=True) == [bytes(10) + p for p in pkts]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_coalesce_udp_property_resplit_gives_back_each_flow(data):
    """Random interleavings of UDP flows (and a TCP flow) with size changes, ID
    jumps, header changes and corrupted datagrams: every output is either an
    original packet behind a zero header or a valid super-packet, and splitting
    the outputs gives back exactly each flow's packets, in order."""
    flows: dict[int, list[bytes]] = {}
    for fid in range(data.draw(st.integers(1, 3))):
        v6 = data.draw(st.booleans())
        df = data.draw(st.booleans())
        ipid = data.draw(st.integers(0, 0xFFFF))
        size = data.draw(st.integers(1, 1400))
        mine = []
        for k in range(data.draw(st.integers(1, 14))):
            kind = data.draw(
                st.sampled_from(["full", "full", "full", "short", "big", "jump", "ttl", "bad"])
            )
            n = size
            if kind == "short":
                n = data.draw(st.integers(1, size))
            elif kind == "big":
                n = data.draw(st.integers(size, 1450))
            if kind == "jump":
                ipid = (ipid + 100) & 0xFFFF
            p = udp_packet(
                v6,
                rand_payload(n, fid * 100 + k),
                sport=fid,
                ipid=ipid,
                df=df,
                ttl=63 if kind == "ttl" else 64,
            )
            if kind == "bad":
                b = bytearray(p)
                b[-1] ^= 0x40
                p = bytes(b)
            mine.append(p)
            ipid = (ipid + 1) & 0xFFFF
        flows[fid] = mine
    flows[99] = flow(n=data.draw(st.integers(0, 5)), sport=99)
    pkts = []
    cursors = dict.fromkeys(flows, 0)
    while any(cursors[f] < len(flows[f]) for f in flows):
        f = data.draw(st.sampled_from(sorted(f for f in flows if cursors[f] < len(flows[f]))))
        pkts.append(flows[f][cursors[f]])
        cursors[f] += 1
    out = coalesce(pkts, udp=True, max_segments=data.draw(st.integers(1, 80)))
    got: dict[int, list[bytes]] = {f: [] for f in flows}
    for o in out:
        h, pkt = strip(o)
        if h.gso_type == VIRTIO_NET_HDR_GSO_NONE:
            assert h == VnetHdr(0, 0, 0, 0, 0, 0)
            parts = [pkt]
        elif h.gso_type == VIRTIO_NET_HDR_GSO_UDP_L4:
            parts = resplit(o)
            check_udp_super(o, parts)
        else:
            parts = [bytes(s) for s in split_gso(o, 65535)]
        for p in parts:
            got[udp_fields(p)["sport"]].append(p)
    # The split (like the kernel's) numbers IPv4 IDs from the first datagram on; an
    # ID carries nothing with DF (RFC 6864), so DF datagrams that were merged across
    # an ID jump compare equal up to ID and header checksum.  Without DF: exact.
    assert {f: [no_df_id(p) for p in ps] for f, ps in got.items()} == {
        f: [no_df_id(p) for p in ps] for f, ps in flows.items()
    }
    assert {f: [p for p in ps if p[0] >> 4 == 6 or not p[6] & 0x40] for f, ps in got.items()} == {
        f: [p for p in ps if p[0] >> 4 == 6 or not p[6] & 0x40] for f, ps in flows.items()
    }


def no_df_id(p: bytes) -> bytes:
    if p[0] >> 4 == 4 and p[6] & 0x40:
        return p[:4] + b"\0\0" + p[6:10] + b"\0\0" + p[12:]
    return p


# ------------------------------------------------------------------ benchmark


def test_benchmark_prints_numbers(capsys):
    res = offload.bench(repeat=30)
    with capsys.disabled():
        print()
        for k, v in res.items():
            print(f"    {k:52s} {v:8.3f}")
    # Generous bounds: this only catches an accidental fall back to per-byte Python.
    assert res["split_v4_64k_x1_us_per_segment"] < 10
    assert res["coalesce_v4_64pkt_verify=True_us_per_packet"] < 20
    assert res["coalesce_udp_v4_64x1372_udp=True_us_per_packet"] < 20


class UdpFlowCase(NamedTuple):
    """One draw of `udp_flow_cases`: n datagrams of `size` bytes of payload from IPv4
    ID `ipid` on, datagram `at` mutated by `kind` (`m`: the payload size for
    "short"/"big"), the last one's byte `last` flipped unless None, and
    coalesce's `max_segments`."""

    n: int
    size: int
    ipid: int
    kind: str
    at: int
    m: int | None
    last: int | None
    max_segments: int


@st.composite
def udp_flow_cases(draw) -> UdpFlowCase:
    n = draw(st.integers(2, 70))
    size = draw(st.sampled_from([1, 7, 700, 1372, 1400, 9000, 40000, 65507]))
    ipid = draw(st.integers(0, 0xFFFF))
    kind = draw(st.sampled_from(
        ["none", "none", "short", "big", "tos", "ttl", "nodf", "mf", "port", "totlen",
         "udplen", "badsum", "ipsum", "zerosum", "v6"]))
    at = draw(st.sampled_from([0, n - 1, draw(st.integers(0, n - 1))]))
    m = None
    if kind in ("short", "big"):
        big = st.integers(size, min(size + 90, 65507))
        m = draw(st.integers(1, size) if kind == "short" else big)
    last = draw(st.sampled_from([None, -1, 10]))  # and perhaps a bad last one
    max_segments = draw(st.sampled_from([1, 5, 64, 80]))
    return UdpFlowCase(n, size, ipid, kind, at, m, last, max_segments)


def udp_flow_batch(case: UdpFlowCase) -> list[bytes]:
    """The batch a `UdpFlowCase` describes."""
    n, size, ipid, kind, at, m, last = case[:7]
    pkts = [udp_packet(payload=rand_payload(size, k), sport=40000, dport=5201,
                       ipid=(ipid + k) & 0xFFFF) for k in range(n)]
    p = pkts[at]
    if kind in ("short", "big"):
        p = udp_packet(payload=rand_payload(m, 7), sport=40000, dport=5201, ipid=at)
    elif kind in ("tos", "ttl", "nodf", "port", "zerosum", "v6"):
        sport = 40001 if kind == "port" else 40000
        p = udp_packet(kind == "v6", rand_payload(size, at), sport=sport, dport=5201,
                       ipid=(ipid + at) & 0xFFFF, tos=4 if kind == "tos" else 0,
                       ttl=9 if kind == "ttl" else 64, df=kind != "nodf",
                       zero_csum=kind == "zerosum")
    elif kind in ("mf", "totlen", "udplen", "badsum", "ipsum"):
        b = bytearray(p)
        flips = {"mf": (6, 0x20), "totlen": (3, 1), "udplen": (25, 1), "badsum": (-1, 0x40),
                 "ipsum": (10, 0x08)}
        off, bit = flips[kind]
        b[off] ^= bit
        p = bytes(b)
    pkts[at] = p
    if last is not None:
        b = bytearray(pkts[-1])
        b[last] ^= 0x10
        pkts[-1] = bytes(b)
    return pkts


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(udp_flow_cases())
# Issue 15: a shorter last datagram still fits in the 64 KB of a run that no further
# full-size one fits in (40028 + 1 B); the fast plan cut it off into a run of its own.
@example(UdpFlowCase(n=2, size=40000, ipid=0, kind="short", at=1, m=1, last=None,
                     max_segments=5))
def test_coalesce_udp_one_flow_fast_plan_equals_general_plan(case):
    """The one-flow UDP fast plan (`_plan_udp4_flow`) gives byte for byte what the
    general plan gives, on batches at and just past its conditions: one mutated
    datagram (size, TOS, TTL, DF, fragment bits, ports, length fields, checksums,
    IPv6) anywhere in an IPv4 flow; with the same counters."""
    pkts = udp_flow_batch(case)
    fast_stats, general_stats = OffloadStats(), OffloadStats()
    fast = coalesce(pkts, udp=True, max_segments=case.max_segments, stats=fast_stats)
    general = coalesce_general(pkts, udp=True, max_segments=case.max_segments,
                               stats=general_stats)
    assert fast == general
    assert fast_stats.as_dict() == general_stats.as_dict()


def coalesce_general(pkts, **kw):
    """`coalesce` with the one-flow UDP fast plan turned off."""
    plain = offload._plan_udp4_flow
    try:
        offload._plan_udp4_flow = lambda *a: None
        return coalesce(pkts, **kw)
    finally:
        offload._plan_udp4_flow = plain


@pytest.mark.parametrize("size, n, last", [(1372, 48, 1023), (40000, 2, 25507)],
                         ids=["47x1372+short", "40000+short"])
def test_coalesce_udp_flow_short_last_fills_the_64k_run(path, size, n, last):
    """A shorter last datagram joins a run that no further full-size one fits in, up
    to exactly 65535 bytes of IP packet: the kernel's USO rules (every segment but
    the last carries gso_size bytes, the last 1..gso_size) allow it.  One byte more
    and it goes alone.  The fast plan and the general plan agree (issue 15)."""
    for extra, want in ((0, 1), (1, 2)):
        pkts = dgrams(n=n, size=size, last=last + extra)
        out = coalesce(pkts, udp=True)
        assert out == coalesce_general(pkts, udp=True) and len(out) == want
        if want == 1:
            assert len(strip(out[0])[1]) == 65535
            check_udp_super(out[0], pkts)
        else:  # the full-size ones as before (one alone), the shorter one alone
            assert out[0] == coalesce(pkts[:-1], udp=True)[0]
            assert out[1] == bytes(10) + pkts[-1]


def test_coalesce_udp_flow_lone_big_datagrams_not_verified():
    """Datagrams over 32 KB go alone (two do not fit in 64 KB) but for the last
    full-size one, which the shorter last one joins.  Only that run is verified:
    a bad checksum on a datagram that goes alone is left to the kernel and not
    counted, as in the general plan."""
    pkts = dgrams(n=7, size=40000, last=1)
    b = bytearray(pkts[0])
    b[-1] ^= 0x40
    pkts[0] = bytes(b)
    for plan in (coalesce, coalesce_general):
        stats = OffloadStats()
        out = plan(pkts, udp=True, stats=stats)
        assert stats.coalesce_bad_csum == 0 and len(out) == 6
        assert out[:5] == [bytes(10) + p for p in pkts[:5]]
        check_udp_super(out[5], pkts[5:])


@pytest.mark.parametrize("flip", [10, 26, -1], ids=["ip-header", "udp-csum", "payload"])
def test_coalesce_udp_flow_short_last_with_bad_checksum_goes_alone(flip):
    """The one-flow fast plan's shorter last datagram is verified too: a bad IP header
    or UDP checksum on it keeps it out of the run, counted."""
    pkts = dgrams(n=9, last=500)
    b = bytearray(pkts[-1])
    b[flip] ^= 0x10
    pkts[-1] = bytes(b)
    stats = offload.OffloadStats()
    out = coalesce(pkts, udp=True, stats=stats)
    assert len(out) == 2 and stats.coalesce_bad_csum == 1
    check_udp_super(out[0], pkts[:8])
    assert out[1] == bytes(10) + pkts[-1]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_split_uniform_csum_batch_equals_general_path(data):
    """The one-flow NEEDS_CSUM fast path (`_csum_uniform`) gives byte for byte what the
    general path gives (and the same counters), on batches at and just past its
    conditions: one read changed (size, header fields, odd offsets, GSO, a view)."""
    v6 = data.draw(st.booleans())
    l4 = 40 if v6 else 20
    n = data.draw(st.integers(1, 70))
    size = data.draw(st.sampled_from([1, 400, 600, 1372, 1373, 9000]))
    bufs: list = [pack_vnet_hdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE, 0, 0, l4, 6)
                  + udp_packet(v6, rand_payload(size, k), partial=True) for k in range(n)]
    kind = data.draw(st.sampled_from(
        ["none", "none", "size", "flags", "gso", "cstart", "coff", "hdr_len", "view", "short"]))
    at = data.draw(st.integers(0, n - 1))
    hdr = list(offload.parse_vnet_hdr(bufs[at]))
    if kind == "size":
        bufs[at] = bufs[at][:10] + udp_packet(v6, rand_payload(size + 2, 9), partial=True)
    elif kind == "view":
        bufs[at] = memoryview(bufs[at])
    elif kind == "short":
        bufs[at] = bufs[at][:7]
    elif kind != "none":
        changes = {"flags": (0, 0), "gso": (1, VIRTIO_NET_HDR_GSO_TCPV4), "cstart": (4, l4 + 1),
                   "coff": (5, 16), "hdr_len": (2, 99)}
        field, value = changes[kind]
        hdr[field] = value
        for k in range(n) if data.draw(st.booleans()) else [at]:  # one read, or all
            bufs[k] = pack_vnet_hdr(*hdr) + bytes(bufs[k][10:])
    fast_stats, general_stats = offload.OffloadStats(), offload.OffloadStats()
    fast = [bytes(o) for o in split_gso_batch(bufs, 65535, stats=fast_stats)]
    plain = offload._csum_uniform
    try:
        offload._csum_uniform = lambda *a: None
        general = [bytes(o) for o in split_gso_batch(bufs, 65535, stats=general_stats)]
    finally:
        offload._csum_uniform = plain
    assert fast == general
    assert fast_stats.as_dict() == general_stats.as_dict()
    batch = split_gso_batch(bufs, 65535)
    if isinstance(batch, offload.UniformBatch):  # handed over as rows: the same packets
        at = 2 * data.draw(st.integers(0, 40))
        width = at + batch.n + 2 * data.draw(st.integers(0, 8))
        block = np.full((len(batch), width), 0xAB, np.uint8)
        batch.fill(block, at)
        assert [bytes(row[at : at + batch.n]) for row in block] == general
        assert (block[:, :at] == 0xAB).all() and (block[:, at + batch.n :] == 0xAB).all()
        head = batch.ipv4_destination()
        assert (head is not None) == (not v6)
        assert v6 or bytes(head[16:20]) == ipaddress.IPv4Address(B4).packed
