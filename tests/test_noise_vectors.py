"""Known-answer tests for the handshake and its building blocks, from published vectors.

Sources (each vector below names its own):
- cacophony's Noise test vectors: repo haskell-cryptography/cacophony, path
  vectors/cacophony.txt (commit 36c1e5c3a799342b226547ce9fdb3579ab60ccd3), the entry
  "Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s", copied to
  tests/vectors/cacophony_IKpsk2_25519_ChaChaPoly_BLAKE2s.json.
- wireguard-go's KDF vectors: repo WireGuard/wireguard-go, path device/kdf_test.go
  (TestKDF).
- HChaCha20 and AEAD_XChaCha20_Poly1305: draft-irtf-cfrg-xchacha-03 sections 2.2.1 and
  A.3.1, text from repo bikeshedders/xchacha-rfc, path draft-irtf-cfrg-xchacha-rfc-03.txt.
- WireGuard's initial chaining key and hash: repo conradludgate/rustyguard, path
  rustyguard-crypto/src/prim.rs (CONSTRUCTION_HASH, IDENTIFIER_HASH).
No public fixed-byte WireGuard handshake transcript was found, so the WireGuard-framed
handshake at the end is checked for structure, MACs and round trips instead.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from wgx.protocol import crypto, noise
from wgx.protocol.cookie import CookieChecker, CookieGenerator
from wgx.protocol.crypto import CryptoError
from wgx.protocol.messages import (
    INITIATION_LEN,
    MSG_INITIATION,
    MSG_RESPONSE,
    RESPONSE_LEN,
    Initiation,
    Response,
    message_type,
)

VECTORS = Path(__file__).parent / "vectors"
h = bytes.fromhex


# --------------------------------------------------------------------- cacophony


@pytest.fixture(scope="module")
def cacophony() -> dict:
    # haskell-cryptography/cacophony vectors/cacophony.txt, "Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
    with open(VECTORS / "cacophony_IKpsk2_25519_ChaChaPoly_BLAKE2s.json") as f:
        v = json.load(f)
    assert v["name"] == "Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
    assert v["name"].encode() == crypto.CONSTRUCTION
    return v


def _handshake(v: dict) -> tuple[tuple[bytes, bytes], tuple[bytes, bytes]]:
    """Run both handshake messages through noise.py and compare with the vector.

    Returns (initiator (send, recv), responder (send, recv)).
    """
    msgs = v["messages"]
    # Message 1: -> e, es, s, ss, {payload}
    e_pub, enc_static, enc_payload, i_state = noise.create_initiation(
        h(v["init_static"]), h(v["init_remote_static"]), h(v["init_ephemeral"]),
        h(msgs[0]["payload"]), h(v["init_prologue"]),
    )
    assert (e_pub + enc_static + enc_payload).hex() == msgs[0]["ciphertext"]
    assert len(enc_static) == 48
    ct = h(msgs[0]["ciphertext"])
    payload, r_state = noise.consume_initiation(
        h(v["resp_static"]), ct[:32], ct[32:80], ct[80:], h(v["resp_prologue"])
    )
    assert payload.hex() == msgs[0]["payload"]
    assert r_state.remote_static == crypto.public_key(h(v["init_static"]))
    assert (r_state.ck, r_state.h) == (i_state.ck, i_state.h)

    # Message 2: <- e, ee, se, psk, {payload}
    e2, enc2, r_keys = noise.create_response(
        r_state, h(v["resp_ephemeral"]), h(v["resp_psk"]), h(msgs[1]["payload"])
    )
    assert (e2 + enc2).hex() == msgs[1]["ciphertext"]
    ct2 = h(msgs[1]["ciphertext"])
    payload2, i_keys = noise.consume_response(
        i_state, h(v["init_static"]), ct2[:32], ct2[32:], h(v["init_psk"])
    )
    assert payload2.hex() == msgs[1]["payload"]
    return i_keys, r_keys


def test_cacophony_ikpsk2_handshake_messages(cacophony: dict) -> None:
    _handshake(cacophony)


def test_cacophony_ikpsk2_key_directions(cacophony: dict) -> None:
    (i_send, i_recv), (r_send, r_recv) = _handshake(cacophony)
    # Noise Split() gives (k1: initiator->responder, k2: responder->initiator);
    # noise.py returns (send, recv) from each side's point of view.
    assert i_send == r_recv
    assert i_recv == r_send
    assert i_send != i_recv


def test_cacophony_ikpsk2_transport_messages(cacophony: dict) -> None:
    (i_send, i_recv), (r_send, r_recv) = _handshake(cacophony)
    counters = {"i": 0, "r": 0}
    for n, m in enumerate(cacophony["messages"][2:]):
        from_initiator = n % 2 == 0  # transport messages alternate, initiator first
        who = "i" if from_initiator else "r"
        key = i_send if from_initiator else r_send
        peer_key = r_recv if from_initiator else i_recv
        ct = crypto.aead_encrypt(key, counters[who], h(m["payload"]), b"")
        assert ct.hex() == m["ciphertext"], f"transport message {n + 2}"
        assert crypto.aead_decrypt(peer_key, counters[who], ct, b"") == h(m["payload"])
        counters[who] += 1
    assert counters == {"i": 2, "r": 2}


def test_cacophony_ikpsk2_mismatches_fail(cacophony: dict) -> None:
    v = cacophony
    msgs = v["messages"]
    ct = h(msgs[0]["ciphertext"])
    # Wrong prologue: the responder's hash differs, so the static key does not open.
    with pytest.raises(CryptoError):
        noise.consume_initiation(h(v["resp_static"]), ct[:32], ct[32:80], ct[80:], b"other")
    # Wrong responder static key.
    with pytest.raises(CryptoError):
        noise.consume_initiation(
            h(v["init_static"]), ct[:32], ct[32:80], ct[80:], h(v["resp_prologue"])
        )
    # Wrong psk: only the second message depends on it.
    *_, i_state = noise.create_initiation(
        h(v["init_static"]), h(v["init_remote_static"]), h(v["init_ephemeral"]),
        h(msgs[0]["payload"]), h(v["init_prologue"]),
    )
    ct2 = h(msgs[1]["ciphertext"])
    with pytest.raises(CryptoError):
        noise.consume_response(i_state, h(v["init_static"]), ct2[:32], ct2[32:], bytes(32))


# ------------------------------------------------------------------ wireguard-go KDF

# WireGuard/wireguard-go device/kdf_test.go, TestKDF: key, input, t0, t1, t2.
KDF_VECTORS = [
    (
        "746573742d6b6579",
        "746573742d696e707574",
        "6f0e5ad38daba1bea8a0d213688736f19763239305e0f58aba697f9ffc41c633",
        "df1194df20802a4fe594cde27e92991c8cae66c366e8106aaa937a55fa371e8a",
        "fac6e2745a325f5dc5d11a5b165aad08b0ada28e7b4e666b7c077934a4d76c24",
    ),
    (
        "776972656775617264",
        "776972656775617264",
        "491d43bbfdaa8750aaf535e334ecbfe5129967cd64635101c566d4caefda96e8",
        "1e71a379baefd8a79aa4662212fcafe19a23e2b609a3db7d6bcba8f560e3d25f",
        "31e1ae48bddfbe5de38f295e5452b1909a1b4e38e183926af3780b0c1e1f0160",
    ),
    (
        "",
        "",
        "8387b46bf43eccfcf349552a095d8315c4055beb90208fb1be23b894bc2ed5d0",
        "58a0e5f6faefccf4807bff1f05fa8a9217945762040bcec2f4b4a62bdfe0e86e",
        "0ce6ea98ec548f8e281e93e32db65621c45eb18dc6f0a7ad94178610a2f7338e",
    ),
]


@pytest.mark.parametrize("key,data,t0,t1,t2", KDF_VECTORS)
def test_wireguard_go_kdf_vectors(key: str, data: str, t0: str, t1: str, t2: str) -> None:
    k, d = h(key), h(data)
    assert crypto.kdf1(k, d).hex() == t0
    assert [x.hex() for x in crypto.kdf2(k, d)] == [t0, t1]
    assert [x.hex() for x in crypto.kdf3(k, d)] == [t0, t1, t2]


# ------------------------------------------------------------- XChaCha (draft-03)


def test_hchacha20_draft_section_2_2_1() -> None:
    # draft-irtf-cfrg-xchacha-03 section 2.2.1 (bikeshedders/xchacha-rfc,
    # draft-irtf-cfrg-xchacha-rfc-03.txt).
    key = bytes(range(32))
    nonce = h("000000090000004a0000000031415927")
    subkey = h("82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc")
    assert crypto.hchacha20(key, nonce) == subkey


# draft-irtf-cfrg-xchacha-03 Appendix A.3.1 (the hex form of the A.1 example).
XAEAD_PLAINTEXT = (
    b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the "
    b"future, sunscreen would be it."
)
XAEAD_AAD = h("50515253c0c1c2c3c4c5c6c7")
XAEAD_KEY = h("808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f")
XAEAD_IV = h("404142434445464748494a4b4c4d4e4f5051525354555657")
XAEAD_CIPHERTEXT = h(
    "bd6d179d3e83d43b9576579493c0e939572a1700252bfaccbed2902c21396cbb"
    "731c7f1b0b4aa6440bf3a82f4eda7e39ae64c6708c54c216cb96b72e1213b452"
    "2f8c9ba40db5d945b11b69b982c1bb9e3f3fac2bc369488f76b2383565d3fff9"
    "21f9664c97637da9768812f615c68b13b52e"
)
XAEAD_TAG = h("c0875924c1c7987947deafd8780acf49")


def test_xchacha20_poly1305_draft_appendix_a_3_1() -> None:
    assert XAEAD_PLAINTEXT.hex().startswith("4c616469657320616e642047656e746c")
    assert len(XAEAD_PLAINTEXT) == len(XAEAD_CIPHERTEXT) == 114
    out = crypto.xaead_encrypt(XAEAD_KEY, XAEAD_IV, XAEAD_PLAINTEXT, XAEAD_AAD)
    assert out == XAEAD_CIPHERTEXT + XAEAD_TAG
    assert crypto.xaead_decrypt(XAEAD_KEY, XAEAD_IV, out, XAEAD_AAD) == XAEAD_PLAINTEXT
    with pytest.raises(CryptoError):
        crypto.xaead_decrypt(XAEAD_KEY, XAEAD_IV, out[:-1] + b"\0", XAEAD_AAD)


# ------------------------------------------------------------ WireGuard constants


def test_initial_chaining_key_and_hash() -> None:
    # conradludgate/rustyguard rustyguard-crypto/src/prim.rs: Ci = Hash(Construction),
    # Hi = Hash(Ci || Identifier).
    construction_hash = bytes([
        96, 226, 109, 174, 243, 39, 239, 192, 46, 195, 53, 226, 160, 37, 210, 208, 22, 235,
        66, 6, 248, 114, 119, 245, 45, 56, 209, 152, 139, 120, 205, 54,
    ])
    identifier_hash = bytes([
        34, 17, 179, 97, 8, 26, 197, 102, 105, 18, 67, 219, 69, 138, 213, 50, 45, 156, 108,
        102, 34, 147, 232, 183, 14, 225, 156, 101, 186, 7, 158, 243,
    ])
    assert noise.initial_chain() == construction_hash
    assert crypto.hash_(construction_hash + crypto.IDENTIFIER) == identifier_hash
    # A name of 32 bytes or less is padded, not hashed (Noise InitializeSymmetric).
    assert noise.initial_chain(b"short") == b"short".ljust(32, b"\0")


# ------------------------------------------------- a WireGuard-framed handshake

# Fixed keys (RFC 7748 section 6.1 scalars as statics, arbitrary clamped ephemerals).
I_STATIC = h("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
R_STATIC = h("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
I_EPH = crypto.clamp(bytes(range(1, 33)))
R_EPH = crypto.clamp(bytes(range(33, 65)))
PSK = bytes(range(200, 232))
STAMP = crypto.tai64n(1_700_000_000 * 10**9)


def _wireguard_initiation(now: float = 0.0) -> tuple[bytes, noise.HandshakeState]:
    e, s, ts, state = noise.create_initiation(
        I_STATIC, crypto.public_key(R_STATIC), I_EPH, STAMP
    )
    body = Initiation(0x11223344, e, s, ts, bytes(16), bytes(16)).pack()
    return CookieGenerator(crypto.public_key(R_STATIC)).add_macs(body, now), state


def test_wireguard_initiation_and_response() -> None:
    i_pub, r_pub = crypto.public_key(I_STATIC), crypto.public_key(R_STATIC)
    msg1, i_state = _wireguard_initiation()
    assert len(msg1) == INITIATION_LEN == 148
    assert message_type(msg1) == MSG_INITIATION
    assert msg1[:8] == struct.pack("<II", 1, 0x11223344)
    assert msg1[-16:] == bytes(16)  # no cookie yet: mac2 is zero

    checker_r = CookieChecker(r_pub, random=lambda n: bytes(n))
    assert checker_r.check_mac1(msg1)
    assert not CookieChecker(i_pub).check_mac1(msg1)  # mac1 is keyed by the receiver

    init = Initiation.unpack(msg1)
    stamp, r_state = noise.consume_initiation(
        R_STATIC, init.ephemeral, init.encrypted_static, init.encrypted_timestamp
    )
    assert stamp == STAMP
    assert r_state.remote_static == i_pub
    assert init.ephemeral == crypto.public_key(I_EPH)

    e2, empty, (r_send, r_recv) = noise.create_response(r_state, R_EPH, PSK)
    assert len(empty) == 16
    body2 = Response(0x55667788, init.sender, e2, empty, bytes(16), bytes(16)).pack()
    msg2 = CookieGenerator(i_pub).add_macs(body2, 0.0)
    assert len(msg2) == RESPONSE_LEN == 92
    assert message_type(msg2) == MSG_RESPONSE
    assert msg2[:12] == struct.pack("<III", 2, 0x55667788, 0x11223344)
    assert CookieChecker(i_pub).check_mac1(msg2)

    resp = Response.unpack(msg2)
    payload, (i_send, i_recv) = noise.consume_response(
        i_state, I_STATIC, resp.ephemeral, resp.encrypted_nothing, PSK
    )
    assert payload == b""
    assert (i_send, i_recv) == (r_recv, r_send)
    # The transport keys work: first packet of each direction uses counter 0.
    ct = crypto.aead_encrypt(i_send, 0, b"ping", b"")
    assert crypto.aead_decrypt(r_recv, 0, ct, b"") == b"ping"


def test_wireguard_handshake_is_deterministic_for_fixed_inputs() -> None:
    a, _ = _wireguard_initiation()
    b, _ = _wireguard_initiation()
    assert a == b
    other = noise.create_initiation(I_STATIC, crypto.public_key(R_STATIC), R_EPH, STAMP)
    assert other[0] != a[8:40]


def test_wireguard_response_with_wrong_psk_fails() -> None:
    msg1, i_state = _wireguard_initiation()
    init = Initiation.unpack(msg1)
    _, r_state = noise.consume_initiation(
        R_STATIC, init.ephemeral, init.encrypted_static, init.encrypted_timestamp
    )
    e2, empty, _ = noise.create_response(r_state, R_EPH, PSK)
    with pytest.raises(CryptoError):
        noise.consume_response(i_state, I_STATIC, e2, empty, bytes(32))
    # And the all-zero psk (no psk configured) is just another key.
    e3, empty3, keys3 = noise.create_response(r_state, R_EPH, bytes(32))
    assert noise.consume_response(i_state, I_STATIC, e3, empty3, bytes(32))[1] == (
        keys3[1], keys3[0]
    )


@pytest.mark.parametrize("field", ["ephemeral", "static", "timestamp"])
def test_wireguard_initiation_tampering_fails(field: str) -> None:
    msg1, _ = _wireguard_initiation()
    init = Initiation.unpack(msg1)
    eph, st, ts = init.ephemeral, init.encrypted_static, init.encrypted_timestamp
    if field == "ephemeral":
        eph = bytes([eph[0] ^ 1]) + eph[1:]
    elif field == "static":
        st = st[:-1] + bytes([st[-1] ^ 1])
    else:
        ts = bytes([ts[0] ^ 1]) + ts[1:]
    with pytest.raises(CryptoError):
        noise.consume_initiation(R_STATIC, eph, st, ts)
