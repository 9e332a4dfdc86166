"""The UAPI text protocol: parsing, validation before apply, and get output."""

from __future__ import annotations

import errno

import pytest
from test_crypto import LOW_ORDER  # the published low-order points

from wgx.control import uapi
from wgx.protocol import crypto
from wgx.protocol.engine import Engine


class FakeDevice:
    """The DeviceControl surface, recording socket changes instead of binding."""

    def __init__(self) -> None:
        self.engine = Engine(wall_offset=1_700_000_000.0)
        self.ports: list[int] = []
        self.marks: list[int] = []
        self.fail_port: int | None = None
        self.fail_mark = False

    def set_listen_port(self, port: int) -> None:
        if port == self.fail_port:
            raise OSError(errno.EADDRINUSE, "in use")
        self.ports.append(port)
        self.engine.listen_port = port

    def set_fwmark(self, mark: int) -> None:
        if self.fail_mark:
            raise OSError(errno.EPERM, "Operation not permitted")
        self.marks.append(mark)
        self.engine.fwmark = mark

    def now(self) -> float:
        return 100.0


def key() -> bytes:
    return crypto.generate_private_key()


def pub() -> bytes:
    return crypto.public_key(key())


def request(dev: FakeDevice, text: str) -> str:
    return uapi.handle_request(dev, text, {})


def test_set_then_get_round_trip() -> None:
    dev = FakeDevice()
    priv, p1, p2, psk = key(), pub(), pub(), key()
    answer = request(dev, "\n".join([
        "set=1", f"private_key={priv.hex()}", "listen_port=51820", "fwmark=42",
        f"public_key={p1.hex()}", f"preshared_key={psk.hex()}", "endpoint=198.18.0.2:51820",
        "persistent_keepalive_interval=25", "replace_allowed_ips=true",
        "allowed_ip=10.99.0.2/32", "allowed_ip=fd99::2/128",
        f"public_key={p2.hex()}", "endpoint=[fd18::3]:1234", "allowed_ip=10.99.1.0/24",
    ]))
    assert answer == "errno=0\n\n"
    got = request(dev, "get=1")
    assert got.endswith("errno=0\n\n")
    lines = got.splitlines()
    assert f"private_key={priv.hex()}" in lines
    assert "listen_port=51820" in lines and "fwmark=42" in lines
    i1 = lines.index(f"public_key={p1.hex()}")
    i2 = lines.index(f"public_key={p2.hex()}")
    peer1 = lines[i1:i2]
    assert f"preshared_key={psk.hex()}" in peer1
    assert "endpoint=198.18.0.2:51820" in peer1
    assert "persistent_keepalive_interval=25" in peer1
    assert "allowed_ip=10.99.0.2/32" in peer1 and "allowed_ip=fd99::2/128" in peer1
    assert "protocol_version=1" in peer1
    assert "last_handshake_time_sec=0" in peer1 and "rx_bytes=0" in peer1
    assert "endpoint=[fd18::3]:1234" in lines[i2:]
    assert dev.ports == [51820] and dev.marks == [42]


def test_allowed_ip_removal_form_and_replace() -> None:
    dev = FakeDevice()
    p = pub()
    request(dev, f"set=1\npublic_key={p.hex()}\nallowed_ip=10.0.0.0/24\nallowed_ip=10.0.1.0/24")
    request(dev, f"set=1\npublic_key={p.hex()}\nallowed_ip=-10.0.0.0/24")
    peer = dev.engine.peers[p]
    assert [str(n) for n in dev.engine.allowed.entries(peer)] == ["10.0.1.0/24"]
    request(dev, f"set=1\npublic_key={p.hex()}\nreplace_allowed_ips=true\nallowed_ip=10.9.0.0/16")
    assert [str(n) for n in dev.engine.allowed.entries(peer)] == ["10.9.0.0/16"]


def test_remove_update_only_replace_peers() -> None:
    dev = FakeDevice()
    p1, p2, p3 = pub(), pub(), pub()
    request(dev, f"set=1\npublic_key={p1.hex()}\npublic_key={p2.hex()}")
    assert set(dev.engine.peers) == {p1, p2}
    request(dev, f"set=1\npublic_key={p3.hex()}\nupdate_only=true")
    assert p3 not in dev.engine.peers
    request(dev, f"set=1\npublic_key={p1.hex()}\nremove=true")
    assert set(dev.engine.peers) == {p2}
    request(dev, f"set=1\nreplace_peers=true\npublic_key={p3.hex()}")
    assert set(dev.engine.peers) == {p3}


def test_zero_private_key_clears_it() -> None:
    dev = FakeDevice()
    request(dev, f"set=1\nprivate_key={key().hex()}")
    assert dev.engine.private_key is not None
    request(dev, f"set=1\nprivate_key={'00' * 32}")
    assert dev.engine.private_key is None
    assert "private_key" not in request(dev, "get=1")


@pytest.mark.parametrize("bad", [
    "listen_port=70000", "listen_port=-1", "fwmark=x", "private_key=abcd",
    "bogus=1", "replace_peers=false", "no equals sign",
    "public_key=zz", "public_key={p}\nendpoint=nohost", "public_key={p}\nendpoint=1.2.3.4",
    "public_key={p}\nendpoint=[fd00::1]:0", "public_key={p}\nallowed_ip=10.0.0.0/33",
    "public_key={p}\npersistent_keepalive_interval=65536", "public_key={p}\nprotocol_version=2",
    "public_key={p}\nunknown_peer_key=1", "public_key=" + "00" * 32,
])
def test_bad_requests_are_einval_and_change_nothing(bad: str) -> None:
    dev = FakeDevice()
    p = pub()
    before = request(dev, "get=1")
    # a valid change before the bad line must not be applied either
    body = f"set=1\nlisten_port=1111\npublic_key={pub().hex()}\n" + bad.format(p=p.hex())
    assert request(dev, body) == f"errno=-{errno.EINVAL}\n\n"
    assert request(dev, "get=1") == before
    assert dev.ports == []


@pytest.mark.parametrize("low", LOW_ORDER + [k[:31] + bytes([k[31] | 0x80]) for k in LOW_ORDER])
def test_low_order_public_key_refused(low: bytes) -> None:
    """All 7 published low-order points, also with the high bit set (14 encodings)."""
    dev = FakeDevice()
    before = request(dev, "get=1")
    body = f"set=1\nlisten_port=1111\npublic_key={pub().hex()}\npublic_key={low.hex()}"
    assert request(dev, body) == f"errno=-{errno.EINVAL}\n\n"
    assert not dev.engine.peers and request(dev, "get=1") == before


def test_port_in_use_is_reported_and_nothing_else_applied() -> None:
    dev = FakeDevice()
    dev.fail_port = 4444
    answer = request(dev, f"set=1\nlisten_port=4444\npublic_key={pub().hex()}")
    assert answer == f"errno=-{errno.EADDRINUSE}\n\n"
    assert not dev.engine.peers


def test_fwmark_refused_by_the_kernel_is_an_errno_and_nothing_else_applied() -> None:
    dev = FakeDevice()
    dev.fail_mark = True
    port = dev.engine.listen_port
    answer = request(dev, f"set=1\nfwmark=7\nlisten_port=4444\npublic_key={pub().hex()}")
    assert answer == f"errno=-{errno.EPERM}\n\n"
    assert not dev.engine.peers and dev.marks == []
    assert dev.ports == [4444, port] and dev.engine.listen_port == port  # the old port is back


def test_unknown_operation_and_get_with_arguments() -> None:
    dev = FakeDevice()
    assert request(dev, "frobnicate=1") == f"errno=-{errno.EINVAL}\n\n"
    assert request(dev, "get=1\nfoo=bar") == f"errno=-{errno.EINVAL}\n\n"


def test_own_public_key_as_peer_is_ignored() -> None:
    dev = FakeDevice()
    priv = key()
    request(dev, f"set=1\nprivate_key={priv.hex()}\npublic_key={crypto.public_key(priv).hex()}")
    assert not dev.engine.peers


def test_wgx_stats_request() -> None:
    dev = FakeDevice()
    dev.engine.receive_datagram(b"junk", ("198.18.0.9", 9), 1.0)
    got = uapi.handle_request(dev, "get=wgx", {"dataplane": "socket"})
    assert "dataplane=socket\n" in got and "drop.malformed=1\n" in got


@pytest.mark.parametrize("text,expected", [
    ("1.2.3.4:5", ("1.2.3.4", 5)),
    ("[fd18::1]:51820", ("fd18::1", 51820)),
    ("[fe80::1%eth0]:7", ("fe80::1", 7)),
])
def test_parse_endpoint(text: str, expected: tuple[str, int]) -> None:
    assert uapi.parse_endpoint(text) == expected
    assert uapi.parse_endpoint(uapi.format_endpoint(expected)) == expected


@pytest.mark.parametrize("low", LOW_ORDER + [k[:31] + bytes([k[31] | 0x80]) for k in LOW_ORDER])
def test_wgx_set_refuses_low_order_key_before_any_request(low: bytes) -> None:
    """`wgx set` checks the key itself (exit 2, no socket touched, any user)."""
    import base64

    from typer.testing import CliRunner

    from wgx.cli import app

    key = base64.b64encode(low).decode()
    res = CliRunner().invoke(app, ["set", "wgxnone0", "peer", key, "allowed-ips", "10.9.9.9/32"])
    assert res.exit_code == 2, res.output
    assert "low-order" in res.output and "wgxnone0" not in res.output, res.output
