"""The UAPI request path on an in-memory device, with the invariants the fuzzer checks.

`UapiTarget.feed(data)` splits a byte stream into requests as `UapiServer` does
(`uapi.take_requests`), answers each with `uapi.handle_request`, and raises
AssertionError unless

* every answer is the protocol's shape: `key=value` lines, then `errno=N` and a blank line,
* a request answered with a non-zero errno left the device exactly as it was
  (validate-before-apply), and so did every `get` request.

The device starts from `BASELINE` (a private key, a port, two peers); after a request
changed it, it is restored from a pickled copy (cheaper than replaying BASELINE, which
costs five X25519 operations), so the fuzzer's inputs stay independent of each other.
"""

from __future__ import annotations

import errno
import pickle
import re

from scenario import engine_state, static_key

from wgx.control import uapi
from wgx.protocol import engine as engine_mod
from wgx.protocol.engine import Engine


def memoize_curve_ops() -> None:
    """Cache check_public_key and public_key (pure functions of 32 bytes) where the UAPI
    path calls them. Same results, exceptions included; the fuzzer reuses a handful of
    keys, and X25519 was most of the time per input."""
    check, pub = engine_mod.check_public_key, engine_mod.public_key
    verdict: dict[bytes, Exception | None] = {}
    pubs: dict[bytes, bytes] = {}

    def cached_check(key: bytes) -> None:
        if key not in verdict:
            try:
                check(key)
                verdict[key] = None
            except Exception as e:  # re-raised below, every time, as the original does
                verdict[key] = e
        if verdict[key] is not None:
            raise verdict[key]

    def cached_pub(private: bytes) -> bytes:
        if private not in pubs:
            pubs[private] = pub(private)
        return pubs[private]

    uapi.check_public_key = cached_check
    engine_mod.check_public_key = cached_check
    engine_mod.public_key = cached_pub

NOW = 100.0
BUSY_PORT = 1  # set_listen_port fails for it, as a port in use would
_ANSWER = re.compile(r"(?:[a-z_.0-9]+=[^\n]*\n)*errno=(-?[0-9]+)\n\n\Z")

_PRIV, _ = static_key(901)
_, PEER1 = static_key(902)
_, PEER2 = static_key(903)
_PSK = bytes(range(32))
BASELINE = "\n".join([
    "set=1", f"private_key={_PRIV.hex()}", "listen_port=51820", "fwmark=7",
    f"public_key={PEER1.hex()}", f"preshared_key={_PSK.hex()}", "endpoint=198.18.0.2:51820",
    "persistent_keepalive_interval=0", "allowed_ip=10.0.0.2/32", "allowed_ip=fd00::2/128",
    f"public_key={PEER2.hex()}", "endpoint=[2001:db8::3]:4444", "allowed_ip=10.0.3.0/24",
])


class FakeDevice:
    """The DeviceControl surface without sockets: port and mark changes are recorded."""

    def __init__(self) -> None:
        self.engine = Engine(wall_offset=1_700_000_000.0)
        self.ports: list[int] = []
        self.marks: list[int] = []

    def set_listen_port(self, port: int) -> None:
        if port == BUSY_PORT:
            raise OSError(errno.EADDRINUSE, "Address already in use")
        self.ports.append(port)
        self.engine.listen_port = port

    def set_fwmark(self, mark: int) -> None:
        self.marks.append(mark)
        self.engine.fwmark = mark

    def now(self) -> float:
        return NOW


def device_state(dev: FakeDevice) -> tuple:
    eng = dev.engine
    # engine_state covers everything format_get reports (keys, port, mark, peers, IPs).
    return (engine_state(eng), tuple(dev.ports), tuple(dev.marks), tuple(eng.datagrams),
            dict(eng.drops), dict(eng.stats))


def fresh_device() -> FakeDevice:
    dev = FakeDevice()
    assert uapi.handle_request(dev, BASELINE, {}) == "errno=0\n\n"
    dev.engine.datagrams.clear()
    return dev


class UapiTarget:
    def __init__(self) -> None:
        self._blob = pickle.dumps(fresh_device())
        self.dev: FakeDevice = pickle.loads(self._blob)
        self.baseline = device_state(self.dev)
        self.dirty = False

    def feed(self, data: bytes) -> list[int]:
        """Serve every complete request in `data`; returns the errno of each answer."""
        if self.dirty:
            self.dev = pickle.loads(self._blob)
            self.dirty = False
        codes = []
        for request in uapi.take_requests(bytearray(data)):
            before = device_state(self.dev) if self.dirty else self.baseline
            answer = uapi.handle_request(self.dev, request, {})
            m = _ANSWER.fullmatch(answer)
            if m is None:
                raise AssertionError(f"malformed answer {answer!r} to {request!r}")
            code = int(m.group(1))
            if code > 0:
                raise AssertionError(f"positive errno in {answer!r}")
            codes.append(code)
            if code != 0 or request.split("\n", 1)[0] != "set=1":
                if device_state(self.dev) != before:
                    raise AssertionError(f"errno={code} request {request!r} changed the device")
            else:
                self.dirty = True
        return codes
