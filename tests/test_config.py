"""wgx.control.config: wg-quick configuration files."""

from __future__ import annotations

import base64
import ipaddress
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wgx.control.config import (
    Config,
    ConfigError,
    Endpoint,
    InterfaceConfig,
    PeerConfig,
    dumps,
    hooks,
    interface_name,
    is_low_order,
    load,
    loads,
    permission_warning,
    resolve,
    validate_for_up,
    wg_setconf_text,
)

FIXTURE = Path(__file__).parent / "configs" / "wg0.conf"

PRIV = "MJ+Ne8DDEbeWNwCROAo/Ol9mu0jIgtmNEqOW4Dpaw2I="
PRIV_PUB = "Ii1lx4PbD4M5yk+FJLsopfmvOYyjBikFuHHfNnNUHUo="  # wg pubkey of PRIV
PUB1 = "0+QDPCBc+LJnYf30Ft+GJN049+0WqG9yjoonLcFOCU0="
PUB2 = "zG7/FDmZwsZM+xs4XCHBh9Y80GaKFxJeW/QuO5hV9w0="
PUB3 = "2LrzRkRHoc1lR5/xLSceGZSHJCG82jolTGqD7UGOy1A="
PSK = "bCGge/SUxqaBNIlJCCRi6Z4sRrYAM9/G7rljbbLTwDI="


def b64d(s: str) -> bytes:
    return base64.b64decode(s)


def err(text: str) -> str:
    """The message loads() raises for text, labelled t.conf."""
    with pytest.raises(ConfigError) as info:
        loads(text, "t.conf")
    assert str(info.value) == f"t.conf:{info.value.line}: {info.value.message}"
    return str(info.value)


def peer_text(**extra: str) -> str:
    lines = ["[Interface]", f"PrivateKey = {PRIV}", "", "[Peer]", f"PublicKey = {PUB1}"]
    lines += [f"{k} = {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ parsing a whole file

def test_fixture_parses_everything() -> None:
    cfg = load(FIXTURE)
    i = cfg.interface
    assert cfg.path == str(FIXTURE)
    assert i.private_key == b64d(PRIV)
    assert i.listen_port == 51820
    assert i.fwmark == 0x1234
    assert [str(a) for a in i.addresses] == ["10.7.0.1/24", "fd07::1/64", "10.8.0.1/32"]
    assert i.dns == ["10.7.0.53", "fd07::53", "corp.example", "~."]
    assert i.dns_servers == ["10.7.0.53", "fd07::53"]
    assert i.dns_search == ["corp.example", "~."]
    assert i.mtu == 1420
    assert i.table == "1234"
    assert i.pre_up == ["echo pre-up %i"]
    assert i.post_up == [
        "iptables -A FORWARD -i %i -j ACCEPT; sysctl -w net.ipv4.ip_forward=1",
        'echo "second # kept" %i',
    ]
    assert i.pre_down == ["echo pre-down %i"]
    assert i.post_down == ["iptables -D FORWARD -i %i -j ACCEPT"]
    assert i.save_config is False
    assert i.line == 3
    assert i.lines["PrivateKey"] == 5 and i.lines["Address"] == 9

    p1, p2, p3 = cfg.peers
    assert p1.public_key == b64d(PUB1) and p1.preshared_key == b64d(PSK)
    assert [str(n) for n in p1.allowed_ips] == ["10.7.0.2/32", "fd07::2/128", "192.168.50.0/24"]
    assert p1.endpoint == ("198.51.100.7", 51820)
    assert p1.persistent_keepalive == 25
    assert (p1.line, p1.lines["PublicKey"], p1.lines["AllowedIPs"]) == (21, 22, 25)
    assert p2.public_key == b64d(PUB2) and p2.line == 29 and p2.lines["PublicKey"] == 30
    assert p2.endpoint == Endpoint("2001:db8::7", 51821)
    assert p2.preshared_key is None and p2.persistent_keepalive is None
    assert p3.endpoint == Endpoint("vpn.example.net", 443)
    assert [str(n) for n in p3.allowed_ips] == ["0.0.0.0/0", "::/0"]
    assert p3.persistent_keepalive == 0
    assert cfg.warnings == []
    validate_for_up(cfg)


def test_keys_are_case_insensitive_and_wg_keys_ignore_inner_whitespace() -> None:
    cfg = loads(f"[INTERFACE]\nprivatekey={PRIV}\nLISTEN PORT = 1\nmtu = 1400\n"
                f"[ peer ]\nPublic Key = {PUB1[:20]} {PUB1[20:]}\nallowedips = 10.0.0.0 / 8\n")
    assert cfg.interface.listen_port == 1 and cfg.interface.mtu == 1400
    assert cfg.peers[0].public_key == b64d(PUB1)
    assert cfg.peers[0].allowed_ips == [ipaddress.ip_network("10.0.0.0/8")]


def test_comments_and_whitespace_anywhere() -> None:
    text = (f"  # leading comment\n\n\t[Interface]   # c\n  PrivateKey={PRIV}#c\n"
            f"ListenPort = 51820 # port\n\n[Peer]#x\nPublicKey = {PUB1}   # who\n"
            "AllowedIPs = 10.0.0.0/8 # , 192.168.0.0/16\n")
    cfg = loads(text)
    assert cfg.interface.listen_port == 51820
    assert cfg.peers[0].allowed_ips == [ipaddress.ip_network("10.0.0.0/8")]


def test_crlf_and_missing_final_newline() -> None:
    cfg = loads(f"[Interface]\r\nPrivateKey = {PRIV}\r\nMTU = 1280\r\n[Peer]\r\n"
                f"PublicKey = {PUB1}\r\nAllowedIPs = fd00::/8")
    assert cfg.interface.mtu == 1280
    assert cfg.peers[0].allowed_ips == [ipaddress.ip_network("fd00::/8")]


def test_repeated_keys_accumulate_in_order() -> None:
    cfg = loads("[Interface]\nAddress = 10.0.0.1/24\nDNS = 1.1.1.1\nPostUp = one\n"
                "Address = fd00::1/64 10.0.1.1/24,,10.0.2.1/24\nDNS = 9.9.9.9,example.org\n"
                "PostUp = two\nPreDown = three\nPostUp = four\n"
                f"[Peer]\nPublicKey = {PUB1}\nAllowedIPs = 10.1.0.0/16\n"
                "AllowedIPs = 10.2.0.0/16, 10.3.0.0/16\nAllowedIPs=10.4.0.0/16\n")
    i = cfg.interface
    assert [str(a) for a in i.addresses] == ["10.0.0.1/24", "fd00::1/64", "10.0.1.1/24",
                                             "10.0.2.1/24"]
    assert i.dns == ["1.1.1.1", "9.9.9.9", "example.org"]
    assert i.post_up == ["one", "two", "four"] and i.pre_down == ["three"]
    assert [str(n) for n in cfg.peers[0].allowed_ips] == [
        "10.1.0.0/16", "10.2.0.0/16", "10.3.0.0/16", "10.4.0.0/16"]


def test_repeated_scalar_last_wins_with_warning() -> None:
    cfg = loads(f"[Interface]\nListenPort = 1\nListenPort = 2\n[Peer]\nPublicKey = {PUB1}\n"
                "Endpoint = 1.2.3.4:5\nEndpoint = 1.2.3.4:6\n", "t.conf")
    assert cfg.interface.listen_port == 2 and cfg.peers[0].endpoint == ("1.2.3.4", 6)
    assert cfg.warnings == ["t.conf:3: ListenPort repeats line 2; the last value wins",
                            "t.conf:7: Endpoint repeats line 6; the last value wins"]


def test_config_without_interface_or_private_key_parses() -> None:
    cfg = loads(f"[Peer]\nPublicKey = {PUB1}\n")
    assert cfg.interface == InterfaceConfig() and cfg.interface.line is None
    assert loads("") == Config()


def test_hooks_substitute_interface_and_keep_text() -> None:
    cfg = loads("[Interface]\nPostUp = ip rule add fwmark 0x1 table %i-t # note = kept\n"
                "PostUp=echo %i %i\nPreUp = \nPostDown = x\n")
    assert hooks(cfg, "post_up", "wg0") == ["ip rule add fwmark 0x1 table wg0-t # note = kept",
                                           "echo wg0 wg0"]
    assert hooks(cfg, "PostUp", "wg0") == hooks(cfg, "post_up", "wg0")
    assert hooks(cfg, "pre_up", "wg0") == [""]
    assert hooks(cfg, "pre_down", "wg0") == []
    with pytest.raises(ValueError, match="interface name"):
        hooks(cfg, "post_up", "wg0; rm -rf /")
    with pytest.raises(ValueError, match="stage"):
        hooks(cfg, "up", "wg0")


@pytest.mark.parametrize(("value", "mark"), [
    ("0x10", 16), ("16", 16), ("010", 10), ("off", 0), ("OFF", 0), ("0", 0),
    ("0xffffffff", 2**32 - 1), ("4294967295", 2**32 - 1), ("0x 10", 16)])
def test_fwmark(value: str, mark: int) -> None:
    assert loads(f"[Interface]\nFwMark = {value}\n").interface.fwmark == mark


@pytest.mark.parametrize("value", ["0X10", "-1", "0x", "4294967296", "0x100000000", "abc",
                                   "0x1g", "+1", "1.5"])
def test_fwmark_invalid(value: str) -> None:
    assert err(f"[Interface]\nFwMark = {value}\n") == (
        f"t.conf:2: invalid FwMark `{value}': expected off, 0..4294967295 or 0x0..0xffffffff")


@pytest.mark.parametrize(("value", "expected"), [("off", 0), ("Off", 0), ("0", 0),
                                                 ("25", 25), ("65535", 65535)])
def test_persistent_keepalive(value: str, expected: int) -> None:
    assert loads(peer_text(PersistentKeepalive=value)).peers[0].persistent_keepalive == expected


@pytest.mark.parametrize("value", ["65536", "-1", "25s", "on", "0x19"])
def test_persistent_keepalive_invalid(value: str) -> None:
    assert err(peer_text(PersistentKeepalive=value)) == (
        f"t.conf:6: invalid PersistentKeepalive `{value}': expected off or 0..65535")


@pytest.mark.parametrize(("value", "table"), [
    ("off", "off"), ("auto", "auto"), ("1234", "1234"), ("4294967295", "4294967295"),
    ("main", "main"), ("vpn_table.1", "vpn_table.1")])
def test_table(value: str, table: str) -> None:
    assert loads(f"[Interface]\nTable = {value}\n").interface.table == table


@pytest.mark.parametrize("value", ["4294967296", "12ab", "a b", "-1", "tab/le"])
def test_table_invalid(value: str) -> None:
    assert err(f"[Interface]\nTable = {value}\n") == (
        f"t.conf:2: invalid Table `{value}': expected off, auto, a table number"
        " (0..4294967295) or a table name")


def test_table_case_variant_warns() -> None:
    cfg = loads("[Interface]\nTable = Off\n", "t.conf")
    assert cfg.interface.table == "Off"
    assert cfg.warnings == ["t.conf:2: Table `Off' is a table name to wg-quick, which compares"
                            " `off' case-sensitively"]


@pytest.mark.parametrize(("value", "expected"), [("true", True), ("True", True),
                                                 ("FALSE", False), ("false", False)])
def test_save_config(value: str, expected: bool) -> None:
    assert loads(f"[Interface]\nSaveConfig = {value}\n").interface.save_config is expected


def test_huge_numbers_are_errors_not_crashes() -> None:
    assert err("[Interface]\nMTU = " + "9" * 5000 + "\n").startswith("t.conf:2: invalid MTU")
    assert err("[Interface]\nFwMark = 0x" + "f" * 5000 + "\n").startswith(
        "t.conf:2: invalid FwMark")
    assert err(peer_text(AllowedIPs="10.0.0.0/" + "1" * 5000)).startswith(
        "t.conf:6: invalid AllowedIPs entry")


def test_control_characters_are_escaped_in_messages() -> None:
    assert err("[Interface]\nMTU = 14\r20\n") == (
        "t.conf:2: invalid MTU `14\\r20': expected an integer in 576..65535")


def test_save_config_invalid() -> None:
    assert err("[Interface]\nSaveConfig = yes\n") == (
        "t.conf:2: invalid SaveConfig `yes': expected true or false")


# ---------------------------------------------------------------------------- endpoints

@pytest.mark.parametrize(("value", "endpoint", "written"), [
    ("192.0.2.1:51820", ("192.0.2.1", 51820), "192.0.2.1:51820"),
    ("[2001:db8::1]:51820", ("2001:db8::1", 51820), "[2001:db8::1]:51820"),
    ("[2001:DB8:0::1]:1", ("2001:db8::1", 1), "[2001:db8::1]:1"),
    ("[::ffff:192.0.2.1]:65535", ("::ffff:c000:201", 65535), "[::ffff:c000:201]:65535"),
    ("[fe80::1%eth0]:51820", ("fe80::1%eth0", 51820), "[fe80::1%eth0]:51820"),
    ("vpn.example.com:443", ("vpn.example.com", 443), "vpn.example.com:443"),
    ("localhost:51820", ("localhost", 51820), "localhost:51820"),
    ("my-host.example.:9", ("my-host.example.", 9), "my-host.example.:9"),
    ("192.0.2.1 : 51820", ("192.0.2.1", 51820), "192.0.2.1:51820"),
])
def test_endpoint(value: str, endpoint: tuple[str, int], written: str) -> None:
    peer = loads(peer_text(Endpoint=value)).peers[0]
    assert peer.endpoint == endpoint
    assert str(peer.endpoint) == written


@pytest.mark.parametrize(("value", "why"), [
    ("192.0.2.1", "missing port (expected host:port, IPv4:port or [IPv6]:port)"),
    ("vpn.example.com:", "missing port (expected host:port, IPv4:port or [IPv6]:port)"),
    ("[2001:db8::1]", "missing port (expected [IPv6]:port)"),
    ("[2001:db8::1]51820", "missing port (expected [IPv6]:port)"),
    ("[2001:db8::1]:", "missing port (expected [IPv6]:port)"),
    ("[2001:db8::1:51820", "no closing `]'"),
    ("2001:db8::1:51820", "an IPv6 address needs brackets, as in [2001:db8::1]:51820"),
    ("::1:51820", "an IPv6 address needs brackets, as in [2001:db8::1]:51820"),
    ("[192.0.2.1]:51820", "brackets must hold an IPv6 address"),
    ("[vpn.example.com]:51820", "brackets must hold an IPv6 address"),
    ("192.0.2.1:70000", "port must be 1..65535"),
    ("192.0.2.1:0", "port must be 1..65535"),
    ("192.0.2.1:wireguard", "port must be 1..65535"),
    ("192.0.2.1:-1", "port must be 1..65535"),
    ("[2001:db8::1]:99999", "port must be 1..65535"),
    ("192.0.2.1:51820 garbage", "port must be 1..65535"),
    (":51820", "`' is neither an IP address nor a hostname"),
    ("192.0.2:51820", "`192.0.2' is neither an IP address nor a hostname"),
    ("300.1.1.1:51820", "`300.1.1.1' is neither an IP address nor a hostname"),
    ("-bad.example:1", "`-bad.example' is neither an IP address nor a hostname"),
    ("a..b:1", "`a..b' is neither an IP address nor a hostname"),
    ("hö.example:1", "`hö.example' is neither an IP address nor a hostname"),
])
def test_endpoint_invalid(value: str, why: str) -> None:
    assert err(peer_text(Endpoint=value)) == f"t.conf:6: invalid Endpoint `{value}': {why}"


# ---------------------------------------------------------------------------- AllowedIPs

def test_allowed_ips_spaces_and_defaults() -> None:
    peer = loads(peer_text(AllowedIPs=" 10.0.0.0/8 ,192.168.1.1,  fd00::/8 , 2001:db8::1 "))
    assert [str(n) for n in peer.peers[0].allowed_ips] == [
        "10.0.0.0/8", "192.168.1.1/32", "fd00::/8", "2001:db8::1/128"]


def test_allowed_ips_host_bits_are_masked_with_a_warning() -> None:
    cfg = loads(peer_text(AllowedIPs="10.1.2.3/8, fd00::1/64"), "t.conf")
    assert [str(n) for n in cfg.peers[0].allowed_ips] == ["10.0.0.0/8", "fd00::/64"]
    assert cfg.warnings == [
        "t.conf:6: AllowedIPs `10.1.2.3/8' has host bits set; it means 10.0.0.0/8",
        "t.conf:6: AllowedIPs `fd00::1/64' has host bits set; it means fd00::/64"]


def test_allowed_ips_shared_between_peers_warns() -> None:
    cfg = loads(f"[Peer]\nPublicKey = {PUB1}\nAllowedIPs = 10.0.0.0/8\n\n"
                f"[Peer]\nPublicKey = {PUB2}\nAllowedIPs = 10.0.0.0/8, 10.0.0.0/8\n", "t.conf")
    assert cfg.warnings == ["t.conf:5: AllowedIPs 10.0.0.0/8 of this peer is also in the peer"
                            " at line 1; wg gives it to the last one"]


@pytest.mark.parametrize(("value", "entry", "why"), [
    ("10.0.0.0/33", "10.0.0.0/33", "prefix length must be 0..32"),
    ("fd00::/129", "fd00::/129", "prefix length must be 0..128"),
    ("10.0.0.0/", "10.0.0.0/", "prefix length must be 0..32"),
    ("10.0.0.0/x", "10.0.0.0/x", "prefix length must be 0..32"),
    ("10.0.0.0/-1", "10.0.0.0/-1", "prefix length must be 0..32"),
    ("300.0.0.0/8", "300.0.0.0/8", "`300.0.0.0' is not an IP address"),
    ("010.0.0.0/8", "010.0.0.0/8", "`010.0.0.0' is not an IP address"),
    ("fe80::1%eth0/128", "fe80::1%eth0/128", "`fe80::1%eth0' is not an IP address"),
    ("example.com/32", "example.com/32", "`example.com' is not an IP address"),
    ("10.0.0.0/8,", "", "empty entry between commas"),
    ("10.0.0.0/8,,fd00::/8", "", "empty entry between commas"),
    ("+10.0.0.0/8", "+10.0.0.0/8", "incremental +/- entries are for `wg set', not config files"),
    ("10.0.0.0/8 192.168.0.0/16", "10.0.0.0/8192.168.0.0/16",
     "entries must be separated by commas"),
])
def test_allowed_ips_invalid(value: str, entry: str, why: str) -> None:
    assert err(peer_text(AllowedIPs=value)) == (
        f"t.conf:6: invalid AllowedIPs entry `{entry}': {why}")


# ------------------------------------------------------------------- interface values

@pytest.mark.parametrize(("value", "why"), [
    ("10.0.0.1/33", "prefix length must be 0..32"),
    ("10.0.0.1/", "prefix length must be 0..32"),
    ("10.0.0.1/255.255.255.0", "prefix length must be 0..32"),
    ("fd00::1/200", "prefix length must be 0..128"),
    ("10.0.0.256/24", "`10.0.0.256' is not an IP address"),
    ("fe80::1%eth0/64", "`fe80::1%eth0' is not an IP address"),
    ("myhost", "`myhost' is not an IP address"),
])
def test_address_invalid(value: str, why: str) -> None:
    assert err(f"# c\n[Interface]\nAddress = 10.9.9.9/24, {value}\n") == (
        f"t.conf:3: invalid Address `{value}': {why}")


def test_dns_invalid() -> None:
    assert err("[Interface]\nDNS = 1.1.1.1, 1.1.1.300\n") == (
        "t.conf:2: invalid DNS server `1.1.1.300': not an IP address")
    assert err("[Interface]\nDNS = 1.1.1.1, ex*ample.com\n") == (
        "t.conf:2: invalid DNS search domain `ex*ample.com'")


@pytest.mark.parametrize("value", ["575", "65536", "0", "-1", "1420 1", "1420x", "abc", ""])
def test_mtu_invalid(value: str) -> None:
    assert err(f"[Interface]\n\nMTU = {value}\n") == (
        f"t.conf:3: invalid MTU `{value}': expected an integer in 576..65535")


def test_mtu_ipv6_minimum() -> None:
    assert loads("[Interface]\nMTU = 576\nAddress = 10.0.0.1/24\n").interface.mtu == 576
    assert err("[Interface]\nMTU = 1279\nAddress = 10.0.0.1/24\nAddress = fd00::1/64\n") == (
        "t.conf:2: MTU 1279 is below 1280, the IPv6 minimum, but Address fd00::1/64 is IPv6")


@pytest.mark.parametrize(("value", "port"), [("0", 0), ("51820", 51820), ("65535", 65535),
                                             ("051820", 51820)])
def test_listen_port(value: str, port: int) -> None:
    assert loads(f"[Interface]\nListenPort = {value}\n").interface.listen_port == port


@pytest.mark.parametrize("value", ["65536", "-1", "wireguard", "51820 1", "1e3"])
def test_listen_port_invalid(value: str) -> None:
    assert err(f"[Interface]\nListenPort = {value}\n") == (
        f"t.conf:2: invalid ListenPort `{value}': expected a port number 0..65535")


# ------------------------------------------------------------------------------ keys

def test_bad_keys() -> None:
    short = PUB1[:-2] + "="
    assert err(peer_text().replace(PUB1, short)) == (
        f"t.conf:5: PublicKey `{short}' is not a key: expected 44 characters of base64"
        " encoding 32 bytes, as `wg genkey' prints")
    noncanonical = PUB1[:42] + "1="  # '0' -> '1': sets one of the 2 unused low bits
    assert base64.b64decode(noncanonical) == b64d(PUB1)  # lenient decoders accept it
    assert "is not a key" in err(peer_text().replace(PUB1, noncanonical))
    for bad in ("!" + PUB1[1:], PUB1[:-1] + "A", base64.b64encode(bytes(33)).decode(),
                "A" * 44, PUB1 + "x", PUB1[:-1]):
        assert "is not a key" in err(peer_text().replace(PUB1, bad))


def test_bad_secret_keys_are_not_echoed() -> None:
    bad = PRIV[:-2] + "!="
    message = err(peer_text().replace(PRIV, bad))
    assert message == ("t.conf:2: PrivateKey is not a key: expected 44 characters of base64"
                       " encoding 32 bytes, as `wg genkey' prints")
    message = err(peer_text(PresharedKey=bad))
    assert message.startswith("t.conf:6: PresharedKey is not a key") and bad not in message


LOW_ORDER = [
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0100000000000000000000000000000000000000000000000000000000000000",
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
]


@pytest.mark.parametrize("high_bit", [False, True])
@pytest.mark.parametrize("point", LOW_ORDER)
def test_low_order_public_keys_refused(point: str, high_bit: bool) -> None:
    raw = bytearray.fromhex(point)
    if high_bit:
        raw[31] |= 0x80
    # Cross-check: X25519 with this point gives the all-zero secret (cryptography refuses).
    with pytest.raises(ValueError):
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(bytes(raw)))
    key = base64.b64encode(raw).decode()
    assert is_low_order(bytes(raw))
    assert err(peer_text().replace(PUB1, key)) == (
        f"t.conf:5: PublicKey `{key}' is a low-order Curve25519 point; a handshake with it"
        " cannot be secure")


def test_ordinary_keys_are_not_low_order() -> None:
    assert not any(is_low_order(b64d(k)) for k in (PUB1, PUB2, PUB3, PRIV_PUB))


# ------------------------------------------------------------- structure errors, lines

def test_structure_errors_with_exact_lines() -> None:
    assert err("# comment\n\nListenPort = 1\n") == (
        "t.conf:3: `ListenPort' is outside a section; expected [Interface] or [Peer] before it")
    assert err("[Interface]\n# c\n\n[Peers]\n") == (
        "t.conf:4: unknown section `[Peers]'; expected [Interface] or [Peer]")
    assert err("[Interface] extra\n") == (
        "t.conf:1: unknown section `[Interface] extra'; expected [Interface] or [Peer]")
    assert err("[Interface]\n\n  Bogus = 1 # c\n") == (
        "t.conf:3: unknown key `Bogus' in [Interface]")
    assert err(peer_text(Bogus="1")) == "t.conf:6: unknown key `Bogus' in [Peer]"
    assert err("[Interface]\nendpoint = 1.2.3.4:5\n") == (
        "t.conf:2: `endpoint' belongs in [Peer], not [Interface]")
    assert err(peer_text(Address="10.0.0.1/24")) == (
        "t.conf:6: `Address' belongs in [Interface], not [Peer]")
    assert err(peer_text(ListenPort="1")) == (
        "t.conf:6: `ListenPort' belongs in [Interface], not [Peer]")
    assert err("[Interface]\nPostUp = x\nAdd ress = 10.0.0.1\n") == (
        "t.conf:3: unknown key `Add ress' in [Interface]")
    assert err("[Interface]\nPrivateKey\n") == "t.conf:2: expected `Key = Value', got `PrivateKey'"
    assert err("[Interface]\nListenPort = # none\n") == "t.conf:2: ListenPort has an empty value"
    assert err(peer_text(AllowedIPs="")) == "t.conf:6: AllowedIPs has an empty value"
    assert err("[Interface]\n[Peer]\nPublicKey = " + PUB1 + "\n[interface]\n") == (
        "t.conf:4: duplicate [Interface] section (the first is at line 1)")


def test_peer_without_public_key() -> None:
    assert err(f"[Interface]\n\n[Peer]\nAllowedIPs = 10.0.0.0/8\n[Peer]\nPublicKey = {PUB1}\n") \
        == "t.conf:3: peer has no PublicKey"
    assert err(f"[Peer]\nPublicKey = {PUB1}\n# last\n[Peer] # empty\n\n") == (
        "t.conf:4: peer has no PublicKey")


def test_duplicate_peer_names_both_lines() -> None:
    text = (f"[Interface]\nPrivateKey = {PRIV}\n\n[Peer]\n# first\nPublicKey = {PUB1}\n\n"
            f"[Peer]\nAllowedIPs = 10.0.0.0/8\npublickey = {PUB1}\n")
    assert err(text) == (f"t.conf:10: duplicate peer: PublicKey `{PUB1}' is already used at"
                         " line 6")


def test_missing_file_and_encoding(tmp_path: Path) -> None:
    missing = tmp_path / "nope.conf"
    with pytest.raises(ConfigError) as info:
        load(missing)
    assert str(info.value) == f"{missing}:0: cannot read file: No such file or directory"
    assert info.value.line == 0
    bad = tmp_path / "bad.conf"
    bad.write_bytes(b"[Interface]\n# ok\nPostUp = echo \xff\n")
    with pytest.raises(ConfigError, match=r"bad\.conf:3: not valid UTF-8$"):
        load(bad)
    bom = tmp_path / "bom.conf"
    bom.write_bytes(b"\xef\xbb\xbf[Interface]\n")
    with pytest.raises(ConfigError, match=r"bom\.conf:1: file starts with a UTF-8 byte order"):
        load(bom)


def test_config_error_is_a_value_error() -> None:
    e = ConfigError("a.conf", 7, "boom")
    assert isinstance(e, ValueError) and str(e) == "a.conf:7: boom"
    assert (e.path, e.line, e.message) == ("a.conf", 7, "boom")


# -------------------------------------------------------------------- validate_for_up

def test_validate_for_up() -> None:
    with pytest.raises(ConfigError, match=r"^t\.conf:0: \[Interface\] has no PrivateKey$"):
        validate_for_up(loads(f"[Peer]\nPublicKey = {PUB1}\n", "t.conf"))
    with pytest.raises(ConfigError, match=r"^t\.conf:2: \[Interface\] has no PrivateKey$"):
        validate_for_up(loads("\n[Interface]\nListenPort = 1\n", "t.conf"))
    zero = base64.b64encode(bytes(32)).decode()
    with pytest.raises(ConfigError, match=r"^t\.conf:3: PrivateKey is all zeros"):
        validate_for_up(loads(f"[Interface]\n\nPrivateKey = {zero}\n", "t.conf"))
    own = loads(f"[Interface]\nPrivateKey = {PRIV}\n[Peer]\nPublicKey = {PUB1}\n"
                f"[Peer]\n#\nPublicKey = {PRIV_PUB}\n", "t.conf")
    with pytest.raises(ConfigError) as info:
        validate_for_up(own)
    assert str(info.value) == "t.conf:7: peer has this interface's own public key"
    validate_for_up(loads(peer_text()))


# ------------------------------------------------------------------------ secrets

def test_reprs_do_not_leak_keys() -> None:
    cfg = load(FIXTURE)
    texts = [repr(cfg), repr(cfg.interface), *map(repr, cfg.peers), str(cfg)]
    secrets = [PRIV, PSK, b64d(PRIV).hex(), b64d(PSK).hex(), repr(b64d(PRIV)), repr(b64d(PSK))]
    for text in texts:
        for secret in secrets:
            assert secret not in text
    assert "private_key=<redacted>" in repr(cfg.interface)
    assert "preshared_key=<redacted>" in repr(cfg.peers[0])
    assert "preshared_key" not in repr(cfg.peers[1])
    assert PUB1 in repr(cfg.peers[0])  # public keys are shown, as base64


def test_permission_warning(tmp_path: Path) -> None:
    conf = tmp_path / "wg9.conf"
    conf.write_text(peer_text())
    tmp_path.chmod(0o755)
    conf.chmod(0o600)
    assert permission_warning(conf) is None
    conf.chmod(0o644)
    assert permission_warning(conf) == f"Warning: `{conf.resolve()}' is world accessible"
    conf.chmod(0o602)
    assert permission_warning(conf) == f"Warning: `{conf.resolve()}' is world accessible"
    conf.chmod(0o640)
    assert permission_warning(conf) == f"Warning: `{conf.resolve()}' is accessible to its group"
    conf.chmod(0o644)
    tmp_path.chmod(0o700)  # nobody else can reach the file: like wg-quick, no warning
    assert permission_warning(conf) is None
    tmp_path.chmod(0o755)
    link = tmp_path / "link.conf"
    link.symlink_to(conf)
    assert permission_warning(link) == f"Warning: `{conf.resolve()}' is world accessible"


# ------------------------------------------------------------------------ names

@pytest.mark.parametrize(("path", "name"), [
    ("/etc/wireguard/wg0.conf", "wg0"), ("wg0.conf", "wg0"), ("a/b/x_y=z+1.-.conf", "x_y=z+1.-"),
    ("./123456789012345.conf", "123456789012345"), ("/a/wg0.conf.d/wg1.conf", "wg1")])
def test_interface_name(path: str, name: str) -> None:
    assert interface_name(path) == name
    assert interface_name(Path(path)) == name


@pytest.mark.parametrize("path", ["/etc/wireguard/1234567890123456.conf", "wg0", "wg 0.conf",
                                  ".conf", "/etc/wireguard/wg0.conf.bak", "wg0.CONF"])
def test_interface_name_invalid(path: str) -> None:
    with pytest.raises(ConfigError) as info:
        interface_name(path)
    assert str(info.value) == (f"{path}:0: the config file must be a valid interface name"
                               " (1-15 of a-z A-Z 0-9 _ = + . -), followed by .conf")


def test_resolve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no *.conf here
    assert resolve("wg0") == Path("/etc/wireguard/wg0.conf")
    assert resolve("wg0", "/tmp/x") == Path("/tmp/x/wg0.conf")
    assert resolve("./wg0.conf") == Path("./wg0.conf")
    assert resolve("/srv/vpn/wg1.conf") == Path("/srv/vpn/wg1.conf")
    assert resolve("a-very-long-interface") == Path("a-very-long-interface")


def test_resolve_existing_conf_file_in_cwd_is_a_path(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's `wgx up wg-alpha.conf`: a valid interface name, but also a file here."""
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "wg-alpha.conf.conf").write_text("")  # what wg-quick would read instead
    (tmp_path / "wg-alpha.conf").write_text("")
    monkeypatch.chdir(tmp_path)
    assert resolve("wg-alpha.conf", str(etc)) == Path("wg-alpha.conf")
    assert resolve("wg-alpha.conf") == Path("wg-alpha.conf")
    assert resolve("wg-alpha", str(etc)) == etc / "wg-alpha.conf"  # a name stays a name
    (tmp_path / "wg0").write_text("")  # only files ending in .conf are taken as paths
    assert resolve("wg0", str(etc)) == etc / "wg0.conf"


def test_resolve_missing_conf_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        resolve("foo.conf", str(tmp_path / "etc"))
    assert str(info.value) == ("foo.conf:0: no such file (and, read as an interface name as"
                               f" wg-quick would, no {tmp_path}/etc/foo.conf.conf either)")
    # wg-quick's meaning still holds when only its file exists
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "foo.conf.conf").write_text("")
    assert resolve("foo.conf", str(tmp_path / "etc")) == tmp_path / "etc" / "foo.conf.conf"


# --------------------------------------------------------------------- writing back

def test_dumps_round_trip_of_fixture() -> None:
    cfg = load(FIXTURE)
    text = dumps(cfg)
    again = loads(text, cfg.path)
    assert again == cfg
    assert dumps(again) == text
    assert text.startswith(f"[Interface]\nPrivateKey = {PRIV}\nListenPort = 51820\n"
                           "FwMark = 0x1234\nAddress = 10.7.0.1/24, fd07::1/64, 10.8.0.1/32\n"
                           "DNS = 10.7.0.53, fd07::53, corp.example, ~.\nMTU = 1420\n"
                           "Table = 1234\nPreUp = echo pre-up %i\n")
    assert "\n[Peer]\nPublicKey = " + PUB3 + "\nAllowedIPs = 0.0.0.0/0, ::/0\n" \
           "Endpoint = vpn.example.net:443\nPersistentKeepalive = off\n" in text


def test_dumps_refuses_what_a_file_cannot_hold() -> None:
    cfg = loads(peer_text())
    cfg.interface.post_up.append("echo one\necho two")
    with pytest.raises(ValueError, match="line break"):
        dumps(cfg)
    cfg.interface.post_up[-1] = " padded"
    with pytest.raises(ValueError, match="surrounding whitespace"):
        dumps(cfg)
    cfg.interface.post_up.clear()
    cfg.peers[0].public_key = b"short"
    with pytest.raises(ValueError, match="cannot be written: PublicKey"):
        dumps(cfg)
    cfg.peers[0].public_key = b64d(PUB1)
    cfg.interface.dns.append("bad name")
    with pytest.raises(ValueError, match="cannot be written"):
        dumps(cfg)


def test_dumps_of_constructed_config() -> None:
    cfg = Config("x.conf", InterfaceConfig(listen_port=0, fwmark=0, table="off"),
                 [PeerConfig(b64d(PUB1), endpoint=Endpoint("2001:db8::1", 1),
                             persistent_keepalive=0)])
    text = dumps(cfg)
    assert text == ("[Interface]\nListenPort = 0\nFwMark = off\nTable = off\n\n[Peer]\n"
                    f"PublicKey = {PUB1}\nEndpoint = [2001:db8::1]:1\n"
                    "PersistentKeepalive = off\n")
    assert loads(text) == cfg


def test_wg_setconf_text_has_only_wg_keys() -> None:
    text = wg_setconf_text(load(FIXTURE))
    keys = {line.split("=", 1)[0].strip() for line in text.splitlines() if "=" in line}
    assert keys == {"PrivateKey", "ListenPort", "FwMark", "PublicKey", "PresharedKey",
                    "AllowedIPs", "Endpoint", "PersistentKeepalive"}
    assert text.count("[Peer]") == 3 and text.startswith("[Interface]\n")


def _wg_view(text: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """An independent reading of wg(8) setconf text, normalised for comparison."""
    sections: list[tuple[str, list[tuple[str, str]]]] = []
    for raw in text.splitlines():
        line = re.sub(r"\s", "", raw.split("#", 1)[0])
        if not line:
            continue
        if line.lower() in ("[interface]", "[peer]"):
            sections.append((line.lower(), []))
            continue
        key, value = line.split("=", 1)
        key = key.lower()
        if key == "allowedips":
            sections[-1][1].extend(
                (key, str(ipaddress.ip_network(v, strict=False))) for v in value.split(","))
            continue
        if key == "fwmark" or key == "persistentkeepalive":
            value = "0" if value.lower() == "off" else str(int(value, 0))
        sections[-1][1].append((key, value))
    return [(name, sorted(items)) for name, items in sections]


@pytest.mark.privileged  # `wg-quick strip' re-executes itself with sudo unless root
def test_wg_setconf_text_matches_wg_quick_strip(tmp_path: Path) -> None:
    # `wg-quick strip' only parses the file (no interface, no network changes).
    if shutil.which("wg-quick") is None:
        pytest.skip("wg-quick is not installed")  # a failure under CI=true (privileged)
    conf = tmp_path / "wgtest0.conf"
    conf.write_text(FIXTURE.read_text())
    conf.chmod(0o600)
    result = subprocess.run(["wg-quick", "strip", str(conf)], capture_output=True, text=True,
                            timeout=30, check=True)
    stripped = result.stdout
    ours = wg_setconf_text(load(conf))
    assert _wg_view(ours) == _wg_view(stripped)
    # ... and both read back to the same wg-level configuration.
    assert loads(ours) == loads(stripped)
    assert loads(stripped).peers == load(conf).peers


# --------------------------------------------------------------------- properties

_ips4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
_ips6 = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)
_addr_prefix = st.one_of(st.tuples(_ips4, st.integers(0, 32)),
                         st.tuples(_ips6, st.integers(0, 128)))
_label = st.from_regex(r"[a-z][a-z0-9-]{0,8}[a-z0-9]", fullmatch=True)
_hostname = st.lists(_label, min_size=1, max_size=3).map(".".join)
_key = st.binary(min_size=32, max_size=32)
_hook = st.text(st.characters(codec="utf-8", exclude_characters="\n\r"), max_size=30).map(
    lambda s: s.strip(" \t\n\v\f\r"))
_table = st.one_of(st.sampled_from(["off", "auto", "main"]),
                   st.integers(0, 2**32 - 1).map(str),
                   st.from_regex(r"[A-Za-z_][A-Za-z0-9_.-]{0,10}", fullmatch=True))
_peer = st.builds(
    PeerConfig,
    public_key=_key.filter(lambda k: not is_low_order(k)),
    preshared_key=st.none() | _key,
    allowed_ips=st.lists(_addr_prefix.map(lambda t: ipaddress.ip_network(t, strict=False)),
                         max_size=4),
    endpoint=st.none() | st.builds(
        Endpoint, st.one_of(_ips4.map(str), _ips6.map(str), _hostname), st.integers(1, 65535)),
    persistent_keepalive=st.none() | st.integers(0, 65535),
)


@st.composite
def _configs(draw: st.DrawFn) -> Config:
    addresses = draw(st.lists(_addr_prefix.map(ipaddress.ip_interface), max_size=4))
    low = 1280 if any(a.version == 6 for a in addresses) else 576
    iface = InterfaceConfig(
        private_key=draw(st.none() | _key),
        listen_port=draw(st.none() | st.integers(0, 65535)),
        fwmark=draw(st.none() | st.integers(0, 2**32 - 1)),
        addresses=addresses,
        dns=draw(st.lists(st.one_of(_ips4.map(str), _ips6.map(str), _hostname,
                                    st.just("~.")), max_size=4)),
        mtu=draw(st.none() | st.integers(low, 65535)),
        table=draw(st.none() | _table),
        pre_up=draw(st.lists(_hook, max_size=2)),
        post_up=draw(st.lists(_hook, max_size=2)),
        pre_down=draw(st.lists(_hook, max_size=2)),
        post_down=draw(st.lists(_hook, max_size=2)),
        save_config=draw(st.booleans()),
    )
    peers = draw(st.lists(_peer, max_size=4, unique_by=lambda p: p.public_key))
    return Config("gen.conf", iface, peers)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_configs())
def test_hypothesis_round_trip(cfg: Config) -> None:
    text = dumps(cfg)
    assert loads(text) == cfg
    wg_only = loads(wg_setconf_text(cfg))
    assert wg_only.peers == cfg.peers
    assert (wg_only.interface.private_key, wg_only.interface.listen_port,
            wg_only.interface.fwmark) == (cfg.interface.private_key,
                                          cfg.interface.listen_port, cfg.interface.fwmark)


_LINES = [
    "[Interface]", "[Peer]", "[peer", f"PrivateKey = {PRIV}", f"PublicKey = {PUB1}",
    f"PublicKey = {PUB2}", "AllowedIPs = 10.0.0.0/8, fd00::/8", "Endpoint = [::1]:1",
    "Endpoint = host:1", "MTU = 1280", "Address = fd00::1/64", "DNS = 1.1.1.1 x.y",
    "PostUp = echo %i", "# comment", "", "ListenPort = 1", "FwMark = 0x1",
    "PersistentKeepalive = off", "SaveConfig = true", "Table = auto",
]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(_LINES), st.text(max_size=20)), max_size=12))
def test_hypothesis_loads_never_crashes(lines: list[str]) -> None:
    text = "\n".join(lines)
    try:
        cfg = loads(text)
    except ConfigError as e:
        assert 1 <= e.line <= len(text.split("\n"))
        assert e.message.replace("\t", " ").isprintable()
        return
    assert loads(dumps(cfg)) == cfg
