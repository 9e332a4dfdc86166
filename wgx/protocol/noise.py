"""Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s, the handshake of WireGuard.

This is the generic Noise pattern

    IKpsk2:  <- s
             ...
             -> e, es, s, ss
             <- e, ee, se, psk

with the prologue and payloads as parameters, so it can be checked against
the published Noise test vectors. WireGuard uses prologue = IDENTIFIER, the
TAI64N timestamp as the first payload and an empty second payload.
Ephemeral private keys are passed in: the caller owns randomness.
"""

from __future__ import annotations

from dataclasses import dataclass

from .crypto import (
    CONSTRUCTION,
    IDENTIFIER,
    aead_decrypt,
    aead_encrypt,
    dh,
    hash_,
    kdf1,
    kdf2,
    kdf3,
    public_key,
)


def initial_chain(protocol_name: bytes = CONSTRUCTION) -> bytes:
    """Noise InitializeSymmetric: h = ck = HASH(name) (name is longer than 32 B)."""
    return hash_(protocol_name) if len(protocol_name) > 32 else protocol_name.ljust(32, b"\0")


_CK0 = initial_chain()


@dataclass(slots=True)
class HandshakeState:
    """Chaining key and hash after a message, plus what the next step needs."""

    ck: bytes
    h: bytes
    local_ephemeral: bytes = b""  # private
    remote_ephemeral: bytes = b""  # public
    remote_static: bytes = b""  # public


def _start(responder_static: bytes, prologue: bytes) -> tuple[bytes, bytes]:
    return _CK0, hash_(hash_(_CK0 + prologue) + responder_static)


def create_initiation(
    static_private: bytes,
    remote_static: bytes,
    ephemeral_private: bytes,
    payload: bytes,
    prologue: bytes = IDENTIFIER,
) -> tuple[bytes, bytes, bytes, HandshakeState]:
    """Initiator's first message: (ephemeral pub, encrypted static, encrypted payload, state)."""
    ck, h = _start(remote_static, prologue)
    e_pub = public_key(ephemeral_private)
    ck = kdf1(ck, e_pub)
    h = hash_(h + e_pub)
    ck, k = kdf2(ck, dh(ephemeral_private, remote_static))
    enc_static = aead_encrypt(k, 0, public_key(static_private), h)
    h = hash_(h + enc_static)
    ck, k = kdf2(ck, dh(static_private, remote_static))
    enc_payload = aead_encrypt(k, 0, payload, h)
    h = hash_(h + enc_payload)
    state = HandshakeState(ck, h, local_ephemeral=ephemeral_private, remote_static=remote_static)
    return e_pub, enc_static, enc_payload, state


def consume_initiation(
    static_private: bytes,
    ephemeral: bytes,
    enc_static: bytes,
    enc_payload: bytes,
    prologue: bytes = IDENTIFIER,
) -> tuple[bytes, HandshakeState]:
    """Responder reads the first message: (payload, state with the initiator's static key).

    Raises CryptoError if it does not authenticate.
    """
    ck, h = _start(public_key(static_private), prologue)
    ck = kdf1(ck, ephemeral)
    h = hash_(h + ephemeral)
    ck, k = kdf2(ck, dh(static_private, ephemeral))
    remote_static = aead_decrypt(k, 0, enc_static, h)
    h = hash_(h + enc_static)
    ck, k = kdf2(ck, dh(static_private, remote_static))
    payload = aead_decrypt(k, 0, enc_payload, h)
    h = hash_(h + enc_payload)
    return payload, HandshakeState(ck, h, remote_ephemeral=ephemeral, remote_static=remote_static)


def create_response(
    state: HandshakeState, ephemeral_private: bytes, psk: bytes, payload: bytes = b""
) -> tuple[bytes, bytes, tuple[bytes, bytes]]:
    """Responder's message: (ephemeral pub, encrypted payload, (send key, receive key))."""
    e_pub = public_key(ephemeral_private)
    ck = kdf1(state.ck, e_pub)
    h = hash_(state.h + e_pub)
    ck = kdf1(ck, dh(ephemeral_private, state.remote_ephemeral))
    ck = kdf1(ck, dh(ephemeral_private, state.remote_static))
    ck, tau, k = kdf3(ck, psk)
    h = hash_(h + tau)
    enc_payload = aead_encrypt(k, 0, payload, h)
    recv, send = kdf2(ck, b"")
    return e_pub, enc_payload, (send, recv)


def consume_response(
    state: HandshakeState,
    static_private: bytes,
    ephemeral: bytes,
    enc_payload: bytes,
    psk: bytes,
) -> tuple[bytes, tuple[bytes, bytes]]:
    """Initiator reads the response: (payload, (send key, receive key)). Raises CryptoError."""
    ck = kdf1(state.ck, ephemeral)
    h = hash_(state.h + ephemeral)
    ck = kdf1(ck, dh(state.local_ephemeral, ephemeral))
    ck = kdf1(ck, dh(static_private, ephemeral))
    ck, tau, k = kdf3(ck, psk)
    h = hash_(h + tau)
    payload = aead_decrypt(k, 0, enc_payload, h)
    send, recv = kdf2(ck, b"")
    return payload, (send, recv)
