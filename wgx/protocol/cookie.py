"""mac1/mac2 and the cookie mechanism (whitepaper section 5.4.4 and 5.4.7).

`CookieChecker` is the receiving side of handshake messages (keyed by our own
public key): it verifies mac1, verifies mac2 under load and makes cookie
replies. `CookieGenerator` is the sending side (one per peer, keyed by the
peer's public key): it stamps mac1/mac2 on outgoing handshake messages and
stores the cookie from a reply. Time (`now`, seconds, monotonic) and
randomness are passed in.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from .crypto import (
    LABEL_COOKIE,
    LABEL_MAC1,
    CryptoError,
    constant_time_eq,
    hash_,
    mac,
    xaead_decrypt,
    xaead_encrypt,
)
from .messages import MAC_LEN, CookieReply

COOKIE_REFRESH_TIME = 120.0  # the secret changes and a cookie expires after this
COOKIE_SECRET_LATENCY = 5.0  # a sender stops using a cookie this much before it expires
_ZERO_MAC = bytes(MAC_LEN)

Random = Callable[[int], bytes]


def _mac1_offset(msg: bytes) -> int:
    return len(msg) - 2 * MAC_LEN


class CookieChecker:
    """Verifies mac1/mac2 of messages sent to us and writes cookie replies."""

    def __init__(self, local_public: bytes, random: Random = os.urandom) -> None:
        self.mac1_key = hash_(LABEL_MAC1 + local_public)
        self.cookie_key = hash_(LABEL_COOKIE + local_public)
        self._random = random
        self._secret = b""
        self._secret_time = float("-inf")

    def check_mac1(self, msg: bytes) -> bool:
        off = _mac1_offset(msg)
        return constant_time_eq(mac(self.mac1_key, msg[:off]), msg[off : off + MAC_LEN])

    def _cookie(self, source: bytes, now: float) -> bytes:
        if now - self._secret_time >= COOKIE_REFRESH_TIME:
            self._secret = self._random(32)
            self._secret_time = now
        return mac(self._secret, source)

    def check_mac2(self, msg: bytes, source: bytes, now: float) -> bool:
        """True if mac2 carries a valid cookie for `source` (ip bytes + port)."""
        if now - self._secret_time >= COOKIE_REFRESH_TIME:
            return False
        off = len(msg) - MAC_LEN
        return constant_time_eq(mac(mac(self._secret, source), msg[:off]), msg[off:])

    def create_reply(self, msg: bytes, receiver: int, source: bytes, now: float) -> bytes:
        """A cookie reply (type 3) to handshake message `msg` from `source`."""
        off = _mac1_offset(msg)
        nonce = self._random(24)
        sealed = xaead_encrypt(
            self.cookie_key, nonce, self._cookie(source, now), msg[off : off + MAC_LEN]
        )
        return CookieReply(receiver, nonce, sealed).pack()


class CookieGenerator:
    """Stamps mac1/mac2 on handshake messages to one peer and keeps its cookie."""

    def __init__(self, remote_public: bytes) -> None:
        self.mac1_key = hash_(LABEL_MAC1 + remote_public)
        self.cookie_key = hash_(LABEL_COOKIE + remote_public)
        self.last_mac1: bytes | None = None
        self.cookie: bytes | None = None
        self.cookie_time = float("-inf")

    def add_macs(self, msg: bytes, now: float) -> bytes:
        """`msg` with its two trailing MAC fields (zero on input) filled in."""
        off = _mac1_offset(msg)
        body = msg[:off]
        mac1 = mac(self.mac1_key, body)
        self.last_mac1 = mac1
        # Kernel cookie.c: a cookie is used for COOKIE_SECRET_MAX_AGE - COOKIE_SECRET_LATENCY.
        if (
            self.cookie is not None
            and now - self.cookie_time < COOKIE_REFRESH_TIME - COOKIE_SECRET_LATENCY
        ):
            mac2 = mac(self.cookie, body + mac1)
        else:
            mac2 = _ZERO_MAC
        return body + mac1 + mac2

    def consume_reply(self, reply: CookieReply, now: float) -> bool:
        """Store the cookie from a reply to our last message; False if it does not open."""
        if self.last_mac1 is None:
            return False
        try:
            cookie = xaead_decrypt(self.cookie_key, reply.nonce, reply.encrypted_cookie,
                                   self.last_mac1)
        except CryptoError:
            return False
        self.cookie = cookie
        self.cookie_time = now
        self.last_mac1 = None  # kernel: have_sent_mac1 = false, one reply per message
        return True
