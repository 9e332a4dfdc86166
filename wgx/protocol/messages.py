"""Wire formats of WireGuard's four message types (whitepaper section 5.4).

All integers are little-endian. Parsing never raises on hostile input except
`MessageError`, and only for datagrams of the wrong size or type.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MSG_INITIATION = 1
MSG_RESPONSE = 2
MSG_COOKIE_REPLY = 3
MSG_TRANSPORT = 4

INITIATION_LEN = 148
RESPONSE_LEN = 92
COOKIE_REPLY_LEN = 64
TRANSPORT_HEADER_LEN = 16
TAG_LEN = 16
TRANSPORT_MIN_LEN = TRANSPORT_HEADER_LEN + TAG_LEN  # a keepalive
MAC_LEN = 16

_INIT = struct.Struct("<I I 32s 48s 28s 16s 16s")
_RESP = struct.Struct("<I I I 32s 16s 16s 16s")
_COOKIE = struct.Struct("<I I 24s 32s")
_TRANSPORT = struct.Struct("<I I Q")


class MessageError(ValueError):
    """A datagram that is not a well-formed WireGuard message."""


@dataclass(frozen=True, slots=True)
class Initiation:
    sender: int
    ephemeral: bytes
    encrypted_static: bytes
    encrypted_timestamp: bytes
    mac1: bytes
    mac2: bytes

    def pack(self) -> bytes:
        return _INIT.pack(
            MSG_INITIATION, self.sender, self.ephemeral, self.encrypted_static,
            self.encrypted_timestamp, self.mac1, self.mac2,
        )

    @classmethod
    def unpack(cls, data: bytes) -> Initiation:
        _check(data, MSG_INITIATION, INITIATION_LEN)
        _, sender, eph, st, ts, m1, m2 = _INIT.unpack(data)
        return cls(sender, eph, st, ts, m1, m2)


@dataclass(frozen=True, slots=True)
class Response:
    sender: int
    receiver: int
    ephemeral: bytes
    encrypted_nothing: bytes
    mac1: bytes
    mac2: bytes

    def pack(self) -> bytes:
        return _RESP.pack(
            MSG_RESPONSE, self.sender, self.receiver, self.ephemeral,
            self.encrypted_nothing, self.mac1, self.mac2,
        )

    @classmethod
    def unpack(cls, data: bytes) -> Response:
        _check(data, MSG_RESPONSE, RESPONSE_LEN)
        _, sender, receiver, eph, empty, m1, m2 = _RESP.unpack(data)
        return cls(sender, receiver, eph, empty, m1, m2)


@dataclass(frozen=True, slots=True)
class CookieReply:
    receiver: int
    nonce: bytes
    encrypted_cookie: bytes

    def pack(self) -> bytes:
        return _COOKIE.pack(MSG_COOKIE_REPLY, self.receiver, self.nonce, self.encrypted_cookie)

    @classmethod
    def unpack(cls, data: bytes) -> CookieReply:
        _check(data, MSG_COOKIE_REPLY, COOKIE_REPLY_LEN)
        _, receiver, nonce, cookie = _COOKIE.unpack(data)
        return cls(receiver, nonce, cookie)


def pack_transport_header(receiver: int, counter: int) -> bytes:
    return _TRANSPORT.pack(MSG_TRANSPORT, receiver, counter)


def unpack_transport_header(data: bytes | memoryview) -> tuple[int, int]:
    """(receiver index, counter) of a transport message; raises MessageError."""
    if len(data) < TRANSPORT_MIN_LEN or data[0] != MSG_TRANSPORT or any(data[1:4]):
        raise MessageError("not a transport message")
    _, receiver, counter = _TRANSPORT.unpack_from(data)
    return receiver, counter


def message_type(data: bytes | memoryview) -> int:
    """The message type if the datagram has a valid size for it, else 0."""
    n = len(data)
    if n < 4 or data[1] or data[2] or data[3]:
        return 0
    t = data[0]
    if t == MSG_INITIATION and n == INITIATION_LEN:
        return t
    if t == MSG_RESPONSE and n == RESPONSE_LEN:
        return t
    if t == MSG_COOKIE_REPLY and n == COOKIE_REPLY_LEN:
        return t
    if t == MSG_TRANSPORT and n >= TRANSPORT_MIN_LEN:
        return t
    return 0


def padded_len(n: int, mtu: int) -> int:
    """Length of a plaintext of n bytes after padding to a multiple of 16, capped at mtu."""
    p = (n + 15) & ~15
    if mtu and p > mtu:
        p = max(mtu, n)
    return p


def inner_packet_length(plain: bytes | memoryview) -> int:
    """Length of the IP packet at the start of a decrypted payload, 0 if it is not one.

    The rest of the payload is padding; a payload shorter than its IP header says
    is not a packet.
    """
    n = len(plain)
    version = plain[0] >> 4 if n else 0
    if version == 4 and n >= 20:
        length = (plain[2] << 8) | plain[3]
        return length if 20 <= length <= n else 0
    if version == 6 and n >= 40:
        length = 40 + ((plain[4] << 8) | plain[5])
        return length if length <= n else 0
    return 0


def _check(data: bytes, mtype: int, length: int) -> None:
    if len(data) != length or data[0] != mtype or any(data[1:4]):
        raise MessageError(f"not a type {mtype} message of {length} bytes")
