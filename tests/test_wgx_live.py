"""wgx-userspace in live tunnels against wireguard-go: the cases beyond the interop matrix.

Large MTU, a TUN moved to another namespace, wg-quick with
WG_QUICK_USERSPACE_IMPLEMENTATION, setconf/syncconf/showconf, and hostile
datagrams (replayed, truncated, bit-flipped, unknown key) sent at the daemon
while the tunnel carries traffic.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import textwrap

import netlab
import pytest

from wgx.protocol import crypto, noise
from wgx.protocol.cookie import CookieGenerator
from wgx.protocol.messages import Initiation

pytestmark = pytest.mark.privileged

WGX = ["wgx-userspace"]
WGGO = ["wireguard-go"]
WGGO_ENV = {"WG_PROCESS_FOREGROUND": "1"}


def wgx_stats(h: netlab.Host, iface: str = "wg0") -> dict[str, int]:
    """wgx's drop/stat counters, read with the get=wgx request over its UAPI socket."""
    script = textwrap.dedent(f"""
        import socket
        s = socket.socket(socket.AF_UNIX); s.connect({str(h.socket_path(iface))!r})
        s.sendall(b"get=wgx\\n\\n"); buf = b""
        while not buf.endswith(b"\\n\\n"):
            buf += s.recv(65536)
        print(buf.decode())
    """)
    out = netlab._run([sys.executable, "-c", script]).stdout
    pairs = (line.partition("=") for line in out.splitlines() if "=" in line)
    return {k: int(v) for k, _, v in pairs if v.isdigit()}


def test_large_mtu(lab: netlab.Lab) -> None:
    tun = lab.tunnel(WGGO, WGX, env_a=WGGO_ENV, mtu=34000, establish=True)
    assert lab.b.run(["cat", "/sys/class/net/wg0/mtu"]).stdout.strip() == "34000"
    lab.ping(lab.a, tun.overlay4(lab.b), count=3, size=30000)
    lab.ping(lab.b, tun.overlay6(lab.a), count=3, size=30000)
    sent, received = lab.tcp_transfer_sha256(lab.b, lab.a, tun.overlay4(lab.a), 10 << 20)
    assert sent == received


def test_tun_moved_to_another_namespace(lab: netlab.Lab) -> None:
    """The UDP socket stays where the daemon started; the TUN can live elsewhere."""
    tun = lab.tunnel(WGGO, WGX, env_a=WGGO_ENV, establish=True)
    other = netlab.Host("c", lab.dir)
    lab.hosts["c"] = other  # torn down with the lab
    other.create()
    lab.b.ip("link", "set", "wg0", "netns", other.name)
    assert not lab.b.link_exists("wg0")
    other.addr_add("wg0", "10.99.0.2/24")
    other.link_up("wg0", mtu=1420)
    lab.ping(other, tun.overlay4(lab.a), count=3)
    lab.ping(lab.a, "10.99.0.2", count=3)
    assert "latest handshake" in lab.b.wg("show", "wg0")  # UAPI still served from b


def test_wg_quick_userspace_implementation(lab: netlab.Lab) -> None:
    a, b = lab.a, lab.b
    a.start_daemon(WGGO, "wg0", env=WGGO_ENV)
    a.wg("set", "wg0", "private-key", str(a.private_key_file), "listen-port", "51820",
         "peer", b.public_key, "allowed-ips", "10.99.0.2/32")
    a.addr_add("wg0", "10.99.0.1/24")
    a.link_up("wg0")
    conf = b.dir / "wgq0.conf"
    conf.write_text(textwrap.dedent(f"""
        [Interface]
        PrivateKey = {b.private_key_file.read_text().strip()}
        Address = 10.99.0.2/24
        MTU = 1380

        [Peer]
        PublicKey = {a.public_key}
        Endpoint = 198.18.0.1:51820
        AllowedIPs = 10.99.0.1/32
    """))
    os.chmod(conf, 0o600)
    env = {**os.environ, "WG_QUICK_USERSPACE_IMPLEMENTATION": "wgx-userspace"}
    cp = netlab._run(b.uapi_wrap(["wg-quick", "up", str(conf)]), env=env, timeout=60)
    assert cp.returncode == 0, cp.stderr
    assert b.run(["cat", "/sys/class/net/wgq0/mtu"]).stdout.strip() == "1380"
    lab.ping(b, "10.99.0.1", count=3, attempts=5)
    assert "latest handshake" in b.wg("show", "wgq0")
    cp = netlab._run(b.uapi_wrap(["wg-quick", "down", str(conf)]), env=env, timeout=60)
    assert cp.returncode == 0, cp.stderr
    assert netlab.wait_until(lambda: not b.socket_path("wgq0").exists(), timeout=5)
    assert not b.link_exists("wgq0")


def test_setconf_syncconf_showconf(lab: netlab.Lab) -> None:
    h = lab.b
    h.start_daemon(WGX, "wg0")
    keys = [h.run(["wg", "genkey"]).stdout.strip() for _ in range(3)]
    pubs = [h.run(["wg", "pubkey"], input=k + "\n").stdout.strip() for k in keys]
    conf = h.dir / "wg0.conf"
    conf.write_text(textwrap.dedent(f"""
        [Interface]
        PrivateKey = {keys[0]}
        ListenPort = 51900
        FwMark = 0x1234

        [Peer]
        PublicKey = {pubs[1]}
        AllowedIPs = 10.99.1.0/24, fd99:1::/64
        Endpoint = 198.18.0.1:51820
        PersistentKeepalive = 0

        [Peer]
        PublicKey = {pubs[2]}
        AllowedIPs = 10.99.2.0/24
    """))
    h.wg("setconf", "wg0", str(conf))
    shown = h.wg("showconf", "wg0")
    assert f"PrivateKey = {keys[0]}" in shown and "ListenPort = 51900" in shown
    assert "FwMark = 0x1234" in shown
    assert "AllowedIPs = 10.99.1.0/24, fd99:1::/64" in shown
    assert "Endpoint = 198.18.0.1:51820" in shown
    # syncconf: drop peer 2, change peer 1's allowed IPs; nothing else moves.
    conf.write_text(conf.read_text().split("[Peer]\nPublicKey = " + pubs[2])[0]
                    .replace("10.99.1.0/24, fd99:1::/64", "10.99.3.0/24"))
    h.wg("syncconf", "wg0", str(conf))
    dump = lab.wg_show_dump(h, "wg0")
    assert set(dump["peers"]) == {pubs[1]}
    assert dump["peers"][pubs[1]]["allowed_ips"] == ["10.99.3.0/24"]
    assert dump["listen_port"] == 51900
    # showconf output is accepted back by setconf unchanged.
    again = h.dir / "again.conf"
    again.write_text(h.wg("showconf", "wg0"))
    h.wg("setconf", "wg0", str(again))
    assert h.wg("showconf", "wg0") == again.read_text()


_SNIFF = r"""
import socket, sys, time
port, want = int(sys.argv[1]), int(sys.argv[2])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
s.bind(("ul0", 0)); s.settimeout(0.5)
deadline = time.monotonic() + 15
out = []
while len(out) < want and time.monotonic() < deadline:
    try:
        frame = s.recv(65535)
    except TimeoutError:
        continue
    ip = frame[14:]
    if ip[9] != 17:
        continue
    udp = ip[(ip[0] & 15) * 4:]
    payload = udp[8:]
    if int.from_bytes(udp[2:4], "big") == port and payload[:1] == b"\x04" and len(payload) > 32:
        out.append(payload.hex())
print(" ".join(out))
"""

_SEND = r"""
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for h in sys.argv[3:]:
    s.sendto(bytes.fromhex(h), (host, port))
"""


def test_hostile_datagrams_dropped_counted_and_tunnel_survives(lab: netlab.Lab) -> None:
    tun = lab.tunnel(WGGO, WGX, env_a=WGGO_ENV, establish=True)
    a, b = lab.a, lab.b
    port = tun.ports["b"]
    sniffer = b.popen([sys.executable, "-c", _SNIFF, str(port), "1"],
                      stdout=subprocess.PIPE, text=True)
    lab.ping(a, tun.overlay4(b), count=3)
    captured = bytes.fromhex(sniffer.communicate(timeout=20)[0].split()[0])
    before = wgx_stats(b)

    flipped = bytearray(captured)
    flipped[8:16] = (2**40).to_bytes(8, "little")  # an unseen counter...
    flipped[-1] ^= 0x01  # ...with a broken tag
    truncated_short = captured[:20]
    # still a valid length, with an unseen counter: fails authentication
    truncated_long = captured[:8] + (2**41).to_bytes(8, "little") + captured[16:48]
    unknown_index = bytearray(captured)
    unknown_index[4:8] = b"\xde\xad\xbe\xef"
    # A well-formed initiation from a key b does not know (valid mac1).
    stranger = crypto.generate_private_key()
    b_pub = crypto.public_key(base64.b64decode(b.private_key_file.read_text()))
    eph, enc_s, enc_t, _ = noise.create_initiation(
        stranger, b_pub, crypto.generate_private_key(), crypto.tai64n(1_800_000_000 * 10**9))
    msg = Initiation(7, eph, enc_s, enc_t, bytes(16), bytes(16)).pack()
    stranger_init = CookieGenerator(b_pub).add_macs(msg, 0.0)
    junk = b"\xff" * 100
    datagrams = [captured, captured, bytes(flipped), truncated_short, truncated_long,
                 bytes(unknown_index), stranger_init, junk]
    a.run([sys.executable, "-c", _SEND, b.underlay["v4"], str(port)]
          + [d.hex() for d in datagrams])

    assert netlab.wait_until(
        lambda: wgx_stats(b).get("drop.replay", 0) - before.get("drop.replay", 0) >= 2,
        timeout=5)
    after = wgx_stats(b)

    def delta(k: str) -> int:
        return after.get(k, 0) - before.get(k, 0)

    assert delta("drop.replay") == 2
    assert delta("drop.bad_tag") == 2  # flipped + truncated_long
    assert delta("drop.malformed") == 2  # truncated_short + junk (not type 1-4 sized)
    assert delta("drop.unknown_index") == 1
    assert delta("drop.unknown_peer") == 1
    # The session is undisturbed: same endpoint, traffic flows both ways.
    lab.ping(a, tun.overlay4(b), count=3)
    lab.ping(b, tun.overlay6(a), count=3)
    assert lab.peer_stats("b")["endpoint"] == ("198.18.0.1", tun.ports["a"])
