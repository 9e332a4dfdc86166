"""Unit tests for wgx.protocol.crypto: the primitives of whitepaper section 5.4.

Known-answer vectors for the composite constructions (Noise, KDF, HChaCha20,
XChaCha20-Poly1305) live in test_noise_vectors.py; this file checks each
primitive's definition, sizes, layouts and failure modes.
"""

from __future__ import annotations

import hashlib
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st

from wgx.protocol import crypto as c

# RFC 7748 section 6.1 (X25519 Diffie-Hellman example).
ALICE_PRIV = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_PUB = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
BOB_PRIV = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
BOB_PUB = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
SHARED = bytes.fromhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")

# Curve25519 points of small order, as listed by libsodium's has_small_order()
# (jedisct1/libsodium, src/libsodium/crypto_scalarmult/curve25519/ref10/x25519_ref10.c):
# 0, 1, the two order-8 points, p-1, p and p+1.
LOW_ORDER = [
    bytes(32),
    bytes([1]) + bytes(31),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    bytes([0xEC]) + bytes([0xFF]) * 30 + bytes([0x7F]),
    bytes([0xED]) + bytes([0xFF]) * 30 + bytes([0x7F]),
    bytes([0xEE]) + bytes([0xFF]) * 30 + bytes([0x7F]),
]


def test_constants() -> None:
    assert c.CONSTRUCTION == b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
    assert c.IDENTIFIER == b"WireGuard v1 zx2c4 Jason@zx2c4.com"
    assert c.LABEL_MAC1 == b"mac1----"
    assert c.LABEL_COOKIE == b"cookie--"
    assert (c.KEY_LEN, c.TAG_LEN, c.HASH_LEN, c.TAI64N_LEN) == (32, 16, 32, 12)


def test_hash_is_blake2s_256_rfc7693() -> None:
    # RFC 7693 Appendix B: BLAKE2s-256("abc").
    expected = "508c5e8c327c14e2e1a72ba34eeb452f37458b209ed63a294d999b4c86675982"
    assert c.hash_(b"abc").hex() == expected
    assert len(c.hash_(b"")) == 32


def test_mac_is_keyed_blake2s_128() -> None:
    key = bytes(range(32))
    m = c.mac(key, b"message")
    assert len(m) == 16
    assert m == hashlib.blake2s(b"message", digest_size=16, key=key).digest()
    assert c.mac(bytes(32), b"message") != m
    # A 16-byte key (a cookie used as mac2 key) is allowed.
    assert len(c.mac(bytes(16), b"x")) == 16


def _rfc2104_hmac_blake2s(key: bytes, data: bytes) -> bytes:
    block = 64
    if len(key) > block:
        key = hashlib.blake2s(key).digest()
    key = key.ljust(block, b"\0")
    inner = hashlib.blake2s(bytes(k ^ 0x36 for k in key) + data).digest()
    return hashlib.blake2s(bytes(k ^ 0x5C for k in key) + inner).digest()


@settings(max_examples=50, deadline=None)
@given(key=st.binary(max_size=80), data=st.binary(max_size=200))
def test_hmac_is_rfc2104_over_blake2s(key: bytes, data: bytes) -> None:
    assert c.hmac(key, data) == _rfc2104_hmac_blake2s(key, data)


@settings(max_examples=50, deadline=None)
@given(key=st.binary(min_size=32, max_size=32), data=st.binary(max_size=100))
def test_kdf_outputs_are_prefixes(key: bytes, data: bytes) -> None:
    t1 = c.kdf1(key, data)
    t2 = c.kdf2(key, data)
    t3 = c.kdf3(key, data)
    assert t1 == t2[0] == t3[0]
    assert t2 == t3[:2]
    assert len(set(t3)) == 3
    # The whitepaper's definition: tau0 = HMAC(key, input), tau_i = HMAC(tau0, tau_{i-1} || i).
    tau0 = c.hmac(key, data)
    tau1 = c.hmac(tau0, b"\x01")
    tau2 = c.hmac(tau0, tau1 + b"\x02")
    tau3 = c.hmac(tau0, tau2 + b"\x03")
    assert t3 == (tau1, tau2, tau3)


def test_nonce_layout() -> None:
    assert c.nonce_for(0) == bytes(12)
    assert c.nonce_for(1) == bytes(4) + b"\x01" + bytes(7)
    assert c.nonce_for(0x0102030405060708) == bytes(4) + bytes.fromhex("0807060504030201")
    assert c.nonce_for(2**64 - 1) == bytes(4) + b"\xff" * 8


def test_aead_round_trip_and_layout() -> None:
    key = bytes(range(32))
    ct = c.aead_encrypt(key, 7, b"hello", b"ad")
    assert len(ct) == 5 + 16
    # Same as ChaCha20-Poly1305 with the 32-bit-zero || LE64 nonce.
    assert ct == ChaCha20Poly1305(key).encrypt(bytes(4) + struct.pack("<Q", 7), b"hello", b"ad")
    assert c.aead_decrypt(key, 7, ct, b"ad") == b"hello"
    assert c.aead_encrypt(key, 0, b"", b"") == ChaCha20Poly1305(key).encrypt(bytes(12), b"", b"")
    assert len(c.aead_encrypt(key, 0, b"", b"")) == 16


@pytest.mark.parametrize("what", ["key", "counter", "ad", "ct", "tag", "short"])
def test_aead_failures_raise_crypto_error(what: str) -> None:
    key = bytes(range(32))
    ct = c.aead_encrypt(key, 7, b"hello world", b"ad")
    args = {"key": key, "counter": 7, "ct": ct, "ad": b"ad"}
    if what == "key":
        args["key"] = bytes(32)
    elif what == "counter":
        args["counter"] = 8
    elif what == "ad":
        args["ad"] = b"aD"
    elif what == "ct":
        args["ct"] = bytes([ct[0] ^ 1]) + ct[1:]
    elif what == "tag":
        args["ct"] = ct[:-1] + bytes([ct[-1] ^ 0x80])
    else:
        args["ct"] = ct[:10]
    with pytest.raises(c.CryptoError):
        c.aead_decrypt(args["key"], args["counter"], args["ct"], args["ad"])


def test_xaead_round_trip_and_failures() -> None:
    key = bytes(range(32))
    nonce = bytes(range(100, 124))
    ct = c.xaead_encrypt(key, nonce, b"cookie-16-bytes!", b"mac1")
    assert len(ct) == 32
    assert c.xaead_decrypt(key, nonce, ct, b"mac1") == b"cookie-16-bytes!"
    with pytest.raises(c.CryptoError):
        c.xaead_decrypt(key, nonce, ct, b"mac2")
    with pytest.raises(c.CryptoError):
        c.xaead_decrypt(key, bytes(24), ct, b"mac1")
    with pytest.raises(c.CryptoError):
        c.xaead_decrypt(bytes(32), nonce, ct, b"mac1")
    # Both halves of the 24-byte nonce matter (the first 16 go into HChaCha20).
    for i in (0, 15, 16, 23):
        bad = bytearray(nonce)
        bad[i] ^= 1
        with pytest.raises(c.CryptoError):
            c.xaead_decrypt(key, bytes(bad), ct, b"mac1")


# A straightforward HChaCha20 (draft-irtf-cfrg-xchacha-03 section 2.2) to compare
# against crypto.hchacha20, which derives the same words from a ChaCha20 block.
def _rotl(v: int, n: int) -> int:
    return ((v << n) & 0xFFFFFFFF) | (v >> (32 - n))


def _ref_hchacha20(key: bytes, nonce16: bytes) -> bytes:
    s = list(struct.unpack("<4I", b"expand 32-byte k"))
    s += list(struct.unpack("<8I", key)) + list(struct.unpack("<4I", nonce16))

    def qr(a: int, b: int, cc: int, d: int) -> None:
        s[a] = (s[a] + s[b]) & 0xFFFFFFFF
        s[d] = _rotl(s[d] ^ s[a], 16)
        s[cc] = (s[cc] + s[d]) & 0xFFFFFFFF
        s[b] = _rotl(s[b] ^ s[cc], 12)
        s[a] = (s[a] + s[b]) & 0xFFFFFFFF
        s[d] = _rotl(s[d] ^ s[a], 8)
        s[cc] = (s[cc] + s[d]) & 0xFFFFFFFF
        s[b] = _rotl(s[b] ^ s[cc], 7)

    for _ in range(10):
        qr(0, 4, 8, 12)
        qr(1, 5, 9, 13)
        qr(2, 6, 10, 14)
        qr(3, 7, 11, 15)
        qr(0, 5, 10, 15)
        qr(1, 6, 11, 12)
        qr(2, 7, 8, 13)
        qr(3, 4, 9, 14)
    return struct.pack("<8I", *(s[0:4] + s[12:16]))


@settings(max_examples=60, deadline=None)
@given(key=st.binary(min_size=32, max_size=32), nonce=st.binary(min_size=16, max_size=16))
def test_hchacha20_matches_reference_rounds(key: bytes, nonce: bytes) -> None:
    assert c.hchacha20(key, nonce) == _ref_hchacha20(key, nonce)


def test_hchacha20_counter_word_wraparound() -> None:
    # Nonce word 0 is ChaCha20's block counter; values near 2^32 must not carry.
    key = bytes(range(32))
    for n in (b"\xff\xff\xff\xff" + bytes(12), b"\xff" * 16):
        assert c.hchacha20(key, n) == _ref_hchacha20(key, n)


def test_x25519_rfc7748_section_6_1() -> None:
    assert c.public_key(ALICE_PRIV) == ALICE_PUB
    assert c.public_key(BOB_PRIV) == BOB_PUB
    assert c.dh(ALICE_PRIV, BOB_PUB) == SHARED
    assert c.dh(BOB_PRIV, ALICE_PUB) == SHARED


def test_x25519_rfc7748_section_5_2() -> None:
    scalar = bytes.fromhex("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4")
    u = bytes.fromhex("e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c")
    out = bytes.fromhex("c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552")
    assert c.dh(scalar, u) == out


@pytest.mark.parametrize("point", LOW_ORDER, ids=[f"low{i}" for i in range(len(LOW_ORDER))])
def test_dh_refuses_low_order_points(point: bytes) -> None:
    with pytest.raises(c.CryptoError):
        c.dh(ALICE_PRIV, point)
    # X25519 ignores the top bit, so the same points with bit 255 set are low order too.
    with pytest.raises(c.CryptoError):
        c.dh(BOB_PRIV, point[:31] + bytes([point[31] | 0x80]))


def test_generate_private_key_is_clamped_and_random() -> None:
    keys = {c.generate_private_key() for _ in range(8)}
    assert len(keys) == 8
    for k in keys:
        assert len(k) == 32
        assert k[0] & 7 == 0
        assert k[31] & 0x80 == 0
        assert k[31] & 0x40 == 0x40
        assert c.clamp(k) == k


def test_clamp() -> None:
    assert c.clamp(b"\xff" * 32) == b"\xf8" + b"\xff" * 30 + b"\x7f"
    assert c.clamp(bytes(32)) == bytes(31) + b"\x40"
    # Clamping does not change the public key (X25519 clamps internally).
    raw = bytes(range(1, 33))
    assert c.public_key(raw) == c.public_key(c.clamp(raw))


def test_tai64n() -> None:
    # TAI64 label of the Unix epoch is 2^62 + 10 (as wireguard-go's tai64n package).
    assert c.tai64n(0) == bytes.fromhex("400000000000000a00000000")
    t = 1_700_000_000 * 10**9 + 123_456_789
    stamp = c.tai64n(t)
    assert len(stamp) == 12
    secs, nanos = struct.unpack(">QI", stamp)
    assert secs == 0x400000000000000A + 1_700_000_000
    assert nanos == 123_456_789


@settings(max_examples=100, deadline=None)
@given(a=st.integers(0, 2**40 * 10**9), b=st.integers(0, 2**40 * 10**9))
def test_tai64n_orders_like_time(a: int, b: int) -> None:
    # The responder compares timestamps as byte strings (memcmp in the kernel).
    assert (c.tai64n(a) < c.tai64n(b)) == (a < b)
    assert (c.tai64n(a) == c.tai64n(b)) == (a == b)


def test_constant_time_eq() -> None:
    assert c.constant_time_eq(b"abc", b"abc")
    assert not c.constant_time_eq(b"abc", b"abd")
    assert not c.constant_time_eq(b"abc", b"ab")
