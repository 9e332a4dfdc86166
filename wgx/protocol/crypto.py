"""WireGuard's cryptographic primitives (whitepaper section 5.4).

HASH/MAC/HMAC/KDF use BLAKE2s from hashlib; AEAD is ChaCha20-Poly1305 and DH
is X25519 from `cryptography`. XAEAD (XChaCha20-Poly1305, used only by cookie
replies) is built from HChaCha20 + ChaCha20-Poly1305, because `cryptography`
has no XChaCha20 construction. HChaCha20 is derived from one raw ChaCha20
keystream block: the block is rounds(state) + state, so subtracting the known
input words recovers the HChaCha20 output words (0..3 and 12..15).
"""

from __future__ import annotations

import hashlib
import hmac as _hmac
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

KEY_LEN = 32
TAG_LEN = 16
HASH_LEN = 32
TAI64N_LEN = 12
TAI64_BASE = 0x400000000000000A  # 2^62 + 10 (TAI-UTC offset at the epoch, as wireguard-go)

CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"

ZERO_KEY = bytes(32)


class CryptoError(Exception):
    """Authentication failed or a DH result was invalid."""


def hash_(data: bytes) -> bytes:
    """HASH(input): BLAKE2s-256."""
    return hashlib.blake2s(data).digest()


def mac(key: bytes, data: bytes) -> bytes:
    """MAC(key, input): keyed BLAKE2s with a 16-byte digest."""
    return hashlib.blake2s(data, digest_size=16, key=key).digest()


def hmac(key: bytes, data: bytes) -> bytes:
    """HMAC(key, input): HMAC-BLAKE2s-256."""
    return _hmac.new(key, data, hashlib.blake2s).digest()


def kdf(key: bytes, data: bytes, n: int) -> tuple[bytes, ...]:
    """KDF_n(key, input): HKDF with HMAC-BLAKE2s, returning n 32-byte outputs."""
    prk = hmac(key, data)
    out: list[bytes] = []
    prev = b""
    for i in range(1, n + 1):
        prev = hmac(prk, prev + bytes([i]))
        out.append(prev)
    return tuple(out)


def kdf1(key: bytes, data: bytes) -> bytes:
    return kdf(key, data, 1)[0]


def kdf2(key: bytes, data: bytes) -> tuple[bytes, bytes]:
    a, b = kdf(key, data, 2)
    return a, b


def kdf3(key: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    a, b, c = kdf(key, data, 3)
    return a, b, c


def nonce_for(counter: int) -> bytes:
    """The 96-bit AEAD nonce: 32 zero bits then the 64-bit little-endian counter."""
    return b"\x00\x00\x00\x00" + struct.pack("<Q", counter)


def aead_encrypt(key: bytes, counter: int, plaintext: bytes, ad: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(nonce_for(counter), plaintext, ad)


def aead_decrypt(key: bytes, counter: int, ciphertext: bytes, ad: bytes) -> bytes:
    try:
        return ChaCha20Poly1305(key).decrypt(nonce_for(counter), ciphertext, ad)
    except InvalidTag as e:
        raise CryptoError("AEAD authentication failed") from e


def hchacha20(key: bytes, nonce16: bytes) -> bytes:
    """HChaCha20 (draft-irtf-cfrg-xchacha section 2.2) from one ChaCha20 block."""
    # cryptography's ChaCha20 takes a 16-byte nonce: counter (LE) || nonce, i.e.
    # exactly state words 12..15, which is where HChaCha20 puts its 16-byte input.
    enc = Cipher(algorithms.ChaCha20(key, nonce16), mode=None).encryptor()
    block = struct.unpack("<16I", enc.update(bytes(64)))
    consts = struct.unpack("<4I", b"expand 32-byte k")
    nwords = struct.unpack("<4I", nonce16)
    words = [(block[i] - consts[i]) & 0xFFFFFFFF for i in range(4)]
    words += [(block[12 + i] - nwords[i]) & 0xFFFFFFFF for i in range(4)]
    return struct.pack("<8I", *words)


def xaead_encrypt(key: bytes, nonce24: bytes, plaintext: bytes, ad: bytes) -> bytes:
    subkey = hchacha20(key, nonce24[:16])
    return ChaCha20Poly1305(subkey).encrypt(bytes(4) + nonce24[16:], plaintext, ad)


def xaead_decrypt(key: bytes, nonce24: bytes, ciphertext: bytes, ad: bytes) -> bytes:
    subkey = hchacha20(key, nonce24[:16])
    try:
        return ChaCha20Poly1305(subkey).decrypt(bytes(4) + nonce24[16:], ciphertext, ad)
    except InvalidTag as e:
        raise CryptoError("XAEAD authentication failed") from e


def generate_private_key() -> bytes:
    """A new clamped X25519 private key (32 bytes), as `wg genkey` makes."""
    return clamp(os.urandom(32))


def clamp(k: bytes) -> bytes:
    b = bytearray(k)
    b[0] &= 248
    b[31] = (b[31] & 127) | 64
    return bytes(b)


def public_key(private: bytes) -> bytes:
    return (
        X25519PrivateKey.from_private_bytes(private)
        .public_key()
        .public_bytes(Encoding.Raw, PublicFormat.Raw)
    )


def dh(private: bytes, public: bytes) -> bytes:
    """X25519(private, public); refuses the all-zero result of a low-order point."""
    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(
            X25519PublicKey.from_public_bytes(public)
        )
    except ValueError as e:  # cryptography rejects the all-zero shared secret
        raise CryptoError("DH produced the all-zero value (low-order point)") from e
    if shared == ZERO_KEY:
        raise CryptoError("DH produced the all-zero value (low-order point)")
    return shared


def tai64n(unix_ns: int) -> bytes:
    """TAI64N label (12 bytes, big-endian) for a Unix time in nanoseconds."""
    secs, nanos = divmod(unix_ns, 1_000_000_000)
    return struct.pack(">QI", TAI64_BASE + secs, nanos)


def constant_time_eq(a: bytes, b: bytes) -> bool:
    return _hmac.compare_digest(a, b)
