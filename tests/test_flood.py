"""wgx.lab.flood's packet builders (the raw sender is exercised by tests/test_attack.py)."""

from __future__ import annotations

import ipaddress
import struct

from test_offload import ref_csum

from wgx.dataplane.offload import OffloadStats, coalesce
from wgx.lab import cryptobench as cb
from wgx.lab.flood import bad_mac1, initiations, spoofed_sources, udp_frame
from wgx.protocol import crypto
from wgx.protocol.cookie import CookieChecker
from wgx.protocol.engine import Engine
from wgx.protocol.messages import MSG_INITIATION, message_type


def test_initiations_have_a_valid_mac1_for_the_victim_only() -> None:
    victim = crypto.public_key(crypto.generate_private_key())
    other = crypto.public_key(crypto.generate_private_key())
    msgs = initiations(victim, 20, seed=3)
    assert len(set(msgs)) == 20 and initiations(victim, 20, seed=3) == msgs
    checker, wrong = CookieChecker(victim), CookieChecker(other)
    for m in msgs:
        assert len(m) == 148 and message_type(m) == MSG_INITIATION and m[-16:] == bytes(16)
        assert checker.check_mac1(m) and not wrong.check_mac1(m)
        assert not checker.check_mac1(bad_mac1(m))


def test_engine_judges_them_past_mac1() -> None:
    """Not under load they fail the handshake itself; bad mac1 stops at the gate."""
    key = crypto.generate_private_key()
    eng = Engine(key)
    for m in initiations(crypto.public_key(key), 5):
        eng.receive_datagram(m, ("198.19.0.1", 1), 0.0)
        eng.receive_datagram(bad_mac1(m), ("198.19.0.1", 1), 0.0)
    assert eng.drops["handshake_auth"] == 5 and eng.drops["bad_mac1"] == 5


def test_udp_frame_headers_and_checksums() -> None:
    payload = b"\x01\0\0\0" + bytes(144)
    f = udp_frame(b"\x02" * 6, b"\x04" * 6, "198.19.0.7", 1234, "198.18.0.1", 51820, payload)
    assert f[:6] == b"\x04" * 6 and f[6:12] == b"\x02" * 6 and f[12:14] == b"\x08\x00"
    ip, udp = f[14:34], f[34:]
    assert ip[0] == 0x45 and ip[9] == 17 and struct.unpack("!H", ip[2:4])[0] == 20 + 8 + 148
    assert ref_csum(ip) == 0  # a valid header sums to 0xffff
    assert ipaddress.IPv4Address(ip[12:16]) == ipaddress.IPv4Address("198.19.0.7")
    sport, dport, ulen, _ = struct.unpack("!HHHH", udp[:8])
    assert (sport, dport, ulen) == (1234, 51820, 156) and udp[8:] == payload
    pseudo = ip[12:20] + struct.pack("!BBH", 0, 17, ulen)
    assert ref_csum(pseudo + udp) == 0


def test_bench_inner_packets_are_valid_so_the_coalescer_merges_them() -> None:
    """The crypto bench's inner packets (built with `ipv4_udp_packet`) carry valid IPv4
    and UDP checksums: a batch of them is one UDP super-packet, not eight datagrams
    kept apart as corrupt (which is what a zero IPv4 checksum used to make of them)."""
    packets = [cb._inner_packet(1400) for _ in range(8)]
    for p in packets:
        assert len(p) == 1400 and ref_csum(p[:20]) == 0
        assert ref_csum(p[12:20] + struct.pack("!BBH", 0, 17, 1380) + p[20:]) == 0
    st = OffloadStats()
    out = coalesce(packets, udp=True, stats=st)
    assert len(out) == 1 and st.coalesce_udp_merged == 8 and st.coalesce_bad_csum == 0


def test_spoofed_sources() -> None:
    assert spoofed_sources("198.19.0.0/16", 3) == ["198.19.0.1", "198.19.0.2", "198.19.0.3"]
    assert len(set(spoofed_sources("198.19.0.0/16", 1024))) == 1024
