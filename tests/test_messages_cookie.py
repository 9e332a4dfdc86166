"""Wire formats (wgx.protocol.messages) and the mac1/mac2/cookie mechanism (cookie.py).

Rules from the whitepaper sections 5.4.2-5.4.7 and the Linux kernel's
drivers/net/wireguard/messages.h and cookie.c.
"""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wgx.protocol import crypto
from wgx.protocol.cookie import (
    COOKIE_REFRESH_TIME,
    COOKIE_SECRET_LATENCY,
    CookieChecker,
    CookieGenerator,
)
from wgx.protocol.messages import (
    COOKIE_REPLY_LEN,
    INITIATION_LEN,
    MSG_COOKIE_REPLY,
    MSG_INITIATION,
    MSG_RESPONSE,
    MSG_TRANSPORT,
    RESPONSE_LEN,
    TRANSPORT_HEADER_LEN,
    TRANSPORT_MIN_LEN,
    CookieReply,
    Initiation,
    MessageError,
    Response,
    message_type,
    pack_transport_header,
    padded_len,
    unpack_transport_header,
)

SIZES = {
    MSG_INITIATION: INITIATION_LEN,
    MSG_RESPONSE: RESPONSE_LEN,
    MSG_COOKIE_REPLY: COOKIE_REPLY_LEN,
}


def _initiation() -> Initiation:
    return Initiation(
        0xDEADBEEF, bytes(range(32)), bytes(range(48)), bytes(range(28)),
        bytes([1]) * 16, bytes([2]) * 16,
    )


def _response() -> Response:
    return Response(
        0x01020304, 0xA0B0C0D0, bytes(range(100, 132)), bytes(range(16)),
        bytes([3]) * 16, bytes([4]) * 16,
    )


def _cookie_reply() -> CookieReply:
    return CookieReply(0x0BADF00D, bytes(range(24)), bytes(range(50, 82)))


# ------------------------------------------------------------------ pack / unpack


def test_sizes() -> None:
    assert (INITIATION_LEN, RESPONSE_LEN, COOKIE_REPLY_LEN) == (148, 92, 64)
    assert (TRANSPORT_HEADER_LEN, TRANSPORT_MIN_LEN) == (16, 32)


def test_initiation_layout_and_round_trip() -> None:
    m = _initiation()
    b = m.pack()
    assert len(b) == 148
    assert b[:4] == b"\x01\x00\x00\x00"
    assert b[4:8] == struct.pack("<I", 0xDEADBEEF)
    assert b[8:40] == m.ephemeral
    assert b[40:88] == m.encrypted_static
    assert b[88:116] == m.encrypted_timestamp
    assert b[116:132] == m.mac1 and b[132:148] == m.mac2
    assert Initiation.unpack(b) == m


def test_response_layout_and_round_trip() -> None:
    m = _response()
    b = m.pack()
    assert len(b) == 92
    assert b[:4] == b"\x02\x00\x00\x00"
    assert b[4:12] == struct.pack("<II", 0x01020304, 0xA0B0C0D0)
    assert b[12:44] == m.ephemeral
    assert b[44:60] == m.encrypted_nothing
    assert b[60:76] == m.mac1 and b[76:92] == m.mac2
    assert Response.unpack(b) == m


def test_cookie_reply_layout_and_round_trip() -> None:
    m = _cookie_reply()
    b = m.pack()
    assert len(b) == 64
    assert b[:4] == b"\x03\x00\x00\x00"
    assert b[4:8] == struct.pack("<I", 0x0BADF00D)
    assert b[8:32] == m.nonce and b[32:64] == m.encrypted_cookie
    assert CookieReply.unpack(b) == m


def test_transport_header_round_trip() -> None:
    hdr = pack_transport_header(0x11223344, 2**64 - 1)
    assert len(hdr) == 16
    assert hdr == b"\x04\x00\x00\x00" + struct.pack("<IQ", 0x11223344, 2**64 - 1)
    pkt = hdr + bytes(16)
    assert unpack_transport_header(pkt) == (0x11223344, 2**64 - 1)
    assert unpack_transport_header(memoryview(pkt)) == (0x11223344, 2**64 - 1)


@pytest.mark.parametrize(
    "bad",
    [b"", bytes(31), b"\x04\x00\x00\x00" + bytes(27), b"\x01\x00\x00\x00" + bytes(28),
     b"\x04\x01\x00\x00" + bytes(28), b"\x04\x00\x00\x01" + bytes(28)],
)
def test_transport_header_rejects(bad: bytes) -> None:
    with pytest.raises(MessageError):
        unpack_transport_header(bad)


@pytest.mark.parametrize("cls,msg", [
    (Initiation, _initiation()), (Response, _response()), (CookieReply, _cookie_reply()),
])
def test_unpack_rejects_wrong_size_type_and_reserved(cls, msg) -> None:
    good = msg.pack()
    bad = [good[:-1], good + b"\0", b"", good[:4]]
    for t in (0, 1, 2, 3, 4, 5, 255):
        if t != good[0]:
            bad.append(bytes([t]) + good[1:])
    for i in (1, 2, 3):
        b = bytearray(good)
        b[i] = 1
        bad.append(bytes(b))
    for b in bad:
        with pytest.raises(MessageError):
            cls.unpack(b)
    assert issubclass(MessageError, ValueError)


# ------------------------------------------------------------------ message_type


def test_message_type_accepts_exact_sizes() -> None:
    for t, n in SIZES.items():
        assert message_type(bytes([t, 0, 0, 0]) + bytes(n - 4)) == t
        assert message_type(memoryview(bytes([t, 0, 0, 0]) + bytes(n - 4))) == t
    for n in (32, 33, 100, 1500, 65535):
        assert message_type(b"\x04\x00\x00\x00" + bytes(n - 4)) == MSG_TRANSPORT


def test_message_type_rejects_every_wrong_size() -> None:
    for t, n in SIZES.items():
        for size in range(0, 200):
            if size == n:
                continue
            data = (bytes([t, 0, 0, 0]) + bytes(size))[:size]
            assert message_type(data) == 0, (t, size)
    for size in range(0, 32):
        assert message_type((b"\x04\x00\x00\x00" + bytes(size))[:size]) == 0


def test_message_type_rejects_unknown_types_and_reserved_bytes() -> None:
    for t in [0, 5, 6, 0x10, 0x81, 0xFF]:
        for n in (32, 64, 92, 148):
            assert message_type(bytes([t, 0, 0, 0]) + bytes(n - 4)) == 0
    for t, n in [*SIZES.items(), (MSG_TRANSPORT, 32)]:
        for i in (1, 2, 3):
            for v in (1, 0x80, 0xFF):
                b = bytearray([t]) + bytes(n - 1)
                b[i] = v
                assert message_type(bytes(b)) == 0, (t, i, v)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_message_type_total(data: bytes) -> None:
    t = message_type(data)
    assert t in (0, 1, 2, 3, 4)
    if t:
        assert data[0] == t and data[1:4] == b"\0\0\0"
        assert len(data) == SIZES[t] if t != 4 else len(data) >= 32


# ------------------------------------------------------------------ padding


@pytest.mark.parametrize(
    "n,mtu,expected",
    [
        (0, 1420, 0),  # a keepalive stays empty
        (1, 1420, 16),
        (15, 1420, 16),
        (16, 1420, 16),
        (17, 1420, 32),
        (84, 1420, 96),
        (1404, 1420, 1408),
        (1405, 1420, 1408),
        (1409, 1420, 1420),  # 1424 would exceed the MTU: capped at it
        (1420, 1420, 1420),
        (1421, 1420, 1421),  # larger than the MTU: never padded below its own length
        (1500, 1420, 1500),
        (17, 0, 32),  # mtu 0: no cap
        (1, 8, 8),
        (9, 8, 9),
    ],
)
def test_padded_len_cases(n: int, mtu: int, expected: int) -> None:
    assert padded_len(n, mtu) == expected


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 9000), mtu=st.integers(0, 9000))
def test_padded_len_rules(n: int, mtu: int) -> None:
    p = padded_len(n, mtu)
    assert p >= n
    if mtu == 0 or n <= mtu:
        # A multiple of 16 unless the MTU cap cut it; never above the MTU.
        assert p % 16 == 0 or p == mtu
        assert p - n < 16
        if mtu:
            assert p <= mtu
            assert p == min(mtu, (n + 15) // 16 * 16)
    else:
        assert p == n


# ------------------------------------------------------------------ mac1 / mac2


def _keys(seed: int) -> tuple[bytes, bytes]:
    priv = crypto.clamp(random.Random(seed).randbytes(32))
    return priv, crypto.public_key(priv)


def _rng(seed: int):
    return random.Random(seed).randbytes


R_PRIV, R_PUB = _keys(1)  # the receiver of handshake messages (has the CookieChecker)
SRC = bytes([192, 0, 2, 1]) + (51820).to_bytes(2, "big")
SRC2 = bytes([192, 0, 2, 2]) + (51820).to_bytes(2, "big")


def _blank_initiation(sender: int = 7, fill: int = 0x55) -> bytes:
    return Initiation(
        sender, bytes([fill]) * 32, bytes([fill]) * 48, bytes([fill]) * 28, bytes(16), bytes(16)
    ).pack()


def _blank_response() -> bytes:
    return Response(9, 7, bytes([0x66]) * 32, bytes(16), bytes(16), bytes(16)).pack()


def test_mac1_definition_and_check() -> None:
    gen = CookieGenerator(R_PUB)
    checker = CookieChecker(R_PUB, _rng(2))
    for raw in (_blank_initiation(), _blank_response()):
        msg = gen.add_macs(raw, 0.0)
        assert len(msg) == len(raw)
        assert msg[:-32] == raw[:-32]
        # mac1 = MAC(HASH(LABEL_MAC1 || Spub_receiver), msg up to mac1)
        assert msg[-32:-16] == crypto.mac(crypto.hash_(b"mac1----" + R_PUB), raw[:-32])
        assert msg[-16:] == bytes(16)  # no cookie: mac2 is zero
        assert gen.last_mac1 == msg[-32:-16]
        assert checker.check_mac1(msg)
        assert not CookieChecker(_keys(3)[1]).check_mac1(msg)  # other receiver
        for i in (0, 5, len(raw) - 33, len(raw) - 32, len(raw) - 17):
            b = bytearray(msg)
            b[i] ^= 1
            assert not checker.check_mac1(bytes(b)), i
        # mac2 is not covered by mac1.
        assert checker.check_mac1(msg[:-16] + bytes([9]) * 16)
        assert not checker.check_mac2(msg, SRC, 0.0)


def _cookie_round_trip(now: float = 0.0):
    gen = CookieGenerator(R_PUB)
    checker = CookieChecker(R_PUB, _rng(4))
    msg = gen.add_macs(_blank_initiation(), now)
    reply = checker.create_reply(msg, 7, SRC, now)
    return gen, checker, msg, reply


def test_cookie_reply_round_trip() -> None:
    gen, checker, msg, reply = _cookie_round_trip(10.0)
    assert len(reply) == COOKIE_REPLY_LEN
    assert message_type(reply) == MSG_COOKIE_REPLY
    parsed = CookieReply.unpack(reply)
    assert parsed.receiver == 7
    assert gen.consume_reply(parsed, 10.5)
    # The cookie is MAC(secret, source ip || port).
    assert gen.cookie == crypto.mac(checker._secret, SRC)
    assert gen.cookie_time == 10.5
    msg2 = gen.add_macs(_blank_initiation(fill=0x77), 11.0)
    assert msg2[-16:] == crypto.mac(gen.cookie, msg2[:-16])
    assert checker.check_mac1(msg2)
    assert checker.check_mac2(msg2, SRC, 11.0)
    assert not checker.check_mac2(msg2, SRC2, 11.0)  # the cookie is bound to the source
    assert not checker.check_mac2(msg2[:-1] + bytes([msg2[-1] ^ 1]), SRC, 11.0)
    # mac2 also covers mac1.
    b = bytearray(msg2)
    b[-20] ^= 1
    assert not checker.check_mac2(bytes(b), SRC, 11.0)
    # Response messages carry the same macs.
    resp = gen.add_macs(_blank_response(), 11.0)
    assert checker.check_mac1(resp) and checker.check_mac2(resp, SRC, 11.0)


def test_cookie_reply_decrypts_with_receiver_public_key_only() -> None:
    _, _, _, reply = _cookie_round_trip()
    other = CookieGenerator(_keys(5)[1])
    other.add_macs(_blank_initiation(), 0.0)
    assert not other.consume_reply(CookieReply.unpack(reply), 0.0)
    assert other.cookie is None


def test_cookie_reply_for_wrong_mac1_rejected() -> None:
    gen, checker, _, _ = _cookie_round_trip()
    # A reply made for a different message (different mac1) does not open.
    other_msg = CookieGenerator(R_PUB).add_macs(_blank_initiation(fill=0x99), 0.0)
    reply = checker.create_reply(other_msg, 7, SRC, 0.0)
    assert not gen.consume_reply(CookieReply.unpack(reply), 0.0)
    assert gen.cookie is None
    # A tampered reply does not open either.
    gen2, _, _, good = _cookie_round_trip()
    for i in (8, 31, 32, 63):
        b = bytearray(good)
        b[i] ^= 1
        assert not gen2.consume_reply(CookieReply.unpack(bytes(b)), 0.0)
    assert gen2.consume_reply(CookieReply.unpack(good), 0.0)


def test_cookie_reply_without_sent_message_rejected() -> None:
    _, _, _, reply = _cookie_round_trip()
    fresh = CookieGenerator(R_PUB)
    assert not fresh.consume_reply(CookieReply.unpack(reply), 0.0)


def test_cookie_reply_accepted_once_per_message() -> None:
    # Kernel cookie.c: have_sent_mac1 is cleared after a reply is consumed, so a
    # replayed reply cannot refresh the cookie's birthdate.
    gen, _, _, reply = _cookie_round_trip()
    assert gen.consume_reply(CookieReply.unpack(reply), 1.0)
    assert not gen.consume_reply(CookieReply.unpack(reply), 100.0)
    assert gen.cookie_time == 1.0


def test_cookie_expiry_on_the_sending_side() -> None:
    gen, checker, _, reply = _cookie_round_trip(0.0)
    assert gen.consume_reply(CookieReply.unpack(reply), 0.0)
    latest = COOKIE_REFRESH_TIME - COOKIE_SECRET_LATENCY
    assert (COOKIE_REFRESH_TIME, COOKIE_SECRET_LATENCY) == (120.0, 5.0)
    assert gen.add_macs(_blank_initiation(), latest - 0.01)[-16:] != bytes(16)
    # The kernel stops using a cookie COOKIE_SECRET_LATENCY before the secret expires.
    assert gen.add_macs(_blank_initiation(), latest)[-16:] == bytes(16)
    assert gen.add_macs(_blank_initiation(), COOKIE_REFRESH_TIME)[-16:] == bytes(16)
    assert gen.add_macs(_blank_initiation(), 1000.0)[-16:] == bytes(16)


def test_cookie_expiry_and_secret_rotation_on_the_checking_side() -> None:
    gen, checker, _, reply = _cookie_round_trip(0.0)
    first_secret = checker._secret
    assert gen.consume_reply(CookieReply.unpack(reply), 0.0)
    msg = gen.add_macs(_blank_initiation(), 100.0)
    assert checker.check_mac2(msg, SRC, 100.0)
    assert checker.check_mac2(msg, SRC, COOKIE_REFRESH_TIME - 0.001)
    # After 120 s the secret is stale: no mac2 validates until a new one is made.
    assert not checker.check_mac2(msg, SRC, COOKIE_REFRESH_TIME)
    new_reply = checker.create_reply(msg, 7, SRC, COOKIE_REFRESH_TIME)
    assert checker._secret != first_secret
    assert checker._secret_time == COOKIE_REFRESH_TIME
    assert not checker.check_mac2(msg, SRC, COOKIE_REFRESH_TIME + 1)  # old cookie
    assert gen.consume_reply(CookieReply.unpack(new_reply), COOKIE_REFRESH_TIME + 1)
    msg2 = gen.add_macs(_blank_initiation(), COOKIE_REFRESH_TIME + 2)
    assert checker.check_mac2(msg2, SRC, COOKIE_REFRESH_TIME + 2)


def test_secret_is_stable_within_its_lifetime() -> None:
    checker = CookieChecker(R_PUB, _rng(6))
    msg = CookieGenerator(R_PUB).add_macs(_blank_initiation(), 0.0)
    r1 = CookieReply.unpack(checker.create_reply(msg, 1, SRC, 0.0))
    s1 = checker._secret
    r2 = CookieReply.unpack(checker.create_reply(msg, 1, SRC, 119.0))
    assert checker._secret == s1
    assert r1.nonce != r2.nonce  # a fresh random nonce per reply
    key = crypto.hash_(b"cookie--" + R_PUB)
    mac1 = msg[-32:-16]
    c1 = crypto.xaead_decrypt(key, r1.nonce, r1.encrypted_cookie, mac1)
    c2 = crypto.xaead_decrypt(key, r2.nonce, r2.encrypted_cookie, mac1)
    assert c1 == c2 == crypto.mac(s1, SRC)
    r3 = CookieReply.unpack(checker.create_reply(msg, 1, SRC2, 1.0))
    assert crypto.xaead_decrypt(key, r3.nonce, r3.encrypted_cookie, mac1) != c1


def test_ipv6_source_identity() -> None:
    gen = CookieGenerator(R_PUB)
    checker = CookieChecker(R_PUB, _rng(8))
    src6 = bytes(range(16)) + (443).to_bytes(2, "big")
    msg = gen.add_macs(_blank_initiation(), 0.0)
    assert gen.consume_reply(CookieReply.unpack(checker.create_reply(msg, 7, src6, 0.0)), 0.0)
    msg2 = gen.add_macs(_blank_initiation(), 1.0)
    assert checker.check_mac2(msg2, src6, 1.0)
    other_port = bytes(range(16)) + (444).to_bytes(2, "big")
    assert not checker.check_mac2(msg2, other_port, 1.0)
